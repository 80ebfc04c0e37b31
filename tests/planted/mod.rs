//! A planted-structure pool for the bandit tests: clusters with far-apart random centroids,
//! some "reference-like" (influence drawn around +1) and the rest noise (around -0.2), and a
//! driver that runs the plan/observe loop with a real scorer function.
#![allow(dead_code)]
use quad::bandit::{
    Bandit, BanditConfig, ClusterInput, DocLoc, InMemoryBandit, Member, MemberRef, RoundOutcome,
};
use quad::config::Strategy;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub const CLUSTERS: u32 = 20;
pub const DOCS: u64 = 100;

pub fn is_good(cluster: u32) -> bool {
    cluster % 3 == 0
}

/// A standard normal draw (Box-Muller).
fn normal(rng: &mut ChaCha8Rng) -> f64 {
    let u1: f64 = rng.random::<f64>().max(1e-12);
    let u2: f64 = rng.random();
    (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
}

pub fn pool() -> Vec<ClusterInput> {
    let mut rng = ChaCha8Rng::seed_from_u64(99);
    (0..CLUSTERS)
        .map(|id| ClusterInput {
            id,
            centroid: (0..32).map(|_| normal(&mut rng) as f32).collect(),
            members: (0..DOCS)
                .map(|row| Member {
                    loc: DocLoc {
                        shard: u64::from(id % 4),
                        row_group: 0,
                        row: u64::from(id) * 1000 + row,
                    },
                    tokens: rng.random_range(50..150),
                })
                .collect(),
        })
        .collect()
}

/// The influence of a document: fixed by its location, drawn around +1 in good clusters and
/// around -0.2 in noise clusters (sd 0.5).
pub fn influence(m: &MemberRef) -> f64 {
    let mut rng = ChaCha8Rng::seed_from_u64(m.loc.row ^ 0x5eed);
    let mean = if is_good(m.cluster) { 1.0 } else { -0.2 };
    mean + 0.5 * normal(&mut rng)
}

pub fn bandit(seed: u64, strategy: Strategy, config: BanditConfig) -> InMemoryBandit {
    let mut b = InMemoryBandit::new(seed, strategy, config).unwrap();
    b.sync_clusters(&pool()).unwrap();
    b
}

/// One round: plan, score what must be scored, observe.
pub fn step(b: &mut InMemoryBandit) -> (Vec<quad::bandit::Pull>, RoundOutcome) {
    step_scored_by(b, influence)
}

/// One round with the scores `score` gives.
pub fn step_scored_by(
    b: &mut InMemoryBandit,
    score: impl Fn(&MemberRef) -> f64,
) -> (Vec<quad::bandit::Pull>, RoundOutcome) {
    let round = b.next_round();
    let pulls = b.plan_round(round);
    let scores: Vec<(MemberRef, f64)> = pulls
        .iter()
        .filter(|p| p.score)
        .flat_map(|p| p.members.iter().map(|m| (*m, score(m))))
        .collect();
    let outcome = b.observe(round, &scores).unwrap();
    (pulls, outcome)
}

/// Runs until done (or `max_rounds`); returns every round's pulls and outcome.
pub fn run(
    b: &mut InMemoryBandit,
    max_rounds: usize,
) -> Vec<(Vec<quad::bandit::Pull>, RoundOutcome)> {
    let mut out = Vec::new();
    while !b.is_done() && out.len() < max_rounds {
        out.push(step(b));
    }
    out
}

/// The planted pool committed into a state store as one epoch's clustering.
pub fn store_with_pool(
    path: &std::path::Path,
    seed: u64,
    fingerprint: &serde_json::Value,
) -> quad::state::StateStore {
    use quad::state::{ClusterCommit, ClusterInfo, EpochCommit, EpochRecord, StateStore};
    let store = StateStore::open(path, fingerprint).unwrap();
    let pool = pool();
    let members = pool
        .iter()
        .flat_map(|c| {
            c.members.iter().map(|m| quad::state::Member {
                cluster: c.id,
                epoch: m.loc.shard,
                row_group: m.loc.row_group,
                row: m.loc.row,
                tokens: m.tokens as u32,
                flags: 0,
            })
        })
        .collect();
    let clusters = pool
        .iter()
        .map(|c| ClusterInfo {
            cluster: c.id,
            centroid: c.centroid.clone(),
            size: c.members.len() as u64,
            tokens: c.members.iter().map(|m| m.tokens).sum(),
            fresh: 0,
        })
        .collect();
    store
        .commit_epoch(&EpochCommit {
            epoch: 0,
            record: EpochRecord::default(),
            accepted: vec![],
            rejects: vec![],
            clusters: Some(ClusterCommit {
                members,
                clusters,
                state: vec![],
                seed,
                semantic: Default::default(),
            }),
            fit_sample: vec![],
            fit_sample_size: 0,
            dedup: Default::default(),
        })
        .unwrap();
    store
}

/// The bandit where the store's last round left it, with the store's aggregates.
pub fn bandit_from_store(store: &quad::state::StateStore, seed: u64, cfg: &BanditConfig) -> Bandit {
    let mut b = store
        .bandit()
        .unwrap()
        .unwrap_or_else(|| Bandit::new(seed, Strategy::Quad, cfg.clone()).unwrap());
    let changes: Vec<quad::bandit::ClusterChange> = store
        .clusters()
        .unwrap()
        .into_iter()
        .map(|c| one_change(&c))
        .collect();
    b.reset_aggregates(&changes).unwrap();
    b
}

/// A cluster of a one-process store as one change of the aggregates: its whole size, tokens
/// and fresh members, with its centroid.
fn one_change(c: &quad::state::ClusterInfo) -> quad::bandit::ClusterChange {
    quad::bandit::ClusterChange {
        cluster: c.cluster,
        centroid: Some((0, c.centroid.clone())),
        docs: c.size,
        tokens: c.tokens,
        fresh: c.fresh as i64,
        ..Default::default()
    }
}

/// One round driven through the store: plan, draw from the store, score, observe, commit.
pub fn store_round(
    store: &quad::state::StateStore,
    b: &mut Bandit,
) -> (Vec<quad::bandit::Pull>, quad::bandit::RoundOutcome) {
    let round = b.next_round();
    let pulls: Vec<quad::bandit::Pull> = b
        .plan_round(round)
        .iter()
        .map(|r| store.draw(b.seed(), round, r).unwrap())
        .collect();
    let scores: Vec<(MemberRef, f64)> = pulls
        .iter()
        .filter(|p| p.score)
        .flat_map(|p| p.members.iter().map(|m| (*m, influence(m))))
        .collect();
    let out = b.observe(round, &pulls, &scores).unwrap();
    let record = quad::report::RoundRecord::new(&pulls, &out);
    store.commit_decision(&record, b, &out).unwrap();
    store
        .apply_round_part(0, b.seed(), &out.part(), true)
        .unwrap();
    (pulls, out)
}

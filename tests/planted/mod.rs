//! A planted-structure pool for the bandit tests: clusters with far-apart random centroids,
//! some "reference-like" (influence drawn around +1) and the rest noise (around -0.2), and a
//! driver that runs the plan/observe loop with a real scorer function.
#![allow(dead_code)]
use quad::bandit::{Bandit, BanditConfig, ClusterInput, DocLoc, Member, MemberRef, RoundOutcome};
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

pub fn bandit(seed: u64, strategy: Strategy, config: BanditConfig) -> Bandit {
    let mut b = Bandit::new(seed, strategy, config).unwrap();
    b.sync_clusters(&pool()).unwrap();
    b
}

/// One round: plan, score what must be scored, observe.
pub fn step(b: &mut Bandit) -> (Vec<quad::bandit::Pull>, RoundOutcome) {
    let round = b.next_round();
    let pulls = b.plan_round(round);
    let scores: Vec<(MemberRef, f64)> = pulls
        .iter()
        .filter(|p| p.score)
        .flat_map(|p| p.members.iter().map(|m| (*m, influence(m))))
        .collect();
    let outcome = b.observe(round, &scores).unwrap();
    (pulls, outcome)
}

/// Runs until done (or `max_rounds`); returns every round's pulls and outcome.
pub fn run(b: &mut Bandit, max_rounds: usize) -> Vec<(Vec<quad::bandit::Pull>, RoundOutcome)> {
    let mut out = Vec::new();
    while !b.is_done() && out.len() < max_rounds {
        out.push(step(b));
    }
    out
}

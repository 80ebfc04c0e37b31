//! The Quad bandit over clusters (DESIGN 1.2), as a deterministic library that the dataflow
//! drives round by round. Its state is O(k): per arm T, S, size, unsampled count and tokens,
//! and the pool's totals, kept incrementally. The members themselves live with the membership
//! stage (the state store in a job, [`draw::MemoryMembership`] in tests and tools):
//!
//! 1. [`Bandit::apply`] takes a cluster's change (new members, a moved centroid).
//! 2. [`Bandit::plan_round`] says how many members to draw from which clusters, and whether to
//!    score them (a pure function of the state, the seed and the round).
//! 3. The membership stage draws them ([`draw`]: seeded by (seed, round, cluster), so the
//!    draw does not depend on the number of workers).
//! 4. [`Bandit::observe`] takes the drawn pulls and the influence of the scored members,
//!    updates the arms and returns what is selected.
//!
//! The state is `Serialize`/`Deserialize`, stored with each round, so a killed job resumes
//! exactly. `operator` drives it in the job's dataflow (the bandit operator, on worker 0).
pub mod aggregates;
pub mod arms;
pub mod config;
pub mod draw;
pub mod operator;
pub mod record;
pub mod scale;
pub mod tune;

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

pub use arms::Arm;
pub use config::{BanditConfig, Budget, RewardScale, Strategy, TauMode};
pub use draw::{ClusterInput, InMemoryBandit, Member, MemoryMembership};
pub use scale::ScoreScale;

/// Where a document lives: its shard (by epoch), row group and row. The bandit only compares
/// and orders locations; the dataflow uses them to fetch rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DocLoc {
    pub shard: u64,
    pub row_group: u32,
    pub row: u64,
}

/// The members whose score lies between the `band` quantiles of the scores counted from the
/// best (`perplexity`: the score is the negated loss, so these are loss quantiles), in a
/// seeded order fixed by their location. `sorted` is best first.
fn within_band(
    sorted: Vec<(MemberRef, f64)>,
    [lo, hi]: [f64; 2],
    seed: u64,
) -> Vec<(MemberRef, f64)> {
    let n = sorted.len();
    if n == 0 {
        return sorted;
    }
    // Best first is lowest loss first: loss quantile q is the member at place q (n - 1).
    let at = |q: f64| sorted[(q * (n - 1) as f64).round() as usize].1;
    let (low_score, high_score) = (at(hi), at(lo));
    let mut kept: Vec<(MemberRef, f64)> = sorted
        .into_iter()
        .filter(|(_, v)| (low_score..=high_score).contains(v))
        .collect();
    let key = |m: &MemberRef| {
        crate::hash::mix(
            crate::hash::mix(seed ^ 0x6261_6e64 ^ m.loc.shard) ^ m.loc.row.rotate_left(32),
        )
    };
    kept.sort_by_key(|(m, _)| (key(m), *m));
    kept
}

/// A member the bandit asks for (to score, or to take).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MemberRef {
    pub cluster: u32,
    pub loc: DocLoc,
    pub tokens: u64,
}

/// What a round asks of one cluster's membership: how many members to draw.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PullRequest {
    pub cluster: u32,
    /// Members to draw for the sample.
    pub sample: usize,
    /// Further members drawn as the block candidates (`block` mode; taken unscored when the
    /// sample's mean passes tau, left unsampled otherwise).
    pub block: usize,
    /// Whether the sample must be scored (false for `explore`: it is taken as it is).
    pub score: bool,
    /// The cluster's UCB score when it was chosen; `None` for an untried arm or a strategy
    /// without scores.
    pub cluster_score: Option<f64>,
}

/// One cluster's part of a round, as drawn by the membership stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pull {
    pub cluster: u32,
    pub members: Vec<MemberRef>,
    /// Block candidates (empty unless `block` mode).
    pub block: Vec<MemberRef>,
    pub score: bool,
    pub cluster_score: Option<f64>,
}

/// A cluster's change as its aggregates (`aggregates`) report it, never the members
/// themselves: from ingest, members that joined (counts and tokens) and, when it moved, its
/// centroid; from the Quad loop, members that left the unsampled ones (drawn and scored, or
/// taken unscored) and members selected.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterChange {
    pub cluster: u32,
    /// The centroid after the epoch that moved it (epoch, unit vector); the latest epoch wins.
    pub centroid: Option<(u64, Vec<f32>)>,
    pub docs: u64,
    pub tokens: u64,
    /// Change of the unsampled members: joined (ingest) minus left (rounds).
    pub fresh: i64,
    pub selected_docs: u64,
    pub selected_tokens: u64,
}

/// The counts a round's decisions change (unsampled members per cluster, selected documents and
/// tokens). The loop's aggregates carry the same changes back from the operators that carried
/// the decisions out; the bandit plans the next round on those.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundCounts {
    fresh: Vec<(u32, u64)>,
    selected_docs: u64,
    selected_tokens: u64,
}

/// What a round decided.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundOutcome {
    pub round: u64,
    /// Selected members with their influence (`None` when taken unscored: block or explore).
    pub selected: Vec<(MemberRef, Option<f64>)>,
    /// Every scored member with its influence.
    pub scored: Vec<(MemberRef, f64)>,
    /// Members drawn to be scored that could not be (a score that is not finite, a text that
    /// could not be read): sampled, rejected with the reason, never selected, not in a reward.
    #[serde(default)]
    pub unscorable: Vec<(MemberRef, String)>,
    /// r_i per pulled and scored cluster: the mean influence of its sample, in the unit of
    /// `bandit.reward` (robust standard units of the scores seen, by default).
    pub rewards: Vec<(u32, f64)>,
    /// Tokens selected so far (all rounds).
    pub selected_tokens: u64,
    /// True when the loop has nothing left to do (budget reached or no arm left).
    pub done: bool,
}

impl RoundOutcome {
    /// Members that leave the unsampled pool in this round (scored, unscorable or taken), each
    /// once.
    pub fn sampled(&self) -> Vec<MemberRef> {
        members_left(&self.scored, &self.unscorable, &self.selected)
    }

    /// What the round changed of the pool's members, for the stores that hold them (each
    /// carries out the part of its own members, `RoundPart::only`).
    pub fn part(&self) -> RoundPart {
        RoundPart {
            round: self.round,
            selected: self.selected.clone(),
            scored: self.scored.clone(),
            unscorable: self.unscorable.clone(),
        }
    }
}

/// What a decided round changed of the members one store holds, carried out in that store (`StateStore::apply_round_part`): the members' flags, rejects and pending rows.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundPart {
    pub round: u64,
    /// Selected members with their influence (`None` when taken unscored).
    pub selected: Vec<(MemberRef, Option<f64>)>,
    pub scored: Vec<(MemberRef, f64)>,
    pub unscorable: Vec<(MemberRef, String)>,
}

impl RoundPart {
    /// Members of the part that leave the unsampled pool, each once.
    pub fn sampled(&self) -> Vec<MemberRef> {
        members_left(&self.scored, &self.unscorable, &self.selected)
    }

    /// The part of the members `owned` accepts.
    pub fn only(mut self, owned: impl Fn(&MemberRef) -> bool) -> RoundPart {
        self.selected.retain(|(m, _)| owned(m));
        self.scored.retain(|(m, _)| owned(m));
        self.unscorable.retain(|(m, _)| owned(m));
        self
    }
}

fn members_left(
    scored: &[(MemberRef, f64)],
    unscorable: &[(MemberRef, String)],
    selected: &[(MemberRef, Option<f64>)],
) -> Vec<MemberRef> {
    let mut out: Vec<MemberRef> = scored
        .iter()
        .map(|(m, _)| *m)
        .chain(unscorable.iter().map(|(m, _)| *m))
        .chain(selected.iter().map(|(m, _)| *m))
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}

#[derive(Debug, thiserror::Error)]
pub enum BanditError {
    #[error(
        "strategy '{0:?}' is not a bandit strategy (random selection is done by the admit stage)"
    )]
    NotABandit(Strategy),
    #[error("invalid bandit settings: {0}")]
    Config(String),
    #[error("cluster {cluster}: centroid has {got} dimensions, other clusters have {want}")]
    Dimension {
        cluster: u32,
        got: usize,
        want: usize,
    },
    #[error("round {got} observed, but round {want} is the next one")]
    OutOfOrder { got: u64, want: u64 },
    #[error("round {round}: the drawn pulls do not match the plan ({reason})")]
    DrawMismatch { round: u64, reason: String },
    #[error("round {round}: no score for member {member:?} of cluster {cluster}")]
    MissingScore {
        round: u64,
        cluster: u32,
        member: DocLoc,
    },
    #[error("round {round}: a score came for {member:?} of cluster {cluster}, which the round did not ask to score")]
    NotPlanned {
        round: u64,
        cluster: u32,
        member: DocLoc,
    },
    #[error("cluster {cluster}: {left} members left its unsampled ones, which held {held}")]
    Overdrawn { cluster: u32, left: i64, held: u64 },
}

/// One arm: the cluster's aggregates and its T and S.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ClusterState {
    id: u32,
    centroid: Vec<f32>,
    /// The epoch whose centroid this is (later epochs' centroids replace it).
    centroid_epoch: u64,
    size: u64,
    tokens: u64,
    /// Members neither scored nor taken: what can still be drawn.
    fresh: u64,
    arm: Arm,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bandit {
    seed: u64,
    strategy: Strategy,
    config: BanditConfig,
    /// Sorted by id.
    clusters: Vec<ClusterState>,
    /// The next round `observe` accepts.
    next_round: u64,
    selected_tokens: u64,
    selected_docs: u64,
    scored_docs: u64,
    pool_docs: u64,
    pool_tokens: u64,
    /// `topk-influence` only: every scored member until all are scored and the best are taken.
    /// That strategy scores the whole pool by definition; the quad strategies never fill it.
    candidates: Vec<(MemberRef, f64)>,
    /// The scores seen, for standardised rewards and `tau_quantile` (bounded).
    scale: ScoreScale,
    /// `perplexity`: the band of loss quantiles kept (`select.perplexity_band`).
    #[serde(default)]
    band: Option<[f64; 2]>,
}

impl Bandit {
    pub fn new(seed: u64, strategy: Strategy, config: BanditConfig) -> Result<Bandit, BanditError> {
        if !strategy.runs_bandit() {
            return Err(BanditError::NotABandit(strategy));
        }
        config.validate().map_err(BanditError::Config)?;
        Ok(Bandit {
            seed,
            strategy,
            config,
            clusters: Vec::new(),
            next_round: 0,
            selected_tokens: 0,
            selected_docs: 0,
            scored_docs: 0,
            pool_docs: 0,
            pool_tokens: 0,
            candidates: Vec::new(),
            scale: ScoreScale::default(),
            band: None,
        })
    }

    /// The threshold a scored document must reach: `tau_quantile` of the scores seen when it
    /// is set (and any were seen), `tau` otherwise.
    pub fn threshold(&self) -> f64 {
        self.config
            .tau_quantile
            .and_then(|q| self.scale.quantile(q))
            .unwrap_or(self.config.tau)
    }

    /// What an arm is credited for a sample of mean influence m (`bandit.reward`), with the
    /// scale as it stands: computed once a round, after the round's scores joined it.
    fn reward_function(&self) -> Box<dyn Fn(f64) -> f64> {
        match self.config.reward {
            RewardScale::Standardised => Box::new(self.scale.standardiser()),
            RewardScale::Raw => Box::new(|mean| mean),
        }
    }

    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn strategy(&self) -> Strategy {
        self.strategy
    }

    pub fn config(&self) -> &BanditConfig {
        &self.config
    }

    /// The round `observe` expects next (where a resumed loop goes on).
    pub fn next_round(&self) -> u64 {
        self.next_round
    }

    pub fn selected_tokens(&self) -> u64 {
        self.selected_tokens
    }

    pub fn selected_docs(&self) -> u64 {
        self.selected_docs
    }

    pub fn scored_docs(&self) -> u64 {
        self.scored_docs
    }

    /// Tokens of every member known (the ingested pool), kept incrementally.
    pub fn pool_tokens(&self) -> u64 {
        self.pool_tokens
    }

    pub fn pool_docs(&self) -> u64 {
        self.pool_docs
    }

    /// The token budget now: fixed, or a ratio of the pool's tokens (grows when streaming).
    pub fn budget_tokens(&self) -> u64 {
        match self.config.budget {
            Budget::Tokens(t) => t,
            Budget::Ratio(r) => (r * self.pool_tokens as f64).floor() as u64,
        }
    }

    /// (cluster id, arm) of every cluster, by id.
    pub fn arms(&self) -> Vec<(u32, Arm)> {
        self.clusters.iter().map(|c| (c.id, c.arm)).collect()
    }

    /// (cluster id, members, members not yet scored or taken), by id.
    pub fn cluster_sizes(&self) -> Vec<(u32, u64, u64)> {
        self.clusters
            .iter()
            .map(|c| (c.id, c.size, c.fresh))
            .collect()
    }

    fn cluster_index(&self, id: u32) -> Option<usize> {
        self.clusters.binary_search_by_key(&id, |c| c.id).ok()
    }

    /// Adds a cluster's change: joined members (counts), a moved centroid. O(log k).
    pub fn apply(&mut self, change: &ClusterChange) -> Result<(), BanditError> {
        if let Some((_, centroid)) = &change.centroid {
            let dim = self.clusters.iter().find(|c| !c.centroid.is_empty());
            if let Some(want) = dim.map(|c| c.centroid.len()) {
                if centroid.len() != want {
                    return Err(BanditError::Dimension {
                        cluster: change.cluster,
                        got: centroid.len(),
                        want,
                    });
                }
            }
        }
        let ci = match self.cluster_index(change.cluster) {
            Some(ci) => ci,
            None => {
                let at = self.clusters.partition_point(|c| c.id < change.cluster);
                self.clusters.insert(
                    at,
                    ClusterState {
                        id: change.cluster,
                        centroid: Vec::new(),
                        centroid_epoch: 0,
                        size: 0,
                        tokens: 0,
                        fresh: 0,
                        arm: Arm::default(),
                    },
                );
                at
            }
        };
        let cluster = &mut self.clusters[ci];
        if let Some((epoch, centroid)) = &change.centroid {
            if cluster.centroid.is_empty() || *epoch >= cluster.centroid_epoch {
                cluster.centroid.clone_from(centroid);
                cluster.centroid_epoch = *epoch;
            }
        }
        cluster.fresh =
            cluster
                .fresh
                .checked_add_signed(change.fresh)
                .ok_or(BanditError::Overdrawn {
                    cluster: change.cluster,
                    left: -change.fresh,
                    held: cluster.fresh,
                })?;
        cluster.size += change.docs;
        cluster.tokens += change.tokens;
        self.pool_docs += change.docs;
        self.pool_tokens += change.tokens;
        self.selected_docs += change.selected_docs;
        self.selected_tokens += change.selected_tokens;
        Ok(())
    }

    /// The counts that rounds change, as they stand. O(k).
    pub fn round_counts(&self) -> RoundCounts {
        RoundCounts {
            fresh: self.clusters.iter().map(|c| (c.id, c.fresh)).collect(),
            selected_docs: self.selected_docs,
            selected_tokens: self.selected_tokens,
        }
    }

    /// Sets the counts that rounds change back to `counts` (taken before a round's `observe`):
    /// the round's changes then come back through the loop's aggregates. O(k).
    pub fn restore_round_counts(&mut self, counts: &RoundCounts) {
        for &(id, fresh) in &counts.fresh {
            if let Some(ci) = self.cluster_index(id) {
                self.clusters[ci].fresh = fresh;
            }
        }
        self.selected_docs = counts.selected_docs;
        self.selected_tokens = counts.selected_tokens;
    }

    /// Replaces every cluster's aggregates by the stored ones (size, tokens, unsampled,
    /// centroid), keeping the arms: how a resumed job catches up with epochs committed after
    /// the last round.
    pub fn reset_aggregates(&mut self, clusters: &[ClusterChange]) -> Result<(), BanditError> {
        for c in &mut self.clusters {
            (c.size, c.tokens, c.fresh) = (0, 0, 0);
        }
        self.pool_docs = 0;
        self.pool_tokens = 0;
        for change in clusters {
            self.apply(change)?;
        }
        Ok(())
    }

    /// `perplexity` with `select.perplexity_band`: keeps the members whose loss lies between
    /// these quantiles of the scored pool's losses.
    pub fn with_band(mut self, band: Option<[f64; 2]>) -> Bandit {
        self.band = band;
        self
    }

    fn alpha(&self) -> f64 {
        match self.strategy {
            Strategy::Exploit => 0.0,
            _ => self.config.alpha,
        }
    }

    /// CS_i of every cluster (by id); `None` = untried.
    pub fn cluster_scores(&self) -> Vec<(u32, Option<f64>)> {
        let total: u64 = self.clusters.iter().map(|c| c.arm.pulls).sum();
        let alpha = self.alpha();
        self.clusters
            .iter()
            .map(|c| (c.id, c.arm.score(alpha, total)))
            .collect()
    }

    /// True when the budget is reached or no cluster has members left to sample.
    pub fn is_done(&self) -> bool {
        self.selected_tokens >= self.budget_tokens() || self.clusters.iter().all(|c| c.fresh == 0)
    }

    fn sample_size(&self, c: &ClusterState) -> usize {
        let by_ratio = (self.config.gamma * c.size as f64).ceil() as u64;
        by_ratio.max(self.config.n_min).min(c.fresh) as usize
    }

    fn request(&self, ci: usize, score: bool, cluster_score: Option<f64>) -> PullRequest {
        let c = &self.clusters[ci];
        let sample = self.sample_size(c);
        let block = if score && self.config.mode == TauMode::Block {
            (self.config.block_size).min(c.fresh - sample as u64) as usize
        } else {
            0
        };
        PullRequest {
            cluster: c.id,
            sample,
            block,
            score,
            cluster_score,
        }
    }

    /// The requests of `round`: a pure function of the state, the seed and the round. O(k).
    pub fn plan_round(&self, round: u64) -> Vec<PullRequest> {
        if self.is_done() {
            return Vec::new();
        }
        let open: Vec<usize> = (0..self.clusters.len())
            .filter(|&ci| self.clusters[ci].fresh > 0)
            .collect();
        let r = self.config.clusters_per_round;
        match self.strategy {
            Strategy::Quad | Strategy::Exploit => {
                let scores = self.cluster_scores();
                let open_scores: Vec<Option<f64>> = open.iter().map(|&ci| scores[ci].1).collect();
                arms::rank(&open_scores)
                    .into_iter()
                    .take(r)
                    .map(|k| self.request(open[k], true, open_scores[k]))
                    .collect()
            }
            Strategy::Explore => {
                let mut rng = draw::rng_for(self.seed, round, u32::MAX, draw::Purpose::Clusters);
                let mut chosen: Vec<usize> =
                    rand::seq::index::sample(&mut rng, open.len(), r.min(open.len()))
                        .into_iter()
                        .map(|i| open[i])
                        .collect();
                chosen.sort_unstable();
                chosen
                    .into_iter()
                    .map(|ci| self.request(ci, false, None))
                    .collect()
            }
            Strategy::TopkInfluence | Strategy::Perplexity => open
                .into_iter()
                .take(r)
                .map(|ci| PullRequest {
                    sample: self.clusters[ci].fresh as usize,
                    ..self.request(ci, true, None)
                })
                .collect(),
            Strategy::Random | Strategy::Dsir | Strategy::Semdedup => Vec::new(),
        }
    }

    /// Takes a member if the budget is not reached yet (so the budget is passed by at most one
    /// document). Returns whether it was taken; `was_fresh` when it had not been scored.
    fn take(&mut self, ci: usize, m: &MemberRef, was_fresh: bool) -> bool {
        if self.selected_tokens >= self.budget_tokens() {
            return false;
        }
        if was_fresh {
            self.clusters[ci].fresh -= 1;
        }
        self.selected_tokens += m.tokens;
        self.selected_docs += 1;
        true
    }

    /// Credits reward `r` of cluster `ci`: its own T and S, and its neighbours within rho.
    fn credit(&mut self, ci: usize, r: f64) {
        let rho = self.config.rho;
        let centroid = self.clusters[ci].centroid.clone();
        for (cj, c) in self.clusters.iter_mut().enumerate() {
            if cj == ci {
                c.arm.pulls += 1;
                c.arm.own_pulls += 1;
                c.arm.reward_sum += r;
            } else if let Some(s) =
                arms::shared_reward(r, arms::cosine_distance(&centroid, &c.centroid), rho)
            {
                c.arm.pulls += 1;
                c.arm.reward_sum += s;
            }
        }
    }

    /// Checks that the drawn pulls are the plan's (same clusters, order and counts).
    fn check_draw(&self, round: u64, pulls: &[Pull]) -> Result<(), BanditError> {
        let plan = self.plan_round(round);
        let mismatch = |reason: String| BanditError::DrawMismatch { round, reason };
        if plan.len() != pulls.len() {
            return Err(mismatch(format!(
                "{} pulls planned, {} drawn",
                plan.len(),
                pulls.len()
            )));
        }
        for (want, got) in plan.iter().zip(pulls) {
            if want.cluster != got.cluster
                || want.sample != got.members.len()
                || want.block != got.block.len()
                || want.score != got.score
            {
                return Err(mismatch(format!(
                    "cluster {}: planned {} + {} members, drawn cluster {} with {} + {}",
                    want.cluster,
                    want.sample,
                    want.block,
                    got.cluster,
                    got.members.len(),
                    got.block.len()
                )));
            }
        }
        Ok(())
    }

    /// The influence of every scored member of `pulls`, in pull order; checked before anything
    /// changes, so a refused round leaves the state as it was.
    fn values_of(
        round: u64,
        pulls: &[Pull],
        scores: &[(MemberRef, f64)],
    ) -> Result<Vec<Vec<f64>>, BanditError> {
        let mut by_loc: HashMap<(u32, DocLoc), f64> = HashMap::with_capacity(scores.len());
        for (m, v) in scores {
            by_loc.insert((m.cluster, m.loc), *v);
        }
        let mut values_of = Vec::with_capacity(pulls.len());
        for pull in pulls {
            let mut values = Vec::new();
            if pull.score {
                for m in &pull.members {
                    values.push(by_loc.remove(&(m.cluster, m.loc)).ok_or(
                        BanditError::MissingScore {
                            round,
                            cluster: m.cluster,
                            member: m.loc,
                        },
                    )?);
                }
            }
            values_of.push(values);
        }
        if let Some(((cluster, member), _)) = by_loc.into_iter().min_by_key(|(k, _)| *k) {
            return Err(BanditError::NotPlanned {
                round,
                cluster,
                member,
            });
        }
        Ok(values_of)
    }

    /// Takes round `round`'s drawn pulls and the scores of their scored members (nothing
    /// else), updates the arms and selects. Rounds must be observed in order: 0, 1, 2, ...
    pub fn observe(
        &mut self,
        round: u64,
        pulls: &[Pull],
        scores: &[(MemberRef, f64)],
    ) -> Result<RoundOutcome, BanditError> {
        if round != self.next_round {
            return Err(BanditError::OutOfOrder {
                got: round,
                want: self.next_round,
            });
        }
        self.check_draw(round, pulls)?;
        let values_of = Self::values_of(round, pulls, scores)?;
        // The round's scores join the scale before any reward or threshold is computed, so
        // the first round already has one.
        let scored = pulls.iter().zip(&values_of).filter(|(pull, _)| pull.score);
        self.scale.observe(
            self.seed,
            scored.flat_map(|(_, values)| values.iter().copied()),
        );
        let tau = self.threshold();
        let reward_of = self.reward_function();
        let mut outcome = RoundOutcome {
            round,
            ..Default::default()
        };
        for (pull, values) in pulls.iter().zip(values_of) {
            let Some(ci) = self.cluster_index(pull.cluster) else {
                continue;
            };
            if !pull.score {
                for m in &pull.members {
                    if self.take(ci, m, true) {
                        outcome.selected.push((*m, None));
                    }
                }
                continue;
            }
            // A score that is not finite is no score: the member is sampled and rejected, and
            // neither counts in the reward nor is selected.
            let mut finite: Vec<(MemberRef, f64)> = Vec::with_capacity(values.len());
            for (m, &v) in pull.members.iter().zip(&values) {
                self.clusters[ci].fresh -= 1;
                if v.is_finite() {
                    self.scored_docs += 1;
                    outcome.scored.push((*m, v));
                    finite.push((*m, v));
                } else {
                    outcome
                        .unscorable
                        .push((*m, format!("influence is not finite ({v})")));
                }
            }
            if self.strategy.scores_everything() {
                self.candidates.extend(finite);
                continue;
            }
            if finite.is_empty() {
                continue; // nothing to learn about the arm
            }
            let mean = finite.iter().map(|(_, v)| v).sum::<f64>() / finite.len() as f64;
            let reward = reward_of(mean);
            outcome.rewards.push((pull.cluster, reward));
            self.credit(ci, reward);
            for (m, v) in &finite {
                if *v >= tau && self.take(ci, m, false) {
                    outcome.selected.push((*m, Some(*v)));
                }
            }
            if self.config.mode == TauMode::Block && mean >= tau {
                for m in &pull.block {
                    if self.take(ci, m, true) {
                        outcome.selected.push((*m, None));
                    }
                }
            }
        }
        if self.strategy.scores_everything() && self.clusters.iter().all(|c| c.fresh == 0) {
            self.take_best(&mut outcome);
        }
        self.next_round += 1;
        outcome.selected_tokens = self.selected_tokens;
        outcome.done = self.is_done();
        Ok(outcome)
    }

    /// `topk-influence` and `perplexity`, once everything is scored: the best by score until
    /// the budget; with a band (`perplexity`), the members within it in a seeded order.
    fn take_best(&mut self, outcome: &mut RoundOutcome) {
        let mut all = std::mem::take(&mut self.candidates);
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        if let Some(band) = self.band {
            all = within_band(all, band, self.seed);
        }
        for (m, v) in all {
            let Some(ci) = self.cluster_index(m.cluster) else {
                continue;
            };
            if !self.take(ci, &m, false) {
                break;
            }
            outcome.selected.push((m, Some(v)));
        }
    }
}

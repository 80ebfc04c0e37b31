//! The Quad bandit over clusters (DESIGN 1.2), as a deterministic library that the dataflow
//! drives round by round:
//!
//! 1. [`Bandit::sync_clusters`] tells it the clusters (id, centroid, members).
//! 2. [`Bandit::plan_round`] says which members of which clusters to fetch, and whether to
//!    score them (a pure function of the state, the seed and the round).
//! 3. [`Bandit::observe`] takes the influence of the scored members, updates the arms and
//!    returns what is selected.
//!
//! The whole state is `Serialize`/`Deserialize`, so it can be stored with each round and a
//! killed job resumes exactly. Random choices use ChaCha seeded from (seed, round, cluster,
//! purpose), never a shared stream, so they do not depend on the number of workers.
pub mod arms;
pub mod config;
pub mod tune;

use std::collections::HashMap;

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

pub use arms::Arm;
pub use config::{BanditConfig, Budget, TauMode};

use crate::config::Strategy;

/// Where a document lives: its shard (by epoch), row group and row. The bandit only compares
/// and orders locations; the dataflow uses them to fetch rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DocLoc {
    pub shard: u64,
    pub row_group: u32,
    pub row: u64,
}

/// A cluster member as the membership store knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub loc: DocLoc,
    pub tokens: u64,
}

/// A cluster as the bandit needs it from the clustering stage.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterInput {
    pub id: u32,
    pub centroid: Vec<f32>,
    pub members: Vec<Member>,
}

/// A member the bandit asks for (to score, or to take).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct MemberRef {
    pub cluster: u32,
    pub loc: DocLoc,
    pub tokens: u64,
}

/// One cluster's part of a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Pull {
    pub cluster: u32,
    pub members: Vec<MemberRef>,
    /// Whether the members must be scored (false for `explore`: they are taken as they are).
    pub score: bool,
    /// The cluster's UCB score when it was chosen; `None` for an untried arm or a strategy
    /// without scores.
    pub cluster_score: Option<f64>,
}

/// What a round decided.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RoundOutcome {
    pub round: u64,
    /// Selected members with their influence (`None` when taken unscored: block or explore).
    pub selected: Vec<(MemberRef, Option<f64>)>,
    /// Every scored member with its influence.
    pub scored: Vec<(MemberRef, f64)>,
    /// r_i per pulled and scored cluster: the mean influence of its sample.
    pub rewards: Vec<(u32, f64)>,
    /// Tokens selected so far (all rounds).
    pub selected_tokens: u64,
    /// True when the loop has nothing left to do (budget reached or no arm left).
    pub done: bool,
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
    #[error("round {round}: influence of {member:?} is not finite ({value})")]
    NotFinite {
        round: u64,
        member: DocLoc,
        value: f64,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
enum Status {
    /// Not scored and not taken: can be sampled.
    Fresh,
    /// Scored and not taken; never sampled again.
    Scored,
    Selected,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct MemberState {
    loc: DocLoc,
    tokens: u64,
    status: Status,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ClusterState {
    id: u32,
    centroid: Vec<f32>,
    /// Sorted by location, so that sampling depends on the set of members, not arrival order.
    members: Vec<MemberState>,
    fresh: usize,
    arm: Arm,
}

impl ClusterState {
    fn fresh_indices(&self) -> Vec<usize> {
        (0..self.members.len())
            .filter(|&i| self.members[i].status == Status::Fresh)
            .collect()
    }

    fn member_ref(&self, i: usize) -> MemberRef {
        MemberRef {
            cluster: self.id,
            loc: self.members[i].loc,
            tokens: self.members[i].tokens,
        }
    }

    fn find(&self, loc: &DocLoc) -> Option<usize> {
        self.members.binary_search_by(|m| m.loc.cmp(loc)).ok()
    }
}

/// Why a ChaCha stream is drawn; part of its seed.
#[derive(Clone, Copy)]
enum Purpose {
    Sample = 0,
    Block = 1,
    Clusters = 2,
}

/// A ChaCha generator fixed by (seed, round, cluster, purpose) alone.
fn rng_for(seed: u64, round: u64, cluster: u32, purpose: Purpose) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&round.to_le_bytes());
    key[16..20].copy_from_slice(&cluster.to_le_bytes());
    key[20] = purpose as u8;
    ChaCha8Rng::from_seed(key)
}

/// `amount` of `from`, drawn without replacement, in drawn order.
fn sample_indices(rng: &mut ChaCha8Rng, from: &[usize], amount: usize) -> Vec<usize> {
    let amount = amount.min(from.len());
    rand::seq::index::sample(rng, from.len(), amount)
        .into_iter()
        .map(|i| from[i])
        .collect()
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
    /// `topk-influence`: every scored member, until all are scored and the best are taken.
    candidates: Vec<(MemberRef, f64)>,
}

impl Bandit {
    pub fn new(seed: u64, strategy: Strategy, config: BanditConfig) -> Result<Bandit, BanditError> {
        if strategy == Strategy::Random {
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
            candidates: Vec::new(),
        })
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

    /// Tokens of every member known (the ingested pool).
    pub fn pool_tokens(&self) -> u64 {
        self.clusters
            .iter()
            .flat_map(|c| c.members.iter().map(|m| m.tokens))
            .sum()
    }

    pub fn pool_docs(&self) -> u64 {
        self.clusters.iter().map(|c| c.members.len() as u64).sum()
    }

    /// The token budget now: fixed, or a ratio of the pool's tokens (grows when streaming).
    pub fn budget_tokens(&self) -> u64 {
        match self.config.budget {
            Budget::Tokens(t) => t,
            Budget::Ratio(r) => (r * self.pool_tokens() as f64).floor() as u64,
        }
    }

    /// (cluster id, arm) of every cluster, by id.
    pub fn arms(&self) -> Vec<(u32, Arm)> {
        self.clusters.iter().map(|c| (c.id, c.arm)).collect()
    }

    /// (cluster id, members, members not yet scored or taken), by id.
    pub fn cluster_sizes(&self) -> Vec<(u32, usize, usize)> {
        self.clusters
            .iter()
            .map(|c| (c.id, c.members.len(), c.fresh))
            .collect()
    }

    /// Whether a member was selected.
    pub fn is_selected(&self, cluster: u32, loc: &DocLoc) -> bool {
        self.cluster_index(cluster)
            .and_then(|ci| {
                let c = &self.clusters[ci];
                c.find(loc).map(|i| c.members[i].status == Status::Selected)
            })
            .unwrap_or(false)
    }

    fn cluster_index(&self, id: u32) -> Option<usize> {
        self.clusters.binary_search_by_key(&id, |c| c.id).ok()
    }

    /// Adds new clusters and new members, and moves centroids; members already known keep
    /// their status. Call between `observe` and the next `plan_round`.
    pub fn sync_clusters(&mut self, clusters: &[ClusterInput]) -> Result<(), BanditError> {
        let mut dim = self.clusters.first().map(|c| c.centroid.len());
        for input in clusters {
            let want = *dim.get_or_insert(input.centroid.len());
            if input.centroid.len() != want {
                return Err(BanditError::Dimension {
                    cluster: input.id,
                    got: input.centroid.len(),
                    want,
                });
            }
            let ci = match self.cluster_index(input.id) {
                Some(ci) => ci,
                None => {
                    let at = self.clusters.partition_point(|c| c.id < input.id);
                    self.clusters.insert(
                        at,
                        ClusterState {
                            id: input.id,
                            centroid: Vec::new(),
                            members: Vec::new(),
                            fresh: 0,
                            arm: Arm::default(),
                        },
                    );
                    at
                }
            };
            let cluster = &mut self.clusters[ci];
            cluster.centroid.clone_from(&input.centroid);
            let existing = cluster.members.len();
            let mut batch = std::collections::HashSet::new();
            for m in &input.members {
                let known = cluster.members[..existing]
                    .binary_search_by(|x| x.loc.cmp(&m.loc))
                    .is_ok();
                if !known && batch.insert(m.loc) {
                    cluster.members.push(MemberState {
                        loc: m.loc,
                        tokens: m.tokens,
                        status: Status::Fresh,
                    });
                    cluster.fresh += 1;
                }
            }
            if cluster.members.len() > existing {
                cluster.members.sort_by_key(|m| m.loc);
            }
        }
        Ok(())
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
        let by_ratio = (self.config.gamma * c.members.len() as f64).ceil() as u64;
        by_ratio.max(self.config.n_min).min(c.fresh as u64) as usize
    }

    fn sampled_pull(&self, round: u64, ci: usize, score: bool, cs: Option<f64>) -> Pull {
        let c = &self.clusters[ci];
        let mut rng = rng_for(self.seed, round, c.id, Purpose::Sample);
        let picked = sample_indices(&mut rng, &c.fresh_indices(), self.sample_size(c));
        Pull {
            cluster: c.id,
            members: picked.into_iter().map(|i| c.member_ref(i)).collect(),
            score,
            cluster_score: cs,
        }
    }

    /// The pulls of `round`: a pure function of the state, the seed and the round.
    pub fn plan_round(&self, round: u64) -> Vec<Pull> {
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
                    .map(|k| self.sampled_pull(round, open[k], true, open_scores[k]))
                    .collect()
            }
            Strategy::Explore => {
                let mut rng = rng_for(self.seed, round, u32::MAX, Purpose::Clusters);
                let mut chosen = sample_indices(&mut rng, &open, r);
                chosen.sort_unstable();
                chosen
                    .into_iter()
                    .map(|ci| self.sampled_pull(round, ci, false, None))
                    .collect()
            }
            Strategy::TopkInfluence => open
                .into_iter()
                .take(r)
                .map(|ci| {
                    let c = &self.clusters[ci];
                    Pull {
                        cluster: c.id,
                        members: c
                            .fresh_indices()
                            .into_iter()
                            .map(|i| c.member_ref(i))
                            .collect(),
                        score: true,
                        cluster_score: None,
                    }
                })
                .collect(),
            Strategy::Random => Vec::new(),
        }
    }

    /// Marks a member selected if the budget is not reached yet (so the budget is passed by at
    /// most one document). Returns whether it was taken.
    fn take(&mut self, ci: usize, i: usize) -> bool {
        if self.selected_tokens >= self.budget_tokens() {
            return false;
        }
        let m = &mut self.clusters[ci].members[i];
        if m.status == Status::Fresh {
            self.clusters[ci].fresh -= 1;
        }
        let m = &mut self.clusters[ci].members[i];
        m.status = Status::Selected;
        self.selected_tokens += m.tokens;
        self.selected_docs += 1;
        true
    }

    fn mark_scored(&mut self, ci: usize, i: usize) {
        let c = &mut self.clusters[ci];
        if c.members[i].status == Status::Fresh {
            c.fresh -= 1;
            c.members[i].status = Status::Scored;
        }
        self.scored_docs += 1;
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

    /// Takes the scores of round `round` (every member of its scored pulls, nothing else),
    /// updates the arms and selects. Rounds must be observed in order: 0, 1, 2, ...
    pub fn observe(
        &mut self,
        round: u64,
        scores: &[(MemberRef, f64)],
    ) -> Result<RoundOutcome, BanditError> {
        if round != self.next_round {
            return Err(BanditError::OutOfOrder {
                got: round,
                want: self.next_round,
            });
        }
        let plan = self.plan_round(round);
        let mut by_loc: HashMap<(u32, DocLoc), f64> = HashMap::with_capacity(scores.len());
        for (m, v) in scores {
            if !v.is_finite() {
                return Err(BanditError::NotFinite {
                    round,
                    member: m.loc,
                    value: *v,
                });
            }
            by_loc.insert((m.cluster, m.loc), *v);
        }
        // Check everything before changing anything: a refused round leaves the state as it was.
        let mut values_of: Vec<Vec<f64>> = Vec::with_capacity(plan.len());
        for pull in &plan {
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
        let mut outcome = RoundOutcome {
            round,
            ..Default::default()
        };
        for (pull, values) in plan.iter().zip(values_of) {
            let Some(ci) = self.cluster_index(pull.cluster) else {
                continue;
            };
            let idx: Vec<usize> = pull
                .members
                .iter()
                .filter_map(|m| self.clusters[ci].find(&m.loc))
                .collect();
            if !pull.score {
                for (&i, m) in idx.iter().zip(&pull.members) {
                    if self.take(ci, i) {
                        outcome.selected.push((*m, None));
                    }
                }
                continue;
            }
            for (&i, (m, &v)) in idx.iter().zip(pull.members.iter().zip(&values)) {
                self.mark_scored(ci, i);
                outcome.scored.push((*m, v));
            }
            if self.strategy == Strategy::TopkInfluence {
                self.candidates
                    .extend(pull.members.iter().copied().zip(values.iter().copied()));
                continue;
            }
            let reward = values.iter().sum::<f64>() / values.len().max(1) as f64;
            outcome.rewards.push((pull.cluster, reward));
            self.credit(ci, reward);
            let tau = self.config.tau;
            for (&i, (m, &v)) in idx.iter().zip(pull.members.iter().zip(&values)) {
                if v >= tau && self.take(ci, i) {
                    outcome.selected.push((*m, Some(v)));
                }
            }
            if self.config.mode == TauMode::Block && reward >= tau {
                let mut rng = rng_for(self.seed, round, pull.cluster, Purpose::Block);
                let fresh = self.clusters[ci].fresh_indices();
                let block = sample_indices(&mut rng, &fresh, self.config.block_size as usize);
                for i in block {
                    let m = self.clusters[ci].member_ref(i);
                    if self.take(ci, i) {
                        outcome.selected.push((m, None));
                    }
                }
            }
        }
        if self.strategy == Strategy::TopkInfluence && self.clusters.iter().all(|c| c.fresh == 0) {
            self.take_best(&mut outcome);
        }
        self.next_round += 1;
        outcome.selected_tokens = self.selected_tokens;
        outcome.done = self.is_done();
        Ok(outcome)
    }

    /// `topk-influence`, once everything is scored: the best by influence until the budget.
    fn take_best(&mut self, outcome: &mut RoundOutcome) {
        let mut all = std::mem::take(&mut self.candidates);
        all.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        for (m, v) in all {
            let Some(ci) = self.cluster_index(m.cluster) else {
                continue;
            };
            let Some(i) = self.clusters[ci].find(&m.loc) else {
                continue;
            };
            if !self.take(ci, i) {
                break;
            }
            outcome.selected.push((m, Some(v)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(row: u64) -> DocLoc {
        DocLoc {
            shard: 0,
            row_group: 0,
            row,
        }
    }

    fn cluster(id: u32, centroid: Vec<f32>, rows: std::ops::Range<u64>) -> ClusterInput {
        ClusterInput {
            id,
            centroid,
            members: rows
                .map(|r| Member {
                    loc: loc(r),
                    tokens: 10,
                })
                .collect(),
        }
    }

    #[test]
    fn sync_keeps_members_sorted_and_status() {
        let mut b = Bandit::new(1, Strategy::Quad, BanditConfig::default()).unwrap();
        let mut c = cluster(3, vec![1.0, 0.0], 0..5);
        c.members.reverse();
        b.sync_clusters(&[c.clone()]).unwrap();
        assert_eq!(b.cluster_sizes(), vec![(3, 5, 5)]);
        b.sync_clusters(&[cluster(1, vec![0.0, 1.0], 10..12), c])
            .unwrap();
        assert_eq!(b.cluster_sizes(), vec![(1, 2, 2), (3, 5, 5)]);
        let err = b.sync_clusters(&[cluster(2, vec![1.0], 0..1)]).unwrap_err();
        assert!(matches!(err, BanditError::Dimension { cluster: 2, .. }));
        assert!(Bandit::new(1, Strategy::Random, BanditConfig::default()).is_err());
    }
}

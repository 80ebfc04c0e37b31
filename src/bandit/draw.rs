//! The seeded draw of a round's samples, as the membership stage performs it.
//!
//! Every member of a cluster has a fixed sample key, a hash of (seed, location). The members
//! not yet sampled are kept ordered by (cluster, key); a pull of round t draws the n members
//! that follow a start key fixed by (seed, t, cluster), wrapping around. Keys are independent
//! of the documents' content and order, so each draw is a uniform sample of the cluster's
//! unsampled members, and it depends on the set of members alone, never on which worker holds
//! them or in what order they arrived. A draw reads O(n) entries of an ordered index: a round
//! costs what it samples, whatever the size of the cluster.
use std::collections::BTreeMap;

use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::Strategy;
use super::{
    Bandit, BanditConfig, BanditError, ClusterChange, DocLoc, MemberRef, Pull, PullRequest,
    RoundOutcome,
};

/// Why a ChaCha stream is drawn; part of its seed.
#[derive(Clone, Copy)]
pub(crate) enum Purpose {
    Sample = 0,
    Clusters = 2,
}

/// A ChaCha generator fixed by (seed, round, cluster, purpose) alone.
pub(crate) fn rng_for(seed: u64, round: u64, cluster: u32, purpose: Purpose) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..16].copy_from_slice(&round.to_le_bytes());
    key[16..20].copy_from_slice(&cluster.to_le_bytes());
    key[20] = purpose as u8;
    ChaCha8Rng::from_seed(key)
}

/// A member's fixed place in its cluster's draw order.
pub fn sample_key(seed: u64, loc: &DocLoc) -> u64 {
    let mut bytes = [0u8; 20];
    bytes[..8].copy_from_slice(&loc.shard.to_le_bytes());
    bytes[8..16].copy_from_slice(&loc.row.to_le_bytes());
    bytes[16..].copy_from_slice(&(loc.row_group).to_le_bytes());
    xxhash_rust::xxh3::xxh3_64_with_seed(&bytes, seed ^ 0x5a3b_1e00_u64)
}

/// Where round `round`'s draw in `cluster` starts in the key order.
pub fn start_key(seed: u64, round: u64, cluster: u32) -> u64 {
    rng_for(seed, round, cluster, Purpose::Sample).next_u64()
}

/// An unsampled member with its place in a round's draw order: those after the round's start
/// key first (`wrapped` false), then from the beginning; by sample key, then location (the
/// store's key order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DrawCandidate {
    pub wrapped: bool,
    pub sample_key: u64,
    pub member: MemberRef,
}

/// The pull drawn from the candidates of every store that holds members of the cluster (each
/// its first `sample + block` in the draw order): the first of them all, as one store holding
/// every member would have drawn.
pub fn merge_candidates(request: &PullRequest, mut candidates: Vec<DrawCandidate>) -> Pull {
    candidates.sort_unstable();
    candidates.dedup();
    candidates.truncate(request.sample + request.block);
    into_pull(request, candidates.into_iter().map(|c| c.member).collect())
}

/// Splits the drawn members (in draw order) into the pull's sample and block.
pub fn into_pull(request: &PullRequest, mut drawn: Vec<MemberRef>) -> Pull {
    let block = drawn.split_off(request.sample.min(drawn.len()));
    Pull {
        cluster: request.cluster,
        members: drawn,
        block,
        score: request.score,
        cluster_score: request.cluster_score,
    }
}

/// A member as a tool or test hands it to [`MemoryMembership`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub loc: DocLoc,
    pub tokens: u64,
}

/// A cluster with its members, for [`InMemoryBandit`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterInput {
    pub id: u32,
    pub centroid: Vec<f32>,
    pub members: Vec<Member>,
}

/// The unsampled members of every cluster in memory, ordered as the store orders them: the
/// membership stage of tests and tools (the job keeps them in the state store instead).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MemoryMembership {
    seed: u64,
    fresh: BTreeMap<(u32, u64, DocLoc), u64>,
    /// Members taken so far (what the store flags as selected).
    selected: std::collections::BTreeSet<(u32, DocLoc)>,
}

impl MemoryMembership {
    pub fn new(seed: u64) -> MemoryMembership {
        MemoryMembership {
            seed,
            fresh: BTreeMap::new(),
            selected: Default::default(),
        }
    }

    /// Adds a member; false if it was there already.
    pub fn insert(&mut self, cluster: u32, member: Member) -> bool {
        let key = (cluster, sample_key(self.seed, &member.loc), member.loc);
        self.fresh.insert(key, member.tokens).is_none()
    }

    /// The pull of `request` in `round` (see the module's note).
    pub fn draw(&self, round: u64, request: &PullRequest) -> Pull {
        let c = request.cluster;
        let start = start_key(self.seed, round, c);
        let lowest = DocLoc {
            shard: 0,
            row_group: 0,
            row: 0,
        };
        let after = self.fresh.range((c, start, lowest)..(c + 1, 0, lowest));
        let before = self.fresh.range((c, 0, lowest)..(c, start, lowest));
        let drawn = after
            .chain(before)
            .take(request.sample + request.block)
            .map(|(&(cluster, _, loc), &tokens)| MemberRef {
                cluster,
                loc,
                tokens,
            })
            .collect();
        into_pull(request, drawn)
    }

    /// Removes what a round sampled.
    pub fn apply(&mut self, outcome: &RoundOutcome) {
        for m in outcome.sampled() {
            self.fresh
                .remove(&(m.cluster, sample_key(self.seed, &m.loc), m.loc));
        }
        self.selected
            .extend(outcome.selected.iter().map(|(m, _)| (m.cluster, m.loc)));
    }

    /// Whether a member was selected.
    pub fn is_selected(&self, cluster: u32, loc: &DocLoc) -> bool {
        self.selected.contains(&(cluster, *loc))
    }
}

/// The bandit with its membership in memory: plan, draw and observe in one place, for tests,
/// tuning and tools that hold small pools.
#[derive(Debug, Clone, PartialEq)]
pub struct InMemoryBandit {
    pub bandit: Bandit,
    pub membership: MemoryMembership,
}

impl InMemoryBandit {
    pub fn new(
        seed: u64,
        strategy: Strategy,
        config: BanditConfig,
    ) -> Result<InMemoryBandit, BanditError> {
        Ok(InMemoryBandit {
            bandit: Bandit::new(seed, strategy, config)?,
            membership: MemoryMembership::new(seed),
        })
    }

    /// Adds clusters and members (members already known are skipped) and moves centroids.
    pub fn sync_clusters(&mut self, clusters: &[ClusterInput]) -> Result<(), BanditError> {
        for input in clusters {
            let mut change = ClusterChange {
                cluster: input.id,
                centroid: Some((self.bandit.next_round(), input.centroid.clone())),
                ..ClusterChange::default()
            };
            for m in &input.members {
                if self.membership.insert(input.id, *m) {
                    change.docs += 1;
                    change.tokens += m.tokens;
                    change.fresh += 1;
                }
            }
            self.bandit.apply(&change)?;
        }
        Ok(())
    }

    pub fn next_round(&self) -> u64 {
        self.bandit.next_round()
    }

    pub fn is_done(&self) -> bool {
        self.bandit.is_done()
    }

    pub fn budget_tokens(&self) -> u64 {
        self.bandit.budget_tokens()
    }

    pub fn selected_tokens(&self) -> u64 {
        self.bandit.selected_tokens()
    }

    pub fn scored_docs(&self) -> u64 {
        self.bandit.scored_docs()
    }

    pub fn pool_docs(&self) -> u64 {
        self.bandit.pool_docs()
    }

    pub fn arms(&self) -> Vec<(u32, super::Arm)> {
        self.bandit.arms()
    }

    pub fn cluster_sizes(&self) -> Vec<(u32, u64, u64)> {
        self.bandit.cluster_sizes()
    }

    pub fn cluster_scores(&self) -> Vec<(u32, Option<f64>)> {
        self.bandit.cluster_scores()
    }

    pub fn is_selected(&self, cluster: u32, loc: &DocLoc) -> bool {
        self.membership.is_selected(cluster, loc)
    }

    /// Round `round`'s pulls, drawn.
    pub fn plan_round(&self, round: u64) -> Vec<Pull> {
        self.bandit
            .plan_round(round)
            .iter()
            .map(|r| self.membership.draw(round, r))
            .collect()
    }

    /// Observes round `round` (its pulls drawn again: the same, since the draw is a function of
    /// the state) and removes what it sampled from the membership.
    pub fn observe(
        &mut self,
        round: u64,
        scores: &[(MemberRef, f64)],
    ) -> Result<RoundOutcome, BanditError> {
        let pulls = self.plan_round(round);
        let outcome = self.bandit.observe(round, &pulls, scores)?;
        self.membership.apply(&outcome);
        Ok(outcome)
    }
}

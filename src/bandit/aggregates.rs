//! The per-cluster aggregates the bandit reads, as differential collections (issue 12, item 3).
//!
//! Every member that joins a cluster is one update `(cluster, epoch, +(1, tokens, 1))` of a
//! collection of cluster ids whose difference carries (documents, tokens, unsampled, selected
//! documents, selected tokens) and, for a cluster whose centroid moved, the centroid (the
//! latest epoch's wins). `consolidate` arranges the collection by cluster id, sharded over the
//! workers by the id, and reduces each time's updates to one record per cluster; its trace
//! compacts to one record per cluster whatever the pool, so the memory is O(k). The bandit adds
//! those records up.
//!
//! The Quad loop's rounds make the other changes, where the members are: the membership
//! operator retracts each member it draws for scoring from the unsampled ones (`sampled`), and
//! the round sinks add each selected member (`selected`; one taken unscored also leaves the
//! unsampled ones). Those go into a second collection of the same kind, arranged the same way,
//! stamped with round times: ingest's epochs and the rounds are two clocks, and a round's
//! retractions must not wait behind the next shard in watch mode (see `quad_loop::build_loop`).
//! See BENCHMARKS.md, "Cluster aggregates", for the cost against a plain tally.
use differential_dataflow::difference::{IsZero, Monoid, Semigroup};
use differential_dataflow::AsCollection;
use serde::{Deserialize, Serialize};
use timely::dataflow::operators::vec::{Map, ToStream};
use timely::dataflow::StreamVec;

use super::ClusterChange;

/// What one cluster's record accumulates.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClusterDelta {
    pub docs: i64,
    pub tokens: i64,
    /// Members not sampled yet.
    pub unsampled: i64,
    pub selected_docs: i64,
    pub selected_tokens: i64,
    /// The centroid and the epoch that moved it; the latest epoch wins.
    pub centroid: Option<(u64, Vec<f32>)>,
}

impl ClusterDelta {
    /// One member that joined, with its tokens.
    pub fn member(tokens: u64, unsampled: bool) -> ClusterDelta {
        ClusterDelta {
            docs: 1,
            tokens: tokens as i64,
            unsampled: i64::from(unsampled),
            ..ClusterDelta::default()
        }
    }

    /// A member drawn and scored: it leaves the unsampled ones.
    pub fn sampled() -> ClusterDelta {
        ClusterDelta {
            unsampled: -1,
            ..ClusterDelta::default()
        }
    }

    /// `n` members that left the unsampled ones (a replayed round carried out late).
    pub fn left(n: u64) -> ClusterDelta {
        ClusterDelta {
            unsampled: -(n as i64),
            ..ClusterDelta::default()
        }
    }

    /// A member selected with its tokens; one `taken_unscored` (a block or explore member)
    /// also leaves the unsampled ones, which a scored one left when it was drawn.
    pub fn selected(tokens: u64, taken_unscored: bool) -> ClusterDelta {
        ClusterDelta {
            unsampled: -i64::from(taken_unscored),
            selected_docs: 1,
            selected_tokens: tokens as i64,
            ..ClusterDelta::default()
        }
    }

    /// A cluster's centroid after `epoch` moved it.
    pub fn centroid(epoch: u64, centroid: Vec<f32>) -> ClusterDelta {
        ClusterDelta {
            centroid: Some((epoch, centroid)),
            ..ClusterDelta::default()
        }
    }
}

impl ClusterDelta {
    /// The centroid by bits: a total order (differential orders differences), and the tie
    /// break between centroids of one epoch.
    fn centroid_bits(&self) -> Option<(u64, Vec<u32>)> {
        self.centroid
            .as_ref()
            .map(|(epoch, c)| (*epoch, c.iter().map(|v| v.to_bits()).collect()))
    }

    fn order_key(&self) -> ([i64; 5], Option<(u64, Vec<u32>)>) {
        (
            [
                self.docs,
                self.tokens,
                self.unsampled,
                self.selected_docs,
                self.selected_tokens,
            ],
            self.centroid_bits(),
        )
    }
}

impl PartialEq for ClusterDelta {
    fn eq(&self, other: &Self) -> bool {
        self.order_key() == other.order_key()
    }
}

impl Eq for ClusterDelta {}

impl PartialOrd for ClusterDelta {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for ClusterDelta {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.order_key().cmp(&other.order_key())
    }
}

impl IsZero for ClusterDelta {
    fn is_zero(&self) -> bool {
        self.order_key() == ([0; 5], None)
    }
}

impl Semigroup for ClusterDelta {
    fn plus_equals(&mut self, rhs: &Self) {
        self.docs += rhs.docs;
        self.tokens += rhs.tokens;
        self.unsampled += rhs.unsampled;
        self.selected_docs += rhs.selected_docs;
        self.selected_tokens += rhs.selected_tokens;
        // Latest epoch wins; at equal epochs the larger vector (by bits), so the sum does not
        // depend on the order of the updates.
        if rhs.centroid.is_some() && rhs.centroid_bits() > self.centroid_bits() {
            self.centroid.clone_from(&rhs.centroid);
        }
    }
}

impl Monoid for ClusterDelta {
    fn zero() -> Self {
        ClusterDelta::default()
    }
}

/// An update of the collection: (cluster id, time, difference).
pub type ClusterUpdate = (u32, u64, ClusterDelta);

/// Consolidates the members' updates by cluster id, one change per cluster and epoch, for the
/// bandit.
pub fn cluster_aggregates<'scope>(
    updates: StreamVec<'scope, u64, ClusterUpdate>,
) -> StreamVec<'scope, u64, ClusterChange> {
    updates
        .as_collection()
        // Each batch is reduced where it was made (an epoch's members to one record per
        // cluster), so the exchange by cluster id carries O(k) records per epoch.
        .consolidate_stream()
        .consolidate()
        .inner
        .map(|(cluster, _time, delta)| delta.into_change(cluster))
}

/// A store's share of the clusters' aggregates (`StateStore::held_changes`) as updates at time
/// 0, where a run's aggregates start: each process's first worker sends its store's, and the
/// collection adds them up (a centroid of a later epoch wins).
pub fn stored_shares<'scope>(
    scope: timely::dataflow::Scope<'scope, u64>,
    shares: Vec<ClusterChange>,
) -> StreamVec<'scope, u64, ClusterUpdate> {
    shares
        .into_iter()
        .map(|c| {
            let delta = ClusterDelta {
                docs: c.docs as i64,
                tokens: c.tokens as i64,
                unsampled: c.fresh,
                centroid: c.centroid,
                ..ClusterDelta::default()
            };
            (c.cluster, 0, delta)
        })
        .to_stream(scope)
}

impl ClusterDelta {
    /// The bandit's view of a consolidated record.
    pub fn into_change(self, cluster: u32) -> ClusterChange {
        ClusterChange {
            cluster,
            // Members join and are selected, never leave: these counts only grow.
            docs: self.docs.max(0) as u64,
            tokens: self.tokens.max(0) as u64,
            fresh: self.unsampled,
            selected_docs: self.selected_docs.max(0) as u64,
            selected_tokens: self.selected_tokens.max(0) as u64,
            centroid: self.centroid,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bandit::draw::{ClusterInput, InMemoryBandit, Member};
    use crate::bandit::{BanditConfig, Budget, DocLoc, MemberRef, Strategy, TauMode};
    use std::collections::BTreeMap;

    /// The retractions the loop's operators make for a round (each scored pull's members as
    /// drawn, each selected member as the round sinks take it) add up to what the bandit's
    /// decisions changed, for every strategy and both tau modes, through the last round.
    #[test]
    fn a_rounds_retractions_add_up_to_what_the_bandit_decided() {
        for (strategy, mode) in [
            (Strategy::Quad, TauMode::Block),
            (Strategy::Quad, TauMode::PerDocument),
            (Strategy::Explore, TauMode::Block),
            (Strategy::TopkInfluence, TauMode::PerDocument),
        ] {
            let config = BanditConfig {
                clusters_per_round: 2,
                n_min: 3,
                block_size: 4,
                mode,
                tau: 0.5,
                budget: Budget::Tokens(900),
                ..BanditConfig::default()
            };
            let mut b = InMemoryBandit::new(7, strategy, config).unwrap();
            let clusters: Vec<ClusterInput> = (0..3u32)
                .map(|id| ClusterInput {
                    id,
                    centroid: vec![1.0, id as f32],
                    members: (0..20u64)
                        .map(|row| Member {
                            loc: DocLoc {
                                shard: u64::from(id),
                                row_group: 0,
                                row,
                            },
                            tokens: 10 + row,
                        })
                        .collect(),
                })
                .collect();
            b.sync_clusters(&clusters).unwrap();
            let (mut rounds, mut unscored) = (0, 0);
            while !b.is_done() && rounds < 40 {
                let round = b.next_round();
                let pulls = b.plan_round(round);
                let scores: Vec<(MemberRef, f64)> = pulls
                    .iter()
                    .filter(|p| p.score)
                    .flat_map(|p| p.members.iter())
                    // Cluster 0 passes tau as a whole (its block is taken), the others by member.
                    .map(|m| match m.cluster {
                        0 => (*m, 1.0),
                        _ => (*m, (m.loc.row % 3) as f64 * 0.4),
                    })
                    .collect();
                let before = b.bandit.round_counts();
                let outcome = b.observe(round, &scores).unwrap();
                let after = b.bandit.round_counts();
                b.bandit.restore_round_counts(&before);
                let mut taken: BTreeMap<u32, ClusterDelta> = BTreeMap::new();
                for pull in pulls.iter().filter(|p| p.score) {
                    for m in &pull.members {
                        taken
                            .entry(m.cluster)
                            .or_default()
                            .plus_equals(&ClusterDelta::sampled());
                    }
                }
                unscored += outcome.selected.iter().filter(|s| s.1.is_none()).count();
                for (m, influence) in &outcome.selected {
                    taken
                        .entry(m.cluster)
                        .or_default()
                        .plus_equals(&ClusterDelta::selected(m.tokens, influence.is_none()));
                }
                for (cluster, delta) in taken {
                    b.bandit.apply(&delta.into_change(cluster)).unwrap();
                }
                assert_eq!(b.bandit.round_counts(), after, "{strategy:?} round {round}");
                rounds += 1;
            }
            assert!(b.is_done(), "{strategy:?} ends within 40 rounds");
            if mode == TauMode::Block {
                assert!(unscored > 0, "{strategy:?}: members taken unscored");
            }
        }
    }

    #[test]
    fn sums_counts_and_keeps_the_latest_centroid_in_any_order() {
        let updates = [
            ClusterDelta::member(10, true),
            ClusterDelta::centroid(3, vec![1.0, 0.0]),
            ClusterDelta::member(5, false),
            ClusterDelta::centroid(7, vec![0.0, 1.0]),
            ClusterDelta::centroid(7, vec![0.5, 0.5]),
        ];
        let mut forward = ClusterDelta::zero();
        for u in &updates {
            forward.plus_equals(u);
        }
        let mut backward = ClusterDelta::zero();
        for u in updates.iter().rev() {
            backward.plus_equals(u);
        }
        assert_eq!(forward, backward);
        assert_eq!(
            (forward.docs, forward.tokens, forward.unsampled),
            (2, 15, 1)
        );
        assert_eq!(forward.centroid.map(|c| c.0), Some(7));
        assert!(ClusterDelta::zero().is_zero());
        assert!(!ClusterDelta::centroid(0, vec![]).is_zero());
    }
}

//! The per-cluster aggregates the bandit reads, as a differential collection (issue 12, item 3).
//!
//! Every member that joins a cluster is one update `(cluster, epoch, +(1, tokens, 1))` of a
//! collection of cluster ids whose difference carries (documents, tokens, unsampled) and, for a
//! cluster whose centroid moved, the centroid (the latest epoch's wins). `consolidate` arranges
//! the collection by cluster id, sharded over the workers by the id, and reduces each epoch's
//! updates to one record per cluster; its trace compacts to one record per cluster whatever
//! the pool, so the memory is O(k). The bandit adds those records up.
//!
//! Sampled and selected members are not retractions in this collection: the bandit decides
//! them and applies them to its own counts before it plans the next round, while this
//! collection's records are released only once ingest's frontier has passed their epoch. A
//! round's retractions fed back into it would be held behind the next shard in watch mode, and
//! the bandit, waiting for them, would hold the rounds (see BENCHMARKS.md, "Cluster
//! aggregates", for the cost of keeping the aggregates this way against a plain tally).
use differential_dataflow::difference::{IsZero, Monoid, Semigroup};
use differential_dataflow::AsCollection;
use serde::{Deserialize, Serialize};
use timely::dataflow::operators::vec::Map;
use timely::dataflow::StreamVec;

use super::ClusterChange;

/// What one cluster's record accumulates.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ClusterDelta {
    pub docs: i64,
    pub tokens: i64,
    /// Members not sampled yet.
    pub unsampled: i64,
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
            centroid: None,
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

    fn order_key(&self) -> (i64, i64, i64, Option<(u64, Vec<u32>)>) {
        (self.docs, self.tokens, self.unsampled, self.centroid_bits())
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
        self.docs == 0 && self.tokens == 0 && self.unsampled == 0 && self.centroid.is_none()
    }
}

impl Semigroup for ClusterDelta {
    fn plus_equals(&mut self, rhs: &Self) {
        self.docs += rhs.docs;
        self.tokens += rhs.tokens;
        self.unsampled += rhs.unsampled;
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
        .map(|(cluster, _time, delta)| ClusterChange {
            cluster,
            // Ingest only adds members: the counts are never negative.
            docs: delta.docs.max(0) as u64,
            tokens: delta.tokens.max(0) as u64,
            fresh: delta.unsampled.max(0) as u64,
            centroid: delta.centroid,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

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

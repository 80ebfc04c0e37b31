//! What a job of several processes keeps so that clustering and the Quad loop resume after a
//! kill (issue 13): each store's own share of the clusters' aggregates, and, in process 0's
//! store, the assign stage's state after each recent epoch and `semdedup`'s decisions.
//!
//! Each process commits the epochs it owns in its own store, with the assign stage's state
//! after that epoch and the clusters' global sizes as the assign stage saw them then. After a
//! restart, neither is what a process needs: the bandit's aggregates are the sum over every
//! store of the members it holds, and the assign stage (process 0) must continue from the
//! state before the first epoch that is read again, wherever the epochs in between committed.
use std::collections::BTreeMap;

use redb::{ReadableDatabase, ReadableTable, TableDefinition};

use super::{
    ClusterInfo, SemanticCommit, StateError, StateStore, CLUSTERS, SEMANTIC_BANDS, SEMANTIC_VECTORS,
};
use crate::bandit::ClusterChange;

/// This store's share of each cluster: cluster -> (members it holds, their tokens, the epoch
/// whose commit last wrote the cluster's row in `clusters`, that is its centroid's epoch).
pub(super) const HELD: TableDefinition<u32, (u64, u64, u64)> = TableDefinition::new("held");

/// Process 0's store: epoch -> the assign stage's state after it (`Assigner::snapshot`), for
/// the recent epochs only (`record_assigned` prunes).
pub(super) const ASSIGNED: TableDefinition<u64, &[u8]> = TableDefinition::new("assigned");

/// Process 0's store: epoch -> tokens `semdedup` selected in it, for every epoch it decided
/// (`record_semantic`).
pub(super) const SEMANTIC_SELECTED: TableDefinition<u64, u64> =
    TableDefinition::new("semantic_selected");

/// What an epoch's commit adds to a cluster this store holds: members and their tokens.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Joined {
    pub(super) docs: u64,
    pub(super) tokens: u64,
}

impl StateStore {
    /// Adds an epoch's members to this store's share of their clusters, and notes the epoch of
    /// every cluster row the commit wrote (`written`).
    pub(super) fn add_held(
        &self,
        txn: &redb::WriteTransaction,
        epoch: u64,
        joined: &BTreeMap<u32, Joined>,
        written: &[ClusterInfo],
    ) -> Result<(), StateError> {
        let mut held = txn.open_table(HELD).map_err(|e| self.err(e))?;
        for info in written {
            let (docs, tokens, _) = held
                .get(info.cluster)
                .map_err(|e| self.err(e))?
                .map_or((0, 0, 0), |v| v.value());
            let add = joined.get(&info.cluster).copied().unwrap_or_default();
            held.insert(info.cluster, (docs + add.docs, tokens + add.tokens, epoch))
                .map_err(|e| self.err(e))?;
        }
        Ok(())
    }

    /// This store's share of the bandit's aggregates, one change a cluster: the members it
    /// holds, their tokens, those not sampled yet, and the centroid with its epoch (the latest
    /// epoch's wins when the stores' shares are added up).
    pub fn held_changes(&self) -> Result<Vec<ClusterChange>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let held = txn.open_table(HELD).map_err(|e| self.err(e))?;
        let clusters = txn.open_table(CLUSTERS).map_err(|e| self.err(e))?;
        let mut out = Vec::new();
        for entry in held.iter().map_err(|e| self.err(e))? {
            let (cluster, share) = entry.map_err(|e| self.err(e))?;
            let (cluster, (docs, tokens, epoch)) = (cluster.value(), share.value());
            let Some(row) = clusters.get(cluster).map_err(|e| self.err(e))? else {
                return Err(self.err(format!(
                    "internal: cluster {cluster} is held but has no row"
                )));
            };
            let info: ClusterInfo = bincode::deserialize(row.value()).map_err(|e| self.err(e))?;
            out.push(ClusterChange {
                cluster,
                centroid: Some((epoch, info.centroid)),
                docs,
                tokens,
                fresh: info.fresh as i64,
                ..ClusterChange::default()
            });
        }
        Ok(out)
    }

    /// Records the assign stage's state after `epoch` (process 0's store, on several
    /// processes), and forgets the records of epochs before `keep_from`: no restart reads an
    /// epoch again that far back (`runtime.max_epochs_in_flight` bounds what is uncommitted).
    pub fn record_assigned(
        &self,
        epoch: u64,
        state: &[u8],
        keep_from: u64,
    ) -> Result<(), StateError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            let mut table = txn.open_table(ASSIGNED).map_err(|e| self.err(e))?;
            table.insert(epoch, state).map_err(|e| self.err(e))?;
            let old: Vec<u64> = table
                .range(..keep_from)
                .map_err(|e| self.err(e))?
                .map(|entry| entry.map(|(k, _)| k.value()))
                .collect::<Result<_, _>>()
                .map_err(|e| self.err(e))?;
            for epoch in old {
                table.remove(epoch).map_err(|e| self.err(e))?;
            }
            let mut run = txn.open_table(super::RUN).map_err(|e| self.err(e))?;
            let pruned = run
                .get(ASSIGNED_KEPT_FROM)
                .map_err(|e| self.err(e))?
                .and_then(|v| v.value().parse::<u64>().ok())
                .unwrap_or(0);
            if keep_from > pruned {
                run.insert(ASSIGNED_KEPT_FROM, keep_from.to_string().as_str())
                    .map_err(|e| self.err(e))?;
            }
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// The epoch of the latest assign record before `epoch`, if any; an error when the records
    /// `epoch` needs were pruned.
    pub fn assigned_before(&self, epoch: u64) -> Result<Option<u64>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(ASSIGNED).map_err(|e| self.err(e))?;
        let latest = table
            .range(..epoch)
            .map_err(|e| self.err(e))?
            .next_back()
            .transpose()
            .map_err(|e| self.err(e))?
            .map(|(k, _)| k.value());
        let kept_from: u64 = self.run_value::<u64>(ASSIGNED_KEPT_FROM)?.unwrap_or(0);
        // Records before `kept_from` are gone, and with them the state before such an epoch.
        if epoch > 0 && epoch <= kept_from {
            return Err(self.err(format!(
                "the assign stage's state before epoch {epoch} is no longer recorded (records \
                 kept from epoch {kept_from}); was runtime.max_epochs_in_flight lowered?"
            )));
        }
        Ok(latest)
    }

    /// The assign stage's state recorded after `epoch`.
    pub fn assigned_state(&self, epoch: u64) -> Result<Option<Vec<u8>>, StateError> {
        let txn = self.db.begin_read().map_err(|e| self.err(e))?;
        let table = txn.open_table(ASSIGNED).map_err(|e| self.err(e))?;
        Ok(table
            .get(epoch)
            .map_err(|e| self.err(e))?
            .map(|v| v.value().to_vec()))
    }
}

impl StateStore {
    /// A job of several processes: what `semdedup` (the assign stage, process 0's first
    /// worker) decided for an epoch, written to process 0's store before the decision leaves
    /// it: the band keys and vectors the epoch adds to its index, and the tokens it selected.
    /// The owners' stores hold only their own epochs; this is what a restarted `semdedup`
    /// reads for every process's. An epoch decided again after a restart decides the same (a
    /// decision looks only at earlier epochs' entries), so what it writes again is what is there.
    pub fn record_semantic(
        &self,
        epoch: u64,
        added: &SemanticCommit,
        selected_tokens: u64,
    ) -> Result<(), StateError> {
        let txn = self.db.begin_write().map_err(|e| self.err(e))?;
        {
            self.write_index(
                &txn,
                epoch,
                &[(&SEMANTIC_BANDS, &added.bands)],
                (SEMANTIC_VECTORS, &added.vectors),
            )?;
            let mut selected = txn.open_table(SEMANTIC_SELECTED).map_err(|e| self.err(e))?;
            selected
                .insert(epoch, selected_tokens)
                .map_err(|e| self.err(e))?;
        }
        txn.commit().map_err(|e| self.err(e))
    }

    /// The tokens `semdedup` selected in every epoch it recorded (`record_semantic`).
    pub fn semantic_selected_tokens(&self) -> Result<BTreeMap<u64, u64>, StateError> {
        self.tokens_by_epoch(SEMANTIC_SELECTED)
    }
}

/// The run key under which `record_assigned` notes the oldest epoch whose record it keeps.
const ASSIGNED_KEPT_FROM: &str = "assigned_kept_from";

#[cfg(test)]
mod tests {
    use super::super::{ClusterCommit, EpochCommit, EpochRecord, Member};
    use super::*;

    fn store() -> (tempfile::TempDir, StateStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = StateStore::open(&dir.path().join("s.redb"), &serde_json::json!({})).unwrap();
        (dir, store)
    }

    /// An epoch whose members (rows 0..n, `tokens` each) join `cluster`, moving its centroid.
    fn joining(epoch: u64, cluster: u32, n: u64, centroid: f32) -> EpochCommit {
        let members = (0..n)
            .map(|row| Member {
                cluster,
                epoch,
                row_group: 0,
                row,
                tokens: 5,
                flags: 0,
            })
            .collect();
        EpochCommit {
            epoch,
            record: EpochRecord::default(),
            accepted: vec![],
            rejects: vec![],
            clusters: Some(ClusterCommit {
                members,
                // The assign stage's global size, which is not this store's share.
                clusters: vec![ClusterInfo {
                    cluster,
                    centroid: vec![centroid],
                    size: 1000,
                    tokens: 5000,
                    fresh: 0,
                }],
                state: vec![],
                seed: 1,
                semantic: Default::default(),
            }),
            fit_sample: vec![],
            fit_sample_size: 0,
            dedup: Default::default(),
        }
    }

    #[test]
    fn a_store_s_share_counts_its_own_members_with_its_latest_centroid() {
        let (_dir, store) = store();
        store.commit_epoch(&joining(1, 4, 3, 0.5)).unwrap();
        store.commit_epoch(&joining(3, 4, 2, 0.25)).unwrap();
        store.commit_epoch(&joining(5, 7, 1, 1.0)).unwrap();
        let shares = store.held_changes().unwrap();
        assert_eq!(shares.len(), 2);
        let four = &shares[0];
        assert_eq!(
            (four.cluster, four.docs, four.tokens, four.fresh),
            (4, 5, 25, 5)
        );
        assert_eq!(four.centroid, Some((3, vec![0.25])));
        assert_eq!(
            (shares[1].docs, shares[1].centroid.clone()),
            (1, Some((5, vec![1.0])))
        );
    }

    #[test]
    fn assign_records_are_found_before_an_epoch_and_pruned_behind_the_window() {
        let (_dir, store) = store();
        assert_eq!(store.assigned_before(0).unwrap(), None);
        for epoch in 0..10u64 {
            let state = vec![epoch as u8; 3];
            store
                .record_assigned(epoch, &state, epoch.saturating_sub(4))
                .unwrap();
        }
        assert_eq!(store.assigned_before(8).unwrap(), Some(7));
        assert_eq!(store.assigned_before(100).unwrap(), Some(9));
        assert_eq!(store.assigned_state(7).unwrap(), Some(vec![7; 3]));
        // Kept from epoch 5: epoch 6 continues from 5's record; epoch 5's would be gone.
        assert_eq!(store.assigned_before(6).unwrap(), Some(5));
        assert_eq!(store.assigned_state(4).unwrap(), None);
        let err = store.assigned_before(5).unwrap_err().to_string();
        assert!(err.contains("no longer recorded"), "{err}");
    }
}

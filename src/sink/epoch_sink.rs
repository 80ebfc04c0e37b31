//! The ingest sink: each epoch's output file and its commit (epoch, members, clusterer state)
//! in one store transaction, on the worker that read the shard.
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;
use timely::dataflow::StreamVec;

use super::{SinkConfig, SOURCE_COLUMN};
use crate::bandit::aggregates::{ClusterDelta, ClusterUpdate};
use crate::bandit::Strategy;
use crate::cluster::operator::EpochClusters;
use crate::cluster::semdedup::SemanticVerdicts;
use crate::error::{Fail, Failed};
use crate::select::{Duplicate, DuplicateKind, Verdicts};
use crate::source::operator::{LocalShard, LocalShards};
use crate::source::{self, ShardData};
use crate::state::{ClusterCommit, EpochCommit, EpochRecord, StateStore};

/// What the ingest sink needs of the job.
pub struct EpochSinkContext {
    pub store: Arc<StateStore>,
    pub seed: u64,
    pub sink: SinkConfig,
    /// The id column, named in the rejects of duplicate ids.
    pub id_column: String,
    /// The text column, named in the rejects of duplicate texts.
    pub text_column: String,
    /// The Quad loop's strategies keep each epoch's candidates for the factor-fitting pool
    /// sample; `random` keeps none.
    pub strategy: Strategy,
    /// Documents in the factor-fitting pool sample the store keeps.
    pub fit_pool_docs: usize,
    /// Clustering jobs: every epoch comes with its clusters and commits in epoch order.
    pub clustering: bool,
    pub order: Arc<CommitOrder>,
    /// Test hook: a pause before each commit.
    pub delay: Option<Duration>,
    /// Test hook: abort after this epoch's output file is renamed, before its commit.
    pub crash_after_rename: Option<u64>,
    /// Called after each committed epoch (progress, summary).
    pub on_commit: OnEpochCommit,
    pub fail: Fail,
    pub failed: Failed,
}

/// Called with an epoch, its committed record and the documents it clustered.
/// Called after an epoch's commit with what it committed.
pub type OnEpochCommit = Arc<dyn Fn(&EpochCommit) + Send + Sync>;

/// Clustering jobs commit epochs strictly in epoch order, so the stored clusterer state is
/// always the state after every committed epoch and no later one: what resuming needs.
#[derive(Default)]
pub struct CommitOrder {
    /// Epochs of this run not committed yet.
    waiting: Mutex<std::collections::BTreeSet<u64>>,
    turn: std::sync::Condvar,
}

impl CommitOrder {
    pub fn add(&self, epochs: impl IntoIterator<Item = u64>) {
        self.waiting.lock().expect("commit order").extend(epochs);
    }

    /// Blocks until every earlier epoch of this run has committed; false if the job failed.
    pub fn wait_turn(&self, epoch: u64, failed: impl Fn() -> bool) -> bool {
        let mut waiting = self.waiting.lock().expect("commit order");
        while waiting.first().is_some_and(|&first| first < epoch) {
            if failed() {
                return false;
            }
            waiting = self
                .turn
                .wait_timeout(waiting, Duration::from_millis(100))
                .expect("commit order")
                .0;
        }
        true
    }

    pub fn done(&self, epoch: u64) {
        self.waiting.lock().expect("commit order").remove(&epoch);
        self.turn.notify_all();
    }
}

/// Writes and commits each epoch on the worker that read its shard (the rows are there), on a
/// writer thread, and sends the members' cluster updates once the commit is done; an epoch's
/// capability is held until then, so a probe after it passes committed epochs only.
pub fn epoch_sink_operator<'scope>(
    verdicts: StreamVec<'scope, u64, Verdicts>,
    clusters: StreamVec<'scope, u64, EpochClusters>,
    ctx: EpochSinkContext,
    local: &LocalShards,
) -> StreamVec<'scope, u64, ClusterUpdate> {
    let scope = verdicts.scope();
    let peers = scope.peers() as u64;
    let owner = move |epoch: u64| epoch % peers;
    let sink_ctx = Arc::new(ctx);
    let sink_local = local.clone();
    verdicts.binary_frontier::<_, CapacityContainerBuilder<Vec<ClusterUpdate>>, _, _, _, _>(
        clusters,
        Exchange::new(move |v: &Verdicts| owner(v.epoch)),
        Exchange::new(move |c: &EpochClusters| owner(c.epoch)),
        "Sink",
        move |_capability, info| {
            // Compression, fsync and the store commit run on a writer thread, so the
            // worker reads the next shard meanwhile. An epoch's capability is held until
            // its commit is done, so the probe only passes committed epochs.
            let (jobs, writer_jobs) =
                std::sync::mpsc::channel::<(u64, LocalShard, Verdicts, Option<ClusterCommit>)>();
            let (writer_done, done) = std::sync::mpsc::channel::<(u64, Vec<ClusterUpdate>)>();
            let writer_ctx = sink_ctx.clone();
            std::thread::spawn(move || {
                for (epoch, shard, verdicts, clusters) in writer_jobs {
                    let changes = commit_epoch(&writer_ctx, epoch, shard, verdicts, clusters)
                        .unwrap_or_else(|e| {
                            (writer_ctx.fail)(e);
                            Vec::new()
                        });
                    if writer_done.send((epoch, changes)).is_err() {
                        break;
                    }
                }
            });
            let activator = scope.activator_for(info.address);
            let mut stash: BTreeMap<u64, Capability<u64>> = BTreeMap::new();
            let mut verdicts_of: HashMap<u64, Verdicts> = HashMap::new();
            let mut clusters_of: HashMap<u64, ClusterCommit> = HashMap::new();
            let mut semantic_of: HashMap<u64, SemanticVerdicts> = HashMap::new();
            let mut writing: HashMap<u64, Capability<u64>> = HashMap::new();
            let clustering = sink_ctx.clustering;
            move |(input, frontier), (cluster_input, cluster_frontier), output| {
                input.for_each_stamp(|cap, data| {
                    if let Some(cap) = cap.retain_least(output.output_index()) {
                        for container in data {
                            for v in container.drain(..) {
                                stash.insert(v.epoch, cap.delayed(&v.epoch));
                                verdicts_of.insert(v.epoch, v);
                            }
                        }
                    }
                });
                cluster_input.for_each_stamp(|_cap, data| {
                    for container in data {
                        for c in container.drain(..) {
                            if let Some(semantic) = c.semantic {
                                semantic_of.insert(c.epoch, semantic);
                            }
                            clusters_of.insert(c.epoch, c.commit);
                        }
                    }
                });
                while let Some((&epoch, _)) = stash.first_key_value() {
                    if frontier.less_equal(&epoch) || cluster_frontier.less_equal(&epoch) {
                        break;
                    }
                    let cap = stash.remove(&epoch).expect("first key");
                    let shard = sink_local.borrow_mut().remove(&epoch);
                    let clusters = clusters_of.remove(&epoch);
                    if clustering && clusters.is_none() {
                        (sink_ctx.fail)(anyhow::anyhow!(
                            "internal: epoch {epoch} reached the sink without its clusters"
                        ));
                        continue;
                    }
                    match (shard, verdicts_of.remove(&epoch)) {
                        (Some(shard), Some(mut verdicts)) => {
                            // `semdedup` selects in the assign stage.
                            if let Some(semantic) = semantic_of.remove(&epoch) {
                                verdicts.selected = semantic.selected;
                                verdicts.semantic = semantic.duplicates;
                            }
                            if jobs.send((epoch, shard, verdicts, clusters)).is_err() {
                                (sink_ctx.fail)(anyhow::anyhow!("the writer thread stopped"));
                            }
                            writing.insert(epoch, cap);
                        }
                        _ => (sink_ctx.fail)(anyhow::anyhow!(
                            "internal: epoch {epoch} reached the sink without its shard"
                        )),
                    }
                }
                for (epoch, changes) in done.try_iter() {
                    if let Some(cap) = writing.remove(&epoch) {
                        output.session(&cap).give_iterator(changes.into_iter());
                    }
                }
                if !writing.is_empty() {
                    // Look again shortly for commits the writer finished.
                    activator.activate_after(Duration::from_millis(1));
                }
            }
        },
    )
}

/// The rejected rows of an epoch's duplicates, each naming its first occurrence.
fn duplicate_rejects(
    ctx: &EpochSinkContext,
    shard_name: &str,
    duplicates: &[Duplicate],
) -> Vec<source::Reject> {
    let read_back = committed_first_ids(ctx, duplicates);
    let mut texts = 0;
    let rejects = duplicates
        .iter()
        .map(|dup| {
            let first = match dup.first_row {
                Some(row) => format!("epoch {} row {row}", dup.first_epoch),
                None => format!("epoch {}", dup.first_epoch),
            };
            if dup.kind == DuplicateKind::Id {
                tracing::warn!(
                    "{shard_name}: row {}, column '{}': duplicate id {:?} (first at {first}); \
                     row rejected",
                    dup.row,
                    ctx.id_column,
                    dup.id
                );
                return source::Reject {
                    row: dup.row,
                    column: ctx.id_column.clone(),
                    reason: format!("duplicate id {:?}", dup.id),
                    matched: None,
                };
            }
            texts += 1;
            let matched = dup.first_id.clone().or_else(|| {
                let location = (dup.first_epoch, dup.first_row.unwrap_or(u64::MAX));
                read_back.get(&location).cloned()
            });
            tracing::debug!(
                "{shard_name}: row {} (id {:?}): {} of {matched:?} at {first} (similarity {:?})",
                dup.row,
                dup.id,
                dup.kind.reason(),
                dup.similarity
            );
            source::Reject {
                row: dup.row,
                column: ctx.text_column.clone(),
                reason: dup.kind.reason().to_string(),
                matched,
            }
        })
        .collect();
    if texts > 0 {
        tracing::info!("{shard_name}: {texts} duplicate texts rejected (exact and near)");
    }
    rejects
}

/// The ids of text duplicates' first occurrences that the admit stage did not hold (their
/// epochs were committed): read back from their shards, the id column of the row groups that
/// hold them, one read a shard. A shard that cannot be read leaves those ids unnamed (logged):
/// the rows are rejected all the same.
fn committed_first_ids(
    ctx: &EpochSinkContext,
    duplicates: &[Duplicate],
) -> HashMap<(u64, u64), String> {
    let mut wanted: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for dup in duplicates {
        if let (
            DuplicateKind::Text | DuplicateKind::Near | DuplicateKind::Semantic,
            None,
            Some(row),
        ) = (dup.kind, &dup.first_id, dup.first_row)
        {
            wanted.entry(dup.first_epoch).or_default().push(row);
        }
    }
    let mut ids = HashMap::new();
    if wanted.is_empty() {
        return ids;
    }
    let paths = match ctx.store.shard_paths() {
        Ok(paths) => paths,
        Err(e) => {
            tracing::warn!("the first occurrences of duplicate texts are not named: {e}");
            return ids;
        }
    };
    for (epoch, rows) in wanted {
        let Some(path) = paths.get(&epoch) else {
            continue;
        };
        match source::fetch_cells(path, &rows, &[ctx.id_column.as_str()]) {
            Ok(cells) => {
                for (row, cells) in cells {
                    if let Some(Some(id)) = cells.into_iter().next() {
                        ids.insert((epoch, row), id);
                    }
                }
            }
            Err(e) => tracing::warn!(
                "{}: the first occurrences of duplicate texts are not named: {e}",
                path.display()
            ),
        }
    }
    ids
}

/// Writes an epoch's output and commits it with the epoch's state in one transaction. Returns
/// the clusters' changes for the bandit (after the commit, so a draw sees the new members).
fn commit_epoch(
    ctx: &EpochSinkContext,
    epoch: u64,
    shard: LocalShard,
    verdicts: Verdicts,
    clusters: Option<ClusterCommit>,
) -> Result<Vec<ClusterUpdate>> {
    let shard_name = shard.shard.to_string_lossy().to_string();
    let mut fit_sample = Vec::new();
    let (record, accepted, rejects) = match &shard.data {
        Err(reason) => (
            EpochRecord {
                shard: shard_name.clone(),
                quarantined: Some(reason.clone()),
                ..Default::default()
            },
            Vec::new(),
            Vec::new(),
        ),
        Ok(data) => {
            let file =
                super::write_epoch(&ctx.sink.path, epoch, data, &verdicts.selected, &ctx.sink)?;
            if let (Some(file), Some(crash)) = (&file, ctx.crash_after_rename) {
                if crash == epoch {
                    tracing::error!(file, "test hook: crashing after rename, before commit");
                    super::die_as_if_killed();
                }
            }
            let tokens_of: HashMap<u64, u32> =
                data.docs.iter().map(|d| (d.row, d.tokens)).collect();
            let duplicate_rows: std::collections::HashSet<u64> =
                verdicts.duplicates.iter().map(|d| d.row).collect();
            let accepted: Vec<(String, u64)> = data
                .docs
                .iter()
                .filter(|d| !duplicate_rows.contains(&d.row))
                .map(|d| (d.id.clone(), d.row))
                .collect();
            let count_of = |kind| {
                verdicts
                    .duplicates
                    .iter()
                    .filter(|d| d.kind == kind)
                    .count() as u64
            };
            let mut rejects = data.rejects.clone();
            rejects.extend(duplicate_rejects(ctx, &shard_name, &verdicts.duplicates));
            rejects.extend(duplicate_rejects(ctx, &shard_name, &verdicts.semantic));
            if ctx.strategy.runs_bandit() {
                fit_sample =
                    fit_sample_candidates(ctx.seed, data, &duplicate_rows, ctx.fit_pool_docs);
            }
            let record = EpochRecord {
                tokens_by_source: tokens_by_source(data, &duplicate_rows),
                shard: shard_name.clone(),
                quarantined: None,
                rows: data.rows,
                docs: accepted.len() as u64,
                rejected: data.rejects.len() as u64,
                duplicates: count_of(DuplicateKind::Id),
                duplicate_texts: count_of(DuplicateKind::Text),
                near_duplicates: count_of(DuplicateKind::Near),
                semantic_duplicates: verdicts.semantic.len() as u64,
                selected: verdicts.selected.len() as u64,
                tokens: accepted
                    .iter()
                    .map(|(_, row)| u64::from(tokens_of[row]))
                    .sum(),
                selected_tokens: verdicts
                    .selected
                    .iter()
                    .map(|row| u64::from(tokens_of[row]))
                    .sum(),
                file,
            };
            (record, accepted, rejects)
        }
    };
    if let Some(delay) = ctx.delay {
        std::thread::sleep(delay);
    }
    if ctx.clustering && !ctx.order.wait_turn(epoch, || (ctx.failed)()) {
        return Ok(Vec::new()); // the job failed elsewhere; this epoch stays uncommitted
    }
    let changes = clusters
        .as_ref()
        .map(|c| member_updates(epoch, c))
        .unwrap_or_default();
    let commit = EpochCommit {
        epoch,
        record,
        accepted,
        rejects,
        clusters,
        fit_sample,
        fit_sample_size: ctx.fit_pool_docs,
        dedup: verdicts.dedup,
    };
    let result = ctx.store.commit_epoch(&commit);
    ctx.order.done(epoch);
    result.with_context(|| format!("committing epoch {epoch}"))?;
    (ctx.on_commit)(&commit);
    Ok(changes)
}

/// What an epoch's clustering commit changes, as updates of the cluster aggregates the bandit
/// reads: one per member that joined (its tokens) and one per moved centroid.
fn member_updates(epoch: u64, commit: &ClusterCommit) -> Vec<ClusterUpdate> {
    let centroids = commit.clusters.iter().map(|info| {
        (
            info.cluster,
            epoch,
            ClusterDelta::centroid(epoch, info.centroid.clone()),
        )
    });
    let members = commit.members.iter().map(|m| {
        let delta = ClusterDelta::member(u64::from(m.tokens), m.flags == 0);
        (m.cluster, epoch, delta)
    });
    centroids.chain(members).collect()
}

/// The epoch's candidates for the factor-fitting pool sample: its `n` accepted documents with
/// the lowest seeded priority of their id (the store keeps the lowest `n` over all epochs).
fn fit_sample_candidates(
    seed: u64,
    data: &ShardData,
    duplicates: &std::collections::HashSet<u64>,
    n: usize,
) -> Vec<(u64, u64, u32)> {
    let mut candidates: Vec<(u64, u64, u32)> = data
        .docs
        .iter()
        .filter(|d| !duplicates.contains(&d.row))
        .map(|d| {
            let priority = xxhash_rust::xxh3::xxh3_64_with_seed(d.id.as_bytes(), seed ^ 0x9001);
            (priority, d.row, d.row_group)
        })
        .collect();
    candidates.sort_unstable();
    candidates.truncate(n);
    candidates
}

/// The accepted documents' tokens by the shard's `source` column (empty when it has none).
fn tokens_by_source(
    data: &ShardData,
    duplicates: &std::collections::HashSet<u64>,
) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let Some(sources) = data.doc_strings(SOURCE_COLUMN) else {
        return out;
    };
    for (doc, source) in data.docs.iter().zip(sources) {
        if !duplicates.contains(&doc.row) {
            *out.entry(source.unwrap_or("(none)").to_string())
                .or_insert(0) += u64::from(doc.tokens);
        }
    }
    out
}

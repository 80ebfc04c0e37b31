//! The round sink: the selected rows of the clusters a worker owns, accumulated over rounds
//! into output files of at least `sink.min_file_rows` rows, each committed when closed.
use std::collections::BTreeMap;
use std::sync::Arc;

use anyhow::{Context, Result};
use arrow::array::{
    Array, ArrayRef, BooleanArray, Float64Array, Int32Array, Int64Array, RecordBatch,
};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::StreamVec;

use super::{SinkConfig, SOURCE_COLUMN};
use crate::bandit::aggregates::{ClusterDelta, ClusterUpdate};
use crate::bandit::operator::{route, BanditMsg};
use crate::bandit::MemberRef;
use crate::error::{Fail, Failed};
use crate::membership::ShardPaths;
use crate::schema;
use crate::source::{self, Reject, SourceConfig};
use crate::state::{PendingRow, StateStore};

/// What the round sink needs of the job.
pub struct RoundSinkContext {
    pub store: Arc<StateStore>,
    /// The job's seed: it fixes each member's place in the draw order.
    pub seed: u64,
    /// Whether this worker answers for the process's store (its first worker): it carries out
    /// the rounds' parts there and writes the process's files; the others have nothing to do.
    pub holds_store: bool,
    /// Whether the process's store holds every member of the job (one process).
    pub every_member_here: bool,
    pub source: SourceConfig,
    pub sink: SinkConfig,
    /// The loop's lookup of shard paths (shared with the membership operator).
    pub shards: Arc<ShardPaths>,
    /// Called after each committed output file (name, rows).
    pub on_file: OnFile,
    pub fail: Fail,
    pub failed: Failed,
    /// Test hook: abort after a file closed at this round or later is in place, before its
    /// commit.
    pub crash_after_round: Option<u64>,
}

/// Called with a committed output file's name and rows.
pub type OnFile = Arc<dyn Fn(&str, usize) + Send + Sync>;

/// On the first worker of each process: carries out each decided round's part of the members
/// the process's store holds, and writes their selected rows into output files of at least
/// `sink.min_file_rows` rows: rounds accumulate until a file is full, the rest goes into a last
/// file when the loop ends. A file is committed when closed, together with the pending rows it
/// took (kept in the store until then, so a killed job loses none and repeats none).
///
/// Sends each selected member's change of its cluster's aggregates (selected, with its tokens;
/// out of the unsampled members when it was taken unscored) when its round's part arrives. Of
/// a round replayed after a restart (the bandit counted it before), only what a store carries
/// out now: the members that leave its unsampled ones, which the stores' shares that started
/// the aggregates did not count.
pub fn round_sink_operator<'scope>(
    messages: StreamVec<'scope, u64, BanditMsg>,
    ctx: RoundSinkContext,
    index: u64,
    peers: u64,
) -> StreamVec<'scope, u64, ClusterUpdate> {
    messages.unary_frontier::<CapacityContainerBuilder<Vec<ClusterUpdate>>, _, _, _>(
        Exchange::new(move |m: &BanditMsg| route(m, peers)),
        "RoundSink",
        move |_capability, _info| {
            let owned = |_: &MemberRef| true;
            let rows = if ctx.holds_store {
                ctx.store.pending_rows(owned)
            } else {
                Ok(Vec::new())
            };
            let mut pending = match rows {
                Ok(rows) => rows.len(),
                Err(e) => {
                    (ctx.fail)(e.into());
                    0
                }
            };
            let mut last_round: Option<u64> = None;
            let mut stash: BTreeMap<u64, Vec<(u64, usize)>> = BTreeMap::new();
            let mut closed = false;
            move |(input, frontier), output| {
                input.for_each_stamp(|cap, data| {
                    let Some(cap) = cap.retain_least(output.output_index()) else {
                        return;
                    };
                    let time = *cap.time();
                    let entry = stash.entry(time).or_default();
                    let mut session = output.session(&cap);
                    for container in data {
                        for msg in container.drain(..) {
                            let BanditMsg::Committed { part, replay, .. } = msg else {
                                continue;
                            };
                            if !ctx.holds_store {
                                continue;
                            }
                            let here = ctx.every_member_here;
                            let applied =
                                match ctx.store.apply_round_part(index, ctx.seed, &part, here) {
                                    Ok(applied) => applied,
                                    Err(e) => {
                                        (ctx.fail)(anyhow::Error::from(e).context(format!(
                                            "carrying out round {} in the store",
                                            part.round
                                        )));
                                        continue;
                                    }
                                };
                            if let Some(applied) = &applied {
                                entry.push((part.round, applied.part.selected.len()));
                            }
                            if !replay {
                                let part = applied.map_or(part, |a| a.part);
                                for (m, influence) in &part.selected {
                                    let unscored = influence.is_none();
                                    let delta = ClusterDelta::selected(m.tokens, unscored);
                                    session.give((m.cluster, time, delta));
                                }
                            } else if let Some(applied) = applied {
                                // The bandit counted the round before the restart, and its
                                // aggregates started from the stores as they were: this
                                // store carries the round out only now, so the members that
                                // leave its unsampled ones are news to them.
                                for (&cluster, &n) in &applied.left {
                                    session.give((cluster, time, ClusterDelta::left(n)));
                                }
                            }
                        }
                    }
                });
                while let Some((&time, _)) = stash.first_key_value() {
                    if frontier.less_equal(&time) {
                        break;
                    }
                    for (round, rows) in stash.remove(&time).expect("first key") {
                        pending += rows;
                        last_round = Some(last_round.map_or(round, |r| r.max(round)));
                    }
                    let full = ctx.sink.min_file_rows.max(1);
                    let Some(round) = last_round else {
                        continue; // no round of this run has passed yet
                    };
                    if pending >= full && !(ctx.failed)() {
                        match close_file(&ctx, owned, index, Some(round)) {
                            Ok(written) => pending -= written.min(pending),
                            Err(e) => (ctx.fail)(e),
                        }
                    }
                }
                // The loop is over: the rest goes into a last file.
                if frontier.is_empty() && !closed {
                    closed = true;
                    if pending > 0 && !(ctx.failed)() {
                        if let Err(e) = close_file(&ctx, owned, index, None) {
                            (ctx.fail)(e);
                        }
                    }
                }
            }
        },
    )
}

/// Writes the pending rows this worker holds (of rounds up to `through`, or all) as one
/// file and commits it. Returns the rows written.
fn close_file(
    ctx: &RoundSinkContext,
    owned: impl Fn(&MemberRef) -> bool,
    index: u64,
    through: Option<u64>,
) -> Result<usize> {
    let mut rows = ctx.store.pending_rows(owned)?;
    if let Some(through) = through {
        rows.retain(|r| r.round <= through);
    }
    let Some(round) = rows.iter().map(|r| r.round).max() else {
        return Ok(0);
    };
    let taken = rows.len();
    let (fetched, rejected) = fetch_for_output(ctx, &rows);
    if !rejected.is_empty() {
        ctx.store
            .reject_pending(&rejected)
            .context("recording rows that could not be fetched for output")?;
    }
    if fetched.is_empty() {
        return Ok(taken);
    }
    let rows: Vec<PendingRow> = fetched
        .iter()
        .flat_map(|(_, _, rows)| rows.iter().copied())
        .collect();
    // Named by its last round and the worker; a name a committed file already has (another
    // run with another number of workers) gets a suffix.
    let committed = ctx.store.outputs()?;
    let name = (0..)
        .map(|n| round_file_name(round, index, n))
        .find(|name| !committed.contains(name))
        .expect("a free name");
    let tokens_by_source = write_rows(ctx, &name, &fetched)?;
    if ctx.crash_after_round.is_some_and(|crash| round >= crash) {
        tracing::error!(
            file = name,
            "test hook: crashing after the file's rename, before its commit"
        );
        super::die_as_if_killed();
    }
    ctx.store
        .commit_output_file(&name, round, &rows, &tokens_by_source)
        .with_context(|| format!("committing {name}"))?;
    (ctx.on_file)(&name, rows.len());
    tracing::info!(file = name, rows = rows.len(), "output file committed");
    Ok(taken)
}

/// Members grouped by the shard holding them, rows ascending.
fn by_shard<'a, T>(
    items: impl Iterator<Item = (&'a MemberRef, T)>,
) -> BTreeMap<u64, Vec<(u64, T)>> {
    let mut out: BTreeMap<u64, Vec<(u64, T)>> = BTreeMap::new();
    for (m, value) in items {
        out.entry(m.loc.shard).or_default().push((m.loc.row, value));
    }
    for rows in out.values_mut() {
        rows.sort_by_key(|(row, _)| *row);
    }
    out
}

/// A shard's selected rows fetched back for output: (shard path, the rows' columns, the rows).
type FetchedRows = (std::path::PathBuf, RecordBatch, Vec<PendingRow>);

/// The pending rows fetched back by location, shard by shard, rows ascending; a row that
/// cannot be had any more (its text null now, its shard gone or unreadable) is rejected with
/// the reason instead, and the other rows go on.
fn fetch_for_output(
    ctx: &RoundSinkContext,
    rows: &[PendingRow],
) -> (Vec<FetchedRows>, Vec<(PendingRow, Reject)>) {
    let (mut fetched, mut rejected) = (Vec::new(), Vec::new());
    for (epoch, rows) in by_shard(rows.iter().map(|r| (&r.member, *r))) {
        let rows: Vec<PendingRow> = rows.into_iter().map(|(_, r)| r).collect();
        let reject = |r: &PendingRow, reason: String| {
            tracing::warn!(epoch, row = r.member.loc.row, %reason, "selected row rejected");
            let column = ctx.source.text_column.clone();
            let (row, matched) = (r.member.loc.row, None);
            (
                *r,
                Reject {
                    row,
                    column,
                    reason,
                    matched,
                },
            )
        };
        let wanted: Vec<u64> = rows.iter().map(|r| r.member.loc.row).collect();
        let read = ctx.shards.get(epoch).and_then(|path| {
            let batch = source::fetch_rows(&path, &ctx.source, &wanted)?;
            Ok((path, batch))
        });
        let (path, batch) = match read {
            Ok(read) => read,
            Err(e) => {
                let reason = format!("fetching for output: {e:#}");
                rejected.extend(rows.iter().map(|r| reject(r, reason.clone())));
                continue;
            }
        };
        let text = batch.column_by_name(&ctx.source.text_column);
        let null = |i: usize| text.is_some_and(|c| c.is_null(i));
        if (0..batch.num_rows()).any(null) {
            let reason = format!("{}: text is null on fetch for output", path.display());
            let keep: BooleanArray = (0..batch.num_rows()).map(|i| Some(!null(i))).collect();
            rejected.extend(
                rows.iter()
                    .enumerate()
                    .filter(|(i, _)| null(*i))
                    .map(|(_, r)| reject(r, reason.clone())),
            );
            let rows = rows
                .iter()
                .enumerate()
                .filter(|(i, _)| !null(*i))
                .map(|(_, r)| *r)
                .collect();
            match arrow::compute::filter_record_batch(&batch, &keep) {
                Ok(batch) => fetched.push((path, batch, rows)),
                Err(e) => tracing::error!(error = %e, "internal: filtering fetched rows"),
            }
            continue;
        }
        fetched.push((path, batch, rows));
    }
    (fetched, rejected)
}

/// Writes rows (fetched back by location) with quad_cluster, quad_influence and quad_round as
/// one Parquet file; returns their tokens by the rows' `source` column.
fn write_rows(
    ctx: &RoundSinkContext,
    name: &str,
    fetched: &[FetchedRows],
) -> Result<BTreeMap<String, u64>> {
    let mut tokens_by_source = BTreeMap::new();
    let mut batches = Vec::new();
    let mut out_schema = None;
    for (path, batch, rows) in fetched {
        let schema = schema::output_schema(&batch.schema());
        match &out_schema {
            None => out_schema = Some(schema.clone()),
            Some(first) if first != &schema => anyhow::bail!(
                "{}: its columns differ from the other shards' ({:?}); one output file needs one schema",
                path.display(),
                batch.schema().fields().iter().map(|f| f.name()).collect::<Vec<_>>()
            ),
            Some(_) => {}
        }
        if let Ok(index) = batch.schema().index_of(SOURCE_COLUMN) {
            for (i, r) in rows.iter().enumerate() {
                let domain = source::string_at(batch.column(index), i).unwrap_or("(none)");
                *tokens_by_source.entry(domain.to_string()).or_default() += r.member.tokens;
            }
        }
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        for field in schema::output_fields() {
            let array: ArrayRef = match field.name().as_str() {
                "quad_cluster" => Arc::new(Int32Array::from_iter_values(
                    rows.iter().map(|r| r.member.cluster as i32),
                )),
                "quad_influence" => {
                    Arc::new(rows.iter().map(|r| r.influence).collect::<Float64Array>())
                }
                "quad_round" => Arc::new(Int64Array::from_iter_values(
                    rows.iter().map(|r| r.round as i64),
                )),
                other => anyhow::bail!("internal: unknown output column {other}"),
            };
            debug_assert_eq!(array.len(), batch.num_rows());
            columns.push(array);
        }
        batches.push(RecordBatch::try_new(schema, columns)?);
    }
    let Some(out_schema) = out_schema else {
        return Ok(tokens_by_source);
    };
    super::write_durably(&ctx.sink.path, name, out_schema, &batches, &ctx.sink)
        .with_context(|| format!("writing {}", ctx.sink.path.join(name).display()))?;
    Ok(tokens_by_source)
}

/// Output file of the Quad loop whose last round is `round`, closed by worker `index`
/// (`part-` so that leftovers of an uncommitted file are removed like those of an uncommitted
/// epoch); `n` > 0 only when that name is taken.
pub fn round_file_name(round: u64, index: u64, n: u32) -> String {
    match n {
        0 => format!("part-r{round:06}-w{index:03}.parquet"),
        n => format!("part-r{round:06}-w{index:03}-{n}.parquet"),
    }
}

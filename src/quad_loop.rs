//! The Quad loop (DESIGN 1.2 and 2.1), in the job's one dataflow: bandit rounds are
//! timestamps, and the scores come back to the bandit through a feedback edge.
//!
//!   cluster changes (from the ingest sink) ─▶ bandit (worker 0, O(k) state)
//!                                               │ pull requests (cluster, n, round)
//!                                               ▼
//!               membership (worker cluster % peers): seeded draw from the store, fetch texts
//!                                               │
//!               score (worker 0: the process's influence model) ─▶ feedback (+1) ─▶ bandit
//!   bandit ─▶ selected rows ─▶ round sink (worker cluster % peers): files of min_file_rows
//!
//! Round r is planned at time t: the bandit sends one request per pulled cluster to the
//! cluster's owner, which draws the sample from the store (a function of the seed, the round
//! and the cluster's unsampled members, whatever the number of workers), fetches the texts and
//! sends them to the scorer. The scorer scores in a fixed order (so batches, and hence
//! floating-point results, do not depend on the worker count) and sends the pulls and scores
//! into the feedback edge, where they arrive at t+1. The bandit observes them, commits the
//! round (what it changed only) in one store transaction, sends the selected rows to their
//! owners' round sinks, and plans round r+1 at t+1.
//!
//! The bandit plans only once ingest has committed everything it was given (a run over a
//! fixed set of shards: deterministic), or at any time in watch mode, where new shards' cluster
//! changes join the bandit's aggregates between rounds.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use arrow::array::{Array, ArrayRef, Float64Array, Int32Array, Int64Array, RecordBatch};
use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::{Capability, ConnectLoop, Feedback, Probe};
use timely::dataflow::{ProbeHandle, StreamVec};

use crate::bandit::{Bandit, ClusterChange, DocLoc, MemberRef, Pull, PullRequest, RoundOutcome};
use crate::report::RoundRecord;
use crate::schema;
use crate::sink;
use crate::sink::SinkConfig;
use crate::source;
use crate::source::SourceConfig;
use crate::state::{PendingRow, StateStore};

/// Scores documents by their texts; the influence scorer implements it.
pub trait DocScorer {
    fn score(&mut self, texts: &[&str]) -> Result<Vec<f64>>;
}

/// Builds the scorer on the worker that scores (models are not shared across threads).
pub type ScorerFactory = Arc<dyn Fn() -> Result<Box<dyn DocScorer>> + Send + Sync>;

/// The shard file of each epoch, looked up in the store again when a new epoch appears (watch
/// mode registers shards while rounds go on).
pub struct ShardPaths {
    store: Arc<StateStore>,
    known: Mutex<BTreeMap<u64, PathBuf>>,
}

impl ShardPaths {
    pub fn new(store: Arc<StateStore>) -> ShardPaths {
        ShardPaths {
            store,
            known: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn get(&self, epoch: u64) -> Result<PathBuf> {
        let mut known = self.known.lock().expect("shard paths");
        if !known.contains_key(&epoch) {
            *known = self.store.shard_paths()?;
        }
        known
            .get(&epoch)
            .cloned()
            .with_context(|| format!("no shard is recorded for epoch {epoch}"))
    }
}

/// The source settings projected to the id and text columns: what fetching texts reads (the
/// other columns, an embedding column above all, are left undecoded).
fn text_only(source: &SourceConfig) -> SourceConfig {
    SourceConfig {
        columns: Some(Vec::new()),
        ..source.clone()
    }
}

/// The texts of the factor-fitting pool sample a job's store kept during ingest (a few hundred
/// documents, fetched by location: no pass over the pool), in sample order.
pub fn fit_sample_texts(
    store: &Arc<StateStore>,
    source: &SourceConfig,
    n: usize,
) -> Result<Vec<String>> {
    let locations = store.fit_sample(n)?;
    let texts = texts_at(&ShardPaths::new(store.clone()), source, &locations)?;
    Ok(texts.into_iter().flatten().collect())
}

/// The texts at `locations`, in their order (`None` where null), read back from their shards:
/// one read per shard, of the id and text columns of the row groups that hold them.
fn texts_at(
    shards: &ShardPaths,
    source: &SourceConfig,
    locations: &[DocLoc],
) -> Result<Vec<Option<String>>> {
    let mut by_epoch: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for loc in locations {
        by_epoch.entry(loc.shard).or_default().push(loc.row);
    }
    let mut texts: BTreeMap<(u64, u64), String> = BTreeMap::new();
    for (epoch, mut rows) in by_epoch {
        rows.sort_unstable();
        rows.dedup();
        let path = shards.get(epoch)?;
        let batch = source::fetch_rows(&path, &text_only(source), &rows)?;
        let column = column(&batch, &source.text_column, &path)?;
        for (i, row) in rows.iter().enumerate() {
            if let Some(text) = source::string_at(column, i) {
                texts.insert((epoch, *row), text.to_string());
            }
        }
    }
    Ok(locations
        .iter()
        .map(|loc| texts.get(&(loc.shard, loc.row)).cloned())
        .collect())
}

/// What the loop needs besides the bandit.
pub struct LoopContext {
    pub store: Arc<StateStore>,
    pub seed: u64,
    pub source: SourceConfig,
    pub sink: SinkConfig,
    pub shards: ShardPaths,
    pub scorer: ScorerFactory,
    /// Long-lived mode: plan whenever there is budget, and wait for new shards when done.
    pub watch: bool,
    /// Called on worker 0 after each committed round (progress, summary).
    pub on_round: Arc<dyn Fn(&RoundOutcome) + Send + Sync>,
    /// Called after each committed output file (name, rows).
    pub on_file: Arc<dyn Fn(&str, usize) + Send + Sync>,
    /// Set when a stop was requested: finish the round in flight, then stop.
    pub stop: &'static AtomicBool,
    /// Reports a failure on any worker; the bandit then neither observes nor plans again, so
    /// the loop drains and the job ends with the error (nothing half-observed is committed).
    pub fail: Arc<dyn Fn(anyhow::Error) + Send + Sync>,
    pub failed: Arc<dyn Fn() -> bool + Send + Sync>,
    /// Test hook: abort after a file closed at this round or later is in place, before its
    /// commit.
    pub crash_after_round: Option<u64>,
}

/// What the bandit sends: requests to the membership of a cluster's owner, a tick to the
/// scorer, and, after a round's commit, its selected rows to their owners' round sinks.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum BanditMsg {
    Pull {
        round: u64,
        request: PullRequest,
    },
    /// To worker 0's scorer, so the round goes on even when nothing is scored.
    Tick {
        round: u64,
    },
    /// A committed round, to every worker's round sink (`to`), with its rows of the clusters
    /// that worker owns.
    Committed {
        round: u64,
        to: u64,
        rows: usize,
    },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
enum Fetched {
    Drawn {
        round: u64,
        pull: Pull,
        /// Texts of the sample's members, in member order, when the pull is scored.
        texts: Vec<String>,
    },
    Tick {
        round: u64,
    },
}

/// A round's pulls as drawn, with the scores of their scored members, for the bandit.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Scored {
    pulls: Vec<Pull>,
    scores: Vec<(MemberRef, f64)>,
}

/// Builds the loop in the job's dataflow: returns nothing, but every stream it ends in is
/// attached to `probe`, which is done once the loop has drained and the last file is closed.
pub fn build_loop<'scope>(
    changes: StreamVec<'scope, u64, ClusterChange>,
    bandit: Option<Bandit>,
    ctx: Arc<LoopContext>,
    probe: &ProbeHandle<u64>,
) {
    let scope = changes.scope();
    let (handle, scores) = scope.feedback::<Vec<Scored>>(1);
    let messages = bandit_operator(changes, scores, bandit, ctx.clone());
    let peers = scope.peers() as u64;
    let index = scope.index() as u64;
    round_sink_operator(messages.clone(), ctx.clone(), index, peers).probe_with(probe);
    let fetched = membership_operator(messages, ctx.clone(), peers);
    score_operator(fetched, ctx)
        .probe_with(probe)
        .connect_loop(handle);
}

/// Where a bandit message goes.
fn route(msg: &BanditMsg, peers: u64) -> u64 {
    match msg {
        BanditMsg::Pull { request, .. } => u64::from(request.cluster) % peers,
        BanditMsg::Tick { .. } => 0,
        BanditMsg::Committed { to, .. } => *to,
    }
}

/// The bandit's side of the loop, on worker 0.
struct BanditSide {
    bandit: Bandit,
    ctx: Arc<LoopContext>,
    /// The capability rounds are planned with; None once the loop is over.
    cap: Option<Capability<u64>>,
    /// (time, round) of the round whose scores are awaited.
    in_flight: Option<(u64, u64)>,
    peers: usize,
}

fn bandit_operator<'scope>(
    changes: StreamVec<'scope, u64, ClusterChange>,
    scores: StreamVec<'scope, u64, Scored>,
    bandit: Option<Bandit>,
    ctx: Arc<LoopContext>,
) -> StreamVec<'scope, u64, BanditMsg> {
    let scope = changes.scope();
    let peers = scope.peers() as u64;
    changes.binary_frontier::<_, CapacityContainerBuilder<Vec<BanditMsg>>, _, _, _, _>(
        scores,
        Exchange::new(|_: &ClusterChange| 0),
        Exchange::new(|_: &Scored| 0),
        "Bandit",
        move |capability, info| {
            let activator = scope.activator_for(info.address);
            let mut side = bandit.map(|bandit| BanditSide {
                bandit,
                ctx: ctx.clone(),
                cap: Some(capability),
                in_flight: None,
                peers: peers as usize,
            });
            let mut stash: BTreeMap<u64, Scored> = BTreeMap::new();
            // Changes wait while a round is in flight: the round is observed against the state
            // it was planned with, and new members join between rounds.
            let mut arrived: Vec<ClusterChange> = Vec::new();
            move |(changes, changes_frontier), (scores, scores_frontier), output| {
                changes.for_each_stamp(|_cap, data| {
                    for container in data {
                        arrived.append(container);
                    }
                });
                scores.for_each_stamp(|cap, data| {
                    let Some(&time) = cap.least() else {
                        return;
                    };
                    let entry = stash.entry(time).or_default();
                    for container in data {
                        for part in container.drain(..) {
                            entry.pulls.extend(part.pulls);
                            entry.scores.extend(part.scores);
                        }
                    }
                });
                let Some(side) = side.as_mut() else {
                    return;
                };
                let Some(cap) = side.cap.clone() else {
                    return;
                };
                if let Some((time, round)) = side.in_flight {
                    if scores_frontier.less_equal(&(time + 1)) {
                        return; // scores of the round in flight still to come
                    }
                    side.in_flight = None;
                    let scored = stash.remove(&(time + 1)).unwrap_or_default();
                    stash.retain(|&t, _| t > time + 1);
                    if (ctx.failed)() {
                        side.cap = None;
                        return;
                    }
                    match side.observe(round, scored) {
                        Ok(rows) => {
                            let mut session = output.session(&cap);
                            for (to, rows) in rows.into_iter().enumerate() {
                                session.give(BanditMsg::Committed {
                                    round,
                                    to: to as u64,
                                    rows,
                                });
                            }
                        }
                        Err(e) => {
                            (ctx.fail)(e);
                            side.cap = None;
                            return;
                        }
                    }
                }
                for change in arrived.drain(..) {
                    if let Err(e) = side.bandit.apply(&change) {
                        (ctx.fail)(e.into());
                    }
                }
                // Plan the next round once ingest has committed what it was given (a fixed run),
                // or at any time in watch mode.
                let ingest_done = changes_frontier.is_empty();
                if !(ctx.watch || ingest_done) {
                    return;
                }
                if (ctx.failed)() || ctx.stop.load(Ordering::SeqCst) {
                    side.cap = None;
                    return;
                }
                let round = side.bandit.next_round();
                let requests = side.bandit.plan_round(round);
                if requests.is_empty() {
                    if ingest_done && !ctx.watch {
                        side.cap = None; // done: budget reached or nothing left
                    } else {
                        // Long-lived: new shards may open arms again; look for a stop meanwhile.
                        activator.activate_after(Duration::from_millis(200));
                    }
                    return;
                }
                let time = *cap.time();
                let mut session = output.session(&cap);
                for request in requests {
                    session.give(BanditMsg::Pull { round, request });
                }
                session.give(BanditMsg::Tick { round });
                drop(session);
                side.in_flight = Some((time, round));
                let mut next = cap;
                next.downgrade(&(time + 1));
                side.cap = Some(next);
            }
        },
    )
}

impl BanditSide {
    /// Observes round `round` and commits it; returns the number of selected rows per worker
    /// (by cluster owner), for the round sinks.
    fn observe(&mut self, round: u64, scored: Scored) -> Result<Vec<usize>> {
        let plan = self.bandit.plan_round(round);
        let mut by_cluster: BTreeMap<u32, Pull> =
            scored.pulls.into_iter().map(|p| (p.cluster, p)).collect();
        let pulls: Vec<Pull> = plan
            .iter()
            .filter_map(|r| by_cluster.remove(&r.cluster))
            .collect();
        let outcome = self
            .bandit
            .observe(round, &pulls, &scored.scores)
            .with_context(|| format!("bandit round {round}"))?;
        let record = RoundRecord::new(&pulls, &outcome);
        self.ctx
            .store
            .commit_round(&record, &self.bandit, &outcome)
            .with_context(|| format!("committing round {round}"))?;
        (self.ctx.on_round)(&outcome);
        let peers = self.peers.max(1);
        let mut rows = vec![0; peers];
        for (m, _) in &outcome.selected {
            rows[m.cluster as usize % peers] += 1;
        }
        Ok(rows)
    }
}

/// Draws each requested pull on the worker that owns the cluster (`cluster % peers`), from the
/// store's draw order, and fetches the texts of the members to score from their shards.
fn membership_operator<'scope>(
    messages: StreamVec<'scope, u64, BanditMsg>,
    ctx: Arc<LoopContext>,
    peers: u64,
) -> StreamVec<'scope, u64, Fetched> {
    messages.unary::<CapacityContainerBuilder<Vec<Fetched>>, _, _, _>(
        Exchange::new(move |m: &BanditMsg| route(m, peers)),
        "Membership",
        move |_capability, _info| {
            move |input, output| {
                input.for_each_stamp(|cap, data| {
                    let Some(cap) = cap.retain_least(output.output_index()) else {
                        return;
                    };
                    let mut session = output.session(&cap);
                    for container in data {
                        for msg in container.drain(..) {
                            match msg {
                                BanditMsg::Tick { round } => session.give(Fetched::Tick { round }),
                                BanditMsg::Pull { round, request } => {
                                    match draw_and_fetch(&ctx, round, &request) {
                                        Ok(fetched) => session.give(fetched),
                                        Err(e) => (ctx.fail)(e),
                                    }
                                }
                                BanditMsg::Committed { .. } => {}
                            }
                        }
                    }
                });
            }
        },
    )
}

fn draw_and_fetch(ctx: &LoopContext, round: u64, request: &PullRequest) -> Result<Fetched> {
    let started = std::time::Instant::now();
    let pull = ctx.store.draw(ctx.seed, round, request).with_context(|| {
        format!(
            "drawing round {round}'s sample of cluster {}",
            request.cluster
        )
    })?;
    let texts = if pull.score {
        fetch_texts(ctx, &pull.members)?
    } else {
        Vec::new()
    };
    tracing::debug!(
        round,
        cluster = request.cluster,
        seconds = started.elapsed().as_secs_f64(),
        "drawn and fetched"
    );
    Ok(Fetched::Drawn { round, pull, texts })
}

/// Scores each round's drawn samples on worker 0 (the process's model), in a fixed order, and
/// sends the pulls with their scores into the feedback edge.
fn score_operator<'scope>(
    fetched: StreamVec<'scope, u64, Fetched>,
    ctx: Arc<LoopContext>,
) -> StreamVec<'scope, u64, Scored> {
    fetched.unary_frontier::<CapacityContainerBuilder<Vec<Scored>>, _, _, _>(
        Exchange::new(|_: &Fetched| 0),
        "Score",
        move |_capability, _info| {
            let mut scorer: Option<Box<dyn DocScorer>> = None;
            let mut stash: BTreeMap<u64, (Capability<u64>, Vec<(Pull, Vec<String>)>)> =
                BTreeMap::new();
            move |(input, frontier), output| {
                input.for_each_stamp(|cap, data| {
                    let Some(cap) = cap.retain_least(output.output_index()) else {
                        return;
                    };
                    let entry = stash
                        .entry(*cap.time())
                        .or_insert_with(|| (cap.clone(), Vec::new()));
                    for container in data {
                        for msg in container.drain(..) {
                            if let Fetched::Drawn { pull, texts, .. } = msg {
                                entry.1.push((pull, texts));
                            }
                        }
                    }
                });
                while let Some((&time, _)) = stash.first_key_value() {
                    if frontier.less_equal(&time) {
                        break;
                    }
                    let (cap, mut drawn) = stash.remove(&time).expect("first key");
                    drawn.sort_by_key(|(pull, _)| pull.cluster);
                    match score_round(&ctx, &mut scorer, &drawn) {
                        Ok(scores) => output.session(&cap).give(Scored {
                            pulls: drawn.into_iter().map(|(pull, _)| pull).collect(),
                            scores,
                        }),
                        Err(e) => (ctx.fail)(e),
                    }
                }
            }
        },
    )
}

/// The scores of a round's scored members, scored in member order (the same batches whatever
/// the number of workers).
fn score_round(
    ctx: &LoopContext,
    scorer: &mut Option<Box<dyn DocScorer>>,
    drawn: &[(Pull, Vec<String>)],
) -> Result<Vec<(MemberRef, f64)>> {
    let mut docs: Vec<(MemberRef, &str)> = drawn
        .iter()
        .filter(|(pull, _)| pull.score)
        .flat_map(|(pull, texts)| {
            pull.members
                .iter()
                .copied()
                .zip(texts.iter().map(|t| t.as_str()))
        })
        .collect();
    if docs.is_empty() {
        return Ok(Vec::new());
    }
    docs.sort_by(|a, b| a.0.cmp(&b.0));
    if scorer.is_none() {
        *scorer = Some((ctx.scorer)().context("loading the influence scorer")?);
    }
    let scorer = scorer.as_mut().expect("just set");
    let texts: Vec<&str> = docs.iter().map(|(_, t)| *t).collect();
    let started = std::time::Instant::now();
    let values = scorer.score(&texts)?;
    tracing::debug!(
        documents = texts.len(),
        seconds = started.elapsed().as_secs_f64(),
        "scored"
    );
    anyhow::ensure!(
        values.len() == docs.len(),
        "the scorer returned {} scores for {} documents",
        values.len(),
        docs.len()
    );
    Ok(docs.iter().map(|(m, _)| *m).zip(values).collect())
}

/// Writes the selected rows of the clusters this worker owns into output files of at least
/// `sink.min_file_rows` rows: rounds accumulate until a file is full, the rest goes into a last
/// file when the loop ends. A file is committed when closed, together with the pending rows it
/// took (kept in the store until then, so a killed job loses none and repeats none).
fn round_sink_operator<'scope>(
    messages: StreamVec<'scope, u64, BanditMsg>,
    ctx: Arc<LoopContext>,
    index: u64,
    peers: u64,
) -> StreamVec<'scope, u64, ()> {
    messages.unary_frontier::<CapacityContainerBuilder<Vec<()>>, _, _, _>(
        Exchange::new(move |m: &BanditMsg| route(m, peers)),
        "RoundSink",
        move |_capability, _info| {
            let owned = move |cluster: u32| u64::from(cluster) % peers == index;
            let mut pending = match ctx.store.pending_rows(owned) {
                Ok(rows) => rows.len(),
                Err(e) => {
                    (ctx.fail)(e.into());
                    0
                }
            };
            let mut last_round: Option<u64> = None;
            let mut stash: BTreeMap<u64, Vec<(u64, usize)>> = BTreeMap::new();
            let mut closed = false;
            move |(input, frontier), _output| {
                input.for_each_stamp(|cap, data| {
                    let Some(&time) = cap.least() else {
                        return;
                    };
                    let entry = stash.entry(time).or_default();
                    for container in data {
                        for msg in container.drain(..) {
                            if let BanditMsg::Committed { round, rows, .. } = msg {
                                entry.push((round, rows));
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

/// Writes the pending rows of the owned clusters (of rounds up to `through`, or all) as one
/// file and commits it. Returns the rows written.
fn close_file(
    ctx: &LoopContext,
    owned: impl Fn(u32) -> bool,
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
    // Named by its last round and the worker; a name a committed file already has (another
    // run with another number of workers) gets a suffix.
    let committed = ctx.store.outputs()?;
    let name = (0..)
        .map(|n| round_file_name(round, index, n))
        .find(|name| !committed.contains(name))
        .expect("a free name");
    let tokens_by_source = write_rows(ctx, &name, &rows)?;
    if ctx.crash_after_round.is_some_and(|crash| round >= crash) {
        tracing::error!(
            file = name,
            "test hook: crashing after the file's rename, before its commit"
        );
        std::process::abort();
    }
    ctx.store
        .commit_output_file(&name, round, &rows, &tokens_by_source)
        .with_context(|| format!("committing {name}"))?;
    (ctx.on_file)(&name, rows.len());
    tracing::info!(file = name, rows = rows.len(), "output file committed");
    Ok(rows.len())
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

/// The texts of members in member order (a null text, which ingest rejects, is an error
/// naming the shard, row and column).
fn fetch_texts(ctx: &LoopContext, members: &[MemberRef]) -> Result<Vec<String>> {
    let locations: Vec<DocLoc> = members.iter().map(|m| m.loc).collect();
    let texts = texts_at(&ctx.shards, &ctx.source, &locations)?;
    texts
        .into_iter()
        .zip(&locations)
        .map(|(text, loc)| match text {
            Some(text) => Ok(text),
            None => anyhow::bail!(
                "{}: row {}, column '{}': text is null on fetch",
                ctx.shards.get(loc.shard)?.display(),
                loc.row,
                ctx.source.text_column
            ),
        })
        .collect()
}

fn column<'a>(batch: &'a RecordBatch, name: &str, path: &std::path::Path) -> Result<&'a ArrayRef> {
    let index = batch
        .schema()
        .index_of(name)
        .with_context(|| format!("{}: column '{name}' is missing", path.display()))?;
    Ok(batch.column(index))
}

/// Writes rows (fetched back by location) with quad_cluster, quad_influence and quad_round as
/// one Parquet file; returns their tokens by the rows' `source` column.
fn write_rows(ctx: &LoopContext, name: &str, rows: &[PendingRow]) -> Result<BTreeMap<String, u64>> {
    let mut tokens_by_source = BTreeMap::new();
    let mut batches = Vec::new();
    let mut out_schema = None;
    let selected = by_shard(rows.iter().map(|r| (&r.member, r)));
    for (epoch, rows) in selected {
        let path = ctx.shards.get(epoch)?;
        let wanted: Vec<u64> = rows.iter().map(|(row, _)| *row).collect();
        let batch = source::fetch_rows(&path, &ctx.source, &wanted)?;
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
            for (i, (_, r)) in rows.iter().enumerate() {
                let domain = source::string_at(batch.column(index), i).unwrap_or("(none)");
                *tokens_by_source.entry(domain.to_string()).or_default() += r.member.tokens;
            }
        }
        let mut columns: Vec<ArrayRef> = batch.columns().to_vec();
        for field in schema::output_fields() {
            let array: ArrayRef = match field.name().as_str() {
                "quad_cluster" => Arc::new(Int32Array::from_iter_values(
                    rows.iter().map(|(_, r)| r.member.cluster as i32),
                )),
                "quad_influence" => Arc::new(
                    rows.iter()
                        .map(|(_, r)| r.influence)
                        .collect::<Float64Array>(),
                ),
                "quad_round" => Arc::new(Int64Array::from_iter_values(
                    rows.iter().map(|(_, r)| r.round as i64),
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
    sink::write_durably(&ctx.sink.path, name, out_schema, &batches, &ctx.sink)
        .with_context(|| format!("writing {}", ctx.sink.path.join(name).display()))?;
    Ok(tokens_by_source)
}

/// The column whose values the report's "selected tokens by source" plot groups by.
pub const SOURCE_COLUMN: &str = "source";

/// Output file of the Quad loop whose last round is `round`, closed by worker `index`
/// (`part-` so that leftovers of an uncommitted file are removed like those of an uncommitted
/// epoch); `n` > 0 only when that name is taken.
pub fn round_file_name(round: u64, index: u64, n: u32) -> String {
    match n {
        0 => format!("part-r{round:06}-w{index:03}.parquet"),
        n => format!("part-r{round:06}-w{index:03}-{n}.parquet"),
    }
}

/// What the influence operator spent, for the cost accounting (DESIGN 1.4): the model's shape
/// and the scored documents' token and window counts, O(1) whatever the pool.
#[derive(Debug, Clone, Default)]
pub struct ScoreTally {
    /// The model's shape and K-FAC blocks, once the scorer is built.
    pub shape: Option<(crate::cost::TransformerShape, Vec<crate::cost::Linear>)>,
    pub docs: u64,
    pub tokens: u64,
    /// Windows of each length scored (length -> count).
    pub windows: BTreeMap<u64, u64>,
}

/// The influence scorer as the loop's `DocScorer`, counting what it scores.
pub struct TalliedScorer {
    pub scorer: crate::influence::InfluenceScorer,
    pub tally: Arc<Mutex<ScoreTally>>,
    pub window: u64,
}

impl TalliedScorer {
    pub fn new(
        scorer: crate::influence::InfluenceScorer,
        tally: Arc<Mutex<ScoreTally>>,
        window: u64,
    ) -> TalliedScorer {
        let shape = crate::cost::TransformerShape::llama(&scorer.model().config);
        tally.lock().expect("score tally").shape = Some(shape);
        TalliedScorer {
            scorer,
            tally,
            window,
        }
    }
}

impl DocScorer for TalliedScorer {
    fn score(&mut self, texts: &[&str]) -> Result<Vec<f64>> {
        let scores = self.scorer.score(texts)?;
        let mut tally = self.tally.lock().expect("score tally");
        let window = self.window.max(1);
        for s in &scores {
            tally.docs += 1;
            tally.tokens += s.tokens;
            let full = s.tokens / window;
            if full > 0 {
                *tally.windows.entry(window).or_default() += full;
            }
            if s.tokens % window > 0 {
                *tally.windows.entry(s.tokens % window).or_default() += 1;
            }
        }
        Ok(scores.into_iter().map(|s| s.influence).collect())
    }
}

//! The timely dataflow of a job.
//!
//!   shards ─▶ read (owner worker) ─▶ admit (worker 0: dedup + select, in epoch order)
//!                                        ─▶ sink (owner worker: Parquet + state commit)
//!
//! With `[cluster] enabled`, two more stages run between read and sink:
//!
//!   read ─▶ embed (owner worker) ─▶ assign (worker 0, in epoch order, after admit) ─┬▶ sink
//!                                                   membership (worker cluster % peers) ◀┘
//!
//! Timestamps are epochs; epoch e is one shard, read and written by worker `e % peers`, which
//! keeps the shard's rows in memory between the two. Only document metadata and vectors cross
//! workers. The admit, assign and sink operators stash by capability and act when the frontier
//! passes an epoch, so their decisions do not depend on how many workers there are.
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::operator::empty;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::{Capability, Probe};
use timely::dataflow::{InputHandleVec, ProbeHandle, StreamVec};

use crate::assign::Assigner;
use crate::bandit::{Bandit, ClusterChange, RoundOutcome};
use crate::config::{JobSpec, Strategy};
use crate::cost::Costs;
use crate::embed::SentenceEncoder;
use crate::progress::{Progress, Summary};
use crate::quad_loop::{
    build_loop, DocScorer, LoopContext, ScoreTally, ScorerFactory, ShardPaths, TalliedScorer,
};
use crate::select::{Admitter, Verdicts};
use crate::sink;
use crate::source::{self, DocMeta, EmbeddingColumn, ShardData};
use crate::state::{ClusterCommit, EpochCommit, EpochRecord, PlannedShard, StateStore};
use crate::tokens::TokenCounter;

/// Rejected rows logged one by one per shard; the rest are counted.
const REJECTS_LOGGED_PER_SHARD: usize = 10;

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub workers: usize,
    /// Process each found shard once even if the spec says `watch`.
    pub once: bool,
}

/// The documents of one epoch, sent to the admit operator.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct EpochDocs {
    epoch: u64,
    docs: Vec<DocMeta>,
}

/// An epoch's documents with their unit vectors (row-major), from the embed operator.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct EmbeddedEpoch {
    epoch: u64,
    docs: Vec<DocMeta>,
    vectors: Vec<f32>,
}

/// What the assign stage commits with an epoch.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct EpochClusters {
    epoch: u64,
    commit: ClusterCommit,
}

/// Clustering jobs commit epochs strictly in epoch order, so the stored clusterer state is
/// always the state after every committed epoch and no later one: what resuming needs.
#[derive(Default)]
struct CommitOrder {
    /// Epochs of this run not committed yet.
    waiting: Mutex<std::collections::BTreeSet<u64>>,
    turn: std::sync::Condvar,
}

impl CommitOrder {
    fn add(&self, epochs: impl IntoIterator<Item = u64>) {
        self.waiting.lock().expect("commit order").extend(epochs);
    }

    /// Blocks until every earlier epoch of this run has committed; false if the job failed.
    fn wait_turn(&self, epoch: u64, failed: &AtomicBool) -> bool {
        let mut waiting = self.waiting.lock().expect("commit order");
        while waiting.first().is_some_and(|&first| first < epoch) {
            if failed.load(Ordering::SeqCst) {
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

    fn done(&self, epoch: u64) {
        self.waiting.lock().expect("commit order").remove(&epoch);
        self.turn.notify_all();
    }
}

/// An epoch's shard as its owner worker holds it until the sink has written it.
struct LocalShard {
    shard: PathBuf,
    data: Result<ShardData, String>,
}

/// Set by a stop request (Ctrl-C, SIGTERM): finish the epochs in flight, then exit.
pub static STOP: AtomicBool = AtomicBool::new(false);

/// Test hooks, so that crash-recovery tests can stop a job at an exact point.
struct Hooks {
    delay: Option<Duration>,
    crash_after_rename: Option<u64>,
    /// Abort after round N's output file is in place, before its commit.
    crash_after_round: Option<u64>,
}

impl Hooks {
    fn from_env() -> Hooks {
        let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
        Hooks {
            delay: var("QUAD_TEST_EPOCH_DELAY_MS").map(Duration::from_millis),
            crash_after_rename: var("QUAD_TEST_CRASH_AFTER_RENAME"),
            crash_after_round: var("QUAD_TEST_CRASH_AFTER_ROUND"),
        }
    }
}

/// Shared between the workers of this process.
struct Shared {
    spec: JobSpec,
    store: Arc<StateStore>,
    counter: TokenCounter,
    summary: Mutex<Summary>,
    failure: Mutex<Option<anyhow::Error>>,
    failed: AtomicBool,
    progress: Progress,
    hooks: Hooks,
    /// Vector width when clustering is on.
    clustering: Option<usize>,
    /// The precomputed embedding column the reader reads, if the spec names one.
    embedding: Option<EmbeddingColumn>,
    order: CommitOrder,
    /// Encoder FLOPs and documents embedded in this run.
    embed_cost: Mutex<(f64, u64)>,
    /// What the influence operator scored in this run.
    score_tally: Arc<Mutex<ScoreTally>>,
    /// When ingest had committed everything (set by worker 0).
    ingest_done: Mutex<Option<Instant>>,
    /// Wall time between round commits (the last `ROUND_TIMES_KEPT` rounds of this run).
    round_times: Mutex<RoundTimes>,
}

/// Round durations kept for the summary's median.
const ROUND_TIMES_KEPT: usize = 10_000;

#[derive(Default)]
struct RoundTimes {
    last: Option<Instant>,
    seconds: std::collections::VecDeque<f64>,
}

impl RoundTimes {
    fn record(&mut self, now: Instant) {
        if let Some(last) = self.last {
            if self.seconds.len() == ROUND_TIMES_KEPT {
                self.seconds.pop_front();
            }
            self.seconds
                .push_back(now.duration_since(last).as_secs_f64());
        }
        self.last = Some(now);
    }

    fn median(&self) -> Option<f64> {
        let mut sorted: Vec<f64> = self.seconds.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        sorted.get(sorted.len() / 2).copied()
    }
}

impl Shared {
    fn fail(&self, err: anyhow::Error) {
        tracing::error!("{err:#}");
        self.failure
            .lock()
            .expect("failure lock")
            .get_or_insert(err);
        self.failed.store(true, Ordering::SeqCst);
    }
}

/// Runs a job to completion (or, in watch mode, until a stop request) and returns its summary.
pub fn run_job(spec: &JobSpec, options: &RunOptions) -> Result<Summary> {
    let start = Instant::now();
    let counter = TokenCounter::from_spec(&spec.tokens.tokenizer)?;
    let store = Arc::new(StateStore::open(
        &spec.state_path(),
        &spec.selection_fingerprint(),
    )?);
    let removed = sink::remove_uncommitted(&spec.sink.path, &store.outputs()?)?;
    for name in &removed {
        tracing::warn!(file = %name, "removed output of an epoch that never committed; it is recomputed");
    }
    let found = source::discover(&spec.source.shards)?;
    if found.is_empty() && !spec.source.watch {
        tracing::warn!(glob = %spec.source.shards, "no shard matches source.shards");
    }
    let plan = store.register_shards(&found)?;
    let clustering = if spec.cluster.enabled {
        Some(
            spec.embed
                .resolve_dim()
                .map_err(|e| anyhow::anyhow!("{e}"))?,
        )
    } else {
        None
    };
    let embedding = match (clustering, &spec.embed.column) {
        (Some(dim), Some(name)) => Some(EmbeddingColumn {
            name: name.clone(),
            dim,
        }),
        _ => None,
    };
    let order = CommitOrder::default();
    order.add(plan.iter().map(|p| p.epoch));
    let summary = Summary {
        job: spec.name.clone(),
        workers: options.workers,
        shards_found: found.len() as u64,
        shards_already_done: (found.len() - plan.len()) as u64,
        removed_uncommitted: removed,
        ..Default::default()
    };
    let shared = Arc::new(Shared {
        spec: spec.clone(),
        store,
        counter,
        summary: Mutex::new(summary),
        failure: Mutex::new(None),
        failed: AtomicBool::new(false),
        progress: Progress::new(plan.len() as u64),
        hooks: Hooks::from_env(),
        clustering,
        embedding,
        order,
        embed_cost: Mutex::new((0.0, 0)),
        score_tally: Arc::new(Mutex::new(ScoreTally::default())),
        ingest_done: Mutex::new(None),
        round_times: Mutex::new(RoundTimes::default()),
    });
    let watch = spec.source.watch && !options.once;
    let config = timely::Config::process(options.workers.max(1));
    let worker_shared = shared.clone();
    let guards = timely::execute(config, move |worker| {
        run_worker(worker, &worker_shared, plan.clone(), watch)
    })
    .map_err(|e| anyhow::anyhow!("starting timely workers: {e}"))?;
    for result in guards.join() {
        result.map_err(|e| anyhow::anyhow!("worker failed: {e}"))?;
    }
    shared.progress.finish();
    if let Some(err) = shared.failure.lock().expect("failure lock").take() {
        return Err(err);
    }
    let mut summary = shared.summary.lock().expect("summary lock").clone();
    if shared.clustering.is_some() {
        summary.clusters = Some(shared.store.clusters()?.len() as u64);
    }
    if spec.select.strategy != Strategy::Random {
        let costs = record_costs(&shared)?;
        summary.scored_fraction = Some(costs.pool_fraction_scored());
        summary.flops = Some(costs.total_flops());
    }
    summary.quarantined.sort();
    summary.ingest_seconds = shared
        .ingest_done
        .lock()
        .expect("ingest time")
        .map(|t| t.duration_since(start).as_secs_f64());
    summary.round_seconds_median = shared.round_times.lock().expect("round times").median();
    // The store's file is compacted when the run ends (see `StateStore::compact`); only when
    // nothing else holds it, which is the case once the workers are done.
    if let Ok(shared) = Arc::try_unwrap(shared) {
        if let Ok(mut store) = Arc::try_unwrap(shared.store) {
            let compacting = Instant::now();
            store.compact().context("compacting the state store")?;
            tracing::info!(
                seconds = compacting.elapsed().as_secs_f64(),
                "state store compacted"
            );
        }
    }
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

fn run_worker(
    worker: &mut timely::worker::Worker,
    shared: &Arc<Shared>,
    plan: Vec<PlannedShard>,
    watch: bool,
) {
    let index = worker.index();
    let quad_loop = shared.spec.select.strategy != Strategy::Random;
    let local: Rc<RefCell<HashMap<u64, LocalShard>>> = Rc::new(RefCell::new(HashMap::new()));
    let mut input = InputHandleVec::<u64, EpochDocs>::new();
    let probe = ProbeHandle::new();
    let loop_probe = ProbeHandle::new();

    // The epoch whose end forces the initial fit when fewer documents than the reservoir came:
    // the last shard of a run that is not long-lived (the same after a resume).
    let fit_epoch = if watch {
        None
    } else {
        plan.last().map(|p| p.epoch)
    };
    worker.dataflow::<u64, _, _>(|scope| {
        let docs = input.to_stream(scope);
        let verdicts = admit_operator(docs.clone(), shared);
        let clusters = if shared.clustering.is_some() {
            let embedded = embed_operator(docs, shared, &local);
            assign_operator(verdicts.clone(), embedded, shared, fit_epoch)
        } else {
            empty(verdicts.scope())
        };
        let committed = epoch_sink_operator(verdicts, clusters, shared, &local).probe_with(&probe);
        if quad_loop {
            let bandit = if index == 0 {
                load_bandit(shared).map_err(|e| shared.fail(e)).ok()
            } else {
                None
            };
            build_loop(committed, bandit, loop_context(shared, watch), &loop_probe);
        }
    });

    feed_shards(worker, shared, plan, &mut input, &probe, &local, watch);
    drop(input);
    let failed = || shared.failed.load(Ordering::SeqCst);
    // Ingest drains first (a fixed run's rounds start once it has committed), then the loop.
    while !probe.done() && !failed() {
        worker.step_or_park(Some(Duration::from_millis(1)));
    }
    if index == 0 {
        *shared.ingest_done.lock().expect("ingest time") = Some(Instant::now());
    }
    while !loop_probe.done() && !failed() {
        worker.step_or_park(Some(Duration::from_millis(1)));
    }
}

/// Sends the planned shards into the dataflow, each epoch read by its owner worker, with at
/// most `runtime.max_epochs_in_flight` uncommitted epochs; in watch mode, keeps the dataflow
/// (ingest and the rounds) moving and looks for new shards every `poll_seconds`, until a stop.
fn feed_shards(
    worker: &mut timely::worker::Worker,
    shared: &Arc<Shared>,
    mut plan: Vec<PlannedShard>,
    input: &mut InputHandleVec<u64, EpochDocs>,
    probe: &ProbeHandle<u64>,
    local: &Rc<RefCell<HashMap<u64, LocalShard>>>,
    watch: bool,
) {
    let index = worker.index();
    let peers = worker.peers() as u64;
    let owner = move |epoch: u64| epoch % peers;
    let in_flight = shared.spec.runtime.max_epochs_in_flight as usize;
    let mut sent: Vec<u64> = Vec::new();
    let failed = || shared.failed.load(Ordering::SeqCst);
    loop {
        for planned in plan.drain(..) {
            if failed() || STOP.load(Ordering::SeqCst) {
                break;
            }
            input.advance_to(planned.epoch);
            if owner(planned.epoch) == index as u64 {
                let docs = read_local(shared, &planned, local);
                input.send(EpochDocs {
                    epoch: planned.epoch,
                    docs,
                });
            }
            input.advance_to(planned.epoch + 1);
            sent.push(planned.epoch);
            // Backpressure: wait until the epoch `in_flight` places back has committed.
            if sent.len() > in_flight {
                let back = sent[sent.len() - 1 - in_flight];
                while probe.less_equal(&back) && !failed() {
                    worker.step_or_park(Some(Duration::from_millis(1)));
                }
            }
        }
        if !watch || STOP.load(Ordering::SeqCst) || failed() {
            break;
        }
        // Long-lived mode: keep the dataflow (ingest and the rounds) moving, then look for new
        // shards; their epochs join the same dataflow.
        let until = Instant::now() + Duration::from_secs(shared.spec.source.poll_seconds);
        while Instant::now() < until && !STOP.load(Ordering::SeqCst) && !failed() {
            worker.step_or_park(Some(Duration::from_millis(100)));
        }
        if STOP.load(Ordering::SeqCst) || failed() {
            break;
        }
        let next = input.time().to_owned();
        match source::discover(&shared.spec.source.shards)
            .and_then(|found| Ok(shared.store.register_shards(&found)?))
        {
            Ok(found) => {
                plan = found.into_iter().filter(|p| p.epoch >= next).collect();
                shared.order.add(plan.iter().map(|p| p.epoch));
                if index == 0 && !plan.is_empty() {
                    tracing::info!(new_shards = plan.len(), "found new shards");
                    shared.progress.add_total(plan.len() as u64);
                    shared.summary.lock().expect("summary lock").shards_found += plan.len() as u64;
                }
            }
            Err(e) => shared.fail(e),
        }
    }
}

/// Decides each epoch on worker 0, strictly in epoch order once no more of its documents can
/// come: duplicates (ids seen in an earlier position) and, for `random`, the selection.
fn admit_operator<'scope>(
    docs: StreamVec<'scope, u64, EpochDocs>,
    shared: &Arc<Shared>,
) -> StreamVec<'scope, u64, Verdicts> {
    let admit_shared = shared.clone();
    docs.unary_frontier::<CapacityContainerBuilder<Vec<Verdicts>>, _, _, _>(
            Exchange::new(|_: &EpochDocs| 0),
            "Admit",
            move |_capability, _info| {
                let mut admitter = match Admitter::new(
                    admit_shared.spec.seed,
                    admit_shared.spec.select.clone(),
                    admit_shared.store.clone(),
                    (admit_shared.spec.runtime.dedup_filter_mib << 20) as usize,
                ) {
                    Ok(admitter) => Some(admitter),
                    Err(e) => {
                        admit_shared.fail(e.into());
                        None
                    }
                };
                let mut stash: BTreeMap<u64, (Capability<u64>, Vec<DocMeta>)> =
                    BTreeMap::new();
                let mut decided: std::collections::BTreeSet<u64> = Default::default();
                let mut halted = false;
                move |(input, frontier), output| {
                    input.for_each_stamp(|cap, data| {
                        if let Some(cap) = cap.retain_least(output.output_index()) {
                            for container in data {
                                for epoch_docs in container.drain(..) {
                                    let entry =
                                        stash.entry(epoch_docs.epoch).or_insert_with(|| {
                                            (cap.delayed(&epoch_docs.epoch), Vec::new())
                                        });
                                    entry.1.extend(epoch_docs.docs);
                                }
                            }
                        }
                    });
                    // Decide epochs strictly in order, once no more of their documents can come.
                    while let Some((&epoch, _)) = stash.first_key_value() {
                        if frontier.less_equal(&epoch) {
                            break;
                        }
                        let (cap, mut docs) = stash.remove(&epoch).expect("first key");
                        let Some(admitter) = admitter.as_mut() else {
                            continue;
                        };
                        // After a stop request some worker may not have read an earlier
                        // epoch. Deciding later epochs without it would break shard order
                        // (dedup, budget), so they are left for the next run.
                        if STOP.load(Ordering::SeqCst) && !halted {
                            match admit_shared.store.pending_epochs() {
                                Ok(pending) => {
                                    if let Some(missing) = pending.range(..epoch).find(|e| !decided.contains(e)) {
                                        tracing::warn!("epoch {missing} was not read before the stop; epoch {epoch} and later are left for the next run");
                                        halted = true;
                                    }
                                }
                                Err(e) => admit_shared.fail(e.into()),
                            }
                        }
                        if halted {
                            continue;
                        }
                        decided.insert(epoch);
                        match admitter.admit(epoch, &mut docs) {
                            Ok(v) => output.session(&cap).give(v),
                            Err(e) => admit_shared.fail(e.into()),
                        }
                    }
                }
            },
        )
}

/// Writes and commits each epoch on the worker that read its shard (the rows are there), on a
/// writer thread, and sends the clusters' changes once the commit is done; an epoch's
/// capability is held until then, so a probe after it passes committed epochs only.
fn epoch_sink_operator<'scope>(
    verdicts: StreamVec<'scope, u64, Verdicts>,
    clusters: StreamVec<'scope, u64, EpochClusters>,
    shared: &Arc<Shared>,
    local: &Rc<RefCell<HashMap<u64, LocalShard>>>,
) -> StreamVec<'scope, u64, ClusterChange> {
    let scope = verdicts.scope();
    let peers = scope.peers() as u64;
    let owner = move |epoch: u64| epoch % peers;
    let sink_shared = shared.clone();
    let sink_local = local.clone();
    verdicts.binary_frontier::<_, CapacityContainerBuilder<Vec<ClusterChange>>, _, _, _, _>(
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
            let (writer_done, done) = std::sync::mpsc::channel::<(u64, Vec<ClusterChange>)>();
            let writer_shared = sink_shared.clone();
            std::thread::spawn(move || {
                for (epoch, shard, verdicts, clusters) in writer_jobs {
                    let changes = commit_epoch(&writer_shared, epoch, shard, verdicts, clusters)
                        .unwrap_or_else(|e| {
                            writer_shared.fail(e);
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
            let mut writing: HashMap<u64, Capability<u64>> = HashMap::new();
            let clustering = sink_shared.clustering.is_some();
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
                        sink_shared.fail(anyhow::anyhow!(
                            "internal: epoch {epoch} reached the sink without its clusters"
                        ));
                        continue;
                    }
                    match (shard, verdicts_of.remove(&epoch)) {
                        (Some(shard), Some(verdicts)) => {
                            if jobs.send((epoch, shard, verdicts, clusters)).is_err() {
                                sink_shared.fail(anyhow::anyhow!("the writer thread stopped"));
                            }
                            writing.insert(epoch, cap);
                        }
                        _ => sink_shared.fail(anyhow::anyhow!(
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

/// The Quad loop's context on this worker: the store, the scorer factory (worker 0 builds the
/// model once, at the first round that scores), and the callbacks for progress and summary.
fn loop_context(shared: &Arc<Shared>, watch: bool) -> Arc<LoopContext> {
    let spec = &shared.spec;
    let scorer_shared = shared.clone();
    let scorer: ScorerFactory = Arc::new(move || {
        let spec = &scorer_shared.spec;
        let pool = crate::quad_loop::fit_sample_texts(
            &scorer_shared.store,
            &spec.source,
            spec.influence.fit_pool_docs,
        )?;
        let scorer = crate::influence::setup::build_scorer(
            &spec.influence,
            &spec.source,
            crate::influence::setup::FitPool::Texts(pool),
            spec.seed,
        )?;
        Ok(Box::new(TalliedScorer::new(
            scorer,
            scorer_shared.score_tally.clone(),
            spec.influence.window as u64,
        )) as Box<dyn DocScorer>)
    });
    let round_shared = shared.clone();
    let on_round = Arc::new(move |outcome: &RoundOutcome| {
        let selected_tokens: u64 = outcome.selected.iter().map(|(m, _)| m.tokens).sum();
        tracing::info!(
            round = outcome.round,
            scored = outcome.scored.len(),
            selected = outcome.selected.len(),
            total_selected_tokens = outcome.selected_tokens,
            "bandit round committed"
        );
        round_shared
            .round_times
            .lock()
            .expect("round times")
            .record(Instant::now());
        let mut summary = round_shared.summary.lock().expect("summary lock");
        summary.rounds = Some(summary.rounds.unwrap_or(0) + 1);
        summary.scored += outcome.scored.len() as u64;
        summary.selected += outcome.selected.len() as u64;
        summary.selected_tokens += selected_tokens;
    });
    let file_shared = shared.clone();
    let on_file = Arc::new(move |_name: &str, _rows: usize| {
        file_shared
            .summary
            .lock()
            .expect("summary lock")
            .files_written += 1;
    });
    let fail_shared = shared.clone();
    let failed_shared = shared.clone();
    Arc::new(LoopContext {
        store: shared.store.clone(),
        seed: spec.seed,
        source: spec.source.clone(),
        sink: spec.sink.clone(),
        shards: ShardPaths::new(shared.store.clone()),
        scorer,
        watch,
        on_round,
        on_file,
        stop: &STOP,
        fail: Arc::new(move |e| fail_shared.fail(e)),
        failed: Arc::new(move || failed_shared.failed.load(Ordering::SeqCst)),
        crash_after_round: shared.hooks.crash_after_round,
    })
}

/// The bandit where the last committed round left it (or new), with every cluster's
/// aggregates as the store holds them now (epochs committed after the last round included).
fn load_bandit(shared: &Shared) -> Result<Bandit> {
    let spec = &shared.spec;
    let mut bandit = match shared.store.bandit()? {
        Some(b) => b,
        None => Bandit::new(spec.seed, spec.select.strategy, spec.bandit.clone())?,
    };
    let clusters: Vec<ClusterChange> = shared
        .store
        .clusters()?
        .into_iter()
        .map(|info| ClusterChange {
            cluster: info.cluster,
            centroid: Some((0, info.centroid)),
            docs: info.size,
            tokens: info.tokens,
            fresh: info.fresh,
        })
        .collect();
    bandit.reset_aggregates(&clusters)?;
    Ok(bandit)
}

/// Adds this run's embedding and scoring costs to the stored ones and returns the total.
fn record_costs(shared: &Shared) -> Result<Costs> {
    let spec = &shared.spec;
    let mut costs: Costs = shared
        .store
        .run_value(crate::report::COSTS_KEY)?
        .unwrap_or_default();
    let (embed_flops, embedded) = *shared.embed_cost.lock().expect("embed cost");
    let tally = shared.score_tally.lock().expect("score tally").clone();
    let mut run = Costs {
        embed_flops,
        docs_embedded: embedded,
        docs_scored: tally.docs,
        tokens_scored: tally.tokens,
        ..Default::default()
    };
    if let Some((shape, blocks)) = &tally.shape {
        let window = spec.influence.window as u64;
        let windows = tally
            .windows
            .iter()
            .flat_map(|(&len, &count)| std::iter::repeat_n(len, count as usize));
        run.score_flops =
            crate::cost::score_flops(shape, blocks, windows, spec.influence.normalise);
        // The factors are fitted once per model and data (then cached): counted at most
        // once, when no earlier run of this job counted them, with full windows (an upper
        // bound: the fit documents' lengths are not kept).
        if costs.factor_flops == 0.0
            && spec.influence.preconditioner != crate::influence::Preconditioner::Identity
        {
            let fit_docs =
                spec.influence.reference_docs.unwrap_or(0) + spec.influence.fit_pool_docs;
            run.factor_flops =
                crate::cost::factor_fit_flops(shape, blocks, std::iter::repeat_n(window, fit_docs));
        }
    }
    costs.add(&run);
    let clusters = shared.store.clusters()?;
    costs.pool_docs = clusters.iter().map(|c| c.size).sum();
    costs.pool_tokens = clusters.iter().map(|c| c.tokens).sum();
    shared
        .store
        .put_run_value(crate::report::COSTS_KEY, &costs)?;
    let mix = crate::report::update_pool_tokens_by_source(&shared.store)?;
    shared
        .store
        .put_run_value(crate::report::POOL_MIX_KEY, &mix)?;
    Ok(costs)
}

/// Embeds each epoch's documents on the worker that read the shard (its rows are there): the
/// precomputed column's vectors when the spec names one, else the sentence encoder's (one
/// encoder a worker, loaded at the first epoch that needs it).
fn embed_operator<'scope>(
    docs: StreamVec<'scope, u64, EpochDocs>,
    shared: &Arc<Shared>,
    local: &Rc<RefCell<HashMap<u64, LocalShard>>>,
) -> StreamVec<'scope, u64, EmbeddedEpoch> {
    let shared = shared.clone();
    let local = local.clone();
    docs.unary::<CapacityContainerBuilder<Vec<EmbeddedEpoch>>, _, _, _>(
        Pipeline,
        "Embed",
        move |_capability, _info| {
            let mut encoder: Option<SentenceEncoder> = None;
            move |input, output| {
                input.for_each_stamp(|cap, data| {
                    for container in data {
                        for epoch_docs in container.drain(..) {
                            let epoch = epoch_docs.epoch;
                            match embed_epoch(&shared, &local, &mut encoder, epoch_docs) {
                                Ok(embedded) => output.session(&cap).give(embedded),
                                Err(e) => {
                                    shared.fail(e.context(format!("embedding epoch {epoch}")))
                                }
                            }
                        }
                    }
                });
            }
        },
    )
}

fn embed_epoch(
    shared: &Shared,
    local: &Rc<RefCell<HashMap<u64, LocalShard>>>,
    encoder: &mut Option<SentenceEncoder>,
    epoch_docs: EpochDocs,
) -> Result<EmbeddedEpoch> {
    let spec = &shared.spec;
    let dim = shared.clustering.unwrap_or(0);
    let mut local = local.borrow_mut();
    let shard = local
        .get_mut(&epoch_docs.epoch)
        .with_context(|| format!("internal: epoch {} is not held here", epoch_docs.epoch))?;
    let Ok(data) = &mut shard.data else {
        // Quarantined: nothing to embed, but assign still sees the epoch.
        return Ok(EmbeddedEpoch {
            epoch: epoch_docs.epoch,
            ..Default::default()
        });
    };
    // The precomputed vectors leave the shard (only assign reads them): moved, not copied.
    let vectors = match data.vectors.take() {
        Some(vectors) => vectors,
        None => {
            if encoder.is_none() {
                let device = spec.embed.tch_device().map_err(|e| anyhow::anyhow!(e))?;
                let loaded =
                    SentenceEncoder::load(&spec.embed.model, device, spec.embed.max_tokens)
                        .with_context(|| {
                            format!("loading the encoder {}", spec.embed.model.display())
                        })?;
                anyhow::ensure!(
                    loaded.dim() == dim,
                    "{}: the encoder gives vectors of width {}, embed.dim says {dim}",
                    spec.embed.model.display(),
                    loaded.dim()
                );
                *encoder = Some(loaded);
            }
            let encoder = encoder.as_ref().expect("loaded above");
            let start = Instant::now();
            let texts = data.doc_texts(&spec.source.text_column);
            let vectors = encoder.encode(&texts, spec.embed.batch_size)?;
            let max = encoder.max_tokens() as u64;
            let flops = crate::cost::embed_flops(
                encoder.shape(),
                data.docs.iter().map(|d| u64::from(d.tokens).min(max)),
            );
            let mut cost = shared.embed_cost.lock().expect("embed cost");
            cost.0 += flops;
            cost.1 += texts.len() as u64;
            drop(cost);
            tracing::info!(
                shard = %shard.shard.display(),
                documents = texts.len(),
                docs_per_s = texts.len() as f64 / start.elapsed().as_secs_f64().max(1e-9),
                "embedded"
            );
            vectors.concat()
        }
    };
    Ok(EmbeddedEpoch {
        epoch: epoch_docs.epoch,
        // The same documents the read stage sent (`read_local`): this epoch's own copy.
        docs: epoch_docs.docs,
        vectors,
    })
}

/// Assigns documents to clusters on worker 0, epoch by epoch in order, once admit has decided
/// the epoch (its duplicates are not clustered) and its vectors are in.
fn assign_operator<'scope>(
    verdicts: StreamVec<'scope, u64, Verdicts>,
    embedded: StreamVec<'scope, u64, EmbeddedEpoch>,
    shared: &Arc<Shared>,
    fit_epoch: Option<u64>,
) -> StreamVec<'scope, u64, EpochClusters> {
    let shared = shared.clone();
    verdicts.binary_frontier::<_, CapacityContainerBuilder<Vec<EpochClusters>>, _, _, _, _>(
        embedded,
        Pipeline,
        Exchange::new(|_: &EmbeddedEpoch| 0),
        "Assign",
        move |_capability, _info| {
            let dim = shared.clustering.unwrap_or(0);
            let stored = shared.store.clusterer_state();
            let mut assigner = match stored
                .map_err(anyhow::Error::from)
                .and_then(|bytes| Ok(Assigner::restore(bytes.as_deref(), dim)?))
            {
                Ok(assigner) => Some(assigner),
                Err(e) => {
                    shared.fail(e);
                    None
                }
            };
            let mut decided: BTreeMap<u64, (Capability<u64>, Verdicts)> = BTreeMap::new();
            let mut vectors: BTreeMap<u64, EmbeddedEpoch> = BTreeMap::new();
            move |(verdict_input, verdict_frontier), (embedded_input, embedded_frontier), output| {
                verdict_input.for_each_stamp(|cap, data| {
                    if let Some(cap) = cap.retain_least(output.output_index()) {
                        for container in data {
                            for v in container.drain(..) {
                                decided.insert(v.epoch, (cap.delayed(&v.epoch), v));
                            }
                        }
                    }
                });
                embedded_input.for_each_stamp(|_cap, data| {
                    for container in data {
                        for e in container.drain(..) {
                            vectors.insert(e.epoch, e);
                        }
                    }
                });
                loop {
                    let next = decided.keys().next().copied();
                    let next_vectors = vectors.keys().next().copied();
                    let Some(epoch) = next.into_iter().chain(next_vectors).min() else {
                        break;
                    };
                    if verdict_frontier.less_equal(&epoch) || embedded_frontier.less_equal(&epoch) {
                        break;
                    }
                    let embedded = vectors.remove(&epoch);
                    // An epoch admit did not decide (left for the next run) is not assigned.
                    let Some((cap, verdicts)) = decided.remove(&epoch) else {
                        continue;
                    };
                    let Some(assigner) = assigner.as_mut() else {
                        continue;
                    };
                    let Some(embedded) = embedded else {
                        shared.fail(anyhow::anyhow!(
                            "internal: epoch {epoch} reached assign without its vectors"
                        ));
                        continue;
                    };
                    let duplicates: std::collections::HashSet<u64> =
                        verdicts.duplicates.iter().map(|d| d.row).collect();
                    let mut docs = Vec::with_capacity(embedded.docs.len());
                    let mut kept = Vec::with_capacity(embedded.vectors.len());
                    for (doc, vector) in embedded
                        .docs
                        .into_iter()
                        .zip(embedded.vectors.chunks(dim.max(1)))
                    {
                        if !duplicates.contains(&doc.row) {
                            docs.push(doc);
                            kept.extend_from_slice(vector);
                        }
                    }
                    let result = assigner.assign_epoch(
                        epoch,
                        &docs,
                        &kept,
                        &shared.spec.cluster,
                        shared.spec.seed,
                        fit_epoch == Some(epoch),
                    );
                    match result {
                        Ok(mut commit) => {
                            commit.seed = shared.spec.seed;
                            output.session(&cap).give(EpochClusters { epoch, commit })
                        }
                        Err(e) => shared.fail(
                            anyhow::Error::from(e).context(format!("clustering epoch {epoch}")),
                        ),
                    }
                }
            }
        },
    )
}

/// Reads a shard this worker owns and keeps it until its epoch is written.
fn read_local(
    shared: &Shared,
    planned: &PlannedShard,
    local: &Rc<RefCell<HashMap<u64, LocalShard>>>,
) -> Vec<DocMeta> {
    let data = source::read_shard(
        &planned.path,
        &shared.spec.source,
        &shared.counter,
        shared.embedding.as_ref(),
    )
    .map_err(|e| {
        tracing::warn!(shard = %planned.path.display(), "quarantined: {e}");
        e.to_string()
    });
    let docs = match &data {
        Ok(data) => {
            for reject in data.rejects.iter().take(REJECTS_LOGGED_PER_SHARD) {
                tracing::warn!(
                    "{}: row {}, column '{}': {}; row rejected",
                    planned.path.display(),
                    reject.row,
                    reject.column,
                    reject.reason
                );
            }
            if data.rejects.len() > REJECTS_LOGGED_PER_SHARD {
                tracing::warn!(
                    "{}: {} more rejected rows",
                    planned.path.display(),
                    data.rejects.len() - REJECTS_LOGGED_PER_SHARD
                );
            }
            if data.rows == 0 {
                tracing::warn!("{}: shard has no rows", planned.path.display());
            }
            data.docs.clone()
        }
        Err(_) => Vec::new(),
    };
    local.borrow_mut().insert(
        planned.epoch,
        LocalShard {
            shard: planned.path.clone(),
            data,
        },
    );
    docs
}

/// Writes an epoch's output and commits it with the epoch's state in one transaction. Returns
/// the clusters' changes for the bandit (after the commit, so a draw sees the new members).
fn commit_epoch(
    shared: &Shared,
    epoch: u64,
    shard: LocalShard,
    verdicts: Verdicts,
    clusters: Option<ClusterCommit>,
) -> Result<Vec<ClusterChange>> {
    let spec = &shared.spec;
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
                sink::write_epoch(&spec.sink.path, epoch, data, &verdicts.selected, &spec.sink)?;
            if let (Some(file), Some(crash)) = (&file, shared.hooks.crash_after_rename) {
                if crash == epoch {
                    tracing::error!(file, "test hook: crashing after rename, before commit");
                    std::process::abort();
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
            let mut rejects = data.rejects.clone();
            for dup in &verdicts.duplicates {
                let first = match dup.first_row {
                    Some(row) => format!("epoch {} row {row}", dup.first_epoch),
                    None => format!("epoch {}", dup.first_epoch),
                };
                tracing::warn!(
                    "{}: row {}, column '{}': duplicate id {:?} (first at {first}); row rejected",
                    shard_name,
                    dup.row,
                    spec.source.id_column,
                    dup.id
                );
                rejects.push(source::Reject {
                    row: dup.row,
                    column: spec.source.id_column.clone(),
                    reason: format!("duplicate id {:?}", dup.id),
                });
            }
            if spec.select.strategy != Strategy::Random {
                fit_sample = fit_sample_candidates(
                    spec.seed,
                    data,
                    &duplicate_rows,
                    spec.influence.fit_pool_docs,
                );
            }
            let record = EpochRecord {
                tokens_by_source: tokens_by_source(data, &duplicate_rows),
                shard: shard_name.clone(),
                quarantined: None,
                rows: data.rows,
                docs: accepted.len() as u64,
                rejected: data.rejects.len() as u64,
                duplicates: verdicts.duplicates.len() as u64,
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
    if let Some(delay) = shared.hooks.delay {
        std::thread::sleep(delay);
    }
    if shared.clustering.is_some() && !shared.order.wait_turn(epoch, &shared.failed) {
        return Ok(Vec::new()); // the job failed elsewhere; this epoch stays uncommitted
    }
    let clustered = clusters.as_ref().map_or(0, |c| c.members.len() as u64);
    let changes = clusters
        .as_ref()
        .map(|c| cluster_changes(epoch, c))
        .unwrap_or_default();
    let result = shared.store.commit_epoch(&EpochCommit {
        epoch,
        record: record.clone(),
        accepted,
        rejects,
        clusters,
        fit_sample,
        fit_sample_size: shared.spec.influence.fit_pool_docs,
    });
    shared.order.done(epoch);
    result.with_context(|| format!("committing epoch {epoch}"))?;
    let mut summary = shared.summary.lock().expect("summary lock");
    match &record.quarantined {
        Some(reason) => {
            summary.shards_quarantined += 1;
            summary
                .quarantined
                .push((shard_name.clone(), reason.clone()));
        }
        None => summary.shards_done += 1,
    }
    summary.rows_read += record.rows;
    summary.documents += record.docs;
    summary.rejected += record.rejected;
    summary.duplicates += record.duplicates;
    summary.selected += record.selected;
    summary.tokens += record.tokens;
    summary.selected_tokens += record.selected_tokens;
    summary.files_written += u64::from(record.file.is_some());
    summary.clustered += clustered;
    drop(summary);
    shared
        .progress
        .epoch_done(epoch, &shard_name, record.docs, record.selected);
    Ok(changes)
}

/// What an epoch's clustering commit changes per cluster, for the bandit: members joined
/// (counts and tokens) and the moved centroids.
fn cluster_changes(epoch: u64, commit: &ClusterCommit) -> Vec<ClusterChange> {
    let mut changes: BTreeMap<u32, ClusterChange> = commit
        .clusters
        .iter()
        .map(|info| {
            let change = ClusterChange {
                cluster: info.cluster,
                centroid: Some((epoch, info.centroid.clone())),
                docs: 0,
                tokens: 0,
                fresh: 0,
            };
            (info.cluster, change)
        })
        .collect();
    for m in &commit.members {
        let change = changes.entry(m.cluster).or_insert_with(|| ClusterChange {
            cluster: m.cluster,
            centroid: None,
            docs: 0,
            tokens: 0,
            fresh: 0,
        });
        change.docs += 1;
        change.tokens += u64::from(m.tokens);
        change.fresh += u64::from(m.flags == 0);
    }
    changes.into_values().collect()
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
    let Some(sources) = data.doc_strings(crate::quad_loop::SOURCE_COLUMN) else {
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

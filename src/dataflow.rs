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
//!
//! Each operator lives in its stage (`source::operator` the read, `select::operator` admit,
//! `embed::operator`, `cluster::operator` assign, `sink::epoch_sink`) and takes its own
//! context, which `dataflow/ingest.rs` builds from the job; `dataflow/quad_loop.rs` wires the
//! Quad loop's operators, `dataflow/rounds.rs` builds their contexts. This module runs the
//! workers, feeds them the shards and wires the operators.
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use timely::dataflow::operators::generic::operator::empty;
use timely::dataflow::operators::{Concat, Probe};
use timely::dataflow::{InputHandleVec, ProbeHandle};

use crate::bandit::aggregates::{cluster_aggregates, stored_shares};
use crate::cluster::operator::assign_operator;
use crate::config::{JobSpec, Strategy};
use crate::embed::operator::embed_operator;
use crate::error::{Fail, Failed};
use crate::influence::operator::ScoreTally;
use crate::progress::{Durations, Progress, Summary};
use crate::select::operator::admit_operator;
use crate::sink;
use crate::sink::epoch_sink::{epoch_sink_operator, CommitOrder};
use crate::source::operator::{read_local, EpochDocs, LocalShards, TextFeatures};
use crate::source::{self, EmbeddingColumn};
use crate::state::{PlannedShard, StateStore};
use crate::tokens::TokenCounter;

mod ingest;
mod monitor;
pub mod processes;
mod quad_loop;
mod rounds;

use processes::{Identity, Processes};
use quad_loop::build_loop;
use rounds::{load_bandit, loop_context, record_costs};

#[derive(Debug, Clone)]
pub struct RunOptions {
    pub workers: usize,
    /// Process each found shard once even if the spec says `watch`.
    pub once: bool,
    /// This process's place among several (`-n`, `-p`, `--hostfile`); None: one process.
    pub processes: Option<Processes>,
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
    /// The spec as this process runs it (`JobSpec::for_process`).
    spec: JobSpec,
    place: ProcessPlace,
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
    /// The `dsir` strategy's weights (fitted once per job, kept in the store).
    dsir: Option<crate::dsir::DsirWeights>,
    order: Arc<CommitOrder>,
    /// Encoder FLOPs and documents embedded in this run.
    embed_cost: Arc<Mutex<(f64, u64)>>,
    /// What the influence operator scored in this run.
    score_tally: Arc<Mutex<ScoreTally>>,
    /// When ingest had committed everything (set by worker 0).
    ingest_done: Mutex<Option<Instant>>,
    /// The last epoch of the shards this run found: the same on every process (the plans
    /// differ after a restart, each leaving out what its store committed).
    last_epoch: Option<u64>,
    /// Wall time between round commits (the last `ROUND_TIMES_KEPT` rounds of this run).
    round_times: Mutex<RoundTimes>,
    /// Prometheus metrics (served when `runtime.metrics_addr` is set).
    metrics: Arc<crate::metrics::Metrics>,
    /// The status file `quad status` reads while the job runs.
    status: crate::status::Publisher,
}

/// Time between consecutive round commits.
#[derive(Default)]
struct RoundTimes {
    last: Option<Instant>,
    between: Durations,
}

impl RoundTimes {
    fn record(&mut self, now: Instant) {
        if let Some(last) = self.last {
            self.between.push(now.duration_since(last).as_secs_f64());
        }
        self.last = Some(now);
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

/// `Shared::fail` as the stages' operators take it.
fn fail_handle(shared: &Arc<Shared>) -> Fail {
    let shared = shared.clone();
    Arc::new(move |e| shared.fail(e))
}

/// Whether the job failed, as the stages' operators take it.
fn failed_handle(shared: &Arc<Shared>) -> Failed {
    let shared = shared.clone();
    Arc::new(move || shared.failed.load(Ordering::SeqCst))
}

/// Runs a job to completion (or, in watch mode, until a stop request) and returns its summary
/// (of this process, when the job runs on several).
pub fn run_job(spec: &JobSpec, options: &RunOptions) -> Result<Summary> {
    let start = Instant::now();
    let place = ProcessPlace::of(options);
    // Every process must run the spec as written; each then runs its own paths.
    let identity = Identity::new(place.index, place.count, &spec.selection_fingerprint());
    let spec = spec.for_process(place.index, place.count);
    if let Some(p) = &options.processes {
        crate::model::set_local_process(p.local_index());
        crate::model::share_cpu_threads(p.local_count());
        processes::note_lost_peers();
    }
    let deadline = options
        .processes
        .as_ref()
        .map(|p| start + p.connect_timeout);
    let process: Arc<ProcessStart> = Arc::default();
    let config = processes::timely_config(place.workers, options.processes.as_ref());
    let (worker_process, worker_spec, worker_options) =
        (process.clone(), spec.clone(), options.clone());
    let guards = processes::execute_within(config, options.processes.as_ref(), move |worker| {
        if let Some(deadline) = deadline {
            processes::agree(worker, &identity, deadline)?;
        }
        // The first worker of the process to get here prepares it (store, shards, metrics);
        // the others wait for it and share what it made.
        let started = worker_process.start(&worker_spec, &worker_options)?;
        run_worker(worker, &started.shared, started.plan.clone(), started.watch);
        Ok::<(), String>(())
    })?;
    let mut refused = None;
    // Timely joins its communication threads as the guards go, and panics when one failed
    // (a peer's connection dropped): that becomes the error naming the peer.
    let joined = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| guards.join())).map_err(
        |panic| {
            let what = processes::panic_text(panic.as_ref());
            processes::worker_failure(options.processes.as_ref(), what)
        },
    )?;
    for result in joined {
        match result {
            Err(e) => return Err(processes::worker_failure(options.processes.as_ref(), e)),
            Ok(Err(e)) => refused = refused.or(Some(e)),
            Ok(Ok(())) => {}
        }
    }
    let process = Arc::try_unwrap(process)
        .map_err(|_| anyhow::anyhow!("internal: a worker still holds the process's state"))?;
    // The error that stopped the process's start, as it was (its type sets the exit code).
    if let Some(e) = process.error.into_inner().expect("start error") {
        return Err(e);
    }
    if let Some(e) = refused {
        anyhow::bail!(e);
    }
    let started = process
        .started
        .into_inner()
        .flatten()
        .context("internal: the workers ended without starting the job")?;
    finish_job(started, start)
}

/// What the first worker of a process to need it starts (`start_process`), shared by the
/// process's workers; or the error that stopped it.
#[derive(Default)]
struct ProcessStart {
    started: OnceLock<Option<Started>>,
    error: Mutex<Option<anyhow::Error>>,
}

impl ProcessStart {
    /// The process's start, made by the first worker to ask (the others wait for it).
    fn start(&self, spec: &JobSpec, options: &RunOptions) -> Result<&Started, String> {
        self.started
            .get_or_init(|| match start_process(spec, options) {
                Ok(started) => Some(started),
                Err(e) => {
                    *self.error.lock().expect("start error") = Some(e);
                    None
                }
            })
            .as_ref()
            .ok_or_else(|| "the process did not start".to_owned())
    }
}

/// This process's place: its index, how many processes, and its worker threads.
#[derive(Debug, Clone, Copy)]
struct ProcessPlace {
    index: usize,
    count: usize,
    workers: usize,
}

impl ProcessPlace {
    fn of(options: &RunOptions) -> ProcessPlace {
        let (index, count) = options
            .processes
            .as_ref()
            .map_or((0, 1), |p| (p.index, p.count()));
        ProcessPlace {
            index,
            count,
            workers: options.workers.max(1),
        }
    }

    /// The first worker of this process: it does what the process does once.
    fn first_local(&self, worker: usize) -> bool {
        worker == self.index * self.workers
    }

    /// Whether this process's workers own `epoch` (worker `epoch % peers` does; timely numbers
    /// the workers of process i from i * workers).
    fn owns(&self, epoch: u64) -> bool {
        let peers = (self.workers * self.count) as u64;
        (epoch % peers) / self.workers as u64 == self.index as u64
    }
}

/// What a process of the job prepared before its workers build the dataflow.
struct Started {
    shared: Arc<Shared>,
    plan: Vec<PlannedShard>,
    watch: bool,
    metrics_server: Option<crate::metrics::MetricsServer>,
}

/// Opens the store, removes the outputs of uncommitted epochs, plans the shards and builds the
/// state the process's workers share.
fn start_process(spec: &JobSpec, options: &RunOptions) -> Result<Started> {
    let place = ProcessPlace::of(options);
    let counter = TokenCounter::from_spec(&spec.tokens.tokenizer)?;
    let store = Arc::new(StateStore::open(
        &spec.state_path(),
        &spec.selection_fingerprint(),
    )?);
    processes::check_layout(spec, &store, place.count, place.workers)?;
    let removed = sink::remove_uncommitted(&spec.sink.path, &store.outputs()?)?;
    for name in &removed {
        tracing::warn!(file = %name, "removed output of an epoch that never committed; it is recomputed");
    }
    let found = source::discover(&spec.source.shards)?;
    if found.is_empty() && !spec.source.watch {
        tracing::warn!(glob = %spec.source.shards, "no shard matches source.shards");
    }
    let plan = store.register_shards(&found)?;
    // The last epoch of the shards found: every process's, whatever its store committed.
    let found_paths: std::collections::HashSet<&std::path::PathBuf> = found.iter().collect();
    let last_epoch = store
        .shard_paths()?
        .into_iter()
        .filter(|(_, path)| found_paths.contains(path))
        .map(|(epoch, _)| epoch)
        .max();
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
    let dsir = if spec.select.strategy == Strategy::Dsir {
        Some(ingest::dsir_weights(spec, &store, &found)?)
    } else {
        None
    };
    let order = Arc::new(CommitOrder::default());
    order.add(plan.iter().map(|p| p.epoch).filter(|&e| place.owns(e)));
    let metrics = Arc::new(crate::metrics::Metrics::new(&spec.name, place.index)?);
    metrics.shards_found.inc_by(found.len() as u64);
    if clustering.is_some() {
        metrics.clusters_seen(store.clusters()?.iter().map(|c| c.cluster));
    }
    let status = crate::status::Publisher::new(spec, &store, found.len() as u64)?;
    let summary = Summary {
        job: spec.name.clone(),
        workers: place.workers,
        processes: place.count,
        process: place.index,
        shards_found: found.len() as u64,
        shards_already_done: (found.len() - plan.len()) as u64,
        removed_uncommitted: removed,
        ..Default::default()
    };
    let shared = Arc::new(Shared {
        spec: spec.clone(),
        place,
        store,
        counter,
        summary: Mutex::new(summary),
        failure: Mutex::new(None),
        failed: AtomicBool::new(false),
        progress: Progress::new(plan.iter().filter(|p| place.owns(p.epoch)).count() as u64),
        hooks: Hooks::from_env(),
        clustering,
        embedding,
        dsir,
        order,
        embed_cost: Arc::new(Mutex::new((0.0, 0))),
        score_tally: Arc::new(Mutex::new(ScoreTally::default())),
        ingest_done: Mutex::new(None),
        last_epoch,
        round_times: Mutex::new(RoundTimes::default()),
        metrics,
        status,
    });
    monitor::publish_status(&shared, true);
    let metrics_server = match &spec.runtime.metrics_addr {
        Some(addr) => Some(crate::metrics::serve(
            addr,
            shared.metrics.clone(),
            monitor::refresh(Arc::downgrade(&shared)),
        )?),
        None => None,
    };
    Ok(Started {
        shared,
        plan,
        watch: spec.source.watch && !options.once,
        metrics_server,
    })
}

/// After the workers: the run's failure, or its summary (costs recorded, store compacted).
fn finish_job(started: Started, start: Instant) -> Result<Summary> {
    let Started {
        shared,
        metrics_server,
        ..
    } = started;
    let spec = &shared.spec;
    shared.progress.finish();
    drop(metrics_server);
    monitor::publish_status(&shared, false);
    if let Some(err) = shared.failure.lock().expect("failure lock").take() {
        return Err(err);
    }
    let mut summary = shared.summary.lock().expect("summary lock").clone();
    if shared.clustering.is_some() {
        summary.clusters = Some(shared.store.clusters()?.len() as u64);
    }
    if spec.select.strategy.runs_bandit() {
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
    summary.round_seconds_median = shared
        .round_times
        .lock()
        .expect("round times")
        .between
        .median();
    summary.score_seconds_median = shared
        .score_tally
        .lock()
        .expect("score tally")
        .seconds
        .median();
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
    let quad_loop = shared.spec.select.strategy.runs_bandit();
    let local: LocalShards = Rc::new(RefCell::new(HashMap::new()));
    let mut input = InputHandleVec::<u64, EpochDocs>::new();
    let probe = ProbeHandle::new();
    let loop_probe = ProbeHandle::new();

    // The epoch whose end forces the initial fit when fewer documents than the reservoir came:
    // the last shard of a run that is not long-lived (the same after a resume).
    let fit_epoch = if watch { None } else { shared.last_epoch };
    worker.dataflow::<u64, _, _>(|scope| {
        let docs = input.to_stream(scope);
        let verdicts = admit_operator(docs.clone(), ingest::admit_context(shared));
        let clusters = if shared.clustering.is_some() {
            let embedded = embed_operator(docs, ingest::embed_context(shared), &local);
            assign_operator(
                verdicts.clone(),
                embedded,
                ingest::assign_context(shared, fit_epoch),
            )
        } else {
            empty(verdicts.scope())
        };
        let sink = ingest::epoch_sink_context(shared);
        let committed = epoch_sink_operator(verdicts, clusters, sink, &local).probe_with(&probe);
        if quad_loop {
            // A resumed run's aggregates start from every store's share of the clusters.
            let shares = if shared.place.first_local(index) {
                shared.store.held_changes().unwrap_or_else(|e| {
                    shared.fail(e.into());
                    Vec::new()
                })
            } else {
                Vec::new()
            };
            let changes = cluster_aggregates(committed.concat(stored_shares(scope, shares)));
            let bandit = if index == 0 {
                load_bandit(shared).map_err(|e| shared.fail(e)).ok()
            } else {
                None
            };
            let ctx = loop_context(shared, watch, shared.place.first_local(index));
            build_loop(changes, bandit, ctx, &loop_probe);
        }
    });

    feed_shards(worker, shared, plan, &mut input, &probe, &local, watch);
    drop(input);
    let failed = || shared.failed.load(Ordering::SeqCst);
    // Ingest drains first (a fixed run's rounds start once it has committed), then the loop.
    while !probe.done() && !failed() {
        worker.step_or_park(Some(Duration::from_millis(1)));
    }
    if shared.place.first_local(index) {
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
    local: &LocalShards,
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
                let docs = read_local(
                    planned.epoch,
                    &planned.path,
                    &shared.spec.source,
                    TextFeatures {
                        dedup: &shared.spec.dedup,
                        dsir: shared.dsir.as_ref(),
                    },
                    &shared.counter,
                    shared.embedding.as_ref(),
                    local,
                );
                input.send(EpochDocs {
                    epoch: planned.epoch,
                    docs,
                });
                shared.metrics.epochs_in_flight.inc();
            }
            input.advance_to(planned.epoch + 1);
            sent.push(planned.epoch);
            // Lets the stages after the read (admit, sink) take what has arrived between two
            // reads, rather than only once `in_flight` epochs wait.
            worker.step();
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
                shared.order.add(
                    plan.iter()
                        .map(|p| p.epoch)
                        .filter(|&e| shared.place.owns(e)),
                );
                if shared.place.first_local(index) && !plan.is_empty() {
                    tracing::info!(new_shards = plan.len(), "found new shards");
                    let owned = plan.iter().filter(|p| shared.place.owns(p.epoch)).count();
                    shared.progress.add_total(owned as u64);
                    shared.summary.lock().expect("summary lock").shards_found += plan.len() as u64;
                    shared.metrics.shards_found.inc_by(plan.len() as u64);
                }
            }
            Err(e) => shared.fail(e),
        }
    }
}

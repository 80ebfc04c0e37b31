//! The timely dataflow of a job.
//!
//!   shards ─▶ read (owner worker) ─▶ admit (worker 0: dedup + select, in epoch order)
//!                                        ─▶ sink (owner worker: Parquet + state commit)
//!
//! Timestamps are epochs; epoch e is one shard, read and written by worker `e % peers`, which
//! keeps the shard's rows in memory between the two. Only document metadata crosses workers.
//! The admit and sink operators stash by capability and act when the frontier passes an epoch,
//! so their decisions do not depend on how many workers there are.
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
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::{Capability, Probe};
use timely::dataflow::{InputHandleVec, ProbeHandle};

use crate::config::JobSpec;
use crate::progress::{Progress, Summary};
use crate::select::{Admitter, Verdicts};
use crate::sink;
use crate::source::{self, DocMeta, ShardData};
use crate::state::{EpochCommit, EpochRecord, PlannedShard, StateStore};
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
}

impl Hooks {
    fn from_env() -> Hooks {
        let var = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
        Hooks {
            delay: var("QUAD_TEST_EPOCH_DELAY_MS").map(Duration::from_millis),
            crash_after_rename: var("QUAD_TEST_CRASH_AFTER_RENAME"),
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
    summary.quarantined.sort();
    summary.seconds = start.elapsed().as_secs_f64();
    Ok(summary)
}

fn run_worker(
    worker: &mut timely::worker::Worker,
    shared: &Arc<Shared>,
    mut plan: Vec<PlannedShard>,
    watch: bool,
) {
    let index = worker.index();
    let peers = worker.peers() as u64;
    let owner = move |epoch: u64| epoch % peers;
    let local: Rc<RefCell<HashMap<u64, LocalShard>>> = Rc::new(RefCell::new(HashMap::new()));
    let mut input = InputHandleVec::<u64, EpochDocs>::new();
    let probe = ProbeHandle::new();

    worker.dataflow::<u64, _, _>(|scope| {
        let admit_shared = shared.clone();
        let verdicts = input
            .to_stream(scope)
            .unary_frontier::<CapacityContainerBuilder<Vec<Verdicts>>, _, _, _>(
                Exchange::new(|_: &EpochDocs| 0),
                "Admit",
                move |_capability, _info| {
                    let mut admitter = match Admitter::new(
                        admit_shared.spec.seed,
                        admit_shared.spec.select.clone(),
                        admit_shared.store.clone(),
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
            );
        let sink_shared = shared.clone();
        let sink_local = local.clone();
        verdicts
            .unary_frontier::<CapacityContainerBuilder<Vec<u64>>, _, _, _>(
                Exchange::new(move |v: &Verdicts| owner(v.epoch)),
                "Sink",
                move |_capability, info| {
                    // Compression, fsync and the store commit run on a writer thread, so the
                    // worker reads the next shard meanwhile. An epoch's capability is held until
                    // its commit is done, so the probe only passes committed epochs.
                    let (jobs, writer_jobs) =
                        std::sync::mpsc::channel::<(u64, LocalShard, Verdicts)>();
                    let (writer_done, done) = std::sync::mpsc::channel::<u64>();
                    let writer_shared = sink_shared.clone();
                    std::thread::spawn(move || {
                        for (epoch, shard, verdicts) in writer_jobs {
                            if let Err(e) = commit_epoch(&writer_shared, epoch, shard, verdicts) {
                                writer_shared.fail(e);
                            }
                            if writer_done.send(epoch).is_err() {
                                break;
                            }
                        }
                    });
                    let activator = scope.activator_for(info.address);
                    let mut stash: BTreeMap<u64, Capability<u64>> = BTreeMap::new();
                    let mut verdicts_of: HashMap<u64, Verdicts> = HashMap::new();
                    let mut writing: HashMap<u64, Capability<u64>> = HashMap::new();
                    move |(input, frontier), output| {
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
                        while let Some((&epoch, _)) = stash.first_key_value() {
                            if frontier.less_equal(&epoch) {
                                break;
                            }
                            let cap = stash.remove(&epoch).expect("first key");
                            let shard = sink_local.borrow_mut().remove(&epoch);
                            match (shard, verdicts_of.remove(&epoch)) {
                                (Some(shard), Some(verdicts)) => {
                                    if jobs.send((epoch, shard, verdicts)).is_err() {
                                        sink_shared
                                            .fail(anyhow::anyhow!("the writer thread stopped"));
                                    }
                                    writing.insert(epoch, cap);
                                }
                                _ => sink_shared.fail(anyhow::anyhow!(
                                    "internal: epoch {epoch} reached the sink without its shard"
                                )),
                            }
                        }
                        for epoch in done.try_iter() {
                            if let Some(cap) = writing.remove(&epoch) {
                                output.session(&cap).give(epoch);
                            }
                        }
                        if !writing.is_empty() {
                            // Look again shortly for commits the writer finished.
                            activator.activate_after(Duration::from_millis(1));
                        }
                    }
                },
            )
            .probe_with(&probe);
    });

    let in_flight = shared.spec.runtime.max_epochs_in_flight as usize;
    let mut sent: Vec<u64> = Vec::new();
    loop {
        for planned in plan.drain(..) {
            if shared.failed.load(Ordering::SeqCst) {
                return;
            }
            if STOP.load(Ordering::SeqCst) {
                break;
            }
            input.advance_to(planned.epoch);
            if owner(planned.epoch) == index as u64 {
                let docs = read_local(shared, &planned, &local);
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
                while probe.less_equal(&back) && !shared.failed.load(Ordering::SeqCst) {
                    worker.step_or_park(Some(Duration::from_millis(1)));
                }
            }
        }
        if !watch || STOP.load(Ordering::SeqCst) {
            break;
        }
        // Long-lived mode: wait, keep the dataflow moving, then look for new shards.
        let until = Instant::now() + Duration::from_secs(shared.spec.source.poll_seconds);
        while Instant::now() < until
            && !STOP.load(Ordering::SeqCst)
            && !shared.failed.load(Ordering::SeqCst)
        {
            worker.step_or_park(Some(Duration::from_millis(100)));
        }
        if STOP.load(Ordering::SeqCst) || shared.failed.load(Ordering::SeqCst) {
            break;
        }
        let next = input.time().to_owned();
        match source::discover(&shared.spec.source.shards)
            .and_then(|found| Ok(shared.store.register_shards(&found)?))
        {
            Ok(found) => {
                plan = found.into_iter().filter(|p| p.epoch >= next).collect();
                if index == 0 && !plan.is_empty() {
                    tracing::info!(new_shards = plan.len(), "found new shards");
                    shared.progress.add_total(plan.len() as u64);
                    shared.summary.lock().expect("summary lock").shards_found += plan.len() as u64;
                }
            }
            Err(e) => shared.fail(e),
        }
    }
    drop(input);
    while !probe.done() && !shared.failed.load(Ordering::SeqCst) {
        worker.step_or_park(Some(Duration::from_millis(1)));
    }
}

/// Reads a shard this worker owns and keeps it until its epoch is written.
fn read_local(
    shared: &Shared,
    planned: &PlannedShard,
    local: &Rc<RefCell<HashMap<u64, LocalShard>>>,
) -> Vec<DocMeta> {
    let data =
        source::read_shard(&planned.path, &shared.spec.source, &shared.counter).map_err(|e| {
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

/// Writes an epoch's output and commits it with the epoch's state in one transaction.
fn commit_epoch(shared: &Shared, epoch: u64, shard: LocalShard, verdicts: Verdicts) -> Result<()> {
    let spec = &shared.spec;
    let shard_name = shard.shard.to_string_lossy().to_string();
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
                tracing::warn!("{}: row {}, column '{}': duplicate id {:?} (first at epoch {} row {}); row rejected", shard_name, dup.row, spec.source.id_column, dup.id, dup.first_epoch, dup.first_row);
                rejects.push(source::Reject {
                    row: dup.row,
                    column: spec.source.id_column.clone(),
                    reason: format!("duplicate id {:?}", dup.id),
                });
            }
            let record = EpochRecord {
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
    shared
        .store
        .commit_epoch(&EpochCommit {
            epoch,
            record: record.clone(),
            accepted,
            rejects,
        })
        .with_context(|| format!("committing epoch {epoch}"))?;
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
    drop(summary);
    shared
        .progress
        .epoch_done(epoch, &shard_name, record.docs, record.selected);
    Ok(())
}

//! `quad status JOB`: where a job stands, while it runs or after.
//!
//! The running job holds its redb store with an exclusive file lock (redb's default
//! `ExclusiveWriter` mode), so another process can open it, even read-only, only when no job
//! runs. So the job publishes its status: `status.json` beside the store, replaced atomically
//! (written to a temporary file, then renamed) after each epoch and round commit and when it
//! stops. `quad status` reads that file while the job that wrote it is alive, and the store
//! itself otherwise (then the figures are exactly what is committed).
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::config::JobSpec;
use crate::progress::Summary;
use crate::state::StateStore;

/// Where a job stands, over its whole life (every run of it).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobStatus {
    pub job: String,
    /// Whether a job was running when this was read (its process id then).
    pub running: bool,
    pub pid: Option<u32>,
    /// "status file" (published by the running job) or "state store".
    pub source: String,
    pub shards_done: u64,
    pub shards_quarantined: u64,
    /// Shards found and not yet committed.
    pub shards_waiting: u64,
    pub rows_read: u64,
    pub documents: u64,
    pub rejected: u64,
    pub duplicates: u64,
    /// Tokens of the accepted documents (the pool).
    pub tokens: u64,
    pub clusters: Option<u64>,
    pub rounds: Option<u64>,
    pub selected_documents: u64,
    pub selected_tokens: u64,
    /// The selection's token budget when the job has one (bandit budget, select.max_tokens).
    pub budget_tokens: Option<u64>,
    /// Unix seconds of the last commit (the store file's modification time when read from
    /// the store).
    pub last_commit_unix: Option<u64>,
    /// (shard, reason) of every quarantined shard.
    pub quarantined: Vec<(String, String)>,
}

/// The status file of a job whose store is at `state_path`: `status.json` beside it, or
/// `status.p<I>.json` beside process I's store `<name>.p<I>.redb` (`JobSpec::for_process`).
pub fn status_path(state_path: &Path) -> PathBuf {
    let stem = state_path.file_stem().unwrap_or_default().to_string_lossy();
    let process = stem
        .rsplit_once(".p")
        .filter(|(_, i)| !i.is_empty() && i.bytes().all(|b| b.is_ascii_digit()));
    match process {
        Some((_, index)) => state_path.with_file_name(format!("status.p{index}.json")),
        None => state_path.with_file_name("status.json"),
    }
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The token budget of the job's selection for a pool of `pool_tokens`.
fn budget_tokens(spec: &JobSpec, pool_tokens: u64) -> Option<u64> {
    use crate::bandit::Budget;
    match spec.select.strategy {
        s if !s.runs_bandit() => spec.select.max_tokens,
        _ => Some(match spec.bandit.budget {
            Budget::Tokens(t) => t,
            Budget::Ratio(r) => (r * pool_tokens as f64).floor() as u64,
        }),
    }
}

/// What the store holds besides its epochs' counts (those are summed into a `Summary`).
#[derive(Debug, Clone, Default)]
struct StoreExtras {
    shards_waiting: u64,
    clusters: Option<u64>,
    rounds: Option<u64>,
    /// Selected by the bandit's rounds (the epochs' counts hold ingest's selection).
    round_documents: u64,
    round_tokens: u64,
}

/// The store's epochs summed, and the rest of what the status shows.
fn read_store(spec: &JobSpec, store: &StateStore) -> Result<(Summary, StoreExtras)> {
    let mut epochs = Summary::default();
    for record in store.epochs()?.values() {
        epochs.add_epoch(record);
    }
    let mut extras = StoreExtras {
        shards_waiting: store.pending_epochs()?.len() as u64,
        ..Default::default()
    };
    if spec.cluster.enabled {
        extras.clusters = Some(store.clusters()?.len() as u64);
    }
    if spec.select.strategy.runs_bandit() {
        let bandit = store.bandit()?;
        extras.rounds = Some(bandit.as_ref().map_or(0, |b| b.next_round()));
        if let Some(bandit) = bandit {
            extras.round_documents = bandit.selected_docs();
            extras.round_tokens = bandit.selected_tokens();
        }
    }
    Ok((epochs, extras))
}

/// The status of a job whose store held `stored` and `extras`, after `run` (this run so far;
/// None when no job runs). `found_since`: shards found by the run after it started.
fn compose(
    spec: &JobSpec,
    (stored, extras): (&Summary, &StoreExtras),
    run: Option<&Summary>,
    found_since: u64,
) -> JobStatus {
    let add = |f: fn(&Summary) -> u64| f(stored) + run.map_or(0, f);
    let committed = run.map_or(0, |r| r.shards_done + r.shards_quarantined);
    let mut quarantined = stored.quarantined.clone();
    quarantined.extend(run.into_iter().flat_map(|r| r.quarantined.iter().cloned()));
    let tokens = add(|s| s.tokens);
    let run_rounds = run.and_then(|r| r.rounds);
    JobStatus {
        job: spec.name.clone(),
        running: run.is_some(),
        pid: run.map(|_| std::process::id()),
        source: if run.is_some() {
            "status file"
        } else {
            "state store"
        }
        .into(),
        shards_done: add(|s| s.shards_done),
        shards_quarantined: add(|s| s.shards_quarantined),
        shards_waiting: (extras.shards_waiting + found_since).saturating_sub(committed),
        rows_read: add(|s| s.rows_read),
        documents: add(|s| s.documents),
        rejected: add(|s| s.rejected),
        duplicates: add(|s| s.duplicates),
        tokens,
        clusters: extras.clusters,
        rounds: extras
            .rounds
            .map(|r| r + run_rounds.unwrap_or(0))
            .or(run_rounds),
        selected_documents: add(|s| s.selected) + extras.round_documents,
        selected_tokens: add(|s| s.selected_tokens) + extras.round_tokens,
        budget_tokens: budget_tokens(spec, tokens),
        last_commit_unix: run.map(|_| unix_now()),
        quarantined,
    }
}

/// The status as the store holds it (committed epochs and rounds).
pub fn from_store(spec: &JobSpec, store: &StateStore) -> Result<JobStatus> {
    let (epochs, extras) = read_store(spec, store)?;
    Ok(compose(spec, (&epochs, &extras), None, 0))
}

/// The running job's status: what the store held when it started plus what this run did.
pub struct Publisher {
    path: PathBuf,
    spec: JobSpec,
    stored: Summary,
    extras: StoreExtras,
    /// Shards found when the run started (the summary counts those found later too).
    found_at_start: u64,
}

impl Publisher {
    pub fn new(spec: &JobSpec, store: &StateStore, found_at_start: u64) -> Result<Publisher> {
        let (stored, extras) = read_store(spec, store)?;
        Ok(Publisher {
            path: status_path(&spec.state_path()),
            spec: spec.clone(),
            stored,
            extras,
            found_at_start,
        })
    }

    /// The status after `run` (this run's summary so far), with `clusters` clusters now;
    /// `running` false once the job stops.
    pub fn status(&self, run: &Summary, clusters: Option<u64>, running: bool) -> JobStatus {
        let found_since = run.shards_found.saturating_sub(self.found_at_start);
        let mut status = compose(
            &self.spec,
            (&self.stored, &self.extras),
            Some(run),
            found_since,
        );
        status.clusters = clusters.or(status.clusters);
        status.running = running;
        status.pid = status.pid.filter(|_| running);
        status
    }

    /// Replaces the status file (a temporary file renamed over it: readers never see half).
    pub fn publish(&self, status: &JobStatus) -> std::io::Result<()> {
        let json = serde_json::to_string_pretty(status).map_err(std::io::Error::other)?;
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, json)?;
        std::fs::rename(&tmp, &self.path)
    }
}

/// Whether the process `pid` is alive (Linux: /proc; elsewhere assumed alive).
fn alive(pid: u32) -> bool {
    let proc = Path::new("/proc");
    !proc.is_dir() || proc.join(pid.to_string()).exists()
}

/// `quad status JOB`: the running job's status file while it is alive, else the store.
pub fn job_status(spec: &JobSpec) -> Result<JobStatus> {
    let state = spec.state_path();
    let file = status_path(&state);
    if let Ok(text) = std::fs::read_to_string(&file) {
        let status: JobStatus = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a quad status file", file.display()))?;
        if status.running && status.pid.is_some_and(alive) {
            return Ok(status);
        }
    }
    let store = StateStore::open_existing(&state)?;
    let mut status = from_store(spec, &store)?;
    status.last_commit_unix = std::fs::metadata(&state)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs());
    Ok(status)
}

impl std::fmt::Display for JobStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = match (self.running, self.pid) {
            (true, Some(pid)) => format!("running (pid {pid})"),
            _ => "not running".into(),
        };
        writeln!(f, "job '{}': {state}; from the {}", self.job, self.source)?;
        writeln!(
            f,
            "  shards     {} done, {} waiting, {} quarantined",
            self.shards_done, self.shards_waiting, self.shards_quarantined
        )?;
        writeln!(
            f,
            "  documents  {} rows read, {} documents ({} tokens), {} rejected rows, {} duplicate ids",
            self.rows_read, self.documents, self.tokens, self.rejected, self.duplicates
        )?;
        if let Some(clusters) = self.clusters {
            writeln!(f, "  clusters   {clusters}")?;
        }
        if let Some(rounds) = self.rounds {
            writeln!(f, "  bandit     {rounds} rounds")?;
        }
        let budget = match self.budget_tokens {
            Some(b) if b > 0 => format!(
                " of a budget of {b} ({:.1}%)",
                100.0 * self.selected_tokens as f64 / b as f64
            ),
            Some(b) => format!(" of a budget of {b}"),
            None => String::new(),
        };
        writeln!(
            f,
            "  selected   {} documents, {} tokens{budget}",
            self.selected_documents, self.selected_tokens
        )?;
        match self.last_commit_unix {
            Some(t) => writeln!(
                f,
                "  last commit {}s ago (unix time {t})",
                unix_now().saturating_sub(t)
            )?,
            None => writeln!(f, "  last commit never")?,
        }
        for (shard, reason) in &self.quarantined {
            writeln!(f, "  quarantined {shard}: {reason}")?;
        }
        Ok(())
    }
}

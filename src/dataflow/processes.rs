//! Several processes on timely's own cluster mode (`-n` processes, `-p` index, `--hostfile`).
//!
//! Timely connects the processes (its TCP allocator); this module bounds that in time (timely
//! retries a refused connection forever), and, before the job touches its store or its output
//! folder, checks that every process runs the same job: a tiny first dataflow broadcasts each
//! worker's identity (process, process count, binary version, selection fingerprint) and every
//! worker compares all of them with its own, so every process refuses alike, naming the
//! process and the field that differs.
use std::path::Path;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use timely::communication::Config as CommunicationConfig;
use timely::dataflow::operators::vec::{Broadcast, ToStream};
use timely::dataflow::operators::{Inspect, Probe};
use timely::dataflow::ProbeHandle;
use timely::WorkerConfig;

/// This process's place in a job of several processes.
#[derive(Debug, Clone)]
pub struct Processes {
    /// This process's index, 0-based.
    pub index: usize,
    /// `host:port` of every process, by index (the hostfile's lines).
    pub addresses: Vec<String>,
    /// How long connecting to the peers and agreeing on the job may take.
    pub connect_timeout: Duration,
}

impl Processes {
    pub fn count(&self) -> usize {
        self.addresses.len()
    }

    /// This process's index among those of its host (the hostfile's earlier lines with the
    /// same host): which of the machine's GPUs it uses.
    pub fn local_index(&self) -> usize {
        let mine = host_of(&self.addresses[self.index]);
        self.addresses[..self.index]
            .iter()
            .filter(|a| host_of(a) == mine)
            .count()
    }

    /// How many of the job's processes run on this process's host (the hostfile's lines with
    /// its host): they share its cores.
    pub fn local_count(&self) -> usize {
        let mine = host_of(&self.addresses[self.index]);
        self.addresses.iter().filter(|a| host_of(a) == mine).count()
    }

    /// The peers' addresses, each with its process index, for error messages.
    fn peers(&self) -> String {
        self.addresses
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != self.index)
            .map(|(i, a)| format!("{a} (process {i})"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// The host of a `host:port`.
fn host_of(address: &str) -> &str {
    address.rsplit_once(':').map_or(address, |(host, _)| host)
}

/// The first peer whose connection failed in this process, as (peer index, what failed),
/// noted by `note_lost_peers`'s panic hook.
static LOST_PEER: std::sync::Mutex<Option<(usize, String)>> = std::sync::Mutex::new(None);

/// Notes which peer's connection failed: timely's communication threads, named
/// `timely:send-I` and `timely:recv-I` for peer I, panic when that peer's connection drops
/// (it stopped, or the network between them failed), and the workers then stop with a panic
/// that names no peer. Keeps the panic hook that was installed before.
pub fn note_lost_peers() {
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let thread = std::thread::current();
        let peer = thread.name().and_then(|name| {
            name.strip_prefix("timely:recv-")
                .or_else(|| name.strip_prefix("timely:send-"))
                .and_then(|i| i.parse::<usize>().ok())
        });
        let what = panic_text(info.payload());
        let mut lost = LOST_PEER.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(peer) = peer {
            if lost.is_none() {
                tracing::error!(peer, "the connection to process {peer} failed: {what}");
                *lost = Some((peer, what));
            }
            return;
        }
        // What follows a lost connection in timely (its queues poisoned, its threads joined)
        // says nothing more: the error names the peer.
        if lost.is_some() && (what.contains("poisoned") || what.ends_with("thread panic")) {
            return;
        }
        drop(lost);
        previous(info);
    }));
}

/// A panic's message.
pub fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_default()
}

/// Why a worker of this process failed, naming the peer whose connection failed first, if one
/// did.
pub fn worker_failure(processes: Option<&Processes>, failure: String) -> anyhow::Error {
    let lost = LOST_PEER.lock().ok().and_then(|l| l.clone());
    match (processes, lost) {
        (Some(p), Some((peer, what))) => anyhow::anyhow!(
            "process {} of {}: lost the connection to process {peer} at {} ({what}): it              stopped or cannot be reached. Start every process of the job again: the job              resumes from what every process committed",
            p.index,
            p.count(),
            p.addresses.get(peer).map_or("?", String::as_str),
        ),
        _ => anyhow::anyhow!("worker failed: {failure}"),
    }
}

/// The `host:port` lines of a hostfile (timely's format; blank lines and `#` comments skipped).
pub fn read_hostfile(path: &Path) -> Result<Vec<String>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("reading the hostfile {}", path.display()))?;
    let addresses: Vec<String> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect();
    for (line, address) in addresses.iter().enumerate() {
        if address
            .rsplit_once(':')
            .is_none_or(|(_, port)| port.parse::<u16>().is_err())
        {
            anyhow::bail!(
                "{}: address {} ({address:?}) is not host:port",
                path.display(),
                line + 1
            );
        }
    }
    Ok(addresses)
}

/// Timely's configuration: threads in one process, or this process of a cluster.
pub fn timely_config(workers: usize, processes: Option<&Processes>) -> timely::Config {
    let communication = match processes {
        None => CommunicationConfig::Process(workers),
        Some(p) => CommunicationConfig::Cluster {
            threads: workers,
            process: p.index,
            addresses: p.addresses.clone(),
            report: false,
            zerocopy: false,
        },
    };
    timely::Config {
        communication,
        worker: WorkerConfig::default(),
    }
}

/// `timely::execute`, but an error naming the peers when they are not all connected within
/// the timeout (timely itself would retry forever). The connecting thread is left behind on
/// a timeout; the process exits with the error.
pub fn execute_within<T, F>(
    config: timely::Config,
    processes: Option<&Processes>,
    func: F,
) -> Result<timely::communication::WorkerGuards<T>>
where
    T: Send + 'static,
    F: Fn(&mut timely::worker::Worker) -> T + Send + Sync + 'static,
{
    let Some(p) = processes else {
        return timely::execute(config, func)
            .map_err(|e| anyhow::anyhow!("starting timely workers: {e}"));
    };
    let (sent, started) = mpsc::channel();
    std::thread::Builder::new()
        .name("quad-connect".into())
        .spawn(move || {
            let _ = sent.send(timely::execute(config, func));
        })
        .context("starting the connecting thread")?;
    match started.recv_timeout(p.connect_timeout) {
        Ok(guards) => guards.map_err(|e| {
            anyhow::anyhow!(
                "process {} of {}: connecting to {}: {e}",
                p.index,
                p.count(),
                p.peers()
            )
        }),
        Err(_) => anyhow::bail!(
            "process {} of {}: could not connect to every peer within {:.0?}: {}; check that \
             every process of the job runs and that the hostfile lists them in order",
            p.index,
            p.count(),
            p.connect_timeout,
            p.peers()
        ),
    }
}

/// The run value holding the process layout a job of several processes was started with.
const LAYOUT_KEY: &str = "process_layout";

/// Refuses to run a job with another layout of processes than its stores were written with:
/// which process owns an epoch depends on it (worker `e % (processes * workers)`), and each
/// process plans the shards its own store has not committed, so another layout would read some
/// shards again into another folder. One process and several do not mix either (their output
/// folders differ). `spec` is the spec as this process runs it (`JobSpec::for_process`).
pub fn check_layout(
    spec: &crate::config::JobSpec,
    store: &crate::state::StateStore,
    processes: usize,
    workers: usize,
) -> Result<()> {
    let folder = |p: &Path| p.display().to_string();
    if processes <= 1 {
        let several = spec.sink.path.join("p0");
        if several.is_dir() {
            anyhow::bail!(
                "{} holds the output of this job run on several processes; run it with the \
                 same -n, -w and --hostfile (or `quad run --reset` to start over)",
                folder(&several)
            );
        }
        return Ok(());
    }
    let one = spec
        .sink
        .path
        .parent()
        .map(|root| root.join("_state").join("quad.redb"));
    if spec.state.path.is_none() && one.as_ref().is_some_and(|p| p.exists()) {
        anyhow::bail!(
            "this job ran on one process before (its store is {}); a job keeps its number of \
             processes: run it with -n 1, or delete its output and state to start over",
            folder(one.as_deref().unwrap_or(Path::new("")))
        );
    }
    let layout = (processes, workers);
    match store.run_value::<(usize, usize)>(LAYOUT_KEY)? {
        None => store.put_run_value(LAYOUT_KEY, &layout)?,
        Some(stored) if stored == layout => {}
        Some((n, w)) => anyhow::bail!(
            "{}: this job runs as {n} processes of {w} workers (which process owns a shard \
             depends on it); run it with -n {n} -w {w}, or delete its output and state to \
             start over",
            folder(&spec.state_path())
        ),
    }
    Ok(())
}

/// What every process of a job must agree on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Identity {
    pub process: usize,
    pub processes: usize,
    pub version: String,
    /// The job's selection fingerprint (`JobSpec::selection_fingerprint`), as JSON.
    pub fingerprint: String,
}

impl Identity {
    pub fn new(process: usize, processes: usize, fingerprint: &serde_json::Value) -> Identity {
        // A test hook stands for another build of quad.
        let version = std::env::var("QUAD_TEST_VERSION")
            .unwrap_or_else(|_| env!("CARGO_PKG_VERSION").to_owned());
        Identity {
            process,
            processes,
            version,
            fingerprint: fingerprint.to_string(),
        }
    }

    /// Why `other` does not run the same job as this process, naming the field.
    fn disagreement(&self, other: &Identity) -> Option<String> {
        let who = format!("process {}", other.process);
        if other.processes != self.processes {
            return Some(format!(
                "{who} runs with {} processes (field `processes`), process {} with {}",
                other.processes, self.process, self.processes
            ));
        }
        if other.version != self.version {
            return Some(format!(
                "{who} is quad {} (field `version`), process {} is quad {}",
                other.version, self.process, self.version
            ));
        }
        if other.fingerprint != self.fingerprint {
            return Some(format!(
                "{who} has another job spec: selection fingerprint field `{}` differs from \
                 process {}'s",
                fingerprint_difference(&self.fingerprint, &other.fingerprint),
                self.process
            ));
        }
        None
    }
}

/// The first top-level key of two fingerprints whose values differ.
fn fingerprint_difference(mine: &str, theirs: &str) -> String {
    let parse = |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap_or_default();
    let (mine, theirs) = (parse(mine), parse(theirs));
    let empty = serde_json::Map::new();
    let (a, b) = (
        mine.as_object().unwrap_or(&empty),
        theirs.as_object().unwrap_or(&empty),
    );
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.into_iter()
        .find(|k| a.get(*k) != b.get(*k))
        .map_or_else(|| "?".to_owned(), |k| k.to_owned())
}

/// The first dataflow of a job of several processes: every worker learns every worker's
/// identity and refuses if one differs from its own. Errors after `deadline` when a peer's
/// identity does not come.
pub fn agree(
    worker: &mut timely::worker::Worker,
    mine: &Identity,
    deadline: Instant,
) -> Result<(), String> {
    let seen = std::rc::Rc::new(std::cell::RefCell::new(Vec::<Identity>::new()));
    let probe = ProbeHandle::new();
    let sink = seen.clone();
    let own = mine.clone();
    worker.dataflow::<u64, _, _>(|scope| {
        std::iter::once(own)
            .to_stream(scope)
            .broadcast()
            .inspect(move |identity| sink.borrow_mut().push(identity.clone()))
            .probe_with(&probe);
    });
    while !probe.done() {
        if Instant::now() > deadline {
            return Err(format!(
                "process {}: the peers did not all say which job they run before the timeout \
                 ({} of {} workers did)",
                mine.process,
                seen.borrow().len(),
                worker.peers()
            ));
        }
        worker.step_or_park(Some(Duration::from_millis(10)));
    }
    let seen = seen.borrow();
    let mut refusals: Vec<String> = seen.iter().filter_map(|o| mine.disagreement(o)).collect();
    refusals.sort();
    refusals.dedup();
    match refusals.first() {
        Some(first) => Err(format!("refusing to run: {first}")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn identity(process: usize, seed: u64) -> Identity {
        Identity::new(process, 2, &serde_json::json!({"seed": seed, "ratio": 0.2}))
    }

    #[test]
    fn a_different_spec_version_or_count_is_named() {
        let mine = identity(0, 1);
        assert_eq!(mine.disagreement(&identity(1, 1)), None);
        let spec = mine.disagreement(&identity(1, 2)).unwrap();
        assert!(
            spec.contains("process 1") && spec.contains("`seed`"),
            "{spec}"
        );
        let mut other = identity(1, 1);
        other.version = "0.0.0-other".into();
        let version = mine.disagreement(&other).unwrap();
        assert!(version.contains("`version`"), "{version}");
        other = identity(1, 1);
        other.processes = 3;
        let count = mine.disagreement(&other).unwrap();
        assert!(count.contains("`processes`"), "{count}");
    }

    #[test]
    fn the_local_index_and_count_are_the_processes_of_the_same_host() {
        let addresses: Vec<String> = ["a:1", "b:1", "a:2", "b:2", "a:3"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let place = |index| Processes {
            index,
            addresses: addresses.clone(),
            connect_timeout: Duration::from_secs(1),
        };
        let local = |index| place(index).local_index();
        assert_eq!((0..5).map(local).collect::<Vec<_>>(), [0, 0, 1, 1, 2]);
        let count = |index| place(index).local_count();
        assert_eq!((0..5).map(count).collect::<Vec<_>>(), [3, 2, 3, 2, 3]);
    }

    #[test]
    fn hostfiles_are_host_port_lines() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("hosts");
        std::fs::write(&path, "# two\n127.0.0.1:4000\n\nnode-b:4001\n").unwrap();
        assert_eq!(
            read_hostfile(&path).unwrap(),
            ["127.0.0.1:4000", "node-b:4001"]
        );
        std::fs::write(&path, "127.0.0.1\n").unwrap();
        assert!(read_hostfile(&path).is_err());
    }
}

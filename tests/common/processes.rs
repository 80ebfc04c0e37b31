//! Several processes of one job on 127.0.0.1 (timely's cluster mode): free ports, a hostfile,
//! starting every process and reading each one's summary and the union of their output.
use std::path::{Path, PathBuf};
use std::process::{Child, Output};

use super::{output_rows, quad, stderr};

/// Free ports on 127.0.0.1 (bound together, so they differ, then released for timely).
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// A hostfile of `n` processes on free ports of 127.0.0.1.
pub fn hostfile(dir: &Path, n: usize) -> (PathBuf, Vec<String>) {
    let addresses: Vec<String> = free_ports(n)
        .into_iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let path = dir.join(format!("hosts-{}", addresses.join("-").replace(':', "_")));
    std::fs::write(&path, addresses.join("\n")).unwrap();
    (path, addresses)
}

/// Starts process `index` of the job described by `hosts` with `workers` threads.
pub fn spawn_process(
    job: &Path,
    hosts: &Path,
    processes: usize,
    index: usize,
    workers: usize,
    timeout_s: u64,
) -> Child {
    process_command(job, hosts, (processes, index), workers, timeout_s)
        .spawn()
        .unwrap()
}

/// The command of process `index` of `processes` (see `spawn_process`), to add to.
pub fn process_command(
    job: &Path,
    hosts: &Path,
    (processes, index): (usize, usize),
    workers: usize,
    timeout_s: u64,
) -> std::process::Command {
    let mut command = quad();
    command
        .args(["run", "--json", "-w", &workers.to_string()])
        .args(["-n", &processes.to_string(), "-p", &index.to_string()])
        .arg("--hostfile")
        .arg(hosts)
        .args(["--connect-timeout", &timeout_s.to_string()])
        .arg(job)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    command
}

/// Runs every process of `job` (`jobs[i]` for process i) and waits for all of them.
pub fn run_processes(jobs: &[&Path], dir: &Path, workers: usize) -> Vec<Output> {
    let (hosts, _) = hostfile(dir, jobs.len());
    let children: Vec<Child> = jobs
        .iter()
        .enumerate()
        .map(|(i, job)| spawn_process(job, &hosts, jobs.len(), i, workers, 60))
        .collect();
    children
        .into_iter()
        .map(|c| c.wait_with_output().unwrap())
        .collect()
}

/// The JSON summary on stdout (timely may print connection retries before it).
pub fn process_summary(out: &Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    let json = &text[text.find("\n{").map_or(0, |i| i + 1)..];
    serde_json::from_str(json)
        .unwrap_or_else(|e| panic!("no JSON summary ({e}); stderr:\n{}", stderr(out)))
}

/// Every selected row (all columns, as text) of a job's output, from the folder of a single
/// process or the `p<i>` folders of several, sorted.
pub fn selected_rows(sink: &Path) -> Vec<Vec<String>> {
    let mut rows = output_rows(sink);
    for entry in std::fs::read_dir(sink).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() && path.file_name().unwrap().to_string_lossy().starts_with('p') {
            rows.extend(output_rows(&path));
        }
    }
    rows.sort();
    rows
}

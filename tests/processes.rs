//! A job on several processes (timely's cluster mode, on 127.0.0.1 with free ports): the same
//! selected rows as on one process, whatever the processes and workers; processes that run
//! different jobs, or cannot reach a peer, stop with an error that names it.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Output};

use common::*;

/// Free ports on 127.0.0.1 (bound together, so they differ, then released for timely).
fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().unwrap().port())
        .collect()
}

/// A hostfile of `n` processes on free ports of 127.0.0.1.
fn hostfile(dir: &Path, n: usize) -> (PathBuf, Vec<String>) {
    let addresses: Vec<String> = free_ports(n)
        .into_iter()
        .map(|p| format!("127.0.0.1:{p}"))
        .collect();
    let path = dir.join(format!("hosts-{}", addresses.join("-").replace(':', "_")));
    std::fs::write(&path, addresses.join("\n")).unwrap();
    (path, addresses)
}

/// Starts process `index` of the job described by `hosts` with `workers` threads.
fn spawn_process(
    job: &Path,
    hosts: &Path,
    processes: usize,
    index: usize,
    workers: usize,
    timeout_s: u64,
) -> Child {
    quad()
        .args(["run", "--json", "-w", &workers.to_string()])
        .args(["-n", &processes.to_string(), "-p", &index.to_string()])
        .arg("--hostfile")
        .arg(hosts)
        .args(["--connect-timeout", &timeout_s.to_string()])
        .arg(job)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap()
}

/// Runs every process of `job` (`jobs[i]` for process i) and waits for all of them.
fn run_processes(jobs: &[&Path], dir: &Path, workers: usize) -> Vec<Output> {
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
fn process_summary(out: &Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    let json = &text[text.find("\n{").map_or(0, |i| i + 1)..];
    serde_json::from_str(json)
        .unwrap_or_else(|e| panic!("no JSON summary ({e}); stderr:\n{}", stderr(out)))
}

/// Every selected row (all columns, as text) of a job's output, from the folder of a single
/// process or the `p<i>` folders of several, sorted.
fn selected_rows(sink: &Path) -> Vec<Vec<String>> {
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

/// The random strategy on the demo slice, with `processes` processes of `workers` workers.
fn random_selection(dir: &Path, processes: usize, workers: usize) -> Vec<Vec<String>> {
    let name = format!("n{processes}w{workers}");
    let job = write_job(dir, &name, &slice_glob(), 11, "");
    selection(dir, &name, &job, processes, workers)
}

/// The rows `job` (writing `dir/name`) selects with `processes` processes of `workers` workers.
fn selection(
    dir: &Path,
    name: &str,
    job: &Path,
    processes: usize,
    workers: usize,
) -> Vec<Vec<String>> {
    if processes == 1 {
        let out = run(job, workers);
        assert!(out.status.success(), "{}", stderr(&out));
    } else {
        let jobs = vec![job; processes];
        let outs = run_processes(&jobs, dir, workers);
        let mut selected = 0;
        for (i, out) in outs.iter().enumerate() {
            assert!(out.status.success(), "process {i}: {}", stderr(out));
            let summary = process_summary(out);
            assert_eq!(summary["process"], i as u64);
            assert_eq!(summary["processes"], processes as u64);
            selected += summary["selected"].as_u64().unwrap();
        }
        // Each process wrote its own folder, and the summaries add up to the output.
        let rows = selected_rows(&dir.join(name));
        assert_eq!(selected, rows.len() as u64);
        for i in 0..processes {
            assert!(
                !output_files(&dir.join(name).join(format!("p{i}"))).is_empty(),
                "process {i} wrote no file"
            );
        }
    }
    selected_rows(&dir.join(name))
}

#[test]
fn processes_and_workers_select_the_same_rows() {
    let dir = tempfile::tempdir().unwrap();
    let one = random_selection(dir.path(), 1, 1);
    assert!(one.len() > 300, "{} rows", one.len());
    for (processes, workers) in [(1, 2), (2, 1), (2, 2)] {
        let other = random_selection(dir.path(), processes, workers);
        assert_eq!(
            other.len(),
            one.len(),
            "{processes} processes x {workers} workers: row count"
        );
        assert!(
            other == one,
            "{processes} processes x {workers} workers selected other rows than 1 x 1"
        );
    }
}

/// Every member (cluster, epoch, row) in the stores of a job's processes (one or several).
fn members(sink: &Path, processes: usize) -> Vec<(u32, u64, u64)> {
    let stores: Vec<PathBuf> = if processes == 1 {
        vec![sink.join("_state/quad.redb")]
    } else {
        (0..processes)
            .map(|i| sink.join(format!("p{i}/_state/quad.redb")))
            .collect()
    };
    let mut members = Vec::new();
    for path in stores {
        let store = quad::state::StateStore::open_existing(&path).unwrap();
        for cluster in store.clusters().unwrap() {
            for m in store.members(cluster.cluster).unwrap() {
                members.push((m.cluster, m.epoch, m.row));
            }
        }
    }
    members.sort();
    members
}

#[test]
fn clustering_across_processes_assigns_the_same_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let select = "ratio = 0.2\n[embed]\ncolumn = \"embedding\"\ndim = 16\n[cluster]\n\
                  enabled = true\nk = 8\nk_max = 12\nreservoir = 600\nnew_cluster_floor = 0.3";
    let mut selections = Vec::new();
    let mut memberships = Vec::new();
    for (processes, workers) in [(1, 1), (2, 2)] {
        let name = format!("clusters-n{processes}w{workers}");
        let job = write_job(dir.path(), &name, &planted_glob(), 9, select);
        selections.push(selection(dir.path(), &name, &job, processes, workers));
        memberships.push(members(&dir.path().join(&name), processes));
    }
    // Each process's store holds the members of the shards it read; together, every document
    // is in the cluster one process assigns it to.
    assert!(
        memberships[0].len() > SLICE_DOCS / 2,
        "{}",
        memberships[0].len()
    );
    assert!(
        memberships[0] == memberships[1],
        "2 processes x 2 workers clustered otherwise than 1 x 1"
    );
    assert!(
        selections[0] == selections[1],
        "2 processes x 2 workers selected otherwise than 1 x 1"
    );
}

#[test]
fn processes_of_different_jobs_refuse_before_writing() {
    let dir = tempfile::tempdir().unwrap();
    let glob = slice_glob();
    let a = write_job(dir.path(), "a", &glob, 11, "");
    let b = write_job(dir.path(), "b", &glob, 12, "");
    let outs = run_processes(&[&a, &b], dir.path(), 1);
    for (i, out) in outs.iter().enumerate() {
        assert!(!out.status.success(), "process {i} ran");
        let err = stderr(out);
        assert!(err.contains("`seed`"), "process {i}: {err}");
        let other = 1 - i;
        assert!(
            err.contains(&format!("process {other}")),
            "process {i}: {err}"
        );
    }
    for name in ["a", "b"] {
        assert!(
            !dir.path().join(name).exists(),
            "a refused process wrote into its sink folder"
        );
    }

    // Another build of quad is refused the same way.
    let (hosts, _) = hostfile(dir.path(), 2);
    let first = spawn_process(&a, &hosts, 2, 0, 1, 30);
    let mut second = quad();
    second
        .args(["run", "-n", "2", "-p", "1", "--hostfile"])
        .arg(&hosts)
        .arg(&a)
        .env("QUAD_TEST_VERSION", "0.0.0-other");
    let second = second.output().unwrap();
    let first = first.wait_with_output().unwrap();
    for out in [&first, &second] {
        assert!(!out.status.success());
        assert!(stderr(out).contains("`version`"), "{}", stderr(out));
    }
    assert!(!dir.path().join("a").exists());
}

#[test]
fn a_process_without_its_peer_stops_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path(), "alone", &slice_glob(), 11, "");
    // Process 0 waits for process 1 to connect; process 1 connects to process 0.
    for index in [0, 1] {
        let (hosts, addresses) = hostfile(dir.path(), 2);
        let start = std::time::Instant::now();
        let out = spawn_process(&job, &hosts, 2, index, 1, 3)
            .wait_with_output()
            .unwrap();
        let took = start.elapsed().as_secs_f64();
        assert!(!out.status.success(), "process {index} ran alone");
        assert!(took < 30.0, "process {index} took {took:.0} s to give up");
        let err = stderr(&out);
        let peer = &addresses[1 - index];
        assert!(
            err.contains(peer.as_str()) && err.contains(&format!("process {}", 1 - index)),
            "process {index}: {err}"
        );
        assert!(!dir.path().join("alone").exists());
    }
}

#[test]
fn a_job_keeps_its_layout_of_processes() {
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path(), "layout", &slice_glob(), 11, "");
    let outs = run_processes(&[&job, &job], dir.path(), 1);
    for out in &outs {
        assert!(out.status.success(), "{}", stderr(out));
    }
    let rows = selected_rows(&dir.path().join("layout"));
    // Another number of workers would give some shards other owners, which would read them
    // again: refused by both processes.
    let outs = run_processes(&[&job, &job], dir.path(), 2);
    for out in &outs {
        assert!(!out.status.success());
        assert!(stderr(out).contains("-n 2 -w 1"), "{}", stderr(out));
    }
    // One process would write another folder: refused.
    let one = run(&job, 1);
    assert!(!one.status.success());
    assert!(
        stderr(&one).contains("several processes"),
        "{}",
        stderr(&one)
    );
    assert_eq!(selected_rows(&dir.path().join("layout")), rows);
}

#[test]
fn the_quad_loop_is_refused_across_processes() {
    let dir = tempfile::tempdir().unwrap();
    let select = "strategy = \"quad\"\n[embed]\ncolumn = \"embedding\"\ndim = 16\n[cluster]\n\
                  enabled = true\nk = 8";
    let job = write_job(dir.path(), "loop", &planted_glob(), 9, select);
    let (hosts, _) = hostfile(dir.path(), 2);
    let out = spawn_process(&job, &hosts, 2, 0, 1, 30)
        .wait_with_output()
        .unwrap();
    assert!(!out.status.success());
    assert!(stderr(&out).contains("Quad loop"), "{}", stderr(&out));
    assert!(!dir.path().join("loop").exists());
}

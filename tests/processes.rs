//! A job on several processes (timely's cluster mode, on 127.0.0.1 with free ports): the same
//! selected rows as on one process, whatever the processes and workers, for the random strategy
//! and for the Quad loop; processes that run different jobs, or cannot reach a peer, stop with
//! an error that names it.
mod common;

use std::path::{Path, PathBuf};

use common::dedup_pool;
use common::processes::*;
use common::*;

/// The random strategy on the demo slice, with `processes` processes of `workers` workers.
fn random_selection(dir: &Path, processes: usize, workers: usize) -> Vec<Vec<String>> {
    let name = format!("n{processes}w{workers}");
    let job = write_job(dir, &name, &slice_glob(), 11, "");
    selection(dir, &name, &job, (processes, workers), true)
}

/// The rows `job` (writing `dir/name`) selects with `processes` processes of `workers` workers;
/// `each_writes`: every process must have written a file.
fn selection(
    dir: &Path,
    name: &str,
    job: &Path,
    (processes, workers): (usize, usize),
    each_writes: bool,
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
        for i in (0..processes).filter(|_| each_writes) {
            assert!(
                !output_files(&dir.join(name).join(format!("p{i}"))).is_empty(),
                "process {i} wrote no file"
            );
        }
    }
    selected_rows(&dir.join(name))
}

/// Checks that every layout of processes and workers selects the rows of 1 x 1 (at least
/// `min_rows` of them).
fn same_rows_for_every_layout(min_rows: usize, select: impl Fn(usize, usize) -> Vec<Vec<String>>) {
    let one = select(1, 1);
    assert!(one.len() > min_rows, "{} rows", one.len());
    for (processes, workers) in [(2, 1), (1, 2), (2, 2)] {
        let other = select(processes, workers);
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

#[test]
fn processes_and_workers_select_the_same_rows() {
    let dir = tempfile::tempdir().unwrap();
    same_rows_for_every_layout(300, |p, w| random_selection(dir.path(), p, w));
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
        selections.push(selection(
            dir.path(),
            &name,
            &job,
            (processes, workers),
            true,
        ));
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

/// The planted dedup pool (tests/common/dedup_pool.rs) with, in every shard after the first,
/// ten new texts under ids of earlier shards' originals.
fn pool_with_repeated_ids() -> Vec<Vec<(String, String)>> {
    let mut shards = dedup_pool::planted_rows();
    for (s, rows) in shards.iter_mut().enumerate().skip(1) {
        for c in 0..10 {
            let from = (s + c) % s;
            let id = format!("doc-{from}-{}", (s * 37 + c * 11) % dedup_pool::ORIGINALS);
            let text = format!("repeated id {c} of shard {s}: a new text under an old id");
            rows.push((id, text));
        }
    }
    shards
}

/// Starts both processes of `job` slowed down, SIGKILLs process 1 once it has committed an
/// epoch (its second file is written after its first epoch's commit) and process 0 has
/// written a file, and waits for process 0 to stop: it must notice that its peer is gone.
fn kill_one_of_two_midway(dir: &Path, job: &Path, sink: &Path) {
    let (hosts, _) = hostfile(dir, 2);
    let spawn = |index| {
        process_command(job, &hosts, (2, index), 1, 60)
            .env("QUAD_TEST_EPOCH_DELAY_MS", "500")
            .spawn()
            .unwrap()
    };
    let (mut first, mut second) = (spawn(0), spawn(1));
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let files = |i: usize| output_files(&sink.join(format!("p{i}"))).len();
    while files(0) < 1 || files(1) < 2 {
        assert!(std::time::Instant::now() < deadline, "no progress");
        assert!(second.try_wait().unwrap().is_none(), "finished too early");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    second.kill().unwrap(); // SIGKILL
    second.wait().unwrap();
    survivor_stops_by_itself(&mut first);
    assert!(
        files(0) + files(1) < dedup_pool::SHARDS,
        "the kill came too late"
    );
}

/// `random` with a token budget over planted exact and near copies and repeated ids, on two
/// processes of one worker: process 1 is SIGKILLed midway, both are started again, and the
/// output and the rejected rows are those of one uninterrupted process. The restarted admit
/// stage (process 0) must know the ids, texts and tokens of the epochs process 1 committed,
/// which only process 1's store holds as commits: the copies of their documents in later
/// shards are rejected, and the budget ends where it did.
#[test]
fn two_processes_killed_midway_and_restarted_select_what_one_process_does() {
    let dir = tempfile::tempdir().unwrap();
    let shards = pool_with_repeated_ids();
    let glob = dedup_pool::write_pool(dir.path(), &shards);
    let words: usize = shards
        .iter()
        .flatten()
        .map(|(_, text)| text.split_whitespace().count())
        .sum();
    // Half the rows by priority, and a budget that ends the selection in the fifth shard.
    let budget = words * 35 / 100;
    let select = format!("ratio = 0.5\nmax_tokens = {budget}");
    let one = write_job(dir.path(), "one", &glob, 5, &select);
    let out = run(&one, 1);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = summary(&out);
    let tokens = s["selected_tokens"].as_u64().unwrap() as usize;
    assert!(tokens <= budget && tokens + 300 > budget, "{s}");
    assert!(s["duplicates"].as_u64().unwrap() > 0, "{s}");
    let expected = selected_rows(&dir.path().join("one"));
    let expected_rejects = dedup_pool::rejects_at(&dir.path().join("one/_state/quad.redb"));
    let copies_of_shard_1 = expected_rejects
        .values()
        .filter(|(_, matched)| matched.as_deref().is_some_and(|m| m.starts_with("doc-1-")))
        .count();
    assert!(copies_of_shard_1 > 5, "{copies_of_shard_1}");

    let job = write_job(dir.path(), "two", &glob, 5, &select);
    let sink = dir.path().join("two");
    kill_one_of_two_midway(dir.path(), &job, &sink);
    let outs = run_processes(&[&job, &job], dir.path(), 1);
    for (i, out) in outs.iter().enumerate() {
        assert!(out.status.success(), "process {i}: {}", stderr(out));
    }
    let done: Vec<u64> = outs
        .iter()
        .map(|out| {
            process_summary(out)["shards_already_done"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert!(done[1] >= 1, "shards done before the restart: {done:?}");
    assert!(
        selected_rows(&sink) == expected,
        "the restarted processes selected other rows than one process"
    );
    let mut rejects = dedup_pool::rejects_at(&sink.join("p0/_state/quad.redb"));
    rejects.extend(dedup_pool::rejects_at(&sink.join("p1/_state/quad.redb")));
    assert_eq!(rejects, expected_rejects);
}

/// The Quad loop's rows with `processes` processes of `workers` workers: the bandit over the
/// planted slice's clusters, scored by a tiny random Llama.
fn quad_selection(dir: &Path, processes: usize, workers: usize) -> Vec<Vec<String>> {
    let name = format!("loop-n{processes}w{workers}");
    let bandit = "budget = { ratio = 0.1 }";
    let job = loop_job_over(
        dir,
        &name,
        21,
        &planted_glob(),
        "strategy = \"quad\"",
        bandit,
    );
    // A small reservoir: the clusters are fitted in the first shard, and every later shard's
    // members are committed, and held, by the process that read it.
    let text = std::fs::read_to_string(&job).unwrap();
    std::fs::write(&job, text.replace("reservoir = 600", "reservoir = 200")).unwrap();
    selection(dir, &name, &job, (processes, workers), false)
}

/// How many members each process's store holds, and how many of them rounds sampled.
fn sampled_members(sink: &Path, processes: usize) -> Vec<(usize, usize)> {
    (0..processes)
        .map(|i| {
            let path = sink.join(format!("p{i}/_state/quad.redb"));
            let store = quad::state::StateStore::open_existing(&path).unwrap();
            let (mut held, mut sampled) = (0, 0);
            for cluster in store.clusters().unwrap() {
                for m in store.members(cluster.cluster).unwrap() {
                    held += 1;
                    sampled += usize::from(m.flags != 0);
                }
            }
            (held, sampled)
        })
        .collect()
}

#[test]
fn the_quad_loop_selects_the_same_rows_across_processes_and_workers() {
    let dir = tempfile::tempdir().unwrap();
    // Two processes hold the members of the shards each committed: every draw merges both
    // stores' candidates, and each process carries out and writes its store's part of a round.
    same_rows_for_every_layout(50, |p, w| quad_selection(dir.path(), p, w));
    // Each process's store has the round parts of its shards' members, and the bandit's
    // decisions are in process 0's.
    let rounds = |path: PathBuf| {
        quad::state::StateStore::open_existing(&path)
            .unwrap()
            .round_records()
            .unwrap()
    };
    // Both stores hold members that rounds sampled: the draws and the rounds' parts span both.
    let stores = sampled_members(&dir.path().join("loop-n2w2"), 2);
    assert!(
        stores
            .iter()
            .all(|&(held, sampled)| held > 0 && sampled > 0),
        "{stores:?}"
    );
    let single = rounds(dir.path().join("loop-n1w1/_state/quad.redb"));
    assert!(single.len() >= 3, "{} rounds", single.len());
    assert_eq!(
        rounds(dir.path().join("loop-n2w2/p0/_state/quad.redb")),
        single
    );
    assert!(rounds(dir.path().join("loop-n2w2/p1/_state/quad.redb")).is_empty());
    // Scoring is spread: each process scored the samples of its clusters, together as many as
    // one process did.
    let scored = |path: PathBuf| {
        quad::state::StateStore::open_existing(&path)
            .unwrap()
            .run_value::<quad::cost::Costs>(quad::report::COSTS_KEY)
            .unwrap()
            .unwrap()
            .docs_scored
    };
    let each: Vec<u64> = (0..2)
        .map(|i| scored(dir.path().join(format!("loop-n2w2/p{i}/_state/quad.redb"))))
        .collect();
    assert!(each.iter().all(|&n| n > 0), "{each:?}");
    assert_eq!(
        each.iter().sum::<u64>(),
        scored(dir.path().join("loop-n1w1/_state/quad.redb"))
    );
}

/// SIGKILL's number (9 on every Unix).
const SIGKILL: i32 = 9;

/// Runs a job on two processes of one worker, process 1 with a crash hook (`hook`: the
/// variable and its value), with which it SIGKILLs itself at an exact point (after a file's
/// rename, before its commit). Process 0 must stop by itself, naming its lost peer.
fn crash_process_1(dir: &Path, job: &Path, (variable, value): (&str, &str)) {
    let (hosts, addresses) = hostfile(dir, 2);
    let log = |i: usize| std::fs::File::create(dir.join(format!("crash-{i}.log"))).unwrap();
    let spawn = |index: usize, crash: bool| {
        let mut command = process_command(job, &hosts, (2, index), 1, 60);
        command.stdout(log(index)).stderr(log(index + 2));
        if crash {
            command.env(variable, value);
        }
        command.spawn().unwrap()
    };
    let (mut first, mut second) = (spawn(0, false), spawn(1, true));
    let killed = second.wait().unwrap();
    assert_eq!(
        std::os::unix::process::ExitStatusExt::signal(&killed),
        Some(SIGKILL),
        "the crash hook did not fire: {killed:?}"
    );
    survivor_stops_by_itself(&mut first);
    let err = std::fs::read_to_string(dir.join("crash-2.log")).unwrap();
    let named = format!("lost the connection to process 1 at {}", addresses[1]);
    assert!(
        err.contains(&named),
        "process 0 does not name its peer: {err}"
    );
}

/// Waits for process 0 to stop after its peer died: it must notice within a minute and fail.
fn survivor_stops_by_itself(first: &mut std::process::Child) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        if let Some(status) = first.try_wait().unwrap() {
            break status;
        }
        if std::time::Instant::now() > deadline {
            first.kill().unwrap();
            panic!("process 0 still runs a minute after its peer died");
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(!status.success(), "process 0 finished without its peer");
}

/// The Quad loop on two processes, process 1 killed in the middle of the rounds, both started
/// again: the bandit's aggregates start from both stores' shares (each holds the members of
/// the shards it read), the last decision is replayed, and the rows are one process's.
#[test]
fn the_quad_loop_killed_midway_on_two_processes_resumes_to_one_process_s_rows() {
    let dir = tempfile::tempdir().unwrap();
    let small_files = |job: PathBuf| {
        let text = std::fs::read_to_string(&job).unwrap();
        let text = text.replace("reservoir = 600", "reservoir = 200");
        std::fs::write(
            &job,
            text.replace("[sink]\n", "[sink]\nmin_file_rows = 10\n"),
        )
        .unwrap();
        job
    };
    let budget = "budget = { ratio = 0.1 }";
    let job_named = |name: &str| {
        small_files(loop_job_over(
            dir.path(),
            name,
            21,
            &planted_glob(),
            "strategy = \"quad\"",
            budget,
        ))
    };
    let one = job_named("straight");
    let out = run(&one, 1);
    assert!(out.status.success(), "{}", stderr(&out));
    let expected = selected_rows(&dir.path().join("straight"));
    assert!(expected.len() >= 50, "{} rows", expected.len());

    let job = job_named("again");
    // Process 1 dies once a file it closes at round 2 or later is on disk: the round's part is
    // in its store, the decision in process 0's.
    crash_process_1(dir.path(), &job, ("QUAD_TEST_CRASH_AFTER_ROUND", "2"));
    let outs = run_processes(&[&job, &job], dir.path(), 1);
    for (i, out) in outs.iter().enumerate() {
        assert!(out.status.success(), "process {i}: {}", stderr(out));
        assert!(
            process_summary(out)["shards_already_done"]
                .as_u64()
                .unwrap()
                > 0
        );
    }
    assert!(
        selected_rows(&dir.path().join("again")) == expected,
        "the restarted processes selected other rows than one process"
    );
}

/// Clustering on two processes, process 1 killed in the middle of ingest (after its second
/// shard's file is renamed, before its commit), both started again: the assign stage continues
/// each epoch read again from the state recorded before it in process 0's store, so the
/// clusters and the rows are one uninterrupted process's.
#[test]
fn clustering_on_two_processes_killed_mid_ingest_resumes_to_one_process_s_clusters() {
    let dir = tempfile::tempdir().unwrap();
    let select = "ratio = 0.2\n[embed]\ncolumn = \"embedding\"\ndim = 16\n[cluster]\n\
                  enabled = true\nk = 8\nk_max = 12\nreservoir = 600\nnew_cluster_floor = 0.3";
    let one = write_job(dir.path(), "straight", &planted_glob(), 9, select);
    let out = run(&one, 1);
    assert!(out.status.success(), "{}", stderr(&out));
    let expected = (
        selected_rows(&dir.path().join("straight")),
        members(&dir.path().join("straight"), 1),
    );
    let job = write_job(dir.path(), "again", &planted_glob(), 9, select);
    crash_process_1(dir.path(), &job, ("QUAD_TEST_CRASH_AFTER_RENAME", "3"));
    let outs = run_processes(&[&job, &job], dir.path(), 1);
    for (i, out) in outs.iter().enumerate() {
        assert!(out.status.success(), "process {i}: {}", stderr(out));
    }
    assert!(
        process_summary(&outs[1])["shards_already_done"]
            .as_u64()
            .unwrap()
            > 0,
        "process 1 had committed no shard before it died"
    );
    let again = (
        selected_rows(&dir.path().join("again")),
        members(&dir.path().join("again"), 2),
    );
    assert!(
        again.1 == expected.1,
        "the restarted processes clustered otherwise than one process"
    );
    assert!(
        again.0 == expected.0,
        "the restarted processes selected other rows than one process"
    );
}

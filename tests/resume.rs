//! Exactly-once output: a job killed with SIGKILL (or crashing between writing a file and
//! committing it) and restarted ends with exactly the rows of an uninterrupted run.
mod common;

use common::*;

fn uninterrupted(dir: &std::path::Path, glob: &str) -> Vec<Vec<String>> {
    let job = write_job(dir, "reference", glob, 9, "");
    let out = run(&job, 2);
    assert!(out.status.success(), "{}", stderr(&out));
    output_rows(&dir.join("reference"))
}

#[test]
fn sigkill_in_the_middle_then_resume_gives_the_uninterrupted_output() {
    let (dir, glob) = (tempfile::tempdir().unwrap(), slice_glob());
    let expected = uninterrupted(dir.path(), &glob);

    let job = write_job(dir.path(), "killed", &glob, 9, "");
    let sink = dir.path().join("killed");
    kill_mid_job(&job, &sink);

    let out = run(&job, 2);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = summary(&out);
    assert!(s["shards_already_done"].as_u64().unwrap() >= 1, "{s}");
    assert!(s["shards_done"].as_u64().unwrap() >= 1, "{s}");
    assert_eq!(
        output_rows(&sink),
        expected,
        "resumed output differs from the uninterrupted run"
    );
}

#[test]
fn a_crash_between_rename_and_commit_leaves_no_duplicate() {
    let (dir, glob) = (tempfile::tempdir().unwrap(), slice_glob());
    let expected = uninterrupted(dir.path(), &glob);

    let job = write_job(dir.path(), "crashed", &glob, 9, "");
    let out = quad()
        .args(["run", "-w", "1"])
        .arg(&job)
        .env("QUAD_TEST_CRASH_AFTER_RENAME", "2")
        .output()
        .unwrap();
    assert!(!out.status.success(), "the crash hook must abort the job");
    let sink = dir.path().join("crashed");
    assert!(
        sink.join("part-000002.parquet").exists(),
        "the file of the crashed epoch was renamed"
    );

    let out = run(&job, 1);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("removed 1 uncommitted output file(s): part-000002.parquet"),
        "{}",
        stderr(&out)
    );
    assert_eq!(summary(&out)["shards_already_done"], 2);
    assert_eq!(output_rows(&sink), expected);
}

#[test]
fn sigterm_stops_cleanly_and_the_next_run_finishes_the_same_selection() {
    let (dir, glob) = (tempfile::tempdir().unwrap(), slice_glob());
    // A token budget makes the selection depend on shard order across the stop.
    let budget = "max_tokens = 30000";
    let reference = write_job(dir.path(), "reference", &glob, 9, budget);
    assert!(run(&reference, 2).status.success());
    let expected = output_rows(&dir.path().join("reference"));

    let job = write_job(dir.path(), "stopped", &glob, 9, budget);
    let sink = dir.path().join("stopped");
    let mut child = spawn_slow_run(&job, 500);
    wait_for_outputs(&sink, 1);
    sigterm(&child);
    let stopped = child.wait().unwrap();
    assert_eq!(
        stopped.code(),
        Some(0),
        "a stop request ends the run normally"
    );
    assert!(
        output_files(&sink).len() < SLICE_SHARDS,
        "the stop came too late to test anything"
    );

    let out = run(&job, 2);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(summary(&out)["shards_already_done"].as_u64().unwrap() >= 1);
    assert_eq!(output_rows(&sink), expected);
}

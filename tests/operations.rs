//! Operating a long-lived job: the Prometheus endpoint and `quad status` during a watch-mode
//! run, `quad inspect rejects`, and job specs that work from any working folder.
mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use common::*;

/// A shard of `n` documents "{prefix}{i}" plus, after them, a row with an empty text and a
/// row repeating the id "{prefix}0".
fn write_small_shard(path: &Path, prefix: &str, n: usize) {
    let mut ids: Vec<String> = (0..n).map(|i| format!("{prefix}{i}")).collect();
    let mut texts: Vec<String> = (0..n)
        .map(|i| format!("document {i} of {prefix} with some words"))
        .collect();
    ids.push(format!("{prefix}-empty"));
    texts.push("   ".into());
    ids.push(format!("{prefix}0"));
    texts.push("a repeated id".into());
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("text", DataType::Utf8, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(ids)),
        Arc::new(StringArray::from(texts)),
    ];
    write_shard(path, &RecordBatch::try_new(schema, columns).unwrap());
}

/// A free local port (bound, then let go).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET http://addr/path; None when nothing answers (yet).
fn http_get(addr: &str, path: &str) -> Option<String> {
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    Some(text)
}

/// The sum of every sample of `name` in a scrape (over all label values).
fn metric(scrape: &str, name: &str) -> f64 {
    scrape
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Scrapes until `done` holds for the scrape (at most two minutes).
fn scrape_until(addr: &str, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(text) = http_get(addr, "/metrics") {
            if done(&text) {
                return text;
            }
        }
        assert!(Instant::now() < deadline, "metrics never got there");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn status_json(job: &Path) -> serde_json::Value {
    let out = quad().args(["status", "--json"]).arg(job).output().unwrap();
    assert!(out.status.success(), "quad status: {}", stderr(&out));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A watch-mode job reading `dir/in/*.parquet` that serves metrics at `addr`.
fn watch_job(dir: &Path, addr: &str) -> (PathBuf, PathBuf) {
    let input = dir.join("in");
    std::fs::create_dir_all(&input).unwrap();
    let sink = dir.join("out");
    let text = job_text(
        "ops",
        3,
        &format!("{}/*.parquet", input.display()),
        "ratio = 0.5",
        &format!("[runtime]\nmetrics_addr = \"{addr}\""),
        &sink,
    )
    .replace("shards = ", "watch = true\npoll_seconds = 1\nshards = ");
    let job = dir.join("ops.toml");
    std::fs::write(&job, text).unwrap();
    (job, input)
}

#[test]
fn metrics_and_status_follow_a_watch_mode_run_and_agree_with_the_summary() {
    let dir = tempfile::tempdir().unwrap();
    let addr = format!("127.0.0.1:{}", free_port());
    let (job, input) = watch_job(dir.path(), &addr);
    write_small_shard(&input.join("s0.parquet"), "a", 40);
    let child = quad()
        .args(["run", "--json"])
        .arg(&job)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let first = scrape_until(&addr, |m| {
        metric(m, "quad_shards_done_total") == 1.0 && metric(m, "quad_epochs_in_flight") == 0.0
    });
    assert_eq!(metric(&first, "quad_documents_total"), 40.0, "{first}");
    let rows_line = first
        .lines()
        .find(|l| l.starts_with("quad_rows_read_total{"))
        .unwrap_or_default();
    assert!(
        rows_line.contains(r#"quad_job="ops""#) && rows_line.contains(r#"process="0""#),
        "{first}"
    );
    assert_eq!(metric(&first, "quad_rows_read_total"), 42.0, "{first}");
    let rejected = |reason: &str| {
        first
            .lines()
            .find(|l| l.contains(&format!("reason=\"{reason}\"")))
            .and_then(|l| l.rsplit(' ').next())
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(rejected("text is empty"), "1", "{first}");
    assert_eq!(rejected("duplicate id"), "1", "{first}");
    assert!(metric(&first, "quad_state_store_bytes") > 0.0, "{first}");
    // While the job runs, `quad status` reads the status file it publishes.
    let running = status_json(&job);
    assert_eq!(running["running"], true, "{running}");
    assert_eq!(running["source"], "status file");
    assert_eq!(running["shards_done"], 1);
    assert_eq!(running["documents"], 40);
    // A second run of the job waits a moment for the store (a reader may hold it), then
    // fails: the running job holds it.
    let started = Instant::now();
    let second_run = quad().args(["run", "--once"]).arg(&job).output().unwrap();
    assert_eq!(second_run.status.code(), Some(1), "{}", stderr(&second_run));
    assert!(
        stderr(&second_run).contains("already open"),
        "{}",
        stderr(&second_run)
    );
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "it did not wait"
    );

    // Shards arrive atomically: written under another name, then renamed into the glob.
    write_small_shard(&input.join("s1.tmp"), "b", 30);
    std::fs::rename(input.join("s1.tmp"), input.join("s1.parquet")).unwrap();
    let second = scrape_until(&addr, |m| metric(m, "quad_shards_done_total") == 2.0);
    assert!(metric(&second, "quad_seconds_since_last_commit") < 60.0);
    sigterm(&child);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let counted = |name: &str| metric(&second, name) as u64;
    assert_eq!(s["shards_found"], counted("quad_shards_found_total"));
    assert_eq!(s["shards_done"], counted("quad_shards_done_total"));
    assert_eq!(s["rows_read"], counted("quad_rows_read_total"));
    assert_eq!(s["documents"], counted("quad_documents_total"));
    assert_eq!(s["documents"], 70);
    assert_eq!(s["duplicates"], counted("quad_duplicate_documents_total"));
    assert_eq!(s["selected"], counted("quad_selected_documents_total"));
    assert_eq!(s["selected_tokens"], counted("quad_selected_tokens_total"));
    let rejected = s["rejected"].as_u64().unwrap() + s["duplicates"].as_u64().unwrap();
    assert_eq!(rejected, counted("quad_rejected_rows_total"));

    // Stopped: the store is read directly, and says the same.
    let stopped = status_json(&job);
    assert_eq!(stopped["running"], false, "{stopped}");
    assert_eq!(stopped["source"], "state store");
    assert_eq!(stopped["shards_done"], 2);
    assert_eq!(stopped["documents"], s["documents"]);
    assert_eq!(stopped["selected_tokens"], s["selected_tokens"]);
    let text = quad().arg("status").arg(&job).output().unwrap();
    assert!(
        String::from_utf8_lossy(&text.stdout).contains("2 done, 0 waiting, 0 quarantined"),
        "{}",
        String::from_utf8_lossy(&text.stdout)
    );
}

#[test]
fn inspect_rejects_lists_rows_duplicates_and_quarantined_shards() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    write_small_shard(&input.join("s0.parquet"), "a", 10);
    write_small_shard(&input.join("s1.parquet"), "a", 3);
    std::fs::write(input.join("s2.parquet"), "not parquet").unwrap();
    let job = write_job(
        dir.path(),
        "rej",
        &format!("{}/*.parquet", input.display()),
        1,
        "",
    );
    let out = run(&job, 1);
    assert_eq!(out.status.code(), Some(3), "{}", stderr(&out));
    let inspect = |args: &[&str]| {
        let out = quad()
            .args(["inspect", "rejects"])
            .arg(&job)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        String::from_utf8_lossy(&out.stdout).to_string()
    };
    let all = inspect(&[]);
    // s0: an empty text and a repeat of a0; s1: an empty text, a0..a2 and a0 again.
    assert!(
        all.contains("7 rejected rows, 1 quarantined shards"),
        "{all}"
    );
    assert!(all.contains("2  text is empty"), "{all}");
    assert!(all.contains("5  duplicate id"), "{all}");
    assert!(all.contains("s2.parquet: "), "{all}");
    let s0 = input.join("s0.parquet").display().to_string();
    assert!(
        all.contains("\t10\ttext\ttext is empty"),
        "the row, column and reason: {all}"
    );
    assert!(
        all.contains(&format!(
            "repeats id \"a0\" first accepted in {s0} (epoch 0)"
        )),
        "{all}"
    );
    let dups = inspect(&["--reason", "DUPLICATE", "-n", "1"]);
    assert!(
        dups.contains("5 rejected rows whose reason contains \"DUPLICATE\", the first 1 shown"),
        "{dups}"
    );
    assert_eq!(dups.matches("repeats id").count(), 1, "{dups}");
    assert!(!dups.contains("\ttext is empty"), "{dups}");
}

/// Runs `quad run --once JOB` in `cwd` with `QUAD_ASSETS` set to `assets` (unset when None).
fn run_in(cwd: &Path, job: &Path, assets: Option<&Path>) -> std::process::Output {
    let mut cmd = quad();
    cmd.current_dir(cwd).args(["run", "--once"]).arg(job);
    match assets {
        Some(dir) => cmd.env("QUAD_ASSETS", dir),
        None => cmd.env_remove("QUAD_ASSETS"),
    };
    cmd.output().unwrap()
}

#[test]
fn demo_asset_defaults_work_from_any_folder_and_say_how_to_set_them() {
    let dir = tempfile::tempdir().unwrap();
    // A clustering job with no embed.model or embed.dim: the encoder's width comes from the
    // default model's config.json. No shard matches, so nothing is embedded.
    let text = job_text(
        "anywhere",
        1,
        "nothing-here/*.parquet",
        "ratio = 0.5",
        "[cluster]\nenabled = true\nk = 2",
        Path::new("out"),
    );
    let job = dir.path().join("job.toml");
    std::fs::write(&job, text).unwrap();
    let out = run_in(dir.path(), &job, None);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let here = dir.path().join("assets-here");
    std::fs::create_dir(&here).unwrap();
    let out = run_in(dir.path(), &job, Some(&here));
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("embed.model is not set"), "{err}");
    assert!(
        err.contains(&format!("{} (from QUAD_ASSETS)", here.display())),
        "{err}"
    );
    assert!(
        err.contains("set embed.model in the job spec, or QUAD_ASSETS"),
        "{err}"
    );
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

#[test]
fn an_os_error_is_printed_once() {
    let out = quad()
        .args(["run", "/nonexistent/job.toml"])
        .output()
        .unwrap();
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert_eq!(err.matches("No such file or directory").count(), 1, "{err}");
}

//! The other commands: `quad corpus demo` (the real demo corpus, deterministic), `quad doctor`,
//! `quad inspect`, and the long-lived watch mode of `quad run`.
mod common;

use common::*;

fn corpus_job(dir: &std::path::Path, out: &str, seed: u64) -> std::path::PathBuf {
    let job = dir.join(format!("{out}.toml"));
    std::fs::write(
        &job,
        format!(
            "name = \"c\"\nseed = {seed}\n[source]\nshards = \"x\"\n[sink]\npath = \"y\"\n[corpus]\nassets = \"{}\"\nout = \"{}\"\nshards = 4\nreference_domain = \"python-docs\"\nreference_docs = 100\n",
            repo().join("assets").display(),
            dir.join(out).display()
        ),
    )
    .unwrap();
    job
}

fn ids_and_sources(path: &std::path::Path) -> Vec<(String, String)> {
    read_parquet(path)
        .iter()
        .flat_map(|b| {
            let ids = b
                .column(0)
                .as_any()
                .downcast_ref::<arrow::array::StringArray>()
                .unwrap()
                .clone();
            let sources = b
                .column(2)
                .as_any()
                .downcast_ref::<arrow::array::StringArray>()
                .unwrap()
                .clone();
            (0..b.num_rows())
                .map(move |i| (ids.value(i).to_string(), sources.value(i).to_string()))
                .collect::<Vec<_>>()
        })
        .collect()
}

#[test]
fn the_demo_corpus_is_real_mixed_and_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    for (out, seed) in [("a", 3), ("b", 3), ("c", 4)] {
        let status = quad()
            .args(["corpus", "demo"])
            .arg(corpus_job(dir.path(), out, seed))
            .output()
            .unwrap();
        assert!(status.status.success(), "{}", stderr(&status));
    }
    let shard = |out: &str, i: usize| {
        dir.path()
            .join(out)
            .join(format!("shards/shard-{i:05}.parquet"))
    };
    for i in 0..4 {
        assert_eq!(
            std::fs::read(shard("a", i)).unwrap(),
            std::fs::read(shard("b", i)).unwrap(),
            "same seed, same bytes"
        );
    }
    assert_ne!(
        std::fs::read(shard("a", 0)).unwrap(),
        std::fs::read(shard("c", 0)).unwrap(),
        "another seed shuffles differently"
    );

    let pool: Vec<(String, String)> = (0..4)
        .flat_map(|i| ids_and_sources(&shard("a", i)))
        .collect();
    assert!(pool.len() >= 20_000, "only {} documents", pool.len());
    let domains: std::collections::BTreeSet<&str> = pool.iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(domains.len(), 8, "{domains:?}");
    // Every shard mixes domains.
    assert!(
        ids_and_sources(&shard("a", 0))
            .iter()
            .map(|(_, s)| s)
            .collect::<std::collections::BTreeSet<_>>()
            .len()
            >= 6
    );
    let reference = ids_and_sources(&dir.path().join("a/reference.parquet"));
    let eval = ids_and_sources(&dir.path().join("a/eval.parquet"));
    assert_eq!(reference.len(), 100);
    assert!(reference.iter().all(|(_, s)| s == "python-docs"));
    let pool_ids: std::collections::HashSet<&str> =
        pool.iter().map(|(id, _)| id.as_str()).collect();
    assert_eq!(pool_ids.len(), pool.len(), "ids are unique");
    assert!(
        reference
            .iter()
            .chain(&eval)
            .all(|(id, _)| !pool_ids.contains(id.as_str())),
        "held-out documents are not in the pool"
    );
    assert!(eval.len() > 500);
    // The split by domain for `quad eval` holds exactly eval.parquet's documents.
    let eval_reference = ids_and_sources(&dir.path().join("a/eval-python-docs.parquet"));
    let eval_other = ids_and_sources(&dir.path().join("a/eval-other.parquet"));
    assert!(eval_reference.iter().all(|(_, s)| s == "python-docs"));
    assert!(eval_other.iter().all(|(_, s)| s != "python-docs"));
    assert!(!eval_reference.is_empty() && !eval_other.is_empty());
    let mut split: Vec<_> = eval_reference.into_iter().chain(eval_other).collect();
    let mut whole = eval.clone();
    split.sort();
    whole.sort();
    assert_eq!(split, whole);
}

#[test]
fn doctor_reports_libtorch_and_a_working_device() {
    let out = quad().arg("doctor").output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("libtorch        2.11.0"), "{text}");
    assert!(text.contains("libtorch_cpu.so"), "{text}");
    assert!(text.contains("matmul check    ok"), "{text}");
}

#[test]
fn inspect_prints_schema_rows_and_first_rows() {
    let slice = demo_slice();
    let out = quad()
        .args(["inspect", "-n", "2"])
        .arg(slice.join("shards/shard-00000.parquet"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains(&format!("rows: {}", SLICE_DOCS / SLICE_SHARDS)),
        "{text}"
    );
    assert!(
        text.contains("text: Utf8") && text.contains("first 2 rows"),
        "{text}"
    );
    let bad = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(bad.path(), "nope").unwrap();
    let out = quad().arg("inspect").arg(bad.path()).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("not a readable Parquet file"));
}

#[test]
fn watch_mode_picks_up_new_shards_and_stops_cleanly_on_sigterm() {
    let slice = demo_slice();
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in");
    std::fs::create_dir(&input).unwrap();
    std::fs::copy(
        slice.join("shards/shard-00000.parquet"),
        input.join("s0.parquet"),
    )
    .unwrap();
    let job = write_job(
        dir.path(),
        "watch",
        &format!("{}/*.parquet", input.display()),
        2,
        "",
    );
    let spec = std::fs::read_to_string(&job)
        .unwrap()
        .replace("[tokens]", "[tokens]")
        .replace("shards = ", "watch = true\npoll_seconds = 1\nshards = ");
    std::fs::write(&job, spec).unwrap();
    let sink = dir.path().join("watch");
    let child = quad()
        .args(["run", "--json", "-w", "2"])
        .arg(&job)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_outputs(&sink, 1);
    // Shards arrive atomically: written under another name, then renamed into the glob.
    std::fs::copy(
        slice.join("shards/shard-00001.parquet"),
        input.join("s1.tmp"),
    )
    .unwrap();
    std::fs::rename(input.join("s1.tmp"), input.join("s1.parquet")).unwrap();
    wait_for_outputs(&sink, 2);
    sigterm(&child);
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    let s: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(s["shards_done"], 2);
    // The slice repeats some texts: text dedup (on by default) rejects the later copies, across
    // watch cycles too.
    let kept_or_copies = ["documents", "duplicate_texts", "near_duplicates"]
        .iter()
        .map(|k| s[k].as_u64().unwrap())
        .sum::<u64>();
    assert_eq!(
        kept_or_copies,
        (2 * SLICE_DOCS / SLICE_SHARDS) as u64,
        "{s}"
    );
}

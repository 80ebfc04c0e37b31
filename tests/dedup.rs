//! Text dedup end to end (`[dedup]`): shards with planted exact copies (new ids, case and
//! spacing changed) and near copies (a word or two changed) of documents in earlier shards and
//! earlier rows. Every exact copy is rejected `duplicate-text` naming its original, near copies
//! `near-duplicate`, originals never; the same rows are kept with 1 and 2 workers and after a
//! SIGKILL and resume (the later of a pair in shard order is the one rejected).
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use common::*;
use rand::{Rng, SeedableRng};

const SHARDS: usize = 6;
const ORIGINALS: usize = 200;
const COPIES: usize = 15;

/// (id, text) of every shard; copies take originals of earlier shards or earlier rows.
fn planted_rows() -> Vec<Vec<(String, String)>> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
    let mut shards: Vec<Vec<(String, String)>> = Vec::new();
    for s in 0..SHARDS {
        let mut rows: Vec<(String, String)> = (0..ORIGINALS)
            .map(|i| {
                let len = rng.random_range(80..200);
                let words: Vec<String> = (0..len)
                    .map(|_| format!("w{}", rng.random_range(0..3000)))
                    .collect();
                (format!("doc-{s}-{i}"), words.join(" "))
            })
            .collect();
        if s > 0 {
            for c in 0..COPIES {
                // Alternate between the previous shard (the other worker's with 2 workers) and
                // this one (an earlier row).
                let from = if c % 3 == 0 {
                    s
                } else {
                    rng.random_range(0..s)
                };
                let (orig_id, text) = if from == s {
                    rows[rng.random_range(0..ORIGINALS)].clone()
                } else {
                    shards[from][rng.random_range(0..ORIGINALS)].clone()
                };
                if orig_id.starts_with("doc-") {
                    let copy = format!("  {}\n", text.to_uppercase().replace(' ', "  "));
                    rows.push((format!("copy-{s}-{c}-of-{orig_id}"), copy));
                    let mut words: Vec<String> = text.split(' ').map(str::to_string).collect();
                    let at = rng.random_range(0..words.len());
                    words[at] = "changed".into();
                    rows.push((format!("near-{s}-{c}-of-{orig_id}"), words.join(" ")));
                }
            }
        }
        shards.push(rows);
    }
    shards
}

fn write_pool(dir: &Path) -> String {
    let folder = dir.join("pool");
    std::fs::create_dir_all(&folder).unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("text", DataType::Utf8, false),
    ]));
    for (s, rows) in planted_rows().iter().enumerate() {
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.0))),
                Arc::new(StringArray::from_iter_values(rows.iter().map(|r| &r.1))),
            ],
        )
        .unwrap();
        write_shard(&folder.join(format!("shard-{s:02}.parquet")), &batch);
    }
    format!("{}/*.parquet", folder.display())
}

/// (reason, matched) of every rejected row, by its id's planted name.
fn rejects(dir: &Path, name: &str) -> BTreeMap<(u64, u64), (String, Option<String>)> {
    let store =
        quad::state::StateStore::open_existing(&dir.join(name).join("_state/quad.redb")).unwrap();
    store
        .rejects()
        .unwrap()
        .into_iter()
        .map(|(at, r)| (at, (r.reason, r.matched)))
        .collect()
}

#[test]
fn planted_copies_are_rejected_the_same_way_with_one_or_two_workers_and_after_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let glob = write_pool(dir.path());
    let one = write_job(dir.path(), "one", &glob, 3, "ratio = 1.0");
    let out = run(&one, 1);
    assert!(out.status.success(), "{}", stderr(&out));
    let s = summary(&out);
    let kept = output_rows(&dir.path().join("one"));
    let copies = kept.iter().filter(|r| r[0].starts_with("copy-")).count();
    assert_eq!(copies, 0, "every exact copy is rejected");
    let near_kept = kept.iter().filter(|r| r[0].starts_with("near-")).count();
    let planted = planted_rows()
        .iter()
        .flatten()
        .filter(|r| r.0.starts_with("near-"))
        .count();
    eprintln!("near copies kept: {near_kept} of {planted}; summary {s}");
    assert!(
        near_kept * 10 <= planted,
        "recall under 0.9: {near_kept} of {planted} kept"
    );
    assert_eq!(
        kept.iter().filter(|r| r[0].starts_with("doc-")).count(),
        SHARDS * ORIGINALS,
        "no original is rejected"
    );
    let texts = s["duplicate_texts"].as_u64().unwrap() as usize;
    assert_eq!(
        texts + s["near_duplicates"].as_u64().unwrap() as usize + kept.len(),
        s["rows_read"].as_u64().unwrap() as usize
    );
    // Each rejected row is a planted copy and names its original; epochs are the shards.
    let planted_ids = planted_rows();
    for (&(epoch, row), (reason, matched)) in &rejects(dir.path(), "one") {
        let id = &planted_ids[epoch as usize][row as usize].0;
        let original = id.split("-of-").nth(1).map(str::to_string);
        let expected = if id.starts_with("copy-") {
            "duplicate-text"
        } else {
            "near-duplicate"
        };
        assert_eq!((reason.as_str(), matched), (expected, &original), "{id}");
    }

    let two = write_job(dir.path(), "two", &glob, 3, "ratio = 1.0");
    let out = run(&two, 2);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_eq!(
        output_rows(&dir.path().join("two")),
        kept,
        "1 and 2 workers"
    );
    assert_eq!(rejects(dir.path(), "two"), rejects(dir.path(), "one"));

    let killed = write_job(dir.path(), "killed", &glob, 3, "ratio = 1.0");
    kill_mid_job(&killed, &dir.path().join("killed"));
    let out = run(&killed, 2);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(summary(&out)["shards_already_done"].as_u64().unwrap() >= 1);
    assert_eq!(
        output_rows(&dir.path().join("killed")),
        kept,
        "after a kill and resume"
    );
    assert_eq!(rejects(dir.path(), "killed"), rejects(dir.path(), "one"));
}

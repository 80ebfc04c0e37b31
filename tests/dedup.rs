//! Text dedup end to end (`[dedup]`): shards with planted exact copies (new ids, case and
//! spacing changed) and near copies (a word or two changed) of documents in earlier shards and
//! earlier rows. Every exact copy is rejected `duplicate-text` naming its original, near copies
//! `near-duplicate`, originals never; the same rows are kept with 1 and 2 workers and after a
//! SIGKILL and resume (the later of a pair in shard order is the one rejected).
mod common;

use std::collections::BTreeMap;
use std::path::Path;

use common::dedup_pool::*;
use common::*;

/// (reason, matched) of every rejected row, by its id's planted name.
fn rejects(dir: &Path, name: &str) -> BTreeMap<(u64, u64), (String, Option<String>)> {
    rejects_at(&dir.join(name).join("_state/quad.redb"))
}

#[test]
fn planted_copies_are_rejected_the_same_way_with_one_or_two_workers_and_after_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let glob = write_pool(dir.path(), &planted_rows());
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

//! Bad input: each case gets a clear message naming the file (and row and column where it
//! applies), is counted in the summary, and the job goes on with the good shards.
mod common;

use std::path::Path;
use std::sync::Arc;

use arrow::array::{ArrayRef, Int64Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use common::*;
use parquet::arrow::ArrowWriter;

fn write_shard(path: &Path, ids: &[&str], texts: &[Option<&str>]) {
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, true),
        Field::new("text", DataType::Utf8, true),
        Field::new("n", DataType::Int64, false),
    ]));
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from(ids.to_vec())),
        Arc::new(StringArray::from(texts.to_vec())),
        Arc::new(Int64Array::from_iter_values(0..ids.len() as i64)),
    ];
    let batch = RecordBatch::try_new(schema.clone(), columns).unwrap();
    let mut writer =
        ArrowWriter::try_new(std::fs::File::create(path).unwrap(), schema, None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
}

fn good_shard(path: &Path, prefix: &str, n: usize) {
    let ids: Vec<String> = (0..n).map(|i| format!("{prefix}-{i}")).collect();
    let texts: Vec<String> = (0..n)
        .map(|i| format!("document {i} of {prefix} with a few words"))
        .collect();
    write_shard(
        path,
        &ids.iter().map(String::as_str).collect::<Vec<_>>(),
        &texts.iter().map(|t| Some(t.as_str())).collect::<Vec<_>>(),
    );
}

/// A job over `dir/in/*.parquet` that keeps every document (ratio 1).
fn job(dir: &Path) -> std::path::PathBuf {
    write_job(
        dir,
        "job",
        &format!("{}/in/*.parquet", dir.display()),
        1,
        "ratio = 1.0",
    )
}

fn setup() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("in")).unwrap();
    good_shard(&dir.path().join("in/a-good.parquet"), "a", 50);
    dir
}

/// Runs the job; asserts it finished and that the good shard's 50 rows are all in the output.
fn run_and_keep_good(dir: &Path) -> (std::process::Output, serde_json::Value) {
    let out = run(&job(dir), 2);
    let s = summary(&out);
    let rows = output_rows(&dir.join("job"));
    assert!(
        rows.iter().filter(|r| r[0].starts_with("a-")).count() == 50,
        "good shard lost rows:\n{}",
        stderr(&out)
    );
    (out, s)
}

#[test]
fn a_file_that_is_not_parquet_is_quarantined() {
    let dir = setup();
    let bad = dir.path().join("in/b-notes.parquet");
    std::fs::write(&bad, "this is a text file, not Parquet\n").unwrap();
    let (out, s) = run_and_keep_good(dir.path());
    assert_eq!(out.status.code(), Some(3), "quarantine gives exit code 3");
    assert_eq!(s["shards_quarantined"], 1);
    let err = stderr(&out);
    assert!(
        err.contains("b-notes.parquet") && err.contains("not a readable Parquet file"),
        "{err}"
    );
    // Quarantined shards are not retried: the next run has nothing to do.
    let again = run(&job(dir.path()), 1);
    assert_eq!(again.status.code(), Some(0));
    assert!(stderr(&again).contains("nothing to do"));
}

#[test]
fn a_truncated_parquet_file_is_quarantined() {
    let dir = setup();
    let full = dir.path().join("full.parquet");
    good_shard(&full, "t", 500);
    let bytes = std::fs::read(&full).unwrap();
    std::fs::write(
        dir.path().join("in/b-truncated.parquet"),
        &bytes[..bytes.len() / 2],
    )
    .unwrap();
    let (out, s) = run_and_keep_good(dir.path());
    assert_eq!(s["shards_quarantined"], 1);
    assert!(
        stderr(&out).contains("b-truncated.parquet"),
        "{}",
        stderr(&out)
    );
    assert_eq!(
        output_rows(&dir.path().join("job")).len(),
        50,
        "nothing of the truncated shard is output"
    );
}

#[test]
fn a_shard_without_the_text_column_names_file_and_column() {
    let dir = setup();
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("body", DataType::Utf8, false),
    ]));
    let batch = RecordBatch::try_new(
        schema.clone(),
        vec![
            Arc::new(StringArray::from(vec!["x"])),
            Arc::new(StringArray::from(vec!["y"])),
        ],
    )
    .unwrap();
    let path = dir.path().join("in/b-nobody.parquet");
    let mut writer =
        ArrowWriter::try_new(std::fs::File::create(&path).unwrap(), schema, None).unwrap();
    writer.write(&batch).unwrap();
    writer.close().unwrap();
    let (out, s) = run_and_keep_good(dir.path());
    assert_eq!(s["shards_quarantined"], 1);
    let err = stderr(&out);
    assert!(
        err.contains("b-nobody.parquet")
            && err.contains("column 'text'")
            && err.contains("missing"),
        "{err}"
    );
}

#[test]
fn null_and_empty_texts_are_rejected_with_row_and_column() {
    let dir = setup();
    write_shard(
        &dir.path().join("in/b-holes.parquet"),
        &["h0", "h1", "h2", "h3"],
        &[Some("fine text here"), None, Some("   "), Some("also fine")],
    );
    let (out, s) = run_and_keep_good(dir.path());
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(s["rejected"], 2);
    assert_eq!(s["documents"], 52);
    let err = stderr(&out);
    assert!(
        err.contains("b-holes.parquet: row 1, column 'text': text is null"),
        "{err}"
    );
    assert!(
        err.contains("b-holes.parquet: row 2, column 'text': text is empty"),
        "{err}"
    );
    let ids: Vec<String> = output_rows(&dir.path().join("job"))
        .into_iter()
        .map(|r| r[0].clone())
        .filter(|id| id.starts_with('h'))
        .collect();
    assert_eq!(ids, ["h0", "h3"]);
}

#[test]
fn duplicate_ids_keep_the_first_row_in_shard_order() {
    let dir = setup();
    // "a-3" repeats a row of the good shard (an earlier epoch); "d1" repeats within the shard.
    write_shard(
        &dir.path().join("in/b-dups.parquet"),
        &["d1", "a-3", "d1", "d2"],
        &[Some("one"), Some("again"), Some("one more"), Some("two")],
    );
    let (out, s) = run_and_keep_good(dir.path());
    assert_eq!(s["duplicates"], 2);
    let err = stderr(&out);
    assert!(
        err.contains("b-dups.parquet: row 1, column 'id': duplicate id \"a-3\""),
        "{err}"
    );
    assert!(
        err.contains("b-dups.parquet: row 2, column 'id': duplicate id \"d1\""),
        "{err}"
    );
    let rows = output_rows(&dir.path().join("job"));
    let texts: Vec<&str> = rows
        .iter()
        .filter(|r| r[0].starts_with('d') || r[0] == "a-3")
        .map(|r| r[1].as_str())
        .collect();
    assert_eq!(texts, ["document 3 of a with a few words", "one", "two"]);
}

#[test]
fn an_empty_shard_is_fine() {
    let dir = setup();
    write_shard(&dir.path().join("in/b-empty.parquet"), &[], &[]);
    let (out, s) = run_and_keep_good(dir.path());
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert_eq!(s["shards_done"], 2);
    assert!(stderr(&out).contains("b-empty.parquet: shard has no rows"));
}

#[test]
fn a_bad_job_spec_stops_before_starting_and_names_the_key() {
    let dir = setup();
    let spec = std::fs::read_to_string(job(dir.path())).unwrap();
    let unknown = dir.path().join("unknown.toml");
    std::fs::write(&unknown, spec.replace("[select]", "[select]\nratoi = 0.5")).unwrap();
    let out = quad().arg("run").arg(&unknown).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("unknown.toml") && err.contains("unknown field `ratoi`"),
        "{err}"
    );

    let wrong = dir.path().join("wrong.toml");
    std::fs::write(
        &wrong,
        spec.replace("row_group_rows = 500", "row_group_rows = \"many\""),
    )
    .unwrap();
    let out = quad().arg("run").arg(&wrong).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(
        err.contains("wrong.toml")
            && err.contains("row_group_rows")
            && err.contains("invalid type"),
        "{err}"
    );
    assert!(!dir.path().join("job").exists(), "nothing ran");
}

#[test]
fn a_resumed_job_with_changed_selection_settings_is_refused() {
    let dir = setup();
    let job = job(dir.path());
    assert!(run(&job, 1).status.success());
    let spec = std::fs::read_to_string(&job).unwrap();
    std::fs::write(&job, spec.replace("seed = 1", "seed = 2")).unwrap();
    let out = quad().arg("run").arg(&job).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("seed"), "{}", stderr(&out));
}

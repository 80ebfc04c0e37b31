//! The dataflow end to end on a slice of the real demo corpus: same output with 1 and 2
//! workers, input rows passed through intact, seeded selection, budgets, and re-runs.
mod common;

use std::collections::HashMap;

use arrow::util::display::array_value_to_string;
use common::*;

/// Input rows by id, as text cells.
fn input_rows(glob: &str) -> HashMap<String, Vec<String>> {
    let mut rows = HashMap::new();
    for path in glob::glob(glob).unwrap() {
        for batch in read_parquet(&path.unwrap()) {
            for i in 0..batch.num_rows() {
                let cells: Vec<String> = batch
                    .columns()
                    .iter()
                    .map(|c| array_value_to_string(c, i).unwrap())
                    .collect();
                rows.insert(cells[0].clone(), cells);
            }
        }
    }
    rows
}

#[test]
fn one_and_two_workers_select_the_same_rows_and_pass_rows_through() {
    let (dir, glob) = (tempfile::tempdir().unwrap(), slice_glob());
    let one = write_job(dir.path(), "one", &glob, 11, "");
    let two = write_job(dir.path(), "two", &glob, 11, "");
    let out1 = run(&one, 1);
    assert!(out1.status.success(), "{}", stderr(&out1));
    let out2 = run(&two, 2);
    assert!(out2.status.success(), "{}", stderr(&out2));

    let rows1 = output_rows(&dir.path().join("one"));
    let rows2 = output_rows(&dir.path().join("two"));
    assert_eq!(
        rows1, rows2,
        "1 and 2 workers must select the same rows in the same files"
    );
    let names1: Vec<_> = output_files(&dir.path().join("one"))
        .iter()
        .map(|p| p.file_name().unwrap().to_owned())
        .collect();
    let names2: Vec<_> = output_files(&dir.path().join("two"))
        .iter()
        .map(|p| p.file_name().unwrap().to_owned())
        .collect();
    assert_eq!(names1, names2);

    // About ratio 0.2 of the slice is selected.
    let fraction = rows1.len() as f64 / SLICE_DOCS as f64;
    assert!(
        (0.15..0.25).contains(&fraction),
        "selected fraction {fraction}"
    );
    let s = summary(&out1);
    // The slice repeats some texts, which text dedup (on by default) rejects.
    let copies = s["duplicate_texts"].as_u64().unwrap() + s["near_duplicates"].as_u64().unwrap();
    assert_eq!(s["documents"].as_u64().unwrap() + copies, SLICE_DOCS as u64);
    assert!(copies < SLICE_DOCS as u64 / 20, "{s}");
    assert_eq!(s["selected"], rows1.len() as u64);
    assert_eq!(s["shards_done"], SLICE_SHARDS as u64);

    // Columns: the input's, then the quad_* columns of schemas/output.json.
    assert_eq!(
        output_columns(&dir.path().join("one")),
        [
            "id",
            "text",
            "source",
            "title",
            "origin",
            "quad_cluster",
            "quad_influence",
            "quad_round"
        ]
    );
    // Types and nullability follow schemas/output.json; the file is zstd-compressed.
    let first_output = &output_files(&dir.path().join("one"))[0];
    let first_input = glob::glob(&glob).unwrap().next().unwrap().unwrap();
    let expected = quad::schema::output_schema(&read_parquet(&first_input)[0].schema());
    assert_eq!(
        read_parquet(first_output)[0].schema().fields(),
        expected.fields()
    );
    let reader = parquet::file::reader::SerializedFileReader::new(
        std::fs::File::open(first_output).unwrap(),
    )
    .unwrap();
    use parquet::file::reader::FileReader;
    let codec = reader.metadata().row_group(0).column(0).compression();
    assert!(
        matches!(codec, parquet::basic::Compression::ZSTD(_)),
        "{codec:?}"
    );
    // Every output row is its input row, unchanged, plus the quad columns.
    let input = input_rows(&glob);
    for row in &rows1 {
        let original = &input[&row[0]];
        assert_eq!(
            &row[..5],
            &original[..],
            "row {} changed on the way",
            row[0]
        );
        assert_eq!(row[5], "", "random selection has no cluster");
        assert_eq!(row[6], "", "random selection has no influence");
        assert!(row[7].parse::<u64>().unwrap() < SLICE_SHARDS as u64);
    }
    // Ids are unique.
    let mut ids: Vec<_> = rows1.iter().map(|r| r[0].clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), rows1.len());

    // Re-running a finished job does nothing and says so.
    let again = run(&one, 1);
    assert!(again.status.success());
    assert!(
        stderr(&again).contains("nothing to do"),
        "{}",
        stderr(&again)
    );
    assert_eq!(summary(&again)["shards_done"], 0);
    assert_eq!(output_rows(&dir.path().join("one")), rows1);
}

#[test]
fn the_seed_fixes_the_selection() {
    let (dir, glob) = (tempfile::tempdir().unwrap(), slice_glob());
    let a = write_job(dir.path(), "a", &glob, 1, "");
    let b = write_job(dir.path(), "b", &glob, 2, "");
    assert!(run(&a, 1).status.success());
    assert!(run(&b, 1).status.success());
    let ids = |name: &str| -> Vec<String> {
        output_rows(&dir.path().join(name))
            .into_iter()
            .map(|r| r[0].clone())
            .collect()
    };
    let (ia, ib) = (ids("a"), ids("b"));
    let common = ia.iter().filter(|id| ib.contains(id)).count();
    // Two independent 20% samples share about 20% of their rows, far from all.
    assert!(
        common < ia.len() / 2,
        "seeds 1 and 2 share {common} of {} rows",
        ia.len()
    );
}

#[test]
fn a_token_budget_is_respected() {
    let (dir, glob) = (tempfile::tempdir().unwrap(), slice_glob());
    let budget = 20_000u64;
    let job = write_job(
        dir.path(),
        "budget",
        &glob,
        3,
        &format!("max_tokens = {budget}"),
    );
    let out = run(&job, 2);
    assert!(out.status.success(), "{}", stderr(&out));
    let rows = output_rows(&dir.path().join("budget"));
    let tokens: u64 = rows
        .iter()
        .map(|r| r[1].split_whitespace().count() as u64)
        .sum();
    assert!(
        tokens <= budget,
        "{tokens} tokens selected over a budget of {budget}"
    );
    // The budget binds: without it a 20% sample of the slice is far larger.
    assert!(
        tokens > budget * 9 / 10,
        "only {tokens} of {budget} tokens used"
    );
    assert_eq!(summary(&out)["selected_tokens"], tokens);
}

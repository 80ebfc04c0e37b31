//! The `dsir` strategy (importance resampling on hashed n-grams) in `quad run`, on planted
//! text: half the pool is written in the reference set's vocabulary, half in another one.
//! DSIR keeps clearly more of the reference-like half than `random` at the same ratio, the
//! same rows on 1 and 2 workers, and a resumed job (with new shards) keeps its weights.
mod common;

use std::path::Path;

use arrow::array::RecordBatch;
use common::processes::{run_processes, selected_rows};
use common::texts::string_batch;
use common::*;
use rand::{Rng, SeedableRng};

const SPORT: &[&str] = &[
    "match", "goal", "striker", "keeper", "league", "season", "coach", "penalty", "referee",
    "stadium", "fans", "cup", "final", "score", "team", "transfer", "midfield", "derby",
];
const KITCHEN: &[&str] = &[
    "flour", "butter", "oven", "recipe", "sugar", "dough", "simmer", "garlic", "onion", "sauce",
    "pepper", "bake", "whisk", "pan", "salt", "roast", "lemon", "cream",
];
const COMMON: &[&str] = &[
    "the", "a", "and", "of", "in", "with", "after", "for", "was", "is",
];

/// A text of 20 to 40 words, two in three from `vocabulary`, the rest common words.
fn text(rng: &mut rand_chacha::ChaCha8Rng, vocabulary: &[&str]) -> String {
    let n = rng.random_range(20..40);
    (0..n)
        .map(|_| {
            if rng.random_range(0..3) < 2 {
                vocabulary[rng.random_range(0..vocabulary.len())]
            } else {
                COMMON[rng.random_range(0..COMMON.len())]
            }
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn batch(ids: Vec<String>, texts: Vec<String>, kinds: Vec<&str>) -> RecordBatch {
    let kinds = kinds.into_iter().map(String::from).collect();
    string_batch(vec![("id", ids), ("text", texts), ("kind", kinds)])
}

/// Pool shard `index` (200 documents, each sport or kitchen by a seeded coin) into `dir`.
fn write_pool_shard(dir: &Path, index: usize) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(100 + index as u64);
    let (mut ids, mut texts, mut kinds) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..200 {
        let sport = rng.random_bool(0.5);
        ids.push(format!("s{index}-{i}"));
        texts.push(text(&mut rng, if sport { SPORT } else { KITCHEN }));
        kinds.push(if sport { "sport" } else { "kitchen" });
    }
    write_shard(
        &dir.join(format!("shard-{index:02}.parquet")),
        &batch(ids, texts, kinds),
    );
}

/// A reference set of 60 sport texts.
fn write_reference(path: &Path) {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let texts: Vec<String> = (0..60).map(|_| text(&mut rng, SPORT)).collect();
    let ids = (0..60).map(|i| format!("r{i}")).collect();
    write_shard(path, &batch(ids, texts, vec!["sport"; 60]));
}

fn job(dir: &Path, name: &str, shards: &Path, strategy: &str) -> std::path::PathBuf {
    let path = dir.join(format!("{name}.toml"));
    let select = format!("strategy = \"{strategy}\"\nratio = 0.5");
    let influence = format!(
        "[influence]\nreference = \"{}\"",
        dir.join("reference.parquet").display()
    );
    let glob = format!("{}/*.parquet", shards.display());
    let text = job_text(name, 3, &glob, &select, &influence, &dir.join(name));
    std::fs::write(&path, text).unwrap();
    path
}

/// The selected (id, kind) pairs, sorted.
fn selected(sink: &Path) -> Vec<(String, String)> {
    let columns = output_columns(sink);
    let at = |name: &str| columns.iter().position(|c| c == name).unwrap();
    let (id, kind) = (at("id"), at("kind"));
    let mut rows: Vec<(String, String)> = output_rows(sink)
        .into_iter()
        .map(|r| (r[id].clone(), r[kind].clone()))
        .collect();
    rows.sort();
    rows
}

fn sport_share(rows: &[(String, String)]) -> f64 {
    rows.iter().filter(|(_, k)| k == "sport").count() as f64 / rows.len() as f64
}

fn pool(dir: &Path, shards: usize) -> std::path::PathBuf {
    let pool = dir.join("pool");
    std::fs::create_dir_all(&pool).unwrap();
    for i in 0..shards {
        write_pool_shard(&pool, i);
    }
    pool
}

#[test]
fn dsir_prefers_reference_like_ngrams_on_any_number_of_workers() {
    let dir = tempfile::tempdir().unwrap();
    write_reference(&dir.path().join("reference.parquet"));
    let pool = pool(dir.path(), 4);
    let mut picks = Vec::new();
    for (name, strategy, workers) in [
        ("dsir1", "dsir", 1),
        ("dsir2", "dsir", 2),
        ("random", "random", 1),
    ] {
        let out = run(&job(dir.path(), name, &pool, strategy), workers);
        assert!(out.status.success(), "{}", stderr(&out));
        picks.push(selected(&dir.path().join(name)));
    }
    let (dsir, random) = (sport_share(&picks[0]), sport_share(&picks[2]));
    eprintln!(
        "sport share: dsir {dsir:.3} of {}, random {random:.3} of {}",
        picks[0].len(),
        picks[2].len()
    );
    assert_eq!(picks[0].len(), 400, "the top half of each shard's 200");
    assert!(dsir > 0.9, "dsir keeps the reference-like texts: {dsir}");
    assert!(random < 0.65, "random does not: {random}");
    assert_eq!(picks[0], picks[1], "1 and 2 workers select the same rows");
}

/// The weights a job's store keeps, as JSON.
fn stored_weights(sink: &Path) -> serde_json::Value {
    let store = quad::state::StateStore::open_existing(&sink.join("_state/quad.redb")).unwrap();
    store
        .run_value::<serde_json::Value>(quad::dsir::STORE_KEY)
        .unwrap()
        .expect("stored DSIR weights")
}

#[test]
fn a_resumed_job_with_new_shards_keeps_its_weights() {
    let dir = tempfile::tempdir().unwrap();
    write_reference(&dir.path().join("reference.parquet"));
    let pool = pool(dir.path(), 2);
    let growing = job(dir.path(), "growing", &pool, "dsir");
    let out = run(&growing, 1);
    assert!(out.status.success(), "{}", stderr(&out));
    let before = stored_weights(&dir.path().join("growing"));
    for i in 2..4 {
        write_pool_shard(&pool, i);
    }
    let out = run(&growing, 2);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("DSIR weights from the state store"));
    assert_eq!(summary(&out)["shards_already_done"], 2);
    assert_eq!(stored_weights(&dir.path().join("growing")), before);
    // A fresh job over the four shards fits other weights: the resumed job did not refit.
    let fresh = job(dir.path(), "fresh", &pool, "dsir");
    let out = run(&fresh, 1);
    assert!(out.status.success(), "{}", stderr(&out));
    assert_ne!(stored_weights(&dir.path().join("fresh")), before);
}

#[test]
fn dsir_selects_the_same_rows_on_two_processes() {
    let dir = tempfile::tempdir().unwrap();
    write_reference(&dir.path().join("reference.parquet"));
    let pool = pool(dir.path(), 4);
    let one = job(dir.path(), "one", &pool, "dsir");
    let out = run(&one, 1);
    assert!(out.status.success(), "{}", stderr(&out));
    // Each process reads only the shards it owns, but fits the weights on the pool's first
    // documents in shard order as one process does.
    let two = job(dir.path(), "two", &pool, "dsir");
    for (i, out) in run_processes(&[&two, &two], dir.path(), 1)
        .iter()
        .enumerate()
    {
        assert!(out.status.success(), "process {i}: {}", stderr(out));
    }
    let (one, two) = (
        selected_rows(&dir.path().join("one")),
        selected_rows(&dir.path().join("two")),
    );
    assert_eq!(one.len(), 400);
    assert!(one == two, "1 and 2 processes select the same rows");
}

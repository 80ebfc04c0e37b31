//! A pool of shards with planted copies for the dedup tests: originals of random words, exact
//! copies (new ids, case and spacing changed) and near copies (a word changed) of documents in
//! earlier shards and earlier rows, each copy's id naming its original (`copy-S-C-of-ID`,
//! `near-S-C-of-ID`).
use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow::array::{RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use rand::{Rng, SeedableRng};

use super::write_shard;

pub const SHARDS: usize = 6;
pub const ORIGINALS: usize = 200;
pub const COPIES: usize = 15;

/// (id, text) of every shard; copies take originals of earlier shards or earlier rows.
pub fn planted_rows() -> Vec<Vec<(String, String)>> {
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

/// Writes `shards` (rows of (id, text)) as `dir/pool/shard-NN.parquet`; returns their glob.
pub fn write_pool(dir: &Path, shards: &[Vec<(String, String)>]) -> String {
    let folder = dir.join("pool");
    std::fs::create_dir_all(&folder).unwrap();
    let schema = Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("text", DataType::Utf8, false),
    ]));
    for (s, rows) in shards.iter().enumerate() {
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

/// (reason, matched id) of every row a store rejected, by (epoch, row).
pub fn rejects_at(store: &Path) -> BTreeMap<(u64, u64), (String, Option<String>)> {
    quad::state::StateStore::open_existing(store)
        .unwrap()
        .rejects()
        .unwrap()
        .into_iter()
        .map(|(at, r)| (at, (r.reason, r.matched)))
        .collect()
}

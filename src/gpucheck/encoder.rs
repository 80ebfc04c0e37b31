//! The sentence encoder on the device: its vectors against the CPU's, and documents/s by
//! length, kind and batch size, apart from the tokenizer and with it.
use std::time::Instant;

use tch::{Device, Kind};

use super::device::card_rates;
use super::figures::{Figure, StepRecorder};
use super::synthetic::{self, Sizes};
use super::{CheckOptions, GpuCheckError};
use crate::embed::SentenceEncoder;

/// The goal for MiniLM in bf16 at 256 tokens on the GPU.
const TARGET_DOCS_PER_S: f64 = 30_000.0;
/// Truncation of the parity step: MiniLM's default, so long fixture texts are cut.
const PARITY_MAX_TOKENS: usize = 256;

fn load(
    dir: &std::path::Path,
    device: Device,
    max_tokens: usize,
    kind: Kind,
) -> Result<SentenceEncoder, GpuCheckError> {
    SentenceEncoder::load_with_kind(dir, device, max_tokens, kind).map_err(GpuCheckError::library)
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::BFloat16 => "bf16",
        Kind::Half => "f16",
        _ => "f32",
    }
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a
        .iter()
        .zip(b)
        .map(|(x, y)| f64::from(*x) * f64::from(*y))
        .sum();
    let norm = |v: &[f32]| v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (norm(a) * norm(b)).max(f64::MIN_POSITIVE)
}

/// The fixture texts through the encoder in f32 on the CPU and in f32 and bf16 on the device:
/// the lowest cosine of each kind against the CPU.
pub(super) fn parity(rec: &mut StepRecorder, opts: &CheckOptions) -> Result<(), GpuCheckError> {
    let (dir, real) = synthetic::encoder_dir(opts)?;
    rec.push(Figure::text(
        "weights",
        synthetic::encoder_weights_note(real),
    ))?;
    let texts = synthetic::fixture_texts(opts)?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let encode = |device, kind| {
        load(&dir, device, PARITY_MAX_TOKENS, kind)?
            .encode(&refs, 8)
            .map_err(GpuCheckError::library)
    };
    let reference = encode(Device::Cpu, Kind::Float)?;
    for (kind, tolerance) in [(Kind::Float, 0.99999), (Kind::BFloat16, 0.999)] {
        let vectors = encode(opts.device, kind)?;
        let worst = reference
            .iter()
            .zip(&vectors)
            .map(|(a, b)| cosine(a, b))
            .fold(f64::INFINITY, f64::min);
        let name = format!(
            "cosine {} {} vs CPU f32, lowest of {} texts",
            opts.device_label(),
            kind_name(kind),
            texts.len()
        );
        rec.push(Figure::number(name, worst, "").at_least(tolerance))?;
    }
    Ok(())
}

/// `docs` token sequences of exactly `len` tokens (special tokens included), cycling through
/// those of the tokenized texts that fill the length.
fn full_length_ids(
    tokenized: &[Vec<u32>],
    len: usize,
    docs: usize,
) -> Result<Vec<Vec<u32>>, GpuCheckError> {
    let full: Vec<&Vec<u32>> = tokenized.iter().filter(|t| t.len() == len).collect();
    if full.is_empty() {
        return Err(GpuCheckError::Measurement(format!(
            "no text of the slice fills {len} tokens"
        )));
    }
    Ok((0..docs).map(|i| full[i % full.len()].clone()).collect())
}

/// Documents/s of the encoder alone, by kind, length and batch size; the encoder's FLOPs per
/// document and the fraction of the card's matrix-product rate the best batch reaches; then
/// the tokenizer's documents/s and `encode` (tokenizer and encoder) at the largest batch.
pub(super) fn speed(
    rec: &mut StepRecorder,
    opts: &CheckOptions,
    sizes: &Sizes,
) -> Result<(), GpuCheckError> {
    let (dir, real) = synthetic::encoder_dir(opts)?;
    rec.push(Figure::text(
        "weights",
        synthetic::encoder_weights_note(real),
    ))?;
    let rates = card_rates(opts, sizes);
    let longest = sizes.encoder_lengths.iter().copied().max().unwrap_or(256);
    // Words per text: enough that every text fills the longest length (WordPiece gives more
    // than one token a word on average).
    let texts = synthetic::long_texts(opts, sizes.encoder_texts, longest)?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    for &len in &sizes.encoder_lengths {
        for kind in [Kind::Float, Kind::BFloat16] {
            let encoder = load(&dir, opts.device, len, kind)?;
            let tokenized = encoder.tokenize(&refs).map_err(GpuCheckError::library)?;
            let flops = crate::cost::embed_flops(encoder.shape(), [len as u64]);
            if kind == Kind::Float {
                let name = format!("GFLOP per document, {len} tokens");
                rec.push(Figure::number(name, flops / 1e9, "GFLOP"))?;
            }
            let mut best = 0.0f64;
            for &batch in &sizes.encoder_batches {
                let docs = sizes.encoder_min_docs.max(4 * batch);
                let ids = full_length_ids(&tokenized, len, docs)?;
                encoder
                    .encode_ids(&ids[..batch], batch)
                    .map_err(GpuCheckError::library)?;
                let start = Instant::now();
                encoder
                    .encode_ids(&ids, batch)
                    .map_err(GpuCheckError::library)?;
                let rate = docs as f64 / start.elapsed().as_secs_f64();
                best = best.max(rate);
                let name = format!("{} {len} tokens, batch {batch}", kind_name(kind));
                rec.push(Figure::number(name, rate, "docs/s"))?;
            }
            let share = best * flops / rates.of(kind);
            let name = format!(
                "{} {len} tokens, best batch: share of the {} matmul rate",
                kind_name(kind),
                kind_name(kind)
            );
            rec.push(Figure::number(name, share, "fraction"))?;
            if kind == Kind::BFloat16 && len == 256 && opts.device.is_cuda() {
                let name = "bf16 256 tokens, best batch (the issue's goal)";
                rec.push(Figure::number(name, best, "docs/s").target_at_least(TARGET_DOCS_PER_S))?;
            }
        }
    }
    end_to_end(rec, opts, sizes, &dir, &refs, longest)
}

/// The tokenizer alone, and `encode` (tokenizer and encoder) in bf16 at the longest length
/// and the largest batch: what a job sees.
fn end_to_end(
    rec: &mut StepRecorder,
    opts: &CheckOptions,
    sizes: &Sizes,
    dir: &std::path::Path,
    texts: &[&str],
    len: usize,
) -> Result<(), GpuCheckError> {
    let encoder = load(dir, opts.device, len, Kind::BFloat16)?;
    let start = Instant::now();
    encoder.tokenize(texts).map_err(GpuCheckError::library)?;
    let rate = texts.len() as f64 / start.elapsed().as_secs_f64();
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let name = format!("tokenizer alone, {len} tokens ({threads} CPU threads)");
    rec.push(Figure::number(name, rate, "docs/s"))?;
    // A middle batch size, so that the texts make several batches.
    let batch = sizes.encoder_batches[sizes.encoder_batches.len() / 2];
    encoder
        .encode(&texts[..batch.min(texts.len())], batch)
        .map_err(GpuCheckError::library)?;
    let start = Instant::now();
    encoder
        .encode(texts, batch)
        .map_err(GpuCheckError::library)?;
    let rate = texts.len() as f64 / start.elapsed().as_secs_f64();
    let name = format!("encode (tokenizer + encoder) bf16 {len} tokens, batch {batch}");
    rec.push(Figure::number(name, rate, "docs/s"))
}

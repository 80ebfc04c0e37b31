//! Influence on the device: the tiny Llama's scores against the CPU's through the job's own
//! setup (`build_scorer`), then documents/s at SmolLM2-135M's shapes in f32 and bf16, with the
//! FLOPs counted from the shapes and the share of the card's matrix-product rate.
use std::time::Instant;

use tch::Kind;

use super::bundle::layout;
use super::device::{card_rates, synchronize};
use super::figures::{Figure, StepRecorder};
use super::synthetic::{self, Sizes};
use super::{CheckOptions, GpuCheckError};
use crate::influence::factors::Damping;
use crate::influence::scorer::{
    fit_factors, flops_per_token, FitSettings, InfluenceScorer, ReferenceGradient, ScorerSettings,
};
use crate::influence::setup::{build_scorer, FitPool};
use crate::influence::{Convention, Fisher, InfluenceConfig, Preconditioner, Stacking};
use crate::model::CausalLm;

/// The parity tolerance: relative L2 distance of the device's scores from the CPU's in f32.
const PARITY_TOLERANCE: f64 = 1e-4;
/// Kronfluence 1.0.1 on an H200 for 512-token documents of SmolLM2-135M's shapes (the issue's
/// anchor).
const KRONFLUENCE_DOCS_PER_S: f64 = 38.7;
/// The goal: this share of the 6 x parameters x tokens floor of the bf16 rate.
const TARGET_FLOOR_SHARE: f64 = 0.4;
const SEED: u64 = 1;

/// The tiny Llama's `[influence]` section on `device`, fitted on the slice: empirical Fisher,
/// so that both devices fit on the same labels (sampled labels come from the model's
/// probabilities, which differ in the last bits between devices).
fn parity_config(opts: &CheckOptions, device: String) -> Result<InfluenceConfig, GpuCheckError> {
    let slice = opts.bundle.join(layout::SLICE);
    let cache = opts.work.join(format!("factors-{device}"));
    let spec = serde_json::json!({
        "model": opts.bundle.join(layout::TINY_LLAMA),
        "device": device,
        "dtype": "f32",
        "window": 64,
        "max_tokens": 64,
        "batch": 16,
        "fisher": "empirical",
        "reference": slice.join("reference.parquet"),
        "reference_docs": 40,
        "fit_pool_docs": 40,
        "factor_cache": cache,
    });
    serde_json::from_value(spec).map_err(|e| GpuCheckError::invalid(&slice, e))
}

/// The fixture texts scored by the tiny Llama on the CPU and on the device (each fits its own
/// factors and reference gradient): the relative L2 distance of the scores.
pub(super) fn parity(rec: &mut StepRecorder, opts: &CheckOptions) -> Result<(), GpuCheckError> {
    let source = synthetic::slice_source(opts, "*.parquet")?;
    let texts = synthetic::fixture_texts(opts)?;
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let mut scores = Vec::new();
    for device in ["cpu".to_string(), opts.device_setting()] {
        let cfg = parity_config(opts, device)?;
        let mut scorer = build_scorer(&cfg, &source, FitPool::Glob(&source.shards), SEED)?;
        let s: Vec<f64> = scorer
            .score(&refs)?
            .iter()
            .map(|d| d.value().unwrap_or(f64::NAN))
            .collect();
        scores.push(s);
    }
    let (cpu, dev) = (&scores[0], &scores[1]);
    let diff: f64 = cpu
        .iter()
        .zip(dev)
        .map(|(a, b)| (a - b).powi(2))
        .sum::<f64>()
        .sqrt();
    let norm: f64 = cpu.iter().map(|a| a * a).sum::<f64>().sqrt();
    let name = format!("tiny Llama, {} texts: RMS of the CPU scores", texts.len());
    rec.push(Figure::number(name, norm / (cpu.len() as f64).sqrt(), ""))?;
    let name = format!(
        "relative L2 distance, {} vs CPU scores, f32",
        opts.device_label()
    );
    let relative = diff / norm.max(f64::MIN_POSITIVE);
    rec.push(Figure::number(name, relative, "").at_most(PARITY_TOLERANCE))
}

fn fit_settings(window: usize, batch: usize) -> FitSettings {
    FitSettings {
        fisher: Fisher::True,
        convention: Convention::Quad,
        qkv: Stacking::Stacked,
        gate_up: Stacking::Separate,
        ekfac: false,
        window,
        batch,
        seed: SEED,
    }
}

fn scorer_settings(window: usize, batch: usize) -> ScorerSettings {
    ScorerSettings {
        preconditioner: Preconditioner::Kfac,
        damping: Damping::Relative(0.1),
        window,
        batch,
        normalise: false,
        sketch_dim: None,
        max_tokens: None,
        seed: SEED,
    }
}

/// Documents/s of scoring `batches` batches of documents of exactly `len` tokens, after one
/// warm-up batch.
fn docs_per_second(
    scorer: &mut InfluenceScorer,
    len: usize,
    batch: usize,
    batches: usize,
) -> Result<f64, GpuCheckError> {
    let vocab = scorer.model().config.vocab_size;
    let device = scorer.model().device();
    scorer.score_tokens(&synthetic::random_token_docs(batch, len, vocab, 3))?;
    let docs = synthetic::random_token_docs(batch * batches, len, vocab, 4);
    synchronize(device);
    let start = Instant::now();
    scorer.score_tokens(&docs)?;
    synchronize(device);
    Ok(docs.len() as f64 / start.elapsed().as_secs_f64())
}

/// K-FAC factors and the reference gradient are fitted once (f32, the first length; their
/// cost is not what is measured), then each kind and length is scored with them.
pub(super) fn speed(
    rec: &mut StepRecorder,
    opts: &CheckOptions,
    sizes: &Sizes,
) -> Result<(), GpuCheckError> {
    let cfg = &sizes.influence_model;
    let params = cfg.parameter_count() as f64;
    let name = format!("model: {}", sizes.influence_model_name);
    rec.push(Figure::number(name, params / 1e6, "M parameters"))?;
    let rates = card_rates(opts, sizes);
    let (fit_len, fit_batch) = sizes.influence_runs[0];
    let model = CausalLm::random(
        cfg,
        synthetic::any_tokenizer(opts)?,
        opts.device,
        Kind::Float,
        9,
    );
    let start = Instant::now();
    let fit_docs = synthetic::random_token_docs(fit_batch.min(8), fit_len, cfg.vocab_size, 1);
    let factors = fit_factors(&model, &fit_docs, &fit_settings(fit_len, fit_batch))?;
    let reference = synthetic::random_token_docs(2, fit_len, cfg.vocab_size, 2);
    let v = ReferenceGradient::compute(&model, &reference, fit_len, fit_batch)?;
    synchronize(opts.device);
    let name = format!(
        "K-FAC fit (f32, {} docs x {fit_len} tokens) and reference gradient",
        fit_docs.len()
    );
    rec.push(Figure::number(name, start.elapsed().as_secs_f64(), "s"))?;
    let mut model = Some(model);
    for kind in [Kind::Float, Kind::BFloat16] {
        let mut m = model
            .take()
            .expect("the model comes back after every measurement");
        m.vs.set_kind(kind);
        for &(len, batch) in &sizes.influence_runs {
            let mut scorer =
                InfluenceScorer::new(m, Some(&factors), &v, scorer_settings(len, batch))?;
            let rate = docs_per_second(&mut scorer, len, batch, sizes.influence_timed_batches)?;
            m = scorer.into_model();
            record_rate(rec, opts, sizes, (kind, len, batch), rate, rates.of(kind))?;
            if kind == Kind::BFloat16 {
                let floor_rate = rates.bf16 / (6.0 * params * len as f64);
                let name = format!("bf16 {len} tokens: share of the 6 x parameters x tokens floor");
                let share = Figure::number(name, rate / floor_rate, "fraction");
                rec.push(share.target_at_least(TARGET_FLOOR_SHARE))?;
            }
        }
        model = Some(m);
    }
    Ok(())
}

/// The documents/s of one kind and length, with the FLOPs per document counted from the
/// shapes and the share of the card's matrix-product rate of that kind.
fn record_rate(
    rec: &mut StepRecorder,
    opts: &CheckOptions,
    sizes: &Sizes,
    (kind, len, batch): (Kind, usize, usize),
    rate: f64,
    card_rate: f64,
) -> Result<(), GpuCheckError> {
    let kind_name = if kind == Kind::BFloat16 {
        "bf16"
    } else {
        "f32"
    };
    let flops = flops_per_token(&sizes.influence_model, len) * (len - 1) as f64;
    if kind == Kind::Float {
        let name = format!(
            "FLOPs per document, {len} tokens (flops_per_token x {})",
            len - 1
        );
        rec.push(Figure::number(name, flops / 1e9, "GFLOP"))?;
    }
    let name = format!("{kind_name} {len} tokens, batch {batch}");
    rec.push(Figure::number(name, rate, "docs/s"))?;
    let name =
        format!("{kind_name} {len} tokens: share of the {kind_name} matmul rate (counted FLOPs)");
    rec.push(Figure::number(name, rate * flops / card_rate, "fraction"))?;
    if kind == Kind::BFloat16 && len == 512 && opts.device.is_cuda() {
        let name = "bf16 512 tokens: times Kronfluence 1.0.1 (38.7 docs/s on an H200)";
        rec.push(Figure::number(name, rate / KRONFLUENCE_DOCS_PER_S, "x"))?;
    }
    Ok(())
}

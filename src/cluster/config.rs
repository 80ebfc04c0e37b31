//! The `[cluster]` section of the job spec (DESIGN 1.1) and its `[cluster.tune]` settings.
use serde::{Deserialize, Serialize};

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
    /// The initial fit runs on a seeded uniform sample (Algorithm R) of this many of the
    /// documents held before it.
    #[serde(default = "default_cluster_reservoir")]
    pub reservoir: usize,
    /// Documents held (in shard and row order, with their vectors) before the initial fit,
    /// which samples `reservoir` of them; default 4 x `reservoir`. A fixed run with fewer fits
    /// at its last shard. A larger window spans more shards (sorted shards bias a window that
    /// covers one) at the cost of holding its vectors until the fit.
    #[serde(default)]
    pub fit_window: Option<usize>,
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
            fit_window: None,
            max_iter: default_cluster_max_iter(),
            tol: default_cluster_tol(),
            backend: default_cluster_backend(),
            learning_rate_floor: 0.0,
            tune: TuneKConfig::default(),
        }
    }
}

impl ClusterConfig {
    /// Documents held before the initial fit (see `fit_window`).
    pub fn fit_window(&self) -> usize {
        self.fit_window.unwrap_or(self.reservoir.saturating_mul(4))
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.k == 0 || self.k_max < self.k {
            return Err(format!(
                "cluster.k must be positive and at most cluster.k_max (k = {}, k_max = {})",
                self.k, self.k_max
            ));
        }
        if self.fit_window() < self.reservoir {
            return Err(format!(
                "cluster.fit_window ({}) must be at least cluster.reservoir ({})",
                self.fit_window(),
                self.reservoir
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

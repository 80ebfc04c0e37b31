//! Influence scores with K-FAC / EK-FAC, attention included (DESIGN.md 1.3).
//!
//! I(z) = v^T H^-1 grad L(z), v the mean gradient of the reference documents, H block-diagonal
//! with one Kronecker block A (x) G per tracked linear layer (Q, K and V of a layer form one
//! block). Sign: a positive score means an SGD step on z lowers the reference loss (to first
//! order, a step -lr H^-1 grad L(z) changes the reference loss by -lr I(z)).
//!
//! `factors` fits and preconditions, `score` holds the per-token kernels, `sketch` the
//! Kronecker gradient sketches, `scorer` runs the model: one forward and one backward per
//! batch of documents, never a per-document gradient. `operator` is the stage in the job's
//! Quad loop: each round's samples scored on worker 0, the scores fed back to the bandit.
pub mod cache;
pub mod factors;
pub mod loss;
pub mod operator;
pub mod score;
pub mod scorer;
pub mod setup;
pub mod sketch;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

pub use factors::{BlockLayout, Damping, KfacFactors};
pub use scorer::{DocScore, InfluenceScorer, ReferenceGradient, Unscorable};

/// Why influence could not be computed.
#[derive(Debug, thiserror::Error)]
pub enum InfluenceError {
    #[error(transparent)]
    Model(#[from] crate::error::ModelError),
    #[error("fitting the K-FAC factors: {0}")]
    Fit(String),
    #[error("factor cache {path}: {message}")]
    Cache { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    Input { path: PathBuf, message: String },
    #[error("influence settings: {0}")]
    Settings(String),
    #[error("reading the factor-fitting pool sample: {0}")]
    PoolSample(String),
    #[error("libtorch: {0}")]
    Torch(#[from] tch::TchError),
}

/// Which Fisher the G factors estimate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fisher {
    /// Labels sampled from the model's own softmax (seeded): the Fisher that approximates the
    /// Gauss-Newton Hessian.
    True,
    /// The documents' own next tokens.
    Empirical,
}

/// Whether the parts of a fused projection form one K-FAC block or one block each.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Stacking {
    /// One block over the stacked output gradients (keeps their cross-covariances).
    Stacked,
    /// One block per part (what Kronfluence and the authors' code do for Q, K, V).
    Separate,
}

/// Which definition of the factors the fit follows. Both score I(z) = v^T H^-1 grad L(z) with v
/// the mean over reference documents of the gradient of each one's mean loss; they differ in
/// how A, G and the EK-FAC eigenvalues are taken (README, *Influence*).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Convention {
    /// g_t from each token's own loss; A and G averaged over the predicted tokens; EK-FAC
    /// eigenvalues averaged over windows, each window's gradient that of its summed token loss.
    Quad,
    /// Kronfluence 1.0.1: g_t from the gradient of each example's (window's) mean loss; A and G
    /// averaged over every input position (padding masked); EK-FAC eigenvalues averaged over
    /// examples.
    Kronfluence,
}

/// What H^-1 is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Preconditioner {
    /// (A (x) G + delta I)^-1 per block.
    Kfac,
    /// K-FAC's eigenbasis with the corrected eigenvalues E_n[(Q_G^T G_n Q_A)^2], G_n the weight
    /// gradient of example (window) n.
    Ekfac,
    /// No preconditioning: I(z) = v . grad L(z).
    Identity,
}

/// The `[influence]` section of a job spec.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InfluenceConfig {
    /// A Hugging Face directory or a .gguf file: the warmed-up proxy by default.
    #[serde(default = "default_model")]
    pub model: PathBuf,
    /// "auto" (CUDA when available), "cpu", "cuda" or "cuda:N".
    #[serde(default = "default_device")]
    pub device: String,
    /// "f32", "f64", "bf16" or "f16"; factors and the reference gradient are float64 anyway.
    #[serde(default = "default_dtype")]
    pub dtype: String,
    /// Window length L in tokens; longer documents are split into windows.
    #[serde(default = "default_window")]
    pub window: usize,
    /// Only the first N tokens of every document (reference, fitting and scored) are used;
    /// all when absent.
    #[serde(default)]
    pub max_tokens: Option<usize>,
    /// Windows per forward/backward pass.
    #[serde(default = "default_batch")]
    pub batch: usize,
    #[serde(default = "default_preconditioner")]
    pub preconditioner: Preconditioner,
    /// delta = damping_factor x mean eigenvalue product of each block, unless `damping` is set.
    #[serde(default = "default_damping_factor")]
    pub damping_factor: f64,
    /// An explicit delta for every block (for comparisons with other tools).
    #[serde(default)]
    pub damping: Option<f64>,
    #[serde(default = "default_fisher")]
    pub fisher: Fisher,
    /// How A, G and the EK-FAC eigenvalues are defined: quad's or Kronfluence 1.0.1's.
    #[serde(default = "default_convention")]
    pub convention: Convention,
    #[serde(default = "default_stacked")]
    pub qkv: Stacking,
    #[serde(default = "default_separate")]
    pub gate_up: Stacking,
    /// Divide each score by ||grad L(z)|| (also written as `norm`).
    #[serde(default)]
    pub normalise: bool,
    /// Side s of the Kronecker gradient sketch (s x s per layer); none when absent.
    #[serde(default)]
    pub sketch_dim: Option<i64>,
    /// Where fitted factors are cached; `<model>.factors/` next to the model when absent.
    #[serde(default)]
    pub factor_cache: Option<PathBuf>,
    /// The reference set (Parquet with id and text columns).
    #[serde(default = "default_reference")]
    pub reference: PathBuf,
    /// Use at most this many reference documents (all when absent).
    #[serde(default)]
    pub reference_docs: Option<usize>,
    /// Pool documents (a seeded sample of the job's shards) added to the reference set to fit
    /// the factors.
    #[serde(default = "default_fit_pool_docs")]
    pub fit_pool_docs: usize,
}

impl Default for InfluenceConfig {
    fn default() -> Self {
        toml::from_str("").expect("every influence setting has a default")
    }
}

fn default_model() -> PathBuf {
    "data/demo/proxy".into()
}
fn default_device() -> String {
    "auto".into()
}
fn default_dtype() -> String {
    "f32".into()
}
fn default_window() -> usize {
    512
}
fn default_batch() -> usize {
    8
}
fn default_preconditioner() -> Preconditioner {
    Preconditioner::Kfac
}
fn default_damping_factor() -> f64 {
    0.1
}
fn default_fisher() -> Fisher {
    Fisher::True
}
fn default_convention() -> Convention {
    Convention::Quad
}
fn default_stacked() -> Stacking {
    Stacking::Stacked
}
fn default_separate() -> Stacking {
    Stacking::Separate
}
fn default_reference() -> PathBuf {
    "data/demo/reference.parquet".into()
}
fn default_fit_pool_docs() -> usize {
    200
}

impl InfluenceConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.window < 2 {
            return Err(format!(
                "influence.window must be at least 2, got {}",
                self.window
            ));
        }
        if self.batch == 0 {
            return Err("influence.batch must be positive".into());
        }
        if !(self.damping_factor > 0.0) {
            return Err(format!(
                "influence.damping_factor must be > 0, got {}",
                self.damping_factor
            ));
        }
        if let Some(d) = self.damping {
            if !(d > 0.0) {
                return Err(format!("influence.damping must be > 0, got {d}"));
            }
        }
        if let Some(s) = self.sketch_dim {
            if s <= 0 {
                return Err(format!("influence.sketch_dim must be positive, got {s}"));
            }
        }
        crate::influence::scorer::parse_kind(&self.dtype)?;
        crate::influence::scorer::parse_device(&self.device)?;
        Ok(())
    }

    pub fn damping_rule(&self) -> Damping {
        match self.damping {
            Some(d) => Damping::Absolute(d),
            None => Damping::Relative(self.damping_factor),
        }
    }
}

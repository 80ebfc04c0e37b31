//! Typed errors of the library; the binary turns them into messages and exit codes.
use std::path::PathBuf;

/// Why a shard could not be used. The shard is quarantined and the job goes on.
#[derive(Debug, thiserror::Error)]
pub enum ShardError {
    #[error("{path}: not a readable Parquet file: {reason}")]
    NotParquet { path: PathBuf, reason: String },
    #[error("{path}: row group {row_group} is corrupt or truncated: {reason}")]
    Corrupt {
        path: PathBuf,
        row_group: usize,
        reason: String,
    },
    #[error("{path}: column '{column}' ({role}) is missing; the shard has columns [{present}]")]
    MissingColumn {
        path: PathBuf,
        column: String,
        role: &'static str,
        present: String,
    },
    #[error("{path}: column '{column}' has type {found}, expected one of {expected}")]
    WrongType {
        path: PathBuf,
        column: String,
        found: String,
        expected: String,
    },
    #[error("{path}: column '{column}' uses the reserved output prefix 'quad_'")]
    ReservedColumn { path: PathBuf, column: String },
    #[error("{path}: cannot open: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
}

/// A job spec that cannot be used. The job does not start.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("{path}: cannot read the job spec: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: invalid job spec: {message}")]
    Invalid { path: PathBuf, message: String },
}

/// Failures of the state store.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("state store {path}: {message}")]
    Store { path: PathBuf, message: String },
    #[error("state store {path} belongs to a different job spec (its selection settings changed: {changed}); use a new sink path or `quad run --reset`")]
    SpecChanged { path: PathBuf, changed: String },
    #[error("state store {path} has table layout {found}, this build reads layout {expected} (it was written by another version of quad); use a new sink path or `quad run --reset`")]
    Layout {
        path: PathBuf,
        found: String,
        expected: &'static str,
    },
}

impl StateError {
    pub fn store(path: &std::path::Path, err: impl std::fmt::Display) -> Self {
        StateError::Store {
            path: path.to_path_buf(),
            message: err.to_string(),
        }
    }
}

/// Failures of clustering (bad vectors or settings).
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("clustering: {0}")]
    Invalid(String),
    #[error("clustering: linfa k-means failed: {0}")]
    Linfa(String),
    #[error("clustering: tch: {0}")]
    Tch(#[from] tch::TchError),
}

/// A causal LM that cannot be loaded, saved or run.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("{path}: cannot read: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("{path}: unsupported model: {message}")]
    Unsupported { path: PathBuf, message: String },
    #[error("{path}: tensor '{tensor}': {message}")]
    Tensor {
        path: PathBuf,
        tensor: String,
        message: String,
    },
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error("{context}: {cause}")]
    Torch {
        context: String,
        cause: tch::TchError,
    },
}

impl ModelError {
    pub fn invalid(path: &std::path::Path, message: impl std::fmt::Display) -> Self {
        ModelError::Invalid {
            path: path.to_path_buf(),
            message: message.to_string(),
        }
    }
    pub fn unsupported(path: &std::path::Path, message: impl std::fmt::Display) -> Self {
        ModelError::Unsupported {
            path: path.to_path_buf(),
            message: message.to_string(),
        }
    }
    pub fn tensor(path: &std::path::Path, tensor: &str, message: impl std::fmt::Display) -> Self {
        ModelError::Tensor {
            path: path.to_path_buf(),
            tensor: tensor.to_string(),
            message: message.to_string(),
        }
    }
    pub fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        ModelError::Io {
            path: path.to_path_buf(),
            cause: source,
        }
    }
}

/// How a stage's operator reports a failure from any worker or thread of a job: the job's
/// operators then stop acting, the dataflow drains and the job ends with the first failure.
pub type Fail = std::sync::Arc<dyn Fn(anyhow::Error) + Send + Sync>;

/// Whether the job has failed (then an operator neither commits nor plans again).
pub type Failed = std::sync::Arc<dyn Fn() -> bool + Send + Sync>;

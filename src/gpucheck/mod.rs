//! The prepared GPU check (README, "Measuring on a GPU"): one short run that measures every
//! CUDA figure of quad on a machine that has libtorch and a GPU but no Rust toolchain and no
//! network, and takes at most 64 MiB of files.
//!
//! `quad gpu-check bundle DIR` gathers what the run needs into one folder: this binary,
//! `gpu-check.sh`, the encoder's config and tokenizer, a tiny random Llama, the SmolLM2
//! tokenizer and a slice of the demo corpus. There, `gpu-check.sh` runs every [`Step`] as its
//! own `quad gpu-check step` process under a time limit, so a step that fails, hangs or breaks
//! the CUDA context costs only its own figures; `quad gpu-check report` then prints one table
//! and writes the JSON of every figure.
//!
//! Models too large to carry are generated at check time with random weights of the real
//! shapes, since their cost does not depend on the weights: MiniLM (91 MB of weights), the
//! SmolLM2-135M shapes of the influence speed step and the demo's proxy.
mod bundle;
mod device;
mod encoder;
mod figures;
mod influence;
mod kmeans;
mod quadloop;
mod synthetic;

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use tch::Device;

pub use bundle::{write_bundle, BundleReport, MAX_BUNDLE_BYTES};
pub use figures::{assemble_report, Bound, CheckReport, Figure, Status, StepRecord, Value};

use figures::StepRecorder;

/// Why a step or the bundle could not be made.
#[derive(Debug, thiserror::Error)]
pub enum GpuCheckError {
    #[error("{path}: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    /// The device is missing, or a measurement came out unusable.
    #[error("{0}")]
    Measurement(String),
    /// The encoder and the corpus builder report with anyhow; their message is kept whole.
    #[error("{0}")]
    Library(String),
    #[error(transparent)]
    Model(#[from] crate::model::ModelError),
    #[error(transparent)]
    Influence(#[from] crate::influence::InfluenceError),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::ClusterError),
    #[error("tch: {0}")]
    Torch(#[from] tch::TchError),
}

impl GpuCheckError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        GpuCheckError::Io {
            path: path.to_path_buf(),
            cause: source,
        }
    }

    pub(crate) fn invalid(path: &Path, message: impl std::fmt::Display) -> Self {
        GpuCheckError::Invalid {
            path: path.to_path_buf(),
            message: message.to_string(),
        }
    }

    /// An anyhow error of the encoder or the corpus builder, with its whole context chain.
    pub(crate) fn library(err: anyhow::Error) -> Self {
        GpuCheckError::Library(format!("{err:#}"))
    }
}

/// The steps, in the order the table shows them (the order).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "kebab-case")]
pub enum Step {
    /// `quad doctor`, the card and the CPU.
    Doctor,
    /// The card's bf16 and f32 matrix-product rates: the ceilings the other figures are
    /// compared with.
    Matmul,
    /// Encoder vectors on the device against the CPU in f32, f32 and bf16.
    EncoderParity,
    /// Encoder documents/s by length, kind and batch size.
    EncoderSpeed,
    /// k-means with many rows (1M x 384, k = 1,000).
    KmeansManyDocs,
    /// k-means with many clusters (100k x 384, k = 10,000).
    KmeansManyClusters,
    /// Influence scores of the tiny Llama on the device against the CPU.
    InfluenceParity,
    /// Influence documents/s at SmolLM2-135M shapes.
    InfluenceSpeed,
    /// The demo job's Quad loop end to end (`quad run`).
    QuadLoop,
}

impl Step {
    /// Every step in table order.
    pub const ALL: [Step; 9] = [
        Step::Doctor,
        Step::Matmul,
        Step::EncoderParity,
        Step::EncoderSpeed,
        Step::KmeansManyDocs,
        Step::KmeansManyClusters,
        Step::InfluenceParity,
        Step::InfluenceSpeed,
        Step::QuadLoop,
    ];

    /// The order the script runs them in: cheap and decisive first, the k-means fits (whose
    /// CPU seeding time depends most on the machine) last, so an overrun costs the least.
    pub const RUN_ORDER: [Step; 9] = [
        Step::Doctor,
        Step::Matmul,
        Step::EncoderParity,
        Step::InfluenceParity,
        Step::EncoderSpeed,
        Step::InfluenceSpeed,
        Step::QuadLoop,
        Step::KmeansManyClusters,
        Step::KmeansManyDocs,
    ];

    /// The name on the command line, in file names and in the JSON.
    pub fn name(self) -> String {
        clap::ValueEnum::to_possible_value(&self)
            .map(|v| v.get_name().to_string())
            .unwrap_or_default()
    }

    /// Wall-clock limit of the step's process, in seconds. The full limits add up to more
    /// than the check's budget on purpose: the script also stops starting steps when the
    /// budget is spent, and most steps finish well within theirs.
    pub fn limit_seconds(self, quick: bool) -> u64 {
        let (full, quick_limit) = match self {
            Step::Doctor => (60, 60),
            Step::Matmul => (60, 60),
            Step::EncoderParity => (90, 90),
            Step::EncoderSpeed => (150, 90),
            Step::KmeansManyDocs => (180, 90),
            Step::KmeansManyClusters => (150, 90),
            Step::InfluenceParity => (90, 90),
            Step::InfluenceSpeed => (150, 90),
            Step::QuadLoop => (180, 150),
        };
        if quick {
            quick_limit
        } else {
            full
        }
    }
}

/// The whole check's time budget in seconds: under 8 minutes on one H200, with room for the
/// report. The quick CPU run has no tight budget (it runs in the tests).
pub fn budget_seconds(quick: bool) -> u64 {
    if quick {
        900
    } else {
        450
    }
}

/// The plan the script follows: the budget, then one `step limit` line per step in run order.
pub fn plan(quick: bool) -> String {
    let mut out = format!("budget {}\n", budget_seconds(quick));
    for step in Step::RUN_ORDER {
        out.push_str(&format!("{} {}\n", step.name(), step.limit_seconds(quick)));
    }
    out
}

/// What one step process is told.
#[derive(Debug, Clone)]
pub struct CheckOptions {
    /// The device measured (`cuda` on the GPU machine, `cpu` for the quick run).
    pub device: Device,
    /// Small sizes, for the CPU.
    pub quick: bool,
    /// The bundle folder (`quad gpu-check bundle`).
    pub bundle: PathBuf,
    /// Scratch folder of this check run: `steps/<step>.json` and generated models.
    pub work: PathBuf,
}

impl CheckOptions {
    /// Fails unless the device can be used: a CUDA run without CUDA measures nothing.
    fn require_device(&self) -> Result<(), GpuCheckError> {
        if self.device.is_cuda() && !tch::Cuda::is_available() {
            return Err(GpuCheckError::Measurement(
                "CUDA is not available to libtorch (is TORCH_LIB the torch/lib folder of a \
                 CUDA build, and are the nvidia/*/lib folders next to it?)"
                    .into(),
            ));
        }
        Ok(())
    }

    /// The device as a job spec names it (`cpu`, `cuda:N`).
    fn device_setting(&self) -> String {
        match self.device {
            Device::Cuda(i) => format!("cuda:{i}"),
            _ => "cpu".into(),
        }
    }

    /// A short name of the device for figure names.
    fn device_label(&self) -> &'static str {
        if self.device.is_cuda() {
            "CUDA"
        } else {
            "CPU"
        }
    }

    fn steps_dir(&self) -> PathBuf {
        self.work.join("steps")
    }
}

/// Runs one step and leaves its record in `<work>/steps/<step>.json`. The record is written
/// after every figure, so a step stopped by its time limit keeps what it measured.
pub fn run_step(step: Step, opts: &CheckOptions) -> Result<(), GpuCheckError> {
    let mut rec = StepRecorder::start(step, opts)?;
    let outcome = if step == Step::Doctor {
        // The doctor's figures say why a device is missing, so they come first.
        device::doctor(&mut rec, opts).and_then(|()| opts.require_device())
    } else {
        opts.require_device()
            .and_then(|()| run_measurement(step, &mut rec, opts))
    };
    match outcome {
        Ok(()) => rec.finish(Status::Ok, None),
        Err(err) => {
            rec.finish(Status::Failed, Some(err.to_string()))?;
            Err(err)
        }
    }
}

fn run_measurement(
    step: Step,
    rec: &mut StepRecorder,
    opts: &CheckOptions,
) -> Result<(), GpuCheckError> {
    let sizes = synthetic::Sizes::new(opts.quick);
    match step {
        Step::Doctor => device::doctor(rec, opts),
        Step::Matmul => device::matmul(rec, opts, &sizes),
        Step::EncoderParity => encoder::parity(rec, opts),
        Step::EncoderSpeed => encoder::speed(rec, opts, &sizes),
        Step::KmeansManyDocs => kmeans::fit(rec, opts, sizes.kmeans_many_docs, &sizes),
        Step::KmeansManyClusters => kmeans::fit(rec, opts, sizes.kmeans_many_clusters, &sizes),
        Step::InfluenceParity => influence::parity(rec, opts),
        Step::InfluenceSpeed => influence::speed(rec, opts, &sizes),
        Step::QuadLoop => quadloop::run(rec, opts),
    }
}

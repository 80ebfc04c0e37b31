//! The doctor step (libtorch, CUDA, the card, the CPU) and the card's matrix-product rates,
//! which the speed steps are measured against.
use std::process::Command;
use std::time::Instant;

use tch::{Device, Kind, Tensor};

use super::figures::{Figure, StepRecorder, Value};
use super::synthetic::Sizes;
use super::{CheckOptions, GpuCheckError, Step, StepRecord};

/// The figure that names the card; the report's heading shows it.
pub(crate) const CARD_FIGURE: &str = "card";
const BF16_RATE: &str = "bf16 matmul rate";
const F32_RATE: &str = "f32 matmul rate";

/// Waits for the device's queued work, so that a timer read next measures it.
pub(crate) fn synchronize(device: Device) {
    if let Device::Cuda(i) = device {
        tch::Cuda::synchronize(i as i64);
    }
}

/// `quad doctor`'s report, the card as `nvidia-smi` names it, and the CPU.
pub(super) fn doctor(rec: &mut StepRecorder, opts: &CheckOptions) -> Result<(), GpuCheckError> {
    let report = crate::doctor::report().map_err(GpuCheckError::library)?;
    rec.push(Figure::text("quad", env!("CARGO_PKG_VERSION")))?;
    rec.push(Figure::text("libtorch", report.libtorch_version))?;
    let path = report.libtorch_path.as_deref().unwrap_or("(not found)");
    rec.push(Figure::text("libtorch path", path))?;
    rec.push(Figure::text("cuda available", report.cuda_available))?;
    rec.push(Figure::number(
        "cuda devices",
        report.cuda_devices as f64,
        "",
    ))?;
    rec.push(Figure::text("cudnn available", report.cudnn_available))?;
    rec.push(Figure::text(
        "doctor device",
        format!("{:?}", report.device),
    ))?;
    rec.push(Figure::text(
        "doctor matmul check",
        if report.matmul_ok { "ok" } else { "FAILED" },
    ))?;
    rec.push(Figure::text(CARD_FIGURE, card_name(opts)))?;
    rec.push(Figure::text("cpu", cpu_name()))?;
    rec.push(Figure::number(
        "cpu threads (libtorch)",
        report.threads as f64,
        "",
    ))?;
    if !report.matmul_ok {
        return Err(GpuCheckError::Measurement(
            "the doctor's 2 x 3 matrix product came out wrong".into(),
        ));
    }
    Ok(())
}

/// `name, memory, driver` of the first GPU, from nvidia-smi; what ran instead otherwise.
fn card_name(opts: &CheckOptions) -> String {
    if !opts.device.is_cuda() {
        return format!("none (CPU run: {})", cpu_name());
    }
    let query = Command::new("nvidia-smi")
        .args([
            "--query-gpu=name,memory.total,driver_version",
            "--format=csv,noheader",
        ])
        .output();
    match query {
        Ok(out) if out.status.success() => String::from_utf8_lossy(&out.stdout)
            .lines()
            .next()
            .unwrap_or("unknown")
            .trim()
            .to_string(),
        _ => "unknown (nvidia-smi did not answer)".into(),
    }
}

fn cpu_name() -> String {
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    format!("{model}, {cores} cores")
}

/// Rounds timed, and products per round: the best round counts.
fn matmul_rounds(device: Device) -> (usize, usize) {
    if device.is_cuda() {
        (5, 10)
    } else {
        (3, 3)
    }
}

/// Floating-point operations per second of `kind` matrix products of side `n` on `device`:
/// the best of a few rounds, after a warm-up.
pub(crate) fn matmul_rate(device: Device, kind: Kind, n: i64) -> f64 {
    let _guard = tch::no_grad_guard();
    let a = Tensor::randn([n, n], (kind, device));
    let b = Tensor::randn([n, n], (kind, device));
    let _ = a.mm(&b);
    synchronize(device);
    let (rounds, per_round) = matmul_rounds(device);
    let mut best = 0.0f64;
    for _ in 0..rounds {
        let start = Instant::now();
        for _ in 0..per_round {
            let _ = a.mm(&b);
        }
        synchronize(device);
        let flops = per_round as f64 * 2.0 * (n as f64).powi(3);
        best = best.max(flops / start.elapsed().as_secs_f64());
    }
    best
}

pub(super) fn matmul(
    rec: &mut StepRecorder,
    opts: &CheckOptions,
    sizes: &Sizes,
) -> Result<(), GpuCheckError> {
    let n = sizes.matmul_side;
    let (rounds, _) = matmul_rounds(opts.device);
    for (name, kind) in [(BF16_RATE, Kind::BFloat16), (F32_RATE, Kind::Float)] {
        let rate = matmul_rate(opts.device, kind, n);
        let name = format!("{name} ({n} x {n} x {n}, best of {rounds})");
        rec.push(Figure::number(name, rate / 1e12, "TFLOP/s"))?;
    }
    Ok(())
}

/// The card's matrix-product rates in FLOP/s, which the speed steps divide by.
#[derive(Debug, Clone, Copy)]
pub(crate) struct CardRates {
    pub bf16: f64,
    pub f32: f64,
}

impl CardRates {
    /// The rate of the kind a measurement ran in (bf16 and f16 share the tensor cores).
    pub(crate) fn of(&self, kind: Kind) -> f64 {
        if kind == Kind::Float {
            self.f32
        } else {
            self.bf16
        }
    }
}

/// The rates the matmul step measured in this check run, or measured now when it did not
/// (it failed, or a step runs alone).
pub(crate) fn card_rates(opts: &CheckOptions, sizes: &Sizes) -> CardRates {
    let path = opts
        .steps_dir()
        .join(format!("{}.json", Step::Matmul.name()));
    let measured = std::fs::read_to_string(path)
        .ok()
        .and_then(|t| serde_json::from_str::<StepRecord>(&t).ok());
    let find = |prefix: &str| {
        measured.as_ref().and_then(|r| {
            r.figures.iter().find_map(|f| match f.value {
                Value::Number(v) if f.name.starts_with(prefix) => Some(v * 1e12),
                _ => None,
            })
        })
    };
    CardRates {
        bf16: find(BF16_RATE)
            .unwrap_or_else(|| matmul_rate(opts.device, Kind::BFloat16, sizes.matmul_side)),
        f32: find(F32_RATE)
            .unwrap_or_else(|| matmul_rate(opts.device, Kind::Float, sizes.matmul_side)),
    }
}

//! The demo job's Quad loop end to end on the device: `dataflows/demo.toml` with its paths
//! pointed at the bundle's slice of the demo corpus and the generated models, run by
//! `quad run` (this binary) as a user would, and its summary.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::Value as Json;
use toml::{Table, Value};

use super::bundle::layout;
use super::figures::{Figure, StepRecorder};
use super::{synthetic, CheckOptions, GpuCheckError};

/// The demo job, as `make demo` runs it.
const DEMO_JOB: &str = include_str!("../../dataflows/demo.toml");
const WORKERS: &str = "2";

fn section<'t>(job: &'t mut Table, name: &str) -> &'t mut Table {
    let entry = job
        .entry(name.to_string())
        .or_insert_with(|| Value::Table(Table::new()));
    if !entry.is_table() {
        *entry = Value::Table(Table::new());
    }
    entry.as_table_mut().expect("made a table just above")
}

fn set(job: &mut Table, name: &str, key: &str, value: impl Into<Value>) {
    section(job, name).insert(key.to_string(), value.into());
}

fn path_value(p: &Path) -> Value {
    Value::String(p.to_string_lossy().into_owned())
}

/// The demo job's text with the bundle's and this run's paths, on the measured device. The
/// quick run reads 2 of the slice's 6 shards with shorter windows.
fn job_text(
    opts: &CheckOptions,
    dir: &Path,
    encoder: &Path,
    proxy: &Path,
) -> Result<String, GpuCheckError> {
    let demo = Path::new("dataflows/demo.toml");
    let mut job: Table = DEMO_JOB
        .parse()
        .map_err(|e| GpuCheckError::invalid(demo, e))?;
    job.remove("corpus");
    job.remove("warmup");
    job.insert("name".into(), "gpu-check-demo".into());
    let slice = opts.bundle.join(layout::SLICE);
    let shards = if opts.quick {
        "shard-0000[01].parquet"
    } else {
        "*.parquet"
    };
    set(
        &mut job,
        "source",
        "shards",
        path_value(&slice.join("shards").join(shards)),
    );
    let tokenizer = opts.bundle.join(layout::MINILM).join("tokenizer.json");
    set(&mut job, "tokens", "tokenizer", path_value(&tokenizer));
    let device = opts.device_setting();
    set(&mut job, "embed", "model", path_value(encoder));
    set(&mut job, "embed", "device", device.clone());
    let backend = if opts.device.is_cuda() {
        "tch"
    } else {
        "tch-cpu"
    };
    set(&mut job, "cluster", "backend", backend);
    set(&mut job, "influence", "model", path_value(proxy));
    set(&mut job, "influence", "device", device);
    set(
        &mut job,
        "influence",
        "reference",
        path_value(&slice.join("reference.parquet")),
    );
    set(
        &mut job,
        "influence",
        "factor_cache",
        path_value(&dir.join("factors")),
    );
    set(&mut job, "sink", "path", path_value(&dir.join("out")));
    if opts.quick {
        set(&mut job, "embed", "max_tokens", 32);
        set(&mut job, "influence", "reference_docs", 50);
        set(&mut job, "influence", "fit_pool_docs", 50);
        set(&mut job, "influence", "max_tokens", 64);
        set(&mut job, "influence", "window", 64);
    }
    toml::to_string(&job).map_err(|e| GpuCheckError::invalid(demo, e))
}

/// Runs `quad run --json` on the job and returns its JSON summary; its log goes to this
/// step's log.
fn run_job(job: &Path) -> Result<Json, GpuCheckError> {
    let exe = std::env::current_exe().map_err(|e| GpuCheckError::io(Path::new("quad"), e))?;
    let out = Command::new(&exe)
        .args(["run", "--json", "--reset", "-w", WORKERS])
        .arg(job)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| GpuCheckError::io(&exe, e))?;
    if !out.status.success() {
        return Err(GpuCheckError::invalid(
            job,
            format!("quad run ended with {} (its log is above)", out.status),
        ));
    }
    serde_json::from_slice(&out.stdout).map_err(|e| GpuCheckError::invalid(job, e))
}

pub(super) fn run(rec: &mut StepRecorder, opts: &CheckOptions) -> Result<(), GpuCheckError> {
    let (encoder, real) = synthetic::encoder_dir(opts)?;
    rec.push(Figure::text(
        "encoder",
        synthetic::encoder_weights_note(real),
    ))?;
    let proxy = synthetic::proxy_dir(opts)?;
    rec.push(Figure::text(
        "influence model",
        "the demo proxy's shapes with random weights (the warmed-up proxy is 44 MB)",
    ))?;
    let dir: PathBuf = opts.work.join("quad-loop");
    std::fs::create_dir_all(&dir).map_err(|e| GpuCheckError::io(&dir, e))?;
    let job = dir.join("job.toml");
    let text = job_text(opts, &dir, &encoder, &proxy)?;
    std::fs::write(&job, text).map_err(|e| GpuCheckError::io(&job, e))?;
    let corpus = if opts.quick {
        "2 of 6 shards of"
    } else {
        "the 6 shards of"
    };
    let what = format!("dataflows/demo.toml on {corpus} a 3,000-document slice of the demo corpus, {WORKERS} workers");
    rec.push(Figure::text("job", what))?;
    let summary = run_job(&job)?;
    summary_figures(rec, &summary)
}

/// The run's summary, one figure a line.
fn summary_figures(rec: &mut StepRecorder, summary: &Json) -> Result<(), GpuCheckError> {
    let number = |key: &str| summary.get(key).and_then(Json::as_f64);
    for (key, unit) in [
        ("documents", "docs"),
        ("clusters", "clusters"),
        ("rounds", "rounds"),
        ("scored", "docs"),
        ("selected", "docs"),
        ("tokens", "tokens"),
        ("selected_tokens", "tokens"),
        ("seconds", "s"),
    ] {
        let value = number(key).ok_or_else(|| {
            GpuCheckError::Measurement(format!("the job's summary has no {key:?}"))
        })?;
        rec.push(Figure::number(key.replace('_', " "), value, unit))?;
    }
    if let (Some(docs), Some(secs)) = (number("documents"), number("seconds")) {
        rec.push(Figure::number(
            "documents per second, end to end",
            docs / secs,
            "docs/s",
        ))?;
    }
    if let Some(flops) = number("flops") {
        rec.push(Figure::number(
            "FLOPs counted (embedding, factors, scoring)",
            flops / 1e12,
            "TFLOP",
        ))?;
    }
    Ok(())
}

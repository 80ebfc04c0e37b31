//! The prepared GPU check (`quad gpu-check`, `gpu-check.sh`; README "Measuring on a GPU") on
//! the CPU: the bundle is built as `make gpu-bundle` builds it, the script runs every step at
//! quick sizes, and the table and the JSON hold every step, finite figures and the parity
//! tolerances. Without a GPU, `--device cuda` shows that failing steps do not stop the others.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use std::time::Instant;

use common::{quad, repo, stderr};
use serde_json::Value;

/// Every step, in the table's order.
const STEPS: [&str; 9] = [
    "doctor",
    "matmul",
    "encoder-parity",
    "encoder-speed",
    "kmeans-many-docs",
    "kmeans-many-clusters",
    "influence-parity",
    "influence-speed",
    "quad-loop",
];

/// The bundle folder, built once per test binary.
fn bundle() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("quad-gpu-bundle")
            .tempdir()
            .unwrap()
            .keep()
            .join("gpu");
        let out = quad()
            .args(["gpu-check", "bundle"])
            .arg(&dir)
            .arg("--assets")
            .arg(repo().join("assets"))
            .output()
            .unwrap();
        assert!(out.status.success(), "bundle: {}", stderr(&out));
        dir
    })
}

fn bytes_under(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap())
        .map(|e| {
            let meta = e.metadata().unwrap();
            if meta.is_dir() {
                bytes_under(&e.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

fn run_script(args: &[&str], out: &Path) -> Output {
    Command::new("bash")
        .arg(bundle().join("gpu-check.sh"))
        .args(args)
        .env("OUT", out)
        .output()
        .unwrap()
}

fn figures(step: &Value) -> &Vec<Value> {
    step["figures"].as_array().unwrap()
}

/// The figure of `step` whose name starts with `prefix`.
fn figure<'v>(steps: &'v [Value], step: &str, prefix: &str) -> &'v Value {
    let s = steps.iter().find(|s| s["step"] == step).unwrap();
    figures(s)
        .iter()
        .find(|f| f["name"].as_str().unwrap().starts_with(prefix))
        .unwrap_or_else(|| panic!("{step}: no figure {prefix:?} in {s}"))
}

#[test]
fn the_quick_cpu_check_runs_every_step_and_meets_the_tolerances() {
    let size = bytes_under(bundle());
    assert!(size <= 60 * 1024 * 1024, "the bundle is {size} bytes");
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results");
    let start = Instant::now();
    let run = run_script(&["--device", "cpu", "--quick"], &out);
    let table = String::from_utf8_lossy(&run.stdout).to_string();
    eprintln!(
        "{table}\n(the quick check took {:.0} s)",
        start.elapsed().as_secs_f64()
    );
    assert!(run.status.success(), "{table}\n{}", stderr(&run));
    for step in STEPS {
        assert!(
            table.contains(&format!("| {step} | status | ok (")),
            "{step}:\n{table}"
        );
    }
    let md = std::fs::read_to_string(out.join("gpu-check.md")).unwrap();
    assert_eq!(md.trim(), table.trim());

    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("gpu-check.json")).unwrap())
            .unwrap();
    assert_eq!(json["device"], "cpu");
    assert_eq!(json["quick"], true);
    let steps = json["steps"].as_array().unwrap();
    let names: Vec<&str> = steps.iter().map(|s| s["step"].as_str().unwrap()).collect();
    assert_eq!(names, STEPS);
    for s in steps {
        assert_eq!(s["status"], "ok", "{s}");
        assert!(!figures(s).is_empty(), "{s}");
        for f in figures(s) {
            match &f["value"] {
                Value::Number(n) => assert!(n.as_f64().unwrap().is_finite(), "{f}"),
                Value::String(t) => assert!(!["NaN", "inf", "-inf"].contains(&t.as_str()), "{f}"),
                other => panic!("{other} in {f}"),
            }
            if let Some(bound) = f.get("bound") {
                assert!(bound["passed"] == true || bound["target"] == true, "{f}");
            }
        }
        let log = out
            .join("gpu-check-logs")
            .join(format!("{}.log", s["step"].as_str().unwrap()));
        assert!(log.exists(), "{}", log.display());
    }
    // The parity figures carry their tolerances, and hold them.
    for (step, prefix, rule) in [
        ("encoder-parity", "cosine CPU f32 vs CPU f32", ">= 0.99999"),
        ("encoder-parity", "cosine CPU bf16 vs CPU f32", ">= 0.999"),
        (
            "influence-parity",
            "relative L2 distance, CPU vs CPU",
            "<= 1.00e-4",
        ),
    ] {
        let f = figure(steps, step, prefix);
        assert_eq!(f["bound"]["rule"], rule, "{f}");
        assert_eq!(f["bound"]["passed"], true, "{f}");
    }
    let selected = figure(steps, "quad-loop", "selected");
    assert!(selected["value"].as_f64().unwrap() > 0.0, "{selected}");
    let rate = figure(steps, "influence-speed", "bf16 64 tokens, batch");
    assert!(rate["value"].as_f64().unwrap() > 0.0, "{rate}");
}

#[test]
fn without_a_gpu_every_cuda_step_fails_with_its_reason_and_the_others_still_run() {
    if tch::Cuda::is_available() {
        return; // this machine would run the whole check; the quick test covers the rest
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("results");
    let run = run_script(&["--device", "cuda"], &out);
    let table = String::from_utf8_lossy(&run.stdout).to_string();
    assert_eq!(run.status.code(), Some(1), "{table}\n{}", stderr(&run));
    for step in STEPS {
        let row = format!("| {step} | status | FAILED");
        assert!(table.contains(&row), "{step}:\n{table}");
    }
    assert!(table.contains("CUDA is not available"), "{table}");
    let json: Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("gpu-check.json")).unwrap())
            .unwrap();
    let doctor = &json["steps"][0];
    assert_eq!(doctor["step"], "doctor");
    // The doctor's figures are kept although the step failed: they say why.
    let cuda = figure(
        json["steps"].as_array().unwrap(),
        "doctor",
        "cuda available",
    );
    assert_eq!(cuda["value"], "false", "{doctor}");
}

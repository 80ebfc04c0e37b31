//! Figures, the record each step leaves, and the one table the check prints.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::{CheckOptions, GpuCheckError, Step};

/// A measured or reported value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Value {
    Number(f64),
    Text(String),
}

/// What a figure is held to. A tolerance that fails fails the check; a target is the
/// issue's goal and is only reported as met or not.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Bound {
    /// e.g. ">= 0.999"; "finite" for a number that came out NaN or infinite.
    pub rule: String,
    pub target: bool,
    pub passed: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Figure {
    pub name: String,
    pub value: Value,
    #[serde(default)]
    pub unit: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bound: Option<Bound>,
}

impl Figure {
    /// A number; one that is not finite is kept as text and fails the check.
    pub fn number(name: impl Into<String>, value: f64, unit: &str) -> Figure {
        let (value, bound) = if value.is_finite() {
            (Value::Number(value), None)
        } else {
            let bound = Bound {
                rule: "finite".into(),
                target: false,
                passed: false,
            };
            (Value::Text(value.to_string()), Some(bound))
        };
        Figure {
            name: name.into(),
            value,
            unit: unit.into(),
            bound,
        }
    }

    pub fn text(name: impl Into<String>, value: impl std::fmt::Display) -> Figure {
        Figure {
            name: name.into(),
            value: Value::Text(value.to_string()),
            unit: String::new(),
            bound: None,
        }
    }

    /// A tolerance: the check fails unless value >= limit.
    pub fn at_least(self, limit: f64) -> Figure {
        self.bounded(">=", limit, false, |v| v >= limit)
    }

    /// A tolerance: the check fails unless value <= limit.
    pub fn at_most(self, limit: f64) -> Figure {
        self.bounded("<=", limit, false, |v| v <= limit)
    }

    /// A goal that is reported as met or not; it never fails the check.
    pub fn target_at_least(self, limit: f64) -> Figure {
        self.bounded(">=", limit, true, |v| v >= limit)
    }

    fn bounded(mut self, op: &str, limit: f64, target: bool, ok: impl Fn(f64) -> bool) -> Figure {
        if self.bound.is_some() {
            return self; // not finite: already failed
        }
        let passed = matches!(self.value, Value::Number(v) if ok(v));
        self.bound = Some(Bound {
            rule: format!("{op} {}", format_number(limit)),
            target,
            passed,
        });
        self
    }

    /// A tolerance that did not hold (targets never count).
    pub fn failed(&self) -> bool {
        self.bound.as_ref().is_some_and(|b| !b.target && !b.passed)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Still running, or killed before it could say how it ended.
    Running,
    Ok,
    Failed,
    /// Not started: the check's time budget was spent.
    Skipped,
}

/// What one step measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepRecord {
    pub step: Step,
    pub status: Status,
    /// Wall-clock seconds of the step (its whole process when the script ran it).
    pub seconds: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub device: String,
    pub quick: bool,
    pub figures: Vec<Figure>,
}

impl StepRecord {
    fn path(steps_dir: &Path, step: Step) -> PathBuf {
        steps_dir.join(format!("{}.json", step.name()))
    }

    fn read(path: &Path) -> Result<Option<StepRecord>, GpuCheckError> {
        match std::fs::read_to_string(path) {
            Ok(text) => serde_json::from_str(&text)
                .map(Some)
                .map_err(|e| GpuCheckError::invalid(path, e)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(GpuCheckError::io(path, e)),
        }
    }

    fn failed_checks(&self) -> usize {
        self.figures.iter().filter(|f| f.failed()).count()
    }
}

/// Keeps a step's record on disk while it runs.
pub(crate) struct StepRecorder {
    path: PathBuf,
    record: StepRecord,
    started: Instant,
}

impl StepRecorder {
    pub(crate) fn start(step: Step, opts: &CheckOptions) -> Result<StepRecorder, GpuCheckError> {
        let dir = opts.steps_dir();
        std::fs::create_dir_all(&dir).map_err(|e| GpuCheckError::io(&dir, e))?;
        let rec = StepRecorder {
            path: StepRecord::path(&dir, step),
            record: StepRecord {
                step,
                status: Status::Running,
                seconds: 0.0,
                reason: None,
                device: opts.device_setting(),
                quick: opts.quick,
                figures: Vec::new(),
            },
            started: Instant::now(),
        };
        rec.write()?;
        Ok(rec)
    }

    /// Adds a figure and rewrites the record.
    pub(crate) fn push(&mut self, figure: Figure) -> Result<(), GpuCheckError> {
        tracing::info!(
            figure = %figure.name,
            value = %format_value(&figure.value),
            unit = %figure.unit,
            "measured"
        );
        self.record.figures.push(figure);
        self.write()
    }

    pub(crate) fn finish(
        mut self,
        status: Status,
        reason: Option<String>,
    ) -> Result<(), GpuCheckError> {
        self.record.status = status;
        self.record.reason = reason;
        self.write()
    }

    /// Written beside and renamed into place, so a step killed mid-write leaves the last
    /// whole record.
    fn write(&self) -> Result<(), GpuCheckError> {
        let mut record = self.record.clone();
        record.seconds = self.started.elapsed().as_secs_f64();
        let text = serde_json::to_string_pretty(&record)
            .map_err(|e| GpuCheckError::invalid(&self.path, e))?;
        let tmp = self.path.with_extension("json.tmp");
        std::fs::write(&tmp, text).map_err(|e| GpuCheckError::io(&tmp, e))?;
        std::fs::rename(&tmp, &self.path).map_err(|e| GpuCheckError::io(&self.path, e))
    }
}

/// How the script saw a step end: its exit code (None: not started), seconds and limit.
#[derive(Debug, Clone)]
struct ScriptRun {
    exit_code: Option<i32>,
    seconds: f64,
    limit: u64,
}

/// `status.tsv` of the script: `step<TAB>exit code or "skipped"<TAB>milliseconds<TAB>limit`.
fn read_script_runs(work: &Path) -> Result<BTreeMap<String, ScriptRun>, GpuCheckError> {
    let path = work.join("status.tsv");
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(e) => return Err(GpuCheckError::io(&path, e)),
    };
    let mut runs = BTreeMap::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let cells: Vec<&str> = line.split('\t').collect();
        let [step, code, millis, limit] = cells[..] else {
            return Err(GpuCheckError::invalid(&path, format!("bad line {line:?}")));
        };
        let run = ScriptRun {
            exit_code: code.parse().ok(),
            seconds: millis.parse::<f64>().unwrap_or(0.0) / 1000.0,
            limit: limit.parse().unwrap_or(0),
        };
        runs.insert(step.to_string(), run);
    }
    Ok(runs)
}

/// The last `error:` line of a step's log (what `main` prints), else its last line.
fn log_reason(work: &Path, step: Step) -> Option<String> {
    let log =
        std::fs::read_to_string(work.join("logs").join(format!("{}.log", step.name()))).ok()?;
    let lines: Vec<&str> = log
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect();
    lines
        .iter()
        .rev()
        .find(|l| l.starts_with("error:"))
        .or(lines.last())
        .map(|l| l.chars().take(300).collect())
}

/// Why a step that the script ran did not end well.
fn failure_reason(work: &Path, step: Step, run: &ScriptRun, record: Option<&StepRecord>) -> String {
    match run.exit_code {
        // timeout(1) reports 124, and 137 when its KILL followed.
        Some(124) | Some(137) => format!("stopped at its time limit of {} s", run.limit),
        Some(0) => "exited without finishing its record".into(),
        code => {
            let said = record
                .and_then(|r| r.reason.clone())
                .or_else(|| log_reason(work, step))
                .unwrap_or_else(|| "no message".into());
            match code {
                Some(c) => format!("exit code {c}: {said}"),
                None => said,
            }
        }
    }
}

/// One step's record as the script saw it end.
fn settle(
    work: &Path,
    step: Step,
    record: Option<StepRecord>,
    run: Option<&ScriptRun>,
) -> StepRecord {
    let blank = |status: Status, reason: &str| StepRecord {
        step,
        status,
        seconds: 0.0,
        reason: Some(reason.into()),
        device: String::new(),
        quick: false,
        figures: Vec::new(),
    };
    let Some(run) = run else {
        return match record {
            Some(mut r) if r.status == Status::Running => {
                r.status = Status::Failed;
                r.reason = Some("did not finish".into());
                r
            }
            Some(r) => r,
            None => blank(Status::Failed, "not run"),
        };
    };
    if run.exit_code.is_none() && record.is_none() {
        return blank(
            Status::Skipped,
            "not started: the check's time budget was spent",
        );
    }
    let ok = run.exit_code == Some(0) && record.as_ref().is_some_and(|r| r.status == Status::Ok);
    let reason = (!ok).then(|| failure_reason(work, step, run, record.as_ref()));
    let mut settled = record.unwrap_or_else(|| blank(Status::Failed, ""));
    settled.seconds = run.seconds;
    if let Some(reason) = reason {
        settled.status = Status::Failed;
        settled.reason = Some(reason);
    }
    settled
}

/// Every step's figures, as the check ends.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckReport {
    /// The card as `nvidia-smi` names it (the doctor step), or what ran instead.
    pub card: String,
    pub device: String,
    pub quick: bool,
    pub steps: Vec<StepRecord>,
}

/// Gathers the records of a check run's `work` folder, with the script's `status.tsv`.
pub fn assemble_report(work: &Path) -> Result<CheckReport, GpuCheckError> {
    let runs = read_script_runs(work)?;
    let steps_dir = work.join("steps");
    let mut steps = Vec::new();
    for step in Step::ALL {
        let record = StepRecord::read(&StepRecord::path(&steps_dir, step))?;
        steps.push(settle(work, step, record, runs.get(&step.name())));
    }
    let card = steps
        .iter()
        .flat_map(|s| &s.figures)
        .find(|f| f.name == super::device::CARD_FIGURE)
        .map(|f| format_value(&f.value))
        .unwrap_or_else(|| "unknown".into());
    let first = steps.iter().find(|s| !s.device.is_empty());
    Ok(CheckReport {
        card,
        device: first.map(|s| s.device.clone()).unwrap_or_default(),
        quick: first.is_some_and(|s| s.quick),
        steps,
    })
}

impl CheckReport {
    /// Every step ran to the end and every tolerance held.
    pub fn passed(&self) -> bool {
        self.steps
            .iter()
            .all(|s| s.status == Status::Ok && s.failed_checks() == 0)
    }

    /// Writes `gpu-check.md` (the table), `gpu-check.json` (every figure) and the steps' logs
    /// into `out`.
    pub fn write(&self, out: &Path, work: &Path) -> Result<(), GpuCheckError> {
        std::fs::create_dir_all(out).map_err(|e| GpuCheckError::io(out, e))?;
        let md = out.join("gpu-check.md");
        std::fs::write(&md, self.to_string()).map_err(|e| GpuCheckError::io(&md, e))?;
        let json = out.join("gpu-check.json");
        let text =
            serde_json::to_string_pretty(self).map_err(|e| GpuCheckError::invalid(&json, e))?;
        std::fs::write(&json, text).map_err(|e| GpuCheckError::io(&json, e))?;
        let logs = work.join("logs");
        if let Ok(entries) = std::fs::read_dir(&logs) {
            let dst = out.join("gpu-check-logs");
            std::fs::create_dir_all(&dst).map_err(|e| GpuCheckError::io(&dst, e))?;
            for entry in entries.flatten() {
                let to = dst.join(entry.file_name());
                std::fs::copy(entry.path(), &to).map_err(|e| GpuCheckError::io(&to, e))?;
            }
        }
        Ok(())
    }
}

/// Numbers with as many digits as they need: whole numbers and those above 10,000 as grouped
/// integers, fewer decimals as they grow, scientific below 0.001.
pub fn format_number(v: f64) -> String {
    let a = v.abs();
    let trimmed = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s
        }
    };
    if v == 0.0 || !v.is_finite() {
        v.to_string()
    } else if a >= 1e4 || (v.fract() == 0.0 && a < 1e15) {
        group_thousands(v.round() as i64)
    } else if a >= 100.0 {
        format!("{v:.1}")
    } else if a >= 1.0 {
        trimmed(format!("{v:.3}"))
    } else if a >= 1e-3 {
        trimmed(format!("{v:.7}"))
    } else {
        format!("{v:.2e}")
    }
}

fn group_thousands(n: i64) -> String {
    let digits = n.unsigned_abs().to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    if n < 0 {
        format!("-{out}")
    } else {
        out
    }
}

fn format_value(v: &Value) -> String {
    match v {
        Value::Number(x) => format_number(*x),
        Value::Text(t) => t.clone(),
    }
}

fn format_bound(b: &Option<Bound>) -> String {
    match b {
        None => String::new(),
        Some(b) if b.target => format!(
            "target {}: {}",
            b.rule,
            if b.passed { "met" } else { "not met" }
        ),
        Some(b) => format!("{}: {}", b.rule, if b.passed { "ok" } else { "FAILED" }),
    }
}

/// A table cell: pipes and line breaks would break the Markdown row.
fn cell(s: &str) -> String {
    s.replace('|', "/").replace('\n', " ")
}

impl std::fmt::Display for CheckReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let sizes = if self.quick {
            "quick sizes"
        } else {
            "full sizes"
        };
        writeln!(
            f,
            "quad GPU check: {} (device {}, {sizes})\n",
            cell(&self.card),
            self.device
        )?;
        writeln!(f, "| step | figure | value | unit | check |")?;
        writeln!(f, "|---|---|---:|---|---|")?;
        for s in &self.steps {
            let status = match (s.status, &s.reason) {
                (Status::Ok, _) => format!("ok ({:.1} s)", s.seconds),
                (Status::Skipped, r) => format!("SKIPPED: {}", r.as_deref().unwrap_or("")),
                (_, r) => format!(
                    "FAILED ({:.1} s): {}",
                    s.seconds,
                    r.as_deref().unwrap_or("")
                ),
            };
            writeln!(f, "| {} | status | {} | | |", s.step.name(), cell(&status))?;
            for fig in &s.figures {
                writeln!(
                    f,
                    "| {} | {} | {} | {} | {} |",
                    s.step.name(),
                    cell(&fig.name),
                    cell(&format_value(&fig.value)),
                    cell(&fig.unit),
                    format_bound(&fig.bound)
                )?;
            }
        }
        let ok = self.steps.iter().filter(|s| s.status == Status::Ok).count();
        let failed_checks: usize = self.steps.iter().map(StepRecord::failed_checks).sum();
        let seconds: f64 = self.steps.iter().map(|s| s.seconds).sum();
        write!(
            f,
            "\n{ok} of {} steps ok, {failed_checks} tolerance(s) failed, {seconds:.0} s in the steps",
            self.steps.len()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_formatted_by_size() {
        assert_eq!(format_number(1_234_567.4), "1,234,567");
        assert_eq!(format_number(31_234.56), "31,235");
        assert_eq!(format_number(1000.0), "1,000");
        assert_eq!(format_number(3331.46), "3331.5");
        assert_eq!(format_number(2.5), "2.5");
        assert_eq!(format_number(0.99999872), "0.9999987");
        assert_eq!(format_number(3.2e-6), "3.20e-6");
        assert_eq!(format_number(0.0), "0");
    }

    #[test]
    fn bounds_pass_fail_and_catch_non_finite_numbers() {
        assert!(!Figure::number("c", 0.9995, "").at_least(0.999).failed());
        assert!(Figure::number("c", 0.998, "").at_least(0.999).failed());
        assert!(Figure::number("r", f64::NAN, "").failed());
        assert!(Figure::number("r", f64::NAN, "").at_most(1e-4).failed());
        let missed = Figure::number("docs/s", 10.0, "").target_at_least(30_000.0);
        assert!(!missed.failed(), "a target is not a tolerance");
        assert_eq!(format_bound(&missed.bound), "target >= 30,000: not met");
    }

    #[test]
    fn a_killed_step_keeps_its_figures_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let work = dir.path();
        std::fs::create_dir_all(work.join("steps")).unwrap();
        let record = StepRecord {
            step: Step::EncoderSpeed,
            status: Status::Running,
            seconds: 3.0,
            reason: None,
            device: "cuda:0".into(),
            quick: false,
            figures: vec![Figure::number(
                "f32, 128 tokens, batch 64",
                1000.0,
                "docs/s",
            )],
        };
        let path = StepRecord::path(&work.join("steps"), Step::EncoderSpeed);
        std::fs::write(&path, serde_json::to_string(&record).unwrap()).unwrap();
        std::fs::write(
            work.join("status.tsv"),
            "encoder-speed\t124\t150000\t150\nquad-loop\tskipped\t0\t180\n",
        )
        .unwrap();
        let report = assemble_report(work).unwrap();
        let speed = &report.steps[Step::EncoderSpeed as usize];
        assert_eq!(speed.status, Status::Failed);
        assert_eq!(speed.figures.len(), 1);
        assert!(speed
            .reason
            .as_deref()
            .unwrap()
            .contains("time limit of 150 s"));
        let quad_loop = report.steps.last().unwrap();
        assert_eq!(quad_loop.status, Status::Skipped);
        assert_eq!(report.steps[0].reason.as_deref(), Some("not run"));
        assert!(!report.passed());
        let table = report.to_string();
        assert!(table
            .contains("| encoder-speed | status | FAILED (150.0 s): stopped at its time limit"));
    }
}

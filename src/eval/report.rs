//! What `quad eval` writes: `eval.json` (every run and the paired comparisons), `eval.md`
//! (the table) and `eval.svg` (the losses per selection with their range over seeds).
use std::fmt::{self, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::run::{write_atomically, RunResult};
use super::stats::paired_t_test;
use super::{EvalError, EvalModelConfig};

/// One run on one held-out set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRow {
    pub selection: String,
    pub seed: u64,
    pub heldout: String,
    /// Nats per token.
    pub loss: f64,
    pub bits_per_byte: f64,
    pub tokens_trained: u64,
    pub passes: f64,
}

/// A selection against the baseline on one held-out set, paired by seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairedRow {
    pub selection: String,
    pub heldout: String,
    /// Mean over seeds of (this selection's loss - the baseline's loss with the same seed);
    /// negative: this selection trains the better model.
    pub mean_diff: f64,
    /// Two-sided paired t-test p-value; null with fewer than two seeds.
    pub p_value: Option<f64>,
    pub sd_diff: Option<f64>,
    pub t: Option<f64>,
    /// The seeds paired.
    pub seeds: Vec<u64>,
}

/// A selection as read.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SelectionInfo {
    pub name: String,
    pub files: Vec<PathBuf>,
    pub documents: usize,
    /// Tokens of one pass (documents and separators).
    pub tokens: u64,
}

/// A held-out set as evaluated.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HeldoutInfo {
    pub name: String,
    pub path: PathBuf,
    /// Documents of the evaluated sample.
    pub documents: usize,
    /// Tokens predicted.
    pub tokens: u64,
    pub bytes: u64,
}

/// The whole evaluation: `eval.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    pub tokens: u64,
    pub seeds: Vec<u64>,
    pub baseline: String,
    pub model: EvalModelConfig,
    pub parameters: i64,
    pub steps: usize,
    pub device: String,
    pub selections: Vec<SelectionInfo>,
    pub heldouts: Vec<HeldoutInfo>,
    pub runs: Vec<RunRow>,
    pub paired: Vec<PairedRow>,
    /// Runs trained by this invocation, and runs reused from `DIR/runs`.
    pub trained_runs: usize,
    pub reused_runs: usize,
    pub seconds: f64,
    pub out: PathBuf,
}

/// The rows of `eval.json` from the runs.
pub fn run_rows(results: &[RunResult]) -> Vec<RunRow> {
    results
        .iter()
        .flat_map(|r| {
            r.heldout.iter().map(|h| RunRow {
                selection: r.selection.clone(),
                seed: r.seed,
                heldout: h.heldout.clone(),
                loss: h.loss,
                bits_per_byte: h.bits_per_byte,
                tokens_trained: r.tokens_trained,
                passes: r.passes,
            })
        })
        .collect()
}

/// Every selection but the baseline against the baseline, on every held-out set, over the
/// seeds both have.
pub fn paired_rows(
    rows: &[RunRow],
    selections: &[String],
    heldouts: &[String],
    baseline: &str,
) -> Vec<PairedRow> {
    let loss = |selection: &str, heldout: &str, seed: u64| {
        rows.iter()
            .find(|r| r.selection == selection && r.heldout == heldout && r.seed == seed)
            .map(|r| r.loss)
    };
    let mut out = Vec::new();
    for selection in selections.iter().filter(|s| *s != baseline) {
        for heldout in heldouts {
            let mut seeds: Vec<u64> = rows
                .iter()
                .filter(|r| &r.selection == selection && &r.heldout == heldout)
                .map(|r| r.seed)
                .collect();
            seeds.retain(|&s| loss(baseline, heldout.as_str(), s).is_some());
            let (a, b): (Vec<f64>, Vec<f64>) = seeds
                .iter()
                .filter_map(|&s| {
                    Some((
                        loss(selection.as_str(), heldout.as_str(), s)?,
                        loss(baseline, heldout.as_str(), s)?,
                    ))
                })
                .unzip();
            let test = paired_t_test(&a, &b);
            out.push(PairedRow {
                selection: selection.clone(),
                heldout: heldout.clone(),
                mean_diff: test.mean_diff,
                p_value: test.p_value,
                sd_diff: test.sd_diff,
                t: test.t,
                seeds,
            });
        }
    }
    out
}

/// Mean, sample standard deviation, minimum and maximum.
fn summary(values: &[f64]) -> (f64, f64, f64, f64) {
    let n = values.len() as f64;
    let mean = values.iter().sum::<f64>() / n;
    let sd = if values.len() > 1 {
        (values.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / (n - 1.0)).sqrt()
    } else {
        0.0
    };
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (mean, sd, min, max)
}

impl EvalReport {
    fn rows_of<'a>(
        &'a self,
        selection: &'a str,
        heldout: &'a str,
    ) -> impl Iterator<Item = &'a RunRow> {
        self.runs
            .iter()
            .filter(move |r| r.selection == selection && r.heldout == heldout)
    }

    /// The Markdown table: one row per selection and held-out set.
    pub fn table(&self) -> String {
        let mut t = String::new();
        let _ = writeln!(
            t,
            "| selection | held-out | loss (nats/token) | bits/byte | Δ loss vs {} | p (paired t) | seeds | passes |",
            self.baseline
        );
        t.push_str("|---|---|---|---|---|---|---|---|\n");
        for heldout in &self.heldouts {
            for selection in &self.selections {
                let rows: Vec<&RunRow> = self.rows_of(&selection.name, &heldout.name).collect();
                if rows.is_empty() {
                    continue;
                }
                let losses: Vec<f64> = rows.iter().map(|r| r.loss).collect();
                let bpb: Vec<f64> = rows.iter().map(|r| r.bits_per_byte).collect();
                let passes: Vec<f64> = rows.iter().map(|r| r.passes).collect();
                let (mean, sd, _, _) = summary(&losses);
                let paired = self
                    .paired
                    .iter()
                    .find(|p| p.selection == selection.name && p.heldout == heldout.name);
                let (diff, p) = match paired {
                    None => ("(baseline)".to_string(), String::new()),
                    Some(p) => (
                        format!("{:+.4}", p.mean_diff),
                        p.p_value.map_or("n/a".into(), |v| format!("{v:.3}")),
                    ),
                };
                let _ = writeln!(
                    t,
                    "| {} | {} | {mean:.4} ± {sd:.4} | {:.4} | {diff} | {p} | {} | {:.2} |",
                    selection.name,
                    heldout.name,
                    summary(&bpb).0,
                    rows.len(),
                    summary(&passes).0
                );
            }
        }
        t
    }

    /// The losses per selection: the mean over seeds with the range, one series per held-out
    /// set.
    pub fn svg(&self) -> String {
        let categories: Vec<String> = self.selections.iter().map(|s| s.name.clone()).collect();
        let series: Vec<crate::plot::Ranges<'_>> = self
            .heldouts
            .iter()
            .map(|h| {
                let ranges = self
                    .selections
                    .iter()
                    .map(|s| {
                        let losses: Vec<f64> =
                            self.rows_of(&s.name, &h.name).map(|r| r.loss).collect();
                        let (mean, _, min, max) = summary(&losses);
                        (min, mean, max)
                    })
                    .collect();
                (h.name.as_str(), ranges)
            })
            .collect();
        crate::plot::range_chart(
            &format!(
                "Held-out loss after {} tokens ({} seeds: mean and range)",
                self.tokens,
                self.seeds.len()
            ),
            "selection",
            "loss (nats/token)",
            &categories,
            &series,
        )
    }

    /// Writes `eval.json`, `eval.md` and `eval.svg` into `dir`.
    pub fn write(&self, dir: &Path) -> Result<(), EvalError> {
        let json = serde_json::to_string_pretty(self).expect("the report serialises");
        write_atomically(&dir.join("eval.json"), json.as_bytes())?;
        write_atomically(&dir.join("eval.md"), self.table().as_bytes())?;
        write_atomically(&dir.join("eval.svg"), self.svg().as_bytes())
    }
}

impl fmt::Display for EvalReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.table())?;
        writeln!(
            f,
            "{} tokens a run ({} steps), {:.2}M-parameter model, seeds {:?}, device {}",
            self.tokens,
            self.steps,
            self.parameters as f64 / 1e6,
            self.seeds,
            self.device
        )?;
        write!(
            f,
            "runs: {} trained, {} reused; {:.1} s -> {}",
            self.trained_runs,
            self.reused_runs,
            self.seconds,
            self.out.join("eval.json").display()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(selection: &str, seed: u64, loss: f64) -> RunRow {
        RunRow {
            selection: selection.into(),
            seed,
            heldout: "news".into(),
            loss,
            bits_per_byte: loss / 2.0,
            tokens_trained: 100,
            passes: 1.0,
        }
    }

    #[test]
    fn pairs_by_seed_and_skips_the_baseline() {
        // quad - random by seed: -0.1, -0.3, -0.2 (seed 4 has no baseline run).
        let rows = vec![
            row("random", 1, 5.0),
            row("random", 2, 5.5),
            row("random", 3, 5.2),
            row("quad", 3, 5.0),
            row("quad", 1, 4.9),
            row("quad", 2, 5.2),
            row("quad", 4, 1.0),
        ];
        let names = vec!["random".to_string(), "quad".to_string()];
        let paired = paired_rows(&rows, &names, &["news".to_string()], "random");
        assert_eq!(paired.len(), 1);
        let p = &paired[0];
        assert_eq!(p.selection, "quad");
        assert_eq!(p.seeds, vec![3, 1, 2]);
        assert!((p.mean_diff + 0.2).abs() < 1e-12, "{p:?}");
        assert!((p.sd_diff.unwrap() - 0.1).abs() < 1e-12);
        // t = -0.2 / (0.1 / sqrt 3) with 2 degrees of freedom: p = 1 - |t| / sqrt(t^2 + 2).
        let t: f64 = -0.2 / (0.1 / 3f64.sqrt());
        let expected = 1.0 - t.abs() / (t * t + 2.0).sqrt();
        assert!((p.p_value.unwrap() - expected).abs() < 1e-9);
    }
}

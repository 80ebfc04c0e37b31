//! Progress while a job runs (a bar on a terminal, tracing events otherwise) and the summary
//! printed at the end.
use std::fmt;
use std::io::IsTerminal;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;

/// What a run did, summed over workers.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Summary {
    pub job: String,
    /// Worker threads of each process.
    pub workers: usize,
    /// Processes of the job (`quad run -n`); the summary is this process's.
    pub processes: usize,
    /// This process's index.
    pub process: usize,
    pub shards_found: u64,
    pub shards_already_done: u64,
    pub shards_done: u64,
    pub shards_quarantined: u64,
    pub rows_read: u64,
    pub documents: u64,
    pub rejected: u64,
    /// Rows rejected for a repeated id.
    pub duplicates: u64,
    /// Rows rejected as exact duplicate texts (`[dedup] exact`).
    pub duplicate_texts: u64,
    /// Rows rejected as near duplicates (`[dedup] near`).
    pub near_duplicates: u64,
    /// Rows rejected as semantic duplicates (`semdedup`).
    pub semantic_duplicates: u64,
    pub selected: u64,
    pub tokens: u64,
    pub selected_tokens: u64,
    pub files_written: u64,
    /// Documents assigned to clusters in this run (clustering jobs).
    pub clustered: u64,
    /// Clusters in the store after the run; None when clustering is off.
    pub clusters: Option<u64>,
    /// Bandit rounds committed in this run; None when no bandit strategy runs.
    pub rounds: Option<u64>,
    /// Documents whose influence was computed in this run.
    pub scored: u64,
    /// Fraction of the pool scored over the job's life (bandit strategies).
    pub scored_fraction: Option<f64>,
    /// FLOPs spent on embedding, factor fitting and scoring over the job's life.
    pub flops: Option<f64>,
    pub removed_uncommitted: Vec<String>,
    pub quarantined: Vec<(String, String)>,
    /// Seconds until ingest had committed every shard of the run (a fixed run).
    pub ingest_seconds: Option<f64>,
    /// Median wall time between consecutive round commits in this run.
    pub round_seconds_median: Option<f64>,
    /// Median time a round's scoring took (the influence model's forward and backward passes):
    /// what of a round does not depend on the pool's size.
    pub score_seconds_median: Option<f64>,
    pub seconds: f64,
}

/// Durations of a repeated step (a round, a round's scoring), the most recent ones kept for a
/// median: O(1) memory however long the job runs.
#[derive(Debug, Clone, Default)]
pub struct Durations {
    seconds: std::collections::VecDeque<f64>,
}

impl Durations {
    /// How many of the most recent durations the median is taken over.
    pub const KEPT: usize = 10_000;

    pub fn push(&mut self, seconds: f64) {
        if self.seconds.len() == Self::KEPT {
            self.seconds.pop_front();
        }
        self.seconds.push_back(seconds);
    }

    pub fn median(&self) -> Option<f64> {
        let mut sorted: Vec<f64> = self.seconds.iter().copied().collect();
        sorted.sort_by(f64::total_cmp);
        sorted.get(sorted.len() / 2).copied()
    }
}

impl Summary {
    /// Adds what a committed epoch did.
    pub fn add_epoch(&mut self, record: &crate::state::EpochRecord) {
        match &record.quarantined {
            Some(reason) => {
                self.shards_quarantined += 1;
                self.quarantined
                    .push((record.shard.clone(), reason.clone()));
            }
            None => self.shards_done += 1,
        }
        self.rows_read += record.rows;
        self.documents += record.docs;
        self.rejected += record.rejected;
        self.duplicates += record.duplicates;
        self.duplicate_texts += record.duplicate_texts;
        self.near_duplicates += record.near_duplicates;
        self.semantic_duplicates += record.semantic_duplicates;
        self.selected += record.selected;
        self.tokens += record.tokens;
        self.selected_tokens += record.selected_tokens;
        self.files_written += u64::from(record.file.is_some());
    }

    pub fn nothing_to_do(&self) -> bool {
        self.shards_done == 0
            && self.shards_quarantined == 0
            && self.shards_found > 0
            && self.shards_found == self.shards_already_done
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let process = if self.processes > 1 {
            format!("process {} of {}, ", self.process, self.processes)
        } else {
            String::new()
        };
        writeln!(
            f,
            "quad run '{}' ({process}{} worker{})",
            self.job,
            self.workers,
            if self.workers == 1 { "" } else { "s" }
        )?;
        if self.nothing_to_do() {
            writeln!(
                f,
                "  nothing to do: all {} shards were already committed",
                self.shards_found
            )?;
        }
        writeln!(
            f,
            "  shards     {} found, {} processed, {} already done, {} quarantined",
            self.shards_found, self.shards_done, self.shards_already_done, self.shards_quarantined
        )?;
        writeln!(
            f,
            "  documents  {} rows read, {} documents, {} rejected rows, {} duplicate ids, \
             {} duplicate texts, {} near duplicates",
            self.rows_read,
            self.documents,
            self.rejected,
            self.duplicates,
            self.duplicate_texts,
            self.near_duplicates
        )?;
        if self.semantic_duplicates > 0 {
            writeln!(
                f,
                "  semdedup   {} semantic duplicates rejected",
                self.semantic_duplicates
            )?;
        }
        let pct = |a: u64, b: u64| {
            if b == 0 {
                0.0
            } else {
                100.0 * a as f64 / b as f64
            }
        };
        writeln!(
            f,
            "  selected   {} documents ({:.1}%) in {} files",
            self.selected,
            pct(self.selected, self.documents),
            self.files_written
        )?;
        writeln!(
            f,
            "  tokens     {} in, {} selected ({:.1}%)",
            self.tokens,
            self.selected_tokens,
            pct(self.selected_tokens, self.tokens)
        )?;
        if let Some(clusters) = self.clusters {
            writeln!(
                f,
                "  clusters   {clusters} clusters, {} documents assigned in this run",
                self.clustered
            )?;
        }
        if let Some(rounds) = self.rounds {
            writeln!(
                f,
                "  bandit     {rounds} rounds, {} documents scored in this run{}",
                self.scored,
                match (self.round_seconds_median, self.score_seconds_median) {
                    (Some(round), Some(score)) => format!(
                        ", median {:.1} ms a round ({:.1} ms of it scoring)",
                        1e3 * round,
                        1e3 * score
                    ),
                    (Some(round), None) => format!(", median {:.1} ms a round", 1e3 * round),
                    _ => String::new(),
                }
            )?;
        }
        if let (Some(fraction), Some(flops)) = (self.scored_fraction, self.flops) {
            writeln!(
                f,
                "  cost       {:.3e} FLOPs, {:.1}% of the pool scored (the job so far)",
                flops,
                100.0 * fraction
            )?;
        }
        if !self.removed_uncommitted.is_empty() {
            writeln!(
                f,
                "  recovered  removed {} uncommitted output file(s): {}",
                self.removed_uncommitted.len(),
                self.removed_uncommitted.join(", ")
            )?;
        }
        for (shard, reason) in &self.quarantined {
            writeln!(f, "  quarantined {shard}: {reason}")?;
        }
        write!(f, "  time       {:.2} s", self.seconds)
    }
}

/// Epoch-level progress: a bar when stderr is a terminal, `tracing` events otherwise.
pub struct Progress {
    bar: Option<ProgressBar>,
    start: Instant,
}

impl Progress {
    pub fn new(total: u64) -> Progress {
        Progress {
            bar: terminal_bar(
                total,
                "{spinner} [{elapsed_precise}] {bar:40} {pos}/{len} shards {msg}",
            ),
            start: Instant::now(),
        }
    }

    pub fn add_total(&self, more: u64) {
        if let Some(bar) = &self.bar {
            bar.inc_length(more);
        }
    }

    pub fn epoch_done(&self, epoch: u64, shard: &str, documents: u64, selected: u64) {
        match &self.bar {
            Some(bar) => {
                bar.inc(1);
                bar.set_message(format!("epoch {epoch}: {selected}/{documents} selected"));
            }
            None => tracing::info!(
                epoch,
                shard,
                documents,
                selected,
                elapsed_s = self.start.elapsed().as_secs_f64(),
                "epoch committed"
            ),
        }
    }

    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

/// A bar of `total` units drawn with `template`, when stderr is a terminal.
fn terminal_bar(total: u64, template: &str) -> Option<ProgressBar> {
    std::io::stderr().is_terminal().then(|| {
        let bar = ProgressBar::new(total);
        bar.set_style(
            ProgressStyle::with_template(template)
                .expect("static template")
                .progress_chars("=> "),
        );
        bar
    })
}

/// The steps of one training run (`quad eval`): a bar on a terminal, left in place with the
/// final loss when the run ends; otherwise a tracing event every tenth of the run.
pub struct StepProgress {
    bar: Option<ProgressBar>,
    label: String,
    total: u64,
    start: Instant,
}

impl StepProgress {
    pub fn new(label: &str, total: u64) -> StepProgress {
        let bar = terminal_bar(
            total,
            "{prefix:>24} [{elapsed_precise}] {bar:30} {pos}/{len} steps {msg}",
        );
        if let Some(bar) = &bar {
            bar.set_prefix(label.to_string());
        }
        StepProgress {
            bar,
            label: label.to_string(),
            total,
            start: Instant::now(),
        }
    }

    /// Step `step` (1-based) ended with training loss `loss`.
    pub fn step(&self, step: u64, loss: f64) {
        match &self.bar {
            Some(bar) => {
                bar.set_position(step);
                bar.set_message(format!("loss {loss:.3}"));
            }
            None if step == self.total || step.is_multiple_of((self.total / 10).max(1)) => {
                tracing::info!(
                    run = %self.label,
                    step,
                    of = self.total,
                    loss = format!("{loss:.4}"),
                    elapsed_s = format!("{:.1}", self.start.elapsed().as_secs_f64()),
                    "training"
                )
            }
            None => {}
        }
    }

    /// The run ended; `message` (e.g. its held-out losses) stays beside the bar.
    pub fn finish(&self, message: &str) {
        match &self.bar {
            Some(bar) => bar.finish_with_message(message.to_string()),
            None => tracing::info!(run = %self.label, "{message}"),
        }
    }
}

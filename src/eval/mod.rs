//! `quad eval` (DESIGN 1.4): judges selections the way the paper does. For each selection
//! and seed a small Llama is trained from scratch with the warmup trainer on exactly the
//! same number of tokens of it (documents shuffled by the seed, repeated when the selection
//! is short), with the same initialisation and data-order seed for every selection; then
//! its next-token loss (nats per token, bits per byte) is measured on held-out sets. Each
//! selection is compared with the baseline paired by seed (mean difference, paired t-test).
//!
//! `config` is the `[eval]` section, `data` reads and tokenises selections and held-out sets,
//! `run` trains and evaluates one (selection, seed) and keeps its result for a resumed
//! evaluation, `stats` is the paired t-test and bits per byte, `report` the JSON, Markdown
//! and SVG outputs. A selection is only a Parquet path, so any strategy's output can be
//! compared.
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

pub mod config;
pub mod data;
pub mod report;
pub mod run;
pub mod stats;

pub use config::{EvalConfig, EvalModelConfig};
pub use report::EvalReport;

use crate::model::ModelError;
use crate::warmup::{load_tokenizer, ProxyTokenizer, WarmupError};
use data::{encode, parquet_files, read_texts, Heldout, Selection};
use report::{paired_rows, run_rows, HeldoutInfo, SelectionInfo};
use run::{RunContext, RunResult};

/// Why an evaluation could not run.
#[derive(Debug, thiserror::Error)]
pub enum EvalError {
    #[error("eval settings: {0}")]
    Settings(String),
    #[error("{path}: {message}")]
    Input { path: PathBuf, message: String },
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Train(#[from] WarmupError),
    /// Ctrl-C or SIGTERM: the runs that ended are kept in `DIR/runs` for the next start.
    #[error("interrupted after {0} finished run(s); start quad eval again to go on")]
    Interrupted(usize),
    #[error("{path}: cannot write: {cause}")]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
}

impl EvalError {
    pub fn input(path: &Path, message: impl Into<String>) -> Self {
        EvalError::Input {
            path: path.to_path_buf(),
            message: message.into(),
        }
    }
}

/// A name and a Parquet path (`NAME=PATH` on the command line).
#[derive(Debug, Clone, PartialEq)]
pub struct Named {
    pub name: String,
    pub path: PathBuf,
}

impl std::str::FromStr for Named {
    type Err = String;

    /// `NAME=PATH`; the name is used in file names, so letters, digits, `-`, `_` and `.`.
    fn from_str(s: &str) -> Result<Named, String> {
        let (name, path) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected NAME=PATH"))?;
        let valid = |c: char| c.is_ascii_alphanumeric() || "-_.".contains(c);
        if name.is_empty() || name.starts_with('.') || !name.chars().all(valid) {
            return Err(format!(
                "{name:?}: a name is letters, digits, '-', '_' and '.', not starting with '.'"
            ));
        }
        if path.is_empty() {
            return Err(format!("{s:?}: the path is empty"));
        }
        Ok(Named {
            name: name.to_string(),
            path: PathBuf::from(path),
        })
    }
}

/// What `quad eval` compares.
#[derive(Debug, Clone)]
pub struct EvalPlan {
    /// Parquet files, folders or globs of selected documents.
    pub selections: Vec<Named>,
    /// The selection the others are compared with; the first when None.
    pub baseline: Option<String>,
    /// Parquet files with a text column.
    pub heldouts: Vec<Named>,
    /// Predicted tokens each run trains on (rounded up to whole steps).
    pub tokens: u64,
    pub seeds: Vec<u64>,
    /// Where eval.json, eval.md, eval.svg and runs/ go.
    pub out: PathBuf,
}

impl EvalPlan {
    /// The baseline's name, after checking that names are unique and the plan is not empty.
    fn check(&self) -> Result<String, EvalError> {
        let settings = |m: String| Err(EvalError::Settings(m));
        if self.selections.is_empty() || self.heldouts.is_empty() {
            return settings("give at least one --selection and one --heldout".into());
        }
        if self.tokens == 0 || self.seeds.is_empty() {
            return settings("--tokens must be positive and --seeds not empty".into());
        }
        for list in [&self.selections, &self.heldouts] {
            let mut names: Vec<&str> = list.iter().map(|n| n.name.as_str()).collect();
            names.sort_unstable();
            if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
                return settings(format!("the name {:?} is given twice", w[0]));
            }
        }
        let mut seeds = self.seeds.clone();
        seeds.sort_unstable();
        seeds.dedup();
        if seeds.len() != self.seeds.len() {
            return settings("--seeds repeats a seed".into());
        }
        let baseline = self
            .baseline
            .clone()
            .unwrap_or_else(|| self.selections[0].name.clone());
        if !self.selections.iter().any(|s| s.name == baseline) {
            return settings(format!("--baseline {baseline:?} is not a --selection"));
        }
        Ok(baseline)
    }
}

/// The tokenizer of `[eval]`; when it is the default (the demo asset) and cannot be read, the
/// error says so and how to set it.
fn eval_tokenizer(cfg: &EvalConfig) -> Result<ProxyTokenizer, EvalError> {
    load_tokenizer(&cfg.tokenizer).map_err(|e| {
        match crate::assets::default_note(
            "eval.tokenizer",
            &cfg.tokenizer,
            crate::warmup::DEMO_TOKENIZER,
        ) {
            note if note.is_empty() => EvalError::Model(e),
            note => EvalError::Settings(format!("{e}{note}")),
        }
    })
}

/// Reads and tokenises every selection.
fn read_selections(
    plan: &EvalPlan,
    cfg: &EvalConfig,
    tok: &ProxyTokenizer,
) -> Result<Vec<Selection>, EvalError> {
    plan.selections
        .iter()
        .map(|named| {
            let files = parquet_files(&named.path)?;
            let texts = read_texts(&files, &cfg.text_column)?;
            if texts.is_empty() {
                return Err(EvalError::input(&named.path, "the selection has no text"));
            }
            let selection = Selection::new(&named.name, files, encode(&tok.tokenizer, &texts)?);
            tracing::info!(
                selection = %named.name,
                documents = selection.docs.len(),
                tokens = selection.tokens,
                "eval: selection read"
            );
            Ok(selection)
        })
        .collect()
}

/// Reads, tokenises and samples every held-out set.
fn read_heldouts(
    plan: &EvalPlan,
    cfg: &EvalConfig,
    tok: &ProxyTokenizer,
) -> Result<Vec<Heldout>, EvalError> {
    plan.heldouts
        .iter()
        .map(|named| {
            let texts = read_texts(&parquet_files(&named.path)?, &cfg.text_column)?;
            if texts.is_empty() {
                return Err(EvalError::input(
                    &named.path,
                    "the held-out set has no text",
                ));
            }
            let docs = encode(&tok.tokenizer, &texts)?;
            Ok(Heldout::sample(
                &named.name,
                &named.path,
                &texts,
                &docs,
                tok.separator,
                cfg.model.seq_len,
                cfg.heldout_tokens,
            ))
        })
        .collect()
}

/// `quad eval`: trains and evaluates every (selection, seed) run not already stored in
/// `plan.out/runs`, then writes `eval.json`, `eval.md` and `eval.svg` there. When `stop` is
/// set (Ctrl-C), no further run starts.
pub fn run_eval(
    plan: &EvalPlan,
    cfg: &EvalConfig,
    stop: &AtomicBool,
) -> Result<EvalReport, EvalError> {
    let started = Instant::now();
    let baseline = plan.check()?;
    cfg.validate().map_err(EvalError::Settings)?;
    let device =
        crate::influence::scorer::parse_device(&cfg.device).map_err(EvalError::Settings)?;
    let tok = eval_tokenizer(cfg)?;
    let llama =
        cfg.warmup_config(1)
            .llama_config(tok.vocab, Some(tok.separator), Some(tok.separator));
    llama.validate(&cfg.tokenizer)?;
    let selections = read_selections(plan, cfg, &tok)?;
    let heldouts = read_heldouts(plan, cfg, &tok)?;
    let ctx = RunContext {
        cfg,
        tokenizer: &tok,
        llama: llama.clone(),
        device,
        tokens: plan.tokens,
        heldouts: &heldouts,
        dir: plan.out.join("runs"),
    };
    let (mut results, mut trained) = (Vec::<RunResult>::new(), 0);
    for &seed in &plan.seeds {
        for selection in &selections {
            match ctx.stored(selection, seed) {
                Some(stored) => results.push(stored),
                None if stop.load(Ordering::SeqCst) => {
                    return Err(EvalError::Interrupted(results.len()));
                }
                None => {
                    results.push(ctx.run(selection, seed)?);
                    trained += 1;
                }
            }
        }
    }
    let runs = run_rows(&results);
    let names = |list: &[Named]| list.iter().map(|n| n.name.clone()).collect::<Vec<_>>();
    let paired = paired_rows(
        &runs,
        &names(&plan.selections),
        &names(&plan.heldouts),
        &baseline,
    );
    let report = EvalReport {
        tokens: plan.tokens,
        seeds: plan.seeds.clone(),
        baseline,
        model: cfg.model.clone(),
        parameters: llama.parameter_count(),
        steps: cfg.steps(plan.tokens),
        device: format!("{device:?}"),
        selections: selections
            .iter()
            .map(|s| SelectionInfo {
                name: s.name.clone(),
                files: s.files.clone(),
                documents: s.docs.len(),
                tokens: s.tokens,
            })
            .collect(),
        heldouts: heldouts
            .iter()
            .map(|h| HeldoutInfo {
                name: h.name.clone(),
                path: h.path.clone(),
                documents: h.documents,
                tokens: h.tokens,
                bytes: h.bytes,
            })
            .collect(),
        runs,
        paired,
        trained_runs: trained,
        reused_runs: results.len() - trained,
        seconds: started.elapsed().as_secs_f64(),
        out: plan.out.clone(),
    };
    report.write(&plan.out)?;
    Ok(report)
}

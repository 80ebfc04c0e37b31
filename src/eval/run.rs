//! One run: a small Llama trained from scratch on a selection with one seed, then evaluated
//! on every held-out set. Its result is written to `DIR/runs/<selection>.seed<seed>.json`
//! when it ends, and a later `quad eval` with the same settings reuses it.
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use tch::{Device, Kind};

use super::data::{token_stream, Heldout, Selection};
use super::stats::bits_per_byte;
use super::{EvalConfig, EvalError};
use crate::model::{CausalLm, LlamaConfig};
use crate::progress::StepProgress;
use crate::warmup::{mean_loss, pack, train, ProxyTokenizer};

/// What a run measured on one held-out set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HeldoutLoss {
    pub heldout: String,
    /// Mean next-token cross-entropy, nats per token, over every evaluated token.
    pub loss: f64,
    pub bits_per_byte: f64,
}

/// One (selection, seed) run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunResult {
    /// Fingerprint of everything the run depends on; a stored result is reused only when it
    /// matches.
    pub key: String,
    pub selection: String,
    pub seed: u64,
    /// Predicted tokens trained on: steps x batch x seq_len.
    pub tokens_trained: u64,
    /// Passes over the selection those tokens took (above 1: the selection was repeated).
    pub passes: f64,
    pub heldout: Vec<HeldoutLoss>,
    /// Training loss of the first and the last step.
    pub train_loss: (f64, f64),
    pub seconds: f64,
}

/// What every run shares.
pub struct RunContext<'a> {
    pub cfg: &'a EvalConfig,
    pub tokenizer: &'a ProxyTokenizer,
    pub llama: LlamaConfig,
    pub device: Device,
    /// The token budget of every run.
    pub tokens: u64,
    pub heldouts: &'a [Heldout],
    /// `DIR/runs`.
    pub dir: PathBuf,
}

impl RunContext<'_> {
    pub fn result_path(&self, selection: &str, seed: u64) -> PathBuf {
        self.dir.join(format!("{selection}.seed{seed}.json"))
    }

    /// The fingerprint of a run: settings, budget, seed, and the token ids of the selection
    /// and of the held-out samples.
    pub fn key(&self, selection: &Selection, seed: u64) -> String {
        let heldouts: Vec<(&str, u64)> = self
            .heldouts
            .iter()
            .map(|h| (h.name.as_str(), h.hash))
            .collect();
        let what = serde_json::json!({
            "model": self.cfg.model,
            "vocab": self.llama.vocab_size,
            "separator": self.llama.eos_token_id,
            "tokens": self.tokens,
            "seed": seed,
            "selection": selection.hash,
            "heldout": heldouts,
        });
        format!(
            "{:016x}",
            xxhash_rust::xxh3::xxh3_64(what.to_string().as_bytes())
        )
    }

    /// The stored result of a run, when there is one with this key.
    pub fn stored(&self, selection: &Selection, seed: u64) -> Option<RunResult> {
        let path = self.result_path(&selection.name, seed);
        let text = std::fs::read_to_string(&path).ok()?;
        match serde_json::from_str::<RunResult>(&text) {
            Ok(r) if r.key == self.key(selection, seed) => Some(r),
            Ok(_) => {
                tracing::info!(path = %path.display(), "eval: settings or data changed since this run; training it again");
                None
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "eval: unreadable run result; training it again");
                None
            }
        }
    }

    /// Trains and evaluates one run and writes its result file.
    pub fn run(&self, selection: &Selection, seed: u64) -> Result<RunResult, EvalError> {
        let started = Instant::now();
        let m = &self.cfg.model;
        let steps = self.cfg.steps(self.tokens);
        let opts = self.cfg.warmup_config(steps).train_options(seed);
        let needed = steps * m.batch * m.seq_len + 1;
        let separator = self.tokenizer.separator;
        let (stream, passes) = token_stream(&selection.docs, separator, needed, seed);
        let windows = pack(std::slice::from_ref(&stream), m.seq_len, None);
        drop(stream);
        let mut lm = CausalLm::random(
            &self.llama,
            self.tokenizer.tokenizer.clone(),
            self.device,
            Kind::Float,
            seed,
        );
        let label = format!("{} seed {seed}", selection.name);
        let progress = StepProgress::new(&label, steps as u64);
        let losses = train(&mut lm, &windows, &opts, |s| {
            progress.step(s.step as u64, s.loss)
        })?;
        lm.vs.freeze();
        let heldout: Vec<HeldoutLoss> = self
            .heldouts
            .iter()
            .map(|h| {
                let loss = mean_loss(&lm, &h.windows, m.seq_len + 1, m.batch);
                HeldoutLoss {
                    heldout: h.name.clone(),
                    loss,
                    bits_per_byte: bits_per_byte(loss, h.tokens, h.bytes),
                }
            })
            .collect();
        let summary: Vec<String> = heldout
            .iter()
            .map(|h| format!("{} {:.4}", h.heldout, h.loss))
            .collect();
        progress.finish(&summary.join(", "));
        let result = RunResult {
            key: self.key(selection, seed),
            selection: selection.name.clone(),
            seed,
            tokens_trained: (steps * m.batch * m.seq_len) as u64,
            passes,
            heldout,
            train_loss: (
                losses.first().copied().unwrap_or(f64::NAN),
                losses.last().copied().unwrap_or(f64::NAN),
            ),
            seconds: started.elapsed().as_secs_f64(),
        };
        let json = serde_json::to_string_pretty(&result).expect("a run result serialises");
        write_atomically(&self.result_path(&selection.name, seed), json.as_bytes())?;
        Ok(result)
    }
}

/// Writes `path` through a temporary file and a rename, so a killed run leaves either the
/// whole file or none.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), EvalError> {
    let io = |cause| EvalError::Io {
        path: path.to_path_buf(),
        cause,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(io)?;
    }
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let temp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&temp, bytes).map_err(io)?;
    std::fs::rename(&temp, path).map_err(io)
}

//! The `[eval]` section: the tokenizer, the device, the held-out sample, and `[eval.model]`,
//! the small Llama each selection trains and its optimiser. Every key has a default that fits
//! a 2-core CPU (a run of 400,000 tokens in a few minutes).
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::warmup::WarmupConfig;

/// `[eval]`; a key left out takes its value from `EvalConfig::default()`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalConfig {
    /// The tokenizer of the trained models: a `.gguf` file, a tokenizer.json, or a directory
    /// holding one; the demo's SmolLM2 tokenizer when absent.
    pub tokenizer: PathBuf,
    /// The text column of the selections and the held-out sets.
    pub text_column: String,
    /// "auto" (CUDA when available), "cpu", "cuda" or "cuda:N". Only the CPU gives the same
    /// numbers bit for bit on every run.
    pub device: String,
    /// Tokens of each held-out set evaluated: whole documents of a fixed seeded sample (the
    /// same for every run) until this many tokens; 0: every document.
    pub heldout_tokens: u64,
    pub model: EvalModelConfig,
}

/// `[eval.model]`: the model trained from scratch on each selection, and its optimiser. The
/// steps follow from the token budget: ceil(tokens / (batch x seq_len)).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalModelConfig {
    pub hidden: i64,
    pub layers: i64,
    pub heads: i64,
    /// Key/value heads (grouped-query attention when fewer than `heads`).
    pub kv_heads: i64,
    /// Width of the MLP.
    pub intermediate: i64,
    /// Tokens predicted per training window; also the context of the held-out evaluation.
    pub seq_len: usize,
    /// Windows per step.
    pub batch: usize,
    /// Peak learning rate of AdamW.
    pub lr: f64,
    /// The cosine decay ends at lr * min_lr_ratio.
    pub min_lr_ratio: f64,
    /// Fraction of the steps spent in the linear warmup.
    pub warmup_fraction: f64,
    pub weight_decay: f64,
    /// Global gradient-norm clip (0: none).
    pub grad_clip: f64,
}

impl Default for EvalConfig {
    fn default() -> Self {
        EvalConfig {
            tokenizer: crate::assets::default_asset(crate::warmup::DEMO_TOKENIZER),
            text_column: "text".into(),
            device: "auto".into(),
            heldout_tokens: 65_536,
            model: EvalModelConfig::default(),
        }
    }
}

/// The defaults fit a 2-core CPU: about 3.3M parameters, 3.1M of them the tied embedding of
/// the 49,152-token vocabulary, whose product with every hidden state is most of the cost
/// (hidden 128 doubles it).
impl Default for EvalModelConfig {
    fn default() -> Self {
        EvalModelConfig {
            hidden: 64,
            layers: 2,
            heads: 4,
            kv_heads: 2,
            intermediate: 256,
            seq_len: 128,
            batch: 16,
            lr: 3e-3,
            min_lr_ratio: 0.1,
            warmup_fraction: 0.1,
            weight_decay: 0.0,
            grad_clip: 1.0,
        }
    }
}

impl EvalConfig {
    /// The `[eval]` table of a TOML file (a job spec, or a file with only that section); the
    /// defaults when the file has none.
    pub fn from_file(path: &Path) -> Result<EvalConfig, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
        let mut table: toml::Table =
            toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
        match table.remove("eval") {
            None => Ok(EvalConfig::default()),
            Some(eval) => eval
                .try_into()
                .map_err(|e| format!("{}: [eval]: {e}", path.display())),
        }
    }

    /// This configuration with `KEY=VALUE` settings of `[eval.model]` (`--model`); a value is
    /// read as TOML (`lr=1e-3`, `layers=4`). An unknown key is an error.
    pub fn with_model_settings(&self, settings: &[String]) -> Result<EvalConfig, String> {
        let mut model = toml::Table::try_from(&self.model).map_err(|e| e.to_string())?;
        for setting in settings {
            let (key, value) = setting
                .split_once('=')
                .ok_or_else(|| format!("--model {setting:?}: expected KEY=VALUE"))?;
            let value: toml::Table = toml::from_str(&format!("v = {}", value.trim()))
                .map_err(|e| format!("--model {setting:?}: {e}"))?;
            model.insert(key.trim().to_string(), value["v"].clone());
        }
        let model: EvalModelConfig = model
            .try_into()
            .map_err(|e| format!("--model: eval.model: {e}"))?;
        Ok(EvalConfig {
            model,
            ..self.clone()
        })
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.text_column.is_empty() {
            return Err("eval.text_column must not be empty".into());
        }
        if !(0.0..1.0).contains(&self.model.warmup_fraction) {
            return Err("eval.model.warmup_fraction must be in [0, 1)".into());
        }
        crate::influence::scorer::parse_device(&self.device)
            .map_err(|e| e.replace("influence.device", "eval.device"))?;
        self.warmup_config(1).validate().map_err(|e| {
            e.replace("warmup.steps", "the step count")
                .replace("warmup.", "eval.model.")
        })
    }

    /// Optimiser steps for a budget of `tokens` predicted tokens.
    pub fn steps(&self, tokens: u64) -> usize {
        let per_step = (self.model.batch * self.model.seq_len) as u64;
        tokens.div_ceil(per_step.max(1)) as usize
    }

    /// The model and optimiser as the warmup trainer's settings (the trainer eval reuses),
    /// for `steps` steps.
    pub fn warmup_config(&self, steps: usize) -> WarmupConfig {
        let m = &self.model;
        WarmupConfig {
            tokenizer: self.tokenizer.clone(),
            steps,
            batch: m.batch,
            seq_len: m.seq_len,
            lr: m.lr,
            min_lr_ratio: m.min_lr_ratio,
            warmup_steps: Some((steps as f64 * m.warmup_fraction).round() as usize),
            weight_decay: m.weight_decay,
            grad_clip: m.grad_clip,
            hidden: m.hidden,
            layers: m.layers,
            heads: m.heads,
            kv_heads: m.kv_heads,
            intermediate: m.intermediate,
            device: self.device.clone(),
            ..WarmupConfig::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_steps_follow_the_budget() {
        let cfg = EvalConfig::default();
        cfg.validate().unwrap();
        // 16 windows of 128 tokens a step: 400,000 tokens is 195.3 steps, rounded up.
        assert_eq!(cfg.steps(400_000), 196);
        assert_eq!(cfg.steps(2048), 1);
        let warm = cfg.warmup_config(196);
        assert_eq!(warm.warmup_steps, Some(20));
        assert_eq!((warm.hidden, warm.layers), (64, 2));
    }

    #[test]
    fn model_settings_override_and_unknown_keys_are_refused() {
        let cfg = EvalConfig::default()
            .with_model_settings(&["layers=3".into(), "lr = 1e-3".into()])
            .unwrap();
        assert_eq!((cfg.model.layers, cfg.model.lr), (3, 1e-3));
        assert_eq!(cfg.model.hidden, EvalModelConfig::default().hidden);
        let err = EvalConfig::default()
            .with_model_settings(&["depth=3".into()])
            .unwrap_err();
        assert!(err.contains("depth"), "{err}");
        let err = EvalConfig::default()
            .with_model_settings(&["layers".into()])
            .unwrap_err();
        assert!(err.contains("KEY=VALUE"), "{err}");
    }

    #[test]
    fn an_eval_section_is_read_from_a_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("job.toml");
        std::fs::write(
            &path,
            "name = \"x\"\n[eval]\ndevice = \"cpu\"\n[eval.model]\nhidden = 64\n",
        )
        .unwrap();
        let cfg = EvalConfig::from_file(&path).unwrap();
        assert_eq!((cfg.device.as_str(), cfg.model.hidden), ("cpu", 64));
        std::fs::write(&path, "[eval]\nfoo = 1\n").unwrap();
        assert!(EvalConfig::from_file(&path).unwrap_err().contains("foo"));
    }
}

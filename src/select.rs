//! The selection stage: drops duplicate ids (the first occurrence in shard order wins, across
//! restarts too) and decides which documents are kept. Until the Quad stages land, the strategy
//! is seeded uniform sampling with an optional token budget; it stays as the `random` baseline.
//!
//! Decisions depend only on the seed, the ids and the shard order, never on which worker holds
//! a document, so the output does not depend on the number of workers.
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::bandit::Strategy;
use crate::error::StateError;
use crate::source::DocMeta;
use crate::state::StateStore;

/// Which documents are kept (`[select]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SelectConfig {
    #[serde(default = "default_strategy")]
    pub strategy: Strategy,
    /// Fraction of documents kept, in (0, 1].
    #[serde(default = "default_ratio")]
    pub ratio: f64,
    /// Stop selecting once this many tokens are selected (documents in shard order).
    #[serde(default)]
    pub max_tokens: Option<u64>,
}

impl Default for SelectConfig {
    fn default() -> Self {
        SelectConfig {
            strategy: default_strategy(),
            ratio: default_ratio(),
            max_tokens: None,
        }
    }
}

impl SelectConfig {
    pub fn validate(&self) -> Result<(), String> {
        if !(self.ratio > 0.0 && self.ratio <= 1.0) {
            return Err(format!(
                "select.ratio must be in (0, 1], got {}",
                self.ratio
            ));
        }
        Ok(())
    }
}

fn default_strategy() -> Strategy {
    Strategy::Random
}
fn default_ratio() -> f64 {
    0.1
}

/// A document's uniform draw in [0, 1), fixed by the seed and its id.
pub fn priority(seed: u64, id: &str) -> f64 {
    (xxh3_64_with_seed(id.as_bytes(), seed) >> 11) as f64 / (1u64 << 53) as f64
}

/// A document whose id was accepted earlier.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Duplicate {
    pub row: u64,
    pub id: String,
    pub first_epoch: u64,
    pub first_row: u64,
}

/// The decisions for one epoch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Verdicts {
    pub epoch: u64,
    /// Rows selected, ascending.
    pub selected: Vec<u64>,
    pub duplicates: Vec<Duplicate>,
}

pub struct Admitter {
    seed: u64,
    config: SelectConfig,
    store: Arc<StateStore>,
    /// Ids accepted in epochs decided but not yet committed, by epoch: (id key -> row). Once
    /// an epoch is committed its ids are in the store and leave memory, so this holds at most
    /// the epochs in flight, whatever the length of the run.
    recent: BTreeMap<u64, HashMap<u128, u64>>,
    /// Selected tokens of epochs committed before this run and not yet passed.
    committed: BTreeMap<u64, u64>,
    used_tokens: u64,
}

impl Admitter {
    pub fn new(
        seed: u64,
        config: SelectConfig,
        store: Arc<StateStore>,
    ) -> Result<Admitter, StateError> {
        let committed = store
            .epochs()?
            .into_iter()
            .map(|(epoch, record)| (epoch, record.selected_tokens))
            .collect();
        Ok(Admitter {
            seed,
            config,
            store,
            recent: BTreeMap::new(),
            committed,
            used_tokens: 0,
        })
    }

    /// Decides one epoch. Epochs must come in increasing order.
    pub fn admit(&mut self, epoch: u64, docs: &mut [DocMeta]) -> Result<Verdicts, StateError> {
        // The budget already spent includes committed epochs before this one.
        let passed: Vec<u64> = self.committed.range(..epoch).map(|(&e, _)| e).collect();
        for e in passed {
            self.used_tokens += self.committed.remove(&e).unwrap_or(0);
        }
        docs.sort_by_key(|d| d.row);
        let mut verdicts = Verdicts {
            epoch,
            ..Default::default()
        };
        let decided: Vec<u64> = self.recent.keys().copied().collect();
        for e in decided {
            if self.store.epoch_committed(e)? {
                self.recent.remove(&e);
            }
        }
        let committed = self.store.first_seen(docs.iter().map(|d| d.id.as_str()))?;
        let mut accepted: HashMap<u128, u64> = HashMap::with_capacity(docs.len());
        for (doc, committed) in docs.iter().zip(committed) {
            let here = (epoch, doc.row);
            let key = crate::state::id_key(&doc.id);
            let in_flight = accepted.get(&key).map(|&row| (epoch, row)).or_else(|| {
                self.recent
                    .iter()
                    .find_map(|(&e, ids)| ids.get(&key).map(|&row| (e, row)))
            });
            let first = in_flight.or(committed);
            if let Some(first) = first.filter(|&at| at < here) {
                verdicts.duplicates.push(Duplicate {
                    row: doc.row,
                    id: doc.id.clone(),
                    first_epoch: first.0,
                    first_row: first.1,
                });
                continue;
            }
            accepted.insert(key, doc.row);
            // Bandit strategies select in the Quad loop, after ingest; admit only dedups.
            if self.config.strategy != Strategy::Random {
                continue;
            }
            if priority(self.seed, &doc.id) >= self.config.ratio {
                continue;
            }
            let tokens = u64::from(doc.tokens);
            if let Some(budget) = self.config.max_tokens {
                if self.used_tokens + tokens > budget {
                    continue;
                }
            }
            self.used_tokens += tokens;
            verdicts.selected.push(doc.row);
        }
        self.recent.insert(epoch, accepted);
        Ok(verdicts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(row: u64, id: &str, tokens: u32) -> DocMeta {
        DocMeta {
            row,
            row_group: 0,
            id: id.into(),
            tokens,
        }
    }

    fn admitter(ratio: f64, max_tokens: Option<u64>) -> (tempfile::TempDir, Admitter) {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(StateStore::open(&dir.path().join("s.redb"), &serde_json::json!({})).unwrap());
        let config = SelectConfig {
            strategy: Strategy::Random,
            ratio,
            max_tokens,
        };
        (dir, Admitter::new(7, config, store).unwrap())
    }

    #[test]
    fn priority_is_uniform_and_seeded() {
        let n = 20_000;
        let below = (0..n)
            .filter(|i| priority(1, &i.to_string()) < 0.25)
            .count();
        assert!((below as f64 / n as f64 - 0.25).abs() < 0.02, "{below}");
        assert_ne!(priority(1, "a"), priority(2, "a"));
        assert_eq!(priority(1, "a"), priority(1, "a"));
    }

    #[test]
    fn later_duplicates_are_dropped_and_budget_holds() {
        let (_dir, mut admit) = admitter(1.0, Some(25));
        let mut e0 = vec![doc(1, "b", 10), doc(0, "a", 10), doc(2, "a", 10)];
        let v0 = admit.admit(0, &mut e0).unwrap();
        assert_eq!(v0.selected, vec![0, 1]);
        assert_eq!(
            v0.duplicates,
            vec![Duplicate {
                row: 2,
                id: "a".into(),
                first_epoch: 0,
                first_row: 0
            }]
        );
        let mut e1 = vec![doc(0, "c", 10), doc(1, "d", 5), doc(2, "b", 1)];
        let v1 = admit.admit(1, &mut e1).unwrap();
        assert_eq!(
            v1.selected,
            vec![1],
            "10 more tokens would pass the budget of 25, 5 fit"
        );
        assert_eq!(v1.duplicates.len(), 1);
    }
}

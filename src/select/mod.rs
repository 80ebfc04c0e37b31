//! The selection stage: drops duplicate ids (the first occurrence in shard order wins, across
//! restarts too) and decides which documents are kept. Until the Quad stages land, the strategy
//! is seeded uniform sampling with an optional token budget; it stays as the `random` baseline.
//!
//! Decisions depend only on the seed, the ids and the shard order, never on which worker holds
//! a document, so the output does not depend on the number of workers.
//!
//! The accepted ids live in the state store; a bounded in-memory filter (`DedupFilter`) in
//! front of it answers "new" for most new ids, so only the ids it cannot rule out (duplicates
//! and its false positives) are looked up in the store's B-tree. `operator` runs it in the
//! dataflow (the admit operator, on worker 0 in epoch order).
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::xxh3_64_with_seed;

use crate::bandit::Strategy;
use crate::dedup::DedupConfig;
use crate::dedup_filter::DedupFilter;
use crate::error::StateError;
use crate::source::DocMeta;
use crate::state::{DedupCommit, StateStore};
use text_dedup::TextDedup;

pub mod operator;
pub mod text_dedup;

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
    /// `dsir`: the weights are fitted against this many pool documents, the first in shard
    /// order.
    #[serde(default = "default_dsir_pool_docs")]
    pub dsir_pool_docs: usize,
    /// `perplexity`: keep the documents whose loss lies between these quantiles of the scored
    /// pool's losses, e.g. [0.1, 0.9], in a seeded random order; absent: the lowest losses
    /// first.
    #[serde(default)]
    pub perplexity_band: Option<[f64; 2]>,
    /// `semdedup`: a document whose cosine similarity to an earlier kept one is at least
    /// 1 - epsilon is a semantic duplicate.
    #[serde(default = "default_semdedup_epsilon")]
    pub semdedup_epsilon: f64,
}

impl Default for SelectConfig {
    fn default() -> Self {
        SelectConfig {
            strategy: default_strategy(),
            ratio: default_ratio(),
            max_tokens: None,
            dsir_pool_docs: default_dsir_pool_docs(),
            perplexity_band: None,
            semdedup_epsilon: default_semdedup_epsilon(),
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
        if !(self.semdedup_epsilon > 0.0 && self.semdedup_epsilon < 1.0) {
            return Err(format!(
                "select.semdedup_epsilon must be in (0, 1), got {}",
                self.semdedup_epsilon
            ));
        }
        if self.dsir_pool_docs == 0 {
            return Err("select.dsir_pool_docs must be at least 1".into());
        }
        if let Some([lo, hi]) = self.perplexity_band {
            if !(0.0 <= lo && lo < hi && hi <= 1.0) {
                return Err(format!(
                    "select.perplexity_band must be two quantiles 0 <= lo < hi <= 1, got [{lo}, {hi}]"
                ));
            }
        }
        Ok(())
    }

    /// The settings of the strategy that decide its selection, for the selection fingerprint
    /// (none for the strategies that have no settings of their own).
    pub fn strategy_settings(&self) -> Option<serde_json::Value> {
        match self.strategy {
            Strategy::Dsir => Some(serde_json::json!({ "dsir_pool_docs": self.dsir_pool_docs })),
            Strategy::Perplexity => {
                Some(serde_json::json!({ "perplexity_band": self.perplexity_band }))
            }
            Strategy::Semdedup => {
                Some(serde_json::json!({ "semdedup_epsilon": self.semdedup_epsilon }))
            }
            _ => None,
        }
    }
}

fn default_strategy() -> Strategy {
    Strategy::Random
}
fn default_ratio() -> f64 {
    0.1
}
/// DSIR's pool sample: enough documents for 10,000 buckets of unigram and bigram counts.
fn default_dsir_pool_docs() -> usize {
    20_000
}
/// SemDeDup's paper dedups web data at epsilon 0.05 to 0.3; 0.05 (cosine at least 0.95) takes
/// near-copies, not merely documents on the same topic.
fn default_semdedup_epsilon() -> f64 {
    0.05
}

/// A document's uniform draw in [0, 1), fixed by the seed and its id.
pub fn priority(seed: u64, id: &str) -> f64 {
    (xxh3_64_with_seed(id.as_bytes(), seed) >> 11) as f64 / (1u64 << 53) as f64
}

/// The tokens selected at ingest so far, in shard order, for `select.max_tokens`: committed
/// epochs' selected tokens (read once from the store) count once decisions pass them.
#[derive(Debug, Default)]
pub struct SpentTokens {
    /// Selected tokens of epochs committed before this run and not yet passed.
    committed: BTreeMap<u64, u64>,
    used: u64,
}

impl SpentTokens {
    pub fn load(store: &StateStore) -> Result<SpentTokens, StateError> {
        let committed = store
            .epochs()?
            .into_iter()
            .map(|(epoch, record)| (epoch, record.selected_tokens))
            .collect();
        Ok(SpentTokens { committed, used: 0 })
    }

    /// A job of several processes: the tokens selected in each epoch a stage recorded in
    /// process 0's store as it decided (`StateStore::admitted_tokens`,
    /// `StateStore::semantic_selected_tokens`), whichever process committed them.
    pub fn recorded(by_epoch: BTreeMap<u64, u64>) -> SpentTokens {
        SpentTokens {
            committed: by_epoch,
            used: 0,
        }
    }

    /// Tokens selected before the epoch being decided, and in it so far.
    pub fn used(&self) -> u64 {
        self.used
    }

    /// Counts the committed epochs before `epoch` (epochs are decided in increasing order).
    /// A record of `epoch` itself is dropped: the epoch is decided again, the same way.
    pub fn begin_epoch(&mut self, epoch: u64) {
        let passed: Vec<u64> = self.committed.range(..=epoch).map(|(&e, _)| e).collect();
        for e in passed {
            let tokens = self.committed.remove(&e).unwrap_or(0);
            if e < epoch {
                self.used += tokens;
            }
        }
    }

    /// Spends `tokens` when they fit `budget` (none: always).
    pub fn spend(&mut self, tokens: u64, budget: Option<u64>) -> bool {
        if budget.is_some_and(|b| self.used + tokens > b) {
            return false;
        }
        self.used += tokens;
        true
    }

    /// `random`'s rule for a document: its seeded priority below `ratio`, then the budget.
    pub fn take(&mut self, seed: u64, ratio: f64, budget: Option<u64>, doc: &DocMeta) -> bool {
        priority(seed, &doc.id) < ratio && self.spend(u64::from(doc.tokens), budget)
    }
}

/// Salt of the `dsir` Gumbel draws, so they are independent of `priority`'s.
const GUMBEL_SALT: u64 = 0x6d62_656c_6764_7372;

/// A standard Gumbel draw fixed by the seed and an id. Gumbel top-k: the k documents with the
/// largest log weight + Gumbel draw are a sample of k without replacement with probabilities
/// in proportion to the weights (DSIR's resampling).
pub fn gumbel(seed: u64, id: &str) -> f64 {
    let u = priority(seed ^ GUMBEL_SALT, id).max(f64::MIN_POSITIVE);
    -(-u.ln()).ln()
}

/// A document `dsir` may select: (row, id, tokens, log importance weight).
type DsirCandidate<'a> = (u64, &'a str, u32, f64);

/// `dsir`'s selection of one epoch: the top `ratio` of its candidates by log weight plus a
/// seeded Gumbel draw (ties by id), then in row order while `max_tokens` allows. Returns the
/// rows, ascending.
fn dsir_select(
    seed: u64,
    ratio: f64,
    candidates: &[DsirCandidate<'_>],
    budget: Option<u64>,
    spent: &mut SpentTokens,
) -> Vec<u64> {
    let k = (ratio * candidates.len() as f64).round() as usize;
    let mut keyed: Vec<(f64, &DsirCandidate<'_>)> = candidates
        .iter()
        .map(|c| (c.3 + gumbel(seed, c.1), c))
        .collect();
    keyed.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1 .1.cmp(b.1 .1)));
    let mut kept: Vec<&DsirCandidate<'_>> = keyed.into_iter().take(k).map(|(_, c)| c).collect();
    kept.sort_by_key(|c| c.0);
    let mut rows = Vec::with_capacity(kept.len());
    for &(row, _, tokens, _) in kept {
        if spent.spend(u64::from(tokens), budget) {
            rows.push(row);
        }
    }
    rows
}

/// What a duplicate repeats of an earlier document.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum DuplicateKind {
    /// Its id.
    #[default]
    Id,
    /// Its normalised text (`duplicate-text`).
    Text,
    /// Most of its word n-grams (`near-duplicate`).
    Near,
    /// Its meaning: the embeddings' cosine is at least 1 - `select.semdedup_epsilon`
    /// (`semantic-duplicate`, the `semdedup` strategy).
    Semantic,
}

impl DuplicateKind {
    /// The reason recorded with the rejected row (text kinds; ids name the id).
    pub fn reason(self) -> &'static str {
        match self {
            DuplicateKind::Id => "duplicate-id",
            DuplicateKind::Text => "duplicate-text",
            DuplicateKind::Near => "near-duplicate",
            DuplicateKind::Semantic => "semantic-duplicate",
        }
    }
}

/// A document that repeats an earlier one: its id (the first occurrence was accepted) or its
/// text (the first occurrence was kept).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Duplicate {
    pub row: u64,
    pub id: String,
    pub first_epoch: u64,
    /// None when the first occurrence is in a committed epoch (the store keeps an id's epoch,
    /// not its row).
    pub first_row: Option<u64>,
    pub kind: DuplicateKind,
    /// The first occurrence's id when it was in flight (text kinds); the epoch sink reads the
    /// others back from their shards.
    pub first_id: Option<String>,
    /// The estimated Jaccard similarity of a near duplicate, the cosine of a semantic one.
    pub similarity: Option<f64>,
}

/// The decisions for one epoch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Verdicts {
    pub epoch: u64,
    /// Rows selected, ascending.
    pub selected: Vec<u64>,
    pub duplicates: Vec<Duplicate>,
    /// What text dedup adds to the store with this epoch.
    pub dedup: DedupCommit,
    /// `semdedup`'s semantic duplicates (decided in the assign stage; the sink adds them).
    #[serde(default)]
    pub semantic: Vec<Duplicate>,
}

pub struct Admitter {
    seed: u64,
    config: SelectConfig,
    store: Arc<StateStore>,
    /// Ids accepted in epochs decided but not yet committed, by epoch: (id key -> row). Once
    /// an epoch is committed its ids are in the store and leave memory, so this holds at most
    /// the epochs in flight, whatever the length of the run.
    recent: BTreeMap<u64, HashMap<u128, u64>>,
    /// Tokens selected so far, for `select.max_tokens`.
    spent: SpentTokens,
    /// Every id accepted so far (committed or in flight) is in it; None: no filter.
    filter: Option<DedupFilter>,
    /// Exact and near-duplicate texts (`[dedup]`).
    texts: TextDedup,
    /// A job of several processes: each decision is recorded in the store (process 0's) as it
    /// is made, since the epochs' owners commit them in their own stores.
    records_decisions: bool,
}

impl Admitter {
    /// `filter_bytes`: the size of the dedup filter (0: none). A resumed job fills it from the
    /// store's ids, one sequential pass over the id table.
    pub fn new(
        seed: u64,
        config: SelectConfig,
        dedup: DedupConfig,
        store: Arc<StateStore>,
        filter_bytes: usize,
    ) -> Result<Admitter, StateError> {
        let spent = SpentTokens::load(&store)?;
        let filter = if filter_bytes == 0 {
            None
        } else {
            let mut filter = DedupFilter::new(filter_bytes, seed);
            store.for_each_id_key(|key| filter.insert(key))?;
            Some(filter)
        };
        let texts = TextDedup::new(dedup, store.clone(), filter_bytes, seed)?;
        Ok(Admitter {
            texts,
            seed,
            config,
            store,
            recent: BTreeMap::new(),
            spent,
            filter,
            records_decisions: false,
        })
    }

    /// For a job of several processes: records each epoch's decision in the store before the
    /// verdicts leave (`StateStore::record_admitted`), and counts the budget spent from those
    /// records. Nothing decided stays in memory then: the store answers for every epoch.
    pub fn recording_decisions(mut self) -> Result<Admitter, StateError> {
        self.spent = SpentTokens::recorded(self.store.admitted_tokens()?);
        self.records_decisions = true;
        Ok(self)
    }

    /// Decides one epoch. Epochs must come in increasing order.
    pub fn admit(&mut self, epoch: u64, docs: &mut [DocMeta]) -> Result<Verdicts, StateError> {
        // The budget already spent includes committed epochs before this one.
        self.spent.begin_epoch(epoch);
        let spent_before = self.spent.used;
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
        let keys: Vec<u128> = docs.iter().map(|d| crate::state::id_key(&d.id)).collect();
        // Ids the filter cannot rule out may have been accepted in an earlier epoch (committed
        // or in flight); the others are new to the run, so only these are looked up.
        let maybe_seen: Vec<bool> = match &self.filter {
            Some(filter) => filter.may_contain_all(&keys),
            None => vec![true; keys.len()],
        };
        let lookup: Vec<u128> = keys
            .iter()
            .zip(&maybe_seen)
            .filter(|(_, &maybe)| maybe)
            .map(|(&key, _)| key)
            .collect();
        let mut found = self.store.first_seen_keys(&lookup)?.into_iter();
        let mut accepted: HashMap<u128, u64> = HashMap::with_capacity(docs.len());
        // The same keys in row order, for the filter once the epoch is decided (the epoch's
        // own repeats are found in `accepted`).
        let mut accepted_keys: Vec<u128> = Vec::with_capacity(docs.len());
        let mut texts = self.texts.begin(epoch, docs)?;
        let mut dsir: Vec<DsirCandidate<'_>> = Vec::new();
        for ((doc, &key), &maybe) in docs.iter().zip(&keys).zip(&maybe_seen) {
            let here = (epoch, doc.row);
            let committed = if maybe { found.next().flatten() } else { None };
            let in_flight = accepted.get(&key).map(|&row| (epoch, row)).or_else(|| {
                maybe
                    .then(|| {
                        self.recent
                            .iter()
                            .find_map(|(&e, ids)| ids.get(&key).map(|&row| (e, row)))
                    })
                    .flatten()
            });
            let first = in_flight
                .map(|(e, row)| (e, Some(row)))
                .or(committed.map(|e| (e, None)));
            let earlier = first.filter(|&(e, row)| match row {
                Some(row) => (e, row) < here,
                None => e < epoch,
            });
            if let Some((first_epoch, first_row)) = earlier {
                verdicts.duplicates.push(Duplicate {
                    row: doc.row,
                    id: doc.id.clone(),
                    first_epoch,
                    first_row,
                    kind: DuplicateKind::Id,
                    first_id: Some(doc.id.clone()),
                    similarity: None,
                });
                continue;
            }
            // Before the id is taken: a rejected text's id stays free, as in the store.
            if let Some(duplicate) = self.texts.decide(&mut texts, doc)? {
                verdicts.duplicates.push(duplicate);
                continue;
            }
            accepted.insert(key, doc.row);
            accepted_keys.push(key);
            // `dsir` selects once the epoch's candidates are known; `semdedup` where clusters
            // are assigned; the bandit strategies in the Quad loop, after ingest. Admit only
            // dedups for them.
            match self.config.strategy {
                Strategy::Random => {}
                Strategy::Dsir => {
                    let weight = doc.dsir_log_weight.unwrap_or(0.0);
                    dsir.push((doc.row, &doc.id, doc.tokens, weight));
                    continue;
                }
                _ => continue,
            }
            let (ratio, budget) = (self.config.ratio, self.config.max_tokens);
            if self.spent.take(self.seed, ratio, budget, doc) {
                verdicts.selected.push(doc.row);
            }
        }
        if !dsir.is_empty() {
            verdicts.selected = dsir_select(
                self.seed,
                self.config.ratio,
                &dsir,
                self.config.max_tokens,
                &mut self.spent,
            );
        }
        if let Some(filter) = self.filter.as_mut() {
            filter.insert_all(&accepted_keys);
        }
        verdicts.dedup = self.texts.end(texts);
        if self.records_decisions {
            let keys: Vec<u128> = accepted.into_keys().collect();
            let selected_tokens = self.spent.used - spent_before;
            self.store
                .record_admitted(epoch, &keys, &verdicts.dedup, selected_tokens)?;
            self.texts.forget_decided();
        } else {
            self.recent.insert(epoch, accepted);
        }
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
            fingerprint: None,
            dsir_log_weight: None,
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
            ..Default::default()
        };
        (
            dir,
            Admitter::new(7, config, DedupConfig::default(), store, 1 << 12).unwrap(),
        )
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
    fn dsir_takes_the_top_ratio_by_weight_and_noise_then_the_budget_in_row_order() {
        let candidates: Vec<DsirCandidate<'_>> = vec![
            (0, "a", 10, -50.0),
            (1, "b", 10, 50.0),
            (2, "c", 10, 40.0),
            (3, "d", 10, -40.0),
            (4, "e", 10, 45.0),
        ];
        let mut used = SpentTokens::default();
        let rows = dsir_select(1, 0.6, &candidates, None, &mut used);
        assert_eq!(rows, vec![1, 2, 4], "the heavy three, whatever the noise");
        assert_eq!(used.used, 30);
        let mut used = SpentTokens {
            used: 5,
            ..Default::default()
        };
        let rows = dsir_select(1, 0.6, &candidates, Some(25), &mut used);
        assert_eq!(rows, vec![1, 2], "the budget in row order");
        // Equal weights: the Gumbel draws decide, seeded.
        let ids: Vec<String> = (0..100).map(|i| format!("doc-{i}")).collect();
        let equal: Vec<DsirCandidate<'_>> = (0..100u64)
            .map(|i| (i, ids[i as usize].as_str(), 1, 0.0))
            .collect();
        let (mut u1, mut u2) = (SpentTokens::default(), SpentTokens::default());
        let first = dsir_select(1, 0.5, &equal, None, &mut u1);
        assert_eq!(first, dsir_select(1, 0.5, &equal, None, &mut u2));
        assert_ne!(first, dsir_select(2, 0.5, &equal, None, &mut u2));
        assert_eq!(first.len(), 50);
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
                first_row: Some(0),
                kind: DuplicateKind::Id,
                first_id: Some("a".into()),
                similarity: None,
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

    #[test]
    fn ids_of_committed_epochs_are_duplicates_after_a_restart_with_or_without_the_filter() {
        for filter_bytes in [0, 1 << 12] {
            let dir = tempfile::tempdir().unwrap();
            let store = Arc::new(
                StateStore::open(&dir.path().join("s.redb"), &serde_json::json!({})).unwrap(),
            );
            store
                .commit_epoch(&crate::state::EpochCommit {
                    epoch: 0,
                    record: Default::default(),
                    accepted: vec![("a".into(), 4), ("b".into(), 5)],
                    rejects: vec![],
                    clusters: None,
                    fit_sample: vec![],
                    fit_sample_size: 0,
                    dedup: Default::default(),
                })
                .unwrap();
            let config = SelectConfig {
                strategy: Strategy::Random,
                ratio: 1.0,
                max_tokens: None,
                ..Default::default()
            };
            let mut admit =
                Admitter::new(7, config, DedupConfig::default(), store, filter_bytes).unwrap();
            let mut e1 = vec![doc(0, "c", 1), doc(1, "b", 1), doc(2, "c", 1)];
            let v1 = admit.admit(1, &mut e1).unwrap();
            assert_eq!(v1.selected, vec![0], "filter {filter_bytes}");
            let firsts: Vec<(u64, Option<u64>)> = v1
                .duplicates
                .iter()
                .map(|d| (d.first_epoch, d.first_row))
                .collect();
            assert_eq!(firsts, [(0, None), (1, Some(0))], "filter {filter_bytes}");
        }
    }

    /// Several processes: the admit stage records its decisions in its store, and the
    /// epochs' owners commit them in theirs, so this store never sees a commit. A restart
    /// decides again the epochs not committed, and must decide them as the first time.
    #[test]
    fn recorded_decisions_are_decided_again_the_same_after_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(StateStore::open(&dir.path().join("s.redb"), &serde_json::json!({})).unwrap());
        let config = SelectConfig {
            strategy: Strategy::Random,
            ratio: 1.0,
            max_tokens: Some(25),
            ..Default::default()
        };
        let start = || {
            Admitter::new(
                7,
                config.clone(),
                DedupConfig::default(),
                store.clone(),
                1 << 12,
            )
            .unwrap()
            .recording_decisions()
            .unwrap()
        };
        let epochs = || {
            vec![
                vec![doc(0, "a", 10), doc(1, "b", 10)],
                vec![doc(0, "c", 10), doc(1, "a", 3), doc(2, "d", 4)],
                vec![doc(0, "b", 2), doc(1, "e", 2), doc(2, "f", 1)],
            ]
        };
        let mut first = start();
        let decided: Vec<Verdicts> = epochs()
            .into_iter()
            .enumerate()
            .map(|(e, mut docs)| first.admit(e as u64, &mut docs).unwrap())
            .collect();
        // 20 tokens in epoch 0; then c (10) would pass the budget of 25 and d (4) fits; then
        // e (2) would pass it and f (1) fits. a and b are repeated ids.
        let selected: Vec<&[u64]> = decided.iter().map(|v| v.selected.as_slice()).collect();
        assert_eq!(selected, [&[0, 1][..], &[2], &[2]]);
        assert_eq!(decided[1].duplicates[0].first_epoch, 0);
        assert_eq!(decided[2].duplicates[0].first_epoch, 0);
        drop(first);
        // Epoch 0 committed by its owner, epochs 1 and 2 not: both are decided again.
        let mut again = start();
        for (e, mut docs) in epochs().into_iter().enumerate().skip(1) {
            assert_eq!(
                again.admit(e as u64, &mut docs).unwrap(),
                decided[e],
                "epoch {e}"
            );
        }
        drop(again);
        // Epoch 1 committed too (by another process): its ids and tokens come from the records.
        let mut later = start();
        let mut docs = epochs().remove(2);
        assert_eq!(later.admit(2, &mut docs).unwrap(), decided[2]);
    }
}

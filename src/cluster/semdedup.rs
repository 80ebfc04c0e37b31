//! SemDeDup (Abbas et al. 2023), the `semdedup` strategy, in the assign stage (worker 0, epoch
//! by epoch in order, where each document's embedding is at hand): a document whose cosine
//! similarity to an earlier kept document is at least 1 - `select.semdedup_epsilon` is a
//! semantic duplicate (rejected, reason `semantic-duplicate`, matched with the earlier one);
//! the others are sampled like `random` (seeded priority of the id below `select.ratio`, then
//! `select.max_tokens` in shard order).
//!
//! The paper compares documents within each k-means cluster only, to make the pairwise search
//! affordable. Here the candidates come from a locality-sensitive index instead, because a
//! document's cluster is not known at its epoch before the initial fit (the first
//! `cluster.fit_window` documents are held for it): `BANDS` bands of `BITS` sign bits of
//! seeded random projections of the embedding (SimHash). A pair at cosine 0.95 shares a band
//! with probability about 0.99, at 0.98 practically always; a pair of unrelated documents
//! about once in 2,700. The index keeps, for each band key, the first kept document with it
//! (as near-duplicate text dedup does): in the store once its epoch is committed
//! (`semantic_bands`, with the quantised vectors in `semantic_vectors`), in memory while in
//! flight. Candidates' vectors are read back by location and the cosine is computed on the
//! quantised vectors (8 bits a coordinate; a cosine error of about 1e-3), the current
//! document's quantised too, so a decision does not depend on which epochs have committed.
//! Approximation: a near-copy whose every band bucket was taken first by another (non-copy)
//! document is not found. Nothing here grows with the pool but the store.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::error::StateError;
use crate::hash::mix;
use crate::select::{Duplicate, DuplicateKind, SpentTokens};
use crate::source::DocMeta;
use crate::state::{SemanticCommit, StateStore};

/// Bands of the index.
pub const BANDS: usize = 24;
/// Sign bits a band.
pub const BITS: usize = 16;

const PLANE_SALT: u64 = 0x7365_6d64_6564_7570;
const BAND_SALT: u64 = 0x6261_6e64_6b65_7973;

/// What `semdedup` decided of an epoch: the selected rows (ascending) and the semantic
/// duplicates.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SemanticVerdicts {
    pub selected: Vec<u64>,
    pub duplicates: Vec<Duplicate>,
}

/// The settings `semdedup` takes of the job.
#[derive(Debug, Clone)]
pub struct SemDedupSettings {
    pub seed: u64,
    pub epsilon: f64,
    pub ratio: f64,
    pub max_tokens: Option<u64>,
}

/// A vector as the index keeps it: its largest magnitude / 127 (f32, little endian), then each
/// coordinate over that scale rounded to an i8.
pub fn quantise(v: &[f32]) -> Vec<u8> {
    let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let scale = if max > 0.0 { max / 127.0 } else { 1.0 };
    let mut out = Vec::with_capacity(4 + v.len());
    out.extend_from_slice(&scale.to_le_bytes());
    out.extend(
        v.iter()
            .map(|x| (x / scale).round().clamp(-127.0, 127.0) as i8 as u8),
    );
    out
}

/// The cosine similarity of two quantised vectors (0 when either is missing or zero).
pub fn quantised_cosine(a: &[u8], b: &[u8]) -> f64 {
    if a.len() != b.len() || a.len() <= 4 {
        return 0.0;
    }
    let (mut dot, mut na, mut nb) = (0i64, 0i64, 0i64);
    for (&x, &y) in a[4..].iter().zip(&b[4..]) {
        let (x, y) = (i64::from(x as i8), i64::from(y as i8));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0 || nb == 0 {
        return 0.0;
    }
    dot as f64 / ((na as f64).sqrt() * (nb as f64).sqrt())
}

/// A document's location: (epoch, row).
type Location = (u64, u64);

/// What an epoch decided and not yet committed adds to the index.
#[derive(Default)]
struct InFlight {
    /// Band key -> row of the first kept document with it.
    bands: HashMap<u64, u64>,
    /// Row -> (id, quantised vector) of the kept documents `bands` points to.
    kept: HashMap<u64, (String, Vec<u8>)>,
}

/// One epoch being decided (its own additions are in `recent` as it goes): the store's
/// answers for its keys, and what it adds to the store.
struct EpochState {
    stored: HashMap<u64, Location>,
    commit: SemanticCommit,
}

pub struct SemDedup {
    settings: SemDedupSettings,
    dim: usize,
    /// `BANDS * BITS` random sign vectors of width `dim`, row-major, +-1.
    planes: Vec<f32>,
    store: Arc<StateStore>,
    /// Epochs decided and not yet committed (at most those in flight), and the one being
    /// decided.
    recent: BTreeMap<u64, InFlight>,
    /// Tokens selected so far, for `select.max_tokens`.
    spent: SpentTokens,
    /// A job of several processes: each epoch's decision is recorded in the store (process
    /// 0's) as it is made, since the epoch's owner commits it in its own store.
    records_decisions: bool,
}

impl SemDedup {
    /// `records_decisions` on several processes: see the field.
    pub fn new(
        settings: SemDedupSettings,
        dim: usize,
        store: Arc<StateStore>,
        records_decisions: bool,
    ) -> Result<SemDedup, StateError> {
        let spent = if records_decisions {
            SpentTokens::recorded(store.semantic_selected_tokens()?)
        } else {
            SpentTokens::load(&store)?
        };
        let salt = mix(settings.seed ^ PLANE_SALT);
        let planes = (0..(BANDS * BITS * dim) as u64)
            .map(|i| if mix(salt ^ i) & 1 == 0 { 1.0 } else { -1.0 })
            .collect();
        Ok(SemDedup {
            settings,
            dim,
            planes,
            store,
            recent: BTreeMap::new(),
            spent,
            records_decisions,
        })
    }

    /// The band keys of a vector: the sign bits of its projections, `BITS` a band.
    pub fn band_keys(&self, v: &[f32]) -> [u64; BANDS] {
        let salt = mix(self.settings.seed ^ BAND_SALT);
        let mut keys = [0u64; BANDS];
        for (band, key) in keys.iter_mut().enumerate() {
            let mut bits = 0u64;
            for bit in 0..BITS {
                let plane = (band * BITS + bit) * self.dim;
                let row = &self.planes[plane..plane + self.dim];
                let dot: f32 = row.iter().zip(v).map(|(p, x)| p * x).sum();
                bits = (bits << 1) | u64::from(dot >= 0.0);
            }
            *key = mix(salt ^ (((band as u64) << 32) | bits));
        }
        keys
    }

    /// Decides one epoch: `docs` (the epoch's documents that passed dedup) and their unit
    /// vectors, row-major. Returns the verdicts and what the epoch adds to the index, for its
    /// owner to commit (nothing when the decision is recorded here, on several processes).
    pub fn decide_epoch(
        &mut self,
        epoch: u64,
        docs: &[DocMeta],
        vectors: &[f32],
    ) -> Result<(SemanticVerdicts, SemanticCommit), StateError> {
        self.spent.begin_epoch(epoch);
        let spent_before = self.spent.used();
        let decided: Vec<u64> = self.recent.keys().copied().collect();
        for e in decided {
            if self.store.epoch_committed(e)? {
                self.recent.remove(&e);
            }
        }
        let dim = self.dim.max(1);
        let keys: Vec<[u64; BANDS]> = (0..docs.len())
            .map(|i| self.band_keys(&vectors[i * dim..(i + 1) * dim]))
            .collect();
        let mut wanted: Vec<u64> = keys.iter().flatten().copied().collect();
        wanted.sort_unstable();
        wanted.dedup();
        let stored: HashMap<u64, Location> = wanted
            .iter()
            .copied()
            .zip(self.store.first_semantic_bands(&wanted)?)
            .filter_map(|(key, first)| first.filter(|&(e, _)| e < epoch).map(|f| (key, f)))
            .collect();
        let mut state = EpochState {
            stored,
            commit: SemanticCommit::default(),
        };
        self.recent.insert(epoch, InFlight::default());
        let mut verdicts = SemanticVerdicts::default();
        let mut order: Vec<usize> = (0..docs.len()).collect();
        order.sort_by_key(|&i| docs[i].row);
        for i in order {
            let doc = &docs[i];
            let quantised = quantise(&vectors[i * dim..(i + 1) * dim]);
            if let Some((first, cosine)) = self.match_of(&state, &keys[i], &quantised)? {
                verdicts.duplicates.push(Duplicate {
                    row: doc.row,
                    id: doc.id.clone(),
                    first_epoch: first.0,
                    first_row: Some(first.1),
                    kind: DuplicateKind::Semantic,
                    first_id: self.in_flight(first).map(|(id, _)| id.clone()),
                    similarity: Some(cosine),
                });
                continue;
            }
            self.keep(&mut state, epoch, doc, &keys[i], quantised);
            if self.spent.take(
                self.settings.seed,
                self.settings.ratio,
                self.settings.max_tokens,
                doc,
            ) {
                verdicts.selected.push(doc.row);
            }
        }
        if self.records_decisions {
            let selected = self.spent.used() - spent_before;
            self.store.record_semantic(epoch, &state.commit, selected)?;
            // The store answers for every epoch decided so far from now on.
            self.recent.clear();
            return Ok((verdicts, SemanticCommit::default()));
        }
        Ok((verdicts, state.commit))
    }

    /// The first kept document with a band key, before the current document: the store's,
    /// else an epoch's in flight (this one included).
    fn first_of(&self, state: &EpochState, key: u64) -> Option<Location> {
        let in_flight = || {
            self.recent
                .iter()
                .find_map(|(&e, f)| f.bands.get(&key).map(|&row| (e, row)))
        };
        state.stored.get(&key).copied().or_else(in_flight)
    }

    /// The id and vector of a kept document in flight (None when its epoch is committed).
    fn in_flight(&self, (epoch, row): Location) -> Option<&(String, Vec<u8>)> {
        self.recent.get(&epoch).and_then(|f| f.kept.get(&row))
    }

    /// The earliest candidate (sharing a band) whose cosine reaches 1 - epsilon.
    fn match_of(
        &self,
        state: &EpochState,
        keys: &[u64; BANDS],
        quantised: &[u8],
    ) -> Result<Option<(Location, f64)>, StateError> {
        // In location order: the earliest match wins.
        let candidates: BTreeSet<Location> = keys
            .iter()
            .filter_map(|&k| self.first_of(state, k))
            .collect();
        let committed: Vec<Location> = candidates
            .iter()
            .copied()
            .filter(|&loc| self.in_flight(loc).is_none())
            .collect();
        let mut stored = self.store.semantic_vectors(&committed)?.into_iter();
        let threshold = 1.0 - self.settings.epsilon;
        for location in candidates {
            let cosine = match self.in_flight(location) {
                Some((_, vector)) => quantised_cosine(quantised, vector),
                None => quantised_cosine(quantised, &stored.next().flatten().unwrap_or_default()),
            };
            if cosine >= threshold {
                return Ok(Some((location, cosine)));
            }
        }
        Ok(None)
    }

    /// A kept document becomes the first of every band key no earlier kept document has.
    fn keep(
        &mut self,
        state: &mut EpochState,
        epoch: u64,
        doc: &DocMeta,
        keys: &[u64; BANDS],
        q: Vec<u8>,
    ) {
        let new: Vec<u64> = keys
            .iter()
            .copied()
            .filter(|&key| self.first_of(state, key).is_none())
            .collect();
        if new.is_empty() {
            return;
        }
        let current = self.recent.entry(epoch).or_default();
        for key in new {
            current.bands.insert(key, doc.row);
            state.commit.bands.push((key, doc.row));
        }
        state.commit.vectors.push((doc.row, q.clone()));
        current.kept.insert(doc.row, (doc.id.clone(), q));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    #[test]
    fn quantised_cosine_is_close_to_the_exact_one() {
        let a = unit(&[0.3, -0.2, 0.9, 0.1, -0.05, 0.4, 0.0, 0.2]);
        let b = unit(&[0.25, -0.2, 0.95, 0.1, 0.0, 0.35, 0.05, 0.2]);
        let exact: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
        let q = quantised_cosine(&quantise(&a), &quantise(&b));
        assert!((q - f64::from(exact)).abs() < 5e-3, "{q} vs {exact}");
        assert!((quantised_cosine(&quantise(&a), &quantise(&a)) - 1.0).abs() < 1e-9);
    }

    #[test]
    fn near_copies_are_dropped_across_epochs_and_distinct_vectors_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store =
            Arc::new(StateStore::open(&dir.path().join("s.redb"), &serde_json::json!({})).unwrap());
        let settings = SemDedupSettings {
            seed: 3,
            epsilon: 0.05,
            ratio: 1.0,
            max_tokens: None,
        };
        let mut sd = SemDedup::new(settings, 8, store, false).unwrap();
        let doc = |row: u64, id: &str| DocMeta {
            row,
            row_group: 0,
            id: id.into(),
            tokens: 5,
            fingerprint: None,
            dsir_log_weight: None,
        };
        let a = unit(&[1.0, 0.2, 0.0, 0.1, 0.0, 0.3, 0.0, 0.0]);
        let b = unit(&[0.0, 0.0, 1.0, 0.0, 0.5, 0.0, 0.2, 0.1]);
        let a_copy = unit(&[1.0, 0.21, 0.01, 0.1, 0.0, 0.3, 0.0, 0.02]);
        let (v0, c0) = sd
            .decide_epoch(0, &[doc(0, "a"), doc(1, "b")], &[a, b].concat())
            .unwrap();
        assert_eq!(v0.selected, vec![0, 1]);
        assert!(v0.duplicates.is_empty());
        assert_eq!(c0.vectors.len(), 2);
        let (v1, _) = sd.decide_epoch(1, &[doc(0, "a2")], &a_copy).unwrap();
        assert!(v1.selected.is_empty());
        let d = &v1.duplicates[0];
        assert_eq!(
            (d.first_epoch, d.first_row, d.kind),
            (0, Some(0), DuplicateKind::Semantic)
        );
        assert_eq!(d.first_id.as_deref(), Some("a"));
        assert!(d.similarity.unwrap() >= 0.95);
    }
}

//! Exact and near-duplicate texts in the admit stage: compares each document's fingerprint
//! (computed where the shard was read, `dedup::Fingerprint`) with those of the documents kept
//! before it in shard order. The first kept document with each text hash and each band key is
//! what a later document is compared with: in the store once its epoch is committed (`TEXTS`,
//! `BANDS`, `SKETCHES`), in memory while it is in flight. Both hold the same values (a
//! location and an 8-bit sketch), so a decision does not depend on which epochs have
//! committed, hence not on the number of workers or on a restart.
//!
//! A bounded filter (`DedupFilter`) in front of each table answers "new" for most new keys
//! without a store read, as for the ids; nothing here grows with the pool but the store.
use std::collections::BTreeMap;
use std::sync::Arc;

use super::{Duplicate, DuplicateKind};
use crate::dedup::{estimated_jaccard, DedupConfig, Fingerprint};
use crate::dedup_filter::DedupFilter;
use crate::error::StateError;
use crate::hash::MixedKeys;
use crate::source::DocMeta;
use crate::state::{DedupCommit, StateStore};

/// A document's location: (epoch, row).
type Location = (u64, u64);

/// The maps here are keyed by hashes and rows: `MixedKeys` rather than SipHash.
type HashMap<K, V> = std::collections::HashMap<K, V, MixedKeys>;

/// What an epoch decided and not yet committed adds to the tables.
#[derive(Default)]
struct InFlight {
    /// Text hash -> row of the first kept document with it.
    texts: HashMap<u64, u64>,
    /// Band key -> row of the first kept document with it.
    bands: HashMap<u64, u64>,
    /// Row -> (id, sketch) of the kept documents `texts` and `bands` point to.
    kept: HashMap<u64, (String, Vec<u8>)>,
}

/// One epoch being decided: the store's answers for its keys, and what it adds.
pub struct EpochTexts {
    epoch: u64,
    stored_texts: HashMap<u64, Location>,
    stored_bands: HashMap<u64, Location>,
    current: InFlight,
    commit: DedupCommit,
    /// The document being decided: the first kept document of each of its bands (a buffer
    /// kept from one document to the next).
    firsts: Vec<Option<Location>>,
}

pub struct TextDedup {
    config: DedupConfig,
    store: Arc<StateStore>,
    text_filter: Option<DedupFilter>,
    band_filter: Option<DedupFilter>,
    /// Epochs decided and not yet committed (at most those in flight).
    recent: BTreeMap<u64, InFlight>,
}

/// A filter of `bytes` (None when 0 or the kind is off), filled from the store's keys.
fn filled_filter(
    store: &StateStore,
    on: bool,
    bands: bool,
    bytes: usize,
    seed: u64,
) -> Result<Option<DedupFilter>, StateError> {
    if !on || bytes == 0 {
        return Ok(None);
    }
    let mut filter = DedupFilter::new(bytes, seed);
    store.for_each_dedup_key(bands, |key| filter.insert(u128::from(key)))?;
    Ok(Some(filter))
}

/// Looks up in the store the keys the filter cannot rule out, each once.
fn stored_firsts(
    keys: impl Iterator<Item = u64>,
    filter: Option<&DedupFilter>,
    lookup: impl FnOnce(&[u64]) -> Result<Vec<Option<Location>>, StateError>,
) -> Result<HashMap<u64, Location>, StateError> {
    let mut wanted: Vec<u64> = keys.collect();
    if let Some(filter) = filter {
        let wide: Vec<u128> = wanted.iter().map(|&key| u128::from(key)).collect();
        let mut maybe = filter.may_contain_all(&wide).into_iter();
        wanted.retain(|_| maybe.next().expect("one answer a key"));
    }
    wanted.sort_unstable();
    wanted.dedup();
    let found = lookup(&wanted)?;
    Ok(wanted
        .into_iter()
        .zip(found)
        .filter_map(|(key, first)| first.map(|first| (key, first)))
        .collect())
}

impl TextDedup {
    /// `filter_bytes`: the size of each filter (texts, bands; 0: none).
    pub fn new(
        config: DedupConfig,
        store: Arc<StateStore>,
        filter_bytes: usize,
        seed: u64,
    ) -> Result<TextDedup, StateError> {
        let text_filter = filled_filter(&store, config.exact, false, filter_bytes, seed)?;
        let band_filter = filled_filter(&store, config.near, true, filter_bytes, seed)?;
        Ok(TextDedup {
            config,
            store,
            text_filter,
            band_filter,
            recent: BTreeMap::new(),
        })
    }

    /// Starts deciding `epoch`: forgets committed epochs (the store has them now) and reads
    /// the store's firsts of the epoch's keys in one pass each.
    pub fn begin(&mut self, epoch: u64, docs: &[DocMeta]) -> Result<EpochTexts, StateError> {
        let decided: Vec<u64> = self.recent.keys().copied().collect();
        for e in decided {
            if self.store.epoch_committed(e)? {
                self.recent.remove(&e);
            }
        }
        let fingerprints = || docs.iter().filter_map(|d| d.fingerprint.as_ref());
        let stored_texts = if self.config.exact {
            let keys = fingerprints().map(|f| f.text);
            stored_firsts(keys, self.text_filter.as_ref(), |k| {
                self.store.first_texts(k)
            })?
        } else {
            HashMap::default()
        };
        let stored_bands = if self.config.near {
            let keys = fingerprints().flat_map(|f| f.bands.iter().copied());
            stored_firsts(keys, self.band_filter.as_ref(), |k| {
                self.store.first_bands(k)
            })?
        } else {
            HashMap::default()
        };
        // Room for every document's keys: most documents are kept, with a new key a band.
        let bands = if self.config.near {
            self.config.bands
        } else {
            0
        };
        let mut current = InFlight::default();
        current.bands.reserve(docs.len() * bands);
        let mut commit = DedupCommit::default();
        commit.bands.reserve(docs.len() * bands);
        Ok(EpochTexts {
            epoch,
            stored_texts,
            stored_bands,
            current,
            commit,
            firsts: Vec::with_capacity(bands),
        })
    }

    /// Ends the epoch: what it adds to the store, to commit with it. Its new keys join the
    /// filters now, in one batch each (the epoch's own keys are found in its maps).
    pub fn end(&mut self, state: EpochTexts) -> DedupCommit {
        let wide = |firsts: &[(u64, u64)]| -> Vec<u128> {
            firsts.iter().map(|&(key, _)| u128::from(key)).collect()
        };
        if let Some(filter) = self.text_filter.as_mut() {
            filter.insert_all(&wide(&state.commit.texts));
        }
        if let Some(filter) = self.band_filter.as_mut() {
            filter.insert_all(&wide(&state.commit.bands));
        }
        self.recent.insert(state.epoch, state.current);
        state.commit
    }

    /// Forgets every epoch decided so far: the store holds them already (a job of several
    /// processes records each decision there as it is made, `StateStore::record_admitted`).
    pub fn forget_decided(&mut self) {
        self.recent.clear();
    }

    /// The first kept document with a text hash (`bands` false) or band key, before `here`.
    fn first_of(&self, state: &EpochTexts, bands: bool, key: u64) -> Option<Location> {
        let pick = |f: &InFlight| {
            let firsts = if bands { &f.bands } else { &f.texts };
            firsts.get(&key).copied()
        };
        let stored = if bands {
            &state.stored_bands
        } else {
            &state.stored_texts
        };
        stored
            .get(&key)
            .copied()
            .filter(|&(e, _)| e < state.epoch)
            .or_else(|| {
                self.recent
                    .iter()
                    .find_map(|(&e, f)| pick(f).map(|row| (e, row)))
            })
            .or_else(|| pick(&state.current).map(|row| (state.epoch, row)))
    }

    /// The id and sketch of a kept document in flight (None when its epoch is committed).
    fn in_flight<'a>(
        &'a self,
        state: &'a EpochTexts,
        (epoch, row): Location,
    ) -> Option<&'a (String, Vec<u8>)> {
        if epoch == state.epoch {
            return state.current.kept.get(&row);
        }
        self.recent.get(&epoch).and_then(|f| f.kept.get(&row))
    }

    /// The earliest of `firsts` (the first kept document of each of a document's bands)
    /// whose estimated Jaccard similarity to `fingerprint` reaches the threshold: (location,
    /// similarity).
    fn near_match(
        &self,
        state: &EpochTexts,
        fingerprint: &Fingerprint,
        firsts: &[Option<Location>],
    ) -> Result<Option<(Location, f64)>, StateError> {
        let mut candidates: Vec<Location> = firsts.iter().flatten().copied().collect();
        if candidates.is_empty() {
            return Ok(None);
        }
        candidates.sort_unstable();
        candidates.dedup();
        let committed: Vec<Location> = candidates
            .iter()
            .copied()
            .filter(|&loc| self.in_flight(state, loc).is_none())
            .collect();
        let mut stored = self.store.sketches(&committed)?.into_iter();
        for location in candidates {
            let similarity = match self.in_flight(state, location) {
                Some((_, sketch)) => estimated_jaccard(&fingerprint.sketch, sketch),
                None => estimated_jaccard(
                    &fingerprint.sketch,
                    &stored.next().flatten().unwrap_or_default(),
                ),
            };
            if similarity >= self.config.threshold {
                return Ok(Some((location, similarity)));
            }
        }
        Ok(None)
    }

    /// Decides one document (documents of the epoch come in row order): a duplicate of an
    /// earlier kept text, or kept (its new keys join the epoch's).
    pub fn decide(
        &mut self,
        state: &mut EpochTexts,
        doc: &DocMeta,
    ) -> Result<Option<Duplicate>, StateError> {
        let Some(fingerprint) = doc.fingerprint.as_ref() else {
            return Ok(None);
        };
        let duplicate =
            |kind, (first_epoch, first_row): Location, similarity, this: &Self, state| Duplicate {
                row: doc.row,
                id: doc.id.clone(),
                first_epoch,
                first_row: Some(first_row),
                kind,
                first_id: this
                    .in_flight(state, (first_epoch, first_row))
                    .map(|(id, _)| id.clone()),
                similarity,
            };
        let first_text = if self.config.exact {
            self.first_of(state, false, fingerprint.text)
        } else {
            None
        };
        if let Some(first) = first_text {
            return Ok(Some(duplicate(
                DuplicateKind::Text,
                first,
                None,
                self,
                state,
            )));
        }
        // The first kept document of each band, looked up once: near_match compares with
        // them, and a kept document becomes the first of the bands that have none.
        let mut firsts = std::mem::take(&mut state.firsts);
        firsts.clear();
        if self.config.near {
            let first_of_band = |&key: &u64| self.first_of(state, true, key);
            firsts.extend(fingerprint.bands.iter().map(first_of_band));
            if let Some((first, similarity)) = self.near_match(state, fingerprint, &firsts)? {
                state.firsts = firsts;
                let near = duplicate(DuplicateKind::Near, first, Some(similarity), self, state);
                return Ok(Some(near));
            }
        }
        self.keep(state, doc, fingerprint, &firsts);
        state.firsts = firsts;
        Ok(None)
    }

    /// A kept document becomes the first of its text and of every band key no earlier kept
    /// document has (`firsts`: the first of each band before it).
    fn keep(
        &mut self,
        state: &mut EpochTexts,
        doc: &DocMeta,
        fingerprint: &Fingerprint,
        firsts: &[Option<Location>],
    ) {
        let mut pointed_to = false;
        if self.config.exact {
            // No earlier document has this text, or `decide` would have rejected it.
            state.current.texts.insert(fingerprint.text, doc.row);
            state.commit.texts.push((fingerprint.text, doc.row));
            pointed_to = true;
        }
        let mut new_band = false;
        for (&key, first) in fingerprint.bands.iter().zip(firsts) {
            if first.is_some() {
                continue;
            }
            state.current.bands.insert(key, doc.row);
            state.commit.bands.push((key, doc.row));
            new_band = true;
        }
        if new_band {
            state
                .commit
                .sketches
                .push((doc.row, fingerprint.sketch.clone()));
        }
        if pointed_to || new_band {
            state
                .current
                .kept
                .insert(doc.row, (doc.id.clone(), fingerprint.sketch.clone()));
        }
    }
}

#[cfg(test)]
mod tests;

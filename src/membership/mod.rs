//! The membership stage: the members of each cluster, kept in the state store in a seeded
//! draw order (`StateStore::draw`, `bandit::draw`), and their texts fetched back from their
//! shards by location (ids and texts are never stored). `operator` runs it in the Quad loop:
//! each pull drawn on the worker that owns its cluster.
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use arrow::array::{ArrayRef, RecordBatch};

use crate::bandit::DocLoc;
use crate::source::{self, SourceConfig};
use crate::state::StateStore;

pub mod operator;

/// The shard file of each epoch, looked up in the store again when a new epoch appears (watch
/// mode registers shards while rounds go on).
pub struct ShardPaths {
    store: Arc<StateStore>,
    known: Mutex<BTreeMap<u64, PathBuf>>,
}

impl ShardPaths {
    pub fn new(store: Arc<StateStore>) -> ShardPaths {
        ShardPaths {
            store,
            known: Mutex::new(BTreeMap::new()),
        }
    }

    pub fn get(&self, epoch: u64) -> Result<PathBuf> {
        let mut known = self.known.lock().expect("shard paths");
        if !known.contains_key(&epoch) {
            *known = self.store.shard_paths()?;
        }
        known
            .get(&epoch)
            .cloned()
            .with_context(|| format!("no shard is recorded for epoch {epoch}"))
    }
}

/// The source settings projected to the id and text columns: what fetching texts reads (the
/// other columns, an embedding column above all, are left undecoded).
fn text_only(source: &SourceConfig) -> SourceConfig {
    SourceConfig {
        columns: Some(Vec::new()),
        ..source.clone()
    }
}

/// The texts at `locations`, in their order (`None` where null), read back from their shards:
/// one read per shard, of the id and text columns of the pages that hold them.
pub fn texts_at(
    shards: &ShardPaths,
    source: &SourceConfig,
    locations: &[DocLoc],
) -> Result<Vec<Option<String>>> {
    let mut by_epoch: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for loc in locations {
        by_epoch.entry(loc.shard).or_default().push(loc.row);
    }
    let mut texts: BTreeMap<(u64, u64), String> = BTreeMap::new();
    for (epoch, mut rows) in by_epoch {
        rows.sort_unstable();
        rows.dedup();
        let path = shards.get(epoch)?;
        let batch = source::fetch_rows(&path, &text_only(source), &rows)?;
        let column = column(&batch, &source.text_column, &path)?;
        for (i, row) in rows.iter().enumerate() {
            if let Some(text) = source::string_at(column, i) {
                texts.insert((epoch, *row), text.to_string());
            }
        }
    }
    Ok(locations
        .iter()
        .map(|loc| texts.get(&(loc.shard, loc.row)).cloned())
        .collect())
}

fn column<'a>(batch: &'a RecordBatch, name: &str, path: &std::path::Path) -> Result<&'a ArrayRef> {
    let index = batch
        .schema()
        .index_of(name)
        .with_context(|| format!("{}: column '{name}' is missing", path.display()))?;
    Ok(batch.column(index))
}

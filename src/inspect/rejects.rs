//! `quad inspect rejects JOB`: the rejected rows and quarantined shards the store records.
use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result};

use crate::source::Reject;
use crate::state::StateStore;

/// The kind of reject whose row repeats an id accepted earlier (`sink::epoch_sink`).
const DUPLICATE_ID: &str = "duplicate id";

/// A rejected row as listed: where it is, why, and for a duplicate id where the id was first
/// accepted.
struct Listed {
    epoch: u64,
    reject: Reject,
    repeats: Option<String>,
}

/// Lists the first `limit` rejected rows whose reason contains `reason` (any when None;
/// case-insensitive), with a count of every reject by kind and the quarantined shards.
pub fn inspect_rejects(
    spec: &crate::config::JobSpec,
    reason: Option<&str>,
    limit: usize,
) -> Result<String> {
    let path = spec.state_path();
    let store = StateStore::open_existing(&path)?;
    let shards = store.shard_paths()?;
    let wanted = reason.map(str::to_lowercase);
    let mut by_kind: BTreeMap<String, u64> = BTreeMap::new();
    let mut matched = 0u64;
    let mut listed: Vec<Listed> = Vec::new();
    store.for_each_reject(|epoch, reject| {
        *by_kind.entry(reject.kind()).or_default() += 1;
        let matches = wanted
            .as_deref()
            .is_none_or(|w| reject.reason.to_lowercase().contains(w));
        if matches {
            matched += 1;
            if listed.len() < limit {
                listed.push(Listed {
                    epoch,
                    reject,
                    repeats: None,
                });
            }
        }
        true
    })?;
    find_repeated_ids(&store, &shards, &spec.source.id_column, &mut listed)?;
    let quarantined: Vec<(String, String)> = store
        .epochs()?
        .into_values()
        .filter_map(|r| r.quarantined.map(|why| (r.shard, why)))
        .collect();
    let mut out = String::new();
    let total: u64 = by_kind.values().sum();
    writeln!(
        out,
        "job '{}': {total} rejected rows, {} quarantined shards ({})",
        spec.name,
        quarantined.len(),
        path.display()
    )?;
    for (kind, count) in &by_kind {
        writeln!(out, "  {count:>10}  {kind}")?;
    }
    for (shard, why) in &quarantined {
        writeln!(out, "quarantined {shard}: {why}")?;
    }
    let filter = reason.map_or(String::new(), |r| format!(" whose reason contains {r:?}"));
    writeln!(
        out,
        "{matched} rejected rows{filter}, the first {} shown (file, row, column, reason):",
        listed.len()
    )?;
    for row in &listed {
        let file = shards.get(&row.epoch).map_or_else(
            || format!("epoch {}", row.epoch),
            |p| p.display().to_string(),
        );
        let repeats = row
            .repeats
            .as_deref()
            .map_or(String::new(), |r| format!("; {r}"));
        writeln!(
            out,
            "  {file}\t{}\t{}\t{}{repeats}",
            row.reject.row, row.reject.column, row.reject.reason
        )?;
    }
    Ok(out)
}

/// For the listed duplicate ids, the id (read back from the shard, one read per shard) and
/// where it was first accepted (the store's id table).
fn find_repeated_ids(
    store: &StateStore,
    shards: &BTreeMap<u64, PathBuf>,
    id_column: &str,
    listed: &mut [Listed],
) -> Result<()> {
    let mut rows_of: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for row in listed.iter().filter(|r| r.reject.kind() == DUPLICATE_ID) {
        rows_of.entry(row.epoch).or_default().push(row.reject.row);
    }
    let mut ids: HashMap<(u64, u64), String> = HashMap::new();
    for (epoch, rows) in &rows_of {
        let Some(shard) = shards.get(epoch) else {
            continue;
        };
        let cells = crate::source::fetch_cells(shard, rows, &[id_column])
            .with_context(|| format!("reading the duplicate ids of {}", shard.display()))?;
        for (row, cells) in cells {
            if let Some(Some(id)) = cells.into_iter().next() {
                ids.insert((*epoch, row), id);
            }
        }
    }
    for row in listed.iter_mut() {
        let Some(id) = ids.get(&(row.epoch, row.reject.row)) else {
            continue;
        };
        let first = store.first_seen_keys(&[crate::state::id_key(id)])?[0];
        row.repeats = Some(match first.and_then(|e| shards.get(&e).map(|p| (e, p))) {
            Some((epoch, path)) => format!(
                "repeats id {id:?} first accepted in {} (epoch {epoch})",
                path.display()
            ),
            None => format!("repeats id {id:?}"),
        });
    }
    Ok(())
}

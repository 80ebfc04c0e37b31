//! `quad inspect FILE.parquet`: schema, row count, row groups and a few rows; `quad inspect
//! clusters JOB` and `quad inspect rejects JOB`: what a job's store holds.
use std::fs::File;
use std::path::Path;

use anyhow::{Context, Result};
use arrow::array::{ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::util::pretty::pretty_format_batches;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use std::sync::Arc;

mod rejects;
pub use rejects::inspect_rejects;

/// Longest cell shown; long texts are cut with an ellipsis.
const CELL_CHARS: usize = 60;

pub fn inspect(path: &Path, rows: usize) -> Result<String> {
    let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file)
        .with_context(|| format!("{}: not a readable Parquet file", path.display()))?;
    let metadata = builder.metadata().clone();
    let schema = builder.schema().clone();
    let mut out = String::new();
    let total: i64 = metadata.row_groups().iter().map(|rg| rg.num_rows()).sum();
    out.push_str(&format!("{}\n", path.display()));
    out.push_str(&format!(
        "rows: {total}, row groups: {}\n",
        metadata.num_row_groups()
    ));
    if let Some(rg) = metadata.row_groups().first() {
        if let Some(col) = rg.columns().first() {
            out.push_str(&format!(
                "compression: {} (the level is not stored in the file)\n",
                format!("{:?}", col.compression())
                    .split('(')
                    .next()
                    .unwrap_or_default()
                    .to_string()
            ));
        }
    }
    out.push_str("schema:\n");
    for field in schema.fields() {
        out.push_str(&format!(
            "  {}: {}{}\n",
            field.name(),
            field.data_type(),
            if field.is_nullable() {
                " (nullable)"
            } else {
                ""
            }
        ));
    }
    if rows > 0 {
        let reader = builder.with_batch_size(rows).with_limit(rows).build()?;
        let batches: Vec<RecordBatch> = reader.collect::<std::result::Result<_, _>>()?;
        let shown: Vec<RecordBatch> = batches.iter().map(shorten).collect::<Result<_>>()?;
        out.push_str(&format!(
            "first {} rows:\n{}\n",
            shown.iter().map(|b| b.num_rows()).sum::<usize>(),
            pretty_format_batches(&shown)?
        ));
    }
    Ok(out)
}

/// Cuts long strings so a row fits on a terminal line.
fn shorten(batch: &RecordBatch) -> Result<RecordBatch> {
    let mut fields = Vec::new();
    let mut columns: Vec<ArrayRef> = Vec::new();
    for (field, column) in batch.schema().fields().iter().zip(batch.columns()) {
        if matches!(
            field.data_type(),
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
        ) {
            let values: StringArray = (0..column.len())
                .map(|i| {
                    crate::source::string_at(column, i).map(|s| {
                        let flat = s.replace(['\n', '\t', '\r'], " ");
                        if flat.chars().count() > CELL_CHARS {
                            format!("{}…", flat.chars().take(CELL_CHARS).collect::<String>())
                        } else {
                            flat
                        }
                    })
                })
                .collect();
            fields.push(Field::new(field.name(), DataType::Utf8, true));
            columns.push(Arc::new(values));
        } else {
            fields.push(field.as_ref().clone());
            columns.push(column.clone());
        }
    }
    Ok(RecordBatch::try_new(
        Arc::new(Schema::new(fields)),
        columns,
    )?)
}

/// Examples are cut to this many characters.
const EXAMPLE_CHARS: usize = 70;
/// Sources shown per cluster.
const TOP_SOURCES: usize = 3;

/// `quad inspect clusters JOB`: the job's clusters by size, with their tokens, dominant
/// values of the `source` column (when the shards have one) and a few example titles (or
/// first lines of text), fetched back from the shards by location, one read per shard.
pub fn inspect_clusters(
    spec: &crate::config::JobSpec,
    examples: usize,
    limit: Option<usize>,
) -> Result<String> {
    use std::collections::{BTreeMap, HashMap};
    let path = spec.state_path();
    let store = crate::state::StateStore::open_existing(&path)?;
    let mut clusters = store.clusters()?;
    let mut out = String::new();
    if clusters.is_empty() {
        out.push_str(&format!(
            "job '{}': no clusters yet ({})\n",
            spec.name,
            path.display()
        ));
        return Ok(out);
    }
    clusters.sort_by(|a, b| b.size.cmp(&a.size).then(a.cluster.cmp(&b.cluster)));
    let documents: u64 = clusters.iter().map(|c| c.size).sum();
    let tokens: u64 = clusters.iter().map(|c| c.tokens).sum();
    out.push_str(&format!(
        "job '{}': {} clusters, {documents} documents, {tokens} tokens\n",
        spec.name,
        clusters.len()
    ));
    let shown = &clusters[..limit.unwrap_or(clusters.len()).min(clusters.len())];
    let shard_paths = store.shard_paths()?;
    let members: Vec<Vec<crate::state::Member>> = shown
        .iter()
        .map(|c| store.members(c.cluster))
        .collect::<std::result::Result<_, _>>()?;
    // One read per shard: the source of every member, title and text of the examples.
    let mut rows_of: BTreeMap<u64, Vec<u64>> = BTreeMap::new();
    for m in members.iter().flatten() {
        rows_of.entry(m.epoch).or_default().push(m.row);
    }
    let text_column = spec.source.text_column.as_str();
    let mut cells: HashMap<(u64, u64), Vec<Option<String>>> = HashMap::new();
    for (epoch, rows) in &rows_of {
        let shard = shard_paths
            .get(epoch)
            .with_context(|| format!("epoch {epoch} has no shard in {}", path.display()))?;
        let wanted: std::collections::HashSet<u64> = members
            .iter()
            .flat_map(|ms| ms.iter().take(examples))
            .filter(|m| m.epoch == *epoch)
            .map(|m| m.row)
            .collect();
        let sources = crate::source::fetch_cells(shard, rows, &["source"])?;
        let example_rows: Vec<u64> = wanted.iter().copied().collect();
        // The store keeps no ids: the examples' ids come from the shard too.
        let id_column = spec.source.id_column.as_str();
        let texts =
            crate::source::fetch_cells(shard, &example_rows, &["title", text_column, id_column])?;
        for (row, source) in sources {
            let mut row_cells = source;
            row_cells.extend(
                texts
                    .get(&row)
                    .cloned()
                    .unwrap_or_else(|| vec![None, None, None]),
            );
            cells.insert((*epoch, row), row_cells);
        }
    }
    for (info, members) in shown.iter().zip(&members) {
        let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
        for m in members {
            if let Some(Some(source)) = cells.get(&(m.epoch, m.row)).map(|c| c[0].as_deref()) {
                *counts.entry(source).or_default() += 1;
            }
        }
        let mut ranked: Vec<(&str, u64)> = counts.into_iter().collect();
        ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
        let sources = ranked
            .iter()
            .take(TOP_SOURCES)
            .map(|(s, n)| format!("{s} {:.0}%", 100.0 * *n as f64 / info.size.max(1) as f64))
            .collect::<Vec<_>>()
            .join(", ");
        out.push_str(&format!(
            "cluster {}: {} documents, {} tokens{}\n",
            info.cluster,
            info.size,
            info.tokens,
            if sources.is_empty() {
                String::new()
            } else {
                format!("; sources: {sources}")
            }
        ));
        for m in members.iter().take(examples) {
            let row_cells = cells.get(&(m.epoch, m.row));
            let title = row_cells
                .and_then(|c| c[1].as_deref())
                .filter(|t| !t.trim().is_empty());
            let text = row_cells.and_then(|c| c[2].as_deref());
            let line = title
                .or_else(|| text.and_then(|t| t.lines().find(|l| !l.trim().is_empty())))
                .unwrap_or("")
                .trim();
            let cut: String = line.chars().take(EXAMPLE_CHARS).collect();
            let ellipsis = if line.chars().count() > EXAMPLE_CHARS {
                "…"
            } else {
                ""
            };
            let id = row_cells.and_then(|c| c[3].as_deref()).unwrap_or("?");
            out.push_str(&format!("    - [{id}] {cut}{ellipsis}\n"));
        }
    }
    if shown.len() < clusters.len() {
        out.push_str(&format!(
            "({} smaller clusters not shown)\n",
            clusters.len() - shown.len()
        ));
    }
    Ok(out)
}

//! The source stage: discovers shards, reads them by row group with a column projection,
//! checks them against `schemas/input.json`, and turns rows into documents. A shard that cannot
//! be read is reported as a `ShardError` (the caller quarantines it); a bad row is a `Reject`
//! naming file, row and column. `operator` is the read as the dataflow runs it: an epoch's
//! shard read on its owner worker and held there until the sink has written it.
use std::fs::File;
use std::path::{Path, PathBuf};

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::datatypes::{DataType, SchemaRef};
use arrow::record_batch::RecordBatchReader;
use parquet::arrow::arrow_reader::{
    ArrowReaderMetadata, ArrowReaderOptions, ParquetRecordBatchReaderBuilder, RowSelection,
};
use parquet::arrow::ProjectionMask;
use parquet::file::metadata::PageIndexPolicy;
use serde::{Deserialize, Serialize};

use crate::error::ShardError;
use crate::schema;
use crate::tokens::TokenCounter;

pub mod operator;

/// Where shards come from and which of their columns are read (`[source]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SourceConfig {
    /// Glob of input shards, e.g. "data/demo/shards/*.parquet". Shards are taken in path order.
    pub shards: String,
    #[serde(default = "default_id_column")]
    pub id_column: String,
    #[serde(default = "default_text_column")]
    pub text_column: String,
    /// Columns passed through to the output besides id and text; all when absent.
    #[serde(default)]
    pub columns: Option<Vec<String>>,
    /// Keep polling the glob for new shards (a long-lived job); stop with Ctrl-C / SIGTERM.
    #[serde(default)]
    pub watch: bool,
    #[serde(default = "default_poll_seconds")]
    pub poll_seconds: u64,
}

impl SourceConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.id_column == self.text_column {
            return Err("source.id_column and source.text_column must differ".into());
        }
        Ok(())
    }
}

fn default_id_column() -> String {
    "id".into()
}
fn default_text_column() -> String {
    "text".into()
}
fn default_poll_seconds() -> u64 {
    30
}

/// Rows decoded at once.
const BATCH_ROWS: usize = 8_192;

/// A document as it travels the dataflow: its location and what selection needs, never the
/// whole row (rows stay with the worker that read them and are fetched back by location).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DocMeta {
    /// Row number within the shard (0-based, over all row groups).
    pub row: u64,
    pub row_group: u32,
    pub id: String,
    pub tokens: u32,
    /// What text dedup compares (`dedup::Fingerprint`), computed where the shard is read;
    /// None when `[dedup]` is off or before the read stage adds it.
    #[serde(default)]
    pub fingerprint: Option<crate::dedup::Fingerprint>,
    /// The `dsir` strategy's log importance weight (`dsir::DsirWeights::log_weight`), computed
    /// where the shard is read; None for other strategies.
    #[serde(default)]
    pub dsir_log_weight: Option<f64>,
}

/// A row that was refused, with the reason.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Reject {
    pub row: u64,
    pub column: String,
    pub reason: String,
    /// The id of the earlier document a duplicate text repeats (`duplicate-text`,
    /// `near-duplicate`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matched: Option<String>,
}

impl Reject {
    /// The reason without what varies from row to row (quoted values, numbers, what follows
    /// a colon), e.g. `duplicate id "a-17"` -> `duplicate id`: a small set of kinds to count
    /// rejects by (metrics, `quad inspect rejects`), new reasons included as they come.
    pub fn kind(&self) -> String {
        reason_kind(&self.reason)
    }
}

/// See `Reject::kind`.
pub fn reason_kind(reason: &str) -> String {
    const MAX_CHARS: usize = 60;
    let head = reason.split(':').next().unwrap_or_default();
    let mut unquoted = String::new();
    for (i, part) in head.split('"').enumerate() {
        if i % 2 == 0 {
            unquoted.push_str(part);
        }
    }
    let kind = unquoted
        .split_whitespace()
        .filter(|word| !word.chars().any(|c| c.is_ascii_digit()))
        .collect::<Vec<_>>()
        .join(" ");
    let kind: String = kind.chars().take(MAX_CHARS).collect();
    if kind.is_empty() {
        "other".into()
    } else {
        kind
    }
}

/// One shard read into memory: its projected rows and the documents found in them.
pub struct ShardData {
    pub schema: SchemaRef,
    pub batches: Vec<RecordBatch>,
    pub docs: Vec<DocMeta>,
    pub rejects: Vec<Reject>,
    pub rows: u64,
    /// Unit vectors of `docs` (row-major, `docs.len() * dim`) read from a precomputed
    /// embedding column; None when the job reads none.
    pub vectors: Option<Vec<f32>>,
}

impl ShardData {
    /// The text of every document (in `docs` order), borrowed from the batches.
    pub fn doc_texts(&self, text_column: &str) -> Vec<&str> {
        self.doc_strings(text_column)
            .map(|values| values.into_iter().map(Option::unwrap_or_default).collect())
            .unwrap_or_default()
    }

    /// Every document's value of a string column (in `docs` order, `None` where null),
    /// borrowed from the batches; `None` when the shard has no such column.
    pub fn doc_strings(&self, column: &str) -> Option<Vec<Option<&str>>> {
        let index = root_index(&self.schema, column)?;
        let mut starts = Vec::with_capacity(self.batches.len());
        let mut start = 0u64;
        for batch in &self.batches {
            starts.push(start);
            start += batch.num_rows() as u64;
        }
        Some(
            self.docs
                .iter()
                .map(|doc| {
                    let b = starts.partition_point(|&s| s <= doc.row) - 1;
                    let column = self.batches[b].column(index);
                    string_at(column, (doc.row - starts[b]) as usize)
                })
                .collect(),
        )
    }
}

/// A precomputed embedding column the job reads instead of running the encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbeddingColumn {
    pub name: String,
    /// The width every vector must have.
    pub dim: usize,
}

fn is_float(data_type: &DataType) -> bool {
    matches!(data_type, DataType::Float32 | DataType::Float64)
}

/// A column type that can hold `dim`-wide float vectors: a fixed-size list of exactly `dim`
/// (checked here, once for the shard), or a list (each row's length is checked when read).
fn check_embedding_type(
    path: &Path,
    schema: &SchemaRef,
    embedding: &EmbeddingColumn,
) -> Result<usize, ShardError> {
    let index = root_index(schema, &embedding.name).ok_or_else(|| ShardError::MissingColumn {
        path: path.to_path_buf(),
        column: embedding.name.clone(),
        role: "embedding",
        present: column_names(schema),
    })?;
    let data_type = schema.field(index).data_type();
    let ok = match data_type {
        DataType::FixedSizeList(child, n) => {
            is_float(child.data_type()) && *n as usize == embedding.dim
        }
        DataType::List(child) | DataType::LargeList(child) => is_float(child.data_type()),
        _ => false,
    };
    if !ok {
        return Err(ShardError::WrongType {
            path: path.to_path_buf(),
            column: embedding.name.clone(),
            found: data_type.to_string(),
            expected: format!(
                "fixed_size_list<float32|float64, {}>, list<float32|float64>",
                embedding.dim
            ),
        });
    }
    Ok(index)
}

/// Appends the unit vector of `row` to `out`, or says why the row has none.
fn push_unit_vector(
    array: &ArrayRef,
    row: usize,
    dim: usize,
    out: &mut Vec<f32>,
) -> Result<(), String> {
    use arrow::datatypes::{Float32Type, Float64Type};
    if array.is_null(row) {
        return Err("embedding is null".into());
    }
    // The common case, a fixed-size list of float32: the row's values are a slice of the
    // child array, read in place (no per-row array).
    if let DataType::FixedSizeList(child, n) = array.data_type() {
        if child.data_type() == &DataType::Float32 && *n as usize == dim {
            let list = array.as_fixed_size_list();
            let values = list.values().as_primitive::<Float32Type>();
            let start = list.value_offset_at(row);
            if values
                .nulls()
                .is_some_and(|nulls| (start..start + dim).any(|i| nulls.is_null(i)))
            {
                return Err("embedding contains a null value".into());
            }
            out.extend_from_slice(&values.values()[start..start + dim]);
            return normalise_last(out, dim);
        }
    }
    let values: ArrayRef = match array.data_type() {
        DataType::FixedSizeList(..) => array.as_fixed_size_list().value(row),
        DataType::List(_) => array.as_list::<i32>().value(row),
        DataType::LargeList(_) => array.as_list::<i64>().value(row),
        other => return Err(format!("embedding has type {other}")),
    };
    if values.len() != dim {
        return Err(format!(
            "embedding has {} values, expected {dim}",
            values.len()
        ));
    }
    if values.null_count() > 0 {
        return Err("embedding contains a null value".into());
    }
    let start = out.len();
    match values.data_type() {
        DataType::Float32 => out.extend_from_slice(values.as_primitive::<Float32Type>().values()),
        DataType::Float64 => out.extend(
            values
                .as_primitive::<Float64Type>()
                .values()
                .iter()
                .map(|&v| v as f32),
        ),
        other => return Err(format!("embedding values have type {other}")),
    }
    normalise_last(out, out.len() - start)
}

/// Scales the last `dim` values of `out` to unit length, or removes them and says why not.
fn normalise_last(out: &mut Vec<f32>, dim: usize) -> Result<(), String> {
    let start = out.len() - dim;
    let vector = &mut out[start..];
    let norm = vector
        .iter()
        .map(|&v| f64::from(v) * f64::from(v))
        .sum::<f64>()
        .sqrt();
    if !norm.is_finite() || norm == 0.0 {
        out.truncate(start);
        return Err(if norm == 0.0 {
            "embedding is the zero vector".into()
        } else {
            "embedding has a non-finite value".into()
        });
    }
    for v in vector.iter_mut() {
        *v = (f64::from(*v) / norm) as f32;
    }
    Ok(())
}

fn column_names(schema: &SchemaRef) -> String {
    schema
        .fields()
        .iter()
        .map(|f| f.name().as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// The shards matching a glob, in path order (the order that fixes epochs).
pub fn discover(pattern: &str) -> anyhow::Result<Vec<PathBuf>> {
    let mut paths = Vec::new();
    for entry in glob::glob(pattern)
        .map_err(|e| anyhow::anyhow!("source.shards: bad glob {pattern:?}: {e}"))?
    {
        let path = entry.map_err(|e| anyhow::anyhow!("source.shards: {e}"))?;
        if path.is_file() {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

fn root_index(schema: &SchemaRef, name: &str) -> Option<usize> {
    schema.fields().iter().position(|f| f.name() == name)
}

fn check_role(
    path: &Path,
    schema: &SchemaRef,
    column: &str,
    role: &'static str,
) -> Result<usize, ShardError> {
    let index = root_index(schema, column).ok_or_else(|| ShardError::MissingColumn {
        path: path.to_path_buf(),
        column: column.to_string(),
        role,
        present: column_names(schema),
    })?;
    let data_type = schema.field(index).data_type();
    let allowed = schema::input_types(role);
    if !schema::type_name(data_type).is_some_and(|name| allowed.iter().any(|a| a == name)) {
        return Err(ShardError::WrongType {
            path: path.to_path_buf(),
            column: column.to_string(),
            found: data_type.to_string(),
            expected: allowed.join(", "),
        });
    }
    Ok(index)
}

/// Opens a shard and works out the projection: id, text and the passed-through columns.
fn open(
    path: &Path,
    config: &SourceConfig,
    embedding: Option<&EmbeddingColumn>,
    offset_index: PageIndexPolicy,
) -> Result<(File, ArrowReaderMetadata, Vec<usize>), ShardError> {
    let file = File::open(path).map_err(|source| ShardError::Io {
        path: path.to_path_buf(),
        cause: source,
    })?;
    let options = ArrowReaderOptions::new().with_offset_index_policy(offset_index);
    let metadata =
        ArrowReaderMetadata::load(&file, options).map_err(|e| ShardError::NotParquet {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    let schema = metadata.schema().clone();
    let id = check_role(path, &schema, &config.id_column, "id")?;
    let text = check_role(path, &schema, &config.text_column, "text")?;
    let mut indices: Vec<usize> = match &config.columns {
        None => (0..schema.fields().len()).collect(),
        Some(columns) => {
            let mut indices = vec![id, text];
            for column in columns {
                let index =
                    root_index(&schema, column).ok_or_else(|| ShardError::MissingColumn {
                        path: path.to_path_buf(),
                        column: column.clone(),
                        role: "passthrough",
                        present: column_names(&schema),
                    })?;
                indices.push(index);
            }
            indices
        }
    };
    if let Some(embedding) = embedding {
        indices.push(check_embedding_type(path, &schema, embedding)?);
    }
    indices.sort_unstable();
    indices.dedup();
    let prefix = &schema::input().reserved_prefix;
    if let Some(&reserved) = indices
        .iter()
        .find(|&&i| schema.field(i).name().starts_with(prefix.as_str()))
    {
        return Err(ShardError::ReservedColumn {
            path: path.to_path_buf(),
            column: schema.field(reserved).name().clone(),
        });
    }
    Ok((file, metadata, indices))
}

/// The text of a row, for any string type the input schema allows.
pub fn string_at(array: &ArrayRef, row: usize) -> Option<&str> {
    if array.is_null(row) {
        return None;
    }
    match array.data_type() {
        DataType::Utf8 => Some(array.as_string::<i32>().value(row)),
        DataType::LargeUtf8 => Some(array.as_string::<i64>().value(row)),
        DataType::Utf8View => Some(array.as_string_view().value(row)),
        _ => None,
    }
}

/// The id of a row as text, for any id type the input schema allows.
pub fn id_at(array: &ArrayRef, row: usize) -> Option<String> {
    use arrow::datatypes::{Int32Type, Int64Type, UInt32Type, UInt64Type};
    if array.is_null(row) {
        return None;
    }
    match array.data_type() {
        DataType::Int32 => Some(array.as_primitive::<Int32Type>().value(row).to_string()),
        DataType::Int64 => Some(array.as_primitive::<Int64Type>().value(row).to_string()),
        DataType::UInt32 => Some(array.as_primitive::<UInt32Type>().value(row).to_string()),
        DataType::UInt64 => Some(array.as_primitive::<UInt64Type>().value(row).to_string()),
        _ => string_at(array, row).map(str::to_string),
    }
}

/// Reads a whole shard (all row groups) and validates every row. The shard is read completely
/// before anything is emitted, so a corrupt row group late in the file never leaves half a
/// shard in the output. With `embedding`, that column is read too (it then passes through to
/// the output like the other projected columns) and a row without a usable vector is rejected.
pub fn read_shard(
    path: &Path,
    config: &SourceConfig,
    counter: &TokenCounter,
    embedding: Option<&EmbeddingColumn>,
) -> Result<ShardData, ShardError> {
    let (file, metadata, indices) = open(path, config, embedding, PageIndexPolicy::Skip)?;
    let parquet_meta = metadata.metadata().clone();
    let mask = ProjectionMask::roots(
        parquet_meta.file_metadata().schema_descr(),
        indices.iter().copied(),
    );
    // One reader over all row groups; a row's row group follows from the row-group sizes.
    let group_ends: Vec<u64> = parquet_meta
        .row_groups()
        .iter()
        .scan(0u64, |end, rg| {
            *end += rg.num_rows().max(0) as u64;
            Some(*end)
        })
        .collect();
    let group_of = |row: u64| group_ends.partition_point(|&end| end <= row);
    let handle = file.try_clone().map_err(|source| ShardError::Io {
        path: path.to_path_buf(),
        cause: source,
    })?;
    let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(handle, metadata.clone())
        .with_projection(mask)
        .with_batch_size(BATCH_ROWS)
        .build()
        .map_err(|e| ShardError::NotParquet {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    let schema = reader.schema();
    let mut batches = Vec::new();
    let mut read: u64 = 0;
    for batch in reader {
        let batch = batch.map_err(|e| ShardError::Corrupt {
            path: path.to_path_buf(),
            row_group: group_of(read),
            reason: e.to_string(),
        })?;
        read += batch.num_rows() as u64;
        batches.push(batch);
    }
    if read != group_ends.last().copied().unwrap_or(0) {
        return Err(ShardError::Corrupt {
            path: path.to_path_buf(),
            row_group: group_of(read),
            reason: format!(
                "read {read} rows, the footer promises {}",
                group_ends.last().copied().unwrap_or(0)
            ),
        });
    }
    let id_index = root_index(&schema, &config.id_column).expect("projected id column");
    let text_index = root_index(&schema, &config.text_column).expect("projected text column");

    let embedding_index = embedding.and_then(|e| root_index(&schema, &e.name));
    let mut vectors = embedding.map(|_| Vec::new());
    let mut docs = Vec::new();
    let mut rejects = Vec::new();
    let mut row: u64 = 0;
    for batch in &batches {
        let ids = batch.column(id_index);
        let texts = batch.column(text_index);
        let embedded = embedding_index.map(|i| batch.column(i));
        for i in 0..batch.num_rows() {
            let reject = |column: &str, reason: &str| Reject {
                row,
                column: column.to_string(),
                reason: reason.to_string(),
                matched: None,
            };
            match (id_at(ids, i), string_at(texts, i)) {
                (None, _) => rejects.push(reject(&config.id_column, "id is null")),
                (_, None) => rejects.push(reject(&config.text_column, "text is null")),
                (Some(_), Some(text)) if text.trim().is_empty() => {
                    rejects.push(reject(&config.text_column, "text is empty"))
                }
                (Some(id), Some(text)) => {
                    if let (Some(array), Some(out), Some(column)) =
                        (embedded, vectors.as_mut(), embedding)
                    {
                        if let Err(reason) = push_unit_vector(array, i, column.dim, out) {
                            rejects.push(reject(&column.name, &reason));
                            row += 1;
                            continue;
                        }
                    }
                    docs.push(DocMeta {
                        row,
                        row_group: group_of(row) as u32,
                        id,
                        tokens: counter.count(text),
                        fingerprint: None,
                        dsir_log_weight: None,
                    })
                }
            }
            row += 1;
        }
    }
    Ok(ShardData {
        schema,
        batches,
        docs,
        rejects,
        rows: row,
        vectors,
    })
}

/// Cells of some rows, fetched back from a shard by location: only the row groups that hold
/// the rows are read, each once, and only the named columns (a column the shard lacks gives
/// None cells). Rows are shard rows (0-based over all row groups), as in `DocMeta::row`.
pub fn fetch_cells(
    path: &Path,
    rows: &[u64],
    columns: &[&str],
) -> Result<std::collections::BTreeMap<u64, Vec<Option<String>>>, ShardError> {
    use std::collections::{BTreeMap, BTreeSet};
    let not_parquet = |e: &dyn std::fmt::Display| ShardError::NotParquet {
        path: path.to_path_buf(),
        reason: e.to_string(),
    };
    let file = File::open(path).map_err(|source| ShardError::Io {
        path: path.to_path_buf(),
        cause: source,
    })?;
    let builder = ParquetRecordBatchReaderBuilder::try_new(file).map_err(|e| not_parquet(&e))?;
    let schema = builder.schema().clone();
    let starts: Vec<u64> = builder
        .metadata()
        .row_groups()
        .iter()
        .scan(0u64, |start, rg| {
            let here = *start;
            *start += rg.num_rows().max(0) as u64;
            Some(here)
        })
        .collect();
    let group_of = |row: u64| starts.partition_point(|&s| s <= row).saturating_sub(1);
    let wanted: BTreeSet<u64> = rows.iter().copied().collect();
    let groups: BTreeSet<usize> = wanted.iter().map(|&r| group_of(r)).collect();
    let present: Vec<Option<usize>> = columns.iter().map(|c| root_index(&schema, c)).collect();
    let mut roots: Vec<usize> = present.iter().flatten().copied().collect();
    roots.sort_unstable();
    roots.dedup();
    let mask = ProjectionMask::roots(builder.parquet_schema(), roots.iter().copied());
    let reader = builder
        .with_row_groups(groups.iter().copied().collect())
        .with_projection(mask)
        .with_batch_size(BATCH_ROWS)
        .build()
        .map_err(|e| not_parquet(&e))?;
    let projected = reader.schema();
    let mut out = BTreeMap::new();
    // Batches come in row-group order and never span two row groups' boundaries unseen:
    // track the shard row of each batch's first row.
    let mut group_iter = groups.iter().copied();
    let mut current = group_iter.next();
    let mut row = current.map(|g| starts[g]).unwrap_or(0);
    for batch in reader {
        let batch = batch.map_err(|e| ShardError::Corrupt {
            path: path.to_path_buf(),
            row_group: group_of(row),
            reason: e.to_string(),
        })?;
        let arrays: Vec<Option<&ArrayRef>> = columns
            .iter()
            .map(|c| root_index(&projected, c).map(|i| batch.column(i)))
            .collect();
        for i in 0..batch.num_rows() {
            // Move to the next selected row group when this one is exhausted.
            while let Some(g) = current {
                let end = starts.get(g + 1).copied().unwrap_or(u64::MAX);
                if row < end {
                    break;
                }
                current = group_iter.next();
                row = current.map(|g| starts[g]).unwrap_or(row);
            }
            if wanted.contains(&row) {
                let cells = arrays
                    .iter()
                    .map(|a| {
                        a.and_then(|a| {
                            if a.is_null(i) {
                                None
                            } else {
                                string_at(a, i).map(str::to_string).or_else(|| {
                                    arrow::util::display::array_value_to_string(a, i).ok()
                                })
                            }
                        })
                    })
                    .collect();
                out.insert(row, cells);
            }
            row += 1;
        }
    }
    Ok(out)
}

/// Fetches rows of a shard by row number (0-based over all row groups), with the job's column
/// projection, reading only the row groups that hold them and only the selected rows of those
/// (a Parquet row selection). Rows come back in ascending row order, each once; the scoring and
/// output stages use this to get documents back by their stored location.
pub fn fetch_rows(
    path: &Path,
    config: &SourceConfig,
    rows: &[u64],
) -> Result<RecordBatch, ShardError> {
    // The offset index lets the reader decode only the pages that hold wanted rows, not their
    // row groups whole: a fetch costs a page a document, whatever the shard's row groups.
    let (file, metadata, indices) = open(path, config, None, PageIndexPolicy::Optional)?;
    let parquet_meta = metadata.metadata().clone();
    let sizes: Vec<u64> = parquet_meta
        .row_groups()
        .iter()
        .map(|rg| rg.num_rows().max(0) as u64)
        .collect();
    let total: u64 = sizes.iter().sum();
    let mut wanted: Vec<u64> = rows.to_vec();
    wanted.sort_unstable();
    wanted.dedup();
    if let Some(&last) = wanted.last() {
        if last >= total {
            return Err(ShardError::Corrupt {
                path: path.to_path_buf(),
                row_group: sizes.len(),
                reason: format!("row {last} was asked for, the shard has {total} rows"),
            });
        }
    }
    // Row groups holding wanted rows, and each wanted row's position within the concatenation of
    // just those groups (what a row selection counts over).
    let mut groups: Vec<usize> = Vec::new();
    let mut ranges: Vec<std::ops::Range<usize>> = Vec::with_capacity(wanted.len());
    let (mut group, mut group_start, mut selected_before) = (0usize, 0u64, 0u64);
    for &row in &wanted {
        while row >= group_start + sizes[group] {
            if groups.last() == Some(&group) {
                selected_before += sizes[group];
            }
            group_start += sizes[group];
            group += 1;
        }
        if groups.last() != Some(&group) {
            groups.push(group);
        }
        let at = (selected_before + row - group_start) as usize;
        ranges.push(at..at + 1);
    }
    let selected_rows: u64 = groups.iter().map(|&g| sizes[g]).sum();
    let selection =
        RowSelection::from_consecutive_ranges(ranges.into_iter(), selected_rows as usize);
    let mask = ProjectionMask::roots(
        parquet_meta.file_metadata().schema_descr(),
        indices.iter().copied(),
    );
    let reader = ParquetRecordBatchReaderBuilder::new_with_metadata(file, metadata)
        .with_projection(mask)
        .with_row_groups(groups.clone())
        .with_row_selection(selection)
        .with_batch_size(BATCH_ROWS)
        .build()
        .map_err(|e| ShardError::NotParquet {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    let schema = reader.schema();
    let mut batches = Vec::new();
    for batch in reader {
        batches.push(batch.map_err(|e| ShardError::Corrupt {
            path: path.to_path_buf(),
            row_group: groups.first().copied().unwrap_or(0),
            reason: e.to_string(),
        })?);
    }
    let batch =
        arrow::compute::concat_batches(&schema, &batches).map_err(|e| ShardError::Corrupt {
            path: path.to_path_buf(),
            row_group: groups.first().copied().unwrap_or(0),
            reason: e.to_string(),
        })?;
    if batch.num_rows() != wanted.len() {
        return Err(ShardError::Corrupt {
            path: path.to_path_buf(),
            row_group: groups.first().copied().unwrap_or(0),
            reason: format!(
                "asked for {} rows, the reader returned {}",
                wanted.len(),
                batch.num_rows()
            ),
        });
    }
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::{Int64Array, StringArray};
    use arrow::datatypes::{Field, Schema};
    use parquet::arrow::ArrowWriter;
    use parquet::file::properties::WriterProperties;
    use std::sync::Arc;

    #[test]
    fn reject_kinds_drop_what_varies_from_row_to_row() {
        assert_eq!(reason_kind(r#"duplicate id "a-17""#), "duplicate id");
        assert_eq!(reason_kind("text is empty"), "text is empty");
        assert_eq!(
            reason_kind("embedding has 3 values, expected 8"),
            "embedding has values, expected"
        );
        assert_eq!(reason_kind("Parser error: bad byte at 12"), "Parser error");
        assert_eq!(reason_kind("42"), "other");
    }

    /// A shard of `n` rows in row groups of 7: id "d{i}", text "text {i}", value i*10.
    fn shard(dir: &Path, n: usize) -> PathBuf {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("text", DataType::Utf8, false),
            Field::new("value", DataType::Int64, false),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from_iter_values(
                    (0..n).map(|i| format!("d{i}")),
                )),
                Arc::new(StringArray::from_iter_values(
                    (0..n).map(|i| format!("text {i}")),
                )),
                Arc::new(Int64Array::from_iter_values((0..n as i64).map(|i| i * 10))),
            ],
        )
        .unwrap();
        let path = dir.join("shard.parquet");
        let props = WriterProperties::builder()
            .set_max_row_group_row_count(Some(7))
            .build();
        let mut writer =
            ArrowWriter::try_new(File::create(&path).unwrap(), schema, Some(props)).unwrap();
        writer.write(&batch).unwrap();
        writer.close().unwrap();
        path
    }

    fn config() -> SourceConfig {
        toml::from_str("shards = \"x\"").unwrap()
    }

    #[test]
    fn fetch_rows_returns_exactly_the_asked_rows_across_row_groups() {
        let dir = tempfile::tempdir().unwrap();
        let path = shard(dir.path(), 40);
        // Unsorted, with a duplicate, spanning first, middle and last row groups and skipping some.
        let rows = [39u64, 0, 6, 7, 22, 22, 13, 35];
        let batch = fetch_rows(&path, &config(), &rows).unwrap();
        let ids: Vec<String> = (0..batch.num_rows())
            .map(|i| id_at(batch.column(0), i).unwrap())
            .collect();
        assert_eq!(ids, ["d0", "d6", "d7", "d13", "d22", "d35", "d39"]);
        let values = batch
            .column(2)
            .as_primitive::<arrow::datatypes::Int64Type>();
        assert_eq!(values.value(4), 220);
        assert!(fetch_rows(&path, &config(), &[]).unwrap().num_rows() == 0);
    }

    #[test]
    fn fetch_rows_past_the_end_names_the_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = shard(dir.path(), 10);
        let err = fetch_rows(&path, &config(), &[3, 10])
            .unwrap_err()
            .to_string();
        assert!(err.contains("row 10") && err.contains("10 rows"), "{err}");
    }
}

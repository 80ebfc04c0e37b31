//! `quad inspect FILE.parquet`: schema, row count, row groups and a few rows.
use std::fs::File;
use std::path::Path;

use anyhow::{Context, Result};
use arrow::array::{ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::util::pretty::pretty_format_batches;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use std::sync::Arc;

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

//! The sink stage: writes an epoch's selected rows as one zstd Parquet file. A file is written
//! under a temporary name, fsynced, renamed and its folder fsynced; only then is it recorded in
//! the state store (by the caller, with the epoch). Files the store does not know are leftovers
//! of an epoch that never committed, and `remove_uncommitted` deletes them before a run.
//!
//! `epoch_sink` is the ingest sink in the dataflow: each epoch's file and its commit, on the
//! worker that read the shard. `round_sink` is the Quad loop's: the rounds' selected rows of
//! the clusters a worker owns, in files of at least `sink.min_file_rows` rows.
use std::collections::HashSet;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, Result};
use arrow::array::{new_null_array, ArrayRef, Int64Array, RecordBatch, UInt32Array};
use arrow::compute::take_record_batch;
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use serde::{Deserialize, Serialize};

use crate::schema;
use crate::source::ShardData;

pub mod epoch_sink;
pub mod round_sink;

/// The column whose values the report's "selected tokens by source" plot groups by.
pub const SOURCE_COLUMN: &str = "source";

/// Where and how the output is written (`[sink]`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SinkConfig {
    /// Output folder; one Parquet file per committed epoch.
    pub path: PathBuf,
    #[serde(default = "default_row_group_rows")]
    pub row_group_rows: usize,
    #[serde(default = "default_zstd_level")]
    pub zstd_level: i32,
    /// The Quad loop's output: selected rows accumulate over rounds into files of at least
    /// this many rows (the last file of a run may hold fewer); a file is committed when closed.
    #[serde(default = "default_min_file_rows")]
    pub min_file_rows: usize,
}

impl SinkConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.row_group_rows == 0 {
            return Err("sink.row_group_rows must be positive".into());
        }
        if !(1..=22).contains(&self.zstd_level) {
            return Err(format!(
                "sink.zstd_level must be in 1..=22, got {}",
                self.zstd_level
            ));
        }
        Ok(())
    }
}

fn default_min_file_rows() -> usize {
    100_000
}
fn default_row_group_rows() -> usize {
    65_536
}
fn default_zstd_level() -> i32 {
    3
}

pub fn epoch_file_name(epoch: u64) -> String {
    format!("part-{epoch:06}.parquet")
}

fn temp_name(name: &str) -> String {
    format!(".{name}.tmp")
}

/// The selected rows of a shard (rows ascending) with the quad_* columns appended.
pub fn output_batches(data: &ShardData, rows: &[u64], round: u64) -> Result<Vec<RecordBatch>> {
    let out_schema = schema::output_schema(&data.schema);
    let mut out = Vec::new();
    let mut offset = 0u64;
    let mut next = rows.iter().peekable();
    for batch in &data.batches {
        let end = offset + batch.num_rows() as u64;
        let mut local = Vec::new();
        while let Some(&&row) = next.peek() {
            if row >= end {
                break;
            }
            local.push((row - offset) as u32);
            next.next();
        }
        offset = end;
        if local.is_empty() {
            continue;
        }
        let taken = take_record_batch(batch, &UInt32Array::from(local))?;
        let n = taken.num_rows();
        let mut columns: Vec<ArrayRef> = taken.columns().to_vec();
        for field in schema::output_fields() {
            columns.push(match field.name().as_str() {
                "quad_round" => Arc::new(Int64Array::from(vec![round as i64; n])),
                _ => new_null_array(field.data_type(), n),
            });
        }
        out.push(RecordBatch::try_new(out_schema.clone(), columns)?);
    }
    Ok(out)
}

/// Writes batches as `<dir>/<name>` durably; nothing is visible under the final name until
/// the whole file is on disk.
pub fn write_durably(
    dir: &Path,
    name: &str,
    schema: arrow::datatypes::SchemaRef,
    batches: &[RecordBatch],
    config: &SinkConfig,
) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let temp = dir.join(temp_name(name));
    let file = File::create(&temp).with_context(|| format!("creating {}", temp.display()))?;
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(config.zstd_level)?))
        .set_max_row_group_row_count(Some(config.row_group_rows))
        .build();
    let mut writer = ArrowWriter::try_new(file, schema, Some(props))?;
    for batch in batches {
        writer.write(batch)?;
    }
    let file = writer
        .into_inner()
        .with_context(|| format!("finishing {}", temp.display()))?;
    file.sync_all()
        .with_context(|| format!("fsync {}", temp.display()))?;
    drop(file);
    std::fs::rename(&temp, dir.join(name))
        .with_context(|| format!("renaming {} to {name}", temp.display()))?;
    File::open(dir)?
        .sync_all()
        .with_context(|| format!("fsync {}", dir.display()))?;
    Ok(())
}

/// Writes the epoch's output file; None when the epoch selected nothing.
pub fn write_epoch(
    dir: &Path,
    epoch: u64,
    data: &ShardData,
    rows: &[u64],
    config: &SinkConfig,
) -> Result<Option<String>> {
    if rows.is_empty() {
        return Ok(None);
    }
    let batches = output_batches(data, rows, epoch)?;
    let name = epoch_file_name(epoch);
    write_durably(
        dir,
        &name,
        schema::output_schema(&data.schema),
        &batches,
        config,
    )
    .with_context(|| format!("writing {}", dir.join(&name).display()))?;
    Ok(Some(name))
}

/// Deletes output files of epochs that never committed (and temporary files). Returns them.
pub fn remove_uncommitted(dir: &Path, committed: &HashSet<String>) -> Result<Vec<String>> {
    let mut removed = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Ok(removed);
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().to_string();
        let ours = (name.starts_with("part-") && name.ends_with(".parquet"))
            || (name.starts_with(".part-") && name.ends_with(".tmp"));
        if ours && !committed.contains(&name) {
            std::fs::remove_file(entry.path())
                .with_context(|| format!("removing {}", entry.path().display()))?;
            removed.push(name);
        }
    }
    removed.sort();
    Ok(removed)
}

/// Test hooks' end: the process dies at once, as a SIGKILL leaves it (no destructor runs,
/// nothing is flushed), at an exact point that a test could not hit with a kill from outside.
pub(crate) fn die_as_if_killed() -> ! {
    // SAFETY: kill(2) on this process with a valid signal number; it does not return.
    unsafe {
        libc::kill(libc::getpid(), libc::SIGKILL);
    }
    std::process::abort()
}

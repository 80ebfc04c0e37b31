//! Where text dedup's time goes, per document, on the demo shards' texts: normalising,
//! hashing the normalised text (exact), the MinHash signature and its band keys and sketch
//! (near). One thread, no store; `scripts/bench-dedup` measures the whole job.
//!
//!     cargo bench --bench dedup
//!
//! Prints a Markdown table: documents/s and microseconds a document for each step.
use std::path::Path;
use std::time::Instant;

use anyhow::Result;
use quad::config::JobSpec;
use quad::dedup::{normalise, sketch, text_hash, DedupConfig, MinHasher, Scratch};
use quad::source::{discover, read_shard};
use quad::tokens::TokenCounter;

const REPEATS: usize = 5;

/// The demo job's texts, read as the job reads them.
fn demo_texts() -> Result<Vec<String>> {
    let spec = JobSpec::load(Path::new("dataflows/demo.toml"))?;
    let counter = TokenCounter::from_spec("whitespace")?;
    let mut texts = Vec::new();
    for shard in discover(&spec.source.shards)? {
        let data = read_shard(&shard, &spec.source, &counter, None)?;
        texts.extend(
            data.doc_texts(&spec.source.text_column)
                .into_iter()
                .map(String::from),
        );
    }
    Ok(texts)
}

/// Best wall time over `REPEATS` of `step` over every text, in seconds.
fn best_of<T>(texts: &[String], mut step: impl FnMut(&str) -> T) -> f64 {
    (0..REPEATS)
        .map(|_| {
            let start = Instant::now();
            for text in texts {
                std::hint::black_box(step(text));
            }
            start.elapsed().as_secs_f64()
        })
        .fold(f64::INFINITY, f64::min)
}

fn main() -> Result<()> {
    let texts = demo_texts()?;
    let config = DedupConfig::default();
    let hasher = MinHasher::new(&config);
    let normalised: Vec<String> = texts.iter().map(|t| normalise(t)).collect();
    let signatures: Vec<Vec<u32>> = normalised.iter().map(|t| hasher.signature(t)).collect();
    let words: usize = normalised.iter().map(|t| t.split(' ').count()).sum();
    // Normalisation takes a fast path for ASCII texts: its cost depends on their share.
    let (ascii, other): (Vec<String>, Vec<String>) =
        texts.iter().cloned().partition(|t| t.is_ascii());
    let bytes = |ts: &[String]| ts.iter().map(String::len).sum::<usize>();
    let per_doc = |ts: &[String], seconds: f64| seconds / ts.len().max(1) as f64 * 1e6;
    let steps: Vec<(&str, f64)> = vec![
        ("normalise", best_of(&texts, normalise)),
        ("text hash (exact)", best_of(&normalised, text_hash)),
        (
            "MinHash signature",
            best_of(&normalised, |t| hasher.signature(t)),
        ),
        ("band keys + sketch", {
            let start = Instant::now();
            for _ in 0..REPEATS {
                for signature in &signatures {
                    std::hint::black_box((hasher.band_keys(signature), sketch(signature)));
                }
            }
            start.elapsed().as_secs_f64() / REPEATS as f64
        }),
        ("whole fingerprint (exact + near)", {
            let mut scratch = Scratch::default();
            best_of(&texts, |t| hasher.fingerprint(&config, t, &mut scratch))
        }),
    ];
    println!(
        "{} documents, {:.0} words a document, {} hash functions ({} bands x {} rows), best of {REPEATS}\n",
        texts.len(),
        words as f64 / texts.len() as f64,
        config.hashes(),
        config.bands,
        config.rows
    );
    println!(
        "ASCII texts: {} of {} ({:.0}% of the bytes); normalise takes {:.2} us an ASCII text, \
         {:.2} us another\n",
        ascii.len(),
        texts.len(),
        100.0 * bytes(&ascii) as f64 / bytes(&texts) as f64,
        per_doc(&ascii, best_of(&ascii, normalise)),
        per_doc(&other, best_of(&other, normalise)),
    );
    println!("| step | documents/s | us a document |\n|---|---:|---:|");
    for (step, seconds) in steps {
        let n = texts.len() as f64;
        println!("| {step} | {:.0} | {:.2} |", n / seconds, seconds / n * 1e6);
    }
    Ok(())
}

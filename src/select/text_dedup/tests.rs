//! Planted duplicates: exact copies under new ids, near copies (a few words changed, a line
//! added) and distinct documents sharing long boilerplate, decided through the admit stage
//! with the epochs in flight or committed (the same decisions either way).
use std::collections::HashSet;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::super::{Admitter, DuplicateKind, SelectConfig, Verdicts};
use crate::bandit::Strategy;
use crate::dedup::{normalise, DedupConfig, MinHasher, Scratch};
use crate::source::DocMeta;
use crate::state::{EpochCommit, StateStore};

const VOCABULARY: usize = 5_000;

fn random_words(rng: &mut ChaCha8Rng, n: usize) -> Vec<String> {
    (0..n)
        .map(|_| format!("w{}", rng.random_range(0..VOCABULARY)))
        .collect()
}

/// The Jaccard similarity of two texts' word 5-gram sets (the truth the estimate is tested on).
fn jaccard(a: &str, b: &str) -> f64 {
    let shingles = |t: &str| -> HashSet<Vec<String>> {
        let words: Vec<String> = normalise(t).split(' ').map(str::to_string).collect();
        words.windows(5).map(<[String]>::to_vec).collect()
    };
    let (a, b) = (shingles(a), shingles(b));
    a.intersection(&b).count() as f64 / a.union(&b).count() as f64
}

fn docs(texts: &[(String, String)], config: &DedupConfig) -> Vec<DocMeta> {
    let hasher = MinHasher::new(config);
    texts
        .iter()
        .enumerate()
        .map(|(row, (id, text))| DocMeta {
            row: row as u64,
            row_group: 0,
            id: id.clone(),
            tokens: 1,
            fingerprint: Some(hasher.fingerprint(config, text, &mut Scratch::default())),
            dsir_log_weight: None,
        })
        .collect()
}

/// Admits each epoch's texts in order; `commit` commits each epoch before the next is
/// decided (else all stay in flight). Returns each epoch's verdicts.
fn admit_all(
    epochs: &[Vec<(String, String)>],
    config: &DedupConfig,
    commit: bool,
) -> Vec<Verdicts> {
    let dir = tempfile::tempdir().unwrap();
    let store = std::sync::Arc::new(
        StateStore::open(&dir.path().join("s.redb"), &serde_json::json!({})).unwrap(),
    );
    let select = SelectConfig {
        strategy: Strategy::Random,
        ratio: 1.0,
        max_tokens: None,
        ..Default::default()
    };
    let mut admit = Admitter::new(3, select, config.clone(), store.clone(), 1 << 16).unwrap();
    let mut out = Vec::new();
    for (epoch, texts) in epochs.iter().enumerate() {
        let mut metas = docs(texts, config);
        let verdicts = admit.admit(epoch as u64, &mut metas).unwrap();
        if commit {
            let rejected: HashSet<u64> = verdicts.duplicates.iter().map(|d| d.row).collect();
            store
                .commit_epoch(&EpochCommit {
                    epoch: epoch as u64,
                    record: Default::default(),
                    accepted: metas
                        .iter()
                        .filter(|d| !rejected.contains(&d.row))
                        .map(|d| (d.id.clone(), d.row))
                        .collect(),
                    rejects: vec![],
                    clusters: None,
                    fit_sample: vec![],
                    fit_sample_size: 0,
                    dedup: verdicts.dedup.clone(),
                })
                .unwrap();
        }
        out.push(verdicts);
    }
    out
}

/// (row, kind, first epoch, first row) of every duplicate of every epoch.
fn decisions(verdicts: &[Verdicts]) -> Vec<(u64, u64, DuplicateKind, u64, Option<u64>)> {
    verdicts
        .iter()
        .flat_map(|v| {
            v.duplicates
                .iter()
                .map(|d| (v.epoch, d.row, d.kind, d.first_epoch, d.first_row))
        })
        .collect()
}

/// Originals (epoch 0) and their planted copies (epoch 1), with the copies' true similarity.
struct Planted {
    epochs: Vec<Vec<(String, String)>>,
    /// For each copy (row in epoch 1): the true Jaccard similarity to its original.
    truth: Vec<f64>,
}

fn originals(rng: &mut ChaCha8Rng, n: usize) -> Vec<(String, String)> {
    (0..n)
        .map(|i| {
            let len = rng.random_range(120..400);
            (format!("orig-{i}"), random_words(rng, len).join(" "))
        })
        .collect()
}

/// Near copies: a few words replaced, or a line added.
fn near_copies(rng: &mut ChaCha8Rng, originals: &[(String, String)]) -> Planted {
    let mut copies = Vec::new();
    let mut truth = Vec::new();
    for (i, (_, text)) in originals.iter().enumerate() {
        let mut words: Vec<String> = text.split(' ').map(str::to_string).collect();
        let copy = if i % 2 == 0 {
            for _ in 0..rng.random_range(1..4) {
                let at = rng.random_range(0..words.len());
                words[at] = format!("changed{}", rng.random_range(0..1_000_000));
            }
            words.join(" ")
        } else {
            let line = random_words(rng, 8).join(" ");
            format!("{}\n{line}", words.join(" "))
        };
        truth.push(jaccard(text, &copy));
        copies.push((format!("near-{i}"), copy));
    }
    Planted {
        epochs: vec![originals.to_vec(), copies],
        truth,
    }
}

#[test]
fn exact_copies_under_new_ids_are_all_caught_with_the_first_id() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let firsts = originals(&mut rng, 300);
    // Copies differ in case, spacing and compatibility forms only.
    let copies: Vec<(String, String)> = firsts
        .iter()
        .enumerate()
        .map(|(i, (_, t))| {
            (
                format!("copy-{i}"),
                format!("  {}\t", t.to_uppercase().replace(' ', "\u{a0} \n")),
            )
        })
        .collect();
    let config = DedupConfig::default();
    let in_flight = admit_all(&[firsts.clone(), copies.clone()], &config, false);
    let dups = &in_flight[1].duplicates;
    assert!(in_flight[0].duplicates.is_empty());
    assert_eq!(dups.len(), copies.len(), "every copy caught");
    for d in dups {
        assert_eq!(d.kind, DuplicateKind::Text);
        assert_eq!((d.first_epoch, d.first_row), (0, Some(d.row)));
        assert_eq!(
            d.first_id.as_deref(),
            Some(format!("orig-{}", d.row).as_str())
        );
    }
    // A copy within the same epoch: the earlier row wins.
    let same = vec![firsts[0].clone(), ("again".into(), firsts[0].1.clone())];
    let v = admit_all(&[same], &config, false);
    assert_eq!(decisions(&v), [(0, 1, DuplicateKind::Text, 0, Some(0))]);
    let committed = admit_all(&[firsts, copies], &config, true);
    assert_eq!(
        decisions(&committed),
        decisions(&in_flight),
        "committed or in flight"
    );
}

#[test]
fn near_copies_are_found_with_recall_of_at_least_0_9_above_jaccard_0_85() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let firsts = originals(&mut rng, 600);
    let planted = near_copies(&mut rng, &firsts);
    let config = DedupConfig::default();
    let verdicts = admit_all(&planted.epochs, &config, false);
    assert!(verdicts[0].duplicates.is_empty());
    let caught: HashSet<u64> = verdicts[1]
        .duplicates
        .iter()
        .filter(|d| d.kind == DuplicateKind::Near && d.first_row == Some(d.row))
        .map(|d| d.row)
        .collect();
    assert_eq!(
        caught.len(),
        verdicts[1].duplicates.len(),
        "each matched its original"
    );
    let high: Vec<usize> = (0..planted.truth.len())
        .filter(|&i| planted.truth[i] >= 0.85)
        .collect();
    let recall = high
        .iter()
        .filter(|&&i| caught.contains(&(i as u64)))
        .count() as f64
        / high.len() as f64;
    eprintln!(
        "near copies: {} of {} at Jaccard >= 0.85, recall {recall:.3}; {} caught of {} in all",
        high.len(),
        planted.truth.len(),
        caught.len(),
        planted.truth.len()
    );
    assert!(high.len() > 400, "most planted copies are that similar");
    assert!(recall >= 0.9, "recall {recall}");
    // Committed before the copies come, the same copies are caught.
    let committed = admit_all(&planted.epochs, &config, true);
    assert_eq!(decisions(&committed), decisions(&verdicts));
}

#[test]
fn distinct_documents_sharing_long_boilerplate_are_kept() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let header = random_words(&mut rng, 60).join(" ");
    let footer = random_words(&mut rng, 90).join(" ");
    let pages: Vec<(String, String)> = (0..1_000)
        .map(|i| {
            let body = random_words(&mut rng, 150).join(" ");
            (format!("page-{i}"), format!("{header}\n{body}\n{footer}"))
        })
        .collect();
    let most_similar = (1..50)
        .map(|i| jaccard(&pages[0].1, &pages[i].1))
        .fold(0.0, f64::max);
    let verdicts = admit_all(
        &[pages[..500].to_vec(), pages[500..].to_vec()],
        &DedupConfig::default(),
        false,
    );
    let rejected: usize = verdicts.iter().map(|v| v.duplicates.len()).sum();
    let rate = rejected as f64 / pages.len() as f64;
    eprintln!(
        "boilerplate: {rejected} of {} pages rejected ({:.2}%), true Jaccard at most {most_similar:.2}",
        pages.len(),
        rate * 100.0
    );
    assert!(most_similar < 0.5, "{most_similar}");
    assert!(rate <= 0.01, "false positives {rate}");
}

#[test]
fn kinds_can_be_switched_off() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let firsts = originals(&mut rng, 20);
    let mut planted = near_copies(&mut rng, &firsts);
    planted.epochs[1].push(("exact".into(), firsts[0].1.clone()));
    let exact_only = DedupConfig {
        near: false,
        ..Default::default()
    };
    let v = admit_all(&planted.epochs, &exact_only, false);
    assert_eq!(decisions(&v), [(1, 20, DuplicateKind::Text, 0, Some(0))]);
    let near_only = DedupConfig {
        exact: false,
        ..Default::default()
    };
    let v = admit_all(&planted.epochs, &near_only, false);
    assert!(v[1]
        .duplicates
        .iter()
        .all(|d| d.kind == DuplicateKind::Near));
    assert!(
        v[1].duplicates.iter().any(|d| d.row == 20),
        "an exact copy is a near one too"
    );
    let off = DedupConfig {
        exact: false,
        near: false,
        ..Default::default()
    };
    assert!(decisions(&admit_all(&planted.epochs, &off, false)).is_empty());
}

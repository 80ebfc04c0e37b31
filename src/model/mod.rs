//! Llama-family causal LMs: the model the influence scores are computed with (DESIGN.md 1.3),
//! loaded from a Hugging Face directory or a GGUF file, or built at random for tests and for
//! `quad warmup`, and saved as a Hugging Face directory.
pub mod config;
pub mod gguf;
pub mod hf;
pub mod llama;
pub mod tokenizer;

use std::collections::HashMap;
use std::path::Path;

use tch::{nn, Device, Kind, Tensor};
use tokenizers::Tokenizer;

pub use crate::error::ModelError;
pub use config::LlamaConfig;
pub use llama::{BlockKind, Llama, TrackedLinear};

/// Held while a draw from libtorch's one global generator runs, from `manual_seed` to its last
/// random number: threads that seed it (tests run in parallel, workers build models) would
/// otherwise interleave and take each other's numbers, and a seed would not fix the result.
static TORCH_GENERATOR: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `draw` with libtorch's global generator seeded with `seed` and no other draw in
/// between: the same seed gives the same numbers whatever other threads do, as long as every
/// draw holds the generator (`unseeded_draw` for those whose numbers nobody keeps).
pub fn seeded_draw<T>(seed: u64, draw: impl FnOnce() -> T) -> T {
    let _held = hold_generator();
    tch::manual_seed(seed as i64);
    draw()
}

/// Runs `draw`, which takes numbers from libtorch's global generator that it does not keep
/// (a model built with default initialisation, then overwritten by a checkpoint's weights),
/// holding the generator so that it cannot take them from the middle of a seeded draw in
/// another thread (which then built other weights for the same seed).
pub fn unseeded_draw<T>(draw: impl FnOnce() -> T) -> T {
    let _held = hold_generator();
    draw()
}

fn hold_generator() -> std::sync::MutexGuard<'static, ()> {
    // A draw that panicked left nothing to protect: the next one seeds afresh.
    TORCH_GENERATOR
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// This process's index among the job's processes on its machine (`quad run -n`), which
/// picks its GPU for `device = "auto"`; 0 for a job of one process.
static LOCAL_PROCESS: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// Says which of the job's processes on this machine this one is (0, 1, ...).
pub fn set_local_process(index: usize) {
    LOCAL_PROCESS.store(index, std::sync::atomic::Ordering::Relaxed);
}

/// Processes of one job on one machine share its cores: each gives libtorch's CPU kernels its
/// share (the machine's cores divided by the job's processes there), so that processes scoring
/// or embedding at once on the CPU do not each run a thread on every core.
pub fn share_cpu_threads(local_processes: usize) {
    if local_processes > 1 {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        tch::set_num_threads((cores / local_processes).max(1) as i32);
    }
}

/// The device `"auto"` means: the GPU of this process's local index (modulo the GPUs there
/// are), so that processes of one machine use one GPU each; the CPU without CUDA.
pub fn auto_device() -> Device {
    if !tch::Cuda::is_available() {
        return Device::Cpu;
    }
    let gpus = tch::Cuda::device_count().max(1) as usize;
    Device::Cuda(LOCAL_PROCESS.load(std::sync::atomic::Ordering::Relaxed) % gpus)
}

/// A causal LM with its tokenizer.
pub struct CausalLm {
    pub config: LlamaConfig,
    pub vs: nn::VarStore,
    pub model: Llama,
    pub tokenizer: Tokenizer,
    pub bos_id: Option<i64>,
    pub eos_id: Option<i64>,
}

/// Extensions of pickled PyTorch checkpoints, which are never unpickled: that can run code.
const PICKLE_EXTENSIONS: [&str; 4] = ["bin", "pt", "pth", "ckpt"];

fn pickle_refused(path: &Path) -> ModelError {
    ModelError::unsupported(
        path,
        "pickled PyTorch checkpoints are refused (unpickling can run arbitrary code); \
         convert it to model.safetensors or use a GGUF file",
    )
}

impl CausalLm {
    /// Loads a Hugging Face directory (config.json, model.safetensors or a sharded
    /// model.safetensors.index.json, tokenizer.json) or a `.gguf` file, in `kind` on `device`.
    pub fn load(path: &Path, device: Device, kind: Kind) -> Result<CausalLm, ModelError> {
        if path.is_dir() {
            return hf::load_dir(path, device, kind);
        }
        let ext = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .unwrap_or_default();
        if ext == "gguf" {
            return gguf::load(path, device, kind);
        }
        if PICKLE_EXTENSIONS.contains(&ext.as_str()) {
            return Err(pickle_refused(path));
        }
        if !path.exists() {
            return Err(ModelError::io(
                path,
                std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
            ));
        }
        Err(ModelError::unsupported(
            path,
            "expected a Hugging Face model directory or a .gguf file",
        ))
    }

    /// A randomly initialised model (N(0, 0.02) weights), fixed by `seed`.
    pub fn random(
        cfg: &LlamaConfig,
        tokenizer: Tokenizer,
        device: Device,
        kind: Kind,
        seed: u64,
    ) -> CausalLm {
        let (mut vs, model) = seeded_draw(seed, || {
            let vs = nn::VarStore::new(device);
            let model = Llama::new(&vs.root(), cfg);
            (vs, model)
        });
        vs.set_kind(kind);
        CausalLm {
            config: cfg.clone(),
            bos_id: cfg.bos_token_id,
            eos_id: cfg.eos_token_id,
            vs,
            model,
            tokenizer,
        }
    }

    /// Builds the model from tensors named as in a Hugging Face checkpoint, concatenating
    /// q/k/v and gate/up into the fused projections. `path` names the source in errors.
    pub(crate) fn from_hf_tensors(
        cfg: LlamaConfig,
        mut tensors: HashMap<String, Tensor>,
        tokenizer: Tokenizer,
        device: Device,
        kind: Kind,
        path: &Path,
    ) -> Result<CausalLm, ModelError> {
        let (mut vs, model) = unseeded_draw(|| {
            let vs = nn::VarStore::new(device);
            let model = Llama::new(&vs.root(), &cfg);
            (vs, model)
        });
        vs.set_kind(kind);
        let mut take = |name: &str| {
            tensors
                .remove(name)
                .ok_or_else(|| ModelError::tensor(path, name, "missing from the checkpoint"))
        };
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, var) in &vars {
            let src = if let Some(prefix) = name.strip_suffix("self_attn.qkv.weight") {
                let parts = ["q_proj", "k_proj", "v_proj"]
                    .map(|p| take(&format!("{prefix}self_attn.{p}.weight")));
                let [q, k, v] = parts;
                Tensor::cat(&[q?, k?, v?], 0)
            } else if let Some(prefix) = name.strip_suffix("mlp.gate_up.weight") {
                let g = take(&format!("{prefix}mlp.gate_proj.weight"))?;
                let u = take(&format!("{prefix}mlp.up_proj.weight"))?;
                Tensor::cat(&[g, u], 0)
            } else {
                take(name)?
            };
            if src.size() != var.size() {
                return Err(ModelError::tensor(
                    path,
                    name,
                    format!("shape {:?}, the config needs {:?}", src.size(), var.size()),
                ));
            }
            tch::no_grad(|| {
                let mut var = var.shallow_clone();
                var.copy_(&src.to_device(device).to_kind(kind));
            });
        }
        // A tied checkpoint may still carry a copy of the head; rotary caches are recomputed.
        tensors.remove("lm_head.weight");
        tensors.retain(|k, _| !k.ends_with("rotary_emb.inv_freq"));
        if let Some(extra) = tensors.keys().min() {
            return Err(ModelError::tensor(
                path,
                extra,
                "not part of a Llama model (unsupported architecture variant?)",
            ));
        }
        Ok(CausalLm {
            bos_id: cfg.bos_token_id,
            eos_id: cfg.eos_token_id,
            config: cfg,
            vs,
            model,
            tokenizer,
        })
    }

    /// The weights under Hugging Face names, with the fused projections split again.
    pub fn hf_tensors(&self) -> Vec<(String, Tensor)> {
        let ff = self.config.intermediate_size;
        let mut out = Vec::new();
        let mut vars: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        vars.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, var) in vars {
            let var = var.detach().to_device(Device::Cpu);
            if let Some(prefix) = name.strip_suffix("self_attn.qkv.weight") {
                let parts = var.split_with_sizes(self.config.qkv_split().as_slice(), 0);
                for (p, t) in ["q_proj", "k_proj", "v_proj"].iter().zip(parts) {
                    out.push((format!("{prefix}self_attn.{p}.weight"), t.contiguous()));
                }
            } else if let Some(prefix) = name.strip_suffix("mlp.gate_up.weight") {
                out.push((
                    format!("{prefix}mlp.gate_proj.weight"),
                    var.narrow(0, 0, ff).contiguous(),
                ));
                out.push((
                    format!("{prefix}mlp.up_proj.weight"),
                    var.narrow(0, ff, ff).contiguous(),
                ));
            } else {
                out.push((name, var.contiguous()));
            }
        }
        out
    }

    /// Writes config.json, model.safetensors (Hugging Face tensor names) and tokenizer.json,
    /// a directory transformers' LlamaForCausalLM and [`CausalLm::load`] both read.
    pub fn save_hf(&self, dir: &Path) -> Result<(), ModelError> {
        std::fs::create_dir_all(dir).map_err(|e| ModelError::io(dir, e))?;
        let dtype = match self.model_kind() {
            Kind::Double => "float64",
            Kind::BFloat16 => "bfloat16",
            Kind::Half => "float16",
            _ => "float32",
        };
        let cfg_path = dir.join("config.json");
        let json = serde_json::to_string_pretty(&self.config.to_hf_json(dtype))
            .map_err(|e| ModelError::invalid(&cfg_path, e))?;
        std::fs::write(&cfg_path, json).map_err(|e| ModelError::io(&cfg_path, e))?;
        let weights = dir.join("model.safetensors");
        Tensor::write_safetensors(&self.hf_tensors(), &weights).map_err(|e| ModelError::Torch {
            context: format!("writing {}", weights.display()),
            cause: e,
        })?;
        let tok = dir.join("tokenizer.json");
        self.tokenizer
            .save(&tok, false)
            .map_err(|e| ModelError::Tokenizer(format!("writing {}: {e}", tok.display())))?;
        Ok(())
    }

    /// The kind the weights are stored in.
    pub fn model_kind(&self) -> Kind {
        self.vs
            .variables()
            .values()
            .next()
            .map(|t| t.kind())
            .unwrap_or(Kind::Float)
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// Token ids of `text`, with the special tokens the tokenizer's post-processor adds.
    pub fn encode(&self, text: &str) -> Result<Vec<i64>, ModelError> {
        let enc = self
            .tokenizer
            .encode(text, true)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        Ok(enc.get_ids().iter().map(|&i| i as i64).collect())
    }

    pub fn decode(&self, ids: &[i64]) -> Result<String, ModelError> {
        let ids: Vec<u32> = ids.iter().map(|&i| i as u32).collect();
        self.tokenizer
            .decode(&ids, false)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))
    }

    /// Logits [B, T, V] of right-padded ids [B, T], without a graph.
    pub fn logits(&self, ids: &Tensor) -> Tensor {
        tch::no_grad(|| self.model.forward(&ids.to_device(self.device())))
    }

    /// Mean next-token cross-entropy (nats) of one sequence, in float64.
    pub fn mean_nll(&self, ids: &[i64]) -> f64 {
        if ids.len() < 2 {
            return 0.0;
        }
        let t = Tensor::from_slice(ids).unsqueeze(0);
        let logits = self.logits(&t).squeeze_dim(0).to_kind(Kind::Double);
        let n = ids.len() as i64;
        let targets = t
            .squeeze_dim(0)
            .narrow(0, 1, n - 1)
            .to_device(logits.device());
        let loss = logits
            .narrow(0, 0, n - 1)
            .log_softmax(-1, Kind::Double)
            .nll_loss(&targets);
        loss.double_value(&[])
    }

    /// The summed next-token cross-entropy (nats) of each window of token ids, the windows
    /// right-padded into one batch without a graph (the model is causal: padding after a
    /// window does not change its positions' logits). Float logits, float64 sums. Every window
    /// needs at least 2 tokens.
    pub fn window_nll_sums(&self, windows: &[&[i64]]) -> Vec<f64> {
        let t = windows.iter().map(|w| w.len()).max().unwrap_or(0) as i64;
        let b = windows.len() as i64;
        if b == 0 || t < 2 {
            return vec![0.0; windows.len()];
        }
        let mut ids = vec![0i64; (b * t) as usize];
        let mut targets = vec![-100i64; (b * (t - 1)) as usize];
        for (i, w) in windows.iter().enumerate() {
            let row = i * t as usize;
            ids[row..row + w.len()].copy_from_slice(w);
            let trow = i * (t as usize - 1);
            targets[trow..trow + w.len() - 1].copy_from_slice(&w[1..]);
        }
        let ids = Tensor::from_slice(&ids).view([b, t]);
        let logits = self.logits(&ids).narrow(1, 0, t - 1);
        let vocab = logits.size()[2];
        let targets = Tensor::from_slice(&targets).to_device(logits.device());
        let losses = logits
            .reshape([-1, vocab])
            .to_kind(Kind::Float)
            .log_softmax(-1, Kind::Float)
            .nll_loss_nd::<Tensor>(&targets, None, tch::Reduction::None, -100)
            .view([b, t - 1])
            .sum_dim_intlist([1i64].as_slice(), false, Kind::Double)
            .to_device(Device::Cpu);
        Vec::<f64>::try_from(&losses).expect("one sum a window")
    }

    /// Greedy continuation: the `n` most likely next tokens, one at a time (no KV cache).
    pub fn greedy(&self, prompt: &[i64], n: usize) -> Vec<i64> {
        let mut ids = prompt.to_vec();
        for _ in 0..n {
            let t = Tensor::from_slice(&ids).unsqueeze(0);
            let logits = self.logits(&t);
            let next = logits
                .get(0)
                .get(ids.len() as i64 - 1)
                .argmax(-1, false)
                .int64_value(&[]);
            ids.push(next);
            if Some(next) == self.eos_id {
                break;
            }
        }
        ids.split_off(prompt.len())
    }
}

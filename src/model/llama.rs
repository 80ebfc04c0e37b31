//! The Llama decoder (SmolLM, TinyLlama, Llama 2/3 without rope scaling) in tch, with the
//! attention's Q, K and V as one fused linear `qkv` and the MLP's gate and up projections as
//! one fused linear `gate_up`: the K-FAC influence treats each fused projection as one block
//! (DESIGN.md 1.3), so its pre-activation output is one tensor to take gradients against.
//!
//! Variable names follow the Hugging Face checkpoint ("model.layers.3.self_attn.o_proj.weight")
//! except the fused ones ("model.layers.3.self_attn.qkv.weight", "model.layers.3.mlp.gate_up.weight");
//! the loaders concatenate the checkpoint's separate tensors and `save_hf` splits them again.
use tch::nn;
use tch::{Kind, Tensor};

use super::config::LlamaConfig;

/// Which kind of projection a tracked linear layer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BlockKind {
    /// Q, K and V stacked: they read the same input.
    Qkv,
    /// The attention output projection.
    AttnOut,
    /// The MLP's gate and up projections stacked.
    GateUp,
    /// The MLP's down projection.
    Down,
}

/// One linear layer's input and pre-activation output in a tracked forward pass.
#[derive(Debug)]
pub struct TrackedLinear {
    /// "layers.3.qkv", "layers.3.o", "layers.3.gate_up", "layers.3.down".
    pub name: String,
    pub kind: BlockKind,
    /// The layer's input a: [B, T, d_in], detached.
    pub input: Tensor,
    /// y = a W^T: [B, T, d_out], in the autograd graph of the logits, so
    /// `Tensor::run_backward(&[loss], &[output], ..)` gives the output gradient g.
    pub output: Tensor,
    /// Sizes of the stacked parts of d_out: [q, k, v], [gate, up] or [d_out].
    pub split: Vec<i64>,
}

/// Collects tracked layers during a forward pass; `None` for a plain forward.
type Tracker = Option<Vec<TrackedLinear>>;

/// A bias-free linear layer y = x W^T with W: [out, in].
#[derive(Debug)]
struct Linear {
    weight: Tensor,
}

impl Linear {
    fn new(p: nn::Path, out_dim: i64, in_dim: i64) -> Linear {
        let init = nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        Linear {
            weight: p.var("weight", &[out_dim, in_dim], init),
        }
    }

    fn forward(
        &self,
        x: &Tensor,
        track: &mut Tracker,
        name: impl FnOnce() -> String,
        kind: BlockKind,
        split: &[i64],
    ) -> Tensor {
        let y = x.matmul(&self.weight.tr());
        let Some(tracked) = track else {
            return y;
        };
        // With frozen weights y is not in a graph; making it a leaf that requires grad lets
        // run_backward still reach it, without computing weight gradients nobody needs.
        let y = if y.requires_grad() {
            y
        } else {
            y.detach().set_requires_grad(true)
        };
        tracked.push(TrackedLinear {
            name: name(),
            kind,
            input: x.detach(),
            output: y.shallow_clone(),
            split: split.to_vec(),
        });
        y
    }
}

/// The precision reductions run in: at least Float, Double when the model is Double.
fn work_kind(kind: Kind) -> Kind {
    if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

#[derive(Debug)]
struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    fn new(p: nn::Path, dim: i64, eps: f64) -> RmsNorm {
        RmsNorm {
            weight: p.var("weight", &[dim], nn::Init::Const(1.0)),
            eps,
        }
    }

    /// As transformers' LlamaRMSNorm: normalise in (at least) float32, cast back, scale.
    fn forward(&self, x: &Tensor) -> Tensor {
        let kind = x.kind();
        let xf = x.to_kind(work_kind(kind));
        let var = xf.square().mean_dim(-1, true, None::<Kind>);
        (xf * (var + self.eps).rsqrt()).to_kind(kind) * &self.weight
    }
}

/// Rotary position embeddings (rotate-half convention, as Hugging Face checkpoints store Q/K).
fn rotary(cfg: &LlamaConfig, len: i64, kind: Kind, device: tch::Device) -> (Tensor, Tensor) {
    let hd = cfg.head_dim();
    let wk = work_kind(kind);
    let exponents =
        Tensor::arange_start_step(0, hd, 2, (Kind::Int64, device)).to_kind(wk) / hd as f64;
    let inv_freq = Tensor::from(cfg.rope_theta)
        .to_kind(wk)
        .to_device(device)
        .pow(&exponents)
        .reciprocal();
    let positions = Tensor::arange(len, (wk, device));
    let freqs = positions.outer(&inv_freq);
    let emb = Tensor::cat(&[&freqs, &freqs], -1);
    (emb.cos().to_kind(kind), emb.sin().to_kind(kind))
}

fn rotate_half(x: &Tensor) -> Tensor {
    let half = x.size()[x.dim() - 1] / 2;
    let x1 = x.narrow(-1, 0, half);
    let x2 = x.narrow(-1, half, half);
    Tensor::cat(&[&x2.neg(), &x1], -1)
}

#[derive(Debug)]
struct Layer {
    index: i64,
    input_norm: RmsNorm,
    qkv: Linear,
    o: Linear,
    post_norm: RmsNorm,
    gate_up: Linear,
    down: Linear,
    qkv_split: Vec<i64>,
    heads: i64,
    kv_heads: i64,
    head_dim: i64,
    ff: i64,
}

impl Layer {
    fn new(p: nn::Path, cfg: &LlamaConfig, index: i64) -> Layer {
        let d = cfg.hidden_size;
        let hd = cfg.head_dim();
        let qkv_split = cfg.qkv_split();
        let attn = &p / "self_attn";
        let mlp = &p / "mlp";
        Layer {
            index,
            input_norm: RmsNorm::new(&p / "input_layernorm", d, cfg.rms_norm_eps),
            qkv: Linear::new(&attn / "qkv", qkv_split.iter().sum(), d),
            o: Linear::new(&attn / "o_proj", d, cfg.num_attention_heads * hd),
            post_norm: RmsNorm::new(&p / "post_attention_layernorm", d, cfg.rms_norm_eps),
            gate_up: Linear::new(&mlp / "gate_up", 2 * cfg.intermediate_size, d),
            down: Linear::new(&mlp / "down_proj", d, cfg.intermediate_size),
            qkv_split,
            heads: cfg.num_attention_heads,
            kv_heads: cfg.num_key_value_heads,
            head_dim: hd,
            ff: cfg.intermediate_size,
        }
    }

    fn forward(&self, x: &Tensor, rope: &(Tensor, Tensor), track: &mut Tracker) -> Tensor {
        let (b, t, _) = x.size3().expect("hidden states are [B, T, d]");
        let i = self.index;
        let hd = self.head_dim;
        let h = self.input_norm.forward(x);
        let qkv = self.qkv.forward(
            &h,
            track,
            || format!("layers.{i}.qkv"),
            BlockKind::Qkv,
            &self.qkv_split,
        );
        let parts = qkv.split_with_sizes(self.qkv_split.as_slice(), -1);
        let heads = |x: &Tensor, n: i64| x.view([b, t, n, hd]).transpose(1, 2);
        let (cos, sin) = rope;
        let rot = |x: Tensor| &x * cos + rotate_half(&x) * sin;
        let q = rot(heads(&parts[0], self.heads));
        let mut k = rot(heads(&parts[1], self.kv_heads));
        let mut v = heads(&parts[2], self.kv_heads);
        if self.kv_heads != self.heads {
            let rep = self.heads / self.kv_heads;
            k = k.repeat_interleave_self_int(rep, 1, None::<i64>);
            v = v.repeat_interleave_self_int(rep, 1, None::<i64>);
        }
        // Causal attention and no padding mask: batches are right-padded, so a real token
        // only ever attends to earlier positions, which are real tokens too. Pad positions
        // produce garbage logits that callers mask out of their losses.
        let att = Tensor::scaled_dot_product_attention(
            &q,
            &k,
            &v,
            None::<Tensor>,
            0.0,
            true,
            None::<f64>,
            false,
        );
        let att = att
            .transpose(1, 2)
            .contiguous()
            .view([b, t, self.heads * hd]);
        let o = self.o.forward(
            &att,
            track,
            || format!("layers.{i}.o"),
            BlockKind::AttnOut,
            &[self.heads * hd],
        );
        let x = x + o;
        let h = self.post_norm.forward(&x);
        let gu = self.gate_up.forward(
            &h,
            track,
            || format!("layers.{i}.gate_up"),
            BlockKind::GateUp,
            &[self.ff, self.ff],
        );
        let act = gu.narrow(-1, 0, self.ff).silu() * gu.narrow(-1, self.ff, self.ff);
        let down = self.down.forward(
            &act,
            track,
            || format!("layers.{i}.down"),
            BlockKind::Down,
            &[x.size()[2]],
        );
        x + down
    }
}

/// A Llama-family decoder with its LM head.
#[derive(Debug)]
pub struct Llama {
    config: LlamaConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: RmsNorm,
    /// None when the head is tied to the embeddings.
    lm_head: Option<Tensor>,
}

impl Llama {
    /// Builds the variables under `vs` ("model.…", "lm_head.weight"), initialised N(0, 0.02)
    /// for projections and embeddings, ones for the norms.
    pub fn new(vs: &nn::Path, cfg: &LlamaConfig) -> Llama {
        let m = vs / "model";
        let init = nn::Init::Randn {
            mean: 0.0,
            stdev: 0.02,
        };
        let embed = (&m / "embed_tokens").var("weight", &[cfg.vocab_size, cfg.hidden_size], init);
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| Layer::new(&m / "layers" / i, cfg, i))
            .collect();
        let norm = RmsNorm::new(&m / "norm", cfg.hidden_size, cfg.rms_norm_eps);
        let lm_head = (!cfg.tie_word_embeddings)
            .then(|| (vs / "lm_head").var("weight", &[cfg.vocab_size, cfg.hidden_size], init));
        Llama {
            config: cfg.clone(),
            embed,
            layers,
            norm,
            lm_head,
        }
    }

    pub fn config(&self) -> &LlamaConfig {
        &self.config
    }

    /// Logits [B, T, V] for right-padded token ids [B, T] (i64).
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        self.run(ids, &mut None)
    }

    /// Logits and every block's linear layers (qkv, o, gate_up, down per layer, in order).
    /// Call outside `no_grad`; the outputs are graph nodes even when the weights are frozen.
    pub fn forward_tracked(&self, ids: &Tensor) -> (Tensor, Vec<TrackedLinear>) {
        let mut track = Some(Vec::with_capacity(4 * self.layers.len()));
        let logits = self.run(ids, &mut track);
        (logits, track.unwrap_or_default())
    }

    fn run(&self, ids: &Tensor, track: &mut Tracker) -> Tensor {
        let len = ids.size()[1];
        let mut x = Tensor::embedding(&self.embed, ids, -1, false, false);
        let rope = rotary(&self.config, len, x.kind(), x.device());
        for layer in &self.layers {
            x = layer.forward(&x, &rope, track);
        }
        let x = self.norm.forward(&x);
        x.matmul(&self.lm_head.as_ref().unwrap_or(&self.embed).tr())
    }
}

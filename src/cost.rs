//! Cost accounting: the floating-point operations spent on embedding, K-FAC factor fitting and
//! influence scoring, counted from the model shapes and token counts (a multiply-add is 2
//! FLOPs), and the fraction of the pool that was scored. Stored with the run and printed in
//! the summary and the report.
use serde::{Deserialize, Serialize};

/// A linear layer y = W a, or a K-FAC block: `inputs` = dim(a) (bias as a constant 1
/// included when the layer has one), `outputs` = dim(g); a stacked block (Q, K and V) has the
/// sum of the stacked outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Linear {
    pub inputs: u64,
    pub outputs: u64,
}

/// The shapes that decide a transformer's cost.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TransformerShape {
    pub layers: u64,
    /// The linear layers of one block (attention and MLP).
    pub linears: Vec<Linear>,
    /// heads x head dimension of the attention (for the QK^T and AV products).
    pub attention_dim: u64,
    /// A layer after the blocks (e.g. the LM head), counted once per token.
    pub head: Option<Linear>,
}

impl TransformerShape {
    /// FLOPs of one forward pass over a sequence of `seq_len` tokens: 2 * in * out per token
    /// and linear layer, plus 4 * T^2 * attention_dim per layer for the QK^T and AV products
    /// (counted in full, as a dense kernel computes them).
    pub fn forward_flops(&self, seq_len: u64) -> f64 {
        let t = seq_len as f64;
        let per_token: f64 = self.linears.iter().map(|l| linear_flops(*l)).sum();
        let attention = 4.0 * t * t * self.attention_dim as f64;
        let head = self.head.map_or(0.0, linear_flops) * t;
        self.layers as f64 * (per_token * t + attention) + head
    }

    /// FLOPs of the backward pass that produces every layer's output gradient g_t (input
    /// gradients only, no weight gradients): the same matrix products as the forward pass.
    pub fn input_backward_flops(&self, seq_len: u64) -> f64 {
        self.forward_flops(seq_len)
    }
}

impl TransformerShape {
    /// A Llama model's shape and its K-FAC blocks (every layer's QKV, O, gate/up and down
    /// projections), for the factor-fitting and scoring counts.
    pub fn llama(c: &crate::model::LlamaConfig) -> (TransformerShape, Vec<Linear>) {
        let d = c.hidden_size as u64;
        let ff = c.intermediate_size as u64;
        let qkv: u64 = c.qkv_split().iter().map(|&x| x as u64).sum();
        let attention_dim = (c.num_attention_heads * c.head_dim()) as u64;
        let linears = vec![
            Linear {
                inputs: d,
                outputs: qkv,
            },
            Linear {
                inputs: attention_dim,
                outputs: d,
            },
            Linear {
                inputs: d,
                outputs: 2 * ff,
            },
            Linear {
                inputs: ff,
                outputs: d,
            },
        ];
        let blocks = (0..c.num_hidden_layers)
            .flat_map(|_| linears.iter().copied())
            .collect();
        let shape = TransformerShape {
            layers: c.num_hidden_layers as u64,
            linears,
            attention_dim,
            head: Some(Linear {
                inputs: d,
                outputs: c.vocab_size as u64,
            }),
        };
        (shape, blocks)
    }

    /// A BERT encoder's shape (Q, K, V, O, intermediate and output dense layers, with bias).
    pub fn bert(hidden: u64, intermediate: u64, layers: u64) -> TransformerShape {
        let h = Linear {
            inputs: hidden + 1,
            outputs: hidden,
        };
        TransformerShape {
            layers,
            linears: vec![
                h,
                h,
                h,
                h,
                Linear {
                    inputs: hidden + 1,
                    outputs: intermediate,
                },
                Linear {
                    inputs: intermediate + 1,
                    outputs: hidden,
                },
            ],
            attention_dim: hidden,
            head: None,
        }
    }
}

fn linear_flops(l: Linear) -> f64 {
    2.0 * l.inputs as f64 * l.outputs as f64
}

/// Embedding `seq_lens` (one entry per encoder window) with `encoder`.
pub fn embed_flops(encoder: &TransformerShape, seq_lens: impl IntoIterator<Item = u64>) -> f64 {
    seq_lens.into_iter().map(|t| encoder.forward_flops(t)).sum()
}

/// Fitting the K-FAC factors on windows of `seq_lens` tokens: forward + input backward, then
/// per token and block the outer products a a^T (2 in^2) and g g^T (2 out^2); and once per
/// block the two symmetric eigendecompositions, counted as 9 n^3 each (Golub and Van Loan's
/// figure for the symmetric QR algorithm with eigenvectors).
pub fn factor_fit_flops(
    model: &TransformerShape,
    blocks: &[Linear],
    seq_lens: impl IntoIterator<Item = u64>,
) -> f64 {
    let per_token: f64 = blocks
        .iter()
        .map(|b| 2.0 * (b.inputs as f64).powi(2) + 2.0 * (b.outputs as f64).powi(2))
        .sum();
    let passes: f64 = seq_lens
        .into_iter()
        .map(|t| model.forward_flops(t) + model.input_backward_flops(t) + per_token * t as f64)
        .sum();
    let eigen: f64 = blocks
        .iter()
        .map(|b| 9.0 * ((b.inputs as f64).powi(3) + (b.outputs as f64).powi(3)))
        .sum();
    passes + eigen
}

/// Scoring windows of `seq_lens` tokens: forward + input backward, then per token and block
/// g_t^T (M a_t): 2 in out + 2 out. With `normalise`, per window and block the two Gram
/// matrices of the gradient norm: 2 T^2 (in + out) + 2 T^2.
pub fn score_flops(
    model: &TransformerShape,
    blocks: &[Linear],
    seq_lens: impl IntoIterator<Item = u64>,
    normalise: bool,
) -> f64 {
    let per_token: f64 = blocks
        .iter()
        .map(|b| linear_flops(*b) + 2.0 * b.outputs as f64)
        .sum();
    let gram_per_t2: f64 = blocks
        .iter()
        .map(|b| 2.0 * (b.inputs + b.outputs) as f64 + 2.0)
        .sum();
    seq_lens
        .into_iter()
        .map(|t| {
            let tf = t as f64;
            let gram = if normalise {
                gram_per_t2 * tf * tf
            } else {
                0.0
            };
            model.forward_flops(t) + model.input_backward_flops(t) + per_token * tf + gram
        })
        .sum()
}

/// What a run spent, stored with the run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Costs {
    pub embed_flops: f64,
    pub factor_flops: f64,
    pub score_flops: f64,
    pub docs_embedded: u64,
    pub docs_scored: u64,
    pub tokens_scored: u64,
    pub pool_docs: u64,
    pub pool_tokens: u64,
}

impl Costs {
    pub fn total_flops(&self) -> f64 {
        self.embed_flops + self.factor_flops + self.score_flops
    }

    /// Fraction of the pool's documents that were scored (0 for an empty pool).
    pub fn pool_fraction_scored(&self) -> f64 {
        if self.pool_docs == 0 {
            0.0
        } else {
            self.docs_scored as f64 / self.pool_docs as f64
        }
    }

    /// Adds another part's costs (e.g. of another worker or round).
    pub fn add(&mut self, other: &Costs) {
        self.embed_flops += other.embed_flops;
        self.factor_flops += other.factor_flops;
        self.score_flops += other.score_flops;
        self.docs_embedded += other.docs_embedded;
        self.docs_scored += other.docs_scored;
        self.tokens_scored += other.tokens_scored;
    }

    /// (label, FLOPs) of each stage, for tables and plots.
    pub fn stages(&self) -> [(&'static str, f64); 3] {
        [
            ("embedding", self.embed_flops),
            ("factor fitting", self.factor_flops),
            ("scoring", self.score_flops),
        ]
    }
}

impl std::fmt::Display for Costs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "FLOPs: embedding {:.3e}, factor fitting {:.3e}, scoring {:.3e}, total {:.3e}",
            self.embed_flops,
            self.factor_flops,
            self.score_flops,
            self.total_flops()
        )?;
        write!(
            f,
            "scored {} of {} documents ({:.2}% of the pool), {} tokens",
            self.docs_scored,
            self.pool_docs,
            100.0 * self.pool_fraction_scored(),
            self.tokens_scored
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> TransformerShape {
        TransformerShape {
            layers: 2,
            linears: vec![
                Linear {
                    inputs: 4,
                    outputs: 12,
                },
                Linear {
                    inputs: 4,
                    outputs: 4,
                },
            ],
            attention_dim: 4,
            head: Some(Linear {
                inputs: 4,
                outputs: 10,
            }),
        }
    }

    #[test]
    fn forward_counts_by_hand() {
        // T = 3: per layer 2*(48+16)*3 = 384 linear + 4*9*4 = 144 attention; 2 layers = 1056;
        // head 2*40*3 = 240.
        assert_eq!(tiny().forward_flops(3), 1056.0 + 240.0);
        assert_eq!(embed_flops(&tiny(), [3, 3]), 2.0 * 1296.0);
    }

    #[test]
    fn factor_and_score_counts_by_hand() {
        let blocks = [Linear {
            inputs: 4,
            outputs: 12,
        }];
        // passes: 2 * 1296 + (2*16 + 2*144) * 3 = 2592 + 960; eigen: 9 * (64 + 1728)
        assert_eq!(
            factor_fit_flops(&tiny(), &blocks, [3]),
            2592.0 + 960.0 + 9.0 * 1792.0
        );
        // per token 2*48 + 24 = 120 -> 360; gram: (2*16 + 2) * 9 = 306
        assert_eq!(score_flops(&tiny(), &blocks, [3], false), 2592.0 + 360.0);
        assert_eq!(
            score_flops(&tiny(), &blocks, [3], true),
            2592.0 + 360.0 + 306.0
        );
    }

    #[test]
    fn costs_serialise_and_report_the_fraction() {
        let c = Costs {
            score_flops: 1e12,
            docs_scored: 25,
            pool_docs: 100,
            ..Default::default()
        };
        assert_eq!(c.pool_fraction_scored(), 0.25);
        let back: Costs = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
        assert!(c.to_string().contains("25.00% of the pool"));
    }
}

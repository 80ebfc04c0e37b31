//! K-FAC and EK-FAC factors (DESIGN 1.3): per block A = E[a a^T] and G = E[g g^T] over the
//! tokens of a fitting set (which tokens, and the loss g is taken of, is the caller's
//! `Convention`), their eigendecompositions in float64, the optional EK-FAC eigenvalue
//! correction from per-example gradients, and the preconditioning
//! M = Q_G [(Q_G^T V Q_A) / (lam + delta)] Q_A^T.
//!
//! Everything here works on captured activations a_t and output gradients g_t of linear
//! layers (flattened tokens [N, d] for A and G, examples [B, T, d] for EK-FAC), so it does not
//! depend on the model that produced them.
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

use super::InfluenceError;

/// A K-FAC block: some output rows of one tracked linear layer. Q, K and V of a fused `qkv`
/// layer are one block (rows 0..q+k+v) or three (one per split), as the settings say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockLayout {
    pub name: String,
    /// Index of the tracked linear layer, in the model's capture order.
    pub linear: usize,
    /// First output row of the block and its number of rows.
    pub row_offset: i64,
    pub rows: i64,
    /// Input width d_in (the same for every block of one linear).
    pub cols: i64,
}

impl BlockLayout {
    /// The block's slice of a layer's output gradients ([.., d_out] -> [.., rows]).
    pub fn rows_of(&self, g: &Tensor) -> Tensor {
        g.narrow(-1, self.row_offset, self.rows)
    }
}

/// Running sums of a a^T (per linear) and g g^T (per block), in float64.
pub struct CovarianceAccumulator {
    layouts: Vec<BlockLayout>,
    a_sums: Vec<Option<Tensor>>,
    g_sums: Vec<Option<Tensor>>,
    tokens: i64,
}

impl CovarianceAccumulator {
    pub fn new(layouts: &[BlockLayout]) -> Self {
        let linears = layouts.iter().map(|b| b.linear + 1).max().unwrap_or(0);
        CovarianceAccumulator {
            layouts: layouts.to_vec(),
            a_sums: (0..linears).map(|_| None).collect(),
            g_sums: layouts.iter().map(|_| None).collect(),
            tokens: 0,
        }
    }

    /// Adds the tokens of one batch: `captures[l] = (a [N, d_in], g [N, d_out])` for linear l,
    /// rows already restricted to the tokens that count (no padding).
    pub fn add(&mut self, captures: &[(Tensor, Tensor)]) {
        let Some((first, _)) = captures.first() else {
            return;
        };
        self.tokens += first.size()[0];
        for (l, (a, _)) in captures.iter().enumerate() {
            if l < self.a_sums.len() {
                accumulate(&mut self.a_sums[l], &gram_f64(a));
            }
        }
        for (b, layout) in self.layouts.iter().enumerate() {
            let g = layout.rows_of(&captures[layout.linear].1);
            accumulate(&mut self.g_sums[b], &gram_f64(&g));
        }
    }

    pub fn tokens(&self) -> i64 {
        self.tokens
    }

    /// Normalises the sums and eigendecomposes them (float64, on the tensors' device).
    pub fn finish(self) -> Result<KfacFactors, InfluenceError> {
        if self.tokens == 0 {
            return Err(InfluenceError::Fit(
                "no tokens to fit the K-FAC factors on".into(),
            ));
        }
        let n = self.tokens as f64;
        let mut a_eigen = Vec::with_capacity(self.a_sums.len());
        for (l, sum) in self.a_sums.into_iter().enumerate() {
            let sum = sum.ok_or_else(|| {
                InfluenceError::Fit(format!("tracked linear {l} produced no activations"))
            })?;
            a_eigen.push(eigh(&(sum / n))?);
        }
        let mut blocks = Vec::with_capacity(self.layouts.len());
        for (layout, sum) in self.layouts.into_iter().zip(self.g_sums) {
            let sum = sum.ok_or_else(|| {
                InfluenceError::Fit(format!("block {} produced no gradients", layout.name))
            })?;
            let (g_vals, g_vecs) = eigh(&(sum / n))?;
            let (a_vals, a_vecs) = &a_eigen[layout.linear];
            blocks.push(BlockFactors {
                layout,
                a_vals: a_vals.shallow_clone(),
                a_vecs: a_vecs.shallow_clone(),
                g_vals,
                g_vecs,
                ekfac: None,
            });
        }
        Ok(KfacFactors {
            blocks,
            tokens: self.tokens,
        })
    }
}

fn accumulate(sum: &mut Option<Tensor>, term: &Tensor) {
    match sum {
        Some(s) => *s += term,
        None => *sum = Some(term.copy()),
    }
}

/// x^T x in float64.
fn gram_f64(x: &Tensor) -> Tensor {
    let x = x.to_kind(Kind::Double);
    x.tr().mm(&x)
}

/// Eigenvalues (ascending, clamped at 0: covariances are PSD, tiny negatives are round-off)
/// and eigenvectors of a symmetric matrix, in float64.
fn eigh(m: &Tensor) -> Result<(Tensor, Tensor), InfluenceError> {
    let sym = (m + m.tr()) * 0.5;
    let (vals, vecs) = sym
        .to_kind(Kind::Double)
        .f_linalg_eigh("L")
        .map_err(|e| InfluenceError::Fit(format!("eigendecomposition failed: {e}")))?;
    Ok((vals.clamp_min(0.0), vecs))
}

/// One block's factors: A = Q_A diag(a_vals) Q_A^T, G = Q_G diag(g_vals) Q_G^T, and the
/// EK-FAC eigenvalues ([rows, d_in], in the Q_G (x) Q_A basis) when fitted.
pub struct BlockFactors {
    pub layout: BlockLayout,
    pub a_vals: Tensor,
    pub a_vecs: Tensor,
    pub g_vals: Tensor,
    pub g_vecs: Tensor,
    pub ekfac: Option<Tensor>,
}

/// How the damping delta of each block is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Damping {
    /// delta = factor x mean of the block's eigenvalue products (lG lA^T, or the EK-FAC
    /// eigenvalues when corrected). DESIGN's default factor is 0.1.
    Relative(f64),
    /// The same delta for every block.
    Absolute(f64),
}

impl BlockFactors {
    /// The eigenvalues the preconditioner divides by: EK-FAC's when fitted (and asked for),
    /// otherwise the Kronecker products lG lA^T. [rows, d_in], float64.
    pub fn eigenvalues(&self, ekfac: bool) -> Result<Tensor, InfluenceError> {
        if ekfac {
            return self
                .ekfac
                .as_ref()
                .map(|e| e.shallow_clone())
                .ok_or_else(|| {
                    InfluenceError::Fit(format!(
                        "block {}: EK-FAC eigenvalues were not fitted",
                        self.layout.name
                    ))
                });
        }
        Ok(self.g_vals.unsqueeze(1) * self.a_vals.unsqueeze(0))
    }

    pub fn damping(&self, damping: Damping, ekfac: bool) -> Result<f64, InfluenceError> {
        Ok(match damping {
            Damping::Absolute(d) => d,
            Damping::Relative(f) => {
                f * self
                    .eigenvalues(ekfac)?
                    .mean(Kind::Double)
                    .double_value(&[])
            }
        })
    }

    /// M = Q_G [(Q_G^T V Q_A) / (lam + delta)] Q_A^T for V = the block's rows of a gradient.
    pub fn precondition(
        &self,
        v: &Tensor,
        damping: Damping,
        ekfac: bool,
    ) -> Result<Tensor, InfluenceError> {
        let lam = self.eigenvalues(ekfac)?;
        let delta = self.damping(damping, ekfac)?;
        if !(delta > 0.0) && lam.min().double_value(&[]) <= 0.0 {
            return Err(InfluenceError::Fit(format!(
                "block {}: damping {delta} leaves the preconditioner singular",
                self.layout.name
            )));
        }
        let v = v.to_kind(Kind::Double);
        let rotated = self.g_vecs.tr().mm(&v).mm(&self.a_vecs);
        let scaled = rotated / (lam + delta);
        Ok(self.g_vecs.mm(&scaled).mm(&self.a_vecs.tr()))
    }
}

/// Running sums of EK-FAC's corrected eigenvalues E_n[(Q_G^T G_n Q_A)^2] (George et al. 2018),
/// G_n = sum_t g_t a_t^T the weight gradient of one example: the exact diagonal, in the
/// Kronecker eigenbasis, of the Fisher of the examples' losses, which A (x) G approximates. An
/// example is a window (the unit that goes through the model); the expectation is over examples.
pub struct EkfacAccumulator<'f> {
    factors: &'f KfacFactors,
    sums: Vec<Option<Tensor>>,
    examples: i64,
}

impl<'f> EkfacAccumulator<'f> {
    pub fn new(factors: &'f KfacFactors) -> Self {
        EkfacAccumulator {
            factors,
            sums: factors.blocks.iter().map(|_| None).collect(),
            examples: 0,
        }
    }

    /// Adds the examples of one batch: `captures[l] = (a [B, T, d_in], g [B, T, d_out])` for
    /// linear l, one row per example. Positions without a loss (padding, a window's last token)
    /// must have g = 0 there, as backward passes give them: G_n then sums every position.
    pub fn add_examples(&mut self, captures: &[(Tensor, Tensor)]) {
        let Some((first, _)) = captures.first() else {
            return;
        };
        self.examples += first.size()[0];
        for (b, block) in self.factors.blocks.iter().enumerate() {
            let (a, g) = &captures[block.layout.linear];
            let g = block.layout.rows_of(g).to_kind(Kind::Double);
            // G_n for every example at once: [B, rows, T] x [B, T, d_in].
            let per_example = g.transpose(1, 2).bmm(&a.to_kind(Kind::Double));
            let rotated = block.g_vecs.tr().matmul(&per_example).matmul(&block.a_vecs);
            let squares = rotated
                .square()
                .sum_dim_intlist([0i64].as_slice(), false, Kind::Double);
            accumulate(&mut self.sums[b], &squares);
        }
    }

    pub fn finish(self) -> Result<Vec<Tensor>, InfluenceError> {
        if self.examples == 0 {
            return Err(InfluenceError::Fit(
                "no examples to fit the EK-FAC eigenvalues on".into(),
            ));
        }
        let n = self.examples as f64;
        self.sums
            .into_iter()
            .zip(&self.factors.blocks)
            .map(|(s, b)| {
                s.map(|s| s / n).ok_or_else(|| {
                    InfluenceError::Fit(format!("block {} produced no gradients", b.layout.name))
                })
            })
            .collect()
    }
}

/// The factors of every block of a model.
pub struct KfacFactors {
    pub blocks: Vec<BlockFactors>,
    /// Tokens the factors were fitted on.
    pub tokens: i64,
}

impl KfacFactors {
    pub fn set_ekfac(&mut self, eigenvalues: Vec<Tensor>) {
        for (b, e) in self.blocks.iter_mut().zip(eigenvalues) {
            b.ekfac = Some(e);
        }
    }

    /// Preconditions a full gradient, given per tracked linear ([d_out, d_in] each): every
    /// block's rows are replaced by its M. Returns one [d_out, d_in] float64 matrix per linear.
    pub fn precondition_all(
        &self,
        grads: &[Tensor],
        damping: Damping,
        ekfac: bool,
    ) -> Result<Vec<Tensor>, InfluenceError> {
        let out: Vec<Tensor> = grads
            .iter()
            .map(|g| g.to_kind(Kind::Double).zeros_like())
            .collect();
        for block in &self.blocks {
            let l = block.layout.linear;
            let v = grads[l].narrow(0, block.layout.row_offset, block.layout.rows);
            let m = block.precondition(&v, damping, ekfac)?;
            out[l]
                .narrow(0, block.layout.row_offset, block.layout.rows)
                .copy_(&m);
        }
        Ok(out)
    }
}

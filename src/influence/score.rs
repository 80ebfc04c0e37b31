//! The scoring kernels (DESIGN 1.3): per document sum_l sum_t g_t^T M_l a_t without forming a
//! per-document gradient, and ||grad L(z)|| through the two T x T Gram matrices.
use tch::{Kind, Tensor};

/// sum_t g_t^T M a_t for every row of a batch: a [B, T, d_in], g [B, T, d_out], M [d_out, d_in].
/// Returns [B] in float64. One matrix product per token (projected on the narrower side).
pub fn bilinear_scores(a: &Tensor, g: &Tensor, m: &Tensor) -> Tensor {
    let (d_out, d_in) = (g.size()[2], a.size()[2]);
    let m = m.to_kind(a.kind());
    let per_token = if d_out <= d_in {
        a.matmul(&m.tr()) * g
    } else {
        g.matmul(&m) * a
    };
    per_token
        .to_kind(Kind::Double)
        .sum_dim_intlist([1i64, 2].as_slice(), false, Kind::Double)
}

/// How ||sum_t g_t a_t^T||_F^2 is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NormMethod {
    /// sum_{t,t'} (g_t . g_t')(a_t . a_t'): two n x n Gram matrices, no d_out x d_in matrix.
    Gram,
    /// Form sum_t g_t a_t^T and take its Frobenius norm.
    Direct,
    /// The cheaper of the two for the shapes (Gram costs n^2 (d_in + d_out), direct n d_in d_out).
    Auto,
}

/// ||sum_t g_t a_t^T||_F^2 for the tokens of one document: a [n, d_in], g [n, d_out].
pub fn gradient_sq_norm(a: &Tensor, g: &Tensor, method: NormMethod) -> f64 {
    let (n, d_in, d_out) = (a.size()[0], a.size()[1], g.size()[1]);
    let gram = match method {
        NormMethod::Gram => true,
        NormMethod::Direct => false,
        NormMethod::Auto => n * (d_in + d_out) < d_in * d_out,
    };
    let a = a.to_kind(Kind::Double);
    let g = g.to_kind(Kind::Double);
    if gram {
        (g.mm(&g.tr()) * a.mm(&a.tr()))
            .sum(Kind::Double)
            .double_value(&[])
    } else {
        g.tr().mm(&a).square().sum(Kind::Double).double_value(&[])
    }
}

/// The per-document weight gradient sum_t g_t a_t^T ([d_out, d_in]); used for the reference
/// gradient and by the tests, never per scored document.
pub fn token_gradient(a: &Tensor, g: &Tensor) -> Tensor {
    let d_in = a.size()[a.dim() - 1];
    let d_out = g.size()[g.dim() - 1];
    g.reshape([-1, d_out]).tr().mm(&a.reshape([-1, d_in]))
}

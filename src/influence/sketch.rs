//! Kronecker gradient sketches (DESIGN 1.3, the paper's Johnson-Lindenstrauss step): with
//! seeded Gaussian P_g [d_out, s] and P_a [d_in, s] (entries N(0, 1/s)), a layer's gradient
//! sum_t g_t a_t^T is sketched as P_g^T (sum_t g_t a_t^T) P_a = sum_t (P_g^T g_t)(P_a^T a_t)^T,
//! an s x s matrix computed from the captured tokens without the full gradient.
//! E[<S(X), S(Y)>] = <X, Y>, so sketches stored once can be scored later against the sketch of
//! any preconditioned reference gradient.
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::{Device, Kind, Tensor};

/// The projections of every tracked linear layer.
pub struct KroneckerSketch {
    side: i64,
    p_g: Vec<Tensor>,
    p_a: Vec<Tensor>,
}

impl KroneckerSketch {
    /// `shapes[l] = (d_out, d_in)` of tracked linear l; `side` is s (each layer's sketch has
    /// s^2 entries). The matrices depend only on the seed, the layer index and the shapes.
    pub fn new(shapes: &[(i64, i64)], side: i64, seed: u64, device: Device, kind: Kind) -> Self {
        let mut p_g = Vec::with_capacity(shapes.len());
        let mut p_a = Vec::with_capacity(shapes.len());
        for (l, &(d_out, d_in)) in shapes.iter().enumerate() {
            let mut rng = ChaCha8Rng::seed_from_u64(seed ^ (0x5eed_0000 + l as u64));
            p_g.push(
                gaussian(&mut rng, d_out, side)
                    .to_device(device)
                    .to_kind(kind),
            );
            p_a.push(
                gaussian(&mut rng, d_in, side)
                    .to_device(device)
                    .to_kind(kind),
            );
        }
        KroneckerSketch { side, p_g, p_a }
    }

    pub fn side(&self) -> i64 {
        self.side
    }

    /// Length of a document's sketch: s^2 per layer.
    pub fn len(&self) -> usize {
        self.p_g.len() * (self.side * self.side) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.p_g.is_empty()
    }

    /// sum_t (P_g^T g_t)(P_a^T a_t)^T for tokens a [n, d_in], g [n, d_out] of layer l: [s, s].
    pub fn sketch_tokens(&self, layer: usize, a: &Tensor, g: &Tensor) -> Tensor {
        let pg = g.to_kind(self.p_g[layer].kind()).mm(&self.p_g[layer]);
        let pa = a.to_kind(self.p_a[layer].kind()).mm(&self.p_a[layer]);
        pg.tr().mm(&pa)
    }

    /// P_g^T X P_a of a full [d_out, d_in] matrix of layer l (e.g. a preconditioned reference
    /// gradient), so it can be dotted with the documents' sketches.
    pub fn sketch_matrix(&self, layer: usize, x: &Tensor) -> Tensor {
        let x = x.to_kind(self.p_g[layer].kind());
        self.p_g[layer].tr().mm(&x).mm(&self.p_a[layer])
    }
}

/// A [rows, cols] matrix of N(0, 1/cols) entries (Box-Muller on a seeded ChaCha stream, so the
/// sketch is the same on every device and platform).
fn gaussian(rng: &mut ChaCha8Rng, rows: i64, cols: i64) -> Tensor {
    let n = (rows * cols) as usize;
    let scale = 1.0 / (cols as f64).sqrt();
    let mut values = Vec::with_capacity(n + 1);
    while values.len() < n {
        let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
        let u2: f64 = rng.random::<f64>();
        let r = (-2.0 * u1.ln()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u2;
        values.push(r * theta.cos() * scale);
        values.push(r * theta.sin() * scale);
    }
    values.truncate(n);
    Tensor::from_slice(&values).reshape([rows, cols])
}

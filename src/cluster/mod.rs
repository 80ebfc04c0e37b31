//! Spherical k-means on unit vectors (DESIGN 1.1): the initial fit on a reservoir sample, the
//! streaming assignment with Sculley mini-batch updates, and the Kneedle knee for choosing k.
//!
//! Determinism: every nearest-centroid search runs as a matrix product (tch, on any device) to
//! find candidates, and the winner's cosine is then recomputed with a fixed-order f64 dot
//! product; rows whose two best candidates are closer than [`NEAR_TIE`] are decided entirely
//! by the exact dot products (ties to the lowest cluster id). So labels and cosines do not
//! depend on the BLAS, the thread count or the device.
//!
//! `assign` is the assign stage of a job (the initial fit on the first documents, then the
//! streaming assignment, its state committed with each epoch); `operator` runs it in the
//! dataflow, on worker 0, epoch by epoch in order.
use serde::{Deserialize, Serialize};
use tch::{Device, Tensor};

pub mod assign;
mod config;
mod kmeans;
mod knee;
pub mod operator;
mod reservoir;
pub mod semdedup;
mod stream;

pub use config::{ClusterConfig, TuneKConfig};
pub use kmeans::{fit_spherical_kmeans, lloyd_step, seed_plus_plus};
pub use knee::knee_kneedle;
pub use reservoir::Reservoir;
pub use stream::{Assignment, StreamConfig, StreamingClusterer};

pub use crate::error::ClusterError;

/// Two candidate cosines closer than this (in the f32 matrix product) are re-decided with exact
/// f64 dot products. f32 products of unit vectors of width <= 4096 err by far less.
pub const NEAR_TIE: f32 = 1e-4;

/// Below this many multiply-adds per Lloyd iteration (n * k * d), linfa is fast enough.
pub const LINFA_MAX_WORK: f64 = 2.0e9;

/// Which implementation runs the Lloyd iterations.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KMeansBackend {
    /// linfa-clustering's KMeans, one Lloyd step per call on precomputed, re-normalised
    /// centroids (CPU, ndarray, no BLAS).
    Linfa,
    /// Matrix products in tch (CPU through libtorch's BLAS, or CUDA), same code on every device.
    Tch(Device),
}

impl KMeansBackend {
    /// Picks the backend for n points of width d and k clusters, and says why: tch on CUDA
    /// when a GPU is present; linfa when one iteration is under [`LINFA_MAX_WORK`]
    /// multiply-adds (it then takes well under a second a step); tch on the CPU otherwise.
    pub fn choose(n: usize, k: usize, d: usize) -> (KMeansBackend, String) {
        let work = n as f64 * k as f64 * d as f64;
        if tch::Cuda::is_available() {
            return (
                KMeansBackend::Tch(Device::Cuda(0)),
                "a CUDA device is available".to_string(),
            );
        }
        if work <= LINFA_MAX_WORK {
            (
                KMeansBackend::Linfa,
                format!("n*k*d = {work:.2e} <= {LINFA_MAX_WORK:.0e}: linfa is fast enough"),
            )
        } else {
            (
                KMeansBackend::Tch(Device::Cpu),
                format!(
                    "n*k*d = {work:.2e} > {LINFA_MAX_WORK:.0e}: tch matrix products on the CPU"
                ),
            )
        }
    }

    /// Parses `auto`, `linfa`, `tch` (tch on CUDA when available) or `tch-cpu`.
    pub fn from_setting(
        setting: &str,
        n: usize,
        k: usize,
        d: usize,
    ) -> Result<(KMeansBackend, String), ClusterError> {
        match setting {
            "auto" => Ok(KMeansBackend::choose(n, k, d)),
            "linfa" => Ok((KMeansBackend::Linfa, "set in the job spec".into())),
            "tch" => Ok((
                KMeansBackend::Tch(Device::cuda_if_available()),
                "set in the job spec".into(),
            )),
            "tch-cpu" => Ok((
                KMeansBackend::Tch(Device::Cpu),
                "set in the job spec".into(),
            )),
            other => Err(ClusterError::Invalid(format!(
                "cluster backend must be auto, linfa, tch or tch-cpu, got {other:?}"
            ))),
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            KMeansBackend::Linfa => "linfa",
            KMeansBackend::Tch(Device::Cpu) => "tch-cpu",
            KMeansBackend::Tch(_) => "tch-cuda",
        }
    }
}

/// What a k-means fit runs with.
#[derive(Debug, Clone)]
pub struct KMeansConfig {
    pub k: usize,
    pub max_iter: usize,
    /// Stop when no centroid moved by more than this (squared Euclidean distance).
    pub tol: f64,
    /// Seeds the k-means++ choice of initial centroids.
    pub seed: u64,
    pub backend: KMeansBackend,
}

/// The result of a fit.
#[derive(Debug, Clone)]
pub struct KMeansFit {
    pub centroids: Centroids,
    /// The nearest centroid of each input row under the final centroids.
    pub labels: Vec<u32>,
    /// Within-cluster sum of squares: sum over rows of ||x - c||^2 with c the row's unit
    /// centroid, i.e. 2 * sum (1 - cosine).
    pub wcss: f64,
    /// Lloyd steps run.
    pub iterations: usize,
    pub backend_used: &'static str,
}

/// Unit-norm centroids (row-major k x dim) with the number of documents each has absorbed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Centroids {
    pub dim: usize,
    pub data: Vec<f32>,
    pub counts: Vec<u64>,
}

impl Centroids {
    pub fn k(&self) -> usize {
        self.counts.len()
    }

    pub fn row(&self, c: usize) -> &[f32] {
        &self.data[c * self.dim..(c + 1) * self.dim]
    }
}

/// Fixed-order dot product in f64: the same bits on every machine and thread count.
pub fn dot_exact(a: &[f32], b: &[f32]) -> f64 {
    let mut s = 0.0f64;
    for (x, y) in a.iter().zip(b) {
        s += f64::from(*x) * f64::from(*y);
    }
    s
}

/// Scales `v` to unit length in place (computed in f64); a zero vector stays zero.
pub fn normalize(v: &mut [f32]) {
    let norm = dot_exact(v, v).sqrt();
    if norm > 0.0 {
        for x in v.iter_mut() {
            *x = (f64::from(*x) / norm) as f32;
        }
    }
}

/// Checks that `x` holds whole rows of width `dim`, finite values and unit norm (to 1e-3).
pub fn check_rows(x: &[f32], dim: usize) -> Result<usize, ClusterError> {
    if dim == 0 || x.len() % dim != 0 {
        return Err(ClusterError::Invalid(format!(
            "{} values do not make rows of width {dim}",
            x.len()
        )));
    }
    for (i, row) in x.chunks_exact(dim).enumerate() {
        let n2 = dot_exact(row, row);
        if !n2.is_finite() || (n2.sqrt() - 1.0).abs() > 1e-3 {
            return Err(ClusterError::Invalid(format!(
                "row {i} is not a unit vector (norm {:.6})",
                n2.sqrt()
            )));
        }
    }
    Ok(x.len() / dim)
}

/// Rows per matrix product: the score block (rows x k) stays under 16M floats.
fn block_rows(k: usize) -> usize {
    (16 * 1024 * 1024 / k.max(1)).clamp(1, 8192)
}

/// Uploads the centroids once per search.
fn centroid_tensor(centroids: &[f32], dim: usize, device: Device) -> Tensor {
    let k = (centroids.len() / dim) as i64;
    Tensor::from_slice(centroids)
        .view([k, dim as i64])
        .to_device(device)
}

/// Nearest centroid (by cosine) of every row of `x`, with its exact cosine; see the module
/// docs for why the result does not depend on the device or thread count.
pub fn nearest_rows(x: &[f32], dim: usize, centroids: &[f32], device: Device) -> Vec<(u32, f32)> {
    let k = centroids.len() / dim;
    let n = x.len() / dim;
    let mut out = Vec::with_capacity(n);
    if k == 0 {
        return out;
    }
    let _guard = tch::no_grad_guard();
    let c = centroid_tensor(centroids, dim, device);
    let ct = c.tr();
    for block in x.chunks(block_rows(k) * dim) {
        let b = block.len() / dim;
        let xs = Tensor::from_slice(block)
            .view([b as i64, dim as i64])
            .to_device(device);
        let mut scores = xs.matmul(&ct);
        // Best and second-best score per row: max, blank the best, max again (cheaper than
        // topk on the CPU).
        let (v1, i1) = scores.max_dim(1, false);
        let v2 = if k > 1 {
            let _ = scores.scatter_value_(1, &i1.unsqueeze(1), f64::NEG_INFINITY);
            scores.max_dim(1, false).0
        } else {
            v1.full_like(f64::NEG_INFINITY)
        };
        let host_f32 = |t: Tensor| {
            Vec::<f32>::try_from(t.to_device(Device::Cpu).contiguous().view([-1]))
                .unwrap_or_default()
        };
        let (v1, v2) = (host_f32(v1), host_f32(v2));
        let idx = Vec::<i64>::try_from(i1.to_device(Device::Cpu).contiguous().view([-1]))
            .unwrap_or_default();
        for r in 0..b {
            let row = &block[r * dim..(r + 1) * dim];
            let best = idx[r] as usize;
            let winner = if v1[r] - v2[r] > NEAR_TIE {
                best
            } else {
                // Near-tie: the best and every candidate within 2 NEAR_TIE of it are
                // re-scored exactly (the best's own score was blanked above).
                let srow = host_f32(scores.get(r as i64));
                let floor = v1[r] - 2.0 * NEAR_TIE;
                let mut win = best;
                let mut win_dot = f64::NEG_INFINITY;
                for (j, s) in srow.iter().enumerate() {
                    if *s >= floor || j == best {
                        let d = dot_exact(row, &centroids[j * dim..(j + 1) * dim]);
                        if d > win_dot {
                            win = j;
                            win_dot = d;
                        }
                    }
                }
                win
            };
            let cos = dot_exact(row, &centroids[winner * dim..(winner + 1) * dim]);
            out.push((winner as u32, cos as f32));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_ties_go_to_the_lowest_id() {
        // Two identical centroids: the exact re-check must pick id 0, whatever the BLAS says.
        let c = vec![1.0, 0.0, 1.0, 0.0, 0.0, 1.0];
        let x = vec![1.0, 0.0, 0.6, 0.8];
        let got = nearest_rows(&x, 2, &c, Device::Cpu);
        assert_eq!(got[0].0, 0);
        assert_eq!(got[1].0, 2);
        assert!((got[1].1 - 0.8).abs() < 1e-7);
    }

    #[test]
    fn choose_says_why() {
        let (b, why) = KMeansBackend::choose(1000, 10, 384);
        if !tch::Cuda::is_available() {
            assert_eq!(b, KMeansBackend::Linfa);
            let (b, _) = KMeansBackend::choose(100_000, 1000, 384);
            assert_eq!(b, KMeansBackend::Tch(Device::Cpu));
        }
        assert!(!why.is_empty());
    }
}

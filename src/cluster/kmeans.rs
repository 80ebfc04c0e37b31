//! Batch spherical k-means: seeded k-means++ seeding, then Lloyd steps on unit centroids by
//! linfa or by tch matrix products. Both backends share the seeding, the final assignment and
//! the WCSS, so they differ only in how a Lloyd step is computed.
use std::time::Instant;

use linfa::prelude::*;
use linfa::DatasetBase;
use linfa_clustering::{KMeans, KMeansInit};
use ndarray::{Array2, ArrayView2};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::Device;

use super::{
    check_rows, nearest_rows, normalize, Centroids, ClusterError, KMeansBackend, KMeansConfig,
    KMeansFit,
};

/// Fixed-order f32 dot product with eight lanes (vectorises, same bits everywhere).
fn dot8(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for l in 0..8 {
            acc[l] += x[l] * y[l];
        }
    }
    let mut s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (x, y) in ra.iter().zip(rb) {
        s += x * y;
    }
    s
}

/// Lowers `dist[i]` to `1 - cos(x_i, c)` where that is smaller, on all cores. Each row's value
/// is computed by the same code whatever the split, so the result does not depend on threads.
fn lower_distances(x: &[f32], dim: usize, c: &[f32], dist: &mut [f32]) {
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let rows_per = dist.len().div_ceil(threads).max(1024);
    std::thread::scope(|s| {
        for (chunk, xs) in dist.chunks_mut(rows_per).zip(x.chunks(rows_per * dim)) {
            s.spawn(move || {
                for (d, row) in chunk.iter_mut().zip(xs.chunks_exact(dim)) {
                    let v = (1.0 - dot8(row, c)).max(0.0);
                    if v < *d {
                        *d = v;
                    }
                }
            });
        }
    });
}

/// k-means++ seeding for cosine distance (Arthur & Vassilvitskii 2007): the first centroid is a
/// uniformly chosen row, each next one a row drawn with probability proportional to its
/// distance `1 - cos` to the nearest chosen centroid. Seeded ChaCha8; rows of `x` must be unit.
pub fn seed_plus_plus(x: &[f32], dim: usize, k: usize, seed: u64) -> Vec<f32> {
    let n = x.len() / dim;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut centroids = Vec::with_capacity(k * dim);
    let mut dist = vec![f32::INFINITY; n];
    let mut next = rng.random_range(0..n);
    for i in 0..k {
        let c = &x[next * dim..(next + 1) * dim];
        centroids.extend_from_slice(c);
        if i + 1 == k {
            break;
        }
        lower_distances(x, dim, c, &mut dist);
        let total: f64 = dist.iter().map(|&d| f64::from(d)).sum();
        if total <= 0.0 {
            // Fewer distinct rows than k: repeat uniformly drawn rows.
            next = rng.random_range(0..n);
            continue;
        }
        let target = rng.random::<f64>() * total;
        let mut acc = 0.0f64;
        next = n - 1;
        for (i, &d) in dist.iter().enumerate() {
            acc += f64::from(d);
            if acc > target && d > 0.0 {
                next = i;
                break;
            }
        }
    }
    centroids
}

/// Largest squared move of a centroid.
fn max_shift(old: &[f32], new: &[f32], dim: usize) -> f64 {
    old.chunks_exact(dim)
        .zip(new.chunks_exact(dim))
        .map(|(a, b)| {
            a.iter()
                .zip(b)
                .map(|(x, y)| f64::from(x - y).powi(2))
                .sum::<f64>()
        })
        .fold(0.0, f64::max)
}

/// The spherical update: each centroid becomes its members' normalised sum (f64, in row
/// order). An empty cluster takes the row farthest from its own centroid (lowest cosine, ties
/// to the lowest row), each such row used once.
fn spherical_update(x: &[f32], dim: usize, k: usize, near: &[(u32, f32)]) -> Vec<f32> {
    let mut sums = vec![0.0f64; k * dim];
    let mut counts = vec![0u64; k];
    for (row, &(c, _)) in x.chunks_exact(dim).zip(near) {
        let c = c as usize;
        counts[c] += 1;
        for (s, v) in sums[c * dim..(c + 1) * dim].iter_mut().zip(row) {
            *s += f64::from(*v);
        }
    }
    let mut farthest: Vec<usize> = Vec::new();
    if counts.contains(&0) {
        farthest = (0..near.len()).collect();
        farthest.sort_by(|&a, &b| near[a].1.total_cmp(&near[b].1).then(a.cmp(&b)));
    }
    let mut spare = farthest.into_iter();
    let mut out = vec![0.0f32; k * dim];
    for c in 0..k {
        let dst = &mut out[c * dim..(c + 1) * dim];
        if counts[c] == 0 {
            if let Some(r) = spare.next() {
                dst.copy_from_slice(&x[r * dim..(r + 1) * dim]);
            }
        } else {
            for (o, s) in dst.iter_mut().zip(&sums[c * dim..(c + 1) * dim]) {
                *o = *s as f32;
            }
            normalize(dst);
        }
    }
    out
}

/// One Lloyd step by linfa: linfa assigns by Euclidean distance, which on unit rows and unit
/// centroids is the cosine order (|x - c|^2 = 2 - 2 cos), and returns its "m_k-means" mean
/// (members plus the old centroid); re-normalising that mean makes the step spherical.
fn linfa_step(
    data: &LinfaData<'_>,
    centroids: &[f32],
    dim: usize,
) -> Result<Vec<f32>, ClusterError> {
    let k = centroids.len() / dim;
    let init = Array2::from_shape_vec((k, dim), centroids.to_vec())
        .map_err(|e| ClusterError::Linfa(e.to_string()))?;
    let model = KMeans::params(k)
        .n_runs(1)
        .max_n_iterations(1)
        .tolerance(f32::MIN_POSITIVE)
        .init_method(KMeansInit::Precomputed(init))
        .fit(data)
        .map_err(|e| ClusterError::Linfa(e.to_string()))?;
    let mut out: Vec<f32> = model.centroids().iter().copied().collect();
    for row in out.chunks_exact_mut(dim) {
        normalize(row);
    }
    Ok(out)
}

type LinfaData<'a> = DatasetBase<ArrayView2<'a, f32>, ndarray::Array1<()>>;

fn linfa_data<'a>(
    x: &'a [f32],
    n: usize,
    dim: usize,
    backend: &KMeansBackend,
) -> Result<Option<LinfaData<'a>>, ClusterError> {
    match backend {
        KMeansBackend::Linfa => Ok(Some(DatasetBase::from(
            ArrayView2::from_shape((n, dim), x).map_err(|e| ClusterError::Linfa(e.to_string()))?,
        ))),
        KMeansBackend::Tch(_) => Ok(None),
    }
}

fn step(
    x: &[f32],
    dim: usize,
    centroids: &[f32],
    backend: &KMeansBackend,
    data: Option<&LinfaData<'_>>,
) -> Result<Vec<f32>, ClusterError> {
    match (backend, data) {
        (KMeansBackend::Tch(device), _) => {
            let near = nearest_rows(x, dim, centroids, *device);
            Ok(spherical_update(x, dim, centroids.len() / dim, &near))
        }
        (KMeansBackend::Linfa, Some(data)) => linfa_step(data, centroids, dim),
        (KMeansBackend::Linfa, None) => {
            let n = x.len() / dim;
            let data = linfa_data(x, n, dim, backend)?;
            step(x, dim, centroids, backend, data.as_ref())
        }
    }
}

/// One Lloyd step (assign, then re-normalised means) of the unit rows of `x` from `centroids`
/// on `backend`; what a fit repeats. Public for benchmarks.
pub fn lloyd_step(
    x: &[f32],
    dim: usize,
    centroids: &[f32],
    backend: &KMeansBackend,
) -> Result<Vec<f32>, ClusterError> {
    step(x, dim, centroids, backend, None)
}

/// Spherical k-means of the unit rows of `x` (row-major, width `dim`): k-means++ seeding from
/// `cfg.seed`, then Lloyd steps on `cfg.backend` until no centroid moves by more than `cfg.tol`
/// (squared) or `cfg.max_iter` steps. Same seed and rows give the same result bit for bit.
pub fn fit_spherical_kmeans(
    x: &[f32],
    dim: usize,
    cfg: &KMeansConfig,
) -> Result<KMeansFit, ClusterError> {
    let n = check_rows(x, dim)?;
    if cfg.k == 0 || cfg.k > n {
        return Err(ClusterError::Invalid(format!(
            "k = {} must be between 1 and the number of rows ({n})",
            cfg.k
        )));
    }
    let start = Instant::now();
    let mut centroids = seed_plus_plus(x, dim, cfg.k, cfg.seed);
    let seeded = start.elapsed().as_secs_f64();
    let data = linfa_data(x, n, dim, &cfg.backend)?;
    let mut iterations = 0;
    while iterations < cfg.max_iter {
        let next = step(x, dim, &centroids, &cfg.backend, data.as_ref())?;
        iterations += 1;
        let shift = max_shift(&centroids, &next, dim);
        centroids = next;
        tracing::debug!(iteration = iterations, shift, "k-means step");
        if shift <= cfg.tol {
            break;
        }
    }
    let device = match cfg.backend {
        KMeansBackend::Tch(device) => device,
        KMeansBackend::Linfa => Device::Cpu,
    };
    let near = nearest_rows(x, dim, &centroids, device);
    let mut counts = vec![0u64; cfg.k];
    let mut wcss = 0.0f64;
    for &(c, cos) in &near {
        counts[c as usize] += 1;
        wcss += 2.0 * (1.0 - f64::from(cos));
    }
    let fit = KMeansFit {
        centroids: Centroids {
            dim,
            data: centroids,
            counts,
        },
        labels: near.iter().map(|&(c, _)| c).collect(),
        wcss: wcss.max(0.0),
        iterations,
        backend_used: cfg.backend.name(),
    };
    tracing::info!(
        backend = fit.backend_used,
        n,
        k = cfg.k,
        dim,
        iterations,
        wcss = fit.wcss,
        seeding_s = seeded,
        seconds = start.elapsed().as_secs_f64(),
        "spherical k-means fitted"
    );
    Ok(fit)
}

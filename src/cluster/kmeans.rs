//! Batch spherical k-means: seeded k-means++ seeding, then Lloyd steps on unit centroids by
//! linfa or by tch matrix products. Both backends share the seeding, the final assignment and
//! the WCSS, so they differ only in how a Lloyd step is computed.
use std::time::Instant;

use half::{f16, slice::HalfFloatSliceExt};
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

/// Candidates per lane group of the seeding kernel: one group is two SSE or one AVX register.
const LANES: usize = 8;
/// Rows the seeding kernel scores at once, so each candidate load serves several rows and
/// the ROW_BLOCK independent accumulators (one AVX register each) hide the add latency.
const ROW_BLOCK: usize = 8;

/// The candidates transposed into groups of `LANES`: group g holds, for every coordinate i,
/// the i-th coordinate of candidates g*LANES.. (zero-padded), so the kernel multiplies one
/// broadcast row coordinate by a whole lane group.
fn lane_groups(cands: &[&[f32]], dim: usize) -> Vec<Vec<[f32; LANES]>> {
    cands
        .chunks(LANES)
        .map(|group| {
            (0..dim)
                .map(|i| {
                    let mut lane = [0.0f32; LANES];
                    for (l, c) in group.iter().enumerate() {
                        lane[l] = c[i];
                    }
                    lane
                })
                .collect()
        })
        .collect()
}

/// Dot products of up to `ROW_BLOCK` rows (row-major in `tile`) with one lane group. Each
/// product is summed over the coordinates in order in f32 with separate multiplies and adds
/// (Rust never fuses them), so its bits do not depend on how rows are blocked, on threads, or
/// on the instruction set the kernel was compiled for.
#[inline(always)]
fn block_dots_portable(tile: &[f32], group: &[[f32; LANES]]) -> [[f32; LANES]; ROW_BLOCK] {
    let mut acc = [[0.0f32; LANES]; ROW_BLOCK];
    let dim = group.len();
    if tile.len() == ROW_BLOCK * dim {
        let rows: [&[f32]; ROW_BLOCK] = std::array::from_fn(|r| &tile[r * dim..(r + 1) * dim]);
        for (i, c) in group.iter().enumerate() {
            for (a, row) in acc.iter_mut().zip(rows) {
                let x = row[i];
                for l in 0..LANES {
                    a[l] += x * c[l];
                }
            }
        }
    } else {
        for (a, row) in acc.iter_mut().zip(tile.chunks_exact(dim)) {
            for (x, c) in row.iter().zip(group) {
                for l in 0..LANES {
                    a[l] += x * c[l];
                }
            }
        }
    }
    acc
}

/// The same kernel compiled for AVX: eight lanes fit one register, so the rows' accumulators
/// stay in registers (SSE spills them).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx")]
fn block_dots_avx(tile: &[f32], group: &[[f32; LANES]]) -> [[f32; LANES]; ROW_BLOCK] {
    block_dots_portable(tile, group)
}

fn block_dots(tile: &[f32], group: &[[f32; LANES]]) -> [[f32; LANES]; ROW_BLOCK] {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        // SAFETY: the CPU has AVX, checked just above.
        return unsafe { block_dots_avx(tile, group) };
    }
    block_dots_portable(tile, group)
}

/// Half-precision rows to f32 (exact on every path), eight at a time with F16C where the CPU
/// has it: a per-element software conversion would cost as much as the dot products.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx,f16c")]
fn widen_f16c(src: &[f16], dst: &mut [f32]) {
    use std::arch::x86_64::{
        __m128i, _mm256_cvtph_ps, _mm256_storeu_ps, _mm_loadu_si128, _mm_prefetch, _MM_HINT_T0,
    };
    let whole = src.len() / 8 * 8;
    for (s, d) in src[..whole]
        .chunks_exact(8)
        .zip(dst[..whole].chunks_exact_mut(8))
    {
        // SAFETY: s holds 8 f16 (16 bytes) and d 8 f32; both unaligned accesses are allowed.
        // A prefetch never faults, so one past the rows' end is harmless.
        unsafe {
            _mm_prefetch::<_MM_HINT_T0>(s.as_ptr().wrapping_add(PREFETCH_HALVES).cast::<i8>());
            let h = _mm_loadu_si128(s.as_ptr().cast::<__m128i>());
            _mm256_storeu_ps(d.as_mut_ptr(), _mm256_cvtph_ps(h));
        }
    }
    for (s, d) in src[whole..].iter().zip(&mut dst[whole..]) {
        *d = s.to_f32();
    }
}

/// How far ahead of the widening the rows are fetched (in halves): the seeding's DRAM stream
/// is what bounds it on large n.
const PREFETCH_HALVES: usize = 4096;

fn widen(src: &[f16], dst: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") && std::arch::is_x86_feature_detected!("f16c") {
        // SAFETY: the CPU has AVX and F16C, checked just above.
        return unsafe { widen_f16c(src, dst) };
    }
    for (s, d) in src.iter().zip(dst) {
        *d = s.to_f32();
    }
}

/// Rows per work unit of the seeding passes. Fixed (not derived from the thread count), and
/// partial sums are added in unit order, so the result does not depend on threads.
const SEED_CHUNK: usize = 1024;

/// For each candidate j, the potential sum_i min(dist_i, 1 - cos(x_i, cand_j)) (f64), and the
/// candidates' distances per row (row-major n x L), on all cores. The rows come in half
/// precision (see `seed_plus_plus`) and are widened a block at a time; the widening is exact.
fn candidate_potentials(
    x: &[f16],
    dim: usize,
    cands: &[&[f32]],
    dist: &[f32],
) -> (Vec<f64>, Vec<f32>) {
    let l = cands.len();
    let n = dist.len();
    let groups = lane_groups(cands, dim);
    let groups = &groups;
    let mut cand_dist = vec![0.0f32; n * l];
    let units = n.div_ceil(SEED_CHUNK);
    let mut partial = vec![0.0f64; units * l];
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let units_per = units.div_ceil(threads).max(1);
    std::thread::scope(|s| {
        for ((cd, part), (xs, ds)) in cand_dist
            .chunks_mut(units_per * SEED_CHUNK * l)
            .zip(partial.chunks_mut(units_per * l))
            .zip(
                x.chunks(units_per * SEED_CHUNK * dim)
                    .zip(dist.chunks(units_per * SEED_CHUNK)),
            )
        {
            s.spawn(move || {
                let mut tile = vec![0.0f32; ROW_BLOCK * dim];
                for (u, ((cd, xs), ds)) in cd
                    .chunks_mut(SEED_CHUNK * l)
                    .zip(xs.chunks(SEED_CHUNK * dim))
                    .zip(ds.chunks(SEED_CHUNK))
                    .enumerate()
                {
                    let sums = &mut part[u * l..(u + 1) * l];
                    for ((xb, db), ob) in xs
                        .chunks(ROW_BLOCK * dim)
                        .zip(ds.chunks(ROW_BLOCK))
                        .zip(cd.chunks_mut(ROW_BLOCK * l))
                    {
                        let tile = &mut tile[..xb.len()];
                        widen(xb, tile);
                        for (g, group) in groups.iter().enumerate() {
                            let dots = block_dots(tile, group);
                            for (r, (d, out)) in db.iter().zip(ob.chunks_exact_mut(l)).enumerate() {
                                let js = g * LANES..((g + 1) * LANES).min(l);
                                for j in js {
                                    let v = (1.0 - dots[r][j - g * LANES]).max(0.0).min(*d);
                                    out[j] = v;
                                    sums[j] += f64::from(v);
                                }
                            }
                        }
                    }
                }
            });
        }
    });
    let mut potentials = vec![0.0f64; l];
    for unit in partial.chunks_exact(l) {
        for (p, v) in potentials.iter_mut().zip(unit) {
            *p += v;
        }
    }
    (potentials, cand_dist)
}

/// Greedy k-means++ seeding for cosine distance (Arthur & Vassilvitskii 2007, with the local
/// trials of scikit-learn's implementation): the first centroid is a uniformly chosen row;
/// each next one is the best (lowest resulting potential sum_i min_c (1 - cos)) of
/// 2 + ln(k) rows drawn with probability proportional to their distance `1 - cos` to the
/// nearest chosen centroid. Plain k-means++ often puts two seeds into one of several well
/// separated clusters of high-dimensional data; the trials make that rare. Seeded ChaCha8;
/// rows of `x` must be unit. Same bits for any thread count and instruction set.
///
/// Each of the k steps streams all rows once, so on large n the seeding is bound by memory
/// bandwidth, not arithmetic: the distance passes therefore read a half-precision copy of the
/// rows (half the bytes; a coordinate's rounding error is under 5e-4 of it, so a distance
/// moves by about 1e-4, which only nudges the sampling weights). The centroids returned are
/// the chosen rows in full precision.
pub fn seed_plus_plus(x: &[f32], dim: usize, k: usize, seed: u64) -> Vec<f32> {
    let n = x.len() / dim;
    let mut half_rows = vec![f16::ZERO; x.len()];
    half_rows.convert_from_f32_slice(x);
    let trials = 2 + (k as f64).ln().floor() as usize;
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut centroids = Vec::with_capacity(k * dim);
    let first = rng.random_range(0..n);
    centroids.extend_from_slice(&x[first * dim..(first + 1) * dim]);
    let inf = vec![f32::INFINITY; n];
    let (_, mut dist) =
        candidate_potentials(&half_rows, dim, &[&x[first * dim..(first + 1) * dim]], &inf);
    while centroids.len() < k * dim {
        let total: f64 = dist.iter().map(|&d| f64::from(d)).sum();
        let picks: Vec<usize> = if total <= 0.0 {
            // Fewer distinct rows than k: repeat uniformly drawn rows.
            vec![rng.random_range(0..n)]
        } else {
            let mut targets: Vec<(f64, usize)> = (0..trials)
                .map(|t| (rng.random::<f64>() * total, t))
                .collect();
            targets.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let mut picks = vec![n - 1; trials];
            let mut acc = 0.0f64;
            let mut next = targets.iter().peekable();
            for (i, &d) in dist.iter().enumerate() {
                acc += f64::from(d);
                while let Some(&&(target, t)) = next.peek() {
                    if acc > target && d > 0.0 {
                        picks[t] = i;
                        next.next();
                    } else {
                        break;
                    }
                }
            }
            picks
        };
        let cands: Vec<&[f32]> = picks.iter().map(|&i| &x[i * dim..(i + 1) * dim]).collect();
        let (potentials, cand_dist) = candidate_potentials(&half_rows, dim, &cands, &dist);
        let mut best = 0;
        for (j, p) in potentials.iter().enumerate() {
            if *p < potentials[best] {
                best = j;
            }
        }
        centroids.extend_from_slice(cands[best]);
        let l = cands.len();
        for (d, row) in dist.iter_mut().zip(cand_dist.chunks_exact(l)) {
            *d = row[best];
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The dispatched seeding kernel (AVX where the CPU has it) gives the portable kernel's
    /// bits, for full and ragged row blocks and lane groups, and the products are dot
    /// products (within 1e-5 of f64 for unit-scale rows of width 67).
    #[test]
    fn seeding_kernel_is_exact_and_the_same_on_every_instruction_set() {
        let dim = 67;
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let rows: Vec<f32> = (0..11 * dim).map(|_| rng.random::<f32>() - 0.5).collect();
        let cands: Vec<Vec<f32>> = (0..11)
            .map(|_| (0..dim).map(|_| rng.random::<f32>() - 0.5).collect())
            .collect();
        let cand_refs: Vec<&[f32]> = cands.iter().map(|c| c.as_slice()).collect();
        let groups = lane_groups(&cand_refs, dim);
        assert_eq!(groups.len(), 2);
        let blocks: Vec<&[f32]> = rows.chunks(ROW_BLOCK * dim).collect();
        assert_eq!(blocks.len(), 2, "one full block and a ragged one");
        for block in blocks {
            for (g, group) in groups.iter().enumerate() {
                let fast = block_dots(block, group);
                let portable = block_dots_portable(block, group);
                for (r, row) in block.chunks_exact(dim).enumerate() {
                    for l in 0..LANES {
                        assert_eq!(fast[r][l].to_bits(), portable[r][l].to_bits());
                        let j = g * LANES + l;
                        let exact = cands.get(j).map_or(0.0, |c| {
                            row.iter()
                                .zip(c)
                                .map(|(a, b)| f64::from(*a) * f64::from(*b))
                                .sum::<f64>()
                        });
                        assert!((f64::from(fast[r][l]) - exact).abs() < 1e-5);
                    }
                }
            }
        }
    }

    /// Widening half-precision rows gives the software conversion's value for every one of
    /// the 65,536 bit patterns (NaNs stay NaN), on a length that leaves a ragged tail.
    #[test]
    fn widening_is_exact_for_every_half() {
        let src: Vec<f16> = (0..=u16::MAX)
            .map(f16::from_bits)
            .chain([f16::ONE; 5])
            .collect();
        let mut dst = vec![0.0f32; src.len()];
        widen(&src, &mut dst);
        for (s, d) in src.iter().zip(&dst) {
            let want = s.to_f32();
            assert!(
                want.to_bits() == d.to_bits() || (want.is_nan() && d.is_nan()),
                "{:#06x}: {want} vs {d}",
                s.to_bits()
            );
        }
    }
}

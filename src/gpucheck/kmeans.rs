//! Spherical k-means with the tch backend on the device: the whole fit (k-means++ seeding on
//! the CPU, Lloyd steps, final assignment), one Lloyd step, and the assignment's documents/s.
use std::time::Instant;

use super::figures::{Figure, StepRecorder};
use super::synthetic::{self, KmeansSize, Sizes, EMBED_DIM};
use super::{CheckOptions, GpuCheckError};
use crate::cluster::{fit_spherical_kmeans, lloyd_step, nearest_rows, KMeansBackend, KMeansConfig};

/// Stop when no centroid moves more than this (squared), as a job's default `cluster.tol`.
const TOLERANCE: f64 = 1e-6;

pub(super) fn fit(
    rec: &mut StepRecorder,
    opts: &CheckOptions,
    size: KmeansSize,
    sizes: &Sizes,
) -> Result<(), GpuCheckError> {
    let KmeansSize { rows, k } = size;
    let dim = EMBED_DIM;
    let shape = format!("{rows} x {dim}, k = {k}");
    rec.push(Figure::text("rows x width, clusters", &shape))?;
    let start = Instant::now();
    let x = synthetic::clustered_unit_rows(rows, dim, k, 5, opts.device)?;
    rec.push(Figure::number(
        "generating the rows",
        start.elapsed().as_secs_f64(),
        "s",
    ))?;
    let backend = KMeansBackend::Tch(opts.device);
    // A first product on the device, so that the fit's first step does not pay for starting
    // the BLAS library.
    let _ = nearest_rows(&x[..dim * 16], dim, &x[..dim * 4], opts.device);
    let cfg = KMeansConfig {
        k,
        max_iter: sizes.kmeans_max_iter,
        tol: TOLERANCE,
        seed: 7,
        backend,
    };
    let start = Instant::now();
    let fitted = fit_spherical_kmeans(&x, dim, &cfg)?;
    let whole = start.elapsed().as_secs_f64();
    let name = format!("whole fit ({}, seeding on the CPU)", backend.name());
    rec.push(Figure::number(name, whole, "s"))?;
    let name = format!("Lloyd steps run (at most {})", sizes.kmeans_max_iter);
    rec.push(Figure::number(name, fitted.iterations as f64, ""))?;
    rec.push(Figure::number(
        "WCSS per row",
        fitted.wcss / rows as f64,
        "",
    ))?;

    let centroids = &fitted.centroids.data;
    let start = Instant::now();
    lloyd_step(&x, dim, centroids, &backend)?;
    let step = start.elapsed().as_secs_f64();
    rec.push(Figure::number(
        "one Lloyd step (assignment + spherical update)",
        step,
        "s",
    ))?;
    let start = Instant::now();
    let assigned = nearest_rows(&x, dim, centroids, opts.device);
    let assign = start.elapsed().as_secs_f64();
    if assigned.len() != rows {
        return Err(GpuCheckError::Measurement(format!(
            "the assignment labelled {} of {rows} rows",
            assigned.len()
        )));
    }
    rec.push(Figure::number(
        "assignment (nearest centroid, exact cosine)",
        rows as f64 / assign,
        "docs/s",
    ))?;
    // The fit is seeding + its steps + one final assignment; what is left is the seeding.
    let seeding = (whole - fitted.iterations as f64 * step - assign).max(0.0);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    let name = format!("k-means++ seeding, CPU {threads} threads (fit minus steps and assignment)");
    rec.push(Figure::number(name, seeding, "s"))
}

//! Clustering speed: streaming assignment docs/s at d = 384 for k = 1,000 and 10,000, and the
//! spherical k-means fit of 100,000 x 384 at k = 1,000 (seeding, then whole fits by linfa
//! and by tch). Prints a table. `cargo bench --bench cluster`; QUAD_BENCH_QUICK=1 for a small
//! smoke run; QUAD_BENCH_MAX_ITER (the fits' step limit, default 20).
use std::time::Instant;

use quad::cluster::{
    fit_spherical_kmeans, lloyd_step, seed_plus_plus, Centroids, KMeansBackend, KMeansConfig,
    StreamConfig, StreamingClusterer,
};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use tch::Device;

const DIM: usize = 384;

/// `n` unit rows around `centres` random directions (noise 0.05 a coordinate): clustered like
/// real embeddings, so k-means steps do real work.
fn data(n: usize, centres: usize, seed: u64) -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut normal = move || {
        let u: f32 = rng.random::<f32>().max(1e-30);
        let v: f32 = rng.random();
        (-2.0 * u.ln()).sqrt() * (std::f32::consts::TAU * v).cos()
    };
    let dirs: Vec<f32> = (0..centres * DIM).map(|_| normal()).collect();
    let mut x = Vec::with_capacity(n * DIM);
    for i in 0..n {
        let c = &dirs[(i * 7919 % centres) * DIM..][..DIM];
        let mut row: Vec<f32> = c
            .iter()
            .map(|v| v / (DIM as f32).sqrt() + 0.05 * normal())
            .collect();
        quad::cluster::normalize(&mut row);
        x.extend_from_slice(&row);
    }
    x
}

fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let quick = std::env::var("QUAD_BENCH_QUICK").is_ok();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!("# clustering benchmark, d = {DIM}, {cores} cores visible, no GPU unless named");
    println!();
    println!("## Streaming assignment (nearest = matrix product + exact winner; assign = nearest + opening + Sculley update)");
    println!("| k | threads | docs | nearest docs/s | assign_batch docs/s | docs/s per thread (nearest) |");
    println!("|---:|---:|---:|---:|---:|---:|");
    for &k in &[1_000usize, 10_000] {
        let docs = if quick {
            2_000
        } else if k == 1_000 {
            40_000
        } else {
            8_000
        };
        let centroids = data(k, k, 1);
        let x = data(docs, 300, 2);
        for threads in [1, cores as i32] {
            tch::set_num_threads(threads);
            let init = Centroids {
                dim: DIM,
                data: centroids.clone(),
                counts: vec![10; k],
            };
            let cfg = StreamConfig {
                k_max: k,
                new_cluster_floor: -1.0,
                learning_rate_floor: 0.0,
            };
            let mut s = StreamingClusterer::new(init, cfg);
            let _ = s.nearest(&x[..256 * DIM]); // warm-up
            let t = Instant::now();
            let near = s.nearest(&x);
            let nearest_s = t.elapsed().as_secs_f64();
            assert_eq!(near.len(), docs);
            let t = Instant::now();
            for batch in x.chunks(4096 * DIM) {
                s.assign_batch(batch);
            }
            let assign_s = t.elapsed().as_secs_f64();
            println!(
                "| {k} | {threads} | {docs} | {:.0} | {:.0} | {:.0} |",
                docs as f64 / nearest_s,
                docs as f64 / assign_s,
                docs as f64 / nearest_s / threads as f64
            );
        }
    }
    tch::set_num_threads(cores as i32);

    let (n, k) = if quick {
        (5_000, 100)
    } else {
        (100_000, 1_000)
    };
    let max_iter = env("QUAD_BENCH_MAX_ITER", 20);
    println!();
    println!("## Spherical k-means fit, n = {n}, d = {DIM}, k = {k}, {cores} threads");
    let x = data(n, k, 3);
    let t = Instant::now();
    let seeds = seed_plus_plus(&x, DIM, k, 7);
    let seeding = t.elapsed().as_secs_f64();
    // The whole tch fit (seeding, Lloyd steps to convergence or max_iter, final assignment).
    let cfg = KMeansConfig {
        k,
        max_iter,
        tol: 1e-8,
        seed: 7,
        backend: KMeansBackend::Tch(Device::Cpu),
    };
    // Whole fits (seeding, Lloyd steps to convergence or max_iter, final assignment) on both
    // backends from the same seed.
    let t = Instant::now();
    let fit = fit_spherical_kmeans(&x, DIM, &cfg).expect("tch fit");
    let tch_fit = t.elapsed().as_secs_f64();
    let iters = fit.iterations;
    let tch_step = (tch_fit - seeding) / (iters + 1) as f64;
    let linfa_cfg = KMeansConfig {
        backend: KMeansBackend::Linfa,
        ..cfg.clone()
    };
    let t = Instant::now();
    let linfa = fit_spherical_kmeans(&x, DIM, &linfa_cfg).expect("linfa fit");
    let linfa_fit = t.elapsed().as_secs_f64();
    let linfa_iters = linfa.iterations;
    // linfa steps, then tch's final assignment (what the Linfa backend does).
    let linfa_step = (linfa_fit - seeding - tch_step) / linfa_iters.max(1) as f64;
    println!("| stage | backend | steps | seconds | WCSS per row |");
    println!("|---|---|---:|---:|---:|");
    println!("| greedy k-means++ seeding (shared) | rust, {cores} threads | | {seeding:.1} | |");
    println!(
        "| whole fit (measured) | tch-cpu | {iters} | {tch_fit:.1} | {:.4} |",
        fit.wcss / n as f64
    );
    println!(
        "| whole fit (measured) | linfa | {linfa_iters} | {linfa_fit:.1} | {:.4} |",
        linfa.wcss / n as f64
    );
    println!("| Lloyd step (fit minus seeding, per step) | tch-cpu | | {tch_step:.2} | |");
    println!("| Lloyd step (fit minus seeding, per step) | linfa | | {linfa_step:.2} | |");
    if tch::Cuda::is_available() {
        let cfg = KMeansConfig {
            backend: KMeansBackend::Tch(Device::Cuda(0)),
            ..cfg
        };
        let _ = lloyd_step(&x, DIM, &seeds, &cfg.backend).expect("warm-up");
        let t = Instant::now();
        let fit = fit_spherical_kmeans(&x, DIM, &cfg).expect("cuda fit");
        let s = t.elapsed().as_secs_f64();
        println!(
            "| whole fit (measured; seeding on the CPU) | tch-cuda | {} | {s:.1} | {:.4} |",
            fit.iterations,
            fit.wcss / n as f64
        );
    }
    println!();
    println!("WCSS per row is the mean |x - c|^2 = 2 - 2 cos to the row's centroid.");
    println!(
        "whole fit: tch-cpu is {:.1}x faster than linfa; per Lloyd step {:.1}x",
        linfa_fit / tch_fit,
        linfa_step / tch_step
    );
}

//! Tuning procedures of DESIGN 1.2 that do not need the LM: the sample ratio gamma and the
//! candidate thresholds of tau. The scorer is passed in as a closure, so the caller connects
//! the influence model.
use serde::{Deserialize, Serialize};

use super::MemberRef;
use crate::plot::line_chart;

/// One ratio of the gamma table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GammaRow {
    pub ratio: f64,
    /// Mean over the clusters of |sample mean - full mean| / |full mean|.
    pub mean_relative_error: f64,
    /// Clusters whose sample mean at this ratio is within the tolerance.
    pub clusters_within: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GammaTuning {
    pub rows: Vec<GammaRow>,
    /// Per cluster: the smallest ratio within the tolerance (`None`: none was).
    pub per_cluster: Vec<(u32, Option<f64>)>,
    /// The pick: the per-cluster smallest ratios averaged over the clusters that have one.
    pub gamma: Option<f64>,
}

/// For each cluster, scores every member once (the true mean influence), then for each ratio
/// (ascending, e.g. 0.01, 0.02, ...) draws a seeded sample of ceil(ratio * n) members and
/// compares its mean with the true one; the smallest ratio within `tolerance` (0.1 = 10%) is
/// the cluster's, and gamma is their average.
pub fn tune_gamma<E>(
    seed: u64,
    clusters: &[(u32, Vec<MemberRef>)],
    ratios: &[f64],
    tolerance: f64,
    mut score: impl FnMut(&[MemberRef]) -> Result<Vec<f64>, E>,
) -> Result<GammaTuning, E> {
    let mut errors = vec![Vec::new(); ratios.len()];
    let mut per_cluster = Vec::new();
    for (id, members) in clusters {
        let values = score(members)?;
        let n = values.len();
        if n == 0 {
            per_cluster.push((*id, None));
            continue;
        }
        let full = values.iter().sum::<f64>() / n as f64;
        let mut smallest = None;
        for (k, &ratio) in ratios.iter().enumerate() {
            let size = ((ratio * n as f64).ceil() as usize).clamp(1, n);
            let mut rng = super::draw::rng_for(seed, k as u64, *id, super::draw::Purpose::Sample);
            let picked = rand::seq::index::sample(&mut rng, n, size);
            let mean = picked.iter().map(|i| values[i]).sum::<f64>() / size as f64;
            let err = (mean - full).abs() / full.abs().max(f64::MIN_POSITIVE);
            errors[k].push(err);
            if smallest.is_none() && err <= tolerance {
                smallest = Some(ratio);
            }
        }
        per_cluster.push((*id, smallest));
    }
    let rows = ratios
        .iter()
        .zip(&errors)
        .map(|(&ratio, errs)| GammaRow {
            ratio,
            mean_relative_error: errs.iter().sum::<f64>() / errs.len().max(1) as f64,
            clusters_within: errs.iter().filter(|&&e| e <= tolerance).count(),
        })
        .collect();
    let found: Vec<f64> = per_cluster.iter().filter_map(|(_, r)| *r).collect();
    let gamma = (!found.is_empty()).then(|| found.iter().sum::<f64>() / found.len() as f64);
    Ok(GammaTuning {
        rows,
        per_cluster,
        gamma,
    })
}

impl GammaTuning {
    pub fn table(&self) -> String {
        let mut out = String::from("ratio    mean rel. error  clusters within\n");
        for r in &self.rows {
            out.push_str(&format!(
                "{:<8.3} {:<16.4} {}\n",
                r.ratio, r.mean_relative_error, r.clusters_within
            ));
        }
        match self.gamma {
            Some(g) => out.push_str(&format!("gamma = {g:.4}\n")),
            None => out.push_str("gamma: no ratio was within the tolerance\n"),
        }
        out
    }

    pub fn svg(&self) -> String {
        let pts = self
            .rows
            .iter()
            .map(|r| (r.ratio, r.mean_relative_error))
            .collect();
        let label = self.gamma.map(|g| format!("gamma = {g:.3}"));
        let markers: Vec<(f64, &str)> = self
            .gamma
            .iter()
            .zip(label.iter())
            .map(|(&g, l)| (g, l.as_str()))
            .collect();
        line_chart(
            "Sample mean vs cluster mean",
            "sample ratio",
            "relative error of the mean influence",
            &[("mean over clusters", pts)],
            &markers,
        )
    }
}

/// Candidate thresholds for tau (DESIGN 1.2): the scores sorted and cut into `buckets`
/// buckets of equal count; each bucket's lower edge is a candidate (ascending, distinct).
pub fn tau_candidates(scores: &[f64], buckets: usize) -> Vec<f64> {
    let mut sorted: Vec<f64> = scores.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() || buckets == 0 {
        return Vec::new();
    }
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    let mut out: Vec<f64> = (0..buckets.min(n))
        .map(|b| sorted[b * n / buckets.min(n)])
        .collect();
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bandit::DocLoc;

    fn members(id: u32, n: u64) -> Vec<MemberRef> {
        (0..n)
            .map(|row| MemberRef {
                cluster: id,
                loc: DocLoc {
                    shard: 0,
                    row_group: 0,
                    row,
                },
                tokens: 1,
            })
            .collect()
    }

    #[test]
    fn a_constant_cluster_needs_the_smallest_ratio_and_noise_needs_more() {
        let clusters = vec![(0, members(0, 1000)), (1, members(1, 1000))];
        let ratios: Vec<f64> = (1..=20).map(|k| k as f64 / 100.0).collect();
        let mut calls = 0;
        let t = tune_gamma(1, &clusters, &ratios, 0.1, |ms: &[MemberRef]| {
            calls += 1;
            Ok::<_, ()>(
                ms.iter()
                    .map(|m| {
                        if m.cluster == 0 {
                            2.0
                        } else {
                            1.0 + if m.loc.row % 2 == 0 { 3.0 } else { -3.0 }
                        }
                    })
                    .collect(),
            )
        })
        .unwrap();
        assert_eq!(calls, 2, "each cluster scored once");
        assert_eq!(t.per_cluster[0], (0, Some(0.01)));
        let noisy = t.per_cluster[1].1.unwrap();
        assert!(noisy > 0.01, "{noisy}");
        assert!((t.gamma.unwrap() - (0.01 + noisy) / 2.0).abs() < 1e-12);
        assert_eq!(t.rows.len(), 20);
        assert!(t.svg().contains("class=\"marker\""));
        assert!(t.table().contains("gamma = "));
    }

    #[test]
    fn tau_candidates_are_equal_count_lower_edges() {
        let scores: Vec<f64> = (0..100).rev().map(f64::from).collect();
        let c = tau_candidates(&scores, 20);
        assert_eq!(c.len(), 20);
        assert_eq!(c[0], 0.0);
        assert_eq!(c[1], 5.0);
        assert_eq!(c[19], 95.0);
        assert_eq!(tau_candidates(&[1.0, 1.0, 1.0], 20), vec![1.0]);
        assert!(tau_candidates(&[], 20).is_empty());
    }
}

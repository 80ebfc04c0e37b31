//! Arms of the bandit: one per cluster, with T (pulls, own or credited) and S (sum of rewards),
//! the UCB cluster score and reward sharing between nearby clusters (DESIGN 1.2).
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Arm {
    /// T_i: times pulled, or credited by a neighbour's pull.
    pub pulls: u64,
    /// S_i: sum of rewards (own and shared).
    pub reward_sum: f64,
    /// Times this cluster itself was pulled and scored (for reports; not in the score).
    pub own_pulls: u64,
}

impl Arm {
    /// CS_i = S_i/T_i + alpha * sqrt(2 ln(sum_j T_j) / T_i); `None` for an arm never pulled
    /// itself, which ranks before every tried one: credit from a neighbour does not count as a
    /// try, so every cluster is sampled at least once.
    pub fn score(&self, alpha: f64, total_pulls: u64) -> Option<f64> {
        if self.own_pulls == 0 || self.pulls == 0 {
            return None;
        }
        let t = self.pulls as f64;
        let bonus = if alpha == 0.0 {
            0.0
        } else {
            // total >= pulls >= 1, so ln >= 0.
            alpha * (2.0 * (total_pulls.max(1) as f64).ln() / t).sqrt()
        };
        Some(self.reward_sum / t + bonus)
    }
}

/// Cosine distance 1 - cos(a, b); 1 when either vector is zero.
pub fn cosine_distance(a: &[f32], b: &[f32]) -> f64 {
    let (mut dot, mut na, mut nb) = (0.0f64, 0.0f64, 0.0f64);
    for (&x, &y) in a.iter().zip(b) {
        let (x, y) = (f64::from(x), f64::from(y));
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        return 1.0;
    }
    1.0 - dot / (na.sqrt() * nb.sqrt())
}

/// The credit a neighbour at cosine distance `d` gets from reward `r`: r * (1 - d/rho) when
/// d < rho (strictly inside the radius), none otherwise. The pulled cluster itself (d = 0)
/// gets the full reward through its own update, not through this.
pub fn shared_reward(r: f64, d: f64, rho: f64) -> Option<f64> {
    (rho > 0.0 && d < rho).then(|| r * (1.0 - d / rho))
}

/// Orders clusters for pulling: untried first (by position), then by score descending, ties by
/// position (clusters are kept sorted by id, so by id).
pub fn rank(scores: &[Option<f64>]) -> Vec<usize> {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| match (scores[a], scores[b]) {
        (None, None) => a.cmp(&b),
        (None, Some(_)) => std::cmp::Ordering::Less,
        (Some(_), None) => std::cmp::Ordering::Greater,
        (Some(x), Some(y)) => y.total_cmp(&x).then(a.cmp(&b)),
    });
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ucb_matches_the_formula() {
        let arm = Arm {
            pulls: 4,
            reward_sum: 2.0,
            own_pulls: 4,
        };
        // 2/4 + 1.5 * sqrt(2 ln 10 / 4)
        let want = 0.5 + 1.5 * (2.0 * 10f64.ln() / 4.0).sqrt();
        assert!((arm.score(1.5, 10).unwrap() - want).abs() < 1e-12);
        assert_eq!(arm.score(0.0, 10), Some(0.5));
        assert_eq!(Arm::default().score(1.0, 10), None);
    }

    #[test]
    fn rank_puts_untried_first_then_score_then_id() {
        let order = rank(&[Some(0.5), None, Some(0.9), Some(0.5), None]);
        assert_eq!(order, vec![1, 4, 2, 0, 3]);
    }

    #[test]
    fn sharing_and_distance() {
        assert!((cosine_distance(&[1.0, 0.0], &[1.0, 0.0])).abs() < 1e-12);
        assert!((cosine_distance(&[1.0, 0.0], &[0.0, 2.0]) - 1.0).abs() < 1e-12);
        assert_eq!(shared_reward(2.0, 0.05, 0.2), Some(2.0 * 0.75));
        assert_eq!(shared_reward(2.0, 0.2, 0.2), None);
        assert_eq!(shared_reward(2.0, 0.0, 0.0), None);
    }
}

//! The scale of influence scores, learnt from the scores seen so far, so that rewards and the
//! threshold mean the same on any model. Raw influence ranges from about 1e1 to 1e4 with the
//! model and the normalisation, while the UCB bonus is about 1: with raw rewards `alpha` has
//! no fixed meaning. A reward is therefore the sample's mean influence in robust standard
//! units of the scores seen: (mean - median) / (1.4826 MAD), so `alpha` weighs exploration
//! against one robust standard deviation of a document's score, on any model.
//!
//! The scores are kept as a seeded reservoir sample of fixed size (Vitter's algorithm R, with
//! the replaced slot a hash of the seed and the score's position in the stream), so the state
//! is bounded whatever the number of rounds, and the same scores in the same order give the
//! same reservoir: the bandit observes rounds in order, so it does not depend on the number
//! of workers or on a restart.
use serde::{Deserialize, Serialize};

/// Scores kept: the median and the quantiles are those of this many of the scores seen.
pub const RESERVOIR: usize = 1024;

/// The MAD of a normal distribution is 0.6745 of its standard deviation.
const MAD_TO_SIGMA: f64 = 1.4826;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScoreScale {
    /// Finite scores seen.
    seen: u64,
    /// A uniform sample of them, at most `RESERVOIR`.
    kept: Vec<f64>,
}

/// A 64-bit mix of the seed and a position.
fn slot_hash(seed: u64, position: u64) -> u64 {
    crate::hash::mix(seed ^ position.wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

/// The q-quantile of sorted values (linear between neighbours); None when empty.
fn quantile_of_sorted(sorted: &[f64], q: f64) -> Option<f64> {
    let last = sorted.len().checked_sub(1)?;
    let at = q.clamp(0.0, 1.0) * last as f64;
    let (below, frac) = (at.floor() as usize, at.fract());
    let above = (below + 1).min(last);
    Some(sorted[below] + (sorted[above] - sorted[below]) * frac)
}

impl ScoreScale {
    /// Adds finite scores, in the order given (non-finite ones are no scores and are skipped).
    pub fn observe(&mut self, seed: u64, scores: impl IntoIterator<Item = f64>) {
        for score in scores.into_iter().filter(|s| s.is_finite()) {
            let position = self.seen;
            self.seen += 1;
            if self.kept.len() < RESERVOIR {
                self.kept.push(score);
                continue;
            }
            // Kept with probability RESERVOIR / seen, in a slot chosen uniformly.
            let slot = slot_hash(seed, position) % self.seen;
            if let Some(kept) = self.kept.get_mut(slot as usize) {
                *kept = score;
            }
        }
    }

    pub fn seen(&self) -> u64 {
        self.seen
    }

    fn sorted(&self) -> Vec<f64> {
        let mut sorted = self.kept.clone();
        sorted.sort_by(f64::total_cmp);
        sorted
    }

    /// The q-quantile of the scores seen (estimated from the reservoir); None before any.
    pub fn quantile(&self, q: f64) -> Option<f64> {
        quantile_of_sorted(&self.sorted(), q)
    }

    /// (median, robust standard deviation) of the scores seen: 1.4826 x the median absolute
    /// deviation, or, when more than half the scores are equal (MAD 0), the mean absolute
    /// deviation; None while there is no spread to measure by.
    pub fn location_and_spread(&self) -> Option<(f64, f64)> {
        let sorted = self.sorted();
        let median = quantile_of_sorted(&sorted, 0.5)?;
        let mut deviations: Vec<f64> = sorted.iter().map(|s| (s - median).abs()).collect();
        deviations.sort_by(f64::total_cmp);
        let mad = quantile_of_sorted(&deviations, 0.5)? * MAD_TO_SIGMA;
        let spread = if mad > 0.0 {
            mad
        } else {
            deviations.iter().sum::<f64>() / deviations.len() as f64
        };
        (spread > 0.0 && spread.is_finite()).then_some((median, spread))
    }

    /// `value` in robust standard units of the scores seen; 0 while they have no spread (no
    /// scale to measure by yet: every arm looks alike, and exploration decides).
    pub fn standardise(&self, value: f64) -> f64 {
        self.standardiser()(value)
    }

    /// `standardise` with the median and spread computed once, for many values.
    pub fn standardiser(&self) -> impl Fn(f64) -> f64 {
        let location = self.location_and_spread();
        move |value| match location {
            Some((median, spread)) => (value - median) / spread,
            None => 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn standard_units_do_not_depend_on_the_scores_scale() {
        let scores: Vec<f64> = (0..500).map(|i| ((i * 37) % 101) as f64 - 20.0).collect();
        let (mut small, mut large) = (ScoreScale::default(), ScoreScale::default());
        small.observe(3, scores.iter().copied());
        large.observe(3, scores.iter().map(|s| s * 1e4 + 7.0));
        for v in [-20.0, 0.0, 13.5, 80.0] {
            let (a, b) = (small.standardise(v), large.standardise(v * 1e4 + 7.0));
            assert!((a - b).abs() < 1e-9, "{a} vs {b}");
        }
        // The median is 0 standard units; the values 0..=100 shifted by 20 have median 30.
        assert!(small.standardise(30.0).abs() < 1e-9);
    }

    #[test]
    fn the_reservoir_is_bounded_seeded_and_uniform() {
        let mut scale = ScoreScale::default();
        let n = 100_000u64;
        scale.observe(9, (0..n).map(|i| i as f64));
        assert_eq!(scale.seen(), n);
        assert_eq!(scale.kept.len(), RESERVOIR);
        // A uniform sample of 0..n: its quartiles within a few percent of n/4, n/2, 3n/4
        // (the standard error of a quantile of 1,024 draws is about 1.4% of n).
        for q in [0.25, 0.5, 0.75] {
            let got = scale.quantile(q).unwrap() / n as f64;
            assert!((got - q).abs() < 0.05, "quantile {q}: {got}");
        }
        let mut again = ScoreScale::default();
        again.observe(9, (0..n).map(|i| i as f64));
        assert_eq!(again, scale);
        let mut other_seed = ScoreScale::default();
        other_seed.observe(10, (0..n).map(|i| i as f64));
        assert_ne!(other_seed.kept, scale.kept);
    }

    #[test]
    fn no_spread_means_no_scale_and_non_finite_scores_are_skipped() {
        let mut scale = ScoreScale::default();
        assert_eq!(scale.standardise(5.0), 0.0);
        scale.observe(1, [2.0, 2.0, f64::NAN, f64::INFINITY]);
        assert_eq!(scale.seen(), 2);
        assert_eq!(scale.standardise(5.0), 0.0);
        // More than half equal: MAD 0, the mean absolute deviation is the spread.
        scale.observe(1, [2.0, 2.0, 6.0]);
        let (median, spread) = scale.location_and_spread().unwrap();
        assert_eq!(median, 2.0);
        assert!((spread - 0.8).abs() < 1e-12, "{spread}");
    }
}

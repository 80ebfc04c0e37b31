//! The knee of a WCSS curve by Kneedle (Satopää, Albrecht, Irwin and Raghavan, "Finding a
//! 'Kneedle' in a Haystack: Detecting Knee Points in System Behavior", ICDCS workshops 2011),
//! offline, for a decreasing convex curve, sensitivity S = 1:
//!
//! 1. normalise k and WCSS to [0, 1];
//! 2. flip the curve so it is concave increasing: y' = 1 - y;
//! 3. the difference curve D_i = y'_i - x_i (0 at both ends);
//! 4. every local maximum i of D gets the threshold T_i = D_i - S * mean(x_{j+1} - x_j);
//! 5. the knee is the first local maximum after which D drops below T_i before the next local
//!    maximum. No such maximum (a straight or concave curve): no knee.

/// Sensitivity: larger is more conservative (the paper's default is 1).
const SENSITIVITY: f64 = 1.0;

/// The k at the knee of `wcss` over `ks` (strictly increasing, at least 3 points, finite
/// values); `None` when the curve has no knee or the input is unusable.
pub fn knee_kneedle(ks: &[usize], wcss: &[f64]) -> Option<usize> {
    let m = ks.len();
    if m < 3 || wcss.len() != m || ks.windows(2).any(|w| w[0] >= w[1]) {
        return None;
    }
    if wcss.iter().any(|y| !y.is_finite()) {
        return None;
    }
    let (x0, x1) = (ks[0] as f64, ks[m - 1] as f64);
    let (ymin, ymax) = wcss
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), &y| {
            (lo.min(y), hi.max(y))
        });
    if ymax <= ymin {
        return None;
    }
    let xn: Vec<f64> = ks.iter().map(|&k| (k as f64 - x0) / (x1 - x0)).collect();
    let diff: Vec<f64> = wcss
        .iter()
        .zip(&xn)
        .map(|(&y, &x)| (1.0 - (y - ymin) / (ymax - ymin)) - x)
        .collect();
    let step = 1.0 / (m - 1) as f64; // mean of the normalised x steps
    let is_max = |i: usize| i > 0 && i + 1 < m && diff[i] > diff[i - 1] && diff[i] >= diff[i + 1];
    for i in (1..m - 1).filter(|&i| is_max(i)) {
        let threshold = diff[i] - SENSITIVITY * step;
        for j in i + 1..m {
            if is_max(j) {
                break;
            }
            if diff[j] < threshold {
                return Some(ks[i]);
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knee_of_a_hinge() {
        // Steep until 8, then almost flat.
        let ks: Vec<usize> = (2..=16).collect();
        let wcss: Vec<f64> = ks
            .iter()
            .map(|&k| {
                if k <= 8 {
                    100.0 - 12.0 * (k - 2) as f64
                } else {
                    28.0 - (k - 8) as f64
                }
            })
            .collect();
        assert_eq!(knee_kneedle(&ks, &wcss), Some(8));
    }

    #[test]
    fn no_knee_on_a_line_or_bad_input() {
        let ks = [1, 2, 3, 4, 5];
        assert_eq!(knee_kneedle(&ks, &[5.0, 4.0, 3.0, 2.0, 1.0]), None);
        assert_eq!(knee_kneedle(&ks[..2], &[5.0, 4.0]), None);
        assert_eq!(knee_kneedle(&[3, 2, 1], &[5.0, 4.0, 3.0]), None);
    }
}

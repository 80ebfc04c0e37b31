//! The numbers `quad eval` reports beside the losses: bits per byte, and the paired t-test of
//! a selection against the baseline over seeds (Student's t distribution through the
//! regularised incomplete beta function, so no statistics crate is needed).
use serde::{Deserialize, Serialize};

/// Bits per UTF-8 byte of a text whose `tokens` predicted tokens have a mean loss of
/// `mean_loss` nats: the total code length in bits over the bytes it encodes. Unlike the
/// loss per token it does not depend on the tokenizer. Zero bytes give NaN.
pub fn bits_per_byte(mean_loss: f64, tokens: u64, bytes: u64) -> f64 {
    if bytes == 0 {
        return f64::NAN;
    }
    mean_loss * tokens as f64 / (std::f64::consts::LN_2 * bytes as f64)
}

/// A paired comparison over seeds: the differences `a[i] - b[i]` of runs with the same seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PairedTest {
    /// Mean of the differences.
    pub mean_diff: f64,
    /// Sample standard deviation of the differences (n - 1 in the denominator); None for
    /// fewer than two pairs.
    pub sd_diff: Option<f64>,
    /// The t statistic mean / (sd / sqrt(n)); None for fewer than two pairs or no spread.
    pub t: Option<f64>,
    /// Two-sided p-value of "the mean difference is zero" (Student's t with n - 1 degrees of
    /// freedom). None for fewer than two pairs; with no spread at all, 1 for equal runs and 0
    /// otherwise (the limit of the test).
    pub p_value: Option<f64>,
}

/// The paired t-test of `a` against `b` (equal lengths, paired by index).
pub fn paired_t_test(a: &[f64], b: &[f64]) -> PairedTest {
    assert_eq!(a.len(), b.len(), "paired samples have equal lengths");
    let diffs: Vec<f64> = a.iter().zip(b).map(|(x, y)| x - y).collect();
    let n = diffs.len();
    let mean_diff = if n == 0 {
        f64::NAN
    } else {
        diffs.iter().sum::<f64>() / n as f64
    };
    if n < 2 {
        return PairedTest {
            mean_diff,
            sd_diff: None,
            t: None,
            p_value: None,
        };
    }
    let var = diffs.iter().map(|d| (d - mean_diff).powi(2)).sum::<f64>() / (n - 1) as f64;
    let sd = var.sqrt();
    if sd == 0.0 {
        let p = if mean_diff == 0.0 { 1.0 } else { 0.0 };
        return PairedTest {
            mean_diff,
            sd_diff: Some(sd),
            t: None,
            p_value: Some(p),
        };
    }
    let t = mean_diff / (sd / (n as f64).sqrt());
    let df = (n - 1) as f64;
    PairedTest {
        mean_diff,
        sd_diff: Some(sd),
        t: Some(t),
        p_value: Some(two_sided_p(t, df)),
    }
}

/// P(|T| >= |t|) for Student's t with `df` degrees of freedom: I_{df/(df+t^2)}(df/2, 1/2).
pub fn two_sided_p(t: f64, df: f64) -> f64 {
    if !t.is_finite() {
        return if t.is_nan() { f64::NAN } else { 0.0 };
    }
    incomplete_beta(df / 2.0, 0.5, df / (df + t * t)).clamp(0.0, 1.0)
}

/// The CDF of Student's t with `df` degrees of freedom at `t`.
pub fn student_t_cdf(t: f64, df: f64) -> f64 {
    let tail = two_sided_p(t, df) / 2.0;
    if t >= 0.0 {
        1.0 - tail
    } else {
        tail
    }
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, n = 9; about 15 significant digits).
fn ln_gamma(x: f64) -> f64 {
    const G: f64 = 7.0;
    const C: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x) Γ(1 - x) = π / sin(πx).
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = C[0];
    for (i, c) in C.iter().enumerate().skip(1) {
        sum += c / (x + i as f64);
    }
    let t = x + G + 0.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// The regularised incomplete beta function I_x(a, b), by its continued fraction (Lentz),
/// on the side of x where it converges fast.
fn incomplete_beta(a: f64, b: f64, x: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let front =
        (ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln()).exp();
    if x < (a + 1.0) / (a + b + 2.0) {
        front * beta_fraction(a, b, x) / a
    } else {
        1.0 - front * beta_fraction(b, a, 1.0 - x) / b
    }
}

/// The continued fraction of I_x(a, b) (modified Lentz's method).
fn beta_fraction(a: f64, b: f64, x: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let mut c = 1.0;
    let mut d = 1.0 - (a + b) * x / (a + 1.0);
    d = 1.0 / if d.abs() < TINY { TINY } else { d };
    let mut h = d;
    for m in 1..=300 {
        let m = m as f64;
        let m2 = 2.0 * m;
        for coefficient in [
            m * (b - m) * x / ((a + m2 - 1.0) * (a + m2)),
            -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0)),
        ] {
            d = 1.0 + coefficient * d;
            d = 1.0 / if d.abs() < TINY { TINY } else { d };
            c = 1.0 + coefficient / c;
            if c.abs() < TINY {
                c = TINY;
            }
            h *= d * c;
        }
        if (d * c - 1.0).abs() < 1e-15 {
            break;
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    /// Closed forms: df = 1 is the Cauchy distribution, F(t) = 1/2 + atan(t)/pi; df = 2 has
    /// F(t) = 1/2 + t / (2 sqrt(t^2 + 2)).
    #[test]
    fn t_cdf_matches_the_closed_forms_of_one_and_two_degrees_of_freedom() {
        for t in [-7.5, -2.0, -0.3, 0.0, 0.4, 1.0, 3.0, 12.0] {
            let cauchy = 0.5 + f64::atan(t) / std::f64::consts::PI;
            assert!(close(student_t_cdf(t, 1.0), cauchy, 1e-12), "df 1, t {t}");
            let two = 0.5 + t / (2.0 * (t * t + 2.0).sqrt());
            assert!(close(student_t_cdf(t, 2.0), two, 1e-12), "df 2, t {t}");
        }
    }

    /// Critical values from the standard t table: the two-sided 5% and 1% points.
    #[test]
    fn two_sided_p_at_tabulated_critical_values() {
        for (t, df, p) in [
            (12.706_204_736, 1.0, 0.05),
            (2.570_581_836, 5.0, 0.05),
            (2.228_138_852, 10.0, 0.05),
            (2.042_272_456, 30.0, 0.05),
            (3.169_272_673, 10.0, 0.01),
            (4.604_094_871, 4.0, 0.01),
        ] {
            let got = two_sided_p(t, df);
            assert!(close(got, p, 1e-8), "t {t}, df {df}: {got} vs {p}");
        }
        assert!(close(two_sided_p(0.0, 7.0), 1.0, 1e-14));
        assert_eq!(two_sided_p(f64::INFINITY, 3.0), 0.0);
    }

    /// Differences 1, 2, 3: mean 2, sd 1, t = 2 / (1 / sqrt 3) = 2 sqrt 3 with 2 degrees of
    /// freedom, so p = 1 - t / sqrt(t^2 + 2) = 1 - sqrt(12 / 14) (by hand).
    #[test]
    fn paired_t_test_of_a_hand_computed_example() {
        let a = [11.0, 12.5, 13.0];
        let b = [10.0, 10.5, 10.0];
        let test = paired_t_test(&a, &b);
        assert!(close(test.mean_diff, 2.0, 1e-12));
        assert!(close(test.sd_diff.unwrap(), 1.0, 1e-12));
        assert!(close(test.t.unwrap(), 2.0 * 3f64.sqrt(), 1e-12));
        let p = 1.0 - (12.0f64 / 14.0).sqrt();
        assert!(close(test.p_value.unwrap(), p, 1e-12), "{test:?}");
        // Swapping the samples flips the sign, not the p-value.
        let swapped = paired_t_test(&b, &a);
        assert!(close(swapped.mean_diff, -2.0, 1e-12));
        assert!(close(swapped.p_value.unwrap(), p, 1e-12));
    }

    #[test]
    fn paired_t_test_edge_cases() {
        let one = paired_t_test(&[2.0], &[1.0]);
        assert_eq!((one.mean_diff, one.p_value), (1.0, None));
        let constant = paired_t_test(&[2.0, 3.0], &[1.0, 2.0]);
        assert_eq!(constant.p_value, Some(0.0));
        let equal = paired_t_test(&[2.0, 3.0], &[2.0, 3.0]);
        assert_eq!(equal.p_value, Some(1.0));
    }

    #[test]
    fn ln_gamma_at_known_points() {
        // Γ(1) = Γ(2) = 1, Γ(5) = 24, Γ(1/2) = sqrt(pi), Γ(0.1) = 9.513507698668732.
        assert!(close(ln_gamma(1.0), 0.0, 1e-13));
        assert!(close(ln_gamma(2.0), 0.0, 1e-13));
        assert!(close(ln_gamma(5.0), 24f64.ln(), 1e-12));
        assert!(close(
            ln_gamma(0.5),
            std::f64::consts::PI.sqrt().ln(),
            1e-13
        ));
        assert!(close(ln_gamma(0.1), 9.513_507_698_668_732f64.ln(), 1e-12));
    }

    #[test]
    fn bits_per_byte_arithmetic() {
        // ln 2 nats a token, one token a byte: exactly one bit a byte.
        assert!(close(
            bits_per_byte(std::f64::consts::LN_2, 1000, 1000),
            1.0,
            1e-12
        ));
        // 2 nats a token over 300 tokens for 1200 bytes: 600 nats = 865.617 bits, / 1200.
        let bpb = bits_per_byte(2.0, 300, 1200);
        assert!(close(bpb, 600.0 / std::f64::consts::LN_2 / 1200.0, 1e-12));
        assert!(close(bpb, 0.721_347_520_444_481_7, 1e-12));
        assert!(bits_per_byte(1.0, 10, 0).is_nan());
    }
}

//! Bounds for assertions on random load balancing, chosen so that a correct balancer fails
//! them with a known, negligible probability.

/// The largest `t` such that `P(X < t) <= alpha` for `X ~ Binomial(n, p)`: asserting
/// `count >= t` fails a fair balancer with probability at most `alpha`.
pub fn binomial_lower_bound(n: u64, p: f64, alpha: f64) -> u64 {
    assert!(
        (0.0..1.0).contains(&p) && p > 0.0,
        "p must be in (0, 1), got {p}"
    );
    let ln_ratio = (p / (1.0 - p)).ln();
    // ln P(X = 0), then the recurrence P(k+1) = P(k) · (n-k)/(k+1) · p/(1-p).
    let mut ln_pmf = n as f64 * (1.0 - p).ln();
    let mut cdf = 0.0; // P(X < t) for the current t
    for t in 0..=n {
        // P(X < t + 1) = P(X < t) + P(X = t)
        let next = cdf + ln_pmf.exp();
        if next > alpha {
            return t;
        }
        cdf = next;
        ln_pmf += ((n - t) as f64 / (t + 1) as f64).ln() + ln_ratio;
    }
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bound_for_three_backends() {
        // 200 connects over 3 backends, each checked with alpha = 1e-6 / 3.
        let t = binomial_lower_bound(200, 1.0 / 3.0, 1e-6 / 3.0);
        assert!((25..=40).contains(&t), "{t}");
        // Tighter alpha, lower bound.
        assert!(binomial_lower_bound(200, 1.0 / 3.0, 1e-12) < t);
    }

    #[test]
    fn bound_is_exact_for_small_cases() {
        // Binomial(2, 0.5): P(X<1) = 0.25, P(X<2) = 0.75.
        assert_eq!(binomial_lower_bound(2, 0.5, 0.2), 0);
        assert_eq!(binomial_lower_bound(2, 0.5, 0.26), 1);
        assert_eq!(binomial_lower_bound(2, 0.5, 0.8), 2);
    }
}

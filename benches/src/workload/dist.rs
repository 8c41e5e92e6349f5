//! Length distributions for prompts, outputs and turn counts.

use rand::Rng;
use rand_distr::{Distribution, LogNormal};
use serde::{Deserialize, Serialize};

/// A distribution of positive integer lengths (tokens or turns).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LengthDist {
    /// Always `value`.
    Fixed {
        /// The length.
        value: u32,
    },
    /// Uniform over `min..=max`.
    Uniform {
        /// Smallest length.
        min: u32,
        /// Largest length.
        max: u32,
    },
    /// Log-normal with the given median and log-space standard deviation, clamped to `min..=max`.
    Lognormal {
        /// Median (`exp(mu)`).
        median: f64,
        /// Standard deviation of `ln(length)`.
        sigma: f64,
        /// Lower clamp.
        #[serde(default = "one")]
        min: u32,
        /// Upper clamp.
        #[serde(default = "max_len")]
        max: u32,
    },
    /// Weighted buckets; a bucket is picked by weight, then a length uniformly within it.
    Histogram {
        /// The buckets.
        buckets: Vec<Bucket>,
    },
}

/// One histogram bucket: lengths `lo..=hi` with relative weight `weight`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bucket {
    /// Smallest length in the bucket.
    pub lo: u32,
    /// Largest length in the bucket.
    pub hi: u32,
    /// Relative weight (need not sum to 1).
    pub weight: f64,
}

fn one() -> u32 {
    1
}

fn max_len() -> u32 {
    1 << 20
}

impl LengthDist {
    /// Checks the parameters; the message names the problem.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            LengthDist::Fixed { .. } => Ok(()),
            LengthDist::Uniform { min, max } if min > max => {
                Err(format!("uniform min {min} > max {max}"))
            }
            LengthDist::Uniform { .. } => Ok(()),
            LengthDist::Lognormal {
                median,
                sigma,
                min,
                max,
            } => {
                if !(median.is_finite() && *median > 0.0) {
                    Err(format!("lognormal median {median} must be > 0"))
                } else if !(sigma.is_finite() && *sigma >= 0.0) {
                    Err(format!("lognormal sigma {sigma} must be >= 0"))
                } else if min > max {
                    Err(format!("lognormal min {min} > max {max}"))
                } else {
                    Ok(())
                }
            }
            LengthDist::Histogram { buckets } => {
                if buckets.is_empty() {
                    return Err("histogram has no buckets".into());
                }
                for b in buckets {
                    if b.lo > b.hi {
                        return Err(format!("histogram bucket lo {} > hi {}", b.lo, b.hi));
                    }
                    if !(b.weight.is_finite() && b.weight >= 0.0) {
                        return Err(format!("histogram weight {} must be >= 0", b.weight));
                    }
                }
                if buckets.iter().map(|b| b.weight).sum::<f64>() <= 0.0 {
                    return Err("histogram weights sum to 0".into());
                }
                Ok(())
            }
        }
    }

    /// Draws one length. Call [`LengthDist::validate`] first; invalid parameters give `min`-ish values, never a panic.
    pub fn sample<R: Rng + ?Sized>(&self, rng: &mut R) -> u32 {
        match *self {
            LengthDist::Fixed { value } => value,
            LengthDist::Uniform { min, max } => {
                if min >= max {
                    min
                } else {
                    rng.random_range(min..=max)
                }
            }
            LengthDist::Lognormal {
                median,
                sigma,
                min,
                max,
            } => {
                let v = LogNormal::new(median.max(f64::MIN_POSITIVE).ln(), sigma.max(0.0))
                    .map(|d| d.sample(rng))
                    .unwrap_or(median);
                (v.round().clamp(f64::from(min), f64::from(max.max(min)))) as u32
            }
            LengthDist::Histogram { ref buckets } => {
                let total: f64 = buckets.iter().map(|b| b.weight.max(0.0)).sum();
                let mut x = rng.random::<f64>() * total;
                let mut chosen = buckets.last().copied();
                for b in buckets {
                    if x < b.weight {
                        chosen = Some(*b);
                        break;
                    }
                    x -= b.weight.max(0.0);
                }
                match chosen {
                    Some(b) if b.lo < b.hi => rng.random_range(b.lo..=b.hi),
                    Some(b) => b.lo,
                    None => 1,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    const N: usize = 20_000;

    fn draw(d: &LengthDist, seed: u64) -> Vec<f64> {
        let mut rng = StdRng::seed_from_u64(seed);
        (0..N).map(|_| f64::from(d.sample(&mut rng))).collect()
    }

    fn mean(v: &[f64]) -> f64 {
        v.iter().sum::<f64>() / v.len() as f64
    }

    #[test]
    fn fixed_is_fixed() {
        assert!(
            draw(&LengthDist::Fixed { value: 7 }, 1)
                .iter()
                .all(|&x| x == 7.0)
        );
    }

    #[test]
    fn uniform_matches_mean_variance_and_range() {
        let d = LengthDist::Uniform { min: 100, max: 300 };
        let v = draw(&d, 2);
        assert!(v.iter().all(|&x| (100.0..=300.0).contains(&x)));
        let m = mean(&v);
        // Mean 200, sd of the mean = 58/sqrt(N) ≈ 0.41: 5 sd.
        assert!((m - 200.0).abs() < 2.1, "{m}");
        let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / N as f64;
        let expect = (201.0f64.powi(2) - 1.0) / 12.0;
        assert!((var / expect - 1.0).abs() < 0.05, "{var} vs {expect}");
        // Each quarter of the range gets about a quarter of the draws.
        for q in 0..4 {
            let lo = 100.0 + 50.0 * f64::from(q);
            let n = v.iter().filter(|&&x| x >= lo && x < lo + 50.0).count() as f64 / N as f64;
            assert!((n - 0.25).abs() < 0.02, "quarter {q}: {n}");
        }
    }

    #[test]
    fn lognormal_matches_log_moments() {
        let d = LengthDist::Lognormal {
            median: 500.0,
            sigma: 0.8,
            min: 1,
            max: 1 << 20,
        };
        let logs: Vec<f64> = draw(&d, 3).iter().map(|x| x.ln()).collect();
        let m = mean(&logs);
        let sd = (logs.iter().map(|x| (x - m).powi(2)).sum::<f64>() / N as f64).sqrt();
        assert!((m - 500f64.ln()).abs() < 0.03, "{m}");
        assert!((sd - 0.8).abs() < 0.03, "{sd}");
        let mut sorted = draw(&d, 4);
        sorted.sort_by(f64::total_cmp);
        let median = sorted[N / 2];
        assert!((median / 500.0 - 1.0).abs() < 0.05, "{median}");
    }

    #[test]
    fn lognormal_respects_clamps() {
        let d = LengthDist::Lognormal {
            median: 100.0,
            sigma: 2.0,
            min: 50,
            max: 200,
        };
        assert!(draw(&d, 5).iter().all(|&x| (50.0..=200.0).contains(&x)));
    }

    #[test]
    fn histogram_matches_bucket_weights() {
        let d = LengthDist::Histogram {
            buckets: vec![
                Bucket {
                    lo: 1,
                    hi: 10,
                    weight: 1.0,
                },
                Bucket {
                    lo: 100,
                    hi: 200,
                    weight: 3.0,
                },
                Bucket {
                    lo: 1000,
                    hi: 1000,
                    weight: 6.0,
                },
            ],
        };
        let v = draw(&d, 6);
        let frac =
            |lo: f64, hi: f64| v.iter().filter(|&&x| x >= lo && x <= hi).count() as f64 / N as f64;
        // Chi-square over the three buckets, 2 degrees of freedom: 13.8 is p = 0.001.
        let expected = [0.1, 0.3, 0.6];
        let observed = [frac(1.0, 10.0), frac(100.0, 200.0), frac(1000.0, 1000.0)];
        assert!((observed.iter().sum::<f64>() - 1.0).abs() < 1e-9);
        let chi2: f64 = expected
            .iter()
            .zip(&observed)
            .map(|(e, o)| (o * N as f64 - e * N as f64).powi(2) / (e * N as f64))
            .sum();
        assert!(chi2 < 13.8, "chi2 {chi2} {observed:?}");
    }

    #[test]
    fn validation_names_the_problem() {
        assert!(
            LengthDist::Uniform { min: 5, max: 1 }
                .validate()
                .unwrap_err()
                .contains("min")
        );
        assert!(
            LengthDist::Histogram { buckets: vec![] }
                .validate()
                .is_err()
        );
        assert!(
            LengthDist::Lognormal {
                median: -1.0,
                sigma: 1.0,
                min: 1,
                max: 2
            }
            .validate()
            .is_err()
        );
    }

    #[test]
    fn parses_from_toml() {
        #[derive(Deserialize)]
        struct W {
            d: LengthDist,
        }
        let w: W =
            toml::from_str("d = { kind = \"lognormal\", median = 300, sigma = 0.5 }").unwrap();
        assert!(matches!(w.d, LengthDist::Lognormal { max, .. } if max == 1 << 20));
        assert!(toml::from_str::<W>("d = { kind = \"fixed\", value = 3, extra = 1 }").is_err());
    }
}

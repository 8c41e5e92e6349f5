//! Arrival processes: when each request of a workload is sent.

use rand::Rng;
use rand_distr::{Distribution, Exp, Gamma};
use serde::{Deserialize, Serialize};

/// How request arrival times are drawn.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum Arrival {
    /// Exponential gaps at `rate` requests per second.
    Poisson {
        /// Mean requests per second.
        rate: f64,
    },
    /// Gamma gaps as `vllm bench serve --burstiness` draws them: shape
    /// `burstiness`, mean gap `1/rate`. 1 is Poisson; below 1 is burstier.
    Gamma {
        /// Mean requests per second.
        rate: f64,
        /// Gamma shape.
        burstiness: f64,
    },
    /// Alternating phases: Poisson at `rate_on` for `on_s` seconds, then at `rate_off` for `off_s`.
    OnOff {
        /// Rate during on phases.
        rate_on: f64,
        /// Rate during off phases (0 = silence).
        #[serde(default)]
        rate_off: f64,
        /// Length of an on phase in seconds.
        on_s: f64,
        /// Length of an off phase in seconds.
        off_s: f64,
    },
    /// The arrival offsets of an existing workload file, multiplied by `time_scale`
    /// (0.5 replays twice as fast), cycled when more requests are asked for.
    Replay {
        /// Workload JSONL whose `arrival_ms` values are replayed.
        path: std::path::PathBuf,
        /// Factor applied to every offset.
        #[serde(default = "unit")]
        time_scale: f64,
    },
}

fn unit() -> f64 {
    1.0
}

fn positive(name: &str, v: f64) -> Result<(), String> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(format!("{name} must be a positive number, got {v}"))
    }
}

impl Arrival {
    /// Checks the parameters.
    pub fn validate(&self) -> Result<(), String> {
        match self {
            Arrival::Poisson { rate } => positive("rate", *rate),
            Arrival::Gamma { rate, burstiness } => {
                positive("rate", *rate)?;
                positive("burstiness", *burstiness)
            }
            Arrival::OnOff {
                rate_on,
                rate_off,
                on_s,
                off_s,
            } => {
                positive("rate_on", *rate_on)?;
                positive("on_s", *on_s)?;
                if !(rate_off.is_finite() && *rate_off >= 0.0) {
                    return Err(format!("rate_off must be >= 0, got {rate_off}"));
                }
                if !(off_s.is_finite() && *off_s >= 0.0) {
                    return Err(format!("off_s must be >= 0, got {off_s}"));
                }
                Ok(())
            }
            Arrival::Replay { time_scale, .. } => positive("time_scale", *time_scale),
        }
    }
}

/// Generates arrival offsets (ms, non-decreasing) for a stochastic process.
/// `Replay` is resolved by the caller ([`replay_offsets`]).
pub struct ArrivalClock {
    t_s: f64,
    kind: ClockKind,
}

enum ClockKind {
    Exp(Exp<f64>),
    Gamma(Gamma<f64>),
    OnOff {
        on: Exp<f64>,
        off: Option<Exp<f64>>,
        on_s: f64,
        off_s: f64,
    },
    Offsets {
        offsets: Vec<f64>,
        next: usize,
        span: f64,
    },
}

impl ArrivalClock {
    /// A clock for `arrival`; `replay` supplies the offsets for `Arrival::Replay`.
    pub fn new(arrival: &Arrival, replay: Option<Vec<f64>>) -> Result<Self, String> {
        arrival.validate()?;
        let err = |e: &dyn std::fmt::Display| e.to_string();
        let kind = match *arrival {
            Arrival::Poisson { rate } => ClockKind::Exp(Exp::new(rate).map_err(|e| err(&e))?),
            Arrival::Gamma { rate, burstiness } => ClockKind::Gamma(
                Gamma::new(burstiness, 1.0 / (rate * burstiness)).map_err(|e| err(&e))?,
            ),
            Arrival::OnOff {
                rate_on,
                rate_off,
                on_s,
                off_s,
            } => ClockKind::OnOff {
                on: Exp::new(rate_on).map_err(|e| err(&e))?,
                off: if rate_off > 0.0 {
                    Some(Exp::new(rate_off).map_err(|e| err(&e))?)
                } else {
                    None
                },
                on_s,
                off_s,
            },
            Arrival::Replay { time_scale, .. } => {
                let mut offsets: Vec<f64> = replay.ok_or("replay offsets missing")?;
                if offsets.is_empty() {
                    return Err("replay source has no arrivals".into());
                }
                offsets.sort_by(f64::total_cmp);
                let first = offsets[0];
                for o in &mut offsets {
                    *o = (*o - first) * time_scale;
                }
                let n = offsets.len() as f64;
                let last = offsets[offsets.len() - 1];
                // One mean gap after the last arrival before the cycle repeats.
                let span = last + if n > 1.0 { last / (n - 1.0) } else { 1000.0 };
                ClockKind::Offsets {
                    offsets,
                    next: 0,
                    span,
                }
            }
        };
        Ok(ArrivalClock { t_s: 0.0, kind })
    }

    /// The next arrival offset in milliseconds.
    pub fn next_ms<R: Rng + ?Sized>(&mut self, rng: &mut R) -> f64 {
        match &mut self.kind {
            ClockKind::Exp(d) => {
                self.t_s += d.sample(rng);
                self.t_s * 1000.0
            }
            ClockKind::Gamma(d) => {
                self.t_s += d.sample(rng);
                self.t_s * 1000.0
            }
            ClockKind::OnOff {
                on,
                off,
                on_s,
                off_s,
            } => loop {
                let period = *on_s + *off_s;
                let phase = self.t_s % period;
                let in_on = phase < *on_s;
                let (dist, phase_end) = if in_on {
                    (Some(&*on), self.t_s - phase + *on_s)
                } else {
                    (off.as_ref(), self.t_s - phase + period)
                };
                match dist {
                    Some(d) => {
                        // Memorylessness: a draw that crosses the phase end restarts there.
                        let t = self.t_s + d.sample(rng);
                        if t < phase_end {
                            self.t_s = t;
                            return t * 1000.0;
                        }
                        self.t_s = phase_end;
                    }
                    None => self.t_s = phase_end,
                }
            },
            ClockKind::Offsets {
                offsets,
                next,
                span,
            } => {
                let cycle = (*next / offsets.len()) as f64;
                let v = offsets[*next % offsets.len()] + cycle * *span;
                *next += 1;
                v
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn gaps(a: &Arrival, n: usize) -> Vec<f64> {
        let mut rng = StdRng::seed_from_u64(11);
        let mut c = ArrivalClock::new(a, None).unwrap();
        let mut prev = 0.0;
        (0..n)
            .map(|_| {
                let t = c.next_ms(&mut rng);
                let g = t - prev;
                prev = t;
                g / 1000.0
            })
            .collect()
    }

    fn mean_cv(v: &[f64]) -> (f64, f64) {
        let m = v.iter().sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / v.len() as f64;
        (m, var.sqrt() / m)
    }

    #[test]
    fn poisson_gaps_are_exponential() {
        let g = gaps(&Arrival::Poisson { rate: 20.0 }, 20_000);
        let (m, cv) = mean_cv(&g);
        assert!((m - 0.05).abs() < 0.002, "{m}");
        assert!((cv - 1.0).abs() < 0.04, "{cv}");
        // P(gap > mean) = e^-1.
        let over = g.iter().filter(|&&x| x > 0.05).count() as f64 / g.len() as f64;
        assert!((over - (-1f64).exp()).abs() < 0.015, "{over}");
    }

    #[test]
    fn gamma_burstiness_sets_the_coefficient_of_variation() {
        // Gamma with shape k has CV 1/sqrt(k).
        for k in [0.25, 4.0] {
            let (m, cv) = mean_cv(&gaps(
                &Arrival::Gamma {
                    rate: 10.0,
                    burstiness: k,
                },
                20_000,
            ));
            assert!((m - 0.1).abs() < 0.005, "k={k} mean {m}");
            assert!((cv - 1.0 / f64::sqrt(k)).abs() < 0.08, "k={k} cv {cv}");
        }
    }

    #[test]
    fn on_off_sends_only_in_on_phases_at_the_on_rate() {
        let a = Arrival::OnOff {
            rate_on: 50.0,
            rate_off: 0.0,
            on_s: 2.0,
            off_s: 3.0,
        };
        let mut rng = StdRng::seed_from_u64(5);
        let mut c = ArrivalClock::new(&a, None).unwrap();
        let ts: Vec<f64> = (0..5000).map(|_| c.next_ms(&mut rng) / 1000.0).collect();
        assert!(ts.iter().all(|t| t % 5.0 < 2.0));
        let span_on = (ts[ts.len() - 1] / 5.0).floor() * 2.0 + (ts[ts.len() - 1] % 5.0);
        let rate = ts.len() as f64 / span_on;
        assert!((rate - 50.0).abs() < 3.0, "{rate}");
    }

    #[test]
    fn replay_scales_and_cycles() {
        let a = Arrival::Replay {
            path: "x".into(),
            time_scale: 0.5,
        };
        let mut c = ArrivalClock::new(&a, Some(vec![1000.0, 1200.0, 3000.0])).unwrap();
        let mut rng = StdRng::seed_from_u64(0);
        let v: Vec<f64> = (0..4).map(|_| c.next_ms(&mut rng)).collect();
        assert_eq!(v[..3], [0.0, 100.0, 1000.0]);
        assert_eq!(v[3], 1500.0);
    }

    #[test]
    fn invalid_parameters_are_rejected() {
        assert!(Arrival::Poisson { rate: 0.0 }.validate().is_err());
        assert!(
            Arrival::Gamma {
                rate: 1.0,
                burstiness: -1.0
            }
            .validate()
            .is_err()
        );
        assert!(
            ArrivalClock::new(
                &Arrival::Replay {
                    path: "x".into(),
                    time_scale: 1.0
                },
                Some(vec![])
            )
            .is_err()
        );
    }
}

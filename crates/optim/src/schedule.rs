//! Learning-rate schedules as multipliers of the base rate (reference §3, big_vision's
//! `create_learning_rate_schedule`): a decay shape, then linear warmup, then linear cooldown.

use crate::OptimError;

/// The decay shape after warmup.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decay {
    /// `1 / sqrt(1 + (s − warmup) / timescale)`: Scaling ViT's "rsqrt" with a cooldown.
    Rsqrt { timescale: u64 },
    /// `0.5 · (1 + cos(π · progress))`.
    Cosine,
    /// `1 − progress`.
    Linear,
    /// 1.
    Constant,
}

/// A schedule over `total_steps` optimizer steps, evaluated by [`Schedule::factor`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Schedule {
    pub decay: Decay,
    /// Steps of linear warmup from 0 to 1.
    pub warmup_steps: u64,
    /// Steps of linear cooldown to 0 at the end.
    pub cooldown_steps: u64,
    pub total_steps: u64,
}

impl Schedule {
    /// Checks the settings: `total_steps > 0`, warmup and cooldown each ≤ total, a positive timescale.
    pub fn new(decay: Decay, warmup_steps: u64, cooldown_steps: u64, total_steps: u64) -> Result<Self, OptimError> {
        let bad =
            |setting, value: u64, expected| Err(OptimError::Setting { setting, value: value.to_string(), expected });
        if total_steps == 0 {
            return bad("total_steps", total_steps, "at least 1");
        }
        if warmup_steps > total_steps {
            return bad("warmup_steps", warmup_steps, "at most total_steps");
        }
        if cooldown_steps > total_steps {
            return bad("cooldown_steps", cooldown_steps, "at most total_steps");
        }
        if let Decay::Rsqrt { timescale: 0 } = decay {
            return bad("timescale", 0, "at least 1");
        }
        Ok(Schedule { decay, warmup_steps, cooldown_steps, total_steps })
    }

    /// A constant factor of 1 at every step: no warmup, no decay, no cooldown.
    pub fn constant() -> Self {
        Schedule { decay: Decay::Constant, warmup_steps: 0, cooldown_steps: 0, total_steps: u64::MAX }
    }

    /// The multiplier of the base learning rate at step `s` (0 at s = 0 with warmup, 0 at the end with cooldown).
    pub fn factor(&self, s: u64) -> f64 {
        let (s, warmup, total) = (s as f64, self.warmup_steps as f64, self.total_steps as f64);
        let progress = if total > warmup { ((s - warmup) / (total - warmup)).clamp(0.0, 1.0) } else { 1.0 };
        let mut f = match self.decay {
            Decay::Rsqrt { timescale } => {
                if s >= warmup {
                    1.0 / (1.0 + (s - warmup) / timescale as f64).sqrt()
                } else {
                    1.0
                }
            }
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
            Decay::Linear => 1.0 - progress,
            Decay::Constant => 1.0,
        };
        if self.warmup_steps > 0 {
            f *= (s / warmup).min(1.0);
        }
        if self.cooldown_steps > 0 {
            f *= ((total - s) / self.cooldown_steps as f64).clamp(0.0, 1.0);
        }
        f
    }
}

/// Adafactor's second-moment decay at step `t` (the count before the increment):
/// `β2 = min(cap, 1 − (t + 1)^(−decay_rate))`; big_vision uses decay_rate 0.8, cap 0.999.
pub fn adafactor_beta2(t: u64, decay_rate: f64, cap: f64) -> f64 {
    cap.min(1.0 - ((t + 1) as f64).powf(-decay_rate))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vit_g_schedule_matches_reference() {
        // Reference §3: warmup 10k, timescale 10k, cooldown 50k, total 1M.
        let s = Schedule::new(Decay::Rsqrt { timescale: 10_000 }, 10_000, 50_000, 1_000_000).unwrap();
        for (step, want) in [
            (0, 0.0),
            (5_000, 0.5),
            (10_000, 1.0),
            (20_000, std::f64::consts::FRAC_1_SQRT_2), // 0.707107
            (110_000, 0.301511),
            (950_000, 0.102598),
            (975_000, 0.050637),
            (1_000_000, 0.0),
        ] {
            assert!((s.factor(step) - want).abs() < 5e-7, "step {step}: {} vs {want}", s.factor(step));
        }
    }

    #[test]
    fn cosine_linear_and_constant_shapes() {
        let c = Schedule::new(Decay::Cosine, 10, 0, 110).unwrap();
        assert_eq!(c.factor(0), 0.0);
        assert!((c.factor(5) - 0.5).abs() < 1e-12);
        assert!((c.factor(10) - 1.0).abs() < 1e-12);
        assert!((c.factor(60) - 0.5).abs() < 1e-12);
        assert!(c.factor(110).abs() < 1e-12);
        let l = Schedule::new(Decay::Linear, 0, 0, 100).unwrap();
        assert!((l.factor(25) - 0.75).abs() < 1e-12);
        let k = Schedule::new(Decay::Constant, 0, 20, 100).unwrap();
        assert_eq!(k.factor(50), 1.0);
        let one = Schedule::constant();
        assert_eq!((one.factor(0), one.factor(1 << 40)), (1.0, 1.0));
        assert!((k.factor(90) - 0.5).abs() < 1e-12);
    }

    #[test]
    fn beta2_matches_reference() {
        for (t, want) in [(0, 0.0), (1, 0.425651), (9, 0.841511), (99, 0.974881), (999, 0.996019), (1_000_000, 0.999)] {
            assert!((adafactor_beta2(t, 0.8, 0.999) - want).abs() < 5e-7, "t={t}: {}", adafactor_beta2(t, 0.8, 0.999));
        }
    }

    #[test]
    fn bad_settings_are_named() {
        let e = Schedule::new(Decay::Cosine, 20, 0, 10).unwrap_err().to_string();
        assert_eq!(e, "warmup_steps = 20: expected at most total_steps");
        let e = Schedule::new(Decay::Rsqrt { timescale: 0 }, 0, 0, 10).unwrap_err().to_string();
        assert!(e.starts_with("timescale = 0"), "{e}");
        assert!(Schedule::new(Decay::Constant, 0, 0, 0).is_err());
    }
}

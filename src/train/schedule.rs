//! Learning-rate schedules: linear warmup, then constant, linear or cosine decay to a floor.

/// The shape of the decay after warmup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Decay {
    /// Stay at the peak.
    Constant,
    /// Fall linearly to the floor at the last step.
    Linear,
    /// Follow half a cosine down to the floor at the last step.
    #[default]
    Cosine,
}

/// A schedule over a known number of steps.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrSchedule {
    /// Decay after warmup.
    pub decay: Decay,
    /// Learning rate at the end of warmup.
    pub peak: f64,
    /// The floor the decay ends at.
    pub min_lr: f64,
    /// Steps of linear warmup.
    pub warmup_steps: u64,
    /// Steps of the whole run.
    pub total_steps: u64,
}

impl LrSchedule {
    /// The learning rate of step `step` (0-based). Warmup rises as `(step + 1) / (warmup + 1)`
    /// so that the first step already learns.
    pub fn lr(&self, step: u64) -> f64 {
        if step < self.warmup_steps {
            return self.peak * (step + 1) as f64 / (self.warmup_steps + 1) as f64;
        }
        let span = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let progress = ((step - self.warmup_steps) as f64 / span as f64).min(1.0);
        let fraction = match self.decay {
            Decay::Constant => return self.peak,
            Decay::Linear => 1.0 - progress,
            Decay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
        };
        self.min_lr + (self.peak - self.min_lr) * fraction
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(decay: Decay) -> LrSchedule {
        LrSchedule {
            decay,
            peak: 1.0,
            min_lr: 0.1,
            warmup_steps: 3,
            total_steps: 13,
        }
    }

    #[test]
    fn warmup_then_decay_to_the_floor() {
        let linear = schedule(Decay::Linear);
        assert_eq!(linear.lr(0), 0.25);
        assert_eq!(linear.lr(2), 0.75);
        assert_eq!(linear.lr(3), 1.0);
        assert!((linear.lr(8) - 0.55).abs() < 1e-12);
        assert!((linear.lr(13) - 0.1).abs() < 1e-12);
        let cosine = schedule(Decay::Cosine);
        assert!(
            (cosine.lr(8) - 0.55).abs() < 1e-12,
            "halfway is the midpoint"
        );
        assert!(cosine.lr(5) > linear.lr(5), "cosine stays high early");
        assert!((cosine.lr(100) - 0.1).abs() < 1e-12);
        assert_eq!(schedule(Decay::Constant).lr(12), 1.0);
    }
}

//! Learning-rate schedules (book appendix D): linear warm-up, then cosine decay to a minimum.
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum ScheduleKind {
    /// The peak rate throughout (book ch05).
    #[default]
    Constant,
    /// Linear warm-up from `initial_lr` to the peak, then cosine decay to `min_lr` (appendix D).
    Cosine,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Schedule {
    pub kind: ScheduleKind,
    /// Warm-up optimizer steps (appendix D uses 20% of all steps).
    pub warmup_steps: usize,
    /// Rate at step 0 of the warm-up (appendix D: 1e-4 for a peak of 1e-3... here an absolute value).
    pub initial_lr: f64,
    /// Final rate of the cosine decay.
    pub min_lr: f64,
}

impl Default for Schedule {
    fn default() -> Self {
        Self {
            kind: ScheduleKind::Constant,
            warmup_steps: 0,
            initial_lr: 0.0,
            min_lr: 0.0,
        }
    }
}

impl Schedule {
    /// Rate for optimizer step `step` (0-based) of `total_steps`, peaking at `peak_lr`.
    pub fn lr(&self, step: usize, total_steps: usize, peak_lr: f64) -> f64 {
        if self.warmup_steps > 0 && step < self.warmup_steps {
            let inc = (peak_lr - self.initial_lr) / self.warmup_steps as f64;
            return self.initial_lr + step as f64 * inc;
        }
        match self.kind {
            ScheduleKind::Constant => peak_lr,
            ScheduleKind::Cosine => {
                let span = total_steps.saturating_sub(self.warmup_steps).max(1) as f64;
                let progress = ((step - self.warmup_steps) as f64 / span).min(1.0);
                self.min_lr
                    + (peak_lr - self.min_lr)
                        * 0.5
                        * (1.0 + (std::f64::consts::PI * progress).cos())
            }
        }
    }
}

//! The `dpo` task: preference tuning (book ch07/04), by [`crate::instruct::dpo::train::run`].
use super::super::task::{Summary, Task, TrialRun};
use super::super::{Experiment, Trial};
use crate::error::LlmError;
use crate::instruct::dpo::DpoSpec;
use anyhow::Result;
use std::path::Path;

pub struct Dpo;

impl Task for Dpo {
    type Spec = DpoSpec;
    type Shared = ();
    const NAME: &'static str = "dpo";
    const METRICS: &'static [&'static str] = &[
        "val/loss",
        "train/loss",
        "val/reward_margin",
        "val/rewards/accuracies",
        "final/val/loss",
        "final/val/reward_margin",
        "final/val/rewards/accuracies",
    ];
    /// Losses and reward margins before and after, time.
    const SUMMARY: Summary = Summary {
        marker: "val_reward_margin",
        columns: &[
            "val_loss",
            "initial_val_loss",
            "val_reward_margin",
            "val_reward_accuracy",
            "train_loss",
            "train_reward_margin",
            "train_seconds",
            "step",
        ],
    };

    fn validate(&self, spec: &DpoSpec) -> Result<(), LlmError> {
        spec.validate()
    }

    fn check_inputs(&self, spec: &DpoSpec, exp: &Experiment, trial: &Trial) -> Result<()> {
        super::check_finetune_inputs(spec, exp, trial)
    }

    fn run(&self, spec: &DpoSpec, _shared: &(), run: &mut TrialRun) -> Result<()> {
        crate::instruct::dpo::train::run(spec, run.dir, run.device, run.restart, &mut run.events)
            .map(|_| ())
    }
}

impl super::FinetuneInputs for DpoSpec {
    fn inputs(&self) -> (Option<&Path>, Option<&str>, &str) {
        let d = &self.data;
        (d.path.as_deref(), d.dataset.as_deref(), &self.model.name)
    }
}

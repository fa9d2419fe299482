//! The `instruct` task: instruction fine-tuning (book ch07), by [`crate::instruct::train::run`].
use super::super::task::{Summary, Task, TrialRun};
use super::super::{Experiment, Trial};
use crate::error::LlmError;
use crate::instruct::InstructSpec;
use anyhow::Result;
use std::path::Path;

pub struct Instruct;

impl Task for Instruct {
    type Spec = InstructSpec;
    type Shared = ();
    const NAME: &'static str = "instruct";
    const METRICS: &'static [&'static str] = &[
        "val/loss",
        "train/loss",
        "final/val_response_loss",
        "final/rouge_l",
        "final/exact_match",
    ];
    /// Losses, the judge-free figures of the responses, time.
    const SUMMARY: Summary = Summary {
        marker: "rouge_l",
        columns: &[
            "val_loss",
            "initial_val_loss",
            "val_response_loss",
            "val_response_perplexity",
            "exact_match",
            "rouge_l",
            "train_loss",
            "train_seconds",
            "step",
        ],
    };

    fn validate(&self, spec: &InstructSpec) -> Result<(), LlmError> {
        spec.validate()
    }

    fn check_inputs(&self, spec: &InstructSpec, exp: &Experiment, trial: &Trial) -> Result<()> {
        super::check_finetune_inputs(spec, exp, trial)
    }

    fn run(&self, spec: &InstructSpec, _shared: &(), run: &mut TrialRun) -> Result<()> {
        crate::instruct::train::run(spec, run.dir, run.device, run.restart, &mut run.events)
            .map(|_| ())
    }
}

impl super::FinetuneInputs for InstructSpec {
    fn inputs(&self) -> (Option<&Path>, Option<&str>, &str) {
        let d = &self.data;
        (d.path.as_deref(), d.dataset.as_deref(), &self.model.name)
    }
}

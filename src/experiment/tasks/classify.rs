//! The `classify` task: fine-tuning a classifier (book ch06), by [`crate::classify::train::run`].
//! Trials that differ only in how many final blocks train share one frozen prefix: its
//! activations are computed once for all of them (`runs/<experiment>/.frozen-prefix/`).
use super::super::task::{Summary, Task, TrialRun};
use super::super::{Experiment, Trial};
use crate::classify::train::{prefix_key, PrefixSharing};
use crate::classify::{ClassifySpec, Trainable};
use crate::error::LlmError;
use anyhow::Result;
use std::collections::BTreeMap;
use std::path::Path;

pub struct Classify;

/// Where a trial starts training, in blocks from the end (`None`: every block trains).
fn from_end(s: &ClassifySpec) -> Option<usize> {
    match s.finetune.trainable {
        Trainable::Head | Trainable::HeadAndNorm => Some(0),
        Trainable::LastBlocks(k) => Some(k),
        Trainable::All | Trainable::Lora => None,
    }
}

/// Whether a trial's frozen prefix may come from (and go to) the shared cache.
fn reusable(s: &ClassifySpec) -> bool {
    s.finetune.reuse_frozen && s.model.dropout.unwrap_or(0.0) == 0.0
}

impl Task for Classify {
    type Spec = ClassifySpec;
    type Shared = PrefixSharing;
    const NAME: &'static str = "classify";
    const METRICS: &'static [&'static str] = &[
        "val/accuracy",
        "val/loss",
        "train/accuracy",
        "final/val_accuracy",
        "final/test_accuracy",
    ];
    /// Accuracy and loss on the three splits, then the training time.
    const SUMMARY: Summary = Summary {
        marker: "test_accuracy",
        columns: &[
            "train_accuracy",
            "val_accuracy",
            "test_accuracy",
            "train_loss",
            "val_loss",
            "test_loss",
            "train_seconds",
            "step",
        ],
    };

    fn validate(&self, spec: &ClassifySpec) -> Result<(), LlmError> {
        spec.validate()
    }

    fn check_inputs(&self, spec: &ClassifySpec, exp: &Experiment, trial: &Trial) -> Result<()> {
        super::check_finetune_inputs(spec, exp, trial)
    }

    /// For each trial, the experiment's frozen-prefix cache folder and the boundaries (blocks
    /// from the end) of the other trials that share its prefix.
    fn plan(&self, root: &Path, specs: &[&ClassifySpec]) -> Vec<PrefixSharing> {
        let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for s in specs {
            if let (true, Some(k)) = (reusable(s), from_end(s)) {
                groups.entry(prefix_key(s)).or_default().push(k);
            }
        }
        specs
            .iter()
            .map(|s| {
                if !reusable(s) {
                    return PrefixSharing::default();
                }
                let key = prefix_key(s);
                PrefixSharing {
                    dir: Some(root.join(".frozen-prefix").join(&key)),
                    from_end: groups.get(&key).cloned().unwrap_or_default(),
                }
            })
            .collect()
    }

    fn run(&self, spec: &ClassifySpec, sharing: &PrefixSharing, run: &mut TrialRun) -> Result<()> {
        crate::classify::train::run(
            spec,
            run.dir,
            run.device,
            run.restart,
            sharing,
            &mut run.events,
        )
        .map(|_| ())
    }
}

impl super::FinetuneInputs for ClassifySpec {
    fn inputs(&self) -> (Option<&Path>, Option<&str>, &str) {
        let d = &self.data;
        (d.path.as_deref(), d.dataset.as_deref(), &self.model.name)
    }
}

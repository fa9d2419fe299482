//! The `pretrain` task: train a GPT from scratch or from another run's weights (book ch05), by
//! [`crate::train::trainer::pretrain`].
use super::super::task::{Summary, Task, TrialRun};
use super::super::{Experiment, Trial};
use crate::error::LlmError;
use crate::train::PretrainSpec;
use anyhow::Result;

pub struct Pretrain;

impl Task for Pretrain {
    type Spec = PretrainSpec;
    type Shared = ();
    const NAME: &'static str = "pretrain";
    const METRICS: &'static [&'static str] = &["val/loss", "train/loss"];
    /// An evaluation record, the last line of a pretraining run and of any training task's run
    /// until it ends.
    const SUMMARY: Summary = Summary {
        marker: "train_loss",
        columns: &["train_loss", "val_loss", "step", "tokens_seen"],
    };

    fn validate(&self, spec: &PretrainSpec) -> Result<(), LlmError> {
        spec.validate("")
    }

    /// Files a trial reads must exist before anything runs.
    fn check_inputs(&self, spec: &PretrainSpec, exp: &Experiment, _trial: &Trial) -> Result<()> {
        if let Some(p) = &spec.data.path {
            if !p.is_file() {
                return Err(LlmError::Config {
                    origin: exp.location("data.path"),
                    message: format!("data.path: {} does not exist", p.display()),
                }
                .into());
            }
        }
        if let Some(d) = &spec.data.dataset {
            let reg = crate::data::registry::Registry::builtin()?;
            reg.get(d).map_err(|e| LlmError::Config {
                origin: exp.location("data.dataset"),
                message: format!("data.dataset: {e}"),
            })?;
        }
        if let Some(i) = &spec.model.init_from {
            crate::resolve::ModelSource::parse(i).map_err(|e| LlmError::Config {
                origin: exp.location("model.init_from"),
                message: format!("model.init_from: {e:#}"),
            })?;
        }
        if let Some(p) = &spec.model.preset {
            crate::models::GptConfig::load(p).map_err(|e| LlmError::Config {
                origin: exp.location("model.preset"),
                message: format!("model.preset: {e:#}"),
            })?;
        }
        Ok(())
    }

    fn run(&self, spec: &PretrainSpec, _shared: &(), run: &mut TrialRun) -> Result<()> {
        crate::train::trainer::pretrain(spec, run.dir, run.device, run.restart, &mut run.events)
            .map(|_| ())
    }

    /// The same update with another kernel (`train.fused_adamw`) is resumable.
    fn same_run(&self, before: &str, spec: &PretrainSpec) -> bool {
        crate::train::trainer::same_but_fused_adamw(before, spec)
    }
}

//! One file per task `llmlab run` runs, each a [`super::task::Task`] listed in
//! [`super::task::TASKS`].
pub mod classify;
pub mod dpo;
pub mod eval;
pub mod generate;
pub mod instruct;
pub mod pretrain;

use super::{Experiment, Trial};
use crate::error::LlmError;
use anyhow::Result;
use std::path::Path;

/// What a fine-tuning trial reads: a data file or registered data set, and its model.
trait FinetuneInputs {
    /// `(data.path, data.dataset, model.name)`.
    fn inputs(&self) -> (Option<&Path>, Option<&str>, &str);
}

/// A fine-tuning trial's data file or registered data set and its model (`model.name`) must
/// exist before anything runs.
fn check_finetune_inputs(spec: &impl FinetuneInputs, exp: &Experiment, t: &Trial) -> Result<()> {
    let (path, dataset, model) = spec.inputs();
    if let Some(p) = path {
        if !p.is_file() {
            return Err(LlmError::Config {
                origin: exp.origin_of("data.path", t),
                message: format!("data.path: {} does not exist", p.display()),
            }
            .into());
        }
    }
    if let Some(d) = dataset {
        let reg = crate::data::registry::Registry::builtin()?;
        reg.get(d).map_err(|e| LlmError::Config {
            origin: exp.origin_of("data.dataset", t),
            message: format!("data.dataset: {e}"),
        })?;
    }
    // `model: {run: …}` is another name for model.name.
    let key = if exp.base.get("model").and_then(|m| m.get("run")).is_some() {
        "model.run"
    } else {
        "model.name"
    };
    let origin = exp.origin_of(key, t);
    // A path (a run folder to continue from, a file) that is not there: say so, not "unknown".
    if model.contains('/') && !model.contains(':') && !Path::new(model).exists() {
        return Err(LlmError::Config {
            origin,
            message: format!(
                "{key}: {model} does not exist (relative to {}); a run folder is there once the experiment that writes it has run",
                std::env::current_dir().map_or_else(|_| ".".into(), |d| d.display().to_string())
            ),
        }
        .into());
    }
    crate::resolve::LmSpec::parse(model).map_err(|e| LlmError::Config {
        origin,
        message: format!("{key}: {e:#}"),
    })?;
    Ok(())
}

//! Before anything runs: every trial parsed and validated by its task (with the files it reads),
//! and trial folders of earlier runs checked against the settings now resolved.
use super::task::{self, TaskSpec};
use super::{value_text, Experiment, Trial};
use crate::error::LlmError;
use anyhow::Result;
use std::path::Path;

/// Parses and validates every trial, including that the files they read exist; the first
/// problem is returned (nothing has run).
pub fn prepare(exp: &Experiment) -> Result<Vec<(Trial, TaskSpec)>> {
    prepare_with(exp, true)
}

/// As [`prepare`]; `check_files: false` skips the checks of input files and model folders (for
/// an experiment that reads another one's results before that one has run).
pub fn prepare_with(exp: &Experiment, check_files: bool) -> Result<Vec<(Trial, TaskSpec)>> {
    let task = task::find(exp)?;
    let mut out = Vec::new();
    for trial in exp.trials()? {
        let mut doc = trial.doc.clone();
        // Every trial writes under the experiment's name.
        super::set_dotted(
            &mut doc,
            "name",
            serde_yaml::Value::String(exp.name.clone()),
        )
        .map_err(LlmError::Usage)?;
        let t = Trial { doc, ..trial };
        let spec = task.prepare(exp, &t, check_files)?;
        out.push((t, spec));
    }
    Ok(out)
}

/// Trial folders already in `exp_dir` must hold the same settings as the trials now resolved
/// (a finished trial would otherwise be skipped although the file changed); the error lists the
/// trials that differ and the keys, before anything runs.
pub fn check_existing_configs(trials: &[(Trial, TaskSpec)], exp_dir: &Path) -> Result<()> {
    let mut differ = Vec::new();
    for (trial, spec) in trials {
        let path = exp_dir.join(&trial.slug).join("config.yaml");
        let Ok(before) = std::fs::read_to_string(&path) else {
            continue;
        };
        let now = spec.resolved_config()?;
        if before == now || spec.task().same_run(&before, spec) {
            continue;
        }
        let old: serde_yaml::Value = serde_yaml::from_str(&before).unwrap_or_default();
        let new: serde_yaml::Value = serde_yaml::from_str(&now).unwrap_or_default();
        let mut keys = Vec::new();
        diff_keys(&old, &new, "", &mut keys);
        differ.push(format!("{} ({})", path.display(), keys.join(", ")));
    }
    if differ.is_empty() {
        return Ok(());
    }
    Err(LlmError::Usage(format!(
        "{} trial folder(s) hold results of other settings:\n  {}\nrerun with --restart to start them over, or use another --runs folder or experiment name",
        differ.len(),
        differ.join("\n  ")
    ))
    .into())
}

fn diff_keys(a: &serde_yaml::Value, b: &serde_yaml::Value, prefix: &str, out: &mut Vec<String>) {
    match (a, b) {
        (serde_yaml::Value::Mapping(x), serde_yaml::Value::Mapping(y)) => {
            let mut keys: Vec<String> = x.keys().chain(y.keys()).map(value_text).collect();
            keys.sort();
            keys.dedup();
            for k in keys {
                let key = serde_yaml::Value::String(k.clone());
                let null = serde_yaml::Value::Null;
                let path = if prefix.is_empty() {
                    k
                } else {
                    format!("{prefix}.{k}")
                };
                diff_keys(
                    x.get(&key).unwrap_or(&null),
                    y.get(&key).unwrap_or(&null),
                    &path,
                    out,
                );
            }
        }
        _ if a != b => out.push(format!("{prefix}: {} -> {}", value_text(a), value_text(b))),
        _ => {}
    }
}

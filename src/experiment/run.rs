//! Running an experiment's trials: `runs/<experiment>/<trial>/` per trial, each validated before
//! any starts; finished trials are skipped, an interrupted one resumes from its last checkpoint,
//! a failed one is run again, and a trial that fails is recorded with its error while the sweep
//! goes on.
use super::generate_task::GenerateTaskSpec;
use super::{value_text, Experiment, Trial};
use crate::error::{write_atomic, LlmError};
use crate::train::PretrainSpec;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A trial's task settings, parsed and validated.
#[derive(Debug, Clone)]
pub enum TaskSpec {
    Pretrain(Box<PretrainSpec>),
    Generate(Box<GenerateTaskSpec>),
}

/// The tasks `llmlab run` knows so far.
pub const TASKS: &[&str] = &["pretrain", "generate"];

/// What `status.json` of a trial says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrialStatus {
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

pub fn read_status(dir: &Path) -> Option<TrialStatus> {
    let text = std::fs::read_to_string(dir.join("status.json")).ok()?;
    serde_json::from_str(&text).ok()
}

fn write_status(dir: &Path, status: &str, error: Option<String>) -> Result<()> {
    let s = TrialStatus {
        status: status.into(),
        error,
    };
    write_atomic(
        &dir.join("status.json"),
        serde_json::to_string(&s)?.as_bytes(),
    )?;
    Ok(())
}

/// Parses and validates every trial; the first problem is returned (nothing has run).
pub fn prepare(exp: &Experiment) -> Result<Vec<(Trial, TaskSpec)>> {
    if !TASKS.contains(&exp.task.as_str()) {
        return Err(LlmError::Config {
            origin: exp.location("task"),
            message: format!(
                "task: '{}' is not a task llmlab runs yet; expected one of: {}",
                exp.task,
                TASKS.join(", ")
            ),
        }
        .into());
    }
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
        let locate = |e: LlmError| match e {
            LlmError::Config { message, .. } => {
                let key = message.split(':').next().unwrap_or("").trim().to_string();
                LlmError::Config {
                    origin: exp.origin_of(&key, &t),
                    message,
                }
            }
            other => other,
        };
        let task = match exp.task.as_str() {
            "generate" => {
                let spec: GenerateTaskSpec = exp.parse_trial(&t)?;
                spec.validate().map_err(locate)?;
                crate::models::LmSpec::parse(&spec.model).map_err(|e| LlmError::Config {
                    origin: exp.origin_of("model", &t),
                    message: format!("model: {e:#}"),
                })?;
                TaskSpec::Generate(Box::new(spec))
            }
            _ => {
                let spec: PretrainSpec = exp.parse_trial(&t)?;
                spec.validate("").map_err(locate)?;
                check_inputs(&spec, exp)?;
                TaskSpec::Pretrain(Box::new(spec))
            }
        };
        out.push((t, task));
    }
    Ok(out)
}

/// Files a trial reads must exist before anything runs.
fn check_inputs(spec: &PretrainSpec, exp: &Experiment) -> Result<()> {
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
        crate::models::ModelSource::parse(i).map_err(|e| LlmError::Config {
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

/// How a trial ended in this invocation.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Finished,
    Skipped,
    Failed(String),
}

#[derive(Debug, Clone)]
pub struct TrialResult {
    pub slug: String,
    pub dir: PathBuf,
    pub outcome: Outcome,
}

pub struct RunOptions {
    pub runs_root: PathBuf,
    pub device: tch::Device,
    pub threads: Option<usize>,
    pub restart: bool,
}

/// Runs the trials one after the other.
pub fn run(
    exp: &Experiment,
    trials: &[(Trial, TaskSpec)],
    opts: &RunOptions,
    log: &mut dyn FnMut(&str),
) -> Result<Vec<TrialResult>> {
    let root = opts.runs_root.join(&exp.name);
    std::fs::create_dir_all(&root).map_err(|source| LlmError::Io {
        path: root.clone(),
        source,
    })?;
    let mut results = Vec::new();
    for (i, (trial, task)) in trials.iter().enumerate() {
        let dir = root.join(&trial.slug);
        let prior = read_status(&dir);
        let label = format!("[{}/{}] {}", i + 1, trials.len(), trial.slug);
        if !opts.restart && prior.as_ref().is_some_and(|s| s.status == "finished") {
            log(&format!("{label}: finished before, skipped"));
            results.push(TrialResult {
                slug: trial.slug.clone(),
                dir,
                outcome: Outcome::Skipped,
            });
            continue;
        }
        let rerun_failed = prior.as_ref().is_some_and(|s| s.status == "failed");
        let swept: Vec<String> = trial
            .values
            .iter()
            .map(|(k, v)| format!("{k}={}", value_text(v)))
            .collect();
        log(&format!(
            "{label}: {}{}",
            if swept.is_empty() {
                "running".to_string()
            } else {
                swept.join(" ")
            },
            if rerun_failed {
                " (failed before: starting over)"
            } else {
                ""
            }
        ));
        let outcome = match task {
            TaskSpec::Pretrain(spec) => {
                // Threads are not part of a trial's identity (its config.yaml): set them here.
                crate::device::set_threads(opts.threads);
                let spec = (**spec).clone();
                let restart = opts.restart || rerun_failed;
                crate::train::trainer::pretrain(&spec, &dir, opts.device, restart, &mut |m| {
                    log(&format!("  {m}"))
                })
                .map(|_| ())
            }
            TaskSpec::Generate(spec) => {
                crate::device::set_threads(opts.threads);
                super::generate_task::run(spec, &dir, opts.device, &mut |m| log(&format!("  {m}")))
                    .map(|_| ())
            }
        };
        let outcome = match outcome {
            Ok(()) => Outcome::Finished,
            Err(e) => {
                let msg = format!("{e:#}");
                if let Err(w) = std::fs::create_dir_all(&dir)
                    .map_err(anyhow::Error::from)
                    .and_then(|_| write_status(&dir, "failed", Some(msg.clone())))
                {
                    log(&format!("{label}: could not record the failure: {w:#}"));
                }
                log(&format!("{label}: FAILED: {msg}"));
                Outcome::Failed(msg)
            }
        };
        results.push(TrialResult {
            slug: trial.slug.clone(),
            dir,
            outcome,
        });
    }
    Ok(results)
}

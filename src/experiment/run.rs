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

/// Parses and validates every trial, including that the files they read exist; the first
/// problem is returned (nothing has run).
pub fn prepare(exp: &Experiment) -> Result<Vec<(Trial, TaskSpec)>> {
    prepare_with(exp, true)
}

/// As [`prepare`]; `check_files: false` skips the checks of input files and model folders (for
/// an experiment that reads another one's results before that one has run).
pub fn prepare_with(exp: &Experiment, check_files: bool) -> Result<Vec<(Trial, TaskSpec)>> {
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
                if check_files {
                    crate::models::LmSpec::parse(&spec.model).map_err(|e| LlmError::Config {
                        origin: exp.origin_of("model", &t),
                        message: format!("model: {e:#}"),
                    })?;
                }
                TaskSpec::Generate(Box::new(spec))
            }
            _ => {
                let spec: PretrainSpec = exp.parse_trial(&t)?;
                spec.validate("").map_err(locate)?;
                if check_files {
                    check_inputs(&spec, exp)?;
                }
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

/// Progress bars (a sweep bar and one per trial, with loss and ETA) on a terminal; plain log
/// lines otherwise.
struct Progress {
    multi: indicatif::MultiProgress,
    sweep: indicatif::ProgressBar,
    trial: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new(n_trials: usize) -> Self {
        let multi = indicatif::MultiProgress::new();
        let sweep = multi.add(indicatif::ProgressBar::new(n_trials as u64));
        sweep.set_style(
            indicatif::ProgressStyle::with_template("sweep {bar:30} {pos}/{len} trials  {msg}")
                .expect("static template"),
        );
        Self {
            multi,
            sweep,
            trial: None,
        }
    }

    fn log(&self, msg: &str) {
        if self.multi.is_hidden() {
            eprintln!("{msg}");
        } else {
            let _ = self.multi.println(msg);
        }
    }
}

/// Routes a trial's training events to the progress bars (and, later, TensorBoard).
struct TrialEvents<'a> {
    progress: &'a mut Progress,
    label: String,
}

impl crate::train::trainer::TrainEvents for TrialEvents<'_> {
    fn log(&mut self, msg: &str) {
        self.progress.log(&format!("  {msg}"));
    }
    fn start(&mut self, step: usize, total: usize) {
        let bar = self
            .progress
            .multi
            .add(indicatif::ProgressBar::new(total as u64));
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{prefix} {bar:30} {pos}/{len} steps  {msg}  ETA {eta}",
            )
            .expect("static template"),
        );
        bar.set_prefix(self.label.clone());
        bar.set_position(step as u64);
        bar.reset_eta();
        self.progress.trial = Some(bar);
    }
    fn step(&mut self, step: usize, loss: f64) {
        if let Some(b) = &self.progress.trial {
            b.set_position(step as u64);
            b.set_message(format!("loss {loss:.3}"));
        }
    }
}

/// Runs the trials one after the other.
pub fn run(
    exp: &Experiment,
    trials: &[(Trial, TaskSpec)],
    opts: &RunOptions,
) -> Result<Vec<TrialResult>> {
    let mut progress = Progress::new(trials.len());
    let results = run_with(exp, trials, opts, &mut progress);
    if let Some(b) = progress.trial.take() {
        b.finish_and_clear();
    }
    progress.sweep.finish_and_clear();
    results
}

fn run_with(
    exp: &Experiment,
    trials: &[(Trial, TaskSpec)],
    opts: &RunOptions,
    progress: &mut Progress,
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
        progress.sweep.set_position(i as u64);
        progress.sweep.set_message(trial.slug.clone());
        if let Some(b) = progress.trial.take() {
            b.finish_and_clear();
        }
        if !opts.restart && prior.as_ref().is_some_and(|s| s.status == "finished") {
            progress.log(&format!("{label}: finished before, skipped"));
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
        progress.log(&format!(
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
                let mut events = TrialEvents {
                    progress: &mut *progress,
                    label: trial.slug.clone(),
                };
                crate::train::trainer::pretrain(&spec, &dir, opts.device, restart, &mut events)
                    .map(|_| ())
            }
            TaskSpec::Generate(spec) => {
                crate::device::set_threads(opts.threads);
                super::generate_task::run(spec, &dir, opts.device, &mut |m: &str| {
                    progress.log(&format!("  {m}"))
                })
                .map(|_| ())
            }
        };
        let outcome = match outcome {
            Ok(()) => Outcome::Finished,
            // Ctrl-C: the trial saved its state; stop the sweep (rerunning resumes it).
            Err(e)
                if e.downcast_ref::<LlmError>()
                    .is_some_and(|l| matches!(l, LlmError::Interrupted { .. })) =>
            {
                return Err(e);
            }
            Err(e) => {
                let msg = format!("{e:#}");
                if let Err(w) = std::fs::create_dir_all(&dir)
                    .map_err(anyhow::Error::from)
                    .and_then(|_| write_status(&dir, "failed", Some(msg.clone())))
                {
                    progress.log(&format!("{label}: could not record the failure: {w:#}"));
                }
                progress.log(&format!("{label}: FAILED: {msg}"));
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

//! Running an experiment's trials one after the other in this process: `runs/<experiment>/<trial>/`
//! per trial; finished trials are skipped, an interrupted one resumes from its last checkpoint, a
//! failed one is run again, and a trial that fails is recorded with its error while the sweep
//! goes on. Each trial runs through its task ([`super::task`]); `--jobs N` is [`super::jobs`].
use super::events::{self, Progress, TrialEvents};
use super::task::{self, DynTask, TaskSpec, TrialCommand, TrialRun};
use super::{status, Experiment, Trial};
use crate::error::LlmError;
use crate::tensorboard::SessionStatus;
use anyhow::Result;
use std::path::PathBuf;

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
    /// Run only this trial (by slug): one process of a `--jobs` sweep. The experiment's own
    /// records (its TensorBoard hparams, the report) are the parent's.
    pub only_trial: Option<String>,
    /// How to run one trial in a process of its own (see [`TrialCommand`]).
    pub trial_command: Option<Box<TrialCommand>>,
}

/// `runs/<experiment>/`, created.
pub(crate) fn experiment_dir(exp: &Experiment, opts: &RunOptions) -> Result<PathBuf> {
    let root = opts.runs_root.join(&exp.name);
    std::fs::create_dir_all(&root).map_err(|source| LlmError::Io {
        path: root.clone(),
        source,
    })?;
    Ok(root)
}

/// The folder name of the trial `--trial NAME|INDEX` names: a trial's folder name, or its
/// 0-based index in `runs/<experiment>/experiment.json` (the list a Slurm array's task indexes
/// refer to; the order of `--dry-run` when the record is not there yet). `file` is for errors.
pub fn resolve_trial(
    arg: &str,
    trials: &[Trial],
    exp_dir: &std::path::Path,
    file: &std::path::Path,
) -> Result<String, LlmError> {
    let listed = |slug: &str| trials.iter().any(|t| t.slug == slug);
    let Ok(index) = arg.parse::<usize>() else {
        return if listed(arg) {
            Ok(arg.to_string())
        } else {
            Err(LlmError::Usage(format!(
                "--trial {arg}: {} has no such trial (see --dry-run)",
                file.display()
            )))
        };
    };
    let record = exp_dir.join("experiment.json");
    let from_record = std::fs::read_to_string(&record)
        .ok()
        .and_then(|t| serde_json::from_str::<super::report::ExperimentRecord>(&t).ok());
    let slugs: Vec<String> = match &from_record {
        Some(rec) => rec.trials.iter().map(|(s, _)| s.clone()).collect(),
        None => trials.iter().map(|t| t.slug.clone()).collect(),
    };
    let Some(slug) = slugs.get(index) else {
        return Err(LlmError::Usage(format!(
            "--trial {arg}: the experiment has {} trial(s), indexes 0 to {} (see --dry-run)",
            slugs.len(),
            slugs.len().saturating_sub(1)
        )));
    };
    if !listed(slug) {
        return Err(LlmError::Usage(format!(
            "--trial {arg}: {} lists {slug} at index {index}, a trial {} no longer has (its sweep \
             changed since); run or submit the file again to record its trials",
            record.display(),
            file.display()
        )));
    }
    Ok(slug.clone())
}

/// Whether an error is Ctrl-C's: the trial saved its state and resumes when run again.
fn interrupted(e: &anyhow::Error) -> bool {
    e.downcast_ref::<LlmError>()
        .is_some_and(|l| matches!(l, LlmError::Interrupted { .. }))
}

/// Runs the trials one after the other.
pub fn run(
    exp: &Experiment,
    trials: &[(Trial, TaskSpec)],
    opts: &RunOptions,
) -> Result<Vec<TrialResult>> {
    let task = task::find(exp)?;
    if let Some(env) = crate::dist::DistEnv::parse(&|k| std::env::var(k).ok())? {
        if !task.data_parallel() {
            return Err(LlmError::Usage(format!(
                "this process is rank {} of {} ({}), but task: {} trains in one process (data-parallel ranks are for task: pretrain)",
                env.rank,
                env.world,
                env.source,
                task.name()
            ))
            .into());
        }
        if env.rank > 0 {
            return run_rank(exp, task, trials, opts, &env);
        }
    }
    let mut progress = Progress::new(trials.len());
    if opts.only_trial.is_none() {
        if let Err(e) = events::write_tb_experiment(exp, &opts.runs_root.join(&exp.name)) {
            progress.log(&format!("TensorBoard: {e:#}"));
        }
    }
    let results = run_with(exp, task, trials, opts, &mut progress);
    if let Some(b) = progress.trial.take() {
        b.finish_and_clear();
    }
    progress.sweep.finish_and_clear();
    results
}

fn run_with(
    exp: &Experiment,
    task: &dyn DynTask,
    trials: &[(Trial, TaskSpec)],
    opts: &RunOptions,
    progress: &mut Progress,
) -> Result<Vec<TrialResult>> {
    let root = experiment_dir(exp, opts)?;
    let mut results = Vec::new();
    let shared = task.plan(&root, trials);
    for (i, (trial, spec)) in trials.iter().enumerate() {
        if opts.only_trial.as_ref().is_some_and(|s| *s != trial.slug) {
            continue;
        }
        let dir = root.join(&trial.slug);
        let prior = status::read_status(&dir);
        let label = format!("[{}/{}] {}", i + 1, trials.len(), trial.slug);
        progress.sweep.set_position(i as u64);
        progress.sweep.set_message(trial.slug.clone());
        if let Some(b) = progress.trial.take() {
            b.finish_and_clear();
        }
        if !opts.restart && status::is_done(&dir, &exp.evaluate) {
            progress.log(&format!("{label}: finished before, skipped"));
            results.push(TrialResult {
                slug: trial.slug.clone(),
                dir,
                outcome: Outcome::Skipped,
            });
            continue;
        }
        let rerun_failed = prior.as_ref().is_some_and(|s| s.status == "failed");
        progress.log(&format!(
            "{label}: {}",
            events::start_text(trial, rerun_failed)
        ));
        let _running = crate::signal::RunningMarker::new(&dir);
        // Threads are not part of a trial's identity (its config.yaml): set them here.
        crate::device::set_threads(opts.threads);
        let (outcome, tb) = {
            let mut run = TrialRun {
                dir: &dir,
                slug: &trial.slug,
                device: opts.device,
                threads: opts.threads,
                command: opts.trial_command.as_deref(),
                restart: opts.restart || rerun_failed,
                events: TrialEvents::open(&mut *progress, label.clone(), trial, &dir),
            };
            let outcome = spec.task().run(spec, &*shared[i], &mut run);
            if outcome.is_ok() && !exp.evaluate.is_empty() {
                evaluate_trial(&exp.evaluate, &dir, opts.device, &mut run.events);
            }
            (outcome, run.events.tb.take())
        };
        if let Some(mut w) = tb {
            let status = match &outcome {
                Ok(()) => SessionStatus::Success,
                Err(e) if interrupted(e) => SessionStatus::Running,
                Err(_) => SessionStatus::Failure,
            };
            if let Err(e) = w.hparams_session_end(status).and_then(|_| w.flush()) {
                progress.log(&format!("{label}: TensorBoard: {e:#}"));
            }
        }
        let outcome = match outcome {
            Ok(()) => Outcome::Finished,
            // Ctrl-C: the trial saved its state; stop the sweep (rerunning resumes it).
            Err(e) if interrupted(&e) => return Err(e),
            Err(e) => {
                let msg = format!("{e:#}");
                progress.failed(&label, &dir, &msg);
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

/// A rank other than 0 of a data-parallel trial (`RANK`/`WORLD_SIZE` or Slurm's variables; the
/// trial's rank 0 starts the others with `--trial`, or torchrun/srun start them all): it trains
/// its share of every batch and records nothing. Rank 0 holds the trial's folder, status,
/// TensorBoard events and evaluations.
fn run_rank(
    exp: &Experiment,
    task: &dyn DynTask,
    trials: &[(Trial, TaskSpec)],
    opts: &RunOptions,
    env: &crate::dist::DistEnv,
) -> Result<Vec<TrialResult>> {
    let Some(slug) = &opts.only_trial else {
        return Err(LlmError::Usage(format!(
            "this process is rank {} of {} ({}): a rank other than 0 runs one trial, name it with --trial",
            env.rank, env.world, env.source
        ))
        .into());
    };
    let root = experiment_dir(exp, opts)?;
    let shared = task.plan(&root, trials);
    let Some(i) = trials.iter().position(|(t, _)| t.slug == *slug) else {
        return Ok(Vec::new());
    };
    let (trial, spec) = &trials[i];
    let dir = root.join(&trial.slug);
    if !opts.restart && status::is_done(&dir, &exp.evaluate) {
        return Ok(vec![TrialResult {
            slug: trial.slug.clone(),
            dir,
            outcome: Outcome::Skipped,
        }]);
    }
    crate::device::set_threads(opts.threads);
    let mut progress = Progress::hidden();
    let mut run = TrialRun {
        dir: &dir,
        slug: &trial.slug,
        device: opts.device,
        threads: opts.threads,
        command: None,
        restart: opts.restart,
        events: TrialEvents::quiet(&mut progress, trial),
    };
    spec.task().run(spec, &*shared[i], &mut run)?;
    Ok(vec![TrialResult {
        slug: trial.slug.clone(),
        dir,
        outcome: Outcome::Finished,
    }])
}

/// Runs the experiment's `evaluate:` block on the model a finished trial holds (unless its
/// results are there already) and logs the figures. A failure is reported, not fatal: the trial
/// stays finished (its training is not redone) and the next `llmlab run` tries the evaluations
/// again.
fn evaluate_trial(
    list: &[crate::eval::suite::Evaluation],
    dir: &std::path::Path,
    device: tch::Device,
    events: &mut TrialEvents,
) {
    use crate::eval::suite::{load_run_model, run_evaluations, EvalResults};
    use crate::train::trainer::TrainEvents;
    if EvalResults::complete(dir, list) {
        return;
    }
    let names: Vec<&str> = list.iter().map(|e| e.name()).collect();
    events.log(&format!(
        "evaluating the finished model: {}",
        names.join(", ")
    ));
    let result = load_run_model(dir, device)
        .and_then(|lm| run_evaluations(&lm, list, dir, &mut |m: &str| events.log(m)));
    match result {
        Ok(r) => events.eval_figures(&r.figures),
        Err(e) => events.log(&format!(
            "evaluation failed: {e:#}; the trial stays finished and `llmlab run` tries its evaluations again"
        )),
    }
}

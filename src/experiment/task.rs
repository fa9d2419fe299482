//! The tasks `llmlab run` runs, and what the runner needs of each: its spec type, the checks
//! before anything runs, how a trial runs, the metric tags the HParams dashboard compares, and
//! the columns `llmlab report` shows.
//!
//! # Adding a task
//! 1. A new file `tasks/<name>.rs` with a unit struct that implements [`Task`]: its `Spec` (a
//!    serde struct with `deny_unknown_fields`, the trial's `config.yaml`), `validate`,
//!    `check_inputs`, `run` (which calls the library function that does the work), `METRICS`
//!    and `SUMMARY`; `pub mod <name>;` in `tasks/mod.rs`.
//! 2. One line in [`TASKS`]. Nothing else changes: the runners, `--jobs`, `--dry-run`, the
//!    config-drift check, TensorBoard and `llmlab report` reach the task through [`DynTask`].
use super::events::TrialEvents;
use super::{tasks, Experiment, Trial};
use crate::error::LlmError;
use anyhow::Result;
use serde::{de::DeserializeOwned, Serialize};
use std::any::Any;
use std::fmt;
use std::path::Path;
use std::sync::Arc;

/// The tasks `llmlab run` knows, in the order its error messages list them.
pub static TASKS: &[&dyn DynTask] = &[
    &tasks::pretrain::Pretrain,
    &tasks::generate::Generate,
    &tasks::classify::Classify,
    &tasks::instruct::Instruct,
    &tasks::dpo::Dpo,
    &tasks::eval::Eval,
];

/// A task `llmlab run` runs: one trial of an experiment with `task: NAME`.
pub trait Task: Sync + 'static {
    /// The trial's settings, parsed from its YAML; serialized, they are its `config.yaml`.
    type Spec: Serialize + DeserializeOwned + fmt::Debug + Send + Sync + 'static;
    /// What [`Task::plan`] hands each trial (classify: the frozen-prefix cache it shares with
    /// the others); `()` for none.
    type Shared: Default + Send + 'static;
    /// The `task:` value.
    const NAME: &'static str;
    /// The TensorBoard scalar tags the HParams dashboard compares trials by.
    const METRICS: &'static [&'static str];
    /// The columns `llmlab report` shows of a trial's last `metrics.jsonl` record.
    const SUMMARY: Summary;
    /// Whether a trial can run as the ranks of a data-parallel group (`train.nproc`, torchrun,
    /// `srun`); the others refuse a group.
    const DATA_PARALLEL: bool = false;

    /// Range checks; messages start with the key (the caller adds where it is written).
    fn validate(&self, spec: &Self::Spec) -> Result<(), LlmError>;
    /// The files, data sets and models the trial reads must exist before anything runs.
    fn check_inputs(&self, spec: &Self::Spec, exp: &Experiment, trial: &Trial) -> Result<()>;
    /// What each trial shares with the others, from all the experiment's trials, before any runs
    /// (the result has one entry per spec); runs in every process of a `--jobs` sweep alike.
    fn plan(&self, _root: &Path, specs: &[&Self::Spec]) -> Vec<Self::Shared> {
        specs.iter().map(|_| Self::Shared::default()).collect()
    }
    /// Runs (or resumes) one trial in `run.dir`, writing its `status.json` when it finishes.
    fn run(&self, spec: &Self::Spec, shared: &Self::Shared, run: &mut TrialRun) -> Result<()>;
    /// Whether a trial folder's `config.yaml` (`before`, not equal to the spec's) still holds
    /// this trial's results, so it may be skipped or resumed.
    fn same_run(&self, _before: &str, _spec: &Self::Spec) -> bool {
        false
    }
}

/// Which record is a task's and what `llmlab report` shows of it.
#[derive(Debug, Clone, Copy)]
pub struct Summary {
    /// A key only this task's final record has (pretrain: any training evaluation).
    pub marker: &'static str,
    /// The figures to show, in this order (those the record has); empty: every figure.
    pub columns: &'static [&'static str],
}

/// The command line that runs one trial of the experiment, and nothing else, in a process of its
/// own on `threads` threads (`llmlab run FILE --trial SLUG --threads K` with the run's overrides,
/// folders and device): the processes of `--jobs`, and the other ranks of a `train.nproc` trial.
pub type TrialCommand = dyn Fn(&str, usize) -> std::process::Command + Send + Sync;

/// One trial as a task runs it.
pub struct TrialRun<'a> {
    /// The trial's folder (`runs/<experiment>/<trial>/`).
    pub dir: &'a Path,
    /// The trial's folder name.
    pub slug: &'a str,
    pub device: tch::Device,
    /// `--threads` (the trial's share of them under `--jobs`); `None`: all cores.
    pub threads: Option<usize>,
    /// How to start this trial in other processes (the ranks of a data-parallel trial); `None`
    /// where the caller cannot.
    pub command: Option<&'a TrialCommand>,
    /// Start over: `--restart`, or the trial failed before.
    pub restart: bool,
    /// Log lines, progress bars and TensorBoard events.
    pub events: TrialEvents<'a>,
}

/// A [`Task`] without its types, as the registry holds it; implemented for every `Task`.
pub trait DynTask: Sync {
    fn name(&self) -> &'static str;
    fn metric_tags(&self) -> &'static [&'static str];
    fn summary(&self) -> Summary;
    fn data_parallel(&self) -> bool;
    /// Parses and validates a trial (and, with `check_files`, checks its inputs); errors name the
    /// file, line and key.
    fn prepare(
        &'static self,
        exp: &Experiment,
        trial: &Trial,
        check_files: bool,
    ) -> Result<TaskSpec>;
    /// One value per trial, each handed to [`DynTask::run`] with that trial.
    fn plan(&self, root: &Path, trials: &[(Trial, TaskSpec)]) -> Vec<Box<dyn Any + Send>>;
    fn run(&self, spec: &TaskSpec, shared: &(dyn Any + Send), run: &mut TrialRun) -> Result<()>;
    fn same_run(&self, before: &str, spec: &TaskSpec) -> bool;
}

/// The spec of every trial of an experiment prepared by `T` is a `T::Spec`.
fn typed<T: Task>(spec: &TaskSpec) -> &T::Spec {
    spec.spec::<T::Spec>()
        .expect("a trial's spec is of the task that prepared it")
}

impl<T: Task> DynTask for T {
    fn name(&self) -> &'static str {
        T::NAME
    }
    fn metric_tags(&self) -> &'static [&'static str] {
        T::METRICS
    }
    fn summary(&self) -> Summary {
        T::SUMMARY
    }
    fn data_parallel(&self) -> bool {
        T::DATA_PARALLEL
    }
    fn prepare(
        &'static self,
        exp: &Experiment,
        trial: &Trial,
        check_files: bool,
    ) -> Result<TaskSpec> {
        let spec: T::Spec = exp.parse_trial(trial)?;
        // A range error names its key first: add where the trial's value of it comes from.
        self.validate(&spec).map_err(|e| match e {
            LlmError::Config { message, .. } => {
                let key = message.split(':').next().unwrap_or("").trim().to_string();
                LlmError::Config {
                    origin: exp.origin_of(&key, trial),
                    message,
                }
            }
            other => other,
        })?;
        if check_files {
            self.check_inputs(&spec, exp, trial)?;
        }
        Ok(TaskSpec {
            task: self,
            spec: Arc::new(spec),
        })
    }
    fn plan(&self, root: &Path, trials: &[(Trial, TaskSpec)]) -> Vec<Box<dyn Any + Send>> {
        let specs: Vec<&T::Spec> = trials.iter().map(|(_, s)| typed::<T>(s)).collect();
        Task::plan(self, root, &specs)
            .into_iter()
            .map(|s| Box::new(s) as Box<dyn Any + Send>)
            .collect()
    }
    fn run(&self, spec: &TaskSpec, shared: &(dyn Any + Send), run: &mut TrialRun) -> Result<()> {
        let shared = (shared as &dyn Any)
            .downcast_ref::<T::Shared>()
            .expect("a trial's shared context is of the task that planned it");
        Task::run(self, typed::<T>(spec), shared, run)
    }
    fn same_run(&self, before: &str, spec: &TaskSpec) -> bool {
        Task::same_run(self, before, typed::<T>(spec))
    }
}

/// The task an experiment names, or an error listing the tasks there are.
pub fn find(exp: &Experiment) -> Result<&'static dyn DynTask> {
    TASKS
        .iter()
        .copied()
        .find(|t| t.name() == exp.task)
        .ok_or_else(|| {
            let names: Vec<&str> = TASKS.iter().map(|t| t.name()).collect();
            LlmError::Config {
                origin: exp.location("task"),
                message: format!(
                    "task: '{}' is not a task llmlab runs yet; expected one of: {}",
                    exp.task,
                    names.join(", ")
                ),
            }
            .into()
        })
}

/// A spec of some task, serializable to its `config.yaml`.
trait AnySpec: Any + fmt::Debug + Send + Sync {
    fn to_yaml(&self) -> Result<String>;
}

impl<S: Serialize + fmt::Debug + Send + Sync + 'static> AnySpec for S {
    fn to_yaml(&self) -> Result<String> {
        Ok(serde_yaml::to_string(self)?)
    }
}

/// A trial's task settings, parsed and validated by its task.
#[derive(Clone)]
pub struct TaskSpec {
    task: &'static dyn DynTask,
    spec: Arc<dyn AnySpec>,
}

impl TaskSpec {
    /// The task that prepared this spec.
    pub fn task(&self) -> &'static dyn DynTask {
        self.task
    }

    /// The spec as its task's type (`trial.spec::<PretrainSpec>()`); `None` for another type.
    pub fn spec<S: 'static>(&self) -> Option<&S> {
        (&*self.spec as &dyn Any).downcast_ref::<S>()
    }

    /// The `config.yaml` the trial writes (what its folder must hold to be resumed or skipped).
    pub fn resolved_config(&self) -> Result<String> {
        self.spec.to_yaml()
    }
}

impl fmt::Debug for TaskSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TaskSpec")
            .field("task", &self.task.name())
            .field("spec", &self.spec)
            .finish()
    }
}

//! Running an experiment's trials: `runs/<experiment>/<trial>/` per trial, each validated before
//! any starts; finished trials are skipped, an interrupted one resumes from its last checkpoint,
//! a failed one is run again, and a trial that fails is recorded with its error while the sweep
//! goes on. [`run`] runs the trials one after the other in this process; [`run_parallel`]
//! (`--jobs N`) runs N at once, each in a process of its own that runs [`run`] for one trial.
use super::generate_task::GenerateTaskSpec;
use super::{value_text, Experiment, Trial};
use crate::classify::ClassifySpec;
use crate::error::{write_atomic, LlmError};
use crate::instruct::InstructSpec;
use crate::tensorboard::{HParamDomain, HValue, SessionStatus, TbWriter};
use crate::train::PretrainSpec;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// A trial's task settings, parsed and validated.
#[derive(Debug, Clone)]
pub enum TaskSpec {
    Pretrain(Box<PretrainSpec>),
    Generate(Box<GenerateTaskSpec>),
    Classify(Box<ClassifySpec>),
    Instruct(Box<InstructSpec>),
}

/// The tasks `llmlab run` knows so far.
pub const TASKS: &[&str] = &["pretrain", "generate", "classify", "instruct"];

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
                    crate::resolve::LmSpec::parse(&spec.model).map_err(|e| LlmError::Config {
                        origin: exp.origin_of("model", &t),
                        message: format!("model: {e:#}"),
                    })?;
                }
                TaskSpec::Generate(Box::new(spec))
            }
            "classify" => {
                let spec: ClassifySpec = exp.parse_trial(&t)?;
                spec.validate().map_err(locate)?;
                if check_files {
                    check_finetune_inputs(
                        spec.data.path.as_deref(),
                        spec.data.dataset.as_deref(),
                        &spec.model.name,
                        exp,
                        &t,
                    )?;
                }
                TaskSpec::Classify(Box::new(spec))
            }
            "instruct" => {
                let spec: InstructSpec = exp.parse_trial(&t)?;
                spec.validate().map_err(locate)?;
                if check_files {
                    check_finetune_inputs(
                        spec.data.path.as_deref(),
                        spec.data.dataset.as_deref(),
                        &spec.model.name,
                        exp,
                        &t,
                    )?;
                }
                TaskSpec::Instruct(Box::new(spec))
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

/// A fine-tuning trial's data file or registered data set and its model (`model.name`) must
/// exist before anything runs.
fn check_finetune_inputs(
    path: Option<&Path>,
    dataset: Option<&str>,
    model: &str,
    exp: &Experiment,
    t: &Trial,
) -> Result<()> {
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
    crate::resolve::LmSpec::parse(model).map_err(|e| LlmError::Config {
        origin: exp.origin_of("model.name", t),
        message: format!("model.name: {e:#}"),
    })?;
    Ok(())
}

/// For each classification trial, the experiment's frozen-prefix cache folder and the
/// boundaries (blocks from the end) of the other trials that share its prefix.
fn prefix_sharing(
    root: &Path,
    trials: &[(Trial, TaskSpec)],
) -> Vec<crate::classify::train::PrefixSharing> {
    use crate::classify::train::{prefix_key, PrefixSharing};
    use crate::classify::Trainable;
    let from_end = |s: &ClassifySpec| match s.finetune.trainable {
        Trainable::Head | Trainable::HeadAndNorm => Some(0),
        Trainable::LastBlocks(k) => Some(k),
        Trainable::All | Trainable::Lora => None,
    };
    let reusable =
        |s: &ClassifySpec| s.finetune.reuse_frozen && s.model.dropout.unwrap_or(0.0) == 0.0;
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (_, task) in trials {
        if let TaskSpec::Classify(s) = task {
            if let (true, Some(k)) = (reusable(s), from_end(s)) {
                groups.entry(prefix_key(s)).or_default().push(k);
            }
        }
    }
    trials
        .iter()
        .map(|(_, task)| match task {
            TaskSpec::Classify(s) if reusable(s) => {
                let key = prefix_key(s);
                PrefixSharing {
                    dir: Some(root.join(".frozen-prefix").join(&key)),
                    from_end: groups.get(&key).cloned().unwrap_or_default(),
                }
            }
            _ => PrefixSharing::default(),
        })
        .collect()
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

/// The `config.yaml` a trial writes (what its folder must hold to be resumed or skipped).
fn resolved_config(task: &TaskSpec) -> Result<String> {
    Ok(match task {
        TaskSpec::Pretrain(s) => serde_yaml::to_string(s)?,
        TaskSpec::Generate(s) => serde_yaml::to_string(s)?,
        TaskSpec::Classify(s) => serde_yaml::to_string(s)?,
        TaskSpec::Instruct(s) => serde_yaml::to_string(s)?,
    })
}

/// Trial folders already in `exp_dir` must hold the same settings as the trials now resolved
/// (a finished trial would otherwise be skipped although the file changed); the error lists the
/// trials that differ and the keys, before anything runs.
pub fn check_existing_configs(trials: &[(Trial, TaskSpec)], exp_dir: &Path) -> Result<()> {
    let mut differ = Vec::new();
    for (trial, task) in trials {
        let path = exp_dir.join(&trial.slug).join("config.yaml");
        let Ok(before) = std::fs::read_to_string(&path) else {
            continue;
        };
        let now = resolved_config(task)?;
        if before == now {
            continue;
        }
        if let TaskSpec::Pretrain(spec) = task {
            if crate::train::trainer::same_but_fused_adamw(&before, spec) {
                continue; // the same update with another kernel: resumable
            }
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
            indicatif::ProgressStyle::with_template(
                "sweep {bar:30} {pos}/{len} trials  {wide_msg}",
            )
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

/// What a trial's first log line says: its swept values, and whether it starts over.
fn start_text(trial: &Trial, rerun_failed: bool) -> String {
    let swept: Vec<String> = trial
        .values
        .iter()
        .map(|(k, v)| format!("{k}={}", value_text(v)))
        .collect();
    format!(
        "{}{}",
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
    )
}

/// A swept value as a TensorBoard hparam value.
fn hvalue(v: &serde_yaml::Value) -> HValue {
    match v {
        serde_yaml::Value::Bool(b) => HValue::Bool(*b),
        serde_yaml::Value::Number(n) => n
            .as_f64()
            .map(HValue::Number)
            .unwrap_or_else(|| HValue::Str(value_text(v))),
        other => HValue::Str(value_text(other)),
    }
}

/// The experiment's hparams (each axis with its values; an axis mixing kinds becomes strings)
/// and metric tags, written to `runs/<experiment>/` for the HParams dashboard.
fn write_tb_experiment(exp: &Experiment, dir: &Path) -> Result<()> {
    let hparams: Vec<(String, HParamDomain)> = exp
        .axes
        .iter()
        .map(|(k, vals)| {
            let hv: Vec<HValue> = vals.iter().map(hvalue).collect();
            let same_kind = hv
                .windows(2)
                .all(|w| std::mem::discriminant(&w[0]) == std::mem::discriminant(&w[1]));
            let hv = if same_kind {
                hv
            } else {
                vals.iter().map(|v| HValue::Str(value_text(v))).collect()
            };
            (k.clone(), HParamDomain::Discrete(hv))
        })
        .collect();
    let metrics: &[&str] = match exp.task.as_str() {
        "generate" => &[
            "generate/distinct_1",
            "generate/distinct_2",
            "generate/mean_length",
        ],
        "classify" => &[
            "val/accuracy",
            "val/loss",
            "train/accuracy",
            "final/val_accuracy",
            "final/test_accuracy",
        ],
        "instruct" => &[
            "val/loss",
            "train/loss",
            "final/val_response_loss",
            "final/rouge_l",
            "final/exact_match",
        ],
        _ => &["val/loss", "train/loss"],
    };
    let mut w = TbWriter::new(dir)?;
    // One definition per folder: an earlier invocation's may list other axis values.
    w.prune_earlier_files(None)?;
    w.hparams_experiment(&hparams, metrics)?;
    w.flush()
}

/// Routes a trial's training events to the progress bars and TensorBoard.
struct TrialEvents<'a> {
    progress: &'a mut Progress,
    label: String,
    tb: Option<TbWriter>,
}

impl TrialEvents<'_> {
    /// TensorBoard problems are reported, never fatal to training.
    fn tb(&mut self, f: impl FnOnce(&mut TbWriter) -> Result<()>) {
        if let Some(w) = self.tb.as_mut() {
            if let Err(e) = f(w) {
                self.progress.log(&format!(
                    "  TensorBoard: {e:#} (no more events for this trial)"
                ));
                self.tb = None;
            }
        }
    }
}

impl crate::train::trainer::TrainEvents for TrialEvents<'_> {
    fn log(&mut self, msg: &str) {
        self.progress.log(&format!("  {msg}"));
    }
    /// An earlier process's events after `step` are dropped from its event files, so every
    /// step has one point per tag (see `crate::tensorboard`, "Resumed runs").
    fn resume_after(&mut self, step: usize) {
        let step = step as i64;
        self.tb(|w| {
            if w.prune_earlier_files(Some(step))? {
                w.session_restart(step + 1)?;
            }
            Ok(())
        });
    }
    fn eval(&mut self, r: &crate::train::trainer::EvalRecord) {
        let step = r.step as i64;
        self.tb(|w| {
            w.scalar("train/loss", r.train_loss, step)?;
            w.scalar("val/loss", r.val_loss, step)?;
            w.scalar("train/lr", r.lr, step)?;
            w.scalar("train/grad_norm", r.grad_norm, step)?;
            w.scalar("train/tokens_per_sec", r.tokens_per_sec, step)?;
            w.scalar("train/tokens_seen", r.tokens_seen as f64, step)
        });
    }
    fn scalars(&mut self, step: usize, values: &[(&str, f64)]) {
        self.tb(|w| {
            for (tag, v) in values {
                w.scalar(tag, *v, step as i64)?;
            }
            Ok(())
        });
    }
    fn sample(&mut self, step: usize, epoch: usize, text: &str) {
        self.tb(|w| w.text("samples", &format!("epoch {epoch}: {text}"), step as i64));
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
    if opts.only_trial.is_none() {
        if let Err(e) = write_tb_experiment(exp, &opts.runs_root.join(&exp.name)) {
            progress.log(&format!("TensorBoard: {e:#}"));
        }
    }
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
    let sharing = prefix_sharing(&root, trials);
    for (i, (trial, task)) in trials.iter().enumerate() {
        if opts.only_trial.as_ref().is_some_and(|s| *s != trial.slug) {
            continue;
        }
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
        progress.log(&format!("{label}: {}", start_text(trial, rerun_failed)));
        let _running = crate::signal::RunningMarker::new(&dir);
        let tb = match TbWriter::new(&dir).and_then(|mut w| {
            let hp: BTreeMap<String, HValue> = trial
                .values
                .iter()
                .map(|(k, v)| (k.clone(), hvalue(v)))
                .collect();
            w.hparams_session_start(&hp, "")?;
            Ok(w)
        }) {
            Ok(w) => Some(w),
            Err(e) => {
                progress.log(&format!("{label}: TensorBoard: {e:#}"));
                None
            }
        };
        let tb_end;
        let outcome = match task {
            TaskSpec::Pretrain(spec) => {
                // Threads are not part of a trial's identity (its config.yaml): set them here.
                crate::device::set_threads(opts.threads);
                let spec = (**spec).clone();
                let restart = opts.restart || rerun_failed;
                let mut events = TrialEvents {
                    progress: &mut *progress,
                    label: trial.slug.clone(),
                    tb,
                };
                let r =
                    crate::train::trainer::pretrain(&spec, &dir, opts.device, restart, &mut events)
                        .map(|_| ());
                tb_end = events.tb.take();
                r
            }
            TaskSpec::Classify(spec) => {
                crate::device::set_threads(opts.threads);
                let restart = opts.restart || rerun_failed;
                let mut events = TrialEvents {
                    progress: &mut *progress,
                    label: trial.slug.clone(),
                    tb,
                };
                let r = crate::classify::train::run(
                    spec,
                    &dir,
                    opts.device,
                    restart,
                    &sharing[i],
                    &mut events,
                )
                .map(|_| ());
                tb_end = events.tb.take();
                r
            }
            TaskSpec::Instruct(spec) => {
                crate::device::set_threads(opts.threads);
                let restart = opts.restart || rerun_failed;
                let mut events = TrialEvents {
                    progress: &mut *progress,
                    label: trial.slug.clone(),
                    tb,
                };
                let r = crate::instruct::train::run(spec, &dir, opts.device, restart, &mut events)
                    .map(|_| ());
                tb_end = events.tb.take();
                r
            }
            TaskSpec::Generate(spec) => {
                crate::device::set_threads(opts.threads);
                // Generation starts over each time: an earlier attempt's events are stale.
                let mut tb = tb;
                if let Some(Err(e)) = tb.as_ref().map(|w| w.prune_earlier_files(None)) {
                    progress.log(&format!("{label}: TensorBoard: {e:#}"));
                    tb = None;
                }
                let r = super::generate_task::run(spec, &dir, opts.device, &mut |m: &str| {
                    progress.log(&format!("  {m}"))
                });
                if let (Ok((samples, div)), Some(w)) = (&r, tb.as_mut()) {
                    let logged = (|| -> Result<()> {
                        w.scalar("generate/distinct_1", div.distinct_1, 0)?;
                        w.scalar("generate/distinct_2", div.distinct_2, 0)?;
                        w.scalar("generate/mean_length", div.mean_length, 0)?;
                        for (i, p) in spec.prompts.iter().enumerate() {
                            let text: Vec<String> = samples
                                .iter()
                                .filter(|s| &s.prompt == p)
                                .map(|s| format!("**{}** {}", s.prompt, s.text))
                                .collect();
                            w.text(&format!("samples/prompt_{i}"), &text.join("\n\n"), 0)?;
                        }
                        Ok(())
                    })();
                    if let Err(e) = logged {
                        progress.log(&format!("{label}: TensorBoard: {e:#}"));
                    }
                }
                tb_end = tb;
                r.map(|_| ())
            }
        };
        if let Some(mut w) = tb_end {
            let status = match &outcome {
                Ok(()) => SessionStatus::Success,
                Err(e)
                    if e.downcast_ref::<LlmError>()
                        .is_some_and(|l| matches!(l, LlmError::Interrupted { .. })) =>
                {
                    SessionStatus::Running
                }
                Err(_) => SessionStatus::Failure,
            };
            if let Err(e) = w.hparams_session_end(status).and_then(|_| w.flush()) {
                progress.log(&format!("{label}: TensorBoard: {e:#}"));
            }
        }
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

/// How [`run_parallel`] starts the process of one trial.
pub struct Launch<'a> {
    /// Trials running at once (at least 1).
    pub jobs: usize,
    /// `CUDA_VISIBLE_DEVICES` values to spread the processes over, one GPU each (round robin
    /// over the job slots); empty: the variable is left alone. See [`visible_gpus`].
    pub gpus: Vec<String>,
    /// The command line that runs the trial with this slug, on this many threads, and nothing
    /// else (`llmlab run FILE --only-trial SLUG --threads K ...`).
    pub command: &'a dyn Fn(&str, usize) -> std::process::Command,
}

/// The threads each of `jobs` processes gets: an equal share of `threads` (default: the
/// machine's available parallelism), at least 1.
pub fn threads_per_job(threads: Option<usize>, jobs: usize) -> usize {
    let total = threads.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(usize::from)
            .unwrap_or(1)
    });
    (total / jobs.max(1)).max(1)
}

/// The GPUs a `--jobs` sweep hands out one per process: with `--device auto|cuda` on a machine
/// where libtorch sees several CUDA devices, their `CUDA_VISIBLE_DEVICES` names (the entries of
/// an inherited `CUDA_VISIBLE_DEVICES`, else `0..n`); otherwise none (a single GPU is shared, an
/// explicit `cuda:N` is kept as given).
pub fn visible_gpus(device: &str) -> Vec<String> {
    if device != "auto" && device != "cuda" {
        return Vec::new();
    }
    let n = usize::try_from(tch::Cuda::device_count()).unwrap_or(0);
    if n < 2 {
        return Vec::new();
    }
    match std::env::var("CUDA_VISIBLE_DEVICES") {
        Ok(list) if !list.trim().is_empty() => list
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .take(n)
            .collect(),
        _ => (0..n).map(|i| i.to_string()).collect(),
    }
}

/// A trial's process while it runs.
struct Running {
    index: usize,
    slot: usize,
    child: std::process::Child,
    started: std::time::Instant,
}

/// Runs up to `launch.jobs` trials at once, each in a process of its own (see [`Launch`]) that
/// writes its output to `<trial>/log.txt`; this process shows the sweep's progress and a line
/// per trial as it starts and ends. Finished trials are skipped as in [`run`]; each process
/// resumes, restarts or records its trial exactly as [`run`] does, so the folders (and, with the
/// same threads per trial, the numbers) are those of a sequential run. A trial whose process
/// ends without recording its outcome (a crash) is recorded as failed. Ctrl-C passes on to the
/// running trials (each saves its state), starts no more, and ends with
/// [`LlmError::SweepInterrupted`].
pub fn run_parallel(
    exp: &Experiment,
    trials: &[(Trial, TaskSpec)],
    opts: &RunOptions,
    launch: &Launch,
) -> Result<Vec<TrialResult>> {
    let root = opts.runs_root.join(&exp.name);
    std::fs::create_dir_all(&root).map_err(|source| LlmError::Io {
        path: root.clone(),
        source,
    })?;
    let progress = Progress::new(trials.len());
    if let Err(e) = write_tb_experiment(exp, &root) {
        progress.log(&format!("TensorBoard: {e:#}"));
    }
    let jobs = launch.jobs.max(1);
    let threads = threads_per_job(opts.threads, jobs);
    let n = trials.len();
    let label = |i: usize| format!("[{}/{n}] {}", i + 1, trials[i].0.slug);
    let mut results: Vec<Option<TrialResult>> = vec![None; n];
    let mut pending = std::collections::VecDeque::new();
    for (i, (trial, _)) in trials.iter().enumerate() {
        let dir = root.join(&trial.slug);
        if !opts.restart && read_status(&dir).is_some_and(|s| s.status == "finished") {
            progress.log(&format!("{}: finished before, skipped", label(i)));
            results[i] = Some(TrialResult {
                slug: trial.slug.clone(),
                dir,
                outcome: Outcome::Skipped,
            });
        } else {
            pending.push_back(i);
        }
    }
    let done = |results: &[Option<TrialResult>]| results.iter().flatten().count() as u64;
    progress.sweep.set_position(done(&results));
    let mut running: Vec<Running> = Vec::new();
    let mut free_slots: Vec<usize> = (0..jobs).rev().collect();
    let mut stopped: Vec<String> = Vec::new();
    loop {
        while !crate::signal::interrupted() && running.len() < jobs {
            let Some(i) = pending.pop_front() else { break };
            let slot = free_slots
                .pop()
                .expect("a free slot while fewer than jobs run");
            let gpu = (!launch.gpus.is_empty()).then(|| &launch.gpus[slot % launch.gpus.len()]);
            let trial = &trials[i].0;
            let dir = root.join(&trial.slug);
            let rerun_failed = read_status(&dir).is_some_and(|s| s.status == "failed");
            match spawn_trial(launch, &trial.slug, threads, gpu, &dir) {
                Ok(child) => {
                    progress.log(&format!(
                        "{}: started: {} ({threads} thread{}{}; log: {})",
                        label(i),
                        start_text(trial, rerun_failed),
                        if threads == 1 { "" } else { "s" },
                        gpu.map(|g| format!(", GPU {g}")).unwrap_or_default(),
                        dir.join("log.txt").display()
                    ));
                    running.push(Running {
                        index: i,
                        slot,
                        child,
                        started: std::time::Instant::now(),
                    });
                }
                Err(e) => {
                    free_slots.push(slot);
                    let msg = format!("{e:#}");
                    record_failure(&progress, &label(i), &dir, &msg);
                    results[i] = Some(TrialResult {
                        slug: trial.slug.clone(),
                        dir,
                        outcome: Outcome::Failed(msg),
                    });
                }
            }
        }
        let mut k = 0;
        while k < running.len() {
            let status = match crate::signal::try_wait_child(&mut running[k].child) {
                Ok(None) => {
                    k += 1;
                    continue;
                }
                Ok(Some(status)) => Ok(status),
                Err(e) => Err(e),
            };
            let r = running.swap_remove(k);
            free_slots.push(r.slot);
            let trial = &trials[r.index].0;
            let dir = root.join(&trial.slug);
            let secs = r.started.elapsed().as_secs_f64();
            let outcome = match status {
                Ok(s)
                    if s.success() && read_status(&dir).is_some_and(|t| t.status == "finished") =>
                {
                    let metrics: Vec<String> = super::report::final_metrics(&dir)
                        .iter()
                        .map(|(k, v)| {
                            if v.fract() == 0.0 && v.abs() < 1e15 {
                                format!("{k} {v:.0}")
                            } else {
                                format!("{k} {v:.4}")
                            }
                        })
                        .collect();
                    progress.log(&format!(
                        "{}: finished in {secs:.0}s{}{}",
                        label(r.index),
                        if metrics.is_empty() { "" } else { ": " },
                        metrics.join(", ")
                    ));
                    Some(Outcome::Finished)
                }
                // The trial recorded its failure (exit 1, status.json with the error).
                Ok(s)
                    if s.code() == Some(1)
                        && read_status(&dir).is_some_and(|t| t.status == "failed") =>
                {
                    let msg = read_status(&dir).and_then(|t| t.error).unwrap_or_default();
                    progress.log(&format!("{}: FAILED: {msg}", label(r.index)));
                    Some(Outcome::Failed(msg))
                }
                // Ctrl-C (ours, passed on, or one sent to the trial itself): it saved its state.
                Ok(s) if s.code() == Some(130) || crate::signal::interrupted() => {
                    if !crate::signal::interrupted() {
                        progress.log(&format!(
                            "{}: interrupted; stopping the sweep",
                            label(r.index)
                        ));
                        crate::signal::stop_children();
                    }
                    stopped.push(trial.slug.clone());
                    None
                }
                other => {
                    let how = match other {
                        Ok(s) => format!("its process ended ({s})"),
                        Err(e) => format!("waiting for its process failed ({e})"),
                    };
                    let msg = format!(
                        "{how} without recording an outcome{}; see {}",
                        last_line(&dir.join("log.txt"))
                            .map(|l| format!(": {l}"))
                            .unwrap_or_default(),
                        dir.join("log.txt").display()
                    );
                    record_failure(&progress, &label(r.index), &dir, &msg);
                    Some(Outcome::Failed(msg))
                }
            };
            if let Some(outcome) = outcome {
                results[r.index] = Some(TrialResult {
                    slug: trial.slug.clone(),
                    dir,
                    outcome,
                });
            }
        }
        if running.is_empty() && (pending.is_empty() || crate::signal::interrupted()) {
            break;
        }
        progress.sweep.set_position(done(&results));
        let mut names: Vec<&str> = running
            .iter()
            .map(|r| trials[r.index].0.slug.as_str())
            .collect();
        names.sort_unstable();
        progress
            .sweep
            .set_message(format!("running: {}", names.join(", ")));
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    progress.sweep.finish_and_clear();
    if crate::signal::interrupted() {
        return Err(LlmError::SweepInterrupted { stopped, dir: root }.into());
    }
    Ok(results.into_iter().flatten().collect())
}

/// Starts one trial's process: output appended to `<trial>/log.txt`, a process group of its own
/// (the terminal's Ctrl-C reaches only this process, which passes it on once), and on Linux a
/// SIGINT when this process dies, so a killed sweep leaves no trial running unattended.
fn spawn_trial(
    launch: &Launch,
    slug: &str,
    threads: usize,
    gpu: Option<&String>,
    dir: &Path,
) -> Result<std::process::Child> {
    use std::io::Write;
    std::fs::create_dir_all(dir).map_err(|source| LlmError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    let log_path = dir.join("log.txt");
    let io = |source| LlmError::Io {
        path: log_path.clone(),
        source,
    };
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(io)?;
    let mut cmd = (launch.command)(slug, threads);
    if let Some(g) = gpu {
        cmd.env("CUDA_VISIBLE_DEVICES", g);
    }
    writeln!(
        log,
        "--- {}{cmd:?}",
        gpu.map(|g| format!("CUDA_VISIBLE_DEVICES={g} "))
            .unwrap_or_default()
    )
    .map_err(io)?;
    cmd.stdin(std::process::Stdio::null())
        .stdout(log.try_clone().map_err(io)?)
        .stderr(log);
    detach(&mut cmd);
    let child = cmd
        .spawn()
        .map_err(|e| anyhow::anyhow!("cannot start the trial's process ({e})"))?;
    crate::signal::add_child(child.id());
    Ok(child)
}

#[allow(unsafe_code)]
fn detach(cmd: &mut std::process::Command) {
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        cmd.process_group(0);
        #[cfg(target_os = "linux")]
        {
            // SAFETY: the closure runs in the forked child before exec and calls only
            // async-signal-safe functions (prctl, getppid); it allocates nothing.
            let parent = std::process::id() as libc::pid_t;
            unsafe {
                cmd.pre_exec(move || {
                    if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGINT) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    // The parent died before the prctl: no signal will come.
                    if libc::getppid() != parent {
                        return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
                    }
                    Ok(())
                });
            }
        }
    }
}

/// Writes a failed `status.json` (as [`run`] does for a trial that fails) and says so.
fn record_failure(progress: &Progress, label: &str, dir: &Path, msg: &str) {
    if let Err(w) = std::fs::create_dir_all(dir)
        .map_err(anyhow::Error::from)
        .and_then(|_| write_status(dir, "failed", Some(msg.to_string())))
    {
        progress.log(&format!("{label}: could not record the failure: {w:#}"));
    }
    progress.log(&format!("{label}: FAILED: {msg}"));
}

/// The last non-empty line of a log file.
fn last_line(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .rev()
        .find(|l| !l.trim().is_empty())
        .map(|l| l.trim().to_string())
}

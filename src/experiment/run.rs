//! Running an experiment's trials: `runs/<experiment>/<trial>/` per trial, each validated before
//! any starts; finished trials are skipped, an interrupted one resumes from its last checkpoint,
//! a failed one is run again, and a trial that fails is recorded with its error while the sweep
//! goes on.
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
                    crate::models::LmSpec::parse(&spec.model).map_err(|e| LlmError::Config {
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
                    check_classify_inputs(&spec, exp, &t)?;
                }
                TaskSpec::Classify(Box::new(spec))
            }
            "instruct" => {
                let spec: InstructSpec = exp.parse_trial(&t)?;
                spec.validate().map_err(locate)?;
                if check_files {
                    check_instruct_inputs(&spec, exp, &t)?;
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

/// A classification trial's data set or file and its model must exist before anything runs.
fn check_classify_inputs(spec: &ClassifySpec, exp: &Experiment, t: &Trial) -> Result<()> {
    if let Some(p) = &spec.data.path {
        if !p.is_file() {
            return Err(LlmError::Config {
                origin: exp.origin_of("data.path", t),
                message: format!("data.path: {} does not exist", p.display()),
            }
            .into());
        }
    }
    if let Some(d) = &spec.data.dataset {
        let reg = crate::data::registry::Registry::builtin()?;
        reg.get(d).map_err(|e| LlmError::Config {
            origin: exp.origin_of("data.dataset", t),
            message: format!("data.dataset: {e}"),
        })?;
    }
    crate::models::LmSpec::parse(&spec.model.name).map_err(|e| LlmError::Config {
        origin: exp.origin_of("model.name", t),
        message: format!("model.name: {e:#}"),
    })?;
    Ok(())
}

/// An instruction trial's data set or file and its model must exist before anything runs.
fn check_instruct_inputs(spec: &InstructSpec, exp: &Experiment, t: &Trial) -> Result<()> {
    if let Some(p) = &spec.data.path {
        if !p.is_file() {
            return Err(LlmError::Config {
                origin: exp.origin_of("data.path", t),
                message: format!("data.path: {} does not exist", p.display()),
            }
            .into());
        }
    }
    if let Some(d) = &spec.data.dataset {
        let reg = crate::data::registry::Registry::builtin()?;
        reg.get(d).map_err(|e| LlmError::Config {
            origin: exp.origin_of("data.dataset", t),
            message: format!("data.dataset: {e}"),
        })?;
    }
    crate::models::LmSpec::parse(&spec.model.name).map_err(|e| LlmError::Config {
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
        Trainable::Head | Trainable::LastLayer => Some(0),
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
    if let Err(e) = write_tb_experiment(exp, &opts.runs_root.join(&exp.name)) {
        progress.log(&format!("TensorBoard: {e:#}"));
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
                let r = super::generate_task::run(spec, &dir, opts.device, &mut |m: &str| {
                    progress.log(&format!("  {m}"))
                });
                let mut tb = tb;
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

//! What a sweep shows and records while it runs: progress bars (or plain log lines off a
//! terminal), and each trial's training events routed to its TensorBoard event files; the
//! experiment's HParams definition, with the metric tags its task names.
use super::{status, task, value_text, Experiment, Trial};
use crate::tensorboard::{HParamDomain, HValue, TbWriter};
use anyhow::Result;
use std::collections::BTreeMap;
use std::path::Path;

/// Progress bars (a sweep bar and one per trial, with loss and ETA) on a terminal; plain log
/// lines otherwise.
pub(crate) struct Progress {
    multi: indicatif::MultiProgress,
    pub(crate) sweep: indicatif::ProgressBar,
    pub(crate) trial: Option<indicatif::ProgressBar>,
    quiet: bool,
}

impl Progress {
    pub(crate) fn new(n_trials: usize) -> Self {
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
            quiet: false,
        }
    }

    /// Shows nothing and logs nothing (the other ranks of a data-parallel trial).
    pub(crate) fn hidden() -> Self {
        let multi =
            indicatif::MultiProgress::with_draw_target(indicatif::ProgressDrawTarget::hidden());
        let sweep = multi.add(indicatif::ProgressBar::hidden());
        Self {
            multi,
            sweep,
            trial: None,
            quiet: true,
        }
    }

    pub(crate) fn log(&self, msg: &str) {
        if self.quiet {
            return;
        }
        if self.multi.is_hidden() {
            eprintln!("{msg}");
        } else {
            let _ = self.multi.println(msg);
        }
    }

    /// Records a failed `status.json` for the trial in `dir` and says so.
    pub(crate) fn failed(&self, label: &str, dir: &Path, msg: &str) {
        if let Err(w) = status::write_failed(dir, msg) {
            self.log(&format!("{label}: could not record the failure: {w:#}"));
        }
        self.log(&format!("{label}: FAILED: {msg}"));
    }
}

/// What a trial's first log line says: its swept values, and whether it starts over.
pub(crate) fn start_text(trial: &Trial, rerun_failed: bool) -> String {
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
/// and its task's metric tags, written to `runs/<experiment>/` for the HParams dashboard.
pub fn write_tb_experiment(exp: &Experiment, dir: &Path) -> Result<()> {
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
    let mut metrics: Vec<&str> = task::find(exp)?.metric_tags().to_vec();
    if !exp.evaluate.is_empty() {
        metrics.extend(
            EVAL_METRICS
                .iter()
                .filter(|m| !metrics.contains(m))
                .collect::<Vec<_>>(),
        );
    }
    let mut w = TbWriter::new(dir)?;
    // One definition per folder: an earlier invocation's may list other axis values.
    w.prune_earlier_files(None)?;
    w.hparams_experiment(&hparams, &metrics)?;
    w.flush()
}

/// The TensorBoard tags of the figures an `evaluate:` block or `task: eval` logs (each
/// `eval/<figure>` of [`crate::eval::suite::EvalFigures`]) that the HParams dashboard compares.
pub const EVAL_METRICS: &[&str] = &[
    "eval/mmlu_accuracy",
    "eval/mmlu_macro_accuracy",
    "eval/perplexity",
    "eval/rouge_l",
    "eval/judge_score",
];

impl TrialEvents<'_> {
    /// Logs evaluation figures as scalars `eval/<name>` at step 0.
    pub fn eval_figures(&mut self, figures: &crate::eval::suite::EvalFigures) {
        let logged = self.tb.as_mut().map(|w| -> anyhow::Result<()> {
            for (name, v) in figures {
                w.scalar(&format!("eval/{name}"), *v, 0)?;
            }
            w.flush()
        });
        if let Some(Err(e)) = logged {
            self.tb_problem(&e);
        }
    }
}

/// Routes a trial's training events to the progress bars and TensorBoard.
pub struct TrialEvents<'a> {
    progress: &'a mut Progress,
    /// The trial's log prefix (`[2/6] lr-0.001`).
    label: String,
    /// The trial's folder name (its progress bar's prefix).
    slug: String,
    /// The trial's event files; `None` after a TensorBoard problem (reported once).
    pub tb: Option<TbWriter>,
}

impl<'a> TrialEvents<'a> {
    /// Opens the trial's event files in `dir` and starts its HParams session with its swept
    /// values; a TensorBoard problem is reported and the trial runs without events.
    pub(crate) fn open(
        progress: &'a mut Progress,
        label: String,
        trial: &Trial,
        dir: &Path,
    ) -> Self {
        let tb = match TbWriter::new(dir).and_then(|mut w| {
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
        Self {
            progress,
            label,
            slug: trial.slug.clone(),
            tb,
        }
    }

    /// Events that go nowhere: no event files, no lines (the other ranks of a data-parallel
    /// trial, which train and record nothing).
    pub(crate) fn quiet(progress: &'a mut Progress, trial: &Trial) -> Self {
        Self {
            progress,
            label: trial.slug.clone(),
            slug: trial.slug.clone(),
            tb: None,
        }
    }

    /// Reports a TensorBoard problem on the trial's line (training goes on).
    pub fn tb_problem(&self, e: &anyhow::Error) {
        self.progress
            .log(&format!("{}: TensorBoard: {e:#}", self.label));
    }

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
        bar.set_prefix(self.slug.clone());
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

//! The `eval` task: a list of evaluations ([`crate::eval::suite`]) of one model, or of every
//! finished trial of another experiment (`models_from:`, a sweep over `model`), so trials
//! trained earlier are compared on benchmarks in TensorBoard's HParams view and `llmlab report`.
//!
//! ```yaml
//! name: eval-freeze-sweep
//! task: eval
//! models_from: runs/freeze-sweep        # or  model: smollm2-135m-instruct  (any --model spec,
//!                                       # a run folder included)
//! evaluations:
//!   - mmlu: {subjects: "anatomy,virology", shots: 0, style: cloze, limit: 20}
//!   - perplexity: {dataset: middlemarch, max_tokens: 4096, max_length: 512, stride: 256}
//! ```
//!
//! A trial writes `evaluations.json` (every result), `metrics.jsonl` (one record: the flat
//! figures and `evaluations`, their count), `eval/*` scalars and `status.json`. MMLU's
//! predictions go to `mmlu_predictions.jsonl`, from which an interrupted trial resumes.
use super::super::events::EVAL_METRICS;
use super::super::task::{Summary, Task, TrialRun};
use super::super::{Experiment, Trial};
use crate::error::{write_atomic, LlmError};
use crate::eval::suite::{self, load_run_model, run_evaluations, Evaluation, RESULTS};
use crate::train::trainer::TrainEvents;
use crate::train::RunDir;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalTaskSpec {
    pub name: String,
    pub task: String,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// A model spec as `llmlab generate --model` takes it, or a finished run folder (a
    /// classifier is evaluated as the language model its fine-tuned blocks make with the base
    /// model's output head).
    pub model: String,
    pub evaluations: Vec<Evaluation>,
}

fn default_seed() -> u64 {
    123
}

pub struct Eval;

impl Task for Eval {
    type Spec = EvalTaskSpec;
    type Shared = ();
    const NAME: &'static str = "eval";
    const METRICS: &'static [&'static str] = EVAL_METRICS;
    /// Every figure.
    const SUMMARY: Summary = Summary {
        marker: "evaluations",
        columns: &[],
    };

    fn validate(&self, spec: &EvalTaskSpec) -> Result<(), LlmError> {
        if spec.evaluations.is_empty() {
            return Err(LlmError::Config {
                origin: String::new(),
                message:
                    "evaluations: empty; expected a list such as [{mmlu: {subjects: anatomy}}]"
                        .into(),
            });
        }
        suite::validate("evaluations", &spec.evaluations)
    }

    fn check_inputs(&self, spec: &EvalTaskSpec, exp: &Experiment, trial: &Trial) -> Result<()> {
        if !Path::new(&spec.model).is_dir() {
            crate::resolve::LmSpec::parse(&spec.model).map_err(|e| LlmError::Config {
                origin: exp.origin_of("model", trial),
                message: format!("model: {e:#}"),
            })?;
        }
        Ok(())
    }

    fn run(&self, spec: &EvalTaskSpec, _shared: &(), run: &mut TrialRun) -> Result<()> {
        let yaml = serde_yaml::to_string(spec)?;
        let dir = RunDir::open(run.dir, &yaml, run.restart, &[RESULTS], None, "folder")?;
        let ev = &mut run.events;
        if dir.finished()? {
            ev.log("evaluated before (pass --restart to evaluate again)");
            return Ok(());
        }
        crate::device::seed_everything(spec.seed);
        let lm = load_run_model(Path::new(&spec.model), run.device)?;
        let r = run_evaluations(&lm, &spec.evaluations, run.dir, &mut |m: &str| ev.log(m))?;
        let mut record = serde_json::Map::new();
        record.insert("evaluations".into(), spec.evaluations.len().into());
        for (k, v) in &r.figures {
            record.insert(k.clone(), (*v).into());
        }
        write_atomic(
            &dir.metrics_path(),
            (serde_json::Value::Object(record).to_string() + "\n").as_bytes(),
        )?;
        ev.eval_figures(&r.figures);
        dir.finish(None)
    }
}

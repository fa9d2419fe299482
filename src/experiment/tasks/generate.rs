//! The `generate` task: for a model and prompts, sample continuations with the trial's settings
//! (so a sweep over `generate.temperature` / `generate.top_k` compares them) and record the
//! samples plus simple diversity figures: distinct-1/2 (unique token n-grams over all n-grams of
//! the samples, Li et al. 2016) and the mean length in tokens.
//!
//! ```yaml
//! name: temperature-sweep
//! task: generate
//! model: smollm2-135m-instruct          # any --model spec
//! prompts: ["Once upon a time", "The best way to learn"]
//! chat: false                           # true: each prompt as a user turn of the model's chat
//!                                       # template; false: as is (an instruct run folder: in the
//!                                       # prompt style it learned, as `llmlab generate` does)
//! dtype: f32                            # f32 | bf16 | q4 (as --dtype)
//! generate: {max_new_tokens: 40, temperature: 0.7, top_k: 50, top_p: null, samples: 3}
//! sweep: {generate.temperature: [0.0, 0.7, 1.4]}
//! ```
use super::super::task::{Summary, Task, TrialRun};
use super::super::{Experiment, Trial};
use crate::chat::Message;
use crate::error::{write_atomic, LlmError};
use crate::generate::GenerateSpec;
use crate::request::{build_prompt, Mode};
use crate::resolve::{InferenceDtype, LoadedLm};
use crate::train::trainer::TrainEvents;
use crate::train::RunDir;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::Path;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GenerateTaskSpec {
    pub name: String,
    pub task: String,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// A model spec as `llmlab generate --model` takes it.
    pub model: String,
    pub prompts: Vec<String>,
    #[serde(default)]
    pub chat: bool,
    /// Inference weights: f32, bf16 or q4 (as `llmlab generate --dtype`).
    #[serde(default)]
    pub dtype: InferenceDtype,
    #[serde(default)]
    pub generate: Sampling,
}

fn default_seed() -> u64 {
    123
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Sampling {
    pub max_new_tokens: usize,
    pub temperature: f64,
    pub top_k: Option<i64>,
    pub top_p: Option<f64>,
    /// Samples per prompt (seeded `seed`, `seed + 1`, ...).
    pub samples: usize,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            max_new_tokens: 40,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            samples: 1,
        }
    }
}

impl GenerateTaskSpec {
    /// Range checks; messages start with the key.
    pub fn validate(&self) -> Result<(), LlmError> {
        let bad = |m: String| LlmError::Config {
            origin: String::new(),
            message: m,
        };
        if self.prompts.is_empty() {
            return Err(bad("prompts: give at least one prompt".into()));
        }
        if self.generate.samples == 0 {
            return Err(bad("generate.samples: must be at least 1".into()));
        }
        if self.generate.max_new_tokens == 0 {
            return Err(bad("generate.max_new_tokens: must be at least 1".into()));
        }
        let t = self.generate.temperature;
        if !(t >= 0.0 && t.is_finite()) {
            return Err(bad(format!(
                "generate.temperature: {t}: expected a finite value >= 0"
            )));
        }
        if let Some(k) = self.generate.top_k.filter(|&k| k < 1) {
            return Err(bad(format!(
                "generate.top_k: {k}: expected an integer >= 1"
            )));
        }
        if let Some(p) = self.generate.top_p.filter(|&p| !(p > 0.0 && p <= 1.0)) {
            return Err(bad(format!(
                "generate.top_p: {p}: expected a value in (0, 1]"
            )));
        }
        Ok(())
    }
}

/// Distinct-n: unique n-grams / all n-grams over the token sequences (0 when there are none).
pub fn distinct_n(seqs: &[Vec<i64>], n: usize) -> f64 {
    let mut all = 0usize;
    let mut uniq = HashSet::new();
    for s in seqs {
        for w in s.windows(n) {
            all += 1;
            uniq.insert(w.to_vec());
        }
    }
    if all == 0 {
        0.0
    } else {
        uniq.len() as f64 / all as f64
    }
}

/// A trial's samples, one [`Sample`] a line.
const SAMPLES: &str = "samples.jsonl";

/// One generated sample (a line of `samples.jsonl`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sample {
    pub prompt: String,
    pub sample: usize,
    pub seed: u64,
    pub text: String,
    pub ids: Vec<i64>,
}

/// The figures of a trial (`metrics.jsonl`'s one record).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Diversity {
    pub distinct_1: f64,
    pub distinct_2: f64,
    pub mean_length: f64,
    pub tokens_per_sec: f64,
}

/// Runs a generate trial in `dir`, returning the samples and figures. Sampling starts over each
/// time (there is nothing to resume), so the folder is opened as with `--restart`: what an
/// earlier attempt left (its status, records and samples) goes before anything is written.
pub fn run(
    spec: &GenerateTaskSpec,
    dir: &Path,
    device: tch::Device,
    log: &mut dyn FnMut(&str),
) -> Result<(Vec<Sample>, Diversity)> {
    let yaml = serde_yaml::to_string(spec)?;
    let run_dir = RunDir::open(dir, &yaml, true, &[SAMPLES], None, "folder")?;
    let mut lm = LoadedLm::load(&spec.model, device)?;
    lm.set_dtype(spec.dtype)?;
    let mut samples = Vec::new();
    let (mut tokens, mut seconds) = (0usize, 0f64);
    for prompt in &spec.prompts {
        let messages = [Message::new("user", prompt)];
        let mode = if spec.chat {
            Mode::Template {
                system: None,
                messages: &messages,
            }
        } else {
            Mode::Instruction {
                instruction: prompt,
                input: None,
            }
        };
        let built = build_prompt(&lm, &mode)
            .map_err(|e| LlmError::Usage(format!("chat: {}: {e}", spec.chat)))?;
        let ids = lm.encode_prompt(&built.text)?;
        for i in 0..spec.generate.samples {
            let seed = spec.seed + i as u64;
            let g = GenerateSpec {
                max_new_tokens: spec.generate.max_new_tokens,
                temperature: spec.generate.temperature,
                top_k: spec.generate.top_k,
                top_p: spec.generate.top_p,
                seed: Some(seed),
                eos_id: lm.eos_id,
                stop_ids: built.stop_ids.clone(),
                use_cache: true,
            };
            let out = lm.generate_stream(&ids, &g, |_| true)?;
            tokens += out.ids.len();
            seconds += out.prompt_seconds + out.decode_seconds;
            let text = built.response(&lm.decode(&out.ids)?);
            log(&format!("{prompt:?} #{i}: {}", text.replace('\n', " ")));
            samples.push(Sample {
                prompt: prompt.clone(),
                sample: i,
                seed,
                text,
                ids: out.ids,
            });
        }
    }
    let seqs: Vec<Vec<i64>> = samples.iter().map(|s| s.ids.clone()).collect();
    let div = Diversity {
        distinct_1: distinct_n(&seqs, 1),
        distinct_2: distinct_n(&seqs, 2),
        mean_length: seqs.iter().map(Vec::len).sum::<usize>() as f64 / seqs.len().max(1) as f64,
        tokens_per_sec: tokens as f64 / seconds.max(1e-9),
    };
    let lines: String = samples
        .iter()
        .map(|s| serde_json::to_string(s).map(|l| l + "\n"))
        .collect::<Result<_, _>>()?;
    write_atomic(&dir.join(SAMPLES), lines.as_bytes())?;
    write_atomic(
        &run_dir.metrics_path(),
        (serde_json::to_string(&div)? + "\n").as_bytes(),
    )?;
    run_dir.finish(None)?;
    Ok((samples, div))
}

pub struct Generate;

impl Task for Generate {
    type Spec = GenerateTaskSpec;
    type Shared = ();
    const NAME: &'static str = "generate";
    const METRICS: &'static [&'static str] = &[
        "generate/distinct_1",
        "generate/distinct_2",
        "generate/mean_length",
    ];
    /// Every figure of [`Diversity`].
    const SUMMARY: Summary = Summary {
        marker: "distinct_1",
        columns: &[],
    };

    fn validate(&self, spec: &GenerateTaskSpec) -> Result<(), LlmError> {
        spec.validate()
    }

    fn check_inputs(&self, spec: &GenerateTaskSpec, exp: &Experiment, trial: &Trial) -> Result<()> {
        crate::resolve::LmSpec::parse(&spec.model).map_err(|e| LlmError::Config {
            origin: exp.origin_of("model", trial),
            message: format!("model: {e:#}"),
        })?;
        Ok(())
    }

    /// Samples, then logs the figures (`generate/*` at step 0) and each prompt's samples.
    fn run(&self, spec: &GenerateTaskSpec, _shared: &(), run: &mut TrialRun) -> Result<()> {
        let ev = &mut run.events;
        // Generation starts over each time: an earlier attempt's events are stale.
        if let Some(Err(e)) = ev.tb.as_ref().map(|w| w.prune_earlier_files(None)) {
            ev.tb_problem(&e);
            ev.tb = None;
        }
        let (samples, div) =
            super::generate::run(spec, run.dir, run.device, &mut |m: &str| ev.log(m))?;
        let logged = ev.tb.as_mut().map(|w| -> Result<()> {
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
        });
        if let Some(Err(e)) = logged {
            ev.tb_problem(&e);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::distinct_n;

    #[test]
    fn distinct_counts_unique_ngrams() {
        let seqs = vec![vec![1, 2, 1, 2], vec![3]];
        assert_eq!(distinct_n(&seqs, 1), 3.0 / 5.0);
        assert_eq!(distinct_n(&seqs, 2), 2.0 / 3.0);
        assert_eq!(distinct_n(&[], 2), 0.0);
    }
}

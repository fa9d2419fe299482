//! A list of evaluations run on one model: `evaluations:` of `task: eval`, and the `evaluate:`
//! block a training task runs on the model it finished.
//!
//! ```yaml
//! evaluations:                     # (evaluate: on a training task)
//!   - mmlu: {subjects: "anatomy,virology", shots: 5, style: letter, limit: 20}
//!   - perplexity: {dataset: middlemarch, max_tokens: 4096, max_length: 512, stride: 256}
//!   - rouge: {dataset: instruction-data, max_test: 20, max_new_tokens: 128}
//!   - judge: {url: "http://localhost:11434", model: llama3, api: ollama}
//! ```
//!
//! Each evaluation writes its full result to `<trial>/evaluations.json` (MMLU's subjects and
//! categories, perplexity's token counts) and contributes flat figures ([`EvalFigures`]) that
//! the runner logs as TensorBoard scalars `eval/<name>` and HParams metrics, and `llmlab report`
//! shows as columns. MMLU appends its predictions to `<trial>/mmlu_predictions.jsonl`, so an
//! interrupted evaluation resumes where it stopped. `rouge` writes the model's responses to the
//! test split of instruction data (`<trial>/eval_responses.json`, the instruct task's
//! `responses.json` shape) with their exact match and ROUGE-L against the references; `judge`
//! (after `rouge` in the list) scores those responses with a judge model as `llmlab eval judge`
//! does (`<trial>/eval_responses.judged.json`).
use super::mmlu::{self, MmluResult, MmluSpec};
use super::perplexity::{dataset_text, perplexity_of_ids, PerplexityResult, PerplexitySpec};
use crate::error::{read_text, write_atomic, LlmError};
use crate::resolve::LoadedLm;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One evaluation of a list: a one-key mapping, `{mmlu: {...}}` or `{perplexity: {...}}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "Entry", into = "Entry")]
pub enum Evaluation {
    /// `llmlab eval mmlu`'s options (`subjects`, `shots`, `style`, `limit`, `batch_size`).
    Mmlu(MmluSpec),
    /// `llmlab eval perplexity` on a registered text or a file.
    Perplexity(PerplexityEval),
    /// Responses to instruction data's test split: exact match and ROUGE-L.
    Rouge(RougeEval),
    /// The `rouge` responses scored by a judge model (`llmlab eval judge`).
    Judge(JudgeEval),
}

impl Evaluation {
    /// The evaluation's name: the prefix of its figures.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Mmlu(_) => "mmlu",
            Self::Perplexity(_) => "perplexity",
            Self::Rouge(_) => "rouge",
            Self::Judge(_) => "judge",
        }
    }
}

/// The YAML shape of an [`Evaluation`] (serde_yaml reads an externally tagged enum only from a
/// `!tag`, not from the one-key mapping people write).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    mmlu: Option<MmluSpec>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    perplexity: Option<PerplexityEval>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    rouge: Option<RougeEval>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    judge: Option<JudgeEval>,
}

impl TryFrom<Entry> for Evaluation {
    type Error = String;
    fn try_from(e: Entry) -> Result<Self, String> {
        let mut found = Vec::new();
        found.extend(e.mmlu.map(Self::Mmlu));
        found.extend(e.perplexity.map(Self::Perplexity));
        found.extend(e.rouge.map(Self::Rouge));
        found.extend(e.judge.map(Self::Judge));
        match (found.pop(), found.is_empty()) {
            (Some(one), true) => Ok(one),
            _ => Err("expected one evaluation per item: `mmlu: {...}`, `perplexity: {...}`, `rouge: {...}` or `judge: {...}`".into()),
        }
    }
}

impl From<Evaluation> for Entry {
    fn from(e: Evaluation) -> Self {
        match e {
            Evaluation::Mmlu(m) => Self {
                mmlu: Some(m),
                ..Default::default()
            },
            Evaluation::Perplexity(p) => Self {
                perplexity: Some(p),
                ..Default::default()
            },
            Evaluation::Rouge(r) => Self {
                rouge: Some(r),
                ..Default::default()
            },
            Evaluation::Judge(j) => Self {
                judge: Some(j),
                ..Default::default()
            },
        }
    }
}

/// Perplexity of a text (the strided window of [`super::perplexity`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerplexityEval {
    /// A registered text (the-verdict, tinyshakespeare, middlemarch) ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// ... or a UTF-8 file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<PathBuf>,
    /// Only the first this many tokens of the text (a long book costs minutes on a CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<usize>,
    /// Tokens per window (default: the model's context length).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_length: Option<usize>,
    /// How far each window's start moves (default: half of max_length).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stride: Option<usize>,
    /// Windows per forward pass (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
}

impl PerplexityEval {
    /// The window settings as `llmlab eval perplexity` takes them.
    pub fn window(&self) -> PerplexitySpec {
        PerplexitySpec {
            max_length: self.max_length,
            stride: self.stride,
            batch_size: self.batch_size,
        }
    }
}

/// Responses to the test split of instruction data (the book's 85/5/10 split), greedy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RougeEval {
    /// A registered instruction data set (default `instruction-data`) ...
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dataset: Option<String>,
    /// ... or a JSON/JSONL file of `instruction`, `input`, `output` records.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<PathBuf>,
    /// Only the first this many test entries (the book's split has 110).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_test: Option<usize>,
    /// Tokens per response (default 256, the book's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_new_tokens: Option<usize>,
    /// How the entries become prompts; default: the style an instruct or DPO run learned, else
    /// the model's chat template, else Alpaca.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_style: Option<crate::prompt::PromptStyle>,
}

/// A judge model's scores of the `rouge` responses (`llmlab eval judge`'s prompt and parsing).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JudgeEval {
    pub url: String,
    pub model: String,
    #[serde(default)]
    pub api: crate::remote::Api,
}

/// The model's responses to `r`'s test entries, written to `path` (the entry + `model_response`)
/// with their (exact match, ROUGE-L) against the references.
fn responses(lm: &LoadedLm, r: &RougeEval, path: &Path) -> Result<(usize, f64, f64)> {
    use crate::instruct::data::InstructDataSpec;
    use crate::prompt::{PromptStyle, Prompter};
    let data = InstructDataSpec {
        dataset: r.dataset.clone(),
        path: r.path.clone(),
        max_test: r.max_test,
        ..Default::default()
    };
    let test = data.split(&data.read()?, 0).test;
    let style = r
        .prompt_style
        .or(lm.prompt_style)
        .unwrap_or(if lm.chat.is_some() {
            PromptStyle::Chat
        } else {
            PromptStyle::Alpaca
        });
    let prompter = Prompter::new(style, lm.chat.clone(), &lm.name)?;
    let settings = crate::instruct::spec::GenerationSettings::default();
    let max_new = r.max_new_tokens.unwrap_or(settings.max_new_tokens);
    let gen = crate::instruct::train::generation_spec(&settings, 123, lm, max_new);
    let mut out = Vec::with_capacity(test.len());
    let mut answers = Vec::with_capacity(test.len());
    for e in &test {
        let answer = crate::instruct::train::respond(lm, &prompter, e, &gen)?;
        let mut rec = e.raw.clone();
        rec.insert("model_response".into(), answer.clone().into());
        out.push(serde_json::Value::Object(rec));
        answers.push(answer);
    }
    write_atomic(path, serde_json::to_string_pretty(&out)?.as_bytes())?;
    let (em, rl) = crate::metrics::score_responses(
        answers
            .iter()
            .zip(&test)
            .map(|(a, e)| (a.as_str(), e.output.as_str())),
    );
    Ok((test.len(), em, rl))
}

/// Checks a list before anything runs; messages start with `key` (`evaluations` or `evaluate`).
pub fn validate(key: &str, list: &[Evaluation]) -> Result<(), LlmError> {
    let err = |m: String| LlmError::Config {
        origin: String::new(),
        message: m,
    };
    for (i, e) in list.iter().enumerate() {
        if list[..i].iter().any(|o| o.name() == e.name()) {
            return Err(err(format!(
                "{key}[{i}]: {} is listed twice; each evaluation may appear once",
                e.name()
            )));
        }
        match e {
            Evaluation::Mmlu(s) => {
                s.validate()
                    .map_err(|m| err(format!("{key}[{i}].mmlu: {m}")))?;
                s.subject_list()
                    .map_err(|m| err(format!("{key}[{i}].mmlu.subjects: {m:#}")))?;
            }
            Evaluation::Perplexity(p) => {
                if p.dataset.is_some() == p.file.is_some() {
                    return Err(err(format!(
                        "{key}[{i}].perplexity: expected one of dataset or file"
                    )));
                }
                if p.max_tokens.is_some_and(|n| n < 2) {
                    return Err(err(format!(
                        "{key}[{i}].perplexity.max_tokens: expected at least 2"
                    )));
                }
            }
            Evaluation::Rouge(r) => {
                if r.dataset.is_some() && r.path.is_some() {
                    return Err(err(format!(
                        "{key}[{i}].rouge: expected one of dataset or path, not both"
                    )));
                }
                if r.max_test == Some(0) || r.max_new_tokens == Some(0) {
                    return Err(err(format!(
                        "{key}[{i}].rouge: max_test and max_new_tokens: expected at least 1"
                    )));
                }
            }
            Evaluation::Judge(_) => {
                if !list[..i].iter().any(|o| matches!(o, Evaluation::Rouge(_))) {
                    return Err(err(format!(
                        "{key}[{i}].judge: scores the responses of a `rouge` evaluation; list one before it"
                    )));
                }
            }
        }
    }
    Ok(())
}

/// Flat figures of a list's results, by name (`mmlu_accuracy`, `perplexity`, ...).
pub type EvalFigures = BTreeMap<String, f64>;

/// Everything a list of evaluations found (`evaluations.json`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct EvalResults {
    /// The evaluations that made these results.
    #[serde(default)]
    pub list: Vec<Evaluation>,
    pub figures: EvalFigures,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mmlu: Option<MmluResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub perplexity: Option<PerplexityResult>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub judge: Option<super::judge::JudgeSummary>,
}

/// The file a trial's evaluation results are in.
pub const RESULTS: &str = "evaluations.json";
/// The MMLU predictions of a trial (resumable).
pub const MMLU_PREDICTIONS: &str = "mmlu_predictions.jsonl";
/// The `rouge` responses of a trial (the `judge` evaluation scores them).
pub const RESPONSES: &str = "eval_responses.json";

/// The model a finished run folder holds, as a language model: an instruct or pretraining run
/// as `generate` loads it; a classifier's fine-tuned blocks under its base model's own output
/// head, with the causal mask on (how much of the language model the classification training
/// left).
pub fn load_run_model(dir: &Path, device: tch::Device) -> Result<LoadedLm> {
    if crate::resolve::saved::SavedRecord::is_in(dir) {
        let mut lm = crate::resolve::saved::load_saved(dir, device)?.lm;
        lm.model.set_causal(true);
        Ok(lm)
    } else {
        LoadedLm::load(&dir.display().to_string(), device)
    }
}

impl EvalResults {
    /// Whether `dir` holds the results of exactly `list`.
    pub fn complete(dir: &Path, list: &[Evaluation]) -> bool {
        list.is_empty()
            || Self::read(dir)
                .ok()
                .flatten()
                .is_some_and(|r| r.list == list)
    }

    /// Reads `dir/evaluations.json`, if the trial evaluated anything.
    pub fn read(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join(RESULTS);
        if !path.is_file() {
            return Ok(None);
        }
        let r = serde_json::from_str(&read_text(&path)?).map_err(|e| LlmError::BadFile {
            path: path.clone(),
            message: e.to_string(),
        })?;
        Ok(Some(r))
    }
}

/// Runs `list` on `lm`, writing `dir/evaluations.json` (atomically) and MMLU's predictions in
/// `dir`; `log` hears a line per evaluation.
pub fn run_evaluations(
    lm: &LoadedLm,
    list: &[Evaluation],
    dir: &Path,
    log: &mut dyn FnMut(&str),
) -> Result<EvalResults> {
    let mut out = EvalResults {
        list: list.to_vec(),
        ..Default::default()
    };
    for e in list {
        match e {
            Evaluation::Mmlu(spec) => {
                let root = mmlu::data_root()?;
                let r = mmlu::evaluate(
                    lm,
                    spec,
                    &root,
                    Some(&dir.join(MMLU_PREDICTIONS)),
                    &mut |_| {},
                )?;
                log(&format!(
                    "MMLU ({}, {} shots): {:.2}% over {} questions (macro {:.2}%), {:.0} s",
                    r.style.name(),
                    r.shots,
                    100.0 * r.accuracy,
                    r.n,
                    100.0 * r.macro_accuracy,
                    r.seconds
                ));
                out.figures.insert("mmlu_accuracy".into(), r.accuracy);
                out.figures
                    .insert("mmlu_macro_accuracy".into(), r.macro_accuracy);
                for (cat, s) in &r.categories {
                    out.figures.insert(format!("mmlu_{cat}"), s.accuracy);
                }
                out.mmlu = Some(r);
            }
            Evaluation::Perplexity(p) => {
                let text = match (&p.dataset, &p.file) {
                    (Some(d), _) => dataset_text(d)?,
                    (None, Some(f)) => read_text(f)?,
                    (None, None) => unreachable!("validate: dataset or file"),
                };
                let mut ids = lm.encode_prompt(&text)?;
                if let Some(n) = p.max_tokens {
                    ids.truncate(n);
                }
                let context = usize::try_from(lm.context_length()).unwrap_or(usize::MAX);
                let (max_length, stride, batch) = p.window().resolve(context)?;
                let r = perplexity_of_ids(lm, &ids, max_length, stride, batch, &mut |_, _| {})?;
                log(&format!(
                    "perplexity {:.3} over {} tokens of {}",
                    r.perplexity,
                    r.text_tokens,
                    p.dataset.clone().unwrap_or_else(|| p
                        .file
                        .clone()
                        .unwrap_or_default()
                        .display()
                        .to_string())
                ));
                out.figures.insert("perplexity".into(), r.perplexity);
                out.perplexity = Some(r);
            }
            Evaluation::Rouge(r) => {
                let (n, em, rl) = responses(lm, r, &dir.join(RESPONSES))?;
                log(&format!(
                    "{n} test responses: exact match {:.1}%, ROUGE-L {rl:.3}",
                    100.0 * em
                ));
                out.figures.insert("exact_match".into(), em);
                out.figures.insert("rouge_l".into(), rl);
            }
            Evaluation::Judge(j) => {
                let cfg = super::judge::judge_config(&j.url, &j.model, j.api);
                let s = super::judge::judge_file(&dir.join(RESPONSES), cfg, &mut |_, _, _| {})?;
                log(&format!(
                    "judge {}: mean score {} over {} of {} responses",
                    j.model,
                    s.mean_score.map_or("-".into(), |m| format!("{m:.2}")),
                    s.scored,
                    s.total
                ));
                out.figures
                    .insert("judge_score".into(), s.mean_score.unwrap_or(f64::NAN));
                out.judge = Some(s);
            }
        }
    }
    write_atomic(
        &dir.join(RESULTS),
        serde_json::to_string_pretty(&out)?.as_bytes(),
    )?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_parse_and_are_checked() {
        let list: Vec<Evaluation> = serde_yaml::from_str(
            "- mmlu: {subjects: anatomy, shots: 5, limit: 2}\n- perplexity: {dataset: the-verdict, max_tokens: 512, max_length: 128}\n",
        )
        .expect("parses");
        assert_eq!(list[0].name(), "mmlu");
        match &list[1] {
            Evaluation::Perplexity(p) => {
                assert_eq!(p.max_length, Some(128));
                assert_eq!(p.max_tokens, Some(512));
            }
            other => panic!("{other:?}"),
        }
        validate("evaluate", &list).expect("valid");
        let twice = vec![list[0].clone(), list[0].clone()];
        let e = validate("evaluate", &twice)
            .expect_err("an error")
            .to_string();
        assert!(e.contains("evaluate[1]") && e.contains("twice"), "{e}");
        let bad: Vec<Evaluation> =
            serde_yaml::from_str("- mmlu: {subjects: astrology}\n").expect("parses");
        let e = validate("evaluations", &bad)
            .expect_err("an error")
            .to_string();
        assert!(
            e.contains("evaluations[0].mmlu.subjects") && e.contains("astrology"),
            "{e}"
        );
        let v: serde_yaml::Value = serde_yaml::from_str("- mmlu: {shots: 1}\n").expect("yaml");
        let from_value: Vec<Evaluation> = serde_yaml::from_value(v).expect("from a Value");
        assert_eq!(serde_yaml::to_string(&from_value).expect("yaml").trim(), "- mmlu:\n    subjects: all\n    shots: 1\n    style: letter\n    limit: null\n    batch_size: 4");
        let unknown = serde_yaml::from_str::<Vec<Evaluation>>("- hellaswag: {}\n")
            .expect_err("an error")
            .to_string();
        assert!(
            unknown.contains("hellaswag") && unknown.contains("mmlu"),
            "{unknown}"
        );
    }
}

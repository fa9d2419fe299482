//! MMLU (Hendrycks et al., ICLR 2021: 57 subjects, 14,042 test questions) scored by
//! log-likelihood, in the two formulations model cards quote.
//!
//! **`letter`** is lm-evaluation-harness's default MMLU task: the description "The following
//! are multiple choice questions (with answers) about {subject}.\n\n", the first `shots`
//! questions of the subject's `dev` split as examples (`question.strip()`, the lettered choices,
//! "Answer: X", separated by "\n\n"), then the question ending in "Answer:". Each choice is
//! the continuation " A" … " D"; the prediction is the most likely one (`acc`).
//!
//! **`cloze`** is lighteval's MMLU as SmolLM2's model card measured it (cosmopedia's
//! `mmlu_cloze_prompt`): "The following are questions about {subject}.\n", then "Question:
//! {question}\nAnswer:" (examples end in " {gold choice text}"), each choice *text* scored as
//! the continuation " {text}", and the prediction is the best log-likelihood per character of
//! the continuation (lighteval's `acc_norm` with `LogProbCharNorm`).
//!
//! Scoring follows lm-eval's `loglikelihood` ([`super::loglik`]); the header and examples are
//! the same for every question of a subject, so they run once per subject into a KV cache.
//! A question whose prompt does not fit the model's context gets fewer examples (the most that
//! fit; counted in `fewer_shots`); one that does not fit even with none is left out and listed
//! in `skipped` — never cut. Every scored question can be appended to a predictions file
//! (JSONL), from which an interrupted evaluation resumes.
use super::loglik::{encode_pair, PrefixScorer, Request};
use crate::data::Registry;
use crate::error::{io_at, write_atomic, LlmError};
use crate::models::{AnyModel, CausalLm};
use crate::resolve::LoadedLm;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

/// The 57 subjects and lm-evaluation-harness's category of each (its MMLU groups `stem`,
/// `humanities`, `social_sciences`, `other`, from Hendrycks et al.'s `categories.py`).
pub const SUBJECTS: [(&str, &str); 57] = [
    ("abstract_algebra", "stem"),
    ("anatomy", "stem"),
    ("astronomy", "stem"),
    ("business_ethics", "other"),
    ("clinical_knowledge", "other"),
    ("college_biology", "stem"),
    ("college_chemistry", "stem"),
    ("college_computer_science", "stem"),
    ("college_mathematics", "stem"),
    ("college_medicine", "other"),
    ("college_physics", "stem"),
    ("computer_security", "stem"),
    ("conceptual_physics", "stem"),
    ("econometrics", "social_sciences"),
    ("electrical_engineering", "stem"),
    ("elementary_mathematics", "stem"),
    ("formal_logic", "humanities"),
    ("global_facts", "other"),
    ("high_school_biology", "stem"),
    ("high_school_chemistry", "stem"),
    ("high_school_computer_science", "stem"),
    ("high_school_european_history", "humanities"),
    ("high_school_geography", "social_sciences"),
    ("high_school_government_and_politics", "social_sciences"),
    ("high_school_macroeconomics", "social_sciences"),
    ("high_school_mathematics", "stem"),
    ("high_school_microeconomics", "social_sciences"),
    ("high_school_physics", "stem"),
    ("high_school_psychology", "social_sciences"),
    ("high_school_statistics", "stem"),
    ("high_school_us_history", "humanities"),
    ("high_school_world_history", "humanities"),
    ("human_aging", "other"),
    ("human_sexuality", "social_sciences"),
    ("international_law", "humanities"),
    ("jurisprudence", "humanities"),
    ("logical_fallacies", "humanities"),
    ("machine_learning", "stem"),
    ("management", "other"),
    ("marketing", "other"),
    ("medical_genetics", "other"),
    ("miscellaneous", "other"),
    ("moral_disputes", "humanities"),
    ("moral_scenarios", "humanities"),
    ("nutrition", "other"),
    ("philosophy", "humanities"),
    ("prehistory", "humanities"),
    ("professional_accounting", "other"),
    ("professional_law", "humanities"),
    ("professional_medicine", "other"),
    ("professional_psychology", "social_sciences"),
    ("public_relations", "social_sciences"),
    ("security_studies", "social_sciences"),
    ("sociology", "social_sciences"),
    ("us_foreign_policy", "social_sciences"),
    ("virology", "other"),
    ("world_religions", "humanities"),
];

/// The most few-shot examples a subject has (its `dev` split).
pub const MAX_SHOTS: usize = 5;

/// How a question is put to the model and its answer read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[derive(clap::ValueEnum)]
pub enum Style {
    /// lm-evaluation-harness: lettered choices, " A" … " D" scored, `acc`.
    Letter,
    /// lighteval (SmolLM2's card): choice texts scored, per-character `acc_norm`.
    Cloze,
}

impl Style {
    pub fn name(self) -> &'static str {
        match self {
            Self::Letter => "letter",
            Self::Cloze => "cloze",
        }
    }
}

/// One MMLU question: a row of `data/{split}/{subject}_{split}.csv`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Question {
    pub subject: String,
    /// 0-based row of the CSV file.
    pub index: usize,
    pub question: String,
    pub choices: [String; 4],
    /// 0..4 (the file's letter A–D).
    pub gold: usize,
}

/// What to evaluate (`llmlab eval mmlu`, `task: eval`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MmluSpec {
    /// `all` or a comma-separated list of subjects.
    #[serde(default = "all")]
    pub subjects: String,
    #[serde(default)]
    pub shots: usize,
    #[serde(default = "letter")]
    pub style: Style,
    /// At most this many test questions per subject (the first ones).
    #[serde(default)]
    pub limit: Option<usize>,
    /// Rows per forward pass (4: the fastest on 2 CPU cores for SmolLM2-135M; larger batches
    /// pad more and gain nothing on a CPU).
    #[serde(default = "four")]
    pub batch_size: usize,
}

fn all() -> String {
    "all".into()
}
fn letter() -> Style {
    Style::Letter
}
fn four() -> usize {
    4
}

impl Default for MmluSpec {
    fn default() -> Self {
        Self {
            subjects: all(),
            shots: 0,
            style: Style::Letter,
            limit: None,
            batch_size: four(),
        }
    }
}

impl MmluSpec {
    /// The subjects asked for, in the order of [`SUBJECTS`]; an unknown one is an error that
    /// lists the valid names.
    pub fn subject_list(&self) -> Result<Vec<&'static str>> {
        let s = self.subjects.trim();
        if s == "all" {
            return Ok(SUBJECTS.iter().map(|(n, _)| *n).collect());
        }
        let asked: Vec<&str> = s
            .split(',')
            .map(str::trim)
            .filter(|x| !x.is_empty())
            .collect();
        if asked.is_empty() {
            return Err(LlmError::Usage(
                "--subjects: empty; expected `all` or subject names".into(),
            )
            .into());
        }
        for a in &asked {
            if !SUBJECTS.iter().any(|(n, _)| n == a) {
                return Err(LlmError::Unknown {
                    what: "MMLU subject",
                    name: (*a).into(),
                    expected: SUBJECTS.iter().map(|(n, _)| (*n).into()).collect(),
                }
                .into());
            }
        }
        Ok(SUBJECTS
            .iter()
            .map(|(n, _)| *n)
            .filter(|n| asked.contains(n))
            .collect())
    }

    pub fn validate(&self) -> Result<(), LlmError> {
        if self.shots > MAX_SHOTS {
            return Err(LlmError::Usage(format!(
                "--shots {}: expected 0..={MAX_SHOTS} (a subject's dev split has {MAX_SHOTS} questions)",
                self.shots
            )));
        }
        if self.batch_size == 0 {
            return Err(LlmError::Usage(
                "--batch-size 0: expected at least 1".into(),
            ));
        }
        if self.limit == Some(0) {
            return Err(LlmError::Usage(
                "--limit 0: expected at least 1 question per subject".into(),
            ));
        }
        Ok(())
    }
}

/// Reads one split of one subject from the MMLU folder (`data/{split}/{subject}_{split}.csv`,
/// no header, `question,A,B,C,D,answer`). A row with another number of fields or an answer
/// that is not A–D names the file and line.
pub fn read_split(root: &Path, subject: &str, split: &str) -> Result<Vec<Question>> {
    let path = root
        .join("data")
        .join(split)
        .join(format!("{subject}_{split}.csv"));
    let bad = |line: u64, message: String| LlmError::BadFile {
        path: path.clone(),
        message: format!("line {line}: {message}"),
    };
    let mut rdr = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .from_path(&path)
        .map_err(|e| LlmError::BadFile {
            path: path.clone(),
            message: e.to_string(),
        })?;
    let mut out = Vec::new();
    for (index, rec) in rdr.records().enumerate() {
        let rec = rec.map_err(|e| LlmError::BadFile {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let line = rec.position().map_or(0, |p| p.line());
        if rec.len() != 6 {
            return Err(bad(
                line,
                format!("{} fields; expected 6 (question,A,B,C,D,answer)", rec.len()),
            )
            .into());
        }
        let gold = match rec[5].trim() {
            "A" => 0,
            "B" => 1,
            "C" => 2,
            "D" => 3,
            other => {
                return Err(bad(line, format!("answer {other:?}; expected A, B, C or D")).into())
            }
        };
        out.push(Question {
            subject: subject.into(),
            index,
            question: rec[0].to_string(),
            choices: [1, 2, 3, 4].map(|i| rec[i].to_string()),
            gold,
        });
    }
    Ok(out)
}

/// The MMLU folder of the data registry (the offline mirror or the cache).
pub fn data_root() -> Result<PathBuf> {
    Registry::builtin()?.fetch("mmlu")
}

const LETTERS: [&str; 4] = ["A", "B", "C", "D"];

/// What precedes a question: the description (or instruction) and the examples, each followed
/// by "\n\n".
pub fn prefix_text(style: Style, subject: &str, examples: &[Question]) -> String {
    let topic = subject.replace('_', " ");
    let mut s = match style {
        Style::Letter => {
            format!("The following are multiple choice questions (with answers) about {topic}.\n\n")
        }
        Style::Cloze => format!("The following are questions about {topic}.\n"),
    };
    for ex in examples {
        s.push_str(&query(style, ex));
        s.push(' ');
        s.push_str(match style {
            Style::Letter => LETTERS[ex.gold],
            Style::Cloze => &ex.choices[ex.gold],
        });
        s.push_str("\n\n");
    }
    s
}

/// The question as the prompt ends: lettered choices and "Answer:" (letter), or "Question:
/// …\nAnswer:" (cloze).
pub fn query(style: Style, q: &Question) -> String {
    match style {
        Style::Letter => {
            let mut s = q.question.trim().to_string();
            for (l, c) in LETTERS.iter().zip(&q.choices) {
                s.push_str(&format!("\n{l}. {c}"));
            }
            s + "\nAnswer:"
        }
        Style::Cloze => format!("Question: {}\nAnswer:", q.question),
    }
}

/// The four continuations scored after the prompt.
pub fn continuations(style: Style, q: &Question) -> Vec<String> {
    match style {
        Style::Letter => LETTERS.iter().map(|l| format!(" {l}")).collect(),
        Style::Cloze => q.choices.iter().map(|c| format!(" {c}")).collect(),
    }
}

/// The predicted choice from the four log-likelihoods: the largest (letter), or the largest
/// per character of the continuation (cloze); the first wins a tie, as `argmax` does.
pub fn predict(style: Style, q: &Question, loglik: &[f64]) -> usize {
    let scores: Vec<f64> = match style {
        Style::Letter => loglik.to_vec(),
        Style::Cloze => continuations(style, q)
            .iter()
            .zip(loglik)
            .map(|(c, l)| l / c.chars().count() as f64)
            .collect(),
    };
    (0..scores.len()).fold(0, |best, j| if scores[j] > scores[best] { j } else { best })
}

/// One line of a predictions file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Prediction {
    pub subject: String,
    pub index: usize,
    pub gold: usize,
    pub pred: usize,
    /// The four choices' log-likelihoods (A–D).
    pub loglik: Vec<f64>,
    pub style: Style,
    /// The examples asked for, and those the prompt held (fewer when the context is short).
    pub shots: usize,
    pub used_shots: usize,
    /// The model's name as it was loaded.
    pub model: String,
}

/// An accuracy over `n` questions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Score {
    pub accuracy: f64,
    pub n: usize,
}

/// A question left out because its prompt is longer than the model's context.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    pub subject: String,
    pub index: usize,
    pub tokens: usize,
}

/// The result of an evaluation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MmluResult {
    /// Correct / scored over every question (lm-eval's group score: weighted by size).
    pub accuracy: f64,
    /// The mean of the subjects' accuracies.
    pub macro_accuracy: f64,
    pub n: usize,
    /// lm-eval's standard error of the mean (sample standard deviation / √n) and the normal 95%
    /// interval around `accuracy`.
    pub stderr: f64,
    pub ci_low: f64,
    pub ci_high: f64,
    pub style: Style,
    pub shots: usize,
    /// Cloze: the accuracy of the raw (unnormalised) log-likelihoods, lighteval's `acc`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub accuracy_unnormalized: Option<f64>,
    pub subjects: BTreeMap<String, Score>,
    pub categories: BTreeMap<String, Score>,
    /// Questions scored with fewer examples than asked (their prompt would not fit otherwise).
    pub fewer_shots: usize,
    pub skipped: Vec<Skipped>,
    /// Seconds this call spent scoring (loading the model not included; resumed questions cost
    /// nothing).
    #[serde(default)]
    pub seconds: f64,
}

/// Progress of an evaluation: questions done (including resumed ones) of the total.
pub struct Progress<'a> {
    pub done: usize,
    pub total: usize,
    pub subject: &'a str,
}

/// Reads an existing predictions file: every line must be a prediction of this model, style
/// and shot count (else an error names the file and line); a last line cut short by an
/// interrupted write is dropped.
fn read_predictions(path: &Path, spec: &MmluSpec, model: &str) -> Result<Vec<Prediction>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_at(path)(e).into()),
    };
    let lines: Vec<&str> = text.lines().collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let p: Prediction = match serde_json::from_str(line) {
            Ok(p) => p,
            Err(_) if i + 1 == lines.len() && !text.ends_with('\n') => break,
            Err(e) => {
                return Err(LlmError::BadFile {
                    path: path.into(),
                    message: format!("line {}: {e}", i + 1),
                }
                .into())
            }
        };
        if p.style != spec.style || p.shots != spec.shots || p.model != model {
            return Err(LlmError::Usage(format!(
                "{} line {}: a prediction of {} ({}, {} shots), but this evaluation is of {model} ({}, {} shots); pass another --predictions file to keep both",
                path.display(),
                i + 1,
                p.model,
                p.style.name(),
                p.shots,
                spec.style.name(),
                spec.shots
            ))
            .into());
        }
        out.push(p);
    }
    Ok(out)
}

/// Evaluates `lm` on MMLU's test split as `spec` says, appending every scored question to
/// `predictions` (when given) and resuming from the questions already there.
pub fn evaluate(
    lm: &LoadedLm,
    spec: &MmluSpec,
    root: &Path,
    predictions: Option<&Path>,
    progress: &mut dyn FnMut(Progress),
) -> Result<MmluResult> {
    spec.validate()?;
    let start = std::time::Instant::now();
    let mut r = match &lm.model {
        AnyModel::Gpt(m) => evaluate_with(m, lm, spec, root, predictions, progress),
        AnyModel::Llama(m) => evaluate_with(m, lm, spec, root, predictions, progress),
    }?;
    r.seconds = start.elapsed().as_secs_f64();
    Ok(r)
}

fn evaluate_with<M: CausalLm>(
    model: &M,
    lm: &LoadedLm,
    spec: &MmluSpec,
    root: &Path,
    predictions: Option<&Path>,
    progress: &mut dyn FnMut(Progress),
) -> Result<MmluResult> {
    let subjects = spec.subject_list()?;
    let mut tests = Vec::new();
    for s in &subjects {
        let mut qs = read_split(root, s, "test")?;
        if let Some(n) = spec.limit {
            qs.truncate(n);
        }
        tests.push(qs);
    }
    let total: usize = tests.iter().map(Vec::len).sum();
    let mut preds: Vec<Prediction> = match predictions {
        Some(p) => read_predictions(p, spec, &lm.name)?,
        None => Vec::new(),
    };
    let mut file = match predictions {
        Some(p) => {
            if let Some(dir) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(io_at(dir))?;
            }
            // Rewrite what was read (drops a cut last line), then append.
            let body: String = preds
                .iter()
                .map(|x| serde_json::to_string(x).map(|l| l + "\n"))
                .collect::<Result<_, _>>()?;
            write_atomic(p, body.as_bytes())?;
            Some(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(p)
                    .map_err(io_at(p))?,
            )
        }
        None => None,
    };
    let done_keys: HashSet<(String, usize)> =
        preds.iter().map(|p| (p.subject.clone(), p.index)).collect();
    let encode = |s: &str| lm.encode_prompt(s);
    let ctx_len = lm.context_length() as usize;
    let mut skipped = Vec::new();
    let mut done = tests
        .iter()
        .flatten()
        .filter(|q| done_keys.contains(&(q.subject.clone(), q.index)))
        .count();
    for (subject, qs) in subjects.iter().zip(&tests) {
        let pending: Vec<&Question> = qs
            .iter()
            .filter(|q| !done_keys.contains(&(q.subject.clone(), q.index)))
            .collect();
        if pending.is_empty() {
            continue;
        }
        let dev = if spec.shots > 0 {
            read_split(root, subject, "dev")?
        } else {
            Vec::new()
        };
        let examples = &dev[..spec.shots.min(dev.len())];
        let scorer =
            PrefixScorer::new(model, &encode(&prefix_text(spec.style, subject, examples))?);
        // Each question with the most examples that fit the context.
        let mut reqs: Vec<(&Question, usize, Request)> = Vec::new();
        for q in pending {
            let conts = continuations(spec.style, q);
            let mut fitted = None;
            let mut shortest = 0;
            for k in (0..=examples.len()).rev() {
                let ctx = prefix_text(spec.style, subject, &examples[..k]) + &query(spec.style, q);
                let req = encode_pair(&encode, &ctx, &conts)?;
                shortest = req.longest_row();
                if shortest <= ctx_len {
                    fitted = Some((k, req));
                    break;
                }
            }
            match fitted {
                Some((k, req)) => reqs.push((q, k, req)),
                None => skipped.push(Skipped {
                    subject: subject.to_string(),
                    index: q.index,
                    tokens: shortest,
                }),
            }
        }
        for chunk in reqs.chunks(spec.batch_size * 4) {
            let requests: Vec<Request> = chunk.iter().map(|(_, _, r)| r.clone()).collect();
            let scores = scorer.score_requests(&requests, spec.batch_size)?;
            let mut lines = String::new();
            for ((q, k, _), loglik) in chunk.iter().zip(scores) {
                let p = Prediction {
                    subject: subject.to_string(),
                    index: q.index,
                    gold: q.gold,
                    pred: predict(spec.style, q, &loglik),
                    loglik,
                    style: spec.style,
                    shots: spec.shots,
                    used_shots: *k,
                    model: lm.name.clone(),
                };
                lines.push_str(&(serde_json::to_string(&p)? + "\n"));
                preds.push(p);
            }
            if let (Some(f), Some(path)) = (file.as_mut(), predictions) {
                f.write_all(lines.as_bytes())
                    .and_then(|_| f.flush())
                    .map_err(io_at(path))?;
            }
            done += chunk.len();
            progress(Progress {
                done,
                total,
                subject,
            });
        }
        done += skipped.iter().filter(|s| s.subject == *subject).count();
    }
    // Only the questions asked for count (a predictions file may hold more).
    let asked: HashSet<(String, usize)> = tests
        .iter()
        .flatten()
        .map(|q| (q.subject.clone(), q.index))
        .collect();
    let scored: Vec<&Prediction> = preds
        .iter()
        .filter(|p| asked.contains(&(p.subject.clone(), p.index)))
        .collect();
    let by_key: BTreeMap<(String, usize), &Question> = tests
        .iter()
        .flatten()
        .map(|q| ((q.subject.clone(), q.index), q))
        .collect();
    let unnormalized = (spec.style == Style::Cloze).then(|| {
        let right = scored
            .iter()
            .filter(|p| {
                predict(
                    Style::Letter,
                    by_key[&(p.subject.clone(), p.index)],
                    &p.loglik,
                ) == p.gold
            })
            .count();
        right as f64 / scored.len().max(1) as f64
    });
    Ok(summarize(&scored, spec, unnormalized, skipped))
}

/// Accuracy overall (micro), per subject, per category, and the mean of the subjects (macro).
pub fn summarize(
    preds: &[&Prediction],
    spec: &MmluSpec,
    accuracy_unnormalized: Option<f64>,
    skipped: Vec<Skipped>,
) -> MmluResult {
    let mut subjects: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    let mut categories: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for p in preds {
        let ok = usize::from(p.pred == p.gold);
        let s = subjects.entry(p.subject.clone()).or_default();
        s.0 += ok;
        s.1 += 1;
        let cat = SUBJECTS
            .iter()
            .find(|(n, _)| *n == p.subject)
            .map_or("other", |(_, c)| c);
        let c = categories.entry(cat.to_string()).or_default();
        c.0 += ok;
        c.1 += 1;
    }
    let score = |(right, n): (usize, usize)| Score {
        accuracy: right as f64 / n.max(1) as f64,
        n,
    };
    let n = preds.len();
    let right = preds.iter().filter(|p| p.pred == p.gold).count();
    let accuracy = right as f64 / n.max(1) as f64;
    // lm-eval's mean_stderr: the sample standard deviation (n - 1) over √n.
    let stderr = if n > 1 {
        (accuracy * (1.0 - accuracy) / (n - 1) as f64).sqrt()
    } else {
        0.0
    };
    let subjects: BTreeMap<String, Score> =
        subjects.into_iter().map(|(k, v)| (k, score(v))).collect();
    let macro_accuracy =
        subjects.values().map(|s| s.accuracy).sum::<f64>() / subjects.len().max(1) as f64;
    MmluResult {
        accuracy,
        macro_accuracy,
        n,
        stderr,
        ci_low: (accuracy - 1.96 * stderr).max(0.0),
        ci_high: (accuracy + 1.96 * stderr).min(1.0),
        style: spec.style,
        shots: spec.shots,
        accuracy_unnormalized,
        subjects,
        categories: categories.into_iter().map(|(k, v)| (k, score(v))).collect(),
        fewer_shots: preds.iter().filter(|p| p.used_shots < p.shots).count(),
        skipped,
        seconds: 0.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(question: &str, gold: usize) -> Question {
        Question {
            subject: "high_school_physics".into(),
            index: 0,
            question: question.into(),
            choices: ["one".into(), "two".into(), "three".into(), "four".into()],
            gold,
        }
    }

    #[test]
    fn letter_prompt_is_lm_eval_default() {
        let ex = q(" Ex? ", 1);
        let text = prefix_text(Style::Letter, "high_school_physics", &[ex])
            + &query(Style::Letter, &q("Q?\n", 0));
        assert_eq!(
            text,
            "The following are multiple choice questions (with answers) about high school physics.\n\n\
             Ex?\nA. one\nB. two\nC. three\nD. four\nAnswer: B\n\n\
             Q?\nA. one\nB. two\nC. three\nD. four\nAnswer:"
        );
        assert_eq!(continuations(Style::Letter, &q("x", 0))[3], " D");
    }

    #[test]
    fn cloze_prompt_is_lighteval() {
        let text = prefix_text(Style::Cloze, "high_school_physics", &[q("Ex?", 2)])
            + &query(Style::Cloze, &q("Q?", 0));
        assert_eq!(
            text,
            "The following are questions about high school physics.\n\
             Question: Ex?\nAnswer: three\n\n\
             Question: Q?\nAnswer:"
        );
        // Per-character normalisation: " three" (6 chars) at -3.0 beats " one" (4) at -2.4.
        let x = q("x", 0);
        assert_eq!(predict(Style::Cloze, &x, &[-2.4, -9.0, -3.0, -9.0]), 2);
        assert_eq!(predict(Style::Letter, &x, &[-2.4, -9.0, -3.0, -9.0]), 0);
        assert_eq!(
            predict(Style::Letter, &x, &[-1.0, -1.0, -1.0, -1.0]),
            0,
            "first max wins"
        );
    }

    #[test]
    fn subjects_are_checked() {
        let spec = MmluSpec {
            subjects: "virology, anatomy".into(),
            ..Default::default()
        };
        assert_eq!(
            spec.subject_list().expect("ok"),
            vec!["anatomy", "virology"]
        );
        let bad = MmluSpec {
            subjects: "anatomy,astrology".into(),
            ..Default::default()
        };
        let e = format!("{:#}", bad.subject_list().expect_err("an error"));
        assert!(
            e.contains("astrology") && e.contains("world_religions"),
            "{e}"
        );
        assert_eq!(SUBJECTS.len(), 57);
        let bad = MmluSpec {
            shots: 6,
            ..Default::default()
        };
        assert!(bad
            .validate()
            .expect_err("an error")
            .to_string()
            .contains("--shots 6"));
    }

    #[test]
    fn bad_rows_name_file_and_line() {
        let dir = tempfile::tempdir().expect("ok");
        let test = dir.path().join("data/test");
        std::fs::create_dir_all(&test).expect("ok");
        std::fs::write(
            test.join("anatomy_test.csv"),
            "\"What, here?\",a,b,c,d,B\nq,a,b,c,D\n",
        )
        .expect("ok");
        let e = format!(
            "{:#}",
            read_split(dir.path(), "anatomy", "test").expect_err("an error")
        );
        assert!(
            e.contains("anatomy_test.csv") && e.contains("line 2") && e.contains("5 fields"),
            "{e}"
        );
        std::fs::write(
            test.join("anatomy_test.csv"),
            "\"What, here?\",a,b,c,d,B\nq,a,b,c,d,E\n",
        )
        .expect("ok");
        let e = format!(
            "{:#}",
            read_split(dir.path(), "anatomy", "test").expect_err("an error")
        );
        assert!(e.contains("line 2") && e.contains("\"E\""), "{e}");
        std::fs::write(test.join("anatomy_test.csv"), "\"What, here?\",a,b,c,d,B\n").expect("ok");
        let qs = read_split(dir.path(), "anatomy", "test").expect("ok");
        assert_eq!(qs[0].question, "What, here?");
        assert_eq!(qs[0].gold, 1);
    }

    #[test]
    fn accuracy_micro_macro_and_interval() {
        let p = |subject: &str, ok: bool| Prediction {
            subject: subject.into(),
            index: 0,
            gold: 0,
            pred: usize::from(!ok),
            loglik: vec![0.0; 4],
            style: Style::Letter,
            shots: 0,
            used_shots: 0,
            model: "m".into(),
        };
        let preds = [
            p("anatomy", true),
            p("anatomy", true),
            p("anatomy", false),
            p("virology", false),
        ];
        let refs: Vec<&Prediction> = preds.iter().collect();
        let r = summarize(&refs, &MmluSpec::default(), None, Vec::new());
        assert_eq!(r.n, 4);
        assert!((r.accuracy - 0.5).abs() < 1e-12);
        assert!((r.macro_accuracy - (2.0 / 3.0) / 2.0).abs() < 1e-12);
        assert!((r.stderr - (0.25f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(r.categories["stem"].n, 3);
        assert_eq!(r.categories["other"].n, 1);
    }
}

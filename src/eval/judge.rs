//! Scoring responses with a judge model (book ch07 §7.8, `ollama_evaluate.py`): each test entry's
//! `model_response` is scored 0–100 by a larger model through an OpenAI-compatible
//! (`POST {url}/v1/chat/completions`) or Ollama (`POST {url}/api/chat`, `stream: false`) API,
//! with the book's prompt, temperature 0 and a seed. Server errors (5xx) and timeouts are retried
//! with exponential back-off; the score is the first integer 0..=100 in the reply (a reply
//! without one is counted as unparsable). Every judged answer is kept beside the responses.
//! The HTTP client is [`crate::remote`]'s ([`Judge`] is its `ChatClient` under the judge's
//! name); what is asked and how a reply is read ([`ask_parsed`], the count of unparsable
//! replies) is the judge's, and also serves [`super::pairwise`].
use crate::error::{read_text, write_atomic, LlmError};
use crate::prompt::{format_input, Entry};
pub use crate::remote::{Api, ChatClient as Judge, ChatConfig as JudgeConfig, Role};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// A judge's settings as the book's `ollama_evaluate.py` sends them: seed 123, temperature 0
/// and (Ollama) `num_ctx` 2048; 120 s per request, 3 retries.
pub fn judge_config(url: &str, model: &str, api: Api) -> JudgeConfig {
    let mut cfg = JudgeConfig::new(Role::Judge, url, model, api);
    cfg.num_ctx = Some(2048);
    cfg
}

/// The book's judge prompt for an entry and a response.
pub fn judge_prompt(entry: &Entry, response: &str) -> String {
    format!(
        "Given the input `{}` and correct output `{}`, score the model response `{response}` on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only.",
        format_input(entry),
        entry.output
    )
}

/// The first integer in `reply` that lies in 0..=100 (`None` when there is none).
pub fn parse_score(reply: &str) -> Option<u32> {
    let mut digits = String::new();
    let check = |d: &mut String| -> Option<u32> {
        let v = d
            .parse::<u64>()
            .ok()
            .filter(|v| *v <= 100)
            .map(|v| v as u32);
        d.clear();
        v
    };
    for c in reply.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
        } else if !digits.is_empty() {
            if let Some(v) = check(&mut digits) {
                return Some(v);
            }
        }
    }
    if digits.is_empty() {
        None
    } else {
        check(&mut digits)
    }
}

/// Counts of judge replies that `parse` read and those it could not (`eval judge`'s scores,
/// `eval pairwise`'s verdicts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub parsed: usize,
    pub unparsable: usize,
}

/// Asks `messages` and reads the reply with `parse`; a reply it rejects is counted as
/// unparsable (never an error: the reply is returned for the record).
pub fn ask_parsed<T>(
    judge: &Judge,
    messages: &[(&str, &str)],
    parse: impl Fn(&str) -> Option<T>,
    tally: &mut Tally,
) -> Result<(String, Option<T>), LlmError> {
    let reply = judge.ask_messages(messages)?;
    let v = parse(&reply);
    if v.is_some() {
        tally.parsed += 1;
    } else {
        tally.unparsable += 1;
    }
    Ok((reply, v))
}

/// The figures `--format json` prints.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JudgeSummary {
    /// Mean over the scored responses (NaN → null when none was scored).
    pub mean_score: Option<f64>,
    pub scored: usize,
    pub unparsable: usize,
    pub total: usize,
}

/// `responses.json` → `responses.judged.json` (beside it).
pub fn judged_path(responses: &Path) -> PathBuf {
    let stem = responses
        .file_stem()
        .map(|s| s.to_string_lossy().to_string())
        .unwrap_or_else(|| "responses".into());
    responses.with_file_name(format!("{stem}.judged.json"))
}

/// Reads a responses file (a JSON array of objects with `instruction`, `input`, `output` and
/// `model_response`, as `task: instruct` writes and the book's
/// `instruction-data-with-response.json` holds).
pub fn read_responses(path: &Path) -> Result<Vec<(Entry, String)>> {
    let text = read_text(path)?;
    let bad = |m: String| LlmError::BadFile {
        path: path.to_path_buf(),
        message: m,
    };
    let v: Vec<serde_json::Map<String, serde_json::Value>> = serde_json::from_str(&text)
        .map_err(|e| bad(format!("not a JSON array of objects ({e})")))?;
    let mut out = Vec::with_capacity(v.len());
    for (i, obj) in v.into_iter().enumerate() {
        let s = |k: &str| obj.get(k).and_then(|x| x.as_str()).map(str::to_string);
        let (Some(instruction), Some(output), Some(response)) =
            (s("instruction"), s("output"), s("model_response"))
        else {
            return Err(bad(format!(
                "entry {}: needs string fields instruction, output and model_response",
                i + 1
            ))
            .into());
        };
        let mut e = Entry::new(&instruction, &s("input").unwrap_or_default(), &output);
        e.raw = obj;
        out.push((e, response));
    }
    Ok(out)
}

/// Scores every response of `responses` (probing the server first), writes the judged file and
/// returns the summary; `progress` hears about each entry.
pub fn judge_file(
    responses: &Path,
    cfg: JudgeConfig,
    progress: &mut dyn FnMut(usize, usize, Option<u32>),
) -> Result<JudgeSummary> {
    let entries = read_responses(responses)?;
    let judge = Judge::new(cfg);
    judge.probe()?;
    let mut judged = Vec::with_capacity(entries.len());
    let mut sum = 0u64;
    let mut tally = Tally::default();
    for (i, (e, response)) in entries.iter().enumerate() {
        let prompt = judge_prompt(e, response);
        let (reply, score) = ask_parsed(&judge, &[("user", &prompt)], parse_score, &mut tally)?;
        sum += u64::from(score.unwrap_or(0));
        let mut rec = e.raw.clone();
        rec.insert("judge_reply".into(), reply.into());
        rec.insert("judge_score".into(), score.into());
        judged.push(serde_json::Value::Object(rec));
        progress(i + 1, entries.len(), score);
    }
    let summary = JudgeSummary {
        mean_score: (tally.parsed > 0).then(|| sum as f64 / tally.parsed as f64),
        scored: tally.parsed,
        unparsable: tally.unparsable,
        total: entries.len(),
    };
    let out = serde_json::json!({
        "judge": {"url": judge.cfg.url, "model": judge.cfg.model, "api": judge.cfg.api, "seed": judge.cfg.seed},
        "summary": summary,
        "entries": judged,
    });
    write_atomic(
        &judged_path(responses),
        serde_json::to_string_pretty(&out)?.as_bytes(),
    )?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_first_integer_in_range() {
        assert_eq!(parse_score("85"), Some(85));
        assert_eq!(parse_score("Score: 42 out of 100"), Some(42));
        assert_eq!(parse_score("2024 was fine, 7"), Some(7));
        assert_eq!(parse_score("100."), Some(100));
        assert_eq!(parse_score("no idea"), None);
        assert_eq!(parse_score("150"), None);
    }
}

//! Scoring responses with a judge model (book ch07 §7.8, `ollama_evaluate.py`): each test entry's
//! `model_response` is scored 0–100 by a larger model through an OpenAI-compatible
//! (`POST {url}/v1/chat/completions`) or Ollama (`POST {url}/api/chat`, `stream: false`) API,
//! with the book's prompt, temperature 0 and a seed. Server errors (5xx) and timeouts are retried
//! with exponential back-off; the score is the first integer 0..=100 in the reply (a reply
//! without one is counted as unparsable). Every judged answer is kept beside the responses.
//! The client ([`Judge`]: requests, retries, the count of unparsable replies) also serves
//! [`super::pairwise`].
use crate::error::{read_text, write_atomic, LlmError};
use crate::prompt::{format_input, Entry};
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Which API the judge server speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Api {
    /// `POST {url}/v1/chat/completions` (vLLM, llama.cpp server, LM Studio, `llmlab serve`, …).
    #[default]
    Openai,
    /// `POST {url}/api/chat` with `stream: false` (the book's Ollama set-up).
    Ollama,
}

#[derive(Debug, Clone)]
pub struct JudgeConfig {
    /// The server's base URL (`http://localhost:11434`).
    pub url: String,
    /// The judge model's name (`llama3`, `gpt-4o-mini`, …).
    pub model: String,
    pub api: Api,
    /// Sent with every request (the book: 123), with temperature 0.
    pub seed: u64,
    /// Per-request time limit.
    pub timeout: Duration,
    /// Tries after the first on a 5xx answer, a timeout or a dropped connection.
    pub retries: usize,
    /// The first wait before a retry; it doubles each time.
    pub backoff: Duration,
}

impl JudgeConfig {
    pub fn new(url: &str, model: &str, api: Api) -> Self {
        Self {
            url: url.trim_end_matches('/').to_string(),
            model: model.into(),
            api,
            seed: 123,
            timeout: Duration::from_secs(120),
            retries: 3,
            backoff: Duration::from_millis(500),
        }
    }
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

/// A client of one judge server.
pub struct Judge {
    pub cfg: JudgeConfig,
    agent: ureq::Agent,
}

/// One failed HTTP exchange: whether trying again may help, and why.
struct Failure {
    retry: bool,
    message: String,
}

impl Judge {
    pub fn new(cfg: JudgeConfig) -> Self {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(cfg.timeout))
            .http_status_as_error(false)
            .build()
            .into();
        Self { cfg, agent }
    }

    fn endpoint(&self) -> String {
        match self.cfg.api {
            Api::Openai => format!("{}/v1/chat/completions", self.cfg.url),
            Api::Ollama => format!("{}/api/chat", self.cfg.url),
        }
    }

    /// Checks that the server answers at all (any HTTP status counts) before any work starts.
    pub fn probe(&self) -> Result<(), LlmError> {
        let url = match self.cfg.api {
            Api::Openai => format!("{}/v1/models", self.cfg.url),
            Api::Ollama => format!("{}/api/tags", self.cfg.url),
        };
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(self.cfg.timeout.min(Duration::from_secs(10))))
            .http_status_as_error(false)
            .build()
            .into();
        agent.get(&url).call().map(|_| ()).map_err(|e| {
            LlmError::Usage(format!(
                "the judge server at {} does not answer ({e}); start it (e.g. `ollama serve` and `ollama pull {}`) or check --judge-url and --api",
                self.cfg.url, self.cfg.model
            ))
        })
    }

    fn body(&self, messages: &[(&str, &str)]) -> serde_json::Value {
        let messages: Vec<serde_json::Value> = messages
            .iter()
            .map(|(role, content)| serde_json::json!({"role": role, "content": content}))
            .collect();
        match self.cfg.api {
            Api::Openai => serde_json::json!({
                "model": self.cfg.model,
                "messages": messages,
                "temperature": 0,
                "seed": self.cfg.seed,
            }),
            Api::Ollama => serde_json::json!({
                "model": self.cfg.model,
                "messages": messages,
                "stream": false,
                "options": {"seed": self.cfg.seed, "temperature": 0, "num_ctx": 2048},
            }),
        }
    }

    fn try_once(&self, body: &str) -> Result<String, Failure> {
        let url = self.endpoint();
        let mut resp = self
            .agent
            .post(&url)
            .header("Content-Type", "application/json")
            .send(body)
            .map_err(|e| Failure {
                retry: matches!(
                    e,
                    ureq::Error::Timeout(_) | ureq::Error::Io(_) | ureq::Error::Protocol(_)
                ),
                message: format!("POST {url}: {e}"),
            })?;
        let status = resp.status().as_u16();
        let text = resp.body_mut().read_to_string().map_err(|e| Failure {
            retry: true,
            message: format!("POST {url}: reading the answer: {e}"),
        })?;
        if status >= 500 {
            return Err(Failure {
                retry: true,
                message: format!("POST {url}: HTTP {status}: {}", snippet(&text)),
            });
        }
        if status >= 400 {
            return Err(Failure {
                retry: false,
                message: format!(
                    "POST {url}: HTTP {status}: {} (is --judge-model '{}' served there?)",
                    snippet(&text),
                    self.cfg.model
                ),
            });
        }
        let v: serde_json::Value = serde_json::from_str(&text).map_err(|e| Failure {
            retry: false,
            message: format!("POST {url}: not a JSON answer ({e}): {}", snippet(&text)),
        })?;
        let content = match self.cfg.api {
            Api::Openai => v.pointer("/choices/0/message/content"),
            Api::Ollama => v.pointer("/message/content"),
        };
        content
            .and_then(|c| c.as_str())
            .map(str::to_string)
            .ok_or_else(|| Failure {
                retry: false,
                message: format!(
                    "POST {url}: the answer has no message content: {}",
                    snippet(&text)
                ),
            })
    }

    /// The judge's reply to `prompt` (one user message), retrying server errors and timeouts
    /// with back-off.
    pub fn ask(&self, prompt: &str) -> Result<String, LlmError> {
        self.ask_messages(&[("user", prompt)])
    }

    /// The judge's reply to a conversation of `(role, content)` messages (`system`, `user`),
    /// retrying server errors and timeouts with back-off.
    pub fn ask_messages(&self, messages: &[(&str, &str)]) -> Result<String, LlmError> {
        let body = self.body(messages).to_string();
        let mut wait = self.cfg.backoff;
        let mut attempt = 0;
        loop {
            match self.try_once(&body) {
                Ok(reply) => return Ok(reply),
                Err(f) if f.retry && attempt < self.cfg.retries => {
                    attempt += 1;
                    std::thread::sleep(wait);
                    wait *= 2;
                }
                Err(f) => {
                    return Err(LlmError::Usage(format!(
                        "the judge failed after {} attempt(s): {}",
                        attempt + 1,
                        f.message
                    )))
                }
            }
        }
    }
}

/// Counts of judge replies that `parse` read and those it could not (`eval judge`'s scores,
/// `eval pairwise`'s verdicts).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    pub parsed: usize,
    pub unparsable: usize,
}

impl Judge {
    /// Asks `messages` and reads the reply with `parse`; a reply it rejects is counted as
    /// unparsable (never an error: the reply is returned for the record).
    pub fn ask_parsed<T>(
        &self,
        messages: &[(&str, &str)],
        parse: impl Fn(&str) -> Option<T>,
        tally: &mut Tally,
    ) -> Result<(String, Option<T>), LlmError> {
        let reply = self.ask_messages(messages)?;
        let v = parse(&reply);
        if v.is_some() {
            tally.parsed += 1;
        } else {
            tally.unparsable += 1;
        }
        Ok((reply, v))
    }
}

fn snippet(text: &str) -> String {
    let t: String = text.chars().take(200).collect();
    t.replace('\n', " ")
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
        let (reply, score) = judge.ask_parsed(&[("user", &prompt)], parse_score, &mut tally)?;
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

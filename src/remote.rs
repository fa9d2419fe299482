//! A chat client for a teacher or judge model behind an HTTP server (book ch07: §7.8's
//! `ollama_evaluate.py` asks a judge, `04_preference-tuning-with-dpo` asks a teacher): an
//! OpenAI-compatible (`POST {url}/v1/chat/completions`) or Ollama (`POST {url}/api/chat`,
//! `stream: false`) API, temperature 0 and a seed, as the book's `query_model` sends them.
//! Server errors (5xx), timeouts and dropped connections are retried with exponential back-off;
//! [`ChatClient::probe`] checks that the server answers before any work starts.
//!
//! What is asked and how a reply is read belong to the callers: the judge
//! (`eval::judge`, `eval::pairwise`) and the preference-data maker
//! (`instruct::make_preferences`).
use crate::error::LlmError;
use serde::{Deserialize, Serialize};
use std::time::Duration;

/// Which API the server speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Api {
    /// `POST {url}/v1/chat/completions` (vLLM, llama.cpp server, LM Studio, `llmlab serve`, …).
    #[default]
    Openai,
    /// `POST {url}/api/chat` with `stream: false` (the book's Ollama set-up).
    Ollama,
}

/// What the model is to the caller. It names the model and its command-line flags
/// (`--judge-url`, `--teacher-model`, …) in error messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Scores or compares responses (`eval judge`, `eval pairwise`).
    Judge,
    /// Writes data (`data make-preferences`).
    Teacher,
}

impl Role {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Judge => "judge",
            Self::Teacher => "teacher",
        }
    }
}

/// A server, a model on it, and how requests are made.
#[derive(Debug, Clone)]
pub struct ChatConfig {
    pub role: Role,
    /// The server's base URL (`http://localhost:11434`), without a trailing slash (nor, for
    /// an OpenAI API, a trailing `/v1`: the endpoints add it).
    pub url: String,
    /// The model's name on the server (`llama3`, `gpt-4o-mini`, …).
    pub model: String,
    pub api: Api,
    /// Sent with every request (the book: 123), with temperature 0.
    pub seed: u64,
    /// Ollama's `options.num_ctx` (the book's judge: 2048); `None` leaves it out (the server's
    /// default, as the book's preference notebook sends no `num_ctx`). Not sent to OpenAI APIs.
    pub num_ctx: Option<u32>,
    /// Per-request time limit.
    pub timeout: Duration,
    /// Tries after the first on a 5xx answer, a timeout or a dropped connection.
    pub retries: usize,
    /// The first wait before a retry; it doubles each time.
    pub backoff: Duration,
}

impl ChatConfig {
    /// Seed 123, no `num_ctx`, 120 s per request, 3 retries starting at 0.5 s.
    pub fn new(role: Role, url: &str, model: &str, api: Api) -> Self {
        let url = url.trim_end_matches('/');
        // OpenAI clients write the base URL with its /v1 (`http://127.0.0.1:8000/v1`).
        let url = match api {
            Api::Openai => url.strip_suffix("/v1").unwrap_or(url),
            Api::Ollama => url,
        };
        Self {
            role,
            url: url.to_string(),
            model: model.into(),
            api,
            seed: 123,
            num_ctx: None,
            timeout: Duration::from_secs(120),
            retries: 3,
            backoff: Duration::from_millis(500),
        }
    }
}

/// A client of one chat server.
pub struct ChatClient {
    pub cfg: ChatConfig,
    agent: ureq::Agent,
}

/// One failed HTTP exchange: whether trying again may help, and why.
struct Failure {
    retry: bool,
    message: String,
}

impl ChatClient {
    pub fn new(cfg: ChatConfig) -> Self {
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
        let role = self.cfg.role.name();
        agent.get(&url).call().map(|_| ()).map_err(|e| {
            LlmError::Usage(format!(
                "the {role} server at {} does not answer ({e}); start it (e.g. `ollama serve` and `ollama pull {}`) or check --{role}-url and --api",
                self.cfg.url, self.cfg.model
            ))
        })
    }

    /// The request body for `messages` in the server's API.
    pub fn body(&self, messages: &[(&str, &str)]) -> serde_json::Value {
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
            Api::Ollama => {
                let mut options = serde_json::json!({"seed": self.cfg.seed, "temperature": 0});
                if let Some(n) = self.cfg.num_ctx {
                    options["num_ctx"] = n.into();
                }
                serde_json::json!({
                    "model": self.cfg.model,
                    "messages": messages,
                    "stream": false,
                    "options": options,
                })
            }
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
                    "POST {url}: HTTP {status}: {} (is --{}-model '{}' served there?)",
                    snippet(&text),
                    self.cfg.role.name(),
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

    /// The model's reply to `prompt` (one user message), retrying server errors and timeouts
    /// with back-off.
    pub fn ask(&self, prompt: &str) -> Result<String, LlmError> {
        self.ask_messages(&[("user", prompt)])
    }

    /// The model's reply to a conversation of `(role, content)` messages (`system`, `user`),
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
                        "the {} failed after {} attempt(s): {}",
                        self.cfg.role.name(),
                        attempt + 1,
                        f.message
                    )))
                }
            }
        }
    }
}

fn snippet(text: &str) -> String {
    let t: String = text.chars().take(200).collect();
    t.replace('\n', " ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The Ollama options are the book's: seed and temperature 0, `num_ctx` only when set
    /// (the judge's 2048; the preference notebook sends none).
    #[test]
    fn ollama_options_carry_num_ctx_only_when_set() {
        let mut cfg = ChatConfig::new(Role::Teacher, "http://h:1/", "m", Api::Ollama);
        assert_eq!(cfg.url, "http://h:1");
        let body = ChatClient::new(cfg.clone()).body(&[("user", "hi")]);
        assert_eq!(
            body["options"],
            serde_json::json!({"seed": 123, "temperature": 0})
        );
        assert_eq!(body["stream"], false);
        cfg.num_ctx = Some(2048);
        let body = ChatClient::new(cfg.clone()).body(&[("user", "hi")]);
        assert_eq!(body["options"]["num_ctx"], 2048);
        cfg.api = Api::Openai;
        let body = ChatClient::new(cfg).body(&[("user", "hi")]);
        for url in ["http://h:1/v1", "http://h:1/v1/", "http://h:1"] {
            let c = ChatConfig::new(Role::Judge, url, "m", Api::Openai);
            assert_eq!(
                ChatClient::new(c).endpoint(),
                "http://h:1/v1/chat/completions"
            );
        }
        assert!(body.get("options").is_none() && body["temperature"] == 0);
    }
}

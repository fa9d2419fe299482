//! The OpenAI API's request bodies as `llmlab serve` reads them, and its error object.
//!
//! Requests follow OpenAI's [chat completions](https://platform.openai.com/docs/api-reference/chat/create)
//! and legacy [completions](https://platform.openai.com/docs/api-reference/completions/create)
//! references: unknown fields are ignored, as OpenAI does (no `deny_unknown_fields`, unlike
//! llmlab's YAML), while a known field of the wrong type or out of range is a 400 whose error
//! object names it in `param`. Sampling fields OpenAI has and llmlab does not implement
//! (`presence_penalty`, `frequency_penalty`, `logit_bias`, `best_of`, …) are ignored too.
//! `top_k` and `ignore_eos` are extensions, as in vLLM and llama.cpp.
use super::engine::{Input, JobError, Sampling, SubmitError};
use crate::chat::Message;
use serde::Deserialize;
use serde_json::Value;

/// Most choices per request (`n`).
pub const MAX_N: u64 = 16;
/// Most alternatives per token (`top_logprobs`, completions' `logprobs`).
pub const MAX_TOP_LOGPROBS: u64 = 20;
/// Most stop strings (OpenAI's limit).
pub const MAX_STOP: usize = 4;

/// An error in OpenAI's shape: `{"error": {"message", "type", "param", "code"}}` with an HTTP
/// status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub message: String,
    /// OpenAI's `type`: `invalid_request_error`, `authentication_error`, `not_found_error`,
    /// `rate_limit_error`, `unavailable_error`, `timeout_error`, `server_error`.
    pub kind: &'static str,
    /// The request field at fault (`messages[0].content`, `temperature`), if one is.
    pub param: Option<String>,
    pub code: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: u16, kind: &'static str, code: &'static str, message: String) -> Self {
        Self {
            status,
            message,
            kind,
            param: None,
            code: Some(code),
        }
    }

    /// 400 for a value of `param`.
    pub fn invalid(param: &str, message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            kind: "invalid_request_error",
            param: Some(param.to_string()),
            code: Some("invalid_value"),
        }
    }

    pub fn with_param(mut self, param: &str) -> Self {
        self.param = Some(param.to_string());
        self
    }

    /// 404 for a model this server does not serve.
    pub fn unknown_model(asked: &str, served: &str) -> Self {
        Self::new(
            404,
            "not_found_error",
            "model_not_found",
            format!("the model '{asked}' does not exist here; this server serves '{served}'"),
        )
        .with_param("model")
    }

    /// The JSON body.
    pub fn body(&self) -> Value {
        serde_json::json!({"error": {
            "message": self.message,
            "type": self.kind,
            "param": self.param,
            "code": self.code,
        }})
    }
}

impl From<SubmitError> for ApiError {
    fn from(e: SubmitError) -> Self {
        let message = e.to_string();
        match e {
            SubmitError::QueueFull { .. } => {
                Self::new(429, "rate_limit_error", "rate_limit_exceeded", message)
            }
            SubmitError::Loading => Self::new(503, "unavailable_error", "model_loading", message),
            SubmitError::ShuttingDown => {
                Self::new(503, "unavailable_error", "shutting_down", message)
            }
            SubmitError::Failed(_) => Self::new(503, "unavailable_error", "model_failed", message),
        }
    }
}

impl ApiError {
    /// A request the engine refused (400), naming `param` (`messages` or `prompt`).
    pub fn from_job(e: &JobError, param: &str) -> Self {
        let code = match e {
            JobError::PromptTooLong { .. } => "context_length_exceeded",
            _ => "invalid_value",
        };
        Self::new(400, "invalid_request_error", code, e.to_string()).with_param(param)
    }
}

/// Parses a JSON request body into `T`: malformed JSON is a 400 `invalid_json`; a field of the
/// wrong type (or a missing required one) a 400 that names it.
pub fn parse_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let bad_json = |e: serde_json::Error| {
        ApiError::new(
            400,
            "invalid_request_error",
            "invalid_json",
            format!("the request body is not valid JSON: {e}"),
        )
    };
    let value: T = match serde_path_to_error::deserialize(&mut de) {
        Ok(v) => v,
        Err(e) => {
            let path = e.path().to_string();
            let inner = e.into_inner();
            if !inner.is_data() {
                return Err(bad_json(inner));
            }
            let text = inner.to_string();
            // "missing field `messages` at line 1 column 20": the field is the param.
            let missing = text
                .strip_prefix("missing field `")
                .and_then(|r| r.split('`').next());
            let param = match (missing, path.as_str()) {
                (Some(f), ".") => f.to_string(),
                (Some(f), p) => format!("{p}.{f}"),
                (None, p) => p.to_string(),
            };
            let detail = text.split(" at line ").next().unwrap_or(&text);
            return Err(ApiError::new(
                400,
                "invalid_request_error",
                "invalid_type",
                format!("{param}: {detail}"),
            )
            .with_param(&param));
        }
    };
    de.end().map_err(bad_json)?;
    Ok(value)
}

/// `stream_options`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: Option<bool>,
}

/// A chat message as sent: `content` is a string, a list of `{"type": "text", "text"}` parts,
/// or null.
#[derive(Debug, Clone, Deserialize)]
pub struct RawMessage {
    pub role: String,
    #[serde(default)]
    pub content: Option<Value>,
}

/// The body of `POST /v1/chat/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct ChatRequest {
    /// Optional here (llama.cpp's choice); when given it must be the served model.
    #[serde(default)]
    pub model: Option<String>,
    pub messages: Vec<RawMessage>,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<i64>,
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub max_completion_tokens: Option<u64>,
    #[serde(default)]
    pub stop: Option<Value>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub n: Option<u64>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    #[serde(default)]
    pub logprobs: Option<bool>,
    #[serde(default)]
    pub top_logprobs: Option<u64>,
    #[serde(default)]
    pub ignore_eos: Option<bool>,
}

/// The body of `POST /v1/completions`.
#[derive(Debug, Clone, Deserialize)]
pub struct CompletionRequest {
    #[serde(default)]
    pub model: Option<String>,
    /// A string, a list of strings, a list of token ids, or a list of lists of token ids.
    pub prompt: Value,
    #[serde(default)]
    pub temperature: Option<f64>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub top_k: Option<i64>,
    /// Default 16, as OpenAI's; 0 with `echo` scores the prompt only.
    #[serde(default)]
    pub max_tokens: Option<u64>,
    #[serde(default)]
    pub stop: Option<Value>,
    #[serde(default)]
    pub seed: Option<i64>,
    #[serde(default)]
    pub n: Option<u64>,
    #[serde(default)]
    pub stream: Option<bool>,
    #[serde(default)]
    pub stream_options: Option<StreamOptions>,
    /// The legacy API's number of alternatives per token (0 = the chosen token's only).
    #[serde(default)]
    pub logprobs: Option<u64>,
    #[serde(default)]
    pub echo: Option<bool>,
    #[serde(default)]
    pub ignore_eos: Option<bool>,
}

/// The body of `POST /tokenize`: `prompt` (vLLM) or `content` (llama.cpp), or `messages`
/// through the chat template.
#[derive(Debug, Clone, Deserialize)]
pub struct TokenizeRequest {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub prompt: Option<String>,
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default)]
    pub messages: Option<Vec<RawMessage>>,
    /// Also return each token's text (`token_strs`).
    #[serde(default)]
    pub return_token_strs: Option<bool>,
}

/// What a request asks for, checked and in the engine's terms.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub sampling: Sampling,
    pub n: usize,
    pub stream: bool,
    pub include_usage: bool,
    /// Alternatives per token when log-probabilities are asked for.
    pub logprobs: Option<usize>,
    pub echo: bool,
}

/// The stop strings of `stop`: a string or a list of at most [`MAX_STOP`] strings.
pub fn parse_stop(stop: Option<&Value>) -> Result<Vec<String>, ApiError> {
    let list = match stop {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(items)) => items
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| {
                ApiError::invalid("stop", "stop: expected a string or a list of strings")
            })?,
        Some(_) => {
            return Err(ApiError::invalid(
                "stop",
                "stop: expected a string or a list of strings",
            ))
        }
    };
    if list.len() > MAX_STOP {
        return Err(ApiError::invalid(
            "stop",
            format!("stop: at most {MAX_STOP} strings, got {}", list.len()),
        ));
    }
    Ok(list.into_iter().filter(|s| !s.is_empty()).collect())
}

/// Messages for the chat template. `developer` is OpenAI's newer name for `system`.
pub fn parse_messages(messages: &[RawMessage], param: &str) -> Result<Vec<Message>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::invalid(
            param,
            format!("{param}: at least one message is needed"),
        ));
    }
    messages
        .iter()
        .enumerate()
        .map(|(i, m)| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                r @ ("user" | "assistant") => r,
                other => {
                    return Err(ApiError::invalid(
                        &format!("{param}[{i}].role"),
                        format!("{param}[{i}].role: '{other}' is not one of system, developer, user, assistant"),
                    ))
                }
            };
            let content = content_text(m.content.as_ref())
                .map_err(|e| ApiError::invalid(&format!("{param}[{i}].content"), format!("{param}[{i}].content: {e}")))?;
            Ok(Message::new(role, &content))
        })
        .collect()
}

/// The text of a message's content: a string, text parts, or null (empty).
fn content_text(content: Option<&Value>) -> Result<String, String> {
    match content {
        None | Some(Value::Null) => Ok(String::new()),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Array(parts)) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (
                    p.get("type").and_then(Value::as_str),
                    p.get("text").and_then(Value::as_str),
                ) {
                    (Some("text"), Some(t)) => text.push_str(t),
                    (Some(kind), _) if kind != "text" => {
                        return Err(format!(
                            "part {j} is of type '{kind}'; only text parts are supported"
                        ))
                    }
                    _ => {
                        return Err(format!(
                            "part {j}: expected {{\"type\": \"text\", \"text\": ...}}"
                        ))
                    }
                }
            }
            Ok(text)
        }
        Some(_) => Err("expected a string or a list of text parts".into()),
    }
}

/// The prompts of a completions request: a string, a list of strings, a list of token ids, or
/// a list of lists of token ids.
pub fn parse_prompts(prompt: &Value) -> Result<Vec<Input>, ApiError> {
    let bad = || {
        ApiError::invalid(
            "prompt",
            "prompt: expected a string, a list of strings, a list of token ids or a list of lists of token ids",
        )
    };
    let ids = |items: &[Value]| -> Option<Vec<i64>> {
        items
            .iter()
            .map(|v| v.as_i64().filter(|&i| i >= 0))
            .collect()
    };
    match prompt {
        Value::String(s) => Ok(vec![Input::Text(s.clone())]),
        Value::Array(items) if items.is_empty() => {
            Err(ApiError::invalid("prompt", "prompt: the list is empty"))
        }
        Value::Array(items) if items.iter().all(Value::is_string) => Ok(items
            .iter()
            .filter_map(|v| v.as_str().map(|s| Input::Text(s.to_string())))
            .collect()),
        Value::Array(items) if items.iter().all(Value::is_number) => {
            Ok(vec![Input::Ids(ids(items).ok_or_else(bad)?)])
        }
        Value::Array(items) => items
            .iter()
            .map(|v| match v {
                Value::Array(inner) if !inner.is_empty() => {
                    ids(inner).map(Input::Ids).ok_or_else(bad)
                }
                _ => Err(bad()),
            })
            .collect(),
        _ => Err(bad()),
    }
}

/// The shared sampling fields, checked.
struct Common<'a> {
    temperature: Option<f64>,
    top_p: Option<f64>,
    top_k: Option<i64>,
    seed: Option<i64>,
    n: Option<u64>,
    stop: Option<&'a Value>,
    ignore_eos: Option<bool>,
}

impl Common<'_> {
    fn sampling(&self, max_tokens: Option<usize>) -> Result<(Sampling, usize), ApiError> {
        let temperature = self.temperature.unwrap_or(1.0);
        if !(0.0..=2.0).contains(&temperature) {
            return Err(ApiError::invalid(
                "temperature",
                format!("temperature: {temperature} is outside 0..=2"),
            ));
        }
        let top_p = self.top_p.unwrap_or(1.0);
        if !(top_p > 0.0 && top_p <= 1.0) {
            return Err(ApiError::invalid(
                "top_p",
                format!("top_p: {top_p} is outside (0, 1]"),
            ));
        }
        // vLLM's convention: -1 (or 0) = off.
        let top_k = match self.top_k {
            None | Some(-1) | Some(0) => None,
            Some(k) if k > 0 => Some(k),
            Some(k) => {
                return Err(ApiError::invalid(
                    "top_k",
                    format!("top_k: {k} must be >= 1 (or -1 for off)"),
                ))
            }
        };
        let n = self.n.unwrap_or(1);
        if !(1..=MAX_N).contains(&n) {
            return Err(ApiError::invalid(
                "n",
                format!("n: {n} is outside 1..={MAX_N}"),
            ));
        }
        let sampling = Sampling {
            temperature,
            top_p,
            top_k,
            // OpenAI's seed is any 64-bit integer; the engine's is unsigned.
            seed: self.seed.map(|s| s as u64),
            max_tokens,
            stop: parse_stop(self.stop)?,
            ignore_eos: self.ignore_eos.unwrap_or(false),
        };
        Ok((sampling, n as usize))
    }
}

fn include_usage(stream: bool, opts: &Option<StreamOptions>) -> bool {
    stream && opts.as_ref().and_then(|o| o.include_usage).unwrap_or(false)
}

impl ChatRequest {
    /// Checks the values and gives the engine's settings.
    pub fn plan(&self) -> Result<Plan, ApiError> {
        let max_tokens = match (self.max_completion_tokens, self.max_tokens) {
            (Some(m), _) => Some(("max_completion_tokens", m)),
            (None, Some(m)) => Some(("max_tokens", m)),
            (None, None) => None,
        };
        if let Some((param, 0)) = max_tokens {
            return Err(ApiError::invalid(
                param,
                format!("{param}: must be at least 1"),
            ));
        }
        let common = Common {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            n: self.n,
            stop: self.stop.as_ref(),
            ignore_eos: self.ignore_eos,
        };
        let (sampling, n) = common.sampling(max_tokens.map(|(_, m)| m as usize))?;
        let logprobs = match (self.logprobs.unwrap_or(false), self.top_logprobs) {
            (_, Some(k)) if k > MAX_TOP_LOGPROBS => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    format!("top_logprobs: {k} is outside 0..={MAX_TOP_LOGPROBS}"),
                ))
            }
            (false, Some(_)) => {
                return Err(ApiError::invalid(
                    "top_logprobs",
                    "top_logprobs: needs logprobs to be true",
                ))
            }
            (true, k) => Some(k.unwrap_or(0) as usize),
            (false, None) => None,
        };
        let stream = self.stream.unwrap_or(false);
        Ok(Plan {
            sampling,
            n,
            stream,
            include_usage: include_usage(stream, &self.stream_options),
            logprobs,
            echo: false,
        })
    }
}

impl CompletionRequest {
    /// Checks the values and gives the engine's settings (`max_tokens` as asked; see the
    /// handler for 0).
    pub fn plan(&self) -> Result<Plan, ApiError> {
        let common = Common {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            seed: self.seed,
            n: self.n,
            stop: self.stop.as_ref(),
            ignore_eos: self.ignore_eos,
        };
        let (sampling, n) = common.sampling(Some(self.max_tokens.unwrap_or(16) as usize))?;
        if let Some(k) = self.logprobs.filter(|&k| k > MAX_TOP_LOGPROBS) {
            return Err(ApiError::invalid(
                "logprobs",
                format!("logprobs: {k} is outside 0..={MAX_TOP_LOGPROBS}"),
            ));
        }
        let stream = self.stream.unwrap_or(false);
        Ok(Plan {
            sampling,
            n,
            stream,
            include_usage: include_usage(stream, &self.stream_options),
            logprobs: self.logprobs.map(|k| k as usize),
            echo: self.echo.unwrap_or(false),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(body: &str) -> Result<Plan, ApiError> {
        let req = parse_body::<ChatRequest>(body.as_bytes())?;
        parse_messages(&req.messages, "messages")?;
        req.plan()
    }

    #[test]
    fn wrong_types_and_values_name_their_param() {
        let e = chat(r#"{"messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}"#)
            .expect_err("a string temperature");
        assert_eq!((e.status, e.param.as_deref()), (400, Some("temperature")));
        let e = chat(r#"{"messages": [{"role": "user", "content": 3}]}"#).expect_err("content 3");
        assert_eq!(e.param.as_deref(), Some("messages[0].content"));
        let e = chat(r#"{"model": "m"}"#).expect_err("no messages");
        assert_eq!(e.param.as_deref(), Some("messages"));
        let e = chat(r#"{"messages": [{"role": "user"}], "temperature": 2.5}"#).expect_err("2.5");
        assert!(e.message.contains("0..=2"), "{}", e.message);
        let e = chat(r#"{"messages": [{"role": "user"}], "stop": ["a","b","c","d","e"]}"#)
            .expect_err("5 stops");
        assert_eq!(e.param.as_deref(), Some("stop"));
        let e = chat(r#"{"messages": [{"role": "user"}], "n": 0}"#).expect_err("n 0");
        assert_eq!(e.param.as_deref(), Some("n"));
        let e = chat(r#"{"messages": [{"role": "user"}], "max_tokens": -1}"#).expect_err("-1");
        assert_eq!(e.param.as_deref(), Some("max_tokens"));
        let e = chat(r#"{"messages": [{"role": "user"}], "top_logprobs": 2}"#).expect_err("no lp");
        assert_eq!(e.param.as_deref(), Some("top_logprobs"));
        let e = chat(r#"{"messages": [{"role": "user"}] "#).expect_err("cut short");
        assert_eq!(e.code, Some("invalid_json"));
        let e = chat(r#"{"messages": [{"role": "user"}]} x"#).expect_err("trailing");
        assert_eq!(e.code, Some("invalid_json"));
    }

    #[test]
    fn unknown_fields_are_ignored_and_defaults_are_openais() -> Result<(), ApiError> {
        let p = chat(
            r#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}], "frequency_penalty": 0.5, "stop": "END", "max_completion_tokens": 7, "max_tokens": 3}"#,
        )?;
        assert_eq!(p.sampling.temperature, 1.0);
        assert_eq!(p.sampling.stop, vec!["END".to_string()]);
        assert_eq!(p.sampling.max_tokens, Some(7));
        assert_eq!((p.n, p.stream, p.logprobs), (1, false, None));
        let c: CompletionRequest = parse_body(
            br#"{"prompt": [[1, 2], [3]], "echo": true, "logprobs": 1, "max_tokens": 0}"#,
        )?;
        let plan = c.plan()?;
        assert_eq!(
            (plan.echo, plan.logprobs, plan.sampling.max_tokens),
            (true, Some(1), Some(0))
        );
        assert_eq!(parse_prompts(&c.prompt)?.len(), 2);
        Ok(())
    }

    #[test]
    fn prompts_of_every_shape() -> Result<(), ApiError> {
        let p = |s: &str| parse_prompts(&serde_json::from_str(s).expect("json"));
        assert!(matches!(p(r#""a""#)?.as_slice(), [Input::Text(t)] if t == "a"));
        assert_eq!(p(r#"["a", "b"]"#)?.len(), 2);
        assert!(matches!(p("[1, 2, 3]")?.as_slice(), [Input::Ids(ids)] if ids == &[1, 2, 3]));
        assert!(p("[[1], [2, 3]]").is_ok());
        for bad in ["[]", "[1, \"a\"]", "[-1]", "3", "[[1], []]", "{}"] {
            assert_eq!(
                p(bad).expect_err(bad).param.as_deref(),
                Some("prompt"),
                "{bad}"
            );
        }
        Ok(())
    }

    #[test]
    fn messages_map_developer_to_system_and_refuse_other_roles() {
        let raw = |role: &str| RawMessage {
            role: role.into(),
            content: Some(Value::String("x".into())),
        };
        let m = parse_messages(&[raw("developer"), raw("user")], "messages").expect("roles");
        assert_eq!(m[0].role, "system");
        let e = parse_messages(&[raw("tool")], "messages").expect_err("tool");
        assert_eq!(e.param.as_deref(), Some("messages[0].role"));
    }
}

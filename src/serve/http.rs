//! The HTTP side of `llmlab serve`: the axum [`router`] with its handlers, the API key check,
//! the body limit and the request deadline.
//!
//! | route | what | key |
//! | --- | --- | --- |
//! | `GET /` | the web chat page (one static file compiled in) | no |
//! | `GET /health` | 200 `{"status": "ok", …}` when ready, 503 with an error object while loading | no |
//! | `GET /v1/models`, `GET /v1/models/{id}` | the served model | yes |
//! | `POST /v1/chat/completions` | chat through the model's template; SSE with `stream` | yes |
//! | `POST /v1/completions` | plain completion; `echo` + `logprobs` score a prompt | yes |
//! | `POST /tokenize` | token ids of `prompt`, `content` or `messages` | yes |
//!
//! With a key set (`--api-key`, `LLMLAB_API_KEY`), every route but the page and the health
//! check needs `Authorization: Bearer KEY`, as llama.cpp's server does (the page asks for the
//! key and sends it). The key is compared in constant time (the SHA-256 digests of both, every
//! byte, so neither the length nor the first differing byte shows in the timing).
//!
//! Every error is OpenAI's object ([`ApiError`]), also where axum would answer in plain text:
//! an unknown path (404), a wrong method (405), a body over the limit (413, read and dropped
//! up to a bound so the client sees the answer instead of a reset connection).
//!
//! The engine behind the handlers is a [`Backend`]: the continuous-batching [`Engine`], or a
//! stand-in in tests of the HTTP layer.
use super::api::{
    parse_body, parse_messages, parse_prompts, ApiError, ChatRequest, CompletionRequest, Plan,
    TokenizeRequest,
};
use super::engine::{
    Engine, Event, Finish, Input, Job, Load, ModelInfo, Status, SubmitError, TokenLogprob,
    Tokenized,
};
use axum::body::{Body, Bytes};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use futures_util::stream::{self, SelectAll, Stream, StreamExt};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

/// What the handlers need from the engine ([`Engine`] implements it).
pub trait Backend: Send + Sync + 'static {
    fn status(&self) -> Status;
    fn load(&self) -> Load;
    fn submit(&self, job: Job) -> Result<(), SubmitError>;
    fn tokenize(&self, input: Input) -> Result<oneshot::Receiver<Tokenized>, SubmitError>;
    /// Stops taking requests and cancels the running ones; blocks until the engine is gone.
    fn shutdown(&self);
}

impl Backend for Engine {
    fn status(&self) -> Status {
        Engine::status(self)
    }
    fn load(&self) -> Load {
        Engine::load(self)
    }
    fn submit(&self, job: Job) -> Result<(), SubmitError> {
        Engine::submit(self, job)
    }
    fn tokenize(&self, input: Input) -> Result<oneshot::Receiver<Tokenized>, SubmitError> {
        Engine::tokenize(self, input)
    }
    fn shutdown(&self) {
        Engine::shutdown(self)
    }
}

/// The HTTP settings.
#[derive(Debug, Clone)]
pub struct HttpConfig {
    /// The model id, known before the model has loaded (the `--model` spec).
    pub model: String,
    /// The key `/v1/` routes and `/tokenize` require, if any.
    pub api_key: Option<String>,
    /// Largest request body in bytes (413 beyond).
    pub max_body: usize,
    /// Longest a request may take, streamed or not.
    pub timeout: Duration,
    /// Most new tokens of a chat request that sets neither `max_tokens` nor
    /// `max_completion_tokens` (`None`: up to the context, as OpenAI).
    pub default_max_tokens: Option<usize>,
}

struct AppState {
    backend: Arc<dyn Backend>,
    cfg: HttpConfig,
}

type St = State<Arc<AppState>>;

/// The web chat page (`GET /`).
const PAGE: &str = include_str!("chat.html");

/// The application: every route, the key check and the deadline.
pub fn router(backend: Arc<dyn Backend>, cfg: HttpConfig) -> Router {
    let state = Arc::new(AppState { backend, cfg });
    Router::new()
        .route("/", get(page))
        .route("/health", get(health))
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/completions", post(completions))
        .route("/tokenize", post(tokenize))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(state.clone(), check_key))
        .layer(middleware::from_fn_with_state(state.clone(), deadline))
        .with_state(state)
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut resp = (status, axum::Json(self.body())).into_response();
        let headers = resp.headers_mut();
        match self.status {
            429 => {
                headers.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            401 => {
                headers.insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            _ => {}
        }
        resp
    }
}

fn server_error(message: impl Into<String>) -> ApiError {
    ApiError::new(500, "server_error", "internal_error", message.into())
}

/// Equal keys, in time that depends on neither key's contents nor length.
fn key_matches(given: &str, key: &str) -> bool {
    let (a, b) = (
        Sha256::digest(given.as_bytes()),
        Sha256::digest(key.as_bytes()),
    );
    let diff = a
        .iter()
        .zip(b.iter())
        .fold(0u8, |acc, (x, y)| acc | (x ^ y));
    std::hint::black_box(diff) == 0
}

async fn check_key(State(s): St, req: Request, next: Next) -> Response {
    let open = matches!(req.uri().path(), "/" | "/health");
    if let (Some(key), false) = (&s.cfg.api_key, open) {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let refuse = |message: &str| {
            ApiError::new(
                401,
                "authentication_error",
                "invalid_api_key",
                message.into(),
            )
            .into_response()
        };
        match given {
            None => {
                return refuse(
                    "no API key: send the header `Authorization: Bearer KEY` with the server's key (--api-key or LLMLAB_API_KEY)",
                )
            }
            Some(g) if !key_matches(g, key) => return refuse("the API key is wrong"),
            Some(_) => {}
        }
    }
    next.run(req).await
}

/// The whole request (body, queue, generation) within `--timeout`; a streamed answer keeps
/// its own deadline ([`sse`]).
async fn deadline(State(s): St, req: Request, next: Next) -> Response {
    match tokio::time::timeout(s.cfg.timeout, next.run(req)).await {
        Ok(resp) => resp,
        Err(_) => ApiError::new(
            408,
            "timeout_error",
            "request_timeout",
            format!(
                "the request took longer than the server's --timeout of {} s",
                s.cfg.timeout.as_secs()
            ),
        )
        .into_response(),
    }
}

async fn not_found(req: Request) -> ApiError {
    ApiError::new(
        404,
        "not_found_error",
        "unknown_url",
        format!(
            "no route {} {}; the routes are GET /, GET /health, GET /v1/models, POST /v1/chat/completions, POST /v1/completions, POST /tokenize",
            req.method(),
            req.uri().path()
        ),
    )
}

async fn method_not_allowed(req: Request) -> ApiError {
    ApiError::new(
        405,
        "invalid_request_error",
        "method_not_allowed",
        format!("{} is not allowed on {}", req.method(), req.uri().path()),
    )
}

/// Reads a body of at most `max` bytes. A larger one is read on and dropped (up to a bound) so
/// that the 413 reaches the client instead of a reset connection.
async fn read_body(body: Body, max: usize) -> Result<Bytes, ApiError> {
    let drain_limit = max.saturating_mul(4).max(64 << 20);
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut total = 0usize;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(|e| {
            ApiError::new(
                400,
                "invalid_request_error",
                "invalid_body",
                format!("reading the request body: {e}"),
            )
        })?;
        total += chunk.len();
        if total <= max {
            buf.extend_from_slice(&chunk);
        } else if total > drain_limit {
            break;
        }
    }
    if total > max {
        return Err(ApiError::new(
            413,
            "invalid_request_error",
            "request_too_large",
            format!("the request body has {total} bytes or more; the limit is {max} bytes (--max-body-mib)"),
        ));
    }
    Ok(buf.into())
}

impl AppState {
    /// The served model, or 503 while it loads (or failed to).
    fn ready(&self) -> Result<ModelInfo, ApiError> {
        match self.backend.status() {
            Status::Ready(info) => Ok(info),
            Status::Loading => Err(SubmitError::Loading.into()),
            Status::Failed(e) => Err(SubmitError::Failed(e).into()),
        }
    }

    /// The served model, checking the one a request names.
    fn model_for(&self, asked: Option<&str>) -> Result<ModelInfo, ApiError> {
        let info = self.ready()?;
        match asked {
            Some(m) if m != info.id => Err(ApiError::unknown_model(m, &info.id)),
            _ => Ok(info),
        }
    }

    /// Queues every choice of every input (prompt-major: choice `p * n + i`); choice `i` samples
    /// with `seed + i`. A refusal drops the receivers already made, which cancels those jobs.
    fn submit_all(
        &self,
        inputs: &[Input],
        plan: &Plan,
        logprobs: Option<usize>,
        echo: bool,
    ) -> Result<Vec<mpsc::UnboundedReceiver<Event>>, ApiError> {
        let mut rxs = Vec::with_capacity(inputs.len() * plan.n);
        for input in inputs {
            for i in 0..plan.n {
                let mut sampling = plan.sampling.clone();
                sampling.seed = sampling.seed.map(|s| s.wrapping_add(i as u64));
                let (events, rx) = mpsc::unbounded_channel();
                self.backend.submit(Job {
                    input: input.clone(),
                    sampling,
                    logprobs,
                    echo,
                    events,
                })?;
                rxs.push(rx);
            }
        }
        Ok(rxs)
    }
}

fn engine_gone() -> ApiError {
    ApiError::new(
        503,
        "unavailable_error",
        "shutting_down",
        "the engine stopped before the answer was complete".into(),
    )
}

/// What `Event::Started` says.
struct Started {
    prompt_tokens: usize,
    prompt: Option<Vec<TokenLogprob>>,
}

/// Waits for a job's start; a refused prompt is a 400 naming `param`.
async fn started(
    rx: &mut mpsc::UnboundedReceiver<Event>,
    param: &str,
) -> Result<Started, ApiError> {
    match rx.recv().await {
        Some(Event::Started {
            prompt_tokens,
            prompt,
        }) => Ok(Started {
            prompt_tokens,
            prompt,
        }),
        Some(Event::Rejected(e)) => Err(ApiError::from_job(&e, param)),
        Some(other) => Err(server_error(format!(
            "the engine sent {other:?} before starting the request"
        ))),
        None => Err(engine_gone()),
    }
}

/// Waits for the start of every job (so that a refused prompt is an HTTP error even for a
/// streamed answer).
async fn all_started(
    rxs: &mut [mpsc::UnboundedReceiver<Event>],
    param: &str,
) -> Result<Vec<Started>, ApiError> {
    let starts = futures_util::future::join_all(rxs.iter_mut().map(|rx| started(rx, param))).await;
    starts.into_iter().collect()
}

/// One finished choice.
struct Collected {
    text: String,
    tokens: Vec<TokenLogprob>,
    finish: Finish,
    completion_tokens: usize,
}

async fn collect(rx: &mut mpsc::UnboundedReceiver<Event>) -> Result<Collected, ApiError> {
    let mut c = Collected {
        text: String::new(),
        tokens: Vec::new(),
        finish: Finish::Stop,
        completion_tokens: 0,
    };
    loop {
        match rx.recv().await {
            Some(Event::Token { text, logprob }) => {
                c.text.push_str(&text);
                c.tokens.extend(logprob);
            }
            Some(Event::Done {
                finish,
                completion_tokens,
            }) => {
                c.finish = finish;
                c.completion_tokens = completion_tokens;
                return Ok(c);
            }
            Some(other) => {
                return Err(server_error(format!(
                    "the engine sent {other:?} after starting the request"
                )))
            }
            None => return Err(engine_gone()),
        }
    }
}

async fn collect_all(
    rxs: &mut [mpsc::UnboundedReceiver<Event>],
) -> Result<Vec<Collected>, ApiError> {
    futures_util::future::join_all(rxs.iter_mut().map(collect))
        .await
        .into_iter()
        .collect()
}

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn new_id(prefix: &str) -> String {
    format!("{prefix}-{:024x}", rand::random::<u128>() >> 32)
}

fn usage(prompt_tokens: usize, completion_tokens: usize) -> Value {
    json!({
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    })
}

/// A token in the chat API's `logprobs.content`.
fn chat_logprob(t: &TokenLogprob) -> Value {
    let top: Vec<Value> = t
        .top
        .iter()
        .map(|(_, tok, lp)| json!({"token": tok, "logprob": lp, "bytes": tok.as_bytes()}))
        .collect();
    json!({
        "token": t.token,
        "logprob": t.logprob,
        "bytes": t.token.as_bytes(),
        "top_logprobs": top,
    })
}

/// The legacy completions API's `logprobs` of `tokens`: `tokens`, `token_logprobs` (null for
/// an echoed prompt's first token), `top_logprobs` (a `{token: logprob}` dict per token with
/// the chosen token in it, as OpenAI's: up to `logprobs` + 1 entries; lm-evaluation-harness
/// compares the chosen token's logprob with the dict's best to tell a greedy continuation),
/// `text_offset` (where each token starts in `text`, in characters, from `offset`).
#[derive(Default)]
struct LegacyLogprobs {
    tokens: Vec<Value>,
    token_logprobs: Vec<Value>,
    top_logprobs: Vec<Value>,
    text_offset: Vec<Value>,
    offset: usize,
}

impl LegacyLogprobs {
    fn push(&mut self, t: &TokenLogprob) {
        self.tokens.push(t.token.clone().into());
        self.token_logprobs.push(json!(t.logprob));
        self.top_logprobs.push(match t.logprob {
            None => Value::Null,
            Some(lp) => {
                let mut top = serde_json::Map::new();
                for (_, tok, l) in &t.top {
                    top.entry(tok.clone()).or_insert(json!(l));
                }
                top.entry(t.token.clone()).or_insert(json!(lp));
                Value::Object(top)
            }
        });
        self.text_offset.push(self.offset.into());
        self.offset += t.token.chars().count();
    }

    fn value(&self) -> Value {
        json!({
            "tokens": self.tokens,
            "token_logprobs": self.token_logprobs,
            "top_logprobs": self.top_logprobs,
            "text_offset": self.text_offset,
        })
    }
}

fn json_ok(v: Value) -> Response {
    (StatusCode::OK, axum::Json(v)).into_response()
}

async fn page() -> Response {
    ([(header::CONTENT_TYPE, "text/html; charset=utf-8")], PAGE).into_response()
}

async fn health(State(s): St) -> Response {
    match s.ready() {
        Ok(info) => {
            let load = s.backend.load();
            json_ok(json!({
                "status": "ok",
                "model": info.id,
                "running": load.running,
                "waiting": load.waiting,
                "steps": load.steps,
                "decoded": load.decoded,
            }))
        }
        Err(e) => e.into_response(),
    }
}

fn model_object(info: &ModelInfo) -> Value {
    json!({
        "id": info.id,
        "object": "model",
        "created": info.created,
        "owned_by": "llmlab",
        "max_model_len": info.context_length,
    })
}

async fn models(State(s): St) -> Result<Response, ApiError> {
    let info = s.ready()?;
    Ok(json_ok(
        json!({"object": "list", "data": [model_object(&info)]}),
    ))
}

async fn model(State(s): St, Path(id): Path<String>) -> Result<Response, ApiError> {
    let info = s.model_for(Some(&id))?;
    Ok(json_ok(model_object(&info)))
}

async fn tokenize(State(s): St, body: Body) -> Result<Response, ApiError> {
    let req: TokenizeRequest = parse_body(&read_body(body, s.cfg.max_body).await?)?;
    let info = s.model_for(req.model.as_deref())?;
    let (input, param) = match (&req.messages, &req.prompt, &req.content) {
        (Some(m), None, None) => (Input::Messages(parse_messages(m, "messages")?), "messages"),
        (None, Some(p), None) => (Input::Text(p.clone()), "prompt"),
        (None, None, Some(c)) => (Input::Text(c.clone()), "content"),
        _ => {
            return Err(ApiError::invalid(
                "prompt",
                "give exactly one of prompt, content or messages",
            ))
        }
    };
    let tokens = s
        .backend
        .tokenize(input)?
        .await
        .map_err(|_| engine_gone())?
        .map_err(|e| ApiError::from_job(&e, param))?;
    let mut v = json!({
        "tokens": tokens.iter().map(|(id, _)| *id).collect::<Vec<_>>(),
        "count": tokens.len(),
        "max_model_len": info.context_length,
    });
    if req.return_token_strs.unwrap_or(false) {
        v["token_strs"] = tokens.iter().map(|(_, t)| t.clone()).collect();
    }
    Ok(json_ok(v))
}

async fn chat_completions(State(s): St, body: Body) -> Result<Response, ApiError> {
    let started_at = Instant::now();
    let req: ChatRequest = parse_body(&read_body(body, s.cfg.max_body).await?)?;
    let info = s.model_for(req.model.as_deref())?;
    let mut plan = req.plan()?;
    plan.sampling.max_tokens = plan.sampling.max_tokens.or(s.cfg.default_max_tokens);
    let messages = parse_messages(&req.messages, "messages")?;
    let mut rxs = s.submit_all(&[Input::Messages(messages)], &plan, plan.logprobs, false)?;
    let starts = all_started(&mut rxs, "messages").await?;
    let prompt_tokens = starts.first().map_or(0, |st| st.prompt_tokens);
    let id = new_id("chatcmpl");
    let created = unix_now();
    if plan.stream {
        let render = ChatChunks {
            id,
            created,
            model: info.id,
            include_usage: plan.include_usage,
            logprobs: plan.logprobs.is_some(),
            prompt_tokens,
            completion_tokens: 0,
        };
        let prelude = (0..rxs.len())
            .map(|i| {
                render.chunk(json!([{
                    "index": i,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": null,
                    "finish_reason": null,
                }]))
            })
            .collect();
        return Ok(sse(rxs, prelude, render, started_at + s.cfg.timeout));
    }
    let done = collect_all(&mut rxs).await?;
    let completion_tokens = done.iter().map(|c| c.completion_tokens).sum();
    let choices: Vec<Value> = done
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": plan.logprobs.map(|_| json!({
                    "content": c.tokens.iter().map(chat_logprob).collect::<Vec<_>>(),
                })),
                "finish_reason": c.finish.reason(),
            })
        })
        .collect();
    Ok(json_ok(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": info.id,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    })))
}

async fn completions(State(s): St, body: Body) -> Result<Response, ApiError> {
    let started_at = Instant::now();
    let req: CompletionRequest = parse_body(&read_body(body, s.cfg.max_body).await?)?;
    let info = s.model_for(req.model.as_deref())?;
    let mut plan = req.plan()?;
    let inputs = parse_prompts(&req.prompt)?;
    // `max_tokens: 0` (with `echo`: score the prompt only, as lm-evaluation-harness asks): one
    // token is generated and dropped, whatever the engine does with a budget of 0.
    let score_only = plan.sampling.max_tokens == Some(0);
    if score_only {
        plan.sampling.max_tokens = Some(1);
    }
    // The echoed prompt's tokens (and their text, for token-id prompts) come with logprobs.
    let logprobs = if plan.echo {
        Some(plan.logprobs.unwrap_or(0))
    } else {
        plan.logprobs
    };
    let mut rxs = s.submit_all(&inputs, &plan, logprobs, plan.echo)?;
    let starts = all_started(&mut rxs, "prompt").await?;
    let n = plan.n;
    let prompt_tokens: usize = starts.iter().step_by(n).map(|st| st.prompt_tokens).sum();
    // Each choice's echoed text and prompt logprobs.
    let echoes: Vec<(String, LegacyLogprobs)> = starts
        .iter()
        .enumerate()
        .map(|(j, st)| {
            let mut lp = LegacyLogprobs::default();
            if !plan.echo {
                return (String::new(), lp);
            }
            let tokens = st.prompt.as_deref().unwrap_or_default();
            tokens.iter().for_each(|t| lp.push(t));
            let text = match &inputs[j / n] {
                Input::Text(t) => t.clone(),
                _ => tokens.iter().map(|t| t.token.as_str()).collect(),
            };
            lp.offset = text.chars().count();
            (text, lp)
        })
        .collect();
    let id = new_id("cmpl");
    let created = unix_now();
    if plan.stream {
        let mut render = CompletionChunks {
            id,
            created,
            model: info.id,
            include_usage: plan.include_usage,
            logprobs: plan.logprobs.is_some(),
            score_only,
            offsets: vec![0; rxs.len()],
            prompt_tokens,
            completion_tokens: 0,
        };
        let prelude = echoes
            .into_iter()
            .enumerate()
            .filter(|_| plan.echo)
            .map(|(i, (text, lp))| {
                render.offsets[i] = lp.offset;
                render.chunk(i, &text, render.logprobs.then(|| lp.value()), None)
            })
            .collect();
        return Ok(sse(rxs, prelude, render, started_at + s.cfg.timeout));
    }
    let done = collect_all(&mut rxs).await?;
    let mut completion_tokens = 0;
    let choices: Vec<Value> = done
        .into_iter()
        .zip(echoes)
        .enumerate()
        .map(|(i, (c, (mut text, mut lp)))| {
            if !score_only {
                text.push_str(&c.text);
                c.tokens.iter().for_each(|t| lp.push(t));
                completion_tokens += c.completion_tokens;
            }
            json!({
                "index": i,
                "text": text,
                "logprobs": plan.logprobs.map(|_| lp.value()),
                "finish_reason": if score_only { "length" } else { c.finish.reason() },
            })
        })
        .collect();
    Ok(json_ok(json!({
        "id": id,
        "object": "text_completion",
        "created": created,
        "model": info.id,
        "choices": choices,
        "usage": usage(prompt_tokens, completion_tokens),
    })))
}

/// Turns a streamed request's events into chunks.
trait Chunks: Send + 'static {
    /// The chunks of one event of choice `index`.
    fn event(&mut self, index: usize, event: Event) -> Vec<Value>;
    /// The chunks after every choice has finished (the usage chunk).
    fn finish(&mut self) -> Vec<Value>;
}

/// `chat.completion.chunk`s: a role chunk per choice first, content deltas, a final chunk
/// with the finish reason, and with `stream_options.include_usage` `usage: null` on each chunk
/// and a last chunk with no choices and the usage (OpenAI's stream).
struct ChatChunks {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    logprobs: bool,
    prompt_tokens: usize,
    completion_tokens: usize,
}

impl ChatChunks {
    fn chunk(&self, choices: Value) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": choices,
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }
}

impl Chunks for ChatChunks {
    fn event(&mut self, index: usize, event: Event) -> Vec<Value> {
        match event {
            Event::Token { text, logprob } => {
                let logprobs = logprob
                    .filter(|_| self.logprobs)
                    .map(|t| json!({"content": [chat_logprob(&t)]}));
                if text.is_empty() && logprobs.is_none() {
                    return Vec::new();
                }
                vec![self.chunk(json!([{
                    "index": index,
                    "delta": {"content": text},
                    "logprobs": logprobs,
                    "finish_reason": null,
                }]))]
            }
            Event::Done {
                finish,
                completion_tokens,
            } => {
                self.completion_tokens += completion_tokens;
                vec![self.chunk(json!([{
                    "index": index,
                    "delta": {},
                    "logprobs": null,
                    "finish_reason": finish.reason(),
                }]))]
            }
            _ => Vec::new(),
        }
    }

    fn finish(&mut self) -> Vec<Value> {
        if !self.include_usage {
            return Vec::new();
        }
        let mut last = self.chunk(json!([]));
        last["usage"] = usage(self.prompt_tokens, self.completion_tokens);
        vec![last]
    }
}

/// `text_completion` chunks: the echoed prompt first (with `echo`), text deltas, a final chunk
/// with the finish reason, the usage chunk with `stream_options.include_usage`.
struct CompletionChunks {
    id: String,
    created: u64,
    model: String,
    include_usage: bool,
    logprobs: bool,
    /// `max_tokens: 0`: the one token generated is not sent.
    score_only: bool,
    /// Where each choice's next token starts in its text.
    offsets: Vec<usize>,
    prompt_tokens: usize,
    completion_tokens: usize,
}

impl CompletionChunks {
    fn chunk(
        &self,
        index: usize,
        text: &str,
        logprobs: Option<Value>,
        finish: Option<&str>,
    ) -> Value {
        let mut v = json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [{
                "index": index,
                "text": text,
                "logprobs": logprobs,
                "finish_reason": finish,
            }],
        });
        if self.include_usage {
            v["usage"] = Value::Null;
        }
        v
    }
}

impl Chunks for CompletionChunks {
    fn event(&mut self, index: usize, event: Event) -> Vec<Value> {
        match event {
            Event::Token { .. } if self.score_only => Vec::new(),
            Event::Token { text, logprob } => {
                let logprobs = logprob.filter(|_| self.logprobs).map(|t| {
                    let mut lp = LegacyLogprobs {
                        offset: self.offsets[index],
                        ..Default::default()
                    };
                    lp.push(&t);
                    lp.value()
                });
                self.offsets[index] += text.chars().count();
                if text.is_empty() && logprobs.is_none() {
                    return Vec::new();
                }
                vec![self.chunk(index, &text, logprobs, None)]
            }
            Event::Done {
                finish,
                completion_tokens,
            } => {
                let reason = if self.score_only {
                    "length"
                } else {
                    self.completion_tokens += completion_tokens;
                    finish.reason()
                };
                vec![self.chunk(index, "", None, Some(reason))]
            }
            _ => Vec::new(),
        }
    }

    fn finish(&mut self) -> Vec<Value> {
        if !self.include_usage {
            return Vec::new();
        }
        let mut v = json!({
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "choices": [],
        });
        v["usage"] = usage(self.prompt_tokens, self.completion_tokens);
        vec![v]
    }
}

type EventStream = Pin<Box<dyn Stream<Item = (usize, Event)> + Send>>;

/// The state of a server-sent-events answer.
struct Sse<C> {
    events: SelectAll<EventStream>,
    chunks: C,
    pending: VecDeque<Bytes>,
    running: usize,
    deadline: Instant,
    ended: bool,
}

fn frame(v: &Value) -> Bytes {
    Bytes::from(format!("data: {v}\n\n"))
}

/// A `text/event-stream` answer: `data: {chunk}` frames, then `data: [DONE]`. It ends when
/// every choice is done; past the deadline, or when the engine goes away, with an error object
/// frame first. The client going away drops the stream and with it the receivers, which
/// cancels the jobs.
fn sse<C: Chunks>(
    rxs: Vec<mpsc::UnboundedReceiver<Event>>,
    prelude: Vec<Value>,
    chunks: C,
    deadline: Instant,
) -> Response {
    let running = rxs.len();
    let events = stream::select_all(rxs.into_iter().enumerate().map(|(i, rx)| {
        Box::pin(stream::unfold(rx, move |mut rx| async move {
            rx.recv().await.map(|e| ((i, e), rx))
        })) as EventStream
    }));
    let state = Sse {
        events,
        chunks,
        pending: prelude.iter().map(frame).collect(),
        running,
        deadline,
        ended: false,
    };
    let body = stream::unfold(state, |mut st| async move {
        loop {
            if let Some(b) = st.pending.pop_front() {
                return Some((Ok::<_, Infallible>(b), st));
            }
            if st.ended {
                return None;
            }
            if st.running == 0 {
                let last = st.chunks.finish();
                st.pending.extend(last.iter().map(frame));
                st.pending
                    .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
                st.ended = true;
                continue;
            }
            let error = match tokio::time::timeout_at(st.deadline, st.events.next()).await {
                Ok(Some((i, event))) => {
                    if matches!(event, Event::Done { .. }) {
                        st.running -= 1;
                    }
                    let out = st.chunks.event(i, event);
                    st.pending.extend(out.iter().map(frame));
                    continue;
                }
                Ok(None) => engine_gone(),
                Err(_) => ApiError::new(
                    408,
                    "timeout_error",
                    "request_timeout",
                    "the answer took longer than the server's --timeout".into(),
                ),
            };
            st.pending.push_back(frame(&error.body()));
            st.pending
                .push_back(Bytes::from_static(b"data: [DONE]\n\n"));
            st.ended = true;
        }
    });
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        Body::from_stream(body),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_compare_whole() {
        assert!(key_matches("secret", "secret"));
        assert!(!key_matches("secreT", "secret"));
        assert!(!key_matches("secret-and-more", "secret"));
        assert!(!key_matches("", "secret"));
    }

    #[test]
    fn legacy_logprobs_hold_the_chosen_token_and_offsets() {
        let t = |token: &str, lp: Option<f32>, top: &[(&str, f32)]| TokenLogprob {
            id: 0,
            token: token.into(),
            logprob: lp,
            top: top.iter().map(|(s, l)| (1, s.to_string(), *l)).collect(),
        };
        let mut lp = LegacyLogprobs::default();
        lp.push(&t("Hello", None, &[]));
        lp.push(&t(" wörld", Some(-2.0), &[(" there", -0.5)]));
        let v = lp.value();
        assert_eq!(v["token_logprobs"], json!([null, -2.0]));
        assert_eq!(
            v["top_logprobs"],
            json!([null, {" there": -0.5, " wörld": -2.0}])
        );
        assert_eq!(v["text_offset"], json!([0, 5]));
        assert_eq!(lp.offset, 11);
    }
}

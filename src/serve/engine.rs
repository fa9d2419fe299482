//! The serving engine: one thread owns the model and decodes every running request together,
//! one token per step (continuous batching, as llama.cpp's slots and vLLM do).
//!
//! A request ([`Job`]) waits in a bounded queue; between two decoding steps the engine admits
//! waiting requests into free slots: each prompt runs alone through the model (prefill) into its
//! own row of the shared KV cache, and the request joins the batch at the next step. A request
//! leaves when it stops (end of turn, a stop string, `max_tokens`, the context) or when its
//! client goes away (its event receiver is dropped), freeing its slot for the next one.
//!
//! The engine also owns the text side (chat template, tokenizer): it builds and encodes prompts
//! and sends text deltas, so a stop string is found and held back before a client sees it.
use crate::chat::Message;
use crate::resolve::InferenceDtype;
use tch::Device;
use tokio::sync::{mpsc, oneshot};

/// How the engine runs.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The model spec (anything `llmlab generate --model` loads).
    pub model: String,
    pub dtype: InferenceDtype,
    pub device: Device,
    /// Requests decoded together (KV-cache slots).
    pub max_batch: usize,
    /// Requests waiting for a slot; one more is refused ([`SubmitError::QueueFull`]).
    pub max_queue: usize,
}

/// What a request asks the model to continue.
#[derive(Debug, Clone)]
pub enum Input {
    /// A conversation through the model's chat template (an instruct run answers in the prompt
    /// style it was trained on), ending where the assistant's answer begins.
    Messages(Vec<Message>),
    /// Plain text, encoded as is (with the model's BOS token when it expects one).
    Text(String),
    /// Token ids as they are.
    Ids(Vec<i64>),
}

/// Sampling settings of one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampling {
    /// 0 = greedy.
    pub temperature: f64,
    /// 1 = off.
    pub top_p: f64,
    pub top_k: Option<i64>,
    /// The same seed and settings give the same tokens whatever else runs in the batch.
    pub seed: Option<u64>,
    /// Most new tokens; `None` = up to the context. Always capped by the context (finish
    /// reason `length`).
    pub max_tokens: Option<usize>,
    /// Strings that end the answer (not included in it).
    pub stop: Vec<String>,
    /// Keep going past end-of-sequence and end-of-turn tokens.
    pub ignore_eos: bool,
}

impl Default for Sampling {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: None,
            seed: None,
            max_tokens: None,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// One generation request.
#[derive(Debug)]
pub struct Job {
    pub input: Input,
    pub sampling: Sampling,
    /// Log-probabilities of the chosen tokens, with this many alternatives each (`Some(0)`: the
    /// chosen token's only).
    pub logprobs: Option<usize>,
    /// With `logprobs`: the prompt's tokens and their log-probabilities too (the first token
    /// has none), in [`Event::Started`].
    pub echo: bool,
    /// Where the engine sends this request's events; dropping the receiver cancels the request.
    pub events: mpsc::UnboundedSender<Event>,
}

/// A token and its log-probability under the model (before temperature and top-p).
#[derive(Debug, Clone, PartialEq)]
pub struct TokenLogprob {
    pub id: i64,
    /// The token's text (a token that is part of a UTF-8 character decodes to U+FFFD).
    pub token: String,
    /// `None` for the first token of an echoed prompt.
    pub logprob: Option<f32>,
    /// The most likely tokens at this position, best first: (id, text, logprob).
    pub top: Vec<(i64, String, f32)>,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Finish {
    /// End of turn / end of sequence, or a stop string.
    Stop,
    /// `max_tokens` or the context reached.
    Length,
    /// The server is shutting down.
    Cancelled,
}

impl Finish {
    /// OpenAI's `finish_reason`.
    pub fn reason(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::Cancelled => "abort",
        }
    }
}

/// What the engine tells a request, in this order: `Started` (or `Rejected`), any number of
/// `Token`s, then `Done`.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    Started {
        prompt_tokens: usize,
        /// With `echo` and `logprobs`: the prompt's tokens with their log-probabilities.
        prompt: Option<Vec<TokenLogprob>>,
    },
    /// One new token: the text it adds to the answer (empty while a possible stop string or
    /// an incomplete UTF-8 character is held back; released text may then span several
    /// tokens) and, when asked for, its log-probability.
    Token {
        text: String,
        logprob: Option<TokenLogprob>,
    },
    Done {
        finish: Finish,
        completion_tokens: usize,
    },
    Rejected(JobError),
}

/// Why a request can't run (HTTP 400).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JobError {
    #[error("the prompt has {tokens} tokens, but the model's context is {context} tokens (and at least one new token must fit)")]
    PromptTooLong { tokens: usize, context: usize },
    #[error("the prompt is empty")]
    EmptyPrompt,
    #[error("token id {id} is outside the model's vocabulary of {vocab} tokens")]
    BadTokenId { id: i64, vocab: i64 },
    #[error("{0}")]
    Prompt(String),
}

/// Why a request was not queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// HTTP 429.
    #[error("the server is busy: {running} requests running and {waiting} waiting (--max-batch {max_batch}, --max-queue {max_queue}); retry later")]
    QueueFull {
        running: usize,
        waiting: usize,
        max_batch: usize,
        max_queue: usize,
    },
    /// HTTP 503.
    #[error("the model is still loading")]
    Loading,
    /// HTTP 503.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// HTTP 503 (and the server should exit).
    #[error("the model failed to load: {0}")]
    Failed(String),
}

/// What is being served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModelInfo {
    /// The model id clients name (the `--model` spec as given).
    pub id: String,
    pub context_length: usize,
    /// Unix time the model finished loading.
    pub created: u64,
}

/// The engine's state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Status {
    Loading,
    Ready(ModelInfo),
    Failed(String),
}

/// Load counters (`/health` may show them).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Load {
    pub running: usize,
    pub waiting: usize,
}

/// A handle to the engine thread; cheap to clone and share between HTTP handlers.
#[derive(Clone)]
pub struct Engine {
    inner: std::sync::Arc<Shared>,
}

struct Shared {}

impl Engine {
    /// Starts the engine thread, which loads the model (status [`Status::Loading`] until then).
    pub fn start(cfg: EngineConfig) -> Engine {
        todo!("{cfg:?}")
    }

    pub fn status(&self) -> Status {
        todo!()
    }

    pub fn load(&self) -> Load {
        todo!()
    }

    /// Queues a request; its events arrive on `job.events`.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        todo!("{job:?}")
    }

    /// The token ids and texts of an input, as a request would see them (prompt building
    /// included for messages).
    pub fn tokenize(
        &self,
        input: Input,
    ) -> Result<oneshot::Receiver<Result<Vec<(i64, String)>, JobError>>, SubmitError> {
        todo!("{input:?}")
    }

    /// Stops taking requests, ends the running ones (`Finish::Cancelled` after the current
    /// step) and waits for the engine thread to exit.
    pub fn shutdown(&self) {
        todo!()
    }
}

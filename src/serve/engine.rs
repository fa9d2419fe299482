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
use super::sampler;
use super::text::{Step, StopText};
use crate::chat::Message;
use crate::generate::CausalLm;
use crate::nn::attention::RowPositions;
use crate::request::{build_prompt, Mode};
use crate::resolve::{AnyModel, InferenceDtype, LoadedLm};
use anyhow::Result;
use rand::rngs::StdRng;
use rand::SeedableRng;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc as std_mpsc;
use std::sync::{Arc, Mutex};
use tch::{Device, Kind, Tensor};
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
    /// tokens) and, when asked for, its log-probability. When the answer ends at an
    /// end-of-turn token, a last `Token` without a log-probability may flush held-back text
    /// (count tokens with [`Event::Done`]'s `completion_tokens`, not with these events).
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
    /// Batched decoding steps so far, and the tokens they decoded (their mean batch size is
    /// `decoded / steps`).
    pub steps: u64,
    pub decoded: u64,
}

/// A handle to the engine thread; cheap to clone and share between HTTP handlers.
#[derive(Clone)]
pub struct Engine {
    inner: Arc<Shared>,
}

/// The ids and texts of a prompt's tokens.
pub type Tokenized = Result<Vec<(i64, String)>, JobError>;

enum Msg {
    Job(Job),
    Tokenize(Input, oneshot::Sender<Tokenized>),
}

struct Shared {
    cfg: EngineConfig,
    tx: Mutex<Option<std_mpsc::Sender<Msg>>>,
    status: Mutex<Status>,
    load: Mutex<Load>,
    shutting_down: AtomicBool,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// Locks a mutex whose holder may have panicked (the data stays usable: counters and status).
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Engine {
    /// Starts the engine thread, which loads the model (status [`Status::Loading`] until then).
    pub fn start(cfg: EngineConfig) -> Engine {
        let (spec, device, dtype) = (cfg.model.clone(), cfg.device, cfg.dtype);
        Self::spawn(cfg, move || {
            let mut lm = LoadedLm::load(&spec, device)?;
            lm.set_dtype(dtype)?;
            Ok(lm)
        })
    }

    /// Starts the engine on a model already loaded (its `dtype` as it is; `cfg.model` names it).
    pub fn start_loaded(cfg: EngineConfig, lm: LoadedLm) -> Engine {
        Self::spawn(cfg, move || Ok(lm))
    }

    fn spawn(
        cfg: EngineConfig,
        load: impl FnOnce() -> Result<LoadedLm> + Send + 'static,
    ) -> Engine {
        let (tx, rx) = std_mpsc::channel();
        let inner = Arc::new(Shared {
            cfg,
            tx: Mutex::new(Some(tx)),
            status: Mutex::new(Status::Loading),
            load: Mutex::new(Load::default()),
            shutting_down: AtomicBool::new(false),
            thread: Mutex::new(None),
        });
        let shared = inner.clone();
        let handle = std::thread::Builder::new()
            .name("llmlab-engine".into())
            .spawn(move || run(&shared, rx, load))
            .expect("spawn the engine thread");
        *lock(&inner.thread) = Some(handle);
        Engine { inner }
    }

    pub fn status(&self) -> Status {
        lock(&self.inner.status).clone()
    }

    pub fn load(&self) -> Load {
        *lock(&self.inner.load)
    }

    pub fn config(&self) -> &EngineConfig {
        &self.inner.cfg
    }

    /// Why a request can't be sent now, if it can't.
    fn refuse(&self) -> Option<SubmitError> {
        if self.inner.shutting_down.load(Ordering::SeqCst) {
            return Some(SubmitError::ShuttingDown);
        }
        match self.status() {
            Status::Loading => Some(SubmitError::Loading),
            Status::Failed(e) => Some(SubmitError::Failed(e)),
            Status::Ready(_) => None,
        }
    }

    fn send(&self, msg: Msg) -> Result<(), SubmitError> {
        let sent = lock(&self.inner.tx)
            .as_ref()
            .is_some_and(|tx| tx.send(msg).is_ok());
        sent.then_some(()).ok_or(SubmitError::ShuttingDown)
    }

    /// Queues a request; its events arrive on `job.events`.
    pub fn submit(&self, job: Job) -> Result<(), SubmitError> {
        if let Some(e) = self.refuse() {
            return Err(e);
        }
        {
            let mut load = lock(&self.inner.load);
            let (max_batch, max_queue) = (self.inner.cfg.max_batch, self.inner.cfg.max_queue);
            if load.running + load.waiting >= max_batch + max_queue {
                return Err(SubmitError::QueueFull {
                    running: load.running,
                    waiting: load.waiting,
                    max_batch,
                    max_queue,
                });
            }
            load.waiting += 1;
        }
        self.send(Msg::Job(job)).inspect_err(|_| {
            lock(&self.inner.load).waiting -= 1;
        })
    }

    /// The token ids and texts of an input, as a request would see them (prompt building
    /// included for messages).
    pub fn tokenize(&self, input: Input) -> Result<oneshot::Receiver<Tokenized>, SubmitError> {
        if let Some(e) = self.refuse() {
            return Err(e);
        }
        let (tx, rx) = oneshot::channel();
        self.send(Msg::Tokenize(input, tx))?;
        Ok(rx)
    }

    /// Stops taking requests, ends the running ones (`Finish::Cancelled` after the current
    /// step) and waits for the engine thread to exit.
    pub fn shutdown(&self) {
        self.inner.shutting_down.store(true, Ordering::SeqCst);
        // Closing the channel tells the engine thread; it cancels what runs and exits.
        lock(&self.inner.tx).take();
        let handle = lock(&self.inner.thread).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
    }
}

/// The engine thread: loads the model, then serves until the channel closes.
fn run(shared: &Shared, rx: std_mpsc::Receiver<Msg>, load: impl FnOnce() -> Result<LoadedLm>) {
    let cfg = &shared.cfg;
    let lm = match load() {
        Ok(lm) => lm,
        Err(e) => {
            *lock(&shared.status) = Status::Failed(format!("{e:#}"));
            return;
        }
    };
    let created = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    *lock(&shared.status) = Status::Ready(ModelInfo {
        id: cfg.model.clone(),
        context_length: lm.context_length() as usize,
        created,
    });
    let _g = tch::no_grad_guard();
    match &lm.model {
        AnyModel::Gpt(m) => Worker::new(&lm, m, shared).serve(&rx),
        AnyModel::Llama(m) => Worker::new(&lm, m, shared).serve(&rx),
    }
}

/// A request whose prompt is encoded, waiting for a slot.
struct Ready {
    job: Job,
    prompt: Vec<i64>,
    stop_ids: Vec<i64>,
}

/// A running request: its row of the batch.
struct Seq {
    job: Job,
    /// Positions cached in its row of the KV cache.
    len: i64,
    /// The last chosen token, fed at the next step.
    last: i64,
    answer: Vec<i64>,
    max_new: usize,
    stop_ids: Vec<i64>,
    rng: StdRng,
    text: StopText,
}

struct Worker<'a, M: CausalLm> {
    lm: &'a LoadedLm,
    model: &'a M,
    shared: &'a Shared,
    /// `max_batch` rows; running requests hold rows `0..running.len()` in order.
    cache: M::Cache,
    capacity: i64,
    running: Vec<Seq>,
    waiting: VecDeque<Ready>,
    vocab: usize,
}

impl<'a, M: CausalLm> Worker<'a, M> {
    fn new(lm: &'a LoadedLm, model: &'a M, shared: &'a Shared) -> Self {
        let rows = shared.cfg.max_batch.max(1) as i64;
        let capacity = 256.min(model.context_length());
        Self {
            lm,
            model,
            shared,
            cache: model.new_cache(rows, capacity),
            capacity,
            running: Vec::new(),
            waiting: VecDeque::new(),
            vocab: model.vocab_size() as usize,
        }
    }

    fn serve(&mut self, rx: &std_mpsc::Receiver<Msg>) {
        loop {
            // Idle: wait for work. Busy: take what arrived since the last step.
            if self.running.is_empty() && self.waiting.is_empty() {
                match rx.recv() {
                    Ok(m) => self.take(m),
                    Err(_) => return self.cancel_all(),
                }
            }
            loop {
                match rx.try_recv() {
                    Ok(m) => self.take(m),
                    Err(std_mpsc::TryRecvError::Empty) => break,
                    Err(std_mpsc::TryRecvError::Disconnected) => return self.cancel_all(),
                }
            }
            while self.running.len() < self.shared.cfg.max_batch.max(1) {
                let Some(r) = self.waiting.pop_front() else {
                    break;
                };
                {
                    let mut load = lock(&self.shared.load);
                    load.waiting -= 1;
                    load.running += 1;
                }
                self.admit(r);
            }
            if !self.running.is_empty() {
                self.step();
            }
        }
    }

    fn take(&mut self, m: Msg) {
        match m {
            Msg::Tokenize(input, reply) => {
                let out = self.encode(&input).map(|(ids, _)| {
                    ids.iter()
                        .map(|&i| (i, self.token_text(i)))
                        .collect::<Vec<_>>()
                });
                let _ = reply.send(out);
            }
            Msg::Job(job) => match self.encode(&job.input) {
                Ok((prompt, stop_ids)) => self.waiting.push_back(Ready {
                    job,
                    prompt,
                    stop_ids,
                }),
                Err(e) => {
                    lock(&self.shared.load).waiting -= 1;
                    let _ = job.events.send(Event::Rejected(e));
                }
            },
        }
    }

    /// The prompt's ids and the tokens besides end-of-sequence that end its answer.
    fn encode(&self, input: &Input) -> Result<(Vec<i64>, Vec<i64>), JobError> {
        let (ids, stops) = match input {
            Input::Messages(messages) => {
                let mode = Mode::Conversation {
                    system: None,
                    messages,
                };
                let p =
                    build_prompt(self.lm, &mode).map_err(|e| JobError::Prompt(e.to_string()))?;
                let ids = self
                    .lm
                    .encode_prompt(&p.text)
                    .map_err(|e| JobError::Prompt(format!("{e:#}")))?;
                (ids, p.stop_ids)
            }
            Input::Text(t) => (
                self.lm
                    .encode_prompt(t)
                    .map_err(|e| JobError::Prompt(format!("{e:#}")))?,
                Vec::new(),
            ),
            Input::Ids(ids) => (ids.clone(), Vec::new()),
        };
        if ids.is_empty() {
            return Err(JobError::EmptyPrompt);
        }
        let vocab = self.model.vocab_size();
        if let Some(&id) = ids.iter().find(|&&i| i < 0 || i >= vocab) {
            return Err(JobError::BadTokenId { id, vocab });
        }
        let context = self.model.context_length() as usize;
        if ids.len() >= context {
            return Err(JobError::PromptTooLong {
                tokens: ids.len(),
                context,
            });
        }
        Ok((ids, stops))
    }

    fn token_text(&self, id: i64) -> String {
        self.lm.decode(&[id]).unwrap_or_default()
    }

    /// A token with its log-probability and the `n` most likely alternatives at a position.
    fn logprob(&self, row: &[f32], id: i64, n: usize) -> TokenLogprob {
        let lse = sampler::log_sum_exp(row);
        TokenLogprob {
            id,
            token: self.token_text(id),
            logprob: Some((row[id as usize] as f64 - lse) as f32),
            top: sampler::top_logprobs(row, lse, n)
                .into_iter()
                .map(|(i, l)| (i as i64, self.token_text(i as i64), l))
                .collect(),
        }
    }

    /// The prompt's tokens with their log-probabilities and the `n` best alternatives at each
    /// position, from the prompt's logits `(len, vocab)`: computed on the tensor, so a long
    /// prompt never copies `len × vocab` values to the CPU.
    fn prompt_logprobs(&self, logits: &Tensor, prompt: &[i64], n: usize) -> Vec<TokenLogprob> {
        let mut out = vec![TokenLogprob {
            id: prompt[0],
            token: self.token_text(prompt[0]),
            logprob: None,
            top: Vec::new(),
        }];
        let scored = prompt.len() as i64 - 1;
        if scored == 0 {
            return out;
        }
        // Position i predicts token i + 1.
        let lsm = logits
            .narrow(0, 0, scored)
            .to_kind(Kind::Float)
            .log_softmax(-1, Kind::Float); // (len - 1, vocab)
        let next = Tensor::from_slice(&prompt[1..])
            .to_device(lsm.device())
            .unsqueeze(1);
        let cpu = |t: Tensor| t.to_device(Device::Cpu).contiguous().view([-1]);
        let chosen = Vec::<f32>::try_from(cpu(lsm.gather(1, &next, false))).unwrap_or_default();
        let (top_v, top_i) = if n > 0 {
            let (v, i) = lsm.topk(n as i64, -1, true, true); // (len - 1, n)
            (
                Vec::<f32>::try_from(cpu(v)).unwrap_or_default(),
                Vec::<i64>::try_from(cpu(i)).unwrap_or_default(),
            )
        } else {
            (Vec::new(), Vec::new())
        };
        for (k, &id) in prompt[1..].iter().enumerate() {
            let top = (0..n)
                .filter_map(|j| Some((*top_i.get(k * n + j)?, *top_v.get(k * n + j)?)))
                .map(|(i, l)| (i, self.token_text(i), l))
                .collect();
            out.push(TokenLogprob {
                id,
                token: self.token_text(id),
                logprob: chosen.get(k).copied(),
                top,
            });
        }
        out
    }

    /// Runs a prompt alone into the next free row, then chooses its first token.
    fn admit(&mut self, r: Ready) {
        let Ready {
            job,
            prompt,
            mut stop_ids,
        } = r;
        let len = prompt.len() as i64;
        let ctx = self.model.context_length();
        let dev = self.model.device();
        let idx = Tensor::from_slice(&prompt).view([1, len]).to_device(dev);
        let mut own = self.model.new_cache(1, len);
        let echo = job.echo && job.logprobs.is_some();
        let (last, prompt_lp) = if echo {
            // Every position's logits: the prompt's tokens are scored too.
            let logits = self
                .model
                .forward_logits_cached(&idx, &mut own)
                .select(0, 0); // (len, vocab)
            let lps = self.prompt_logprobs(&logits, &prompt, job.logprobs.unwrap_or(0));
            let last = to_rows(&logits.select(0, len - 1), self.vocab).remove(0);
            (last, Some(lps))
        } else {
            let logits = self.model.forward_last_logits_cached(&idx, &mut own); // (1, vocab)
            (to_rows(&logits, self.vocab).remove(0), None)
        };
        if job
            .events
            .send(Event::Started {
                prompt_tokens: prompt.len(),
                prompt: prompt_lp,
            })
            .is_err()
        {
            return self.release();
        }
        if !job.sampling.ignore_eos {
            stop_ids.extend(self.lm.eos_id);
        } else {
            stop_ids.clear();
        }
        let room = (ctx - len) as usize;
        let max_new = job.sampling.max_tokens.map_or(room, |m| m.min(room));
        let rng = match job.sampling.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_os_rng(),
        };
        let mut seq = Seq {
            text: StopText::new(job.sampling.stop.clone()),
            job,
            len,
            last: 0,
            answer: Vec::new(),
            max_new,
            stop_ids,
            rng,
        };
        if max_new == 0 {
            // `max_tokens: 0` (scoring the echoed prompt only).
            let _ = seq.job.events.send(Event::Done {
                finish: Finish::Length,
                completion_tokens: 0,
            });
            return self.release();
        }
        match self.advance(&mut seq, &last) {
            Some(_) => self.release(),
            None => {
                let row = self.running.len() as i64;
                self.ensure_capacity(len + 1);
                for (dst, src) in M::cache_layers_mut(&mut self.cache)
                    .iter_mut()
                    .zip(M::cache_layers(&own))
                {
                    dst.copy_row(row, src, 0, len);
                }
                self.running.push(seq);
            }
        }
    }

    /// Chooses a request's next token from its logits and tells the client; `Some` when the
    /// request has ended (the client told, or gone).
    fn advance(&self, seq: &mut Seq, logits: &[f32]) -> Option<Finish> {
        let id = sampler::pick(logits, &seq.job.sampling, &mut seq.rng) as i64;
        let done = |seq: &mut Seq, finish: Finish, last: String| {
            if !last.is_empty() {
                let _ = seq.job.events.send(Event::Token {
                    text: last,
                    logprob: None,
                });
            }
            let _ = seq.job.events.send(Event::Done {
                finish,
                completion_tokens: seq.answer.len(),
            });
            Some(finish)
        };
        if seq.stop_ids.contains(&id) {
            let text = self.lm.decode(&seq.answer).unwrap_or_default();
            let rest = seq.text.finish(&text);
            return done(seq, Finish::Stop, rest);
        }
        seq.answer.push(id);
        seq.last = id;
        let logprob = seq.job.logprobs.map(|n| self.logprob(logits, id, n));
        let text = self.lm.decode(&seq.answer).unwrap_or_default();
        let (delta, stopped) = match seq.text.step(&text) {
            Step::More(t) => (t, false),
            Step::Stopped(t) => (t, true),
        };
        let full = seq.answer.len() >= seq.max_new;
        let tail = if full && !stopped {
            seq.text.finish(&text)
        } else {
            String::new()
        };
        if seq
            .job
            .events
            .send(Event::Token {
                text: delta + &tail,
                logprob,
            })
            .is_err()
        {
            return Some(Finish::Cancelled);
        }
        if stopped {
            return done(seq, Finish::Stop, String::new());
        }
        if full {
            return done(seq, Finish::Length, String::new());
        }
        None
    }

    /// One token for every running request, all rows in one forward pass.
    fn step(&mut self) {
        let b = self.running.len() as i64;
        let pos: Vec<i64> = self.running.iter().map(|s| s.len).collect();
        let last: Vec<i64> = self.running.iter().map(|s| s.last).collect();
        let n_keys = pos.iter().max().copied().unwrap_or(0) + 1;
        self.ensure_capacity(n_keys);
        let dev = self.model.device();
        let rows = RowPositions::new(&pos, dev);
        let idx = Tensor::from_slice(&last).view([b, 1]).to_device(dev);
        let logits = self.model.decode_rows(&idx, &mut self.cache, &rows); // (b, vocab)
        {
            let mut load = lock(&self.shared.load);
            load.steps += 1;
            load.decoded += b as u64;
        }
        let logits = to_rows(&logits, self.vocab);
        let mut ended = Vec::new();
        let mut running = std::mem::take(&mut self.running);
        for (i, seq) in running.iter_mut().enumerate() {
            seq.len += 1;
            if seq.job.events.is_closed() || self.advance(seq, &logits[i]).is_some() {
                ended.push(i);
            }
        }
        self.running = running;
        // Highest first: the row moved into a freed place comes from the end, already seen.
        for &i in ended.iter().rev() {
            let last_row = self.running.len() - 1;
            let len = self.running[last_row].len;
            for layer in M::cache_layers_mut(&mut self.cache) {
                layer.move_row(last_row as i64, i as i64, len);
            }
            self.running.swap_remove(i);
            self.release();
        }
    }

    /// Grows every row's room to at least `n` positions (doubling, up to the context).
    fn ensure_capacity(&mut self, n: i64) {
        if n <= self.capacity {
            return;
        }
        let mut cap = self.capacity.max(1);
        while cap < n {
            cap *= 2;
        }
        self.capacity = cap.min(self.model.context_length()).max(n);
        for layer in M::cache_layers_mut(&mut self.cache) {
            layer.grow(self.capacity);
        }
    }

    /// A running request has left.
    fn release(&self) {
        lock(&self.shared.load).running -= 1;
    }

    /// The server is stopping: every request ends now.
    fn cancel_all(&mut self) {
        for seq in self.running.drain(..) {
            let _ = seq.job.events.send(Event::Done {
                finish: Finish::Cancelled,
                completion_tokens: seq.answer.len(),
            });
        }
        for r in self.waiting.drain(..) {
            let _ = r.job.events.send(Event::Started {
                prompt_tokens: r.prompt.len(),
                prompt: None,
            });
            let _ = r.job.events.send(Event::Done {
                finish: Finish::Cancelled,
                completion_tokens: 0,
            });
        }
        let mut load = lock(&self.shared.load);
        (load.running, load.waiting) = (0, 0);
    }
}

/// Rows of a `(b, vocab)` logits tensor as f32 vectors on the CPU.
fn to_rows(logits: &Tensor, vocab: usize) -> Vec<Vec<f32>> {
    let flat = logits
        .to_kind(Kind::Float)
        .to_device(Device::Cpu)
        .contiguous()
        .view([-1]);
    let all = Vec::<f32>::try_from(&flat).unwrap_or_default();
    all.chunks(vocab).map(<[f32]>::to_vec).collect()
}

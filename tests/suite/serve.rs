//! `llmlab serve` (src/serve): the OpenAI-compatible HTTP API.
//!
//! Two kinds of tests:
//! - the HTTP layer over a stand-in engine ([`Fake`]: one token per character, an answer of
//!   letters): error objects, the key, limits, health, streams, the completions `echo` shape
//!   lm-evaluation-harness reads, 429, cancellation and shutdown; fast, no model;
//! - the real server on SmolLM2-135M-Instruct (one shared in-process server, [`served`]), driven
//!   by the official `openai` package (tests/reference/openai_client.py): greedy parity with
//!   `llmlab generate --chat`, streams, usage, stop, seeds, log-probabilities against a forward
//!   pass, bad input, concurrent clients, the queue limit, a dropped stream, `eval judge`
//!   against it, and the `llmlab serve` command itself (ready line, key, SIGTERM → exit 0).
use crate::common;
use anyhow::{bail, ensure, Context, Result};
use llmlab::serve::engine::{
    Engine, EngineConfig, Event, Finish, Input, Job, JobError, Load, ModelInfo, Status,
    SubmitError, TokenLogprob, Tokenized,
};
use llmlab::serve::{Backend, HttpConfig, Server};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

const MODEL: &str = "smollm2-135m-instruct";

// ---------------------------------------------------------------------------------------------
// HTTP helpers

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(300)))
        .http_status_as_error(false)
        .build()
        .into()
}

/// An answer: status, headers (lower-case names), body.
struct Answer {
    status: u16,
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.body).with_context(|| format!("not JSON: {}", self.body))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The error object of an OpenAI error answer, checking its shape and status.
    fn error(&self, status: u16) -> Result<Value> {
        ensure!(
            self.status == status,
            "expected HTTP {status}, got {}: {}",
            self.status,
            self.body
        );
        let v = self.json()?;
        let e = v.get("error").context("no error object")?.clone();
        for key in ["message", "type", "param", "code"] {
            ensure!(e.get(key).is_some(), "error object without {key}: {v}");
        }
        ensure!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
        Ok(e)
    }
}

fn request(method: &str, url: &str, key: Option<&str>, body: Option<&[u8]>) -> Result<Answer> {
    let a = agent();
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut resp = match (method, body) {
        ("GET", _) => {
            let mut r = a.get(url);
            if let Some(h) = &auth {
                r = r.header("Authorization", h);
            }
            r.call()?
        }
        (_, body) => {
            let mut r = match method {
                "POST" => a.post(url),
                "PUT" => a.put(url),
                _ => bail!("method {method}"),
            };
            r = r.header("Content-Type", "application/json");
            if let Some(h) = &auth {
                r = r.header("Authorization", h);
            }
            r.send(body.unwrap_or_default())?
        }
    };
    let headers = resp
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_ascii_lowercase(),
                v.to_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    let status = resp.status().as_u16();
    let body = resp.body_mut().read_to_string()?;
    Ok(Answer {
        status,
        headers,
        body,
    })
}

fn get(url: &str, key: Option<&str>) -> Result<Answer> {
    request("GET", url, key, None)
}

fn post(url: &str, key: Option<&str>, body: &Value) -> Result<Answer> {
    request("POST", url, key, Some(body.to_string().as_bytes()))
}

/// The `data:` payloads of a server-sent-events body, `[DONE]` included.
fn sse_data(body: &str) -> Vec<String> {
    body.split("\n\n")
        .filter_map(|f| f.strip_prefix("data: "))
        .map(str::to_string)
        .collect()
}

/// A request written on a raw connection and left there: the test decides when to read it
/// and when to go away (dropping the stream closes the connection).
fn raw_post(addr: std::net::SocketAddr, path: &str, body: &Value) -> Result<std::net::TcpStream> {
    let mut s = std::net::TcpStream::connect(addr)?;
    let body = body.to_string();
    write!(
        s,
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    Ok(s)
}

/// Reads from `s` until `needle` has arrived (or fails after `within`).
fn read_until(s: &mut std::net::TcpStream, needle: &str, within: Duration) -> Result<String> {
    s.set_read_timeout(Some(within))?;
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let n = s.read(&mut buf).context("reading the answer")?;
        ensure!(
            n > 0,
            "connection closed before {needle:?}: {}",
            String::from_utf8_lossy(&seen)
        );
        seen.extend_from_slice(&buf[..n]);
    }
    Ok(String::from_utf8_lossy(&seen).into_owned())
}

/// Polls `/health` until `pred` holds on its JSON (or fails after `within`).
fn wait_health(url: &str, within: Duration, pred: impl Fn(u16, &Value) -> bool) -> Result<Value> {
    let t0 = Instant::now();
    loop {
        let a = get(&format!("{url}/health"), None)?;
        let v = a.json()?;
        if pred(a.status, &v) {
            return Ok(v);
        }
        ensure!(
            t0.elapsed() < within,
            "/health never got there: {} {v}",
            a.status
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------------------------------------
// A stand-in engine

/// A stand-in engine: each character is a token (id = its code point; a chat prompt is
/// `role: content\n` per message, then `assistant: `); the answer is letters from `a` (shifted
/// by the seed when sampling), one per `delay`; the context is [`FAKE_CONTEXT`] tokens; at most
/// `cap` jobs run at once (no queue).
struct Fake {
    ready: AtomicBool,
    cap: usize,
    delay: Duration,
    running: Arc<AtomicUsize>,
    cancelled: Arc<AtomicUsize>,
    stopping: Arc<AtomicBool>,
}

const FAKE_CONTEXT: usize = 64;

impl Fake {
    fn new(cap: usize, delay: Duration) -> Arc<Fake> {
        Arc::new(Fake {
            ready: AtomicBool::new(true),
            cap,
            delay,
            running: Arc::new(AtomicUsize::new(0)),
            cancelled: Arc::new(AtomicUsize::new(0)),
            stopping: Arc::new(AtomicBool::new(false)),
        })
    }
}

fn fake_tokens(input: &Input) -> Vec<(i64, String)> {
    let text: String = match input {
        Input::Text(t) => t.clone(),
        Input::Messages(m) => {
            m.iter()
                .map(|m| format!("{}: {}\n", m.role, m.content))
                .collect::<String>()
                + "assistant: "
        }
        Input::Ids(ids) => ids
            .iter()
            .map(|&i| char::from_u32(i as u32).unwrap_or('?'))
            .collect(),
    };
    text.chars().map(|c| (c as i64, c.to_string())).collect()
}

fn fake_logprob(id: i64, token: &str, logprob: Option<f32>, top: usize) -> TokenLogprob {
    TokenLogprob {
        id,
        token: token.to_string(),
        logprob,
        top: (0..top)
            .map(|j| (j as i64, format!("<{j}>"), -0.25 * (j as f32 + 1.0)))
            .collect(),
    }
}

impl Backend for Fake {
    fn status(&self) -> Status {
        if self.ready.load(Ordering::SeqCst) {
            Status::Ready(ModelInfo {
                id: "fake".into(),
                context_length: FAKE_CONTEXT,
                created: 1,
            })
        } else {
            Status::Loading
        }
    }

    fn load(&self) -> Load {
        Load {
            running: self.running.load(Ordering::SeqCst),
            ..Default::default()
        }
    }

    fn submit(&self, job: Job) -> Result<(), SubmitError> {
        if self.stopping.load(Ordering::SeqCst) {
            return Err(SubmitError::ShuttingDown);
        }
        if !self.ready.load(Ordering::SeqCst) {
            return Err(SubmitError::Loading);
        }
        let running = self.running.load(Ordering::SeqCst);
        if running >= self.cap {
            return Err(SubmitError::QueueFull {
                running,
                waiting: 0,
                max_batch: self.cap,
                max_queue: 0,
            });
        }
        self.running.fetch_add(1, Ordering::SeqCst);
        let (running, cancelled, stopping, delay) = (
            self.running.clone(),
            self.cancelled.clone(),
            self.stopping.clone(),
            self.delay,
        );
        std::thread::spawn(move || {
            fake_run(&job, &cancelled, &stopping, delay);
            running.fetch_sub(1, Ordering::SeqCst);
        });
        Ok(())
    }

    fn tokenize(&self, input: Input) -> Result<oneshot::Receiver<Tokenized>, SubmitError> {
        let (tx, rx) = oneshot::channel();
        let _ = tx.send(Ok(fake_tokens(&input)));
        Ok(rx)
    }

    fn shutdown(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        let t0 = Instant::now();
        while self.running.load(Ordering::SeqCst) > 0 && t0.elapsed() < Duration::from_secs(10) {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

fn fake_run(job: &Job, cancelled: &AtomicUsize, stopping: &AtomicBool, delay: Duration) {
    let send = |e: Event| job.events.send(e).is_ok();
    let prompt = fake_tokens(&job.input);
    if prompt.len() >= FAKE_CONTEXT {
        send(Event::Rejected(JobError::PromptTooLong {
            tokens: prompt.len(),
            context: FAKE_CONTEXT,
        }));
        return;
    }
    let k = job.logprobs.unwrap_or(0);
    let echoed = (job.echo && job.logprobs.is_some()).then(|| {
        prompt
            .iter()
            .enumerate()
            .map(|(i, (id, t))| fake_logprob(*id, t, (i > 0).then_some(-1.0), k))
            .collect()
    });
    send(Event::Started {
        prompt_tokens: prompt.len(),
        prompt: echoed,
    });
    let max = job
        .sampling
        .max_tokens
        .unwrap_or(10)
        .min(FAKE_CONTEXT - prompt.len());
    let shift = match job.sampling.seed {
        Some(s) if job.sampling.temperature > 0.0 => s as usize,
        _ => 0,
    };
    let (mut text, mut finish, mut n) = (String::new(), Finish::Length, 0);
    for i in 0..max {
        if stopping.load(Ordering::SeqCst) {
            finish = Finish::Cancelled;
            break;
        }
        std::thread::sleep(delay);
        if job.events.is_closed() {
            cancelled.fetch_add(1, Ordering::SeqCst);
            return;
        }
        let c = (b'a' + ((i + shift) % 26) as u8) as char;
        n += 1;
        text.push(c);
        if job.sampling.stop.iter().any(|s| text.ends_with(s.as_str())) {
            finish = Finish::Stop;
            break;
        }
        let logprob = job
            .logprobs
            .map(|k| fake_logprob(c as i64, &c.to_string(), Some(-0.5), k));
        send(Event::Token {
            text: c.to_string(),
            logprob,
        });
    }
    send(Event::Done {
        finish,
        completion_tokens: n,
    });
}

fn fake_server(fake: &Arc<Fake>, key: Option<&str>) -> Result<Server> {
    fake_server_with(fake, key, Duration::from_secs(30), Duration::from_secs(10))
}

fn fake_server_with(
    fake: &Arc<Fake>,
    key: Option<&str>,
    timeout: Duration,
    idle_timeout: Duration,
) -> Result<Server> {
    Server::start(
        "127.0.0.1:0",
        fake.clone(),
        HttpConfig {
            model: "fake".into(),
            api_key: key.map(str::to_string),
            max_body: 1 << 20,
            timeout,
            default_max_tokens: None,
        },
        idle_timeout,
    )
}

fn user(text: &str) -> Value {
    json!([{"role": "user", "content": text}])
}

// ---------------------------------------------------------------------------------------------
// The HTTP layer over the stand-in

/// Every bad request gets OpenAI's error object with the right status (and names the field at
/// fault), and the server keeps serving; the key guards every route but the page and health.
#[test]
fn bad_requests_get_openai_error_objects_and_the_server_keeps_serving() -> Result<()> {
    let fake = Fake::new(4, Duration::ZERO);
    let server = fake_server(&fake, Some("sekrit"))?;
    let url = server.url();
    let chat = format!("{url}/v1/chat/completions");
    let key = Some("sekrit");
    let good = json!({"model": "fake", "messages": user("hi"), "max_tokens": 3});

    let e = post(&chat, None, &good)?;
    assert_eq!(e.error(401)?["code"], "invalid_api_key");
    assert_eq!(e.header("www-authenticate"), Some("Bearer"));
    assert_eq!(
        post(&chat, Some("sekriT"), &good)?.error(401)?["type"],
        "authentication_error"
    );
    assert_eq!(get(&format!("{url}/v1/models"), None)?.status, 401);
    assert_eq!(get(&format!("{url}/health"), None)?.status, 200);
    let page = get(&format!("{url}/"), None)?;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );

    let e = request("POST", &chat, key, Some(b"{\"messages\": [")).map(|a| a.error(400))??;
    assert_eq!(e["code"], "invalid_json");
    let e = post(
        &chat,
        key,
        &json!({"messages": user("hi"), "temperature": "hot"}),
    )?
    .error(400)?;
    assert_eq!(e["param"], "temperature", "{e}");
    let e = post(
        &chat,
        key,
        &json!({"messages": [{"role": "user", "content": 7}]}),
    )?
    .error(400)?;
    assert_eq!(e["param"], "messages[0].content", "{e}");
    let e = post(&chat, key, &json!({"messages": user("hi"), "top_p": 0}))?.error(400)?;
    assert_eq!(e["param"], "top_p", "{e}");
    let e = post(
        &chat,
        key,
        &json!({"messages": user("hi"), "stop": ["a", "b", "c", "d", "e"]}),
    )?
    .error(400)?;
    assert_eq!(e["param"], "stop");
    let e = post(
        &chat,
        key,
        &json!({"model": "gpt-9", "messages": user("hi")}),
    )?
    .error(404)?;
    assert_eq!(
        (e["code"].as_str(), e["param"].as_str()),
        (Some("model_not_found"), Some("model"))
    );
    let long = "x".repeat(100);
    let e = post(&chat, key, &json!({"messages": user(&long)}))?.error(400)?;
    assert_eq!(e["code"], "context_length_exceeded");
    let m = e["message"].as_str().unwrap_or("");
    assert!(
        m.contains("118") && m.contains("64"),
        "names both numbers: {m}"
    );
    let e = get(&format!("{url}/v1/nothing"), key)?.error(404)?;
    assert_eq!(e["code"], "unknown_url");
    let e = get(&chat, key)?.error(405)?;
    assert_eq!(e["code"], "method_not_allowed");
    let big = vec![b' '; 3 << 20];
    let e = request("POST", &chat, key, Some(&big))?.error(413)?;
    assert_eq!(e["code"], "request_too_large");
    let e = post(
        &format!("{url}/v1/completions"),
        key,
        &json!({"prompt": [1, "a"]}),
    )?
    .error(400)?;
    assert_eq!(e["param"], "prompt");

    // Still serving, unknown fields ignored.
    let ok = post(
        &chat,
        key,
        &json!({"model": "fake", "messages": user("hi"), "max_tokens": 3, "frequency_penalty": 1, "whatever": {"x": 1}}),
    )?;
    assert_eq!(ok.status, 200, "{}", ok.body);
    let v = ok.json()?;
    assert_eq!(v["choices"][0]["message"]["content"], "abc");
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 20, "completion_tokens": 3, "total_tokens": 23})
    );
    let t = post(
        &format!("{url}/tokenize"),
        key,
        &json!({"content": "hey", "return_token_strs": true}),
    )?
    .json()?;
    assert_eq!(
        t,
        json!({"tokens": [104, 101, 121], "count": 3, "max_model_len": 64, "token_strs": ["h", "e", "y"]})
    );
    server.stop();
    Ok(())
}

/// `/health` is 503 with an error object while the model loads, and so is the API; 200 once
/// it is ready.
#[test]
fn health_is_503_while_loading_then_ok() -> Result<()> {
    let fake = Fake::new(1, Duration::ZERO);
    fake.ready.store(false, Ordering::SeqCst);
    let server = fake_server(&fake, None)?;
    let url = server.url();
    assert_eq!(
        get(&format!("{url}/health"), None)?.error(503)?["code"],
        "model_loading"
    );
    get(&format!("{url}/v1/models"), None)?.error(503)?;
    post(
        &format!("{url}/v1/chat/completions"),
        None,
        &json!({"messages": user("hi")}),
    )?
    .error(503)?;
    fake.ready.store(true, Ordering::SeqCst);
    let h = get(&format!("{url}/health"), None)?;
    assert_eq!((h.status, h.json()?["status"].clone()), (200, json!("ok")));
    let m = get(&format!("{url}/v1/models"), None)?.json()?;
    assert_eq!(m["data"][0]["id"], "fake");
    assert_eq!(get(&format!("{url}/v1/models/fake"), None)?.status, 200);
    get(&format!("{url}/v1/models/other"), None)?.error(404)?;
    Ok(())
}

/// A streamed chat answer: a role chunk per choice, content deltas that concatenate to the
/// answer, a finish reason per choice, `usage: null` on every chunk and the usage last (with
/// `stream_options.include_usage`), then `[DONE]`; `n = 2` with a seed samples `seed + i`.
#[test]
fn streamed_chunks_concatenate_to_the_answer() -> Result<()> {
    let fake = Fake::new(4, Duration::from_millis(1));
    let server = fake_server(&fake, None)?;
    let chat = format!("{}/v1/chat/completions", server.url());
    let body = json!({"messages": user("hi"), "n": 2, "seed": 3, "temperature": 0.7, "max_tokens": 5, "stop": "g"});
    let whole = post(&chat, None, &body)?.json()?;
    let texts: Vec<&str> = (0..2)
        .filter_map(|i| whole["choices"][i]["message"]["content"].as_str())
        .collect();
    assert_eq!(texts, ["def", "ef"], "seed 3 and 4, stopped before 'g'");
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let a = post(&chat, None, &streamed)?;
    assert_eq!(a.header("content-type"), Some("text/event-stream"));
    let frames = sse_data(&a.body);
    assert_eq!(frames.last().map(String::as_str), Some("[DONE]"));
    let chunks: Vec<Value> = frames[..frames.len() - 1]
        .iter()
        .map(|f| serde_json::from_str(f))
        .collect::<Result<_, _>>()?;
    let mut text = [String::new(), String::new()];
    let mut finish = [None, None];
    for (k, c) in chunks.iter().enumerate() {
        assert_eq!(c["object"], "chat.completion.chunk");
        if k + 1 == chunks.len() {
            assert_eq!(c["choices"], json!([]));
            assert_eq!(c["usage"], whole["usage"]);
            continue;
        }
        assert!(c["usage"].is_null(), "{c}");
        let ch = &c["choices"][0];
        let i = ch["index"].as_u64().context("index")? as usize;
        if k < 2 {
            assert_eq!(ch["delta"], json!({"role": "assistant", "content": ""}));
        }
        text[i].push_str(ch["delta"]["content"].as_str().unwrap_or(""));
        if let Some(f) = ch["finish_reason"].as_str() {
            finish[i] = Some(f.to_string());
        }
    }
    assert_eq!(text, ["def", "ef"]);
    assert_eq!(finish, [Some("stop".to_string()), Some("stop".to_string())]);
    Ok(())
}

/// lm-evaluation-harness's `local-completions` scores a continuation by sending token ids with
/// `echo`, `logprobs: 1` and `max_tokens` 1 (0 in older versions) and summing
/// `token_logprobs[ctxlen:-1]` of each choice (by `index`), greedy when every token's logprob
/// is the best of its `top_logprobs` dict. The shape it reads is there.
#[test]
fn completions_echo_the_prompt_with_logprobs_as_lm_eval_reads_them() -> Result<()> {
    let fake = Fake::new(4, Duration::ZERO);
    let server = fake_server(&fake, None)?;
    let url = format!("{}/v1/completions", server.url());
    let ids: Vec<i64> = "Paris is".chars().map(|c| c as i64).collect();
    let body = json!({"model": "fake", "prompt": [ids, [72, 105]], "echo": true, "max_tokens": 1, "logprobs": 1, "temperature": 0, "seed": 1234});
    let v = post(&url, None, &body)?.json()?;
    let choices = v["choices"].as_array().context("choices")?;
    assert_eq!(choices.len(), 2);
    let lp = &choices[0]["logprobs"];
    assert_eq!(choices[0]["text"], "Paris isa");
    assert_eq!(lp["tokens"].as_array().map(Vec::len), Some(9));
    assert_eq!(lp["token_logprobs"][0], Value::Null);
    assert_eq!(lp["top_logprobs"][0], Value::Null);
    let ctxlen = 5;
    let sum: f64 = lp["token_logprobs"].as_array().context("lps")?[ctxlen..8]
        .iter()
        .filter_map(Value::as_f64)
        .sum();
    assert_eq!(sum, -3.0);
    let top = lp["top_logprobs"][6].as_object().context("a dict")?;
    assert_eq!(top.len(), 2, "the best and the chosen token: {top:?}");
    assert_eq!(top.get("i"), Some(&json!(-1.0)));
    assert_eq!(lp["text_offset"][8], 8);
    assert_eq!(v["usage"]["prompt_tokens"], 10);
    assert_eq!(v["usage"]["completion_tokens"], 2);
    // max_tokens 0: the prompt alone, scored.
    let mut zero = body.clone();
    zero["max_tokens"] = json!(0);
    zero["prompt"] = json!("Hi!");
    let v = post(&url, None, &zero)?.json()?;
    assert_eq!(v["choices"][0]["text"], "Hi!");
    assert_eq!(v["choices"][0]["finish_reason"], "length");
    assert_eq!(
        v["choices"][0]["logprobs"]["tokens"],
        json!(["H", "i", "!"])
    );
    assert_eq!(v["usage"]["completion_tokens"], 0);
    // Streamed: the echo first, then the tokens.
    let mut s = body.clone();
    s["stream"] = json!(true);
    s["prompt"] = json!("Yo");
    s["max_tokens"] = json!(3);
    let frames = sse_data(&post(&url, None, &s)?.body);
    let text: String = frames
        .iter()
        .filter_map(|f| serde_json::from_str::<Value>(f).ok())
        .filter_map(|c| c["choices"][0]["text"].as_str().map(str::to_string))
        .collect();
    assert_eq!(text, "Yoabc");
    Ok(())
}

/// With every slot busy a request is answered 429 at once (with `Retry-After`); a streaming
/// client that goes away cancels its job, which frees its slot.
#[test]
fn a_full_server_answers_429_and_a_dropped_stream_frees_its_slot() -> Result<()> {
    let fake = Fake::new(1, Duration::from_millis(20));
    let server = fake_server(&fake, None)?;
    let url = server.url();
    let long = json!({"prompt": "x", "max_tokens": 60, "stream": true});
    let mut held = raw_post(server.addr, "/v1/completions", &long)?;
    read_until(&mut held, "data: ", Duration::from_secs(10))?;
    let busy = post(
        &format!("{url}/v1/completions"),
        None,
        &json!({"prompt": "y"}),
    )?;
    assert_eq!(busy.error(429)?["code"], "rate_limit_exceeded");
    assert_eq!(busy.header("retry-after"), Some("1"));
    drop(held);
    wait_health(&url, Duration::from_secs(1), |_, v| v["running"] == 0)?;
    assert_eq!(
        fake.cancelled.load(Ordering::SeqCst),
        1,
        "the job saw its client go"
    );
    let ok = post(
        &format!("{url}/v1/completions"),
        None,
        &json!({"prompt": "y", "max_tokens": 2}),
    )?;
    assert_eq!(ok.json()?["choices"][0]["text"], "ab");
    Ok(())
}

/// A request past `--timeout` is a 408 (a stream ends with an error event), and its job is
/// cancelled; a client that goes away before a non-streamed answer cancels its job too; a
/// connection that sends nothing is closed after the idle timeout.
#[test]
fn timeouts_and_clients_that_leave_cancel_their_jobs() -> Result<()> {
    let fake = Fake::new(4, Duration::from_millis(20));
    let server = fake_server_with(
        &fake,
        None,
        Duration::from_millis(400),
        Duration::from_millis(300),
    )?;
    let url = format!("{}/v1/chat/completions", server.url());
    let slow = json!({"messages": user("hi"), "max_tokens": 40});
    let e = post(&url, None, &slow)?.error(408)?;
    assert_eq!(e["type"], "timeout_error");
    let mut streamed = slow.clone();
    streamed["stream"] = json!(true);
    let a = post(&url, None, &streamed)?;
    let frames = sse_data(&a.body);
    assert_eq!(frames.last().map(String::as_str), Some("[DONE]"));
    let last: Value = serde_json::from_str(&frames[frames.len() - 2])?;
    assert_eq!(last["error"]["type"], "timeout_error", "{}", a.body);
    wait_health(&server.url(), Duration::from_secs(2), |_, v| {
        v["running"] == 0
    })?;
    assert_eq!(fake.cancelled.load(Ordering::SeqCst), 2);
    let gone = raw_post(
        server.addr,
        "/v1/chat/completions",
        &json!({"messages": user("hi"), "max_tokens": 15}),
    )?;
    std::thread::sleep(Duration::from_millis(60));
    drop(gone);
    wait_health(&server.url(), Duration::from_secs(2), |_, v| {
        v["running"] == 0
    })?;
    assert_eq!(
        fake.cancelled.load(Ordering::SeqCst),
        3,
        "a non-streamed client left"
    );
    let mut idle = std::net::TcpStream::connect(server.addr)?;
    idle.set_read_timeout(Some(Duration::from_secs(5)))?;
    let t0 = Instant::now();
    let n = idle.read(&mut [0u8; 64]).unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    assert!(t0.elapsed() < Duration::from_secs(2), "{:?}", t0.elapsed());
    Ok(())
}

/// Stopping the server cancels a stream in progress: it ends with `finish_reason: "abort"`
/// and `[DONE]`, and the server's thread exits.
#[test]
fn shutdown_cancels_streams_in_flight() -> Result<()> {
    let fake = Fake::new(2, Duration::from_millis(20));
    let server = fake_server(&fake, None)?;
    let mut s = raw_post(
        server.addr,
        "/v1/chat/completions",
        &json!({"messages": user("hi"), "max_tokens": 40, "stream": true}),
    )?;
    read_until(&mut s, "\"content\":\"a\"", Duration::from_secs(10))?;
    let t0 = Instant::now();
    server.stop();
    assert!(t0.elapsed() < Duration::from_secs(5));
    let rest = read_until(&mut s, "[DONE]", Duration::from_secs(5))?;
    assert!(rest.contains("\"finish_reason\":\"abort\""), "{rest}");
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// The real server

/// Starts the engine on SmolLM2-135M-Instruct (f32, CPU) behind the HTTP layer and waits until
/// it is ready.
fn start_real(max_batch: usize, max_queue: usize) -> Result<Server> {
    let engine = Engine::start(EngineConfig {
        model: MODEL.into(),
        dtype: llmlab::resolve::InferenceDtype::F32,
        device: tch::Device::Cpu,
        max_batch,
        max_queue,
    });
    let server = Server::start(
        "127.0.0.1:0",
        Arc::new(engine),
        HttpConfig {
            model: MODEL.into(),
            api_key: None,
            max_body: 4 << 20,
            timeout: Duration::from_secs(300),
            // The judge's requests name no limit; SmolLM2-135M may go on for a long time.
            default_max_tokens: Some(12),
        },
        Duration::from_secs(60),
    )?;
    wait_health(&server.url(), Duration::from_secs(300), |s, _| s == 200)?;
    Ok(server)
}

/// The shared server of the tests below (max batch 8, queue 8), started once.
fn served() -> Result<&'static Server> {
    static SERVER: OnceLock<Server> = OnceLock::new();
    if let Some(s) = SERVER.get() {
        return Ok(s);
    }
    let s = start_real(8, 8)?;
    Ok(SERVER.get_or_init(|| s))
}

/// Runs `calls` through the `openai` package (tests/reference/openai_client.py).
fn openai(
    server: &Server,
    key: Option<&str>,
    calls: Value,
    concurrent: bool,
) -> Result<Vec<Value>> {
    let spec = json!({
        "base_url": format!("{}/v1", server.url()),
        "api_key": key,
        "calls": calls,
        "concurrent": concurrent,
    });
    let mut child = std::process::Command::new(common::python())
        .arg(common::repo().join("tests/reference/openai_client.py"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running tests/reference/openai_client.py")?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(spec.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "openai_client.py failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn chat_call(prompt: &str, extra: Value) -> Value {
    let mut kwargs = json!({"model": MODEL, "messages": user(prompt)});
    if let (Some(k), Some(e)) = (kwargs.as_object_mut(), extra.as_object()) {
        k.extend(e.clone());
    }
    json!({"op": "chat", "kwargs": kwargs})
}

/// `llmlab generate --chat --temperature 0 --format json` on the same model and prompt.
fn generate_chat(prompt: &str, max_new_tokens: usize) -> Result<Value> {
    let n = max_new_tokens.to_string();
    let (code, out, err) = common::llmlab(&[
        "generate",
        "--model",
        MODEL,
        "--chat",
        "--prompt",
        prompt,
        "--temperature",
        "0",
        "--max-new-tokens",
        &n,
        "--format",
        "json",
        "--device",
        "cpu",
    ])?;
    ensure!(code == 0, "generate failed: {err}");
    Ok(serde_json::from_str(out.trim())?)
}

fn content(v: &Value, i: usize) -> &str {
    v["choices"][i]["message"]["content"]
        .as_str()
        .unwrap_or("<none>")
}

/// A greedy chat completion through the `openai` package answers what `llmlab generate --chat
/// --temperature 0` answers, its usage counts the tokens of that prompt and answer, its
/// streamed chunks concatenate to the same text, and its log-probabilities are those of a
/// forward pass over the prompt and the answer.
#[test]
fn greedy_chat_equals_generate_with_usage_stream_and_logprobs() -> Result<()> {
    let server = served()?;
    let prompt = "Name the capital of France in one word.";
    let max = 24;
    let greedy = json!({"temperature": 0, "max_tokens": max});
    let mut with_lp = greedy.clone();
    with_lp["logprobs"] = json!(true);
    with_lp["top_logprobs"] = json!(3);
    let mut streamed = greedy.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let r = openai(
        server,
        None,
        json!([
            chat_call(prompt, greedy),
            chat_call(prompt, with_lp),
            chat_call(prompt, streamed)
        ]),
        false,
    )?;
    let reference = generate_chat(prompt, max)?;
    let text = reference["text"].as_str().context("text")?;
    assert_eq!(content(&r[0], 0), text, "{}", r[0]);
    let ids: Vec<i64> = serde_json::from_value(reference["ids"].clone())?;
    let prompt_ids: Vec<i64> = serde_json::from_value(reference["prompt_ids"].clone())?;
    let stopped = reference["stopped_at_eos"] == true;
    let usage = &r[0]["usage"];
    assert_eq!(usage["prompt_tokens"], prompt_ids.len(), "{usage}");
    // As `generate` counts: the end-of-turn token that ends the answer is not one of them.
    assert_eq!(usage["completion_tokens"], ids.len(), "{usage}");
    assert_eq!(usage["total_tokens"], prompt_ids.len() + ids.len());
    let finish = if stopped { "stop" } else { "length" };
    assert_eq!(r[0]["choices"][0]["finish_reason"], finish);

    // The stream.
    let chunks = r[2]["chunks"].as_array().context("chunks")?;
    let joined: String = chunks
        .iter()
        .filter_map(|c| c["choices"][0]["delta"]["content"].as_str())
        .collect();
    assert_eq!(joined, text);
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(chunks.last().map(|c| &c["usage"]), Some(usage));

    // Log-probabilities against a forward pass (f32 on the CPU, as the server runs).
    assert_eq!(content(&r[1], 0), text);
    let lps = r[1]["choices"][0]["logprobs"]["content"]
        .as_array()
        .context("logprobs.content")?;
    ensure!(
        lps.len() >= ids.len(),
        "{} logprobs for {} tokens",
        lps.len(),
        ids.len()
    );
    let lm = llmlab::resolve::LoadedLm::load(MODEL, tch::Device::Cpu)?;
    let mut all = prompt_ids.clone();
    all.extend(&ids);
    let logits = lm.forward_logits(&tch::Tensor::from_slice(&all).unsqueeze(0));
    let logp = logits.log_softmax(-1, tch::Kind::Float);
    let mut worst = 0f64;
    for (k, &id) in ids.iter().enumerate() {
        let pos = (prompt_ids.len() + k - 1) as i64;
        let want = logp.double_value(&[0, pos, id]);
        let got = lps[k]["logprob"].as_f64().context("logprob")?;
        worst = worst.max((want - got).abs());
        let top = lps[k]["top_logprobs"].as_array().context("top_logprobs")?;
        assert_eq!(top.len(), 3);
        // Greedy: the chosen token is the best one.
        let best = top[0]["logprob"].as_f64().context("top logprob")?;
        assert!(
            (best - got).abs() < 1e-6,
            "token {k}: chosen {got}, best {best}"
        );
    }
    eprintln!(
        "chat logprobs: max abs diff {worst:.2e} over {} tokens",
        ids.len()
    );
    assert!(worst < 2e-3, "max abs diff {worst}");

    // The echoed prompt's log-probabilities (what lm-evaluation-harness sums).
    let echo = post(
        &format!("{}/v1/completions", server.url()),
        None,
        &json!({"model": MODEL, "prompt": [all.clone()], "echo": true, "max_tokens": 0, "logprobs": 1, "temperature": 0}),
    )?
    .json()?;
    let tl = echo["choices"][0]["logprobs"]["token_logprobs"]
        .as_array()
        .context("token_logprobs")?;
    assert_eq!(tl.len(), all.len());
    assert!(tl[0].is_null());
    let mut worst = 0f64;
    for (pos, &id) in all.iter().enumerate().skip(1) {
        let want = logp.double_value(&[0, pos as i64 - 1, id]);
        worst = worst.max((want - tl[pos].as_f64().context("logprob")?).abs());
    }
    eprintln!(
        "echo logprobs: max abs diff {worst:.2e} over {} tokens",
        all.len() - 1
    );
    assert!(worst < 2e-3, "max abs diff {worst}");
    Ok(())
}

/// `stop` ends the answer before the stop string; `n = 2` with a seed gives the same two
/// answers twice (and two different ones); the completions API continues a plain prompt.
#[test]
fn stop_seed_and_completions_through_the_openai_package() -> Result<()> {
    let server = served()?;
    let prompt = "List three colours, separated by commas.";
    let reference = generate_chat(prompt, 12)?;
    let text = reference["text"].as_str().context("text")?;
    // A stop string from the middle of the greedy answer.
    let cut = text
        .char_indices()
        .nth(text.chars().count() / 2)
        .map_or(0, |(i, _)| i);
    let stop: String = text[cut..].chars().take(2).collect();
    let before = &text[..text.find(stop.as_str()).unwrap_or(text.len())];
    let sampled = json!({"n": 2, "seed": 42, "temperature": 1.0, "max_tokens": 6});
    let r = openai(
        server,
        None,
        json!([
            chat_call(prompt, json!({"temperature": 0, "max_tokens": 12, "stop": [stop]})),
            chat_call(prompt, sampled.clone()),
            chat_call(prompt, sampled),
            {"op": "completion", "kwargs": {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0}},
        ]),
        false,
    )?;
    assert_eq!(content(&r[0], 0), before, "stop {stop:?} in {text:?}");
    assert_eq!(r[0]["choices"][0]["finish_reason"], "stop");
    assert_eq!(r[1]["choices"].as_array().map(Vec::len), Some(2));
    for i in 0..2 {
        assert_eq!(
            content(&r[1], i),
            content(&r[2], i),
            "choice {i} reproduces"
        );
    }
    assert_ne!(content(&r[1], 0), content(&r[1], 1), "seed + i per choice");
    let completion = &r[3]["choices"][0];
    assert!(
        completion["text"].as_str().is_some_and(|t| !t.is_empty()),
        "{completion}"
    );
    assert_eq!(r[3]["usage"]["completion_tokens"], 5);
    Ok(())
}

/// Bad input through the `openai` package and by hand: each gets its status and error object
/// and the server keeps serving.
#[test]
fn bad_input_to_the_real_server() -> Result<()> {
    let server = served()?;
    let url = format!("{}/v1/chat/completions", server.url());
    let long = "word ".repeat(9000);
    let r = openai(
        server,
        None,
        json!([
            chat_call(&long, json!({"max_tokens": 1})),
            {"op": "chat", "kwargs": {"model": "gpt-4o", "messages": user("hi")}},
            chat_call("hi", json!({"temperature": "warm"})),
            chat_call("hi", json!({"max_tokens": 2, "temperature": 0})),
        ]),
        false,
    )?;
    assert_eq!(r[0]["status"], 400, "{}", r[0]);
    assert_eq!(r[0]["error"]["code"], "context_length_exceeded");
    let m = r[0]["error"]["message"].as_str().unwrap_or("");
    assert!(m.contains("8192") && m.contains("tokens"), "{m}");
    assert_eq!(
        (r[1]["status"].clone(), r[1]["error"]["param"].clone()),
        (json!(404), json!("model"))
    );
    assert_eq!(
        (r[2]["status"].clone(), r[2]["error"]["param"].clone()),
        (json!(400), json!("temperature"))
    );
    assert_eq!(r[3]["usage"]["completion_tokens"], 2, "{}", r[3]);
    assert_eq!(
        request("POST", &url, None, Some(b"{oops"))?.error(400)?["code"],
        "invalid_json"
    );
    let big = vec![b'x'; 5 << 20];
    assert_eq!(
        request("POST", &url, None, Some(&big))?.error(413)?["code"],
        "request_too_large"
    );
    let ok = post(
        &url,
        None,
        &json!({"messages": user("hi"), "max_tokens": 1}),
    )?;
    assert_eq!(ok.status, 200, "{}", ok.body);
    Ok(())
}

/// Eight clients at once (continuous batching) get the answers they get alone: greedy and
/// seeded sampling alike.
#[test]
fn eight_concurrent_clients_get_their_answers_alone() -> Result<()> {
    let server = served()?;
    let prompts = [
        "What is 2 + 2?",
        "Name a fruit.",
        "Say hello in French.",
        "What colour is the sky?",
        "Name a planet.",
        "What is the opposite of hot?",
        "Count to three.",
        "Name an animal that barks.",
    ];
    let calls: Vec<Value> = prompts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let sampling = if i % 2 == 0 {
                json!({"temperature": 0, "max_tokens": 3 + i % 3})
            } else {
                json!({"temperature": 0.9, "seed": i, "max_tokens": 3 + i % 3})
            };
            chat_call(p, sampling)
        })
        .collect();
    let t0 = Instant::now();
    let alone = openai(server, None, json!(calls), false)?;
    let t_alone = t0.elapsed();
    let t0 = Instant::now();
    let together = openai(server, None, json!(calls), true)?;
    eprintln!(
        "8 requests one by one: {t_alone:.1?}; at once: {:.1?}",
        t0.elapsed()
    );
    for (i, (a, b)) in alone.iter().zip(&together).enumerate() {
        assert_eq!(content(a, 0), content(b, 0), "client {i}: {a} vs {b}");
        assert_eq!(a["usage"], b["usage"]);
    }
    Ok(())
}

/// With the one slot and the one queue place taken a request gets 429 (the real engine's
/// queue); clients that go away (one streaming, one waiting) free both, and a request is
/// served again.
#[test]
fn the_queue_limit_gives_429_and_dropped_clients_free_their_slots() -> Result<()> {
    let server = start_real(1, 1)?;
    let url = server.url();
    let long = json!({"model": MODEL, "messages": user("Tell me a long story."), "max_tokens": 4000, "ignore_eos": true, "stream": true});
    let mut running = raw_post(server.addr, "/v1/chat/completions", &long)?;
    read_until(&mut running, "\"content\"", Duration::from_secs(120))?;
    let waiting = raw_post(server.addr, "/v1/chat/completions", &long)?;
    wait_health(&url, Duration::from_secs(30), |_, v| v["waiting"] == 1)?;
    let r = openai(
        &server,
        None,
        json!([chat_call("hi", json!({"max_tokens": 1}))]),
        false,
    )?;
    assert_eq!(r[0]["status"], 429, "{}", r[0]);
    assert_eq!(r[0]["error"]["code"], "rate_limit_exceeded");
    drop(running);
    drop(waiting);
    let v = wait_health(&url, Duration::from_secs(60), |_, v| {
        v["running"] == 0 && v["waiting"] == 0
    })?;
    eprintln!("after the clients left: {v}");
    let r = openai(
        &server,
        None,
        json!([chat_call("hi", json!({"max_tokens": 2, "temperature": 0}))]),
        false,
    )?;
    assert_eq!(r[0]["usage"]["completion_tokens"], 2, "{}", r[0]);
    Ok(())
}

/// `llmlab eval judge --api openai` against `llmlab serve`: llmlab judging llmlab, end to end
/// (the judge URL as OpenAI clients write it, ending in /v1).
#[test]
fn eval_judge_runs_against_llmlab_serve() -> Result<()> {
    let server = served()?;
    let dir = tempfile::tempdir()?;
    let responses = dir.path().join("responses.json");
    std::fs::write(
        &responses,
        json!([
            {"instruction": "Name the capital of France.", "input": "", "output": "Paris.", "model_response": "Paris."},
            {"instruction": "What is 2 + 2?", "input": "", "output": "4", "model_response": "5"},
        ])
        .to_string(),
    )?;
    let (code, out, err) = common::llmlab(&[
        "eval",
        "judge",
        "--responses",
        responses.to_str().context("UTF-8 path")?,
        "--api",
        "openai",
        "--judge-url",
        &format!("{}/v1", server.url()),
        "--judge-model",
        MODEL,
        "--format",
        "json",
    ])?;
    assert_eq!(code, 0, "{err}");
    let summary: Value = serde_json::from_str(out.trim())?;
    assert_eq!(summary["total"], 2, "{summary}");
    let judged: Value = serde_json::from_str(&std::fs::read_to_string(
        dir.path().join("responses.judged.json"),
    )?)?;
    let entries = judged["entries"].as_array().context("entries")?;
    assert_eq!(entries.len(), 2, "{judged}");
    for e in entries {
        assert!(
            e["judge_reply"].as_str().is_some_and(|r| !r.is_empty()),
            "{e}"
        );
    }
    assert_eq!(judged["judge"]["url"], server.url());
    Ok(())
}

/// `llmlab serve`: listens at once (health 503 or 200), prints the ready line, wants the key
/// (from `LLMLAB_API_KEY`) on the API but not on /health, and exits 0 on SIGTERM.
#[test]
fn the_serve_command_serves_and_exits_0_on_sigterm() -> Result<()> {
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_llmlab"))
        .args([
            "serve",
            "--model",
            MODEL,
            "--port",
            "0",
            "--device",
            "cpu",
            "--max-batch",
            "2",
        ])
        .env("LLMLAB_API_KEY", "k3y")
        .env("LLMLAB_DATA_MIRROR", common::mirror())
        .stderr(std::process::Stdio::piped())
        .spawn()?;
    let stderr = child.stderr.take().context("stderr")?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut log = Vec::new();
    let mut next_line = |what: &str| -> Result<String> {
        let line = rx
            .recv_timeout(Duration::from_secs(180))
            .with_context(|| format!("no {what} line; stderr so far: {log:?}"))?;
        log.push(line.clone());
        Ok(line)
    };
    let result = (|| -> Result<()> {
        let listening = next_line("listening")?;
        let url = listening
            .split_whitespace()
            .find(|w| w.starts_with("http://"))
            .map(|w| w.trim_end_matches([';', ',']).to_string())
            .with_context(|| format!("no URL in {listening:?}"))?;
        let h = get(&format!("{url}/health"), None)?;
        assert!(h.status == 503 || h.status == 200, "{}", h.body);
        let ready = next_line("ready")?;
        assert!(ready.contains("ready") && ready.contains(MODEL), "{ready}");
        assert_eq!(get(&format!("{url}/health"), None)?.status, 200);
        get(&format!("{url}/v1/models"), None)?.error(401)?;
        let m = get(&format!("{url}/v1/models"), Some("k3y"))?.json()?;
        assert_eq!(m["data"][0]["id"], MODEL);
        let page = get(&format!("{url}/"), None)?;
        assert!(page.body.contains("<title>"), "{}", page.body);
        let status = std::process::Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()?;
        ensure!(status.success(), "kill -TERM failed");
        Ok(())
    })();
    if result.is_err() {
        let _ = child.kill();
    }
    let t0 = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait()? {
            break s;
        }
        if t0.elapsed() > Duration::from_secs(30) {
            let _ = child.kill();
            bail!("llmlab serve did not exit within 30 s of SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    result?;
    assert_eq!(status.code(), Some(0));
    Ok(())
}

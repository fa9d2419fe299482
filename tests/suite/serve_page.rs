//! The chat page of `llmlab serve` (`src/serve/chat.html`, served at `GET /`) in a real browser:
//! headless Chromium (Debian's `chromium` and `chromium-driver`, installed by
//! `scripts/test_services.sh`), driven over WebDriver by `tests/reference/browser_chat.py`,
//! which types a message, presses Enter and records how the reply grows until the page marks it
//! done.
//!
//! The page's features are tested against `tests/reference/mock_openai_server.py`, a stand-in
//! whose slow, predictable replies tell what the page sent (history, system message, API key);
//! the last test chats with `llmlab serve` and a real model.
use crate::common::{mirror, python, repo};
use anyhow::{bail, Context, Result};
use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A child process killed when dropped (also when the test fails).
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn page() -> std::path::PathBuf {
    repo().join("src/serve/chat.html")
}

/// Starts the mock server (`extra`: its options); returns it and its URL.
fn mock(extra: &[&str]) -> Result<(Killed, String)> {
    let mut child = Command::new(python())
        .arg(repo().join("tests/reference/mock_openai_server.py"))
        .arg("--page")
        .arg(page())
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .context("starting the mock server")?;
    let stdout = child.stdout.take().context("the mock's stdout")?;
    let child = Killed(child);
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line)?;
    let url = line
        .trim()
        .strip_prefix("listening on ")
        .with_context(|| format!("the mock server did not start: {line:?}"))?
        .to_string();
    Ok((child, url))
}

/// Runs the browser driver on `url` with `args`; returns its JSON, or fails with its stderr.
fn browser_chat(url: &str, args: &[&str]) -> Result<Value> {
    for tool in ["/usr/bin/chromium", "/usr/bin/chromedriver"] {
        if !std::path::Path::new(tool).exists() {
            bail!("{tool} is missing: run scripts/test_services.sh as root (make test does)");
        }
    }
    let t = Instant::now();
    let out = Command::new(python())
        .arg(repo().join("tests/reference/browser_chat.py"))
        .arg(url)
        .args(args)
        .output()
        .context("running browser_chat.py")?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    eprintln!(
        "browser_chat.py {args:?}: {:.1} s",
        t.elapsed().as_secs_f64()
    );
    if !out.status.success() {
        bail!("browser_chat.py {args:?} failed: {stderr}");
    }
    serde_json::from_slice(&out.stdout).with_context(|| format!("browser_chat.py: {stderr}"))
}

/// The reply streamed: at least two growing, non-empty texts before it was done.
fn assert_streamed(turn: &Value) -> Result<()> {
    let lens: Vec<u64> = turn["snapshots"]
        .as_array()
        .context("snapshots")?
        .iter()
        .filter_map(Value::as_u64)
        .collect();
    assert!(lens.len() >= 2, "not streamed: {turn}");
    assert!(lens.windows(2).all(|w| w[0] < w[1]), "not growing: {turn}");
    Ok(())
}

/// The stats after a reply show its decoding speed.
fn tokens_per_second(turn: &Value) -> Result<f64> {
    let stats = turn["stats"].as_str().context("stats")?;
    assert!(stats.contains("tokens/s"), "{turn}");
    let rate: f64 = turn["tokens_per_second"]
        .as_str()
        .context("tokens_per_second")?
        .parse()?;
    assert!(rate > 0.0, "{turn}");
    Ok(rate)
}

/// The page is one file that loads nothing from elsewhere.
#[test]
fn page_is_self_contained() -> Result<()> {
    let html = std::fs::read_to_string(page())?;
    for external in [
        "http:",
        "https:",
        "//cdn",
        "<script src",
        "<link rel=\"stylesheet\"",
    ] {
        assert!(!html.contains(external), "the page refers to {external}");
    }
    assert!(
        !html.contains("innerHTML"),
        "model output is set as text only"
    );
    for id in [
        "input", "send", "stop", "messages", "system", "stats", "new-chat", "api-key",
    ] {
        assert!(html.contains(&format!("id=\"{id}\"")), "#{id}");
    }
    Ok(())
}

/// Two turns: the replies stream in word by word (each server event split across two of the
/// browser's reads), the second request carries the first exchange and the system message, the
/// stats show the speed, and a reply with markup stays text.
#[test]
fn page_streams_replies_with_history_and_system_message() -> Result<()> {
    let (_server, url) = mock(&["--delay", "0.04"])?;
    let v = browser_chat(
        &url,
        &[
            "Hello there",
            "<img src=x onerror=alert(1)> and <b>bold</b>",
            "--system",
            "Answer in French",
            "--temperature",
            "0",
        ],
    )?;
    let turns = v["turns"].as_array().context("turns")?;
    assert_eq!(
        turns[0]["reply"],
        "You said: Hello there. System: Answer in French. Turn 1."
    );
    assert_eq!(
        turns[1]["reply"],
        "You said: <img src=x onerror=alert(1)> and <b>bold</b>. System: Answer in French. Turn 2."
    );
    for turn in turns {
        assert_streamed(turn)?;
        tokens_per_second(turn)?;
        assert_eq!(turn["finish"], "stop", "{turn}");
        assert_eq!(
            turn["html_elements"], 0,
            "markup in a reply became elements: {turn}"
        );
        assert_eq!(turn["focused"], "input", "{turn}");
    }
    // The second prompt: system + 2 user messages + the first reply (the mock counts words).
    let stats = turns[1]["stats"].as_str().context("stats")?;
    assert!(stats.contains("prompt 20 tokens"), "{stats}");
    assert_eq!(v["model"], "model: mock-model");
    assert_eq!(v["console_errors"], serde_json::json!([]), "{v}");
    Ok(())
}

/// A server that wants an API key: without the right one the page shows the server's 401
/// message and gives the message back to send again; with it, the page chats.
#[test]
fn page_sends_the_api_key_and_shows_server_errors() -> Result<()> {
    let (_server, url) = mock(&["--api-key", "k-123", "--delay", "0.02"])?;
    let v = browser_chat(&url, &["Hi", "--type-api-key", "wrong", "--expect-error"])?;
    let error = v["error"].as_str().context("error")?;
    assert!(error.contains("401"), "{v}");
    assert!(error.contains("invalid or missing API key"), "{v}");
    assert_eq!(v["input"], "Hi", "{v}");
    let v = browser_chat(&url, &["Hi", "--api-key", "k-123"])?;
    assert_eq!(v["reply"], "You said: Hi. Turn 1.");
    assert_streamed(&v)?;
    // The kept key was sent from the first request on (no 401 while loading).
    assert_eq!(v["console_errors"], serde_json::json!([]), "{v}");
    Ok(())
}

/// Stop ends the stream: the reply keeps what arrived before.
#[test]
fn page_stop_button_cancels_the_reply() -> Result<()> {
    let (_server, url) = mock(&["--delay", "0.3"])?;
    let v = browser_chat(&url, &["one two three four five", "--stop-after", "10"])?;
    assert_eq!(v["finish"], "stopped", "{v}");
    let reply = v["reply"].as_str().context("reply")?;
    assert!(
        "You said: one two three four five. Turn 1.".starts_with(reply) && reply.len() < 30,
        "{v}"
    );
    Ok(())
}

/// `llmlab serve --model smollm2-135m-instruct` on a free port with an API key, once `/health`
/// answers 200; returns the process and its URL.
fn llmlab_serve(key: &str) -> Result<(Killed, String)> {
    let t = Instant::now();
    let mut child = Command::new(env!("CARGO_BIN_EXE_llmlab"))
        .args(["serve", "--model", "smollm2-135m-instruct", "--port", "0"])
        .args(["--api-key", key, "--device", "cpu"])
        .env("LLMLAB_DATA_MIRROR", mirror())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting llmlab serve")?;
    let stderr = child.stderr.take().context("the server's stderr")?;
    let child = Killed(child);
    // Its first line names the address; the rest is passed on to the test's output.
    let mut lines = BufReader::new(stderr).lines();
    let first = lines.next().context("llmlab serve said nothing")??;
    eprintln!("{first}");
    std::thread::spawn(move || lines.map_while(Result::ok).for_each(|l| eprintln!("{l}")));
    let url = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .with_context(|| format!("no URL in {first:?}"))?
        .trim_end_matches([';', ',']);
    let url = url.to_string();
    loop {
        match ureq::get(format!("{url}/health")).call() {
            Ok(r) if r.status() == 200 => break,
            _ if t.elapsed() > Duration::from_secs(300) => bail!("{url}/health is not 200"),
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
    eprintln!("llmlab serve ready in {:.1} s", t.elapsed().as_secs_f64());
    Ok((child, url))
}

/// The page served by `llmlab serve` with SmolLM2-135M-Instruct: a greedy (temperature 0)
/// reply streams into the page and is the reply the same request gets unstreamed.
#[test]
fn page_chats_with_llmlab_serve() -> Result<()> {
    let key = "page-test-key";
    let (_server, url) = llmlab_serve(key)?;
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(300)))
        .http_status_as_error(false)
        .build()
        .into();
    let page = agent.get(&url).call()?.body_mut().read_to_string()?;
    assert_eq!(
        page,
        std::fs::read_to_string(self::page())?,
        "GET / is the page"
    );

    let question = "What is the capital of France?";
    let v = browser_chat(
        &format!("{url}/"),
        &[
            question,
            "--api-key",
            key,
            "--temperature",
            "0",
            "--max-tokens",
            "40",
        ],
    )?;
    assert_streamed(&v)?;
    let rate = tokens_per_second(&v)?;
    let reply = v["reply"].as_str().context("reply")?;
    assert!(!reply.trim().is_empty(), "{v}");
    assert_eq!(v["console_errors"], serde_json::json!([]), "{v}");
    assert_eq!(v["model"], "model: smollm2-135m-instruct", "{v}");

    let body = serde_json::json!({
        "model": "smollm2-135m-instruct",
        "messages": [{"role": "user", "content": question}],
        "temperature": 0,
        "max_tokens": 40,
    });
    let mut resp = agent
        .post(format!("{url}/v1/chat/completions"))
        .header("Content-Type", "application/json")
        .header("Authorization", &format!("Bearer {key}"))
        .send(body.to_string())?;
    let text = resp.body_mut().read_to_string()?;
    let unstreamed: Value = serde_json::from_str(&text).with_context(|| text.clone())?;
    assert_eq!(
        reply, unstreamed["choices"][0]["message"]["content"],
        "the page's streamed reply vs unstreamed: {text}"
    );
    eprintln!(
        "reply {reply:?}: {} growing states, {rate:.1} tokens/s in the page; stats {}",
        v["snapshots"].as_array().map_or(0, Vec::len),
        v["stats"]
    );
    Ok(())
}

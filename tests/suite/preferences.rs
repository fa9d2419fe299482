//! Preference data for DPO (`llmlab data make-preferences`, book ch07/04
//! `create-preference-data-ollama.ipynb`) against a stub teacher server: the prompts and the
//! chosen/rejected fields equal the notebook's code run on the same entries, choices and replies;
//! the choices are seeded; both APIs; an interrupted run resumes to the uninterrupted file
//! without asking anything twice; other settings are refused; clear errors.
use crate::common;

use anyhow::Result;
use llmlab::instruct::make_preferences::{
    make_preferences, politeness_choices, Politeness, PreferenceSpec,
};
use llmlab::remote::{Api, ChatConfig, Role};
use std::net::TcpListener;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

const OUTPUT_AT: &str = " and correct output `";
const MORE_AT: &str = "`, slightly rewrite the output to be more ";

/// The stub teacher's reply to a prompt: the entry's output and the politeness asked for, so a
/// reply depends on its request only (the same in every run) and names its entry.
fn rewrite(prompt: &str) -> String {
    let start = prompt.find(OUTPUT_AT).map(|i| i + OUTPUT_AT.len());
    let end = prompt.rfind(MORE_AT);
    match (start, end) {
        (Some(s), Some(e)) if s <= e => {
            let word = prompt[e + MORE_AT.len()..].split('.').next().unwrap_or("");
            format!("{} [{word}]", &prompt[s..e])
        }
        _ => "unexpected prompt".into(),
    }
}

fn is_chat_api(path: &str) -> bool {
    path == "/v1/chat/completions" || path == "/api/chat"
}

/// A stub teacher speaking the OpenAI and Ollama chat APIs (GET answers 200): each POST gets
/// [`rewrite`] of its user message, until `fail_after` POSTs have been answered; later ones get
/// a 500.
fn stub_teacher(fail_after: Option<usize>) -> Result<common::HttpStub> {
    let answered = Arc::new(AtomicUsize::new(0));
    common::HttpStub::serve(move |req| {
        if req.method == "GET" {
            return common::Response::json(200, "{\"data\": [], \"models\": []}");
        }
        if !is_chat_api(&req.path) {
            return common::Response::json(404, "{\"error\": \"not found\"}");
        }
        if fail_after.is_some_and(|k| answered.load(Ordering::SeqCst) >= k) {
            return common::Response::json(500, "{\"error\": \"overloaded\"}");
        }
        answered.fetch_add(1, Ordering::SeqCst);
        let body: serde_json::Value =
            serde_json::from_slice(&req.body).unwrap_or(serde_json::Value::Null);
        let prompt = body["messages"][0]["content"].as_str().unwrap_or("");
        let message = serde_json::json!({"role": "assistant", "content": rewrite(prompt)});
        let payload = if req.path == "/api/chat" {
            serde_json::json!({"model": "m", "message": message, "done": true})
        } else {
            serde_json::json!({"choices": [{"message": message}]})
        };
        common::Response::json(200, payload.to_string())
    })
}

/// The bodies of the POSTs to the chat APIs the stub received, in order.
fn posts(stub: &common::HttpStub) -> Result<Vec<(String, serde_json::Value)>> {
    stub.requests()
        .into_iter()
        .filter(|r| r.method == "POST" && is_chat_api(&r.path))
        .map(|r| Ok((r.path.clone(), serde_json::from_slice(&r.body)?)))
        .collect()
}

fn prompts(stub: &common::HttpStub) -> Result<Vec<String>> {
    Ok(posts(stub)?
        .iter()
        .map(|(_, b)| {
            b["messages"][0]["content"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect())
}

/// The first `n` entries of the book's `instruction-data.json` (from the data mirror) in `path`.
fn book_entries(path: &Path, n: usize) -> Result<Vec<serde_json::Value>> {
    let file = common::mirror().join("instruction-data/instruction-data.json");
    let all: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(file)?)?;
    let some: Vec<serde_json::Value> = all.into_iter().take(n).collect();
    std::fs::write(path, serde_json::to_string_pretty(&some)?)?;
    Ok(some)
}

fn teacher(url: &str, api: Api) -> ChatConfig {
    let mut cfg = ChatConfig::new(Role::Teacher, url, "teacher", api);
    cfg.backoff = Duration::from_millis(10);
    cfg.timeout = Duration::from_secs(10);
    cfg
}

fn spec(input: &Path, out: &Path, seed: u64) -> PreferenceSpec {
    PreferenceSpec {
        input: input.to_path_buf(),
        out: out.to_path_buf(),
        seed,
        limit: None,
    }
}

/// A polite rewrite (the stub's `OUTPUT [polite]`) is chosen over the output; the output is
/// chosen over an impolite one.
fn assert_preference(e: &serde_json::Value, choice: Politeness, i: usize) {
    let output = e["output"].as_str().expect("an output");
    let rewritten = format!("{output} [{}]", choice.name());
    let expected = match choice {
        Politeness::Polite => (rewritten.as_str(), output),
        Politeness::Impolite => (output, rewritten.as_str()),
    };
    assert_eq!(
        (e["chosen"].as_str(), e["rejected"].as_str()),
        (Some(expected.0), Some(expected.1)),
        "entry {i} ({})",
        choice.name()
    );
}

fn read_json(path: &Path) -> Result<serde_json::Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
}

fn path_str(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

/// Each request carries the notebook's prompt for its entry, byte for byte (the notebook's
/// `format_input` and f-string run by Python on the same entries and choices,
/// `tests/reference/book_preference_data.py`), with temperature 0 and the seed; the file is the
/// notebook's `json_data` after `generate_model_responses` given the same replies; the
/// polite/impolite choices are the seed's.
#[test]
fn prompts_and_preferences_equal_the_notebooks() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("instruction-data.json");
    let entries = book_entries(&input, 8)?;
    assert!(
        entries.iter().any(|e| e["input"] == "") && entries.iter().any(|e| e["input"] != ""),
        "entries with and without input"
    );
    let seed = 5;
    let choices = politeness_choices(seed, entries.len());
    assert!(
        choices.contains(&Politeness::Polite) && choices.contains(&Politeness::Impolite),
        "{choices:?}"
    );
    let stub = stub_teacher(None)?;
    let out = dir.path().join("prefs.json");
    let mut heard = Vec::new();
    let s = make_preferences(
        &spec(&input, &out, seed),
        teacher(stub.url(), Api::Openai),
        &mut |i, n, c| heard.push((i, n, c)),
    )?;
    assert_eq!((s.entries, s.made, s.resumed), (8, 8, 0));
    let polite = choices.iter().filter(|c| **c == Politeness::Polite).count();
    assert_eq!((s.polite, s.impolite, s.unchanged), (polite, 8 - polite, 0));
    let expected: Vec<_> = (0..8).map(|i| (i + 1, 8, choices[i])).collect();
    assert_eq!(heard, expected);

    let sent = posts(&stub)?;
    assert_eq!(sent.len(), 8);
    for (path, body) in &sent {
        assert_eq!(path, "/v1/chat/completions");
        assert_eq!(body["model"], "teacher");
        assert_eq!(body["temperature"], 0);
        assert_eq!(body["seed"], 123);
        assert_eq!(body["messages"].as_array().map(Vec::len), Some(1));
        assert_eq!(body["messages"][0]["role"], "user");
    }
    let asked = prompts(&stub)?;
    let replies: Vec<String> = asked.iter().map(|p| rewrite(p)).collect();

    let names: Vec<&str> = choices.iter().map(|c| c.name()).collect();
    let choices_file = dir.path().join("choices.json");
    std::fs::write(&choices_file, serde_json::to_string(&names)?)?;
    let replies_file = dir.path().join("replies.json");
    std::fs::write(&replies_file, serde_json::to_string(&replies)?)?;
    let book: serde_json::Value = serde_json::from_str(
        &common::Reference::script("book_preference_data.py")
            .input(&input)
            .input(&choices_file)
            .input(&replies_file)
            .run()?,
    )?;
    let book_prompts: Vec<String> = serde_json::from_value(book["prompts"].clone())?;
    for (i, (ours, theirs)) in asked.iter().zip(&book_prompts).enumerate() {
        assert_eq!(ours, theirs, "the prompt of entry {i}");
    }
    assert_eq!(asked.len(), book_prompts.len());
    // The first entry's prompt, spelled out (the notebook's missing spaces and "return return").
    assert_eq!(
        asked[0],
        format!(
            "Given the input `Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nEvaluate the following phrase by transforming it into the spelling given.\n\n### Input:\nfreind --> friend` and correct output `The spelling of the given phrase \"freind\" is incorrect, the correct spelling is \"friend\".`, slightly rewrite the output to be more {}.Keep the modification minimal.Only return return the generated response and nothing else.",
            choices[0].name()
        )
    );

    let ours = read_json(&out)?;
    assert_eq!(ours, book["data"], "the notebook's json_data");
    for (i, e) in ours.as_array().expect("an array").iter().enumerate() {
        assert_preference(e, choices[i], i);
    }
    // The book's layout: its keys in its order, four-space indent.
    let text = std::fs::read_to_string(&out)?;
    assert!(
        text.starts_with("[\n    {\n        \"instruction\": \"Evaluate the following phrase"),
        "{}",
        &text[..80]
    );

    // Another seed, other choices (and the same one again, the same).
    assert_ne!(politeness_choices(6, 8), choices);
    assert_eq!(politeness_choices(5, 8), choices);
    Ok(())
}

/// The Ollama API through the command line: `POST /api/chat` with `stream: false` and the
/// notebook's options (the seed, temperature 0, no `num_ctx`), a registered data set with
/// `--limit`, and the JSON summary.
#[test]
fn ollama_teacher_through_the_command_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let out = dir.path().join("prefs.json");
    let stub = stub_teacher(None)?;
    let (code, stdout, err) = common::llmlab(&[
        "data",
        "make-preferences",
        "--dataset",
        "instruction-data",
        "--limit",
        "3",
        "--teacher-url",
        stub.url(),
        "--teacher-model",
        "llama3.1:70b",
        "--api",
        "ollama",
        "--out",
        path_str(&out),
        "--seed",
        "3",
        "--format",
        "json",
    ])?;
    assert_eq!(code, 0, "{err}");
    let summary: serde_json::Value = serde_json::from_str(stdout.trim())?;
    assert_eq!(summary["entries"], 3);
    assert_eq!(summary["made"], 3);
    let sent = posts(&stub)?;
    assert_eq!(sent.len(), 3);
    for (path, body) in &sent {
        assert_eq!(path, "/api/chat");
        assert_eq!(body["model"], "llama3.1:70b");
        assert_eq!(body["stream"], false);
        assert_eq!(
            body["options"],
            serde_json::json!({"seed": 3, "temperature": 0})
        );
    }
    let choices = politeness_choices(3, 3);
    assert!(
        choices.contains(&Politeness::Polite) && choices.contains(&Politeness::Impolite),
        "{choices:?}"
    );
    let made = read_json(&out)?;
    let made = made.as_array().expect("an array");
    assert_eq!(made.len(), 3);
    for (i, e) in made.iter().enumerate() {
        assert_preference(e, choices[i], i);
    }
    let record = read_json(&dir.path().join("prefs.progress.json"))?;
    assert_eq!(record["seed"], 3);
    assert_eq!(record["teacher_model"], "llama3.1:70b");
    assert_eq!(record["input_entries"], 1100);
    Ok(())
}

/// A run whose teacher fails after 3 answers keeps those entries; the same command then asks
/// only for the rest and ends with the file of an uninterrupted run, byte for byte; once
/// complete, a further run asks nothing; a larger --limit continues the file.
#[test]
fn an_interrupted_run_resumes_to_the_uninterrupted_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("instruction-data.json");
    book_entries(&input, 7)?;

    let whole = dir.path().join("whole.json");
    let stub = stub_teacher(None)?;
    make_preferences(
        &spec(&input, &whole, 11),
        teacher(stub.url(), Api::Openai),
        &mut |_, _, _| {},
    )?;

    let out = dir.path().join("resumed.json");
    let failing = stub_teacher(Some(3))?;
    let mut cfg = teacher(failing.url(), Api::Openai);
    cfg.retries = 1;
    let err = make_preferences(&spec(&input, &out, 11), cfg, &mut |_, _, _| {})
        .expect_err("the teacher fails after 3 answers");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("entry 4 (index 3)")
            && msg.contains("run the same command again")
            && msg.contains("HTTP 500"),
        "{msg}"
    );
    assert_eq!(read_json(&out)?.as_array().map(Vec::len), Some(3));
    assert_eq!(
        posts(&failing)?.len(),
        3 + 2,
        "3 answers, then a 500 and one retry"
    );

    let again = stub_teacher(None)?;
    let s = make_preferences(
        &spec(&input, &out, 11),
        teacher(again.url(), Api::Openai),
        &mut |_, _, _| {},
    )?;
    assert_eq!((s.entries, s.made, s.resumed), (7, 4, 3));
    let asked = prompts(&again)?;
    let all = prompts(&stub)?;
    assert_eq!(
        asked,
        all[3..].to_vec(),
        "only the entries not made yet are asked"
    );
    assert_eq!(std::fs::read(&out)?, std::fs::read(&whole)?);

    let s = make_preferences(
        &spec(&input, &out, 11),
        teacher(again.url(), Api::Openai),
        &mut |_, _, _| {},
    )?;
    assert_eq!((s.entries, s.made, s.resumed), (7, 0, 7));
    assert_eq!(prompts(&again)?.len(), 4, "a complete file asks nothing");

    // --limit: the first entries, then a larger limit continues after them.
    let limited = dir.path().join("limited.json");
    let mut sp = spec(&input, &limited, 11);
    sp.limit = Some(2);
    let s = make_preferences(&sp, teacher(again.url(), Api::Openai), &mut |_, _, _| {})?;
    assert_eq!((s.entries, s.made), (2, 2));
    sp.limit = None;
    let s = make_preferences(&sp, teacher(again.url(), Api::Openai), &mut |_, _, _| {})?;
    assert_eq!((s.entries, s.made, s.resumed), (7, 5, 2));
    assert_eq!(std::fs::read(&limited)?, std::fs::read(&whole)?);
    Ok(())
}

/// A run with another seed, teacher model or input is refused, naming the settings file and
/// the key, before anything is asked; so is an output file without its settings file.
#[test]
fn other_settings_are_refused() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("instruction-data.json");
    let entries = book_entries(&input, 4)?;
    let out = dir.path().join("prefs.json");
    let stub = stub_teacher(None)?;
    let mut sp = spec(&input, &out, 1);
    sp.limit = Some(2);
    make_preferences(&sp, teacher(stub.url(), Api::Openai), &mut |_, _, _| {})?;
    let before = std::fs::read(&out)?;
    let progress = dir.path().join("prefs.progress.json");
    let refused = |sp: &PreferenceSpec, cfg: ChatConfig, key: &str| -> Result<()> {
        let err = make_preferences(sp, cfg, &mut |_, _, _| {}).expect_err("refused");
        let msg = format!("{err:#}");
        assert!(
            msg.contains(&progress.display().to_string()) && msg.contains(key),
            "{msg}"
        );
        let code = err
            .chain()
            .find_map(|e| e.downcast_ref::<llmlab::LlmError>())
            .map(llmlab::LlmError::exit_code);
        assert_eq!(code, Some(2), "{msg}");
        Ok(())
    };
    refused(
        &spec(&input, &out, 2),
        teacher(stub.url(), Api::Openai),
        "seed is 1, this run's is 2",
    )?;
    let mut other = teacher(stub.url(), Api::Openai);
    other.model = "other".into();
    refused(&sp, other, "teacher_model is teacher, this run's is other")?;
    let mut changed = entries.clone();
    changed[3]["output"] = "Something else.".into();
    let input2 = dir.path().join("other-data.json");
    std::fs::write(&input2, serde_json::to_string_pretty(&changed)?)?;
    refused(
        &spec(&input2, &out, 1),
        teacher(stub.url(), Api::Openai),
        "input_sha256",
    )?;
    assert_eq!(
        prompts(&stub)?.len(),
        2,
        "nothing asked by the refused runs"
    );
    assert_eq!(std::fs::read(&out)?, before, "the file is untouched");

    // Through the command line: exit code 2 and the message.
    let (code, _, err) = common::llmlab(&[
        "data",
        "make-preferences",
        "--input",
        path_str(&input),
        "--teacher-url",
        stub.url(),
        "--teacher-model",
        "teacher",
        "--out",
        path_str(&out),
        "--seed",
        "3",
    ])?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("seed is 1, this run's is 3"), "{err}");

    std::fs::remove_file(&progress)?;
    let err = make_preferences(&sp, teacher(stub.url(), Api::Openai), &mut |_, _, _| {})
        .expect_err("no settings file");
    assert!(
        format!("{err:#}").contains("prefs.progress.json does not"),
        "{err:#}"
    );
    Ok(())
}

/// An unreachable teacher is a clear error (exit 2) before any file is written; an entry
/// without `output` is named by its number and index; `--help` describes the command.
#[test]
fn unreachable_teacher_and_bad_entries_are_clear_errors() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let input = dir.path().join("instruction-data.json");
    book_entries(&input, 2)?;
    let out = dir.path().join("prefs.json");
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let url = format!("http://127.0.0.1:{port}");
    let (code, _, err) = common::llmlab(&[
        "data",
        "make-preferences",
        "--input",
        path_str(&input),
        "--teacher-url",
        &url,
        "--teacher-model",
        "m",
        "--api",
        "ollama",
        "--out",
        path_str(&out),
    ])?;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains(&format!("the teacher server at {url} does not answer"))
            && err.contains("--teacher-url"),
        "{err}"
    );
    assert!(!out.exists());

    let bad = dir.path().join("bad.json");
    std::fs::write(
        &bad,
        r#"[{"instruction": "Say hi.", "input": "", "output": "Hi"},
            {"instruction": "Add 1 and 2.", "input": ""}]"#,
    )?;
    let stub = stub_teacher(None)?;
    let err = make_preferences(
        &spec(&bad, &out, 1),
        teacher(stub.url(), Api::Openai),
        &mut |_, _, _| {},
    )
    .expect_err("entry 2 has no output");
    let msg = format!("{err:#}");
    assert!(
        msg.contains("bad.json") && msg.contains("entry 2 (index 1): no 'output' field"),
        "{msg}"
    );
    assert!(prompts(&stub)?.is_empty());

    let (code, _, err) = common::llmlab(&[
        "data",
        "make-preferences",
        "--input",
        "instruction-data",
        "--teacher-url",
        &url,
        "--teacher-model",
        "m",
        "--out",
        path_str(&out),
    ])?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("give --dataset instruction-data"), "{err}");

    let (code, help, _) = common::llmlab(&["data", "make-preferences", "--help"])?;
    assert_eq!(code, 0);
    for s in [
        "create-preference-data-ollama",
        "--teacher-url",
        "--dataset",
        "--limit",
        "progress.json",
    ] {
        assert!(help.contains(s), "--help lacks {s}:\n{help}");
    }
    Ok(())
}

//! Instruction fine-tuning (book ch07): the collate function on the book's worked example,
//! prompt formatting byte for byte, the judge client against stub OpenAI and Ollama servers,
//! short runs on a small GPT through `llmlab run` and the library (lower validation loss,
//! Ctrl-C and resume, the finished run loaded by `generate` and `chat`).
use crate::common;

use anyhow::Result;
use llmlab::eval::judge::{judge_config, judge_file, Api, Judge};
use llmlab::instruct::collate::{collate, collate_packed, pack, CollateOptions, Encoded};
use llmlab::instruct::data::{Entry, InstructDataSpec};
use llmlab::instruct::prompt::{PromptStyle, Prompter};
use std::net::TcpListener;
use std::time::Duration;
use tch::{Device, Tensor};

fn book_batch() -> Vec<Encoded> {
    vec![
        Encoded::new(vec![0, 1, 2, 3, 4], 0),
        Encoded::new(vec![5, 6], 0),
        Encoded::new(vec![7, 8, 9], 0),
    ]
}

fn tensor(rows: &[&[i64]]) -> Tensor {
    Tensor::from_slice2(rows)
}

/// §7.3: `custom_collate_fn(batch)` on inputs [0..4], [5, 6], [7, 8, 9] gives exactly the
/// book's input and target tensors; `allowed_max_length` truncates them; exercise 7.2's masking
/// hides the prompt's targets.
#[test]
fn collate_matches_the_books_worked_example() {
    let items = book_batch();
    let refs: Vec<&Encoded> = items.iter().collect();
    let (x, y) = collate(&refs, &CollateOptions::default()).tensors(Device::Cpu);
    let x_book = tensor(&[
        &[0, 1, 2, 3, 4],
        &[5, 6, 50256, 50256, 50256],
        &[7, 8, 9, 50256, 50256],
    ]);
    let y_book = tensor(&[
        &[1, 2, 3, 4, 50256],
        &[6, 50256, -100, -100, -100],
        &[8, 9, 50256, -100, -100],
    ]);
    assert!(x.equal(&x_book), "{x}");
    assert!(y.equal(&y_book), "{y}");

    let opts = CollateOptions {
        allowed_max_length: Some(3),
        ..CollateOptions::default()
    };
    let (x, y) = collate(&refs, &opts).tensors(Device::Cpu);
    assert!(x.equal(&x_book.narrow(1, 0, 3)), "{x}");
    assert!(y.equal(&y_book.narrow(1, 0, 3)), "{y}");
    // A limit above the batch length changes nothing.
    let opts = CollateOptions {
        allowed_max_length: Some(1024),
        ..CollateOptions::default()
    };
    let (x, y) = collate(&refs, &opts).tensors(Device::Cpu);
    assert!(x.equal(&x_book) && y.equal(&y_book));

    // Masking: prompts of 3, 1 and 2 tokens → targets[:prompt_len - 1] = -100.
    let masked = [
        Encoded::new(vec![0, 1, 2, 3, 4], 3),
        Encoded::new(vec![5, 6], 1),
        Encoded::new(vec![7, 8, 9], 2),
    ];
    let opts = CollateOptions {
        mask_instruction: true,
        ..CollateOptions::default()
    };
    let (x, y) = collate(&masked.iter().collect::<Vec<_>>(), &opts).tensors(Device::Cpu);
    assert!(x.equal(&x_book));
    let y_masked = tensor(&[
        &[-100, -100, 3, 4, 50256],
        &[6, 50256, -100, -100, -100],
        &[-100, 9, 50256, -100, -100],
    ]);
    assert!(y.equal(&y_masked), "{y}");
    // Masking, then truncation.
    let opts = CollateOptions {
        mask_instruction: true,
        allowed_max_length: Some(2),
        ..CollateOptions::default()
    };
    let (_, y) = collate(&masked.iter().collect::<Vec<_>>(), &opts).tensors(Device::Cpu);
    assert!(y.equal(&y_masked.narrow(1, 0, 2)), "{y}");
}

/// Packing puts whole examples (each ended by the pad token) in rows of at most
/// `max_length` inputs; targets are shifted inputs, prompts masked on request.
#[test]
fn packing_fills_rows_with_whole_examples() {
    let items = book_batch();
    let refs: Vec<&Encoded> = items.iter().collect();
    let opts = CollateOptions::default();
    let rows = pack(&refs, 8, &opts);
    // [0 1 2 3 4 P] + [5 6 P] = 9 tokens = 8 inputs; [7 8 9 P] starts a new row.
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0].0, vec![0, 1, 2, 3, 4, 50256, 5, 6, 50256]);
    let b = collate_packed(&rows.iter().collect::<Vec<_>>(), &opts);
    let (x, y) = b.tensors(Device::Cpu);
    assert!(x.equal(&tensor(&[
        &[0, 1, 2, 3, 4, 50256, 5, 6],
        &[7, 8, 9, 50256, 50256, 50256, 50256, 50256],
    ])));
    assert!(y.equal(&tensor(&[
        &[1, 2, 3, 4, 50256, 5, 6, 50256],
        &[8, 9, 50256, -100, -100, -100, -100, -100],
    ])));
}

fn book_entries() -> Result<Vec<Entry>> {
    std::env::set_var("LLMLAB_DATA_MIRROR", common::mirror());
    InstructDataSpec::default().read()
}

/// §7.2: the book's data set (1,100 entries) splits 935 / 55 / 110 (train, validation, test;
/// test taken before validation), and `format_input` of entries 50 and 999 equals the book's
/// printed prompts byte for byte; the Phi-3 style equals exercise 7.1's `format_input_phi`.
#[test]
fn book_data_split_and_prompts() -> Result<()> {
    let data = book_entries()?;
    assert_eq!(data.len(), 1100);
    let s = InstructDataSpec::default().split(&data, 123);
    assert_eq!((s.train.len(), s.val.len(), s.test.len()), (935, 55, 110));
    assert_eq!(s.train[0], data[0]);
    assert_eq!(s.test[0], data[935]);
    assert_eq!(s.val[0], data[1045]);

    let alpaca = Prompter::new(PromptStyle::Alpaca, None, "test")?;
    assert_eq!(
        alpaca.full_text(&data[50]),
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nIdentify the correct spelling of the following word.\n\n### Input:\nOcassion\n\n### Response:\nThe correct spelling is 'Occasion.'"
    );
    assert_eq!(
        alpaca.full_text(&data[999]),
        "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nWhat is an antonym of 'complicated'?\n\n### Response:\nAn antonym of 'complicated' is 'simple'."
    );
    let phi = Prompter::new(PromptStyle::Phi3, None, "test")?;
    assert_eq!(
        phi.full_text(&data[50]),
        "<|user|>\nIdentify the correct spelling of the following word.\nOcassion\n<|assistant|>:\nThe correct spelling is 'Occasion.'"
    );
    assert_eq!(
        phi.full_text(&data[999]),
        "<|user|>\nWhat is an antonym of 'complicated'?\n<|assistant|>:\nAn antonym of 'complicated' is 'simple'."
    );
    let chat = Prompter::new(
        PromptStyle::Chat,
        Some(llmlab::chat::ChatTemplate::ChatMl {
            default_system: None,
        }),
        "test",
    )?;
    assert_eq!(
        chat.full_text(&data[50]),
        "<|im_start|>user\nIdentify the correct spelling of the following word.\n\nOcassion<|im_end|>\n<|im_start|>assistant\nThe correct spelling is 'Occasion.'<|im_end|>"
    );
    assert!(Prompter::new(PromptStyle::Chat, None, "gpt2").is_err());
    // The book's response extraction.
    assert_eq!(
        alpaca.extract_response("\n\n### Response:\nThe spelling is 'Occasion'. "),
        "The spelling is 'Occasion'."
    );
    Ok(())
}

/// A JSONL file with other field names reads through the configured keys.
#[test]
fn jsonl_with_custom_fields() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let f = dir.path().join("d.jsonl");
    std::fs::write(
        &f,
        "{\"q\": \"Add 2 and 3.\", \"a\": \"5\"}\n{\"q\": \"Name a colour.\", \"ctx\": \"sky\", \"a\": \"Blue\"}\n",
    )?;
    let spec = InstructDataSpec {
        path: Some(f.clone()),
        instruction_field: "q".into(),
        input_field: "ctx".into(),
        output_field: "a".into(),
        ..InstructDataSpec::default()
    };
    let e = spec.read()?;
    assert_eq!(e[0], {
        let mut x = Entry::new("Add 2 and 3.", "", "5");
        x.raw = e[0].raw.clone();
        x
    });
    assert_eq!((e[1].input.as_str(), e[1].output.as_str()), ("sky", "Blue"));
    let wrong = InstructDataSpec {
        path: Some(f),
        ..InstructDataSpec::default()
    };
    let err = format!("{:#}", wrong.read().expect_err("no 'instruction' field"));
    assert!(err.contains("instruction_field"), "{err}");
    Ok(())
}

/// A stub judge server ([`common::HttpStub`]) that speaks the OpenAI chat API (`POST
/// /v1/chat/completions`) and Ollama's (`POST /api/chat`): GET answers 200, each POST the next
/// scripted `(status, content)` in its API's shape (status 0: answer only after 1.5 s, later than
/// the client's timeout); any other path gets a 404.
fn stub_server(script: Vec<(u16, &'static str)>) -> Result<common::HttpStub> {
    let mut script = script.into_iter();
    common::HttpStub::serve(move |req| {
        if req.method == "GET" {
            return common::Response::json(200, "{\"data\": [], \"models\": []}");
        }
        if !is_judge_api(&req.path) {
            return common::Response::json(404, "{\"error\": \"not found\"}");
        }
        let (status, content) = script.next().unwrap_or((200, "50"));
        let message = serde_json::json!({"role": "assistant", "content": content});
        let payload = match status {
            0 | 200 if req.path == "/api/chat" => {
                serde_json::json!({"model": "m", "message": message, "done": true}).to_string()
            }
            0 | 200 => serde_json::json!({"choices": [{"message": message}]}).to_string(),
            _ => "{\"error\": \"overloaded\"}".to_string(),
        };
        let response = common::Response::json(status.max(200), payload);
        if status == 0 {
            response.after(Duration::from_millis(1500))
        } else {
            response
        }
    })
}

fn is_judge_api(path: &str) -> bool {
    path == "/v1/chat/completions" || path == "/api/chat"
}

/// The path and body of each POST to the judge APIs the stub received.
fn judge_posts(stub: &common::HttpStub) -> Vec<(String, String)> {
    stub.requests()
        .into_iter()
        .filter(|r| r.method != "GET" && is_judge_api(&r.path))
        .map(|r| (r.path.clone(), r.body_text()))
        .collect()
}

/// The judge scores each response through the OpenAI chat API: a 5xx is retried, an answer
/// without an integer in 0..=100 is counted as unparsable, every answer is kept in
/// `<responses>.judged.json`, and the request carries the book's prompt, temperature 0 and
/// the seed.
#[test]
fn judge_scores_through_a_stub_openai_server() -> Result<()> {
    let stub = stub_server(vec![
        (500, ""),
        (200, "85"),
        (200, "I cannot score this."),
        (200, "Score: 42 out of 100"),
    ])?;
    let url = stub.url();
    let dir = tempfile::tempdir()?;
    let responses = dir.path().join("responses.json");
    let mk = |i: &str, inp: &str, o: &str, r: &str| serde_json::json!({"instruction": i, "input": inp, "output": o, "model_response": r});
    std::fs::write(
        &responses,
        serde_json::to_string(&vec![
            mk(
                "Identify the correct spelling of the following word.",
                "Ocassion",
                "The correct spelling is 'Occasion.'",
                "The spelling is 'Occasion'.",
            ),
            mk("What is 2+2?", "", "4", "5"),
            mk("Name a colour.", "", "Blue", "Blue"),
        ])?,
    )?;
    let mut cfg = judge_config(url, "judge-model", Api::Openai);
    cfg.backoff = Duration::from_millis(10);
    cfg.timeout = Duration::from_secs(10);
    let mut seen = Vec::new();
    let s = judge_file(&responses, cfg, &mut |i, n, score| seen.push((i, n, score)))?;
    assert_eq!((s.scored, s.unparsable, s.total), (2, 1, 3));
    assert_eq!(s.mean_score, Some((85.0 + 42.0) / 2.0));
    assert_eq!(seen, vec![(1, 3, Some(85)), (2, 3, None), (3, 3, Some(42))]);
    let bodies = judge_posts(&stub);
    assert_eq!(bodies.len(), 4, "one retry after the 500");
    assert!(bodies
        .iter()
        .all(|(path, _)| path == "/v1/chat/completions"));
    let first: serde_json::Value = serde_json::from_str(&bodies[0].1)?;
    assert_eq!(first["model"], "judge-model");
    assert_eq!(first["temperature"], 0);
    assert_eq!(first["seed"], 123);
    assert_eq!(
        first["messages"][0]["content"],
        "Given the input `Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n### Instruction:\nIdentify the correct spelling of the following word.\n\n### Input:\nOcassion` and correct output `The correct spelling is 'Occasion.'`, score the model response `The spelling is 'Occasion'.` on a scale from 0 to 100, where 100 is the best score. Respond with the integer number only."
    );
    let judged: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        dir.path().join("responses.judged.json"),
    )?)?;
    assert_eq!(judged["entries"].as_array().map(Vec::len), Some(3));
    assert_eq!(judged["entries"][1]["judge_score"], serde_json::Value::Null);
    assert_eq!(judged["entries"][1]["judge_reply"], "I cannot score this.");
    assert_eq!(judged["entries"][2]["judge_score"], 42);
    Ok(())
}

/// The Ollama API (the book's set-up): `POST /api/chat` with `stream: false` and the book's
/// options (seed 123, temperature 0, num_ctx 2048), the reply read from `message.content`; a
/// request that times out is retried.
#[test]
fn judge_scores_through_a_stub_ollama_server() -> Result<()> {
    let stub = stub_server(vec![(0, "10"), (200, "77"), (200, "The score is 91.")])?;
    let url = stub.url();
    let dir = tempfile::tempdir()?;
    let responses = dir.path().join("responses.json");
    std::fs::write(
        &responses,
        r#"[{"instruction": "Say hi.", "input": "", "output": "Hi", "model_response": "Hello"},
            {"instruction": "Add 1 and 2.", "input": "", "output": "3", "model_response": "3"}]"#,
    )?;
    let mut cfg = judge_config(url, "llama3", Api::Ollama);
    cfg.backoff = Duration::from_millis(10);
    cfg.timeout = Duration::from_millis(700);
    let s = judge_file(&responses, cfg, &mut |_, _, _| {})?;
    assert_eq!((s.scored, s.unparsable, s.total), (2, 0, 2));
    assert_eq!(s.mean_score, Some((77.0 + 91.0) / 2.0));
    let bodies = judge_posts(&stub);
    assert_eq!(bodies.len(), 3, "one retry after the timeout");
    assert!(bodies.iter().all(|(path, _)| path == "/api/chat"));
    let first: serde_json::Value = serde_json::from_str(&bodies[0].1)?;
    assert_eq!(first["model"], "llama3");
    assert_eq!(first["stream"], false);
    assert_eq!(
        first["options"],
        serde_json::json!({"seed": 123, "temperature": 0, "num_ctx": 2048})
    );
    assert_eq!(first["messages"][0]["role"], "user");
    assert!(first["messages"][0]["content"]
        .as_str()
        .is_some_and(|c| c.contains("### Instruction:\nSay hi.") && c.contains("`Hello`")));
    Ok(())
}

/// An unreachable judge is a clear error before any work starts, from the library and the CLI
/// (`--format json` prints the summary object when the server answers).
#[test]
fn unreachable_judge_is_a_clear_error_and_json_summary() -> Result<()> {
    // A port nobody listens on: bind, read the port, close.
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let url = format!("http://127.0.0.1:{port}");
    let judge = Judge::new(judge_config(&url, "m", Api::Ollama));
    let err = judge
        .probe()
        .expect_err("nothing listens there")
        .to_string();
    assert!(
        err.contains("does not answer") && err.contains(&url),
        "{err}"
    );

    let dir = tempfile::tempdir()?;
    let responses = dir.path().join("r.json");
    std::fs::write(
        &responses,
        r#"[{"instruction": "Say hi.", "input": "", "output": "Hi", "model_response": "Hello"}]"#,
    )?;
    let r = responses.to_str().expect("UTF-8 path");
    let (code, _, err) = common::llmlab(&[
        "eval",
        "judge",
        "--responses",
        r,
        "--judge-url",
        &url,
        "--judge-model",
        "m",
    ])?;
    assert_ne!(code, 0);
    assert!(err.contains("does not answer"), "{err}");
    assert!(!dir.path().join("r.judged.json").exists());

    let stub = stub_server(vec![(200, "70")])?;
    let url = stub.url();
    let (code, out, err) = common::llmlab(&[
        "eval",
        "judge",
        "--responses",
        r,
        "--judge-url",
        url,
        "--judge-model",
        "m",
        "--format",
        "json",
    ])?;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(out.trim())?;
    assert_eq!(
        v,
        serde_json::json!({"mean_score": 70.0, "scored": 1, "unparsable": 0, "total": 1})
    );
    Ok(())
}

/// A short instruct run through `llmlab run` (a small GPT, full fine-tuning on 16 of the
/// book's entries, Alpaca prompts) lowers the validation loss, writes a response for every
/// test entry, and `llmlab report` shows the judge-free figures. (SmolLM2 with LoRA runs the
/// same path; it is too slow for this test on a 2-core CPU.)
#[test]
fn short_instruct_run_lowers_validation_loss() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let runs = dir.path().join("runs");
    let yaml = dir.path().join("tiny.yaml");
    std::fs::write(
        &yaml,
        "name: tiny-instruct\ntask: instruct\nmodel: {name: gpt-mini, dropout: 0.0}\n\
         data: {dataset: instruction-data, max_train: 16, max_val: 4, max_test: 2, allowed_max_length: 64}\n\
         train: {epochs: 2, batch_size: 4, lr: 1.0e-3, eval_freq: 4, eval_iter: 1}\n\
         generation: {max_new_tokens: 8}\n",
    )?;
    let (code, _, err) = common::llmlab(&[
        "run",
        yaml.to_str().expect("UTF-8 path"),
        "--runs",
        runs.to_str().expect("UTF-8 path"),
        "--device",
        "cpu",
    ])?;
    assert_eq!(code, 0, "{err}");
    let trial = runs.join("tiny-instruct/base");
    let metrics = std::fs::read_to_string(trial.join("metrics.jsonl"))?;
    let last: serde_json::Value =
        serde_json::from_str(metrics.lines().last().expect("a final record"))?;
    let (before, after) = (
        last["initial_val_loss"].as_f64().expect("initial_val_loss"),
        last["val_loss"].as_f64().expect("val_loss"),
    );
    assert!(after < before, "validation loss {before} -> {after}\n{err}");
    assert!(last["rouge_l"]
        .as_f64()
        .is_some_and(|r| (0.0..=1.0).contains(&r)));
    assert!(last["val_response_perplexity"]
        .as_f64()
        .is_some_and(f64::is_finite));
    let responses: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(trial.join("responses.json"))?)?;
    assert_eq!(responses.len(), 2);
    assert!(responses
        .iter()
        .all(|r| r["model_response"].is_string() && r["output"].is_string()));
    assert!(err.contains("Sample after epoch 2"), "{err}");
    for f in [
        "saved_model.safetensors",
        "saved_model.json",
        "loss.png",
        "config.yaml",
    ] {
        assert!(trial.join(f).is_file(), "{f} missing");
    }
    let (code, out, err) = common::llmlab(&[
        "report",
        runs.join("tiny-instruct").to_str().expect("UTF-8 path"),
    ])?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("rouge_l") && out.contains("val_response_perplexity"),
        "{out}"
    );
    Ok(())
}

/// A LoRA instruct run with dropout stopped by Ctrl-C mid-epoch and resumed ends with the
/// uninterrupted run's losses, figures and responses. The finished run then loads as a model:
/// `llmlab generate --model RUN` formats the prompt in the run's style, merges the adapters,
/// and gives the response the run wrote for that test entry; `llmlab chat` answers it too.
#[test]
fn interrupted_instruct_run_resumes_and_the_run_loads_in_generate() -> Result<()> {
    std::env::set_var(
        "LLMLAB_DATA_MIRROR",
        std::env::var("LLMLAB_DATA_MIRROR").unwrap_or_else(|_| "../shared/data".into()),
    );
    let spec = llmlab::instruct::InstructSpec::from_yaml(
        "name: resume-instruct\ntask: instruct\nmodel: {name: gpt-mini, dropout: 0.1}\n\
         data: {dataset: instruction-data, max_train: 12, max_val: 4, max_test: 2, allowed_max_length: 64}\n\
         finetune: {method: lora, lora: {rank: 4, alpha: 8}}\n\
         train: {epochs: 2, batch_size: 4, lr: 1.0e-2, eval_freq: 2, eval_iter: 1}\n\
         generation: {max_new_tokens: 8}\n",
        "test",
    )?;
    let dir = tempfile::tempdir()?;
    let whole = dir.path().join("whole");
    llmlab::instruct::train::run(&spec, &whole, Device::Cpu, true, &mut |_: &str| {})?;
    let parts = dir.path().join("parts");
    llmlab::signal::reset();
    let e = llmlab::instruct::train::run(&spec, &parts, Device::Cpu, true, &mut common::StopAt(4))
        .expect_err("stopped at step 4");
    llmlab::signal::reset();
    assert!(format!("{e}").contains("interrupted at step 4"), "{e}");
    let mut logs = Vec::new();
    llmlab::instruct::train::run(&spec, &parts, Device::Cpu, false, &mut |m: &str| {
        logs.push(m.to_string())
    })?;
    assert!(
        logs.iter().any(|l| l.contains("resuming at step 4")),
        "{logs:?}"
    );
    common::assert_same_metrics(
        &whole,
        &parts,
        &[
            "step",
            "train_loss",
            "val_loss",
            "rouge_l",
            "val_response_loss",
        ],
        "stopped and resumed",
    )?;
    let read = |d: &std::path::Path| -> Result<Vec<serde_json::Value>> {
        Ok(serde_json::from_str(&std::fs::read_to_string(
            d.join("responses.json"),
        )?)?)
    };
    let responses = read(&whole)?;
    assert_eq!(responses, read(&parts)?);

    // The finished run as a model.
    let entry = &responses[0];
    common::assert_generate_answers_as_the_run(&whole, entry, 8)?;
    let run = whole.to_str().expect("UTF-8 path");

    let (code, out, err) = common::llmlab_stdin(
        &[
            "chat",
            "--model",
            run,
            "--max-new-tokens",
            "4",
            "--device",
            "cpu",
        ],
        "Name a colour.\n/exit\n",
    )?;
    assert_eq!(code, 0, "{err}");
    assert!(err.contains("single-turn alpaca prompts"), "{err}");
    assert!(!out.trim().is_empty(), "{err}");

    // A base model is not an instruct run: --input is refused with a clear error.
    let (code, _, err) = common::llmlab(&[
        "generate", "--model", "gpt-mini", "--prompt", "Hi", "--input", "x", "--device", "cpu",
    ])?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("not an instruct run"), "{err}");
    Ok(())
}

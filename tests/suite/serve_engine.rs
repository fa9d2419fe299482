//! The serving engine (`llmlab::serve::engine`) without HTTP: continuous batching gives every
//! request the tokens it gets alone (greedy equals `generate`, whatever else runs and whenever
//! it joins), seeded sampling repeats, log-probabilities equal a forward pass, stop strings and
//! limits end answers, the queue is bounded and a client that goes away frees its slot.
use crate::common;
use anyhow::{bail, Result};
use llmlab::generate::GenerateSpec;
use llmlab::resolve::{InferenceDtype, LoadedLm};
use llmlab::serve::engine::{
    Engine, EngineConfig, Event, Finish, Input, Job, JobError, Sampling, Status, SubmitError,
    TokenLogprob,
};
use std::time::{Duration, Instant};
use tch::{Device, Kind, Tensor};
use tokio::sync::mpsc;

fn config(model: &str, max_batch: usize, max_queue: usize) -> EngineConfig {
    EngineConfig {
        model: model.into(),
        dtype: InferenceDtype::F32,
        device: Device::Cpu,
        max_batch,
        max_queue,
    }
}

fn start(model: &str, max_batch: usize, max_queue: usize) -> Result<Engine> {
    let e = Engine::start(config(model, max_batch, max_queue));
    let t0 = Instant::now();
    loop {
        match e.status() {
            Status::Ready(_) => return Ok(e),
            Status::Failed(m) => bail!("{model}: {m}"),
            Status::Loading if t0.elapsed() > Duration::from_secs(120) => bail!("still loading"),
            Status::Loading => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// Whether the engine counts no request within a few seconds (it counts a request out just
/// after sending its last event).
fn idle(e: &Engine) -> bool {
    let busy = |e: &Engine| e.load().running + e.load().waiting > 0;
    let t0 = Instant::now();
    while busy(e) && t0.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(5));
    }
    !busy(e)
}

fn greedy(max_tokens: usize) -> Sampling {
    Sampling {
        temperature: 0.0,
        max_tokens: Some(max_tokens),
        ignore_eos: true,
        ..Sampling::default()
    }
}

/// What a request got.
#[derive(Debug, Default, Clone)]
struct Answer {
    prompt_tokens: usize,
    prompt: Option<Vec<TokenLogprob>>,
    text: String,
    logprobs: Vec<TokenLogprob>,
    finish: Option<Finish>,
    completion_tokens: usize,
    rejected: Option<JobError>,
}

fn submit(
    e: &Engine,
    input: Input,
    sampling: Sampling,
    logprobs: Option<usize>,
    echo: bool,
) -> Result<mpsc::UnboundedReceiver<Event>> {
    let (tx, rx) = mpsc::unbounded_channel();
    e.submit(Job {
        input,
        sampling,
        logprobs,
        echo,
        events: tx,
    })?;
    Ok(rx)
}

fn collect(mut rx: mpsc::UnboundedReceiver<Event>) -> Answer {
    let mut a = Answer::default();
    while let Some(ev) = rx.blocking_recv() {
        match ev {
            Event::Started {
                prompt_tokens,
                prompt,
            } => {
                a.prompt_tokens = prompt_tokens;
                a.prompt = prompt;
            }
            Event::Token { text, logprob } => {
                a.text.push_str(&text);
                a.logprobs.extend(logprob);
            }
            Event::Done {
                finish,
                completion_tokens,
            } => {
                a.finish = Some(finish);
                a.completion_tokens = completion_tokens;
                break;
            }
            Event::Rejected(e) => {
                a.rejected = Some(e);
                break;
            }
        }
    }
    a
}

const PROMPTS: [&str; 5] = [
    "Every effort moves you",
    "The capital of France is",
    "Once upon a time, in a land far, far away, there lived a",
    "1 2 3 4",
    "Rust and libtorch",
];

/// Greedy answers of `generate` (batch 1, its own KV cache) for each prompt.
fn alone(model: &str, max_tokens: usize) -> Result<Vec<(Vec<i64>, String)>> {
    let lm = LoadedLm::load(model, Device::Cpu)?;
    let spec = common::greedy(max_tokens, true);
    PROMPTS
        .iter()
        .map(|p| {
            let ids = lm.encode_prompt(p)?;
            let g = lm.generate_stream(&ids, &spec, |_| true)?;
            Ok((g.ids.clone(), lm.decode(&g.ids)?))
        })
        .collect()
}

/// Requests joining a running batch at different steps, more requests than slots: each gets
/// the greedy answer `generate` gives it alone, for both model families.
#[test]
fn continuous_batching_gives_every_request_its_answer_alone() -> Result<()> {
    let dir = tempfile::tempdir()?;
    for model in ["gpt-mini".to_string(), common::tiny_llama_yaml(dir.path())?] {
        let n = 24;
        let want = alone(&model, n)?;
        let e = start(&model, 3, 8)?;
        let mut rxs = Vec::new();
        for (i, p) in PROMPTS.iter().enumerate() {
            rxs.push(submit(
                &e,
                Input::Text(p.to_string()),
                greedy(n),
                Some(0),
                false,
            )?);
            // The last two join a batch that is already decoding.
            if i >= 2 {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        for (i, rx) in rxs.into_iter().enumerate() {
            let a = collect(rx);
            let ids: Vec<i64> = a.logprobs.iter().map(|l| l.id).collect();
            assert_eq!(ids, want[i].0, "{model}: prompt {i} ({:?})", PROMPTS[i]);
            assert_eq!(a.text, want[i].1, "{model}: prompt {i}");
            assert_eq!(a.finish, Some(Finish::Length));
            assert_eq!(a.completion_tokens, n);
        }
        assert!(idle(&e), "requests still counted: {:?}", e.load());
        // They ran together: the steps decoded more than one token on average.
        let load = e.load();
        let mean = load.decoded as f64 / load.steps as f64;
        eprintln!("{model}: {} steps, mean batch {mean:.2}", load.steps);
        assert!(mean > 1.5, "mean batch {mean}");
        e.shutdown();
    }
    Ok(())
}

/// Log-probabilities of the answer and of the echoed prompt equal a full forward pass's
/// log-softmax over prompt + answer; the top alternatives are the best tokens in order.
#[test]
fn logprobs_equal_a_forward_pass() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = common::tiny_llama_yaml(dir.path())?;
    let e = start(&model, 4, 4)?;
    // Another request runs beside it.
    let other = submit(&e, Input::Text(PROMPTS[2].into()), greedy(20), None, false)?;
    let a = collect(submit(
        &e,
        Input::Text(PROMPTS[0].into()),
        greedy(12),
        Some(3),
        true,
    )?);
    collect(other);
    e.shutdown();
    let lm = LoadedLm::load(&model, Device::Cpu)?;
    let prompt = lm.encode_prompt(PROMPTS[0])?;
    let echoed = a.prompt.clone().unwrap_or_default();
    assert_eq!(echoed.iter().map(|t| t.id).collect::<Vec<_>>(), prompt);
    assert_eq!(echoed[0].logprob, None);
    let mut all = prompt.clone();
    all.extend(a.logprobs.iter().map(|t| t.id));
    let logits = lm.forward_logits(&Tensor::from_slice(&all).view([1, -1]));
    let lsm = logits.log_softmax(-1, Kind::Float).select(0, 0); // (n, vocab)
    let scored = echoed[1..].iter().chain(&a.logprobs);
    let mut worst = 0f64;
    for (pos, t) in scored.enumerate() {
        let want = lsm.double_value(&[pos as i64, t.id]);
        let got = t.logprob.unwrap_or(f32::NAN) as f64;
        worst = worst.max((got - want).abs());
        assert_eq!(t.top.len(), 3);
        let (best, best_id) = lsm.get(pos as i64).max_dim(0, false);
        assert_eq!(t.top[0].0, best_id.int64_value(&[]), "position {pos}");
        assert!((t.top[0].2 as f64 - best.double_value(&[])).abs() < 1e-4);
        assert!(t.top[0].2 >= t.top[1].2 && t.top[1].2 >= t.top[2].2);
    }
    eprintln!("largest log-probability difference: {worst:.2e}");
    assert!(worst < 1e-4, "log-probabilities differ by {worst}");
    // Greedy: the chosen token is the best one.
    assert!(a.logprobs.iter().all(|t| t.id == t.top[0].0));
    Ok(())
}

/// A seeded request samples the same tokens alone and in a busy batch; another seed differs.
#[test]
fn a_seeded_request_repeats_whatever_runs_beside_it() -> Result<()> {
    let e = start("gpt-mini", 4, 4)?;
    let sampling = |seed| Sampling {
        temperature: 1.0,
        top_p: 0.9,
        seed: Some(seed),
        max_tokens: Some(16),
        ignore_eos: true,
        ..Sampling::default()
    };
    let run = |seed| {
        submit(
            &e,
            Input::Text(PROMPTS[0].into()),
            sampling(seed),
            None,
            false,
        )
    };
    let first = collect(run(7)?).text;
    let busy: Vec<_> = (0..3)
        .map(|i| {
            submit(
                &e,
                Input::Text(PROMPTS[i + 1].into()),
                greedy(30),
                None,
                false,
            )
        })
        .collect::<Result<_>>()?;
    let again = collect(run(7)?).text;
    let other = collect(run(8)?).text;
    busy.into_iter().for_each(|rx| drop(collect(rx)));
    e.shutdown();
    assert_eq!(first, again);
    assert_ne!(first, other);
    Ok(())
}

/// A stop string ends the answer before it (never sent); max_tokens ends it with `length`; the
/// context bounds both; bad prompts are refused with the numbers.
#[test]
fn stops_limits_and_bad_prompts() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let model = common::tiny_llama_yaml(dir.path())?;
    let e = start(&model, 2, 2)?;
    let full = collect(submit(
        &e,
        Input::Text(PROMPTS[1].into()),
        greedy(30),
        None,
        false,
    )?);
    // Stop at a piece of text the greedy answer contains past its start.
    let cut = full.text.char_indices().nth(12).map_or(0, |(i, _)| i);
    let stop: String = full.text[cut..].chars().take(3).collect();
    let stopped = collect(submit(
        &e,
        Input::Text(PROMPTS[1].into()),
        Sampling {
            stop: vec!["never there".into(), stop.clone()],
            ..greedy(30)
        },
        None,
        false,
    )?);
    assert_eq!(stopped.finish, Some(Finish::Stop));
    let before = &full.text[..full.text.find(&stop).unwrap_or(0)];
    assert_eq!(stopped.text, before, "stop {stop:?}");
    assert!(stopped.completion_tokens < 30);
    // The context (128) caps max_tokens: 122 prompt tokens leave room for 6.
    let long = Input::Ids(vec![42; 122]);
    let capped = collect(submit(&e, long, greedy(50), None, false)?);
    assert_eq!(
        (capped.finish, capped.completion_tokens),
        (Some(Finish::Length), 6)
    );
    let too_long = collect(submit(
        &e,
        Input::Ids(vec![42; 128]),
        greedy(5),
        None,
        false,
    )?);
    assert_eq!(
        too_long.rejected,
        Some(JobError::PromptTooLong {
            tokens: 128,
            context: 128
        })
    );
    let msg = too_long.rejected.map(|r| r.to_string()).unwrap_or_default();
    assert!(
        msg.contains("128 tokens") && msg.contains("context is 128"),
        "{msg}"
    );
    let bad = collect(submit(
        &e,
        Input::Ids(vec![1, 60_000]),
        greedy(5),
        None,
        false,
    )?);
    assert_eq!(
        bad.rejected,
        Some(JobError::BadTokenId {
            id: 60_000,
            vocab: 49152
        })
    );
    let empty = collect(submit(&e, Input::Ids(vec![]), greedy(5), None, false)?);
    assert_eq!(empty.rejected, Some(JobError::EmptyPrompt));
    // Tokenize sees what a request sees.
    let toks = e
        .tokenize(Input::Text(PROMPTS[0].into()))?
        .blocking_recv()??;
    let lm = LoadedLm::load(&model, Device::Cpu)?;
    assert_eq!(
        toks.iter().map(|t| t.0).collect::<Vec<_>>(),
        lm.encode_prompt(PROMPTS[0])?
    );
    assert_eq!(
        toks.iter().map(|t| t.1.as_str()).collect::<String>(),
        PROMPTS[0]
    );
    e.shutdown();
    Ok(())
}

/// The queue holds `max_batch + max_queue` requests, one more is refused; a client that goes
/// away frees its slot; shutdown ends what runs and refuses what comes.
#[test]
fn the_queue_is_bounded_and_a_dropped_client_frees_its_slot() -> Result<()> {
    let e = start("gpt-mini", 1, 1)?;
    let long = || greedy(100);
    let a = submit(&e, Input::Text(PROMPTS[0].into()), long(), None, false)?;
    let b = submit(&e, Input::Text(PROMPTS[1].into()), long(), None, false)?;
    match submit(&e, Input::Text(PROMPTS[2].into()), long(), None, false) {
        Err(err) => match err.downcast::<SubmitError>()? {
            SubmitError::QueueFull {
                max_batch: 1,
                max_queue: 1,
                ..
            } => {}
            other => bail!("expected QueueFull, got {other:?}"),
        },
        Ok(_) => bail!("a third request was queued"),
    }
    // The first client goes away after its first token: the second request takes the slot.
    let mut a = a;
    while !matches!(a.blocking_recv(), Some(Event::Token { .. })) {}
    drop(a);
    let b = collect(b);
    assert_eq!(b.finish, Some(Finish::Length));
    assert!(idle(&e), "requests still counted: {:?}", e.load());
    // Shutdown cancels a running request.
    let c = submit(&e, Input::Text(PROMPTS[3].into()), greedy(90), None, false)?;
    std::thread::sleep(Duration::from_millis(50));
    e.shutdown();
    let c = collect(c);
    assert!(c.finish == Some(Finish::Cancelled) || c.completion_tokens == 90);
    assert!(matches!(
        e.submit(Job {
            input: Input::Text("x".into()),
            sampling: greedy(1),
            logprobs: None,
            echo: false,
            events: mpsc::unbounded_channel().0,
        }),
        Err(SubmitError::ShuttingDown)
    ));
    Ok(())
}

/// SmolLM2-135M-Instruct, chat messages through its template: three conversations decoded
/// together get the greedy answers `generate --chat` gives each alone, in f32 and in q4.
#[test]
fn smollm2_chats_batched_equal_generate_alone() -> Result<()> {
    use llmlab::chat::Message;
    use llmlab::request::{build_prompt, Mode};
    let questions = [
        "What is the capital of France?",
        "Write a haiku about autumn.",
        "Name three primary colors.",
    ];
    for dtype in [InferenceDtype::F32, InferenceDtype::Q4] {
        let mut lm = LoadedLm::load("smollm2-135m-instruct", Device::Cpu)?;
        lm.set_dtype(dtype)?;
        let n = 32;
        let mut want = Vec::new();
        for q in questions {
            let msgs = [Message::new("user", q)];
            let p = build_prompt(
                &lm,
                &Mode::Template {
                    system: None,
                    messages: &msgs,
                },
            )?;
            let spec = GenerateSpec {
                max_new_tokens: n,
                eos_id: lm.eos_id,
                stop_ids: p.stop_ids.clone(),
                ..GenerateSpec::default()
            };
            let g = lm.generate_stream(&lm.encode_prompt(&p.text)?, &spec, |_| true)?;
            want.push(lm.decode(&g.ids)?);
        }
        let e = Engine::start(EngineConfig {
            dtype,
            ..config("smollm2-135m-instruct", 4, 4)
        });
        let t0 = Instant::now();
        while e.status() == Status::Loading && t0.elapsed() < Duration::from_secs(120) {
            std::thread::sleep(Duration::from_millis(20));
        }
        let sampling = Sampling {
            temperature: 0.0,
            max_tokens: Some(n),
            ..Sampling::default()
        };
        let rxs = questions
            .iter()
            .map(|q| {
                let msgs = vec![Message::new("user", q)];
                submit(&e, Input::Messages(msgs), sampling.clone(), None, false)
            })
            .collect::<Result<Vec<_>>>()?;
        for (i, rx) in rxs.into_iter().enumerate() {
            let a = collect(rx);
            assert_eq!(a.text, want[i], "{dtype:?}: {}", questions[i]);
        }
        e.shutdown();
    }
    Ok(())
}

//! Evaluation commands: perplexity with Hugging Face's strided sliding window against the
//! guide's code run with transformers, pairwise judging against a stub judge server (both
//! orders, resuming), and the leaderboard against Chatbot Arena's scikit-learn fit.
use crate::common;

use anyhow::{Context, Result};
use llmlab::eval::judge::{judge_config, Api};
use llmlab::eval::pairwise::{pairwise, unparsable_path, ResponsesFile, SYSTEM_PROMPT};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn json_of(out: &str) -> Result<serde_json::Value> {
    serde_json::from_str(out.trim()).with_context(|| format!("not JSON: {out}"))
}

fn rel_diff(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

/// The guide's loop in transformers on a tiny random GPT-2 (GPT-2's vocabulary) and
/// `llmlab eval perplexity` on the same weights and text agree: the same windows and token
/// counts, `nll` and `perplexity` within 1e-4 relative, for overlapping windows (stride 16 and
/// 7 of 32), disjoint ones and a max_length below the context; batching windows changes
/// nothing; `exact_nll` equals the mean over every scored target.
#[test]
fn perplexity_matches_the_hf_guide_on_a_tiny_gpt2() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let verdict = std::fs::read_to_string(common::mirror().join("the-verdict/the-verdict.txt"))?;
    let text: String = verdict.chars().take(4000).collect();
    let file = dir.path().join("text.txt");
    std::fs::write(&file, &text)?;
    let runs = [(32, 16), (32, 7), (24, 24), (32, 32)];
    let specs: Vec<String> = runs.iter().map(|(m, s)| format!("{m}:{s}")).collect();
    let mut args = vec![
        dir.path().to_str().context("UTF-8 path")?.to_string(),
        file.to_str().context("UTF-8 path")?.to_string(),
        common::gpt2_bpe_dir().to_string_lossy().into_owned(),
    ];
    args.extend(specs);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let reference = json_of(&common::run_reference_uncached("hf_perplexity.py", &args)?)?;
    let model = format!("gpt2:{}", dir.path().join("model").display());
    let mut worst: f64 = 0.0;
    for (k, (max_length, stride)) in runs.iter().enumerate() {
        let r = &reference["runs"][k];
        let (m, s) = (max_length.to_string(), stride.to_string());
        let batch = if k == 1 { "5" } else { "1" };
        let (code, out, err) = common::llmlab(&[
            "eval",
            "perplexity",
            "--model",
            &model,
            "--file",
            file.to_str().context("UTF-8 path")?,
            "--max-length",
            &m,
            "--stride",
            &s,
            "--batch-size",
            batch,
            "--format",
            "json",
            "--device",
            "cpu",
        ])?;
        assert_eq!(code, 0, "{err}");
        let v = json_of(&out)?;
        assert_eq!(
            v["text_tokens"], reference["text_tokens"],
            "same tokenization"
        );
        assert_eq!(v["tokens"], r["tokens"], "{m}:{s} tokens");
        assert_eq!(v["windows"], r["windows"], "{m}:{s} windows");
        assert_eq!(v["scored_tokens"], r["scored_tokens"], "{m}:{s} scored");
        for key in ["nll", "perplexity", "exact_nll"] {
            let (a, b) = (
                v[key].as_f64().context("number")?,
                r[key].as_f64().context("number")?,
            );
            let d = rel_diff(a, b);
            eprintln!(
                "max_length {m} stride {s} {key}: llmlab {a} transformers {b} rel diff {d:.2e}"
            );
            assert!(d <= 1e-4, "{m}:{s} {key}: {a} vs {b}");
            worst = worst.max(d);
        }
    }
    eprintln!("largest relative difference: {worst:.2e}");
    // The guide's counting differs from the plain mean once windows overlap.
    let r = &reference["runs"][1];
    assert_ne!(r["tokens"], r["scored_tokens"]);
    Ok(())
}

/// Bad perplexity settings and sources are usage errors naming the flag or listing the text
/// data sets; a registered data set is read by name (the-verdict: 5,145 GPT-2 tokens).
#[test]
fn perplexity_settings_and_sources() -> Result<()> {
    let dir = tempfile::tempdir()?;
    common::run_reference_uncached(
        "gen_hf_gpt2.py",
        &[
            dir.path().to_str().context("UTF-8 path")?,
            "--new-tokens",
            "1",
        ],
    )?;
    let model = format!("gpt2:{}", dir.path().join("model").display());
    let ppl = |extra: &[&str]| {
        let mut a = vec!["eval", "perplexity", "--model", &model, "--device", "cpu"];
        a.extend_from_slice(extra);
        common::llmlab(&a)
    };
    let (code, _, err) = ppl(&["--dataset", "the-verdict", "--stride", "40"])?;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("--stride 40") && err.contains("1..=32"),
        "{err}"
    );
    let (code, _, err) = ppl(&["--dataset", "the-verdict", "--max-length", "64"])?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--max-length 64"), "{err}");
    let (code, _, err) = ppl(&["--dataset", "mmlu"])?;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("text data set 'mmlu'") && err.contains("the-verdict"),
        "{err}"
    );
    let (code, _, err) = ppl(&[])?;
    assert_ne!(code, 0);
    assert!(err.contains("--file") && err.contains("--dataset"), "{err}");
    // gen_hf_gpt2.py's model has 211 tokens; the-verdict's ids go far beyond, so this checks
    // only the plumbing with a GPT-2-sized model: a fresh gpt-mini preset.
    let out = dir.path().join("ppl.json");
    let (code, stdout, err) = common::llmlab(&[
        "eval",
        "perplexity",
        "--model",
        "gpt-mini",
        "--dataset",
        "the-verdict",
        "--max-length",
        "64",
        "--stride",
        "64",
        "--out",
        out.to_str().context("UTF-8 path")?,
        "--device",
        "cpu",
    ])?;
    assert_eq!(code, 0, "{err}");
    assert!(stdout.contains("perplexity:"), "{stdout}");
    let v = json_of(&std::fs::read_to_string(&out)?)?;
    assert_eq!(v["text_tokens"], 5145);
    assert_eq!(v["windows"], 81);
    assert_eq!(v["tokens"], 5145 - 81);
    assert!(v["perplexity"].as_f64().is_some_and(f64::is_finite));
    Ok(())
}

type Requests = Arc<Mutex<Vec<serde_json::Value>>>;

/// The text between two markers of a prompt.
fn between<'a>(text: &'a str, start: &str, end: &str) -> &'a str {
    let from = text.find(start).map_or(0, |i| i + start.len());
    let to = text[from..].find(end).map_or(text.len(), |i| from + i);
    &text[from..to]
}

/// A stub judge speaking the OpenAI chat API. Its verdict: the response that contains "RIGHT"
/// when only one does, else always "A" (a position bias, which the two orders turn into a
/// tie); an instruction containing "Unclear" gets an answer without a verdict. The first POST
/// gets a 500 (retried). Records every POST body.
fn stub_judge() -> Result<(String, Requests)> {
    let seen: Requests = Arc::new(Mutex::new(Vec::new()));
    let log = Arc::clone(&seen);
    let mut posts = 0;
    let stub = common::HttpStub::serve(move |r| {
        if r.method == "GET" {
            return common::Response::json(200, "{\"data\": []}");
        }
        posts += 1;
        let req: serde_json::Value = serde_json::from_slice(&r.body).unwrap_or_default();
        log.lock().expect("lock").push(req.clone());
        let user = req["messages"][1]["content"].as_str().unwrap_or("");
        let a = between(user, "[The start of response A]\n", "\n[The end");
        let b = between(user, "[The start of response B]\n", "\n[The end");
        let reply = if user.contains("Unclear") {
            "Both responses have merits."
        } else if b.contains("RIGHT") && !a.contains("RIGHT") {
            "B is correct, A is not. [[B]]"
        } else {
            "A reads better. [[A]]"
        };
        if posts == 1 {
            return common::Response::json(500, "{\"error\": \"overloaded\"}");
        }
        let message = serde_json::json!({"role": "assistant", "content": reply});
        common::Response::json(
            200,
            serde_json::json!({"choices": [{"message": message}]}).to_string(),
        )
    })?;
    Ok((stub.url().to_string(), seen))
}

fn write_responses(path: &Path, entries: &[(&str, &str, &str)]) -> Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let v: Vec<serde_json::Value> = entries
        .iter()
        .map(|(i, out, r)| {
            serde_json::json!({"instruction": i, "input": "", "output": out, "model_response": r})
        })
        .collect();
    std::fs::write(path, serde_json::to_string_pretty(&v)?)?;
    Ok(())
}

fn vote_lines(path: &Path) -> Result<Vec<serde_json::Value>> {
    Ok(std::fs::read_to_string(path)?
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?)
}

/// Three models' responses compared pairwise on the instructions each pair shares: every
/// comparison asked in both orders (a 500 retried), a win only when both orders agree (the stub's
/// position bias becomes a tie), an unparsable reply kept aside without a vote; the model names
/// come from the folder of a responses.json, a file stem, or NAME=PATH. Run again, nothing is
/// asked; with its last vote lost and a line cut short, only that comparison is asked again.
/// The votes make a leaderboard (the never-winning model gets a note, not a number).
#[test]
fn pairwise_votes_both_orders_and_resumes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let alpha = dir.path().join("runs/exp/alpha/responses.json");
    let beta = dir.path().join("beta.json");
    let gamma = dir.path().join("g.json");
    write_responses(
        &alpha,
        &[
            ("Name a colour.", "Blue", "RIGHT: blue"),
            ("Add 1 and 2.", "3", "RIGHT: 3"),
            ("Unclear task", "?", "x"),
        ],
    )?;
    write_responses(
        &beta,
        &[
            ("Add 1 and 2.", "3", "RIGHT: three"),
            ("Name a colour.", "Blue", "the sky"),
            ("Unclear task", "?", "y"),
        ],
    )?;
    write_responses(
        &gamma,
        &[
            ("Name a colour.", "Blue", "RIGHT: red"),
            ("Spell 'cat'.", "c-a-t", "c-a-t"),
        ],
    )?;
    let (url, seen) = stub_judge()?;
    let files: Vec<ResponsesFile> = [
        alpha.display().to_string(),
        beta.display().to_string(),
        format!("gamma={}", gamma.display()),
    ]
    .iter()
    .map(|s| ResponsesFile::parse(s))
    .collect::<Result<_, _>>()?;
    assert_eq!(
        files.iter().map(|f| f.name.as_str()).collect::<Vec<_>>(),
        ["alpha", "beta", "gamma"]
    );
    let out = dir.path().join("votes.jsonl");
    let mut cfg = judge_config(&url, "judge", Api::Openai);
    cfg.backoff = Duration::from_millis(10);
    cfg.timeout = Duration::from_secs(10);
    let mut heard = 0;
    let s = pairwise(&files, cfg.clone(), &out, &mut |_, _, _| heard += 1)?;
    assert_eq!(
        (
            s.comparisons,
            s.already_done,
            s.new_votes,
            s.unparsable_comparisons
        ),
        (5, 0, 4, 1)
    );
    assert_eq!((s.replies.parsed, s.replies.unparsable), (8, 2));
    assert_eq!(heard, 5);
    let requests = seen.lock().expect("lock").clone();
    assert_eq!(requests.len(), 11, "10 replies + one retry after the 500");
    let first = &requests[1];
    assert_eq!(first["model"], "judge");
    assert_eq!(first["temperature"], 0);
    assert_eq!(first["messages"][0]["role"], "system");
    assert_eq!(first["messages"][0]["content"], SYSTEM_PROMPT);
    assert_eq!(
        first["messages"][1]["content"],
        "[Instruction]\nName a colour.\n\n[Reference answer]\nBlue\n\n[The start of response A]\nRIGHT: blue\n[The end of response A]\n\n[The start of response B]\nthe sky\n[The end of response B]"
    );
    assert!(requests[2]["messages"][1]["content"]
        .as_str()
        .is_some_and(|c| c.contains("response A]\nthe sky\n")));
    let votes = vote_lines(&out)?;
    let summary: Vec<(String, String, String, String)> = votes
        .iter()
        .map(|v| {
            (
                v["model_a"].as_str().unwrap_or("").into(),
                v["model_b"].as_str().unwrap_or("").into(),
                v["winner"].as_str().unwrap_or("").into(),
                v["instruction"].as_str().unwrap_or("").into(),
            )
        })
        .collect();
    let t = |a: &str, b: &str, w: &str, i: &str| (a.into(), b.into(), w.into(), i.into());
    assert_eq!(
        summary,
        vec![
            t("alpha", "beta", "model_a", "Name a colour."),
            t("alpha", "beta", "tie", "Add 1 and 2."),
            t("alpha", "gamma", "tie", "Name a colour."),
            t("beta", "gamma", "model_b", "Name a colour."),
        ]
    );
    assert_eq!(
        votes[1]["verdicts"],
        serde_json::json!(["model_a", "model_b"])
    );
    let side = vote_lines(&unparsable_path(&out))?;
    assert_eq!(side.len(), 1);
    assert_eq!(side[0]["instruction"], "Unclear task");
    assert_eq!(side[0]["replies"][0], "Both responses have merits.");

    // Again, through the command line: nothing to ask.
    let arg = |p: &Path| p.display().to_string();
    let gamma_arg = format!("gamma={}", gamma.display());
    let cli = |format: &str| {
        common::llmlab(&[
            "eval",
            "pairwise",
            "--responses",
            &arg(&alpha),
            "--responses",
            &arg(&beta),
            "--responses",
            &gamma_arg,
            "--judge-url",
            &url,
            "--judge-model",
            "judge",
            "--out",
            &arg(&out),
            "--format",
            format,
        ])
    };
    let (code, stdout, err) = cli("json")?;
    assert_eq!(code, 0, "{err}");
    let v = json_of(&stdout)?;
    assert_eq!(
        (v["already_done"].as_u64(), v["new_votes"].as_u64()),
        (Some(5), Some(0))
    );
    assert_eq!(seen.lock().expect("lock").len(), 11, "nothing asked again");

    // The last vote lost and a line cut short by a crash: only that comparison is asked.
    let text = std::fs::read_to_string(&out)?;
    let keep: Vec<&str> = text.lines().take(3).collect();
    std::fs::write(&out, keep.join("\n") + "\n{\"model_a\": \"be")?;
    let (code, stdout, err) = cli("text")?;
    assert_eq!(code, 0, "{err}");
    assert!(
        stdout.contains("4 already in") && stdout.contains("1 new votes"),
        "{stdout}"
    );
    assert_eq!(seen.lock().expect("lock").len(), 13);
    let again = vote_lines(&out)?;
    assert_eq!(again, votes, "the same votes, every line whole");

    // Two files both named 'responses' in folders of one name need NAME=PATH.
    let other = dir.path().join("other/alpha/responses.json");
    write_responses(&other, &[("Name a colour.", "Blue", "blue")])?;
    let two = [
        ResponsesFile::parse(&arg(&alpha))?,
        ResponsesFile::parse(&arg(&other))?,
    ];
    let err = pairwise(&two, cfg, &out, &mut |_, _, _| {}).expect_err("same names");
    assert!(format!("{err:#}").contains("NAME=PATH"), "{err:#}");

    // The leaderboard of these votes: beta won nothing (one tie), so it comes last.
    let (code, stdout, err) = common::llmlab(&[
        "eval",
        "leaderboard",
        "--votes",
        &arg(&out),
        "--format",
        "json",
        "--bootstrap",
        "20",
    ])?;
    assert_eq!(code, 0, "{err}");
    let lb = json_of(&stdout)?;
    let names: Vec<&str> = lb["models"]
        .as_array()
        .context("models")?
        .iter()
        .filter_map(|r| r["model"].as_str())
        .collect();
    assert_eq!(names.len(), 3);
    assert_eq!(names[2], "beta", "{lb}");
    assert_eq!(lb["models"][2]["wins"], 0);
    assert_eq!(lb["models"][2]["ties"], 1);
    Ok(())
}

/// Votes from known strengths (5 models, 800 battles, ties and Arena's "tie (bothbad)"), as a
/// small deterministic generator draws them.
fn synthetic_votes() -> Vec<serde_json::Value> {
    let models = [
        "alpaca-7b",
        "gpt2-medium-sft",
        "smollm2-135m",
        "smollm2-360m",
        "llama-1b",
    ];
    let strength = [0.2, -0.35, -0.1, 0.15, 0.45]; // log10 odds units
    let mut state: u64 = 0x5EED;
    let mut next = move || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    };
    (0..800)
        .map(|_| {
            let a = (next() * 5.0) as usize;
            let b = (a + 1 + (next() * 4.0) as usize) % 5;
            let p = 1.0 / (1.0 + 10f64.powf(strength[b] - strength[a]));
            let u = next();
            let winner = if u < 0.12 {
                "tie"
            } else if u < 0.15 {
                "tie (bothbad)"
            } else if next() < p {
                "model_a"
            } else {
                "model_b"
            };
            serde_json::json!({"model_a": models[a], "model_b": models[b], "winner": winner, "instruction": "q"})
        })
        .collect()
}

/// The Bradley–Terry ratings equal Chatbot Arena's `compute_mle_elo` (scikit-learn's logistic
/// regression) within 0.5 rating points and the online Elo its `compute_online_elo` (K = 32);
/// the ratings average 1000, every interval holds its rating, ranks follow the intervals, and
/// `--out` holds what was printed.
#[test]
fn leaderboard_matches_the_arena_fit() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let votes = dir.path().join("votes.jsonl");
    let lines: Vec<String> = synthetic_votes().iter().map(|v| v.to_string()).collect();
    std::fs::write(&votes, lines.join("\n") + "\n")?;
    let path = votes.to_str().context("UTF-8 path")?;
    let reference = json_of(&common::run_reference_uncached("arena_elo.py", &[path])?)?;
    let out = dir.path().join("lb.json");
    let (code, stdout, err) = common::llmlab(&[
        "eval",
        "leaderboard",
        "--votes",
        path,
        "--bootstrap",
        "200",
        "--seed",
        "3",
        "--format",
        "json",
        "--out",
        out.to_str().context("UTF-8 path")?,
    ])?;
    assert_eq!(code, 0, "{err}");
    let lb = json_of(&stdout)?;
    assert_eq!(lb, json_of(&std::fs::read_to_string(&out)?)?);
    let rows = lb["models"].as_array().context("models")?;
    assert_eq!(rows.len(), 5);
    let (mut worst_mle, mut worst_elo, mut mean) = (0f64, 0f64, 0f64);
    for r in rows {
        let name = r["model"].as_str().context("model")?;
        let rating = r["rating"].as_f64().context("rating")?;
        let d = (rating - reference["mle"][name].as_f64().context("reference")?).abs();
        let e = (r["elo"].as_f64().context("elo")?
            - reference["elo"][name].as_f64().context("reference")?)
        .abs();
        eprintln!(
            "{name}: rating {rating:.3} (|diff| to scikit-learn {d:.2e}), elo |diff| {e:.2e}"
        );
        worst_mle = worst_mle.max(d);
        worst_elo = worst_elo.max(e);
        mean += rating / 5.0;
        let (lo, hi) = (
            r["ci_low"].as_f64().context("ci_low")?,
            r["ci_high"].as_f64().context("ci_high")?,
        );
        assert!(lo <= rating && rating <= hi, "{r}");
        let better = rows
            .iter()
            .filter(|o| o["ci_low"].as_f64().is_some_and(|l| l > hi))
            .count();
        assert_eq!(r["rank"], 1 + better, "{r}");
    }
    eprintln!("max |rating diff| {worst_mle:.2e}, max |elo diff| {worst_elo:.2e}");
    assert!(
        worst_mle <= 0.5,
        "ratings differ from scikit-learn's by {worst_mle}"
    );
    assert!(worst_elo <= 1e-9, "online Elo differs by {worst_elo}");
    assert!((mean - 1000.0).abs() < 1e-6, "mean rating {mean}");
    assert_eq!(lb["votes"], 800);
    assert_eq!(lb["bootstrap"]["skipped"], 0);
    // The same seed gives the same intervals; text output is a table.
    let (_, again, _) = common::llmlab(&[
        "eval",
        "leaderboard",
        "--votes",
        path,
        "--bootstrap",
        "200",
        "--seed",
        "3",
        "--format",
        "json",
    ])?;
    assert_eq!(json_of(&again)?, lb);
    let (code, table, err) =
        common::llmlab(&["eval", "leaderboard", "--votes", path, "--bootstrap", "10"])?;
    assert_eq!(code, 0, "{err}");
    assert!(
        table.starts_with("rank") && table.contains("llama-1b"),
        "{table}"
    );
    Ok(())
}

/// A model that won every battle has no finite Bradley–Terry rating: the command prints a
/// null rating with a note and ranks it first, never a NaN or an infinity.
#[test]
fn undefeated_model_gets_a_note() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let votes = dir.path().join("votes.jsonl");
    let v = |a: &str, b: &str, w: &str| {
        serde_json::json!({"model_a": a, "model_b": b, "winner": w}).to_string() + "\n"
    };
    let text = [
        v("champ", "x", "model_a"),
        v("y", "champ", "model_b"),
        v("x", "y", "model_a"),
        v("x", "y", "model_b"),
        v("y", "x", "tie"),
    ]
    .concat();
    std::fs::write(&votes, text)?;
    let path = votes.to_str().context("UTF-8 path")?;
    let (code, stdout, err) =
        common::llmlab(&["eval", "leaderboard", "--votes", path, "--format", "json"])?;
    assert_eq!(code, 0, "{err}");
    assert!(
        !stdout.contains("NaN") && !stdout.contains("Infinity"),
        "{stdout}"
    );
    let lb = json_of(&stdout)?;
    let top = &lb["models"][0];
    assert_eq!(
        (top["model"].as_str(), top["rank"].as_u64()),
        (Some("champ"), Some(1))
    );
    assert!(top["rating"].is_null() && top["ci_low"].is_null(), "{top}");
    assert!(
        top["note"]
            .as_str()
            .is_some_and(|n| n.contains("won every battle")),
        "{top}"
    );
    for r in &lb["models"].as_array().context("models")?[1..] {
        assert!(r["rating"].as_f64().is_some_and(f64::is_finite), "{r}");
        assert_eq!(r["rank"], 2, "{r}");
    }
    let (code, table, _) = common::llmlab(&["eval", "leaderboard", "--votes", path])?;
    assert_eq!(code, 0);
    assert!(table.contains("note: champ: won every battle"), "{table}");
    Ok(())
}

/// A vote with an unknown winner is an error naming the file, the line and the value (exit 1,
/// no panic); so is a line that is not JSON, and an empty file.
#[test]
fn bad_votes_name_the_file_and_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let votes = dir.path().join("votes.jsonl");
    std::fs::write(
        &votes,
        "{\"model_a\": \"x\", \"model_b\": \"y\", \"winner\": \"model_a\"}\n\n{\"model_a\": \"x\", \"model_b\": \"y\", \"winner\": \"draw\"}\n",
    )?;
    let path = votes.to_str().context("UTF-8 path")?;
    let (code, _, err) = common::llmlab(&["eval", "leaderboard", "--votes", path])?;
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains(path) && err.contains("line 3") && err.contains("unknown winner 'draw'"),
        "{err}"
    );
    assert!(!err.contains("panicked"), "{err}");
    std::fs::write(
        &votes,
        "{\"model_a\": \"x\", \"model_b\": \"y\", \"winner\": \"tie\"}\nnot json\n",
    )?;
    let (code, _, err) = common::llmlab(&["eval", "leaderboard", "--votes", path])?;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("line 2: not JSON"), "{err}");
    std::fs::write(&votes, "\n")?;
    let (code, _, err) = common::llmlab(&["eval", "leaderboard", "--votes", path])?;
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("no votes"), "{err}");
    Ok(())
}

/// What `llmlab eval mmlu --format json` prints and writes to `--predictions`.
fn mmlu_run(
    model: &str,
    style: &str,
    shots: usize,
    subjects: &str,
    limit: usize,
    preds: &Path,
    batch: &str,
) -> Result<(serde_json::Value, Vec<serde_json::Value>)> {
    let shots = shots.to_string();
    let limit = limit.to_string();
    let (code, out, err) = common::llmlab(&[
        "eval",
        "mmlu",
        "--model",
        model,
        "--style",
        style,
        "--shots",
        &shots,
        "--subjects",
        subjects,
        "--limit",
        &limit,
        "--batch-size",
        batch,
        "--predictions",
        preds.to_str().context("UTF-8 path")?,
        "--format",
        "json",
        "--device",
        "cpu",
    ])?;
    assert_eq!(code, 0, "{err}");
    let lines = std::fs::read_to_string(preds)?
        .lines()
        .map(json_of)
        .collect::<Result<Vec<_>>>()?;
    Ok((json_of(&out)?, lines))
}

/// `llmlab eval mmlu` against `tests/reference/hf_mmlu.py` (lm-evaluation-harness's letter
/// prompt, lighteval's cloze prompt, lm-eval's loglikelihood, transformers one question at a
/// time) on tiny random GPT-2 and Llama checkpoints: byte-equal prompts, log-likelihoods within
/// 1e-3, identical predictions and accuracies, 0 and 5 shots. The Llama uses SmolLM2's
/// tokenizer; high_school_european_history's 5-shot prompts do not fit the tiny models' 2,048
/// positions: the reference leaves them out, llmlab gives them fewer examples and counts them.
#[test]
fn mmlu_matches_lm_eval_and_lighteval_on_tiny_models() -> Result<()> {
    use llmlab::eval::mmlu::{prefix_text, query, read_split, Style};
    let dir = tempfile::tempdir()?;
    let models = dir.path().join("models");
    common::Reference::script("hf_mmlu.py")
        .arg("tiny")
        .output(&models)
        .run()?;
    let data = common::mirror().join("mmlu");
    let subjects = "abstract_algebra,high_school_european_history,world_religions";
    let mut compared = 0;
    let mut worst: f64 = 0.0;
    for (family, spec) in [("gpt2", "gpt2"), ("llama", "hf")] {
        let folder = models.join(family);
        for (style, shots) in [("letter", 0), ("letter", 5), ("cloze", 0), ("cloze", 5)] {
            let reference = json_of(
                &common::Reference::script("hf_mmlu.py")
                    .args(["score", "--model"])
                    .arg(format!("{family}:"))
                    .arg("--path")
                    .input(&folder)
                    .args([
                        "--subjects",
                        subjects,
                        "--shots",
                        &shots.to_string(),
                        "--style",
                        style,
                        "--limit",
                        "3",
                        "--data",
                    ])
                    .input(data.join("data"))
                    .run()?,
            )?;
            let preds = dir.path().join(format!("{family}-{style}-{shots}.jsonl"));
            let model = format!("{spec}:{}", folder.display());
            let (ours, lines) = mmlu_run(&model, style, shots, subjects, 3, &preds, "3")?;
            let what = format!("{family} {style} {shots}-shot");
            let refs = reference["questions"].as_array().context("questions")?;
            let skipped = reference["skipped"].as_array().context("skipped")?;
            assert_eq!(lines.len(), 9, "{what}: every question scored");
            assert_eq!(ours["n"], 9, "{what}");
            assert_eq!(
                ours["fewer_shots"].as_u64(),
                Some(skipped.len() as u64),
                "{what}: the reference's skipped questions are ours with fewer examples"
            );
            for s in skipped {
                let line = lines
                    .iter()
                    .find(|l| l["subject"] == s["subject"] && l["index"] == s["index"])
                    .context("skipped question scored")?;
                assert!(
                    line["used_shots"].as_u64() < Some(shots as u64),
                    "{what}: {line}"
                );
            }
            let st = if style == "letter" {
                Style::Letter
            } else {
                Style::Cloze
            };
            for r in refs {
                let subject = r["subject"].as_str().context("subject")?;
                let index = r["index"].as_u64().context("index")? as usize;
                let line = lines
                    .iter()
                    .find(|l| l["subject"] == subject && l["index"] == index)
                    .context("question missing")?;
                assert_eq!(line["used_shots"].as_u64(), Some(shots as u64), "{what}");
                // The same prompt, byte for byte.
                let dev = read_split(&data, subject, "dev")?;
                let test = read_split(&data, subject, "test")?;
                let prompt = prefix_text(st, subject, &dev[..shots]) + &query(st, &test[index]);
                assert_eq!(
                    prompt,
                    r["context"].as_str().context("context")?,
                    "{what}: prompt of {subject} #{index}"
                );
                assert_eq!(line["gold"], r["gold"]);
                assert_eq!(
                    line["pred"], r["pred"],
                    "{what}: {subject} #{index}: {line} vs {r}"
                );
                for j in 0..4 {
                    let (a, b) = (
                        line["loglik"][j].as_f64().context("loglik")?,
                        r["loglik"][j].as_f64().context("loglik")?,
                    );
                    worst = worst.max((a - b).abs());
                    assert!(
                        (a - b).abs() < 1e-3,
                        "{what}: {subject} #{index} choice {j}: {a} vs {b}"
                    );
                }
                compared += 1;
            }
            // Accuracy over the questions both scored.
            if skipped.is_empty() {
                for key in ["accuracy", "macro_accuracy"] {
                    let (a, b) = (
                        ours[key].as_f64().context("acc")?,
                        reference[key].as_f64().context("acc")?,
                    );
                    assert!((a - b).abs() < 1e-12, "{what}: {key} {a} vs {b}");
                }
                assert_eq!(
                    ours["categories"]["humanities"]["n"],
                    reference["categories"]["humanities"]["n"]
                );
                assert_eq!(
                    ours["categories"]["humanities"]["accuracy"],
                    reference["categories"]["humanities"]["accuracy"]
                );
            }
        }
    }
    eprintln!("{compared} questions compared, largest log-likelihood difference {worst:.2e}");
    assert!(compared >= 60, "{compared}");
    Ok(())
}

/// The same on SmolLM2-135M-Instruct's GGUF (transformers dequantizes it as llmlab does) on a
/// few questions, letter and cloze, 0-shot; and an interrupted evaluation resumes from its
/// predictions file: a second run with a larger --limit scores only the new questions and
/// reports the same figures as one run over all of them.
#[test]
fn mmlu_matches_transformers_on_smollm2_and_resumes() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let gguf = llmlab::resolve::smollm2_gguf()?;
    let data = common::mirror().join("mmlu");
    let subjects = "anatomy,high_school_mathematics";
    for style in ["letter", "cloze"] {
        let reference = json_of(
            &common::Reference::script("hf_mmlu.py")
                .args(["score", "--model"])
                .arg("gguf:")
                .arg("--path")
                .input(&gguf)
                .args([
                    "--subjects",
                    subjects,
                    "--style",
                    style,
                    "--limit",
                    "2",
                    "--data",
                ])
                .input(data.join("data"))
                .run()?,
        )?;
        let preds = dir.path().join(format!("{style}.jsonl"));
        // First one question per subject, then resume to two.
        let (first, _) = mmlu_run("smollm2-135m-instruct", style, 0, subjects, 1, &preds, "4")?;
        assert_eq!(first["n"], 2);
        let (ours, lines) = mmlu_run("smollm2-135m-instruct", style, 0, subjects, 2, &preds, "4")?;
        assert_eq!(
            lines.len(),
            4,
            "the resumed run appended only the two new questions"
        );
        for r in reference["questions"].as_array().context("questions")? {
            let line = lines
                .iter()
                .find(|l| l["subject"] == r["subject"] && l["index"] == r["index"])
                .context("question missing")?;
            assert_eq!(line["pred"], r["pred"], "{style}: {line} vs {r}");
            for j in 0..4 {
                let (a, b) = (
                    line["loglik"][j].as_f64().context("loglik")?,
                    r["loglik"][j].as_f64().context("loglik")?,
                );
                assert!(
                    (a - b).abs() < 1e-3,
                    "{style}: {} #{} choice {j}: {a} vs {b}",
                    r["subject"],
                    r["index"]
                );
            }
        }
        assert_eq!(
            ours["accuracy"].as_f64(),
            reference["accuracy"].as_f64(),
            "{style}"
        );
        // Another style into the same file is refused, naming it.
        let (code, _, err) = common::llmlab(&[
            "eval",
            "mmlu",
            "--model",
            "smollm2-135m-instruct",
            "--style",
            if style == "letter" { "cloze" } else { "letter" },
            "--subjects",
            subjects,
            "--limit",
            "1",
            "--predictions",
            preds.to_str().context("UTF-8")?,
            "--device",
            "cpu",
        ])?;
        assert_eq!(code, 2, "{err}");
        assert!(
            err.contains(&format!("{}", preds.display())) && err.contains("another --predictions"),
            "{err}"
        );
    }
    // Bad input: an unknown subject lists the valid ones.
    let (code, _, err) = common::llmlab(&[
        "eval",
        "mmlu",
        "--model",
        "smollm2-135m-instruct",
        "--subjects",
        "anatomy,astrology",
    ])?;
    assert_ne!(code, 0);
    assert!(
        err.contains("astrology") && err.contains("world_religions"),
        "{err}"
    );
    Ok(())
}

/// An `evaluate:` block on a freeze sweep and `task: eval` over its trials agree, and mean what
/// they say: each trial's MMLU and perplexity land in `evaluations.json`, its TensorBoard
/// `eval/*` scalars and the summary; the `head` trial trained only the classifier head, so its
/// language model is SmolLM2's own and scores exactly as `llmlab eval mmlu` on the base model;
/// `task: eval` with `models_from:` finds the same figures for every trial; a finished trial is
/// not trained again when the block changes, only evaluated.
#[test]
fn evaluate_block_and_eval_task_agree_on_a_freeze_sweep() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let runs = dir.path().join("runs");
    let runs_s = runs.to_str().context("UTF-8 path")?;
    let yaml = common::repo().join("experiments/freeze_sweep_eval.yaml");
    let evaluate = |limit: usize| {
        format!("evaluate=[{{mmlu: {{subjects: anatomy, style: cloze, limit: {limit}}}}}, {{perplexity: {{dataset: the-verdict, max_tokens: 300, max_length: 128}}}}]")
    };
    let run = |limit: usize| {
        common::llmlab(&[
            "run",
            yaml.to_str().expect("UTF-8 path"),
            "--runs",
            runs_s,
            "--set",
            "data.max_per_class=12",
            "--set",
            "train.epochs=1",
            "--set",
            "data.max_length=16",
            "--set",
            "sweep.finetune.trainable=[head, last_block]",
            "--set",
            &evaluate(limit),
            "--device",
            "cpu",
        ])
    };
    let (code, _, err) = run(3)?;
    assert_eq!(code, 0, "{err}");
    let exp = runs.join("freeze-sweep-eval");
    let head = exp.join("trainable-head");
    let last = exp.join("trainable-last_block");
    let results = |d: &Path| -> Result<serde_json::Value> {
        json_of(&std::fs::read_to_string(d.join("evaluations.json"))?)
    };
    let (h, l) = (results(&head)?, results(&last)?);
    assert_eq!(h["mmlu"]["n"], 3);
    assert_eq!(h["perplexity"]["text_tokens"], 300);
    // The head-only trial's language model is the base model: the same log-likelihoods.
    let base = dir.path().join("base.jsonl");
    let (_, base_lines) = mmlu_run(
        "smollm2-135m-instruct",
        "cloze",
        0,
        "anatomy",
        3,
        &base,
        "4",
    )?;
    let trial_lines: Vec<serde_json::Value> =
        std::fs::read_to_string(head.join("mmlu_predictions.jsonl"))?
            .lines()
            .map(json_of)
            .collect::<Result<_>>()?;
    for (a, b) in trial_lines.iter().zip(&base_lines) {
        assert_eq!(a["index"], b["index"]);
        for j in 0..4 {
            let (x, y) = (
                a["loglik"][j].as_f64().context("loglik")?,
                b["loglik"][j].as_f64().context("loglik")?,
            );
            assert!(
                (x - y).abs() < 1e-4,
                "head-only trial vs base model: {x} vs {y}"
            );
        }
    }
    // Training the last block moved the language model.
    assert_ne!(h["figures"]["perplexity"], l["figures"]["perplexity"]);
    let summary = std::fs::read_to_string(exp.join("summary.csv"))?;
    assert!(
        summary
            .lines()
            .next()
            .is_some_and(|h| h.contains("mmlu_accuracy") && h.contains("perplexity")),
        "{summary}"
    );
    // TensorBoard, read by the real tensorboard: each trial's eval scalars, and the HParams
    // dashboard's metrics include them.
    let tb = json_of(&common::run_reference_uncached(
        "tb_read.py",
        &[exp.to_str().context("UTF-8")?],
    )?)?;
    let scalars = &tb["runs"]["trainable-head"]["scalars"];
    let ppl = scalars["eval/perplexity"][0][1]
        .as_f64()
        .context("eval/perplexity scalar")?;
    assert!(
        (ppl - h["figures"]["perplexity"].as_f64().context("ppl")?).abs() < 1e-3 * ppl,
        "{ppl}"
    );
    assert!(
        tb["experiment"].to_string().contains("eval/mmlu_accuracy"),
        "{}",
        tb["experiment"]
    );

    // `task: eval` over the sweep's trials finds the same figures.
    let eval_yaml = dir.path().join("eval.yaml");
    std::fs::write(
        &eval_yaml,
        format!(
            "name: eval-trials\ntask: eval\nmodels_from: {}\nevaluations:\n  - mmlu: {{subjects: anatomy, style: cloze, limit: 3}}\n  - perplexity: {{dataset: the-verdict, max_tokens: 300, max_length: 128}}\n",
            exp.display()
        ),
    )?;
    let (code, _, err) = common::llmlab(&[
        "run",
        eval_yaml.to_str().context("UTF-8")?,
        "--runs",
        runs_s,
        "--device",
        "cpu",
    ])?;
    assert_eq!(code, 0, "{err}");
    let trials: Vec<_> = std::fs::read_dir(runs.join("eval-trials"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    assert_eq!(trials.len(), 2, "{trials:?}");
    for t in &trials {
        let r = results(t)?;
        let from = if t.display().to_string().contains("trainable-head") {
            &h
        } else {
            &l
        };
        for k in ["mmlu_accuracy", "perplexity"] {
            let (a, b) = (
                r["figures"][k].as_f64().context("figure")?,
                from["figures"][k].as_f64().context("figure")?,
            );
            assert!((a - b).abs() < 1e-9, "{}: {k} {a} vs {b}", t.display());
        }
        let m = common::metric_lines(t)?;
        assert_eq!(m.last().context("record")?["evaluations"], 2);
    }

    // notebooks/eval_report.ipynb runs headless on the eval experiment: MMLU per category of
    // both trials, and the leaderboard of a votes file with its intervals.
    let eval_exp = runs.join("eval-trials");
    let votes = dir.path().join("votes.jsonl");
    let vote = |a: &str, b: &str, w: &str| {
        format!("{{\"model_a\": \"{a}\", \"model_b\": \"{b}\", \"winner\": \"{w}\"}}\n")
    };
    let lines: String = (0..6)
        .map(|i| {
            vote(
                "head",
                "last_block",
                if i % 3 == 0 { "model_b" } else { "model_a" },
            )
        })
        .collect();
    std::fs::write(&votes, lines)?;
    let (code, _, err) = common::llmlab(&[
        "eval",
        "leaderboard",
        "--votes",
        votes.to_str().context("UTF-8")?,
        "--bootstrap",
        "20",
        "--format",
        "json",
        "--out",
        eval_exp
            .join("leaderboard.json")
            .to_str()
            .context("UTF-8")?,
    ])?;
    assert_eq!(code, 0, "{err}");
    let out = std::process::Command::new(common::python())
        .arg(common::repo().join("tests/reference/run_notebook.py"))
        .arg(common::repo().join("notebooks/eval_report.ipynb"))
        .arg(dir.path().join("executed.ipynb"))
        .env("LLMLAB_EXPERIMENT_DIR", &eval_exp)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("2 trials with evaluations") && stdout.contains("leaderboard: [("),
        "{stdout}"
    );
    for f in ["notebook_mmlu_by_category.png", "notebook_leaderboard.png"] {
        assert!(eval_exp.join(f).is_file(), "{f} missing");
    }

    // A changed block: the finished trials are evaluated again, not trained again.
    let status_before = std::fs::read_to_string(last.join("status.json"))?;
    let (code, out, err) = run(4)?;
    assert_eq!(code, 0, "{err}");
    assert!(
        !err.contains("finished before, skipped") && !out.contains("finished before, skipped"),
        "{err}"
    );
    assert_eq!(results(&last)?["mmlu"]["n"], 4);
    assert_eq!(
        std::fs::read_to_string(last.join("status.json"))?,
        status_before
    );
    // Unchanged: skipped.
    let (code, out, err) = run(4)?;
    assert_eq!(code, 0, "{err}");
    assert!(
        format!("{out}{err}").contains("finished before, skipped"),
        "{err}"
    );
    Ok(())
}

/// `task: eval` on a finished DPO run (it loads as an instruct run does): `rouge` answers the
/// first test entries of the book's instruction data in the run's prompt style and scores exact
/// match and ROUGE-L against the references; `judge` sends each of those responses to a stub
/// judge in `llmlab eval judge`'s prompt and averages its scores; both land in
/// `evaluations.json` and the report. A `judge` without a `rouge` before it is refused.
#[test]
fn eval_task_scores_a_dpo_runs_responses_with_rouge_and_a_judge() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let runs = dir.path().join("runs");
    let run = |name: &str, yaml: &str| common::llmlab_run(dir.path(), &runs, name, yaml);
    let (code, err) = run(
        "dpo",
        "name: dpo\ntask: dpo\nmodel: {name: gpt-mini, dropout: 0.0}\n\
         data: {max_train: 4, max_val: 2}\n\
         train: {batch_size: 2, eval_freq: 5, eval_iter: 1}\n\
         generation: {responses: false}\n",
    )?;
    assert_eq!(code, 0, "{err}");
    let replies = Arc::new(Mutex::new(vec!["70", "Score: 80"].into_iter()));
    let prompts = Arc::new(Mutex::new(Vec::new()));
    let (r, p) = (replies.clone(), prompts.clone());
    let stub = common::HttpStub::serve(move |req| {
        if req.method == "GET" {
            return common::Response::json(200, "{\"data\": []}");
        }
        p.lock().expect("lock").push(req.body_text());
        let content = r.lock().expect("lock").next().unwrap_or("50");
        let message = serde_json::json!({"role": "assistant", "content": content});
        common::Response::json(
            200,
            serde_json::json!({"choices": [{"message": message}]}).to_string(),
        )
    })?;
    let dpo_run = runs.join("dpo/base");
    let yaml = |list: &str| {
        format!(
            "name: eval-dpo\ntask: eval\nmodel: '{}'\nevaluations:\n{list}",
            dpo_run.display()
        )
    };
    let (code, err) = run(
        "judge-alone",
        &yaml(&format!("  - judge: {{url: '{}', model: m}}\n", stub.url())),
    )?;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("evaluations[0].judge") && err.contains("rouge"),
        "{err}"
    );

    let (code, err) = run(
        "eval-dpo",
        &yaml(&format!(
            "  - rouge: {{max_test: 2, max_new_tokens: 5}}\n  - judge: {{url: '{}', model: m, api: openai}}\n",
            stub.url()
        )),
    )?;
    assert_eq!(code, 0, "{err}");
    let trial = runs.join("eval-dpo/base");
    let results: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(trial.join("evaluations.json"))?)?;
    let responses: Vec<serde_json::Value> =
        serde_json::from_str(&std::fs::read_to_string(trial.join("eval_responses.json"))?)?;
    assert_eq!(responses.len(), 2);
    // The book's split: train 935, then test (the next 110), then validation.
    let book: Vec<serde_json::Value> = serde_json::from_str(&std::fs::read_to_string(
        common::mirror().join("instruction-data/instruction-data.json"),
    )?)?;
    assert_eq!(responses[0]["instruction"], book[935]["instruction"]);
    let (em, rl) =
        llmlab::metrics::score_responses(responses.iter().zip(&book[935..]).map(|(r, b)| {
            (
                r["model_response"].as_str().unwrap_or(""),
                b["output"].as_str().unwrap_or(""),
            )
        }));
    assert_eq!(results["figures"]["rouge_l"].as_f64(), Some(rl));
    assert_eq!(results["figures"]["exact_match"].as_f64(), Some(em));
    assert_eq!(results["figures"]["judge_score"].as_f64(), Some(75.0));
    let prompts = prompts.lock().expect("lock").clone();
    assert_eq!(prompts.len(), 2);
    let answer = responses[1]["model_response"].as_str().unwrap_or("");
    let expected = llmlab::eval::judge::judge_prompt(
        &llmlab::prompt::Entry::new(
            book[936]["instruction"].as_str().unwrap_or(""),
            book[936]["input"].as_str().unwrap_or(""),
            book[936]["output"].as_str().unwrap_or(""),
        ),
        answer,
    );
    let body: serde_json::Value = serde_json::from_str(&prompts[1])?;
    assert_eq!(body["messages"][0]["content"], expected.as_str());
    let (code, out, err) =
        common::llmlab(&["report", runs.join("eval-dpo").to_str().context("UTF-8")?])?;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("rouge_l") && out.contains("judge_score"),
        "{out}"
    );
    Ok(())
}

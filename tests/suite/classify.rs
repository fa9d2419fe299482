//! Classification fine-tuning (book ch06, appendix E): the SMS Spam data and its split, the
//! freezing strategies, LoRA, frozen-prefix reuse, and a short real run with SmolLM2.
use crate::common;

use anyhow::Result;
use llmlab::classify::data::{self, ClassifyDataSpec};
use llmlab::classify::model::{class_loss, Classifier, TokenPos, Trainable};
use llmlab::classify::spec::ClassifySpec;
use llmlab::classify::train::{self, ClassifyOutcome, PrefixSharing};
use llmlab::nn::lora::LoraConfig;
use llmlab::resolve::LoadedLm;
use llmlab::train::optim::{AdamW, AdamWConfig};
use std::collections::BTreeMap;
use std::path::Path;
use tch::{Device, Kind, Tensor};

fn set_mirror() {
    std::env::set_var("LLMLAB_DATA_MIRROR", common::mirror());
}

/// The SMS Spam Collection reads as Python's `csv` module reads it (quoted fields that span
/// lines included): 5,572 messages, 4,825 ham and 747 spam; the split is exactly 70/10/20 of the
/// balanced 1,494, the same for the same seed and different for another.
#[test]
fn sms_spam_reads_like_python_csv_and_splits_70_10_20() -> Result<()> {
    set_mirror();
    let spec = ClassifyDataSpec::default();
    let (examples, labels) = spec.read()?;
    assert_eq!(labels, ["ham", "spam"]);
    assert_eq!(examples.len(), 5572);
    assert_eq!(examples.iter().filter(|e| e.label == 0).count(), 4825);
    assert_eq!(examples.iter().filter(|e| e.label == 1).count(), 747);

    let file = common::mirror().join("sms-spam-collection/SMSSpamCollection");
    let out = common::Reference::code(
        "import csv,json,sys; print(json.dumps(list(csv.reader(open(sys.argv[1], newline='', encoding='utf-8'), delimiter='\\t'))))",
    )
    .input(&file)
    .run()?;
    let rows: Vec<(String, String)> = serde_json::from_str(&out)?;
    assert_eq!(rows.len(), examples.len());
    for (e, (label, text)) in examples.iter().zip(&rows) {
        assert_eq!(&e.text, text, "line {}", e.line);
        assert_eq!(labels[e.label], *label, "line {}", e.line);
    }

    let s = data::split(&examples, 2, &spec, 123);
    assert_eq!((s.train.len(), s.val.len(), s.test.len()), (1045, 149, 300));
    let all: Vec<_> = s.train.iter().chain(&s.val).chain(&s.test).collect();
    assert_eq!(all.iter().filter(|e| e.label == 0).count(), 747);
    assert_eq!(all.iter().filter(|e| e.label == 1).count(), 747);
    let mut lines: Vec<usize> = all.iter().map(|e| e.line).collect();
    lines.sort_unstable();
    lines.dedup();
    assert_eq!(lines.len(), 1494, "an example appears in two splits");
    assert_eq!(
        s,
        data::split(&examples, 2, &spec, 123),
        "same seed, same split"
    );
    let other = data::split(&examples, 2, &spec, 7);
    assert_ne!(s.train, other.train, "another seed, another split");

    let dir = tempfile::tempdir()?;
    data::write_splits(dir.path(), &s)?;
    let train_csv = std::fs::read_to_string(dir.path().join("train.csv"))?;
    assert!(train_csv.starts_with("Label,Text\n"));
    Ok(())
}

/// A missing column, an empty text and a label outside the set each name the file and line.
#[test]
fn bad_label_files_name_the_line() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let cases: &[(&str, &str, Option<Vec<&str>>, &str)] = &[
        (
            "a.csv",
            "text,kind\nhello,ham\n",
            None,
            "line 1: no column 'label'; the header has: text, kind",
        ),
        (
            "b.csv",
            "text,label\nhello,ham\n  ,spam\n",
            None,
            "line 3: empty text in 'text'",
        ),
        (
            "c.csv",
            "text,label\nhello,ham\nbuy now,eggs\n",
            Some(vec!["ham", "spam"]),
            "line 3: label 'eggs' is not one of the classes [ham, spam]",
        ),
        (
            "d.jsonl",
            "{\"text\": \"hi\", \"label\": \"ham\"}\n{\"text\": \"yo\"}\n",
            None,
            "line 2: missing key 'label'",
        ),
        (
            "e.tsv",
            "label\ttext\nham\thi\n",
            None,
            "found 1 distinct label(s)",
        ),
    ];
    for (name, body, labels, want) in cases {
        let path = dir.path().join(name);
        std::fs::write(&path, body)?;
        let spec = ClassifyDataSpec {
            dataset: None,
            path: Some(path.clone()),
            labels: labels
                .as_ref()
                .map(|l| l.iter().map(|s| s.to_string()).collect()),
            ..ClassifyDataSpec::default()
        };
        let e = format!("{:#}", spec.read().expect_err("a bad file must not read"));
        assert!(e.contains(want) && e.contains(name), "{name}: got {e}");
    }
    Ok(())
}

/// A GPT (gpt-mini) and a Llama (3 blocks) with random weights, without dropout.
fn tiny_models(dir: &Path) -> Result<Vec<(String, LoadedLm)>> {
    let llama = common::tiny_llama_yaml(dir)?;
    Ok(vec![
        ("gpt-mini".into(), LoadedLm::load("gpt-mini", Device::Cpu)?),
        ("tiny-llama".into(), LoadedLm::load(&llama, Device::Cpu)?),
    ])
}

fn snapshot(clf: &Classifier) -> BTreeMap<String, Tensor> {
    clf.lm
        .vs
        .variables()
        .into_iter()
        .map(|(n, t)| (n, t.detach().copy()))
        .collect()
}

fn batch() -> (Tensor, Tensor, Tensor) {
    let ids = Tensor::from_slice(&[15496i64, 11, 995, 13, 1148, 428, 438, 257, 1332, 30, 0, 0])
        .view([2, 6]);
    (
        ids,
        Tensor::from_slice(&[6i64, 4]),
        Tensor::from_slice(&[1i64, 0]),
    )
}

/// After one AdamW step exactly the chosen strategy's parameters changed (every other one is
/// bit-identical), and only they have optimizer state; for every strategy and both families.
#[test]
fn freezing_strategies_change_only_their_parameters() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let names = [
        "head",
        "last_layer",
        "head_and_norm",
        "last_block",
        "last_2_blocks",
        "all",
        "lora",
    ];
    for (family, _) in tiny_models(dir.path())? {
        for name in names {
            let strategy = Trainable::parse(name).expect("known strategy");
            let lm = if family == "gpt-mini" {
                LoadedLm::load("gpt-mini", Device::Cpu)?
            } else {
                LoadedLm::load(&common::tiny_llama_yaml(dir.path())?, Device::Cpu)?
            };
            let mut clf = Classifier::new(lm, 2, TokenPos::Flexible);
            clf.set_dropout(0.0);
            if strategy == Trainable::Lora {
                clf.add_lora(&LoraConfig::default());
            }
            let n = clf.n_layers();
            let trained = clf.set_trainable(strategy);
            let before = snapshot(&clf);
            let expected = |v: &str| -> bool {
                let block = v
                    .strip_prefix("trf_blocks.")
                    .and_then(|r| r.split('.').next())
                    .and_then(|i| i.parse::<usize>().ok());
                v.starts_with("cls_head.")
                    || match name {
                        // The book's `last_layer`: the new head alone.
                        "head" | "last_layer" => false,
                        "head_and_norm" => v.starts_with("final_norm."),
                        "last_block" => v.starts_with("final_norm.") || block == Some(n - 1),
                        "last_2_blocks" => {
                            v.starts_with("final_norm.") || block.is_some_and(|b| b >= n - 2)
                        }
                        "all" => !v.starts_with("out_head."), // replaced by cls_head: unused
                        _ => v.starts_with("final_norm.") || v.contains(".lora_"),
                    }
            };
            let want: Vec<String> = before.keys().filter(|k| expected(k)).cloned().collect();
            let got: Vec<String> = trained.iter().map(|(n, _)| n.clone()).collect();
            assert_eq!(got, want, "{family} {name}: trained set");
            let mut opt = AdamW::new(trained, AdamWConfig::default());
            assert_eq!(
                opt.state_tensors().len(),
                2 * want.len(),
                "{family} {name}: optimizer state"
            );
            let (ids, lens, ys) = batch();
            let loss = class_loss(&clf.logits(&ids, &lens, true), &ys, -100);
            loss.backward();
            opt.step(1e-3);
            for (k, old) in &before {
                let now = clf.lm.vs.variables()[k].detach();
                let same = now.equal(old);
                if want.contains(k) {
                    assert!(!same, "{family} {name}: trained {k} did not change");
                } else {
                    assert!(same, "{family} {name}: frozen {k} changed");
                }
            }
        }
    }
    Ok(())
}

/// A fresh adapter (B = 0) leaves the outputs exactly as they were; with a non-zero B, merging
/// the adapters into the weights gives the unmerged model's logits.
#[test]
fn lora_starts_as_identity_and_merges_exactly() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (ids, lens, _) = batch();
    for (family, lm) in tiny_models(dir.path())? {
        let mut clf = Classifier::new(lm, 3, TokenPos::Last);
        clf.set_dropout(0.0);
        let plain = clf.logits(&ids, &lens, false);
        clf.add_lora(&LoraConfig {
            rank: 4,
            alpha: 8.0,
            ..LoraConfig::default()
        });
        let fresh = clf.logits(&ids, &lens, false);
        assert!(fresh.equal(&plain), "{family}: B = 0 changed the outputs");
        tch::manual_seed(3);
        {
            let _g = tch::no_grad_guard();
            for (name, t) in clf.lm.vs.variables() {
                if name.ends_with(".lora_B") {
                    t.shallow_clone()
                        .copy_(&(Tensor::randn(t.size(), (Kind::Float, Device::Cpu)) * 0.02));
                }
            }
        }
        let adapted = clf.logits(&ids, &lens, false);
        let diff = (&adapted - &plain).abs().max().double_value(&[]);
        assert!(
            diff > 1e-3,
            "{family}: the adapters have no effect ({diff})"
        );
        clf.merge_lora();
        let merged = clf.logits(&ids, &lens, false);
        common::assert_close(
            &merged,
            &adapted,
            2e-5,
            1e-4,
            &format!("{family} merged vs unmerged"),
        )?;
    }
    Ok(())
}

fn small_spec(model: &str, trainable: &str, reuse: bool) -> Result<ClassifySpec> {
    Ok(ClassifySpec::from_yaml(
        &format!(
            "name: t\ntask: classify\nseed: 5\nmodel: {{name: '{model}', dropout: 0.0}}\ndata: {{dataset: sms-spam-collection, max_per_class: 24, max_length: 24}}\nfinetune: {{trainable: {trainable}, token: flexible, reuse_frozen: {reuse}}}\ntrain: {{epochs: 2, batch_size: 4, lr: 1.0e-3, eval_freq: 3, eval_iter: 2}}\n"
        ),
        "test",
    )?)
}

/// Computing the frozen blocks once and reusing them gives the plain path's losses and
/// accuracies (same examples, same order; only float summation order may differ), for both
/// families; the shared cache serves a second trial.
#[test]
fn frozen_prefix_reuse_matches_the_plain_path() -> Result<()> {
    set_mirror();
    let dir = tempfile::tempdir()?;
    let llama = common::tiny_llama_yaml(dir.path())?;
    for model in ["gpt-mini", llama.as_str()] {
        let mut runs = Vec::new();
        for reuse in [false, true] {
            let spec = small_spec(model, "last_block", reuse)?;
            let out = dir.path().join(format!("{}-{reuse}", runs.len()));
            let sharing = PrefixSharing {
                dir: reuse.then(|| dir.path().join("cache")),
                from_end: vec![1, 0],
            };
            let r = train::run(&spec, &out, Device::Cpu, true, &sharing, &mut |_: &str| {})?;
            assert_eq!(r.result.reused_frozen, reuse);
            runs.push(common::metric_lines(&out)?);
        }
        assert_eq!(runs[0].len(), runs[1].len());
        for (a, b) in runs[0].iter().zip(&runs[1]) {
            for key in [
                "train_loss",
                "val_loss",
                "train_accuracy",
                "val_accuracy",
                "test_loss",
                "test_accuracy",
            ] {
                if let (Some(x), Some(y)) = (a[key].as_f64(), b[key].as_f64()) {
                    assert!(
                        (x - y).abs() < 1e-5,
                        "{model} {key}: plain {x} vs reused {y}"
                    );
                }
            }
        }
        // The head-only trial finds its prefix (after the last block) in the shared cache.
        let mut logs = Vec::new();
        let spec = small_spec(model, "head", true)?;
        let sharing = PrefixSharing {
            dir: Some(dir.path().join("cache")),
            from_end: vec![1, 0],
        };
        train::run(
            &spec,
            &dir.path().join("head"),
            Device::Cpu,
            true,
            &sharing,
            &mut |m: &str| logs.push(m.to_string()),
        )?;
        assert!(
            logs.iter().any(|l| l.contains("reused from")),
            "{model}: {logs:?}"
        );
        std::fs::remove_dir_all(dir.path().join("cache"))?;
    }
    Ok(())
}

/// Trials of a `--jobs` sweep that share frozen blocks start together: one computes the prefix,
/// the other waits for its files (`<cache>/.computing` names the computing process) and reuses
/// them. A lock left by a process that is gone is taken over.
#[test]
fn concurrent_trials_compute_a_shared_prefix_once() -> Result<()> {
    set_mirror();
    let dir = tempfile::tempdir()?;
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache)?;
    std::fs::write(cache.join(".computing"), "4194304999")?; // no such process
    let logs: Vec<Vec<String>> = std::thread::scope(|s| {
        let handles: Vec<_> = ["last_block", "last_2_blocks"]
            .into_iter()
            .map(|trainable| {
                let (cache, out) = (cache.clone(), dir.path().join(trainable));
                s.spawn(move || -> Result<Vec<String>> {
                    let spec = small_spec("gpt-mini", trainable, true)?;
                    let sharing = PrefixSharing {
                        dir: Some(cache),
                        from_end: vec![1, 2],
                    };
                    let mut logs = Vec::new();
                    train::run(&spec, &out, Device::Cpu, true, &sharing, &mut |m: &str| {
                        logs.push(m.to_string())
                    })?;
                    Ok(logs)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("trial thread"))
            .collect::<Result<_>>()
    })?;
    let all: Vec<&String> = logs.iter().flatten().collect();
    let computed = all
        .iter()
        .filter(|l| l.contains("outputs computed once"))
        .count();
    let reused = all
        .iter()
        .filter(|l| l.contains("outputs reused from"))
        .count();
    assert_eq!((computed, reused), (1, 1), "{logs:?}");
    assert!(!cache.join(".computing").exists(), "the lock is released");
    Ok(())
}

/// A trial waiting for a live holder (no timeout: a prefix can take half an hour) names the lock
/// file to delete if that holder hangs; deleting it lets the trial compute the prefix itself.
#[test]
fn deleting_a_held_prefix_lock_ends_the_wait() -> Result<()> {
    set_mirror();
    let dir = tempfile::tempdir()?;
    let cache = dir.path().join("cache");
    std::fs::create_dir_all(&cache)?;
    let lock = cache.join(".computing");
    std::fs::write(&lock, std::process::id().to_string())?; // a live holder: this process
    let spec = small_spec("gpt-mini", "last_block", true)?;
    let sharing = PrefixSharing {
        dir: Some(cache.clone()),
        from_end: vec![1],
    };
    let mut logs = Vec::new();
    train::run(
        &spec,
        &dir.path().join("r"),
        Device::Cpu,
        true,
        &sharing,
        &mut |m: &str| {
            if m.contains("waiting for process") {
                std::fs::remove_file(&lock).expect("the lock file exists while waited for");
            }
            logs.push(m.to_string())
        },
    )?;
    let waiting: Vec<&String> = logs
        .iter()
        .filter(|l| l.contains("waiting for process"))
        .collect();
    assert_eq!(waiting.len(), 1, "{logs:?}");
    assert!(
        waiting[0].contains(&format!("process {}", std::process::id()))
            && waiting[0].contains(&format!("delete {}", lock.display())),
        "{}",
        waiting[0]
    );
    assert!(
        logs.iter().any(|l| l.contains("outputs computed once")),
        "{logs:?}"
    );
    assert!(!lock.exists(), "the lock is released");
    Ok(())
}

/// SmolLM2-135M-Instruct with a new head on mean-pooled hidden states, trained on 40 balanced
/// messages: validation accuracy at least 80 %. The classes are balanced, so the majority class
/// gives 50 %; on 20 validation messages, chance stays below 80 % with probability > 99.5 %.
/// Then `llmlab classify` labels a clear spam and a clear ham message with the saved model.
#[test]
fn smollm2_spam_classifier_end_to_end() -> Result<()> {
    set_mirror();
    let dir = tempfile::tempdir()?;
    let spec = ClassifySpec::from_yaml(
        "name: e2e\ntask: classify\nmodel: {name: smollm2-135m-instruct}\ndata: {dataset: sms-spam-collection, max_per_class: 40, max_length: 32, split: [0.5, 0.25, 0.25]}\nfinetune: {trainable: head, token: mean}\ntrain: {epochs: 3, batch_size: 8, lr: 1.0e-3, eval_freq: 5, eval_iter: 2}\n",
        "test",
    )?;
    let run = dir.path().join("run");
    let r = train::run(
        &spec,
        &run,
        Device::Cpu,
        false,
        &PrefixSharing::default(),
        &mut |_: &str| {},
    )?;
    assert!(
        r.result.val_accuracy >= 0.8,
        "validation accuracy {}",
        r.result.val_accuracy
    );
    for f in [
        "saved_model.json",
        "saved_model.safetensors",
        "train.csv",
        "validation.csv",
        "test.csv",
        "accuracy.png",
        "loss.png",
    ] {
        assert!(run.join(f).is_file(), "{f} missing");
    }
    // Only the trained tensors are saved (head + nothing else for `head`).
    let saved = common::read_tensors(&run.join("saved_model.safetensors"))?;
    assert_eq!(
        saved.keys().collect::<Vec<_>>(),
        ["cls_head.bias", "cls_head.weight"]
    );

    let spam = "WINNER!! You have been selected to receive a £900 prize reward! To claim call 09061701461. Claim code KL341.";
    let ham = "Ok, I'll see you at home after work. Do you want me to pick up some bread?";
    let args = [
        "classify",
        "--model",
        run.to_str().expect("UTF-8 path"),
        "--text",
        spam,
        "--text",
        ham,
        "--format",
        "json",
        "--device",
        "cpu",
    ];
    let (code, out, err) = common::llmlab(&args)?;
    assert_eq!(code, 0, "{err}");
    let lines: Vec<serde_json::Value> = out
        .lines()
        .map(serde_json::from_str)
        .collect::<Result<_, _>>()?;
    assert_eq!(lines.len(), 2);
    assert_eq!(lines[0]["text"], spam);
    assert_eq!(lines[0]["label"], "spam", "{out}");
    assert_eq!(lines[1]["label"], "ham", "{out}");
    for l in &lines {
        let p = l["probability"].as_f64().expect("a probability");
        assert!((0.5..=1.0).contains(&p), "{l}");
    }
    // The same run folder in the layout of earlier llmlab versions (`classifier.json` +
    // `classifier.safetensors`) gives the same labels and probabilities.
    let rec: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(run.join("saved_model.json"))?)?;
    let mut legacy = serde_json::Map::new();
    for k in [
        "base_model",
        "weights",
        "labels",
        "token",
        "causal_mask",
        "trainable",
        "method",
        "lora",
        "pad_to",
        "max_length",
        "pad_id",
        "full",
    ] {
        legacy.insert(k.into(), rec[k].clone());
    }
    std::fs::write(run.join("classifier.json"), serde_json::to_string(&legacy)?)?;
    std::fs::remove_file(run.join("saved_model.json"))?;
    std::fs::rename(
        run.join("saved_model.safetensors"),
        run.join("classifier.safetensors"),
    )?;
    let (code, legacy_out, err) = common::llmlab(&args)?;
    assert_eq!(code, 0, "{err}");
    assert_eq!(legacy_out, out);
    // A classifier is not a language model: generate says what the folder is.
    let (code, _, err) = common::llmlab(&[
        "generate",
        "--model",
        run.to_str().expect("UTF-8 path"),
        "--prompt",
        "x",
    ])?;
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("a classifier (task: classify)"), "{err}");
    let (code, _, err) = common::llmlab(&[
        "classify",
        "--model",
        dir.path().to_str().expect("UTF-8 path"),
        "--text",
        "x",
    ])?;
    assert_eq!(code, 1);
    assert!(err.contains("saved_model.json"), "{err}");
    Ok(())
}

/// notebooks/freeze_sweep.ipynb runs headless on a tiny freeze sweep: it reads the summary CSV
/// and the TensorBoard scalars of all five trials and writes its two plots.
#[test]
fn freeze_sweep_notebook_runs_on_a_tiny_sweep() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let runs = dir.path().join("runs");
    let yaml = common::repo().join("experiments/freeze_sweep.yaml");
    let (code, _, err) = common::llmlab(&[
        "run",
        yaml.to_str().expect("UTF-8 path"),
        "--runs",
        runs.to_str().expect("UTF-8 path"),
        "--set",
        "data.max_per_class=12",
        "--set",
        "train.epochs=1",
        "--set",
        "train.eval_freq=1",
        "--set",
        "data.max_length=16",
    ])?;
    assert_eq!(code, 0, "{err}");
    let exp = runs.join("freeze-sweep");
    let out = std::process::Command::new(common::python())
        .arg(common::repo().join("tests/reference/run_notebook.py"))
        .arg(common::repo().join("notebooks/freeze_sweep.ipynb"))
        .arg(dir.path().join("executed.ipynb"))
        .env("LLMLAB_EXPERIMENT_DIR", &exp)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("5 trials"), "{stdout}");
    for t in [
        "head",
        "head_and_norm",
        "last_block",
        "last_2_blocks",
        "last_3_blocks",
    ] {
        assert!(
            stdout.contains(&format!("'{t}': ")),
            "{t} missing: {stdout}"
        );
    }
    for f in [
        "notebook_accuracy_by_trainable.png",
        "notebook_val_accuracy_curves.png",
    ] {
        assert!(exp.join(f).is_file(), "{f} missing");
    }
    Ok(())
}

/// What a resumed classification run must reproduce, line by line.
const CLASSIFY_KEYS: &[&str] = &[
    "step",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "test_accuracy",
];

/// A run stopped by Ctrl-C mid-epoch (checkpoint at the stop) and resumed ends with the same
/// metrics as an uninterrupted run, with and without frozen-prefix reuse and with dropout.
#[test]
fn interrupted_classification_resumes_to_the_same_result() -> Result<()> {
    set_mirror();
    let dir = tempfile::tempdir()?;
    for (trainable, dropout) in [("last_block", 0.0), ("last_2_blocks", 0.1)] {
        let mut spec = small_spec("gpt-mini", trainable, true)?;
        spec.model.dropout = Some(dropout);
        let sharing = PrefixSharing {
            dir: Some(dir.path().join("cache")),
            from_end: vec![1, 2],
        };
        let whole = dir.path().join(format!("whole-{trainable}"));
        train::run(
            &spec,
            &whole,
            Device::Cpu,
            true,
            &sharing,
            &mut |_: &str| {},
        )?;
        let parts = dir.path().join(format!("parts-{trainable}"));
        llmlab::signal::reset();
        let e = train::run(
            &spec,
            &parts,
            Device::Cpu,
            true,
            &sharing,
            &mut common::StopAt(4),
        )
        .expect_err("stopped at step 4");
        llmlab::signal::reset();
        assert!(format!("{e}").contains("interrupted at step 4"), "{e}");
        let mut logs = Vec::new();
        train::run(
            &spec,
            &parts,
            Device::Cpu,
            false,
            &sharing,
            &mut |m: &str| logs.push(m.to_string()),
        )?;
        assert!(
            logs.iter().any(|l| l.contains("resuming at step 4")),
            "{logs:?}"
        );
        common::assert_same_metrics(&whole, &parts, CLASSIFY_KEYS, trainable)?;
    }
    Ok(())
}

/// A diverging fine-tuning run stops at the first step whose loss is not finite, with an error
/// that says what to change, instead of training on NaN.
#[test]
fn a_diverging_classification_stops_with_a_clear_error() -> Result<()> {
    set_mirror();
    let dir = tempfile::tempdir()?;
    let mut spec = small_spec("gpt-mini", "all", false)?;
    spec.train.lr = 1e30;
    let e = train::run(
        &spec,
        &dir.path().join("r"),
        Device::Cpu,
        true,
        &PrefixSharing::default(),
        &mut |_: &str| {},
    )
    .expect_err("a step of 1e30 diverges");
    let msg = format!("{e}");
    assert!(
        msg.contains("training loss became") && msg.contains("at step 2 (epoch 1)"),
        "{msg}"
    );
    assert!(msg.contains("lower train.lr"), "{msg}");
    Ok(())
}

/// Copies the files of `from` (recursively) into `to`.
fn copy_tree(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(to)?;
    for e in std::fs::read_dir(from)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            copy_tree(&e.path(), &to.join(e.file_name()))?;
        } else {
            std::fs::copy(e.path(), to.join(e.file_name()))?;
        }
    }
    Ok(())
}

/// At optimizer step `at`, copies the run folder as it is on disk then: what a process killed
/// at that moment (SIGKILL, no chance to save) leaves behind.
struct SnapshotAt<'a> {
    at: usize,
    run: &'a Path,
    to: &'a Path,
}

impl llmlab::train::trainer::TrainEvents for SnapshotAt<'_> {
    fn log(&mut self, _msg: &str) {}
    fn step(&mut self, step: usize, _loss: f64) {
        if step == self.at {
            copy_tree(self.run, self.to).expect("snapshot of the run folder");
        }
    }
}

/// Timed checkpoints (`llmlab run --checkpoint-minutes`): a run killed mid-epoch without a stop
/// signal left a checkpoint from inside the epoch, and resuming from the folder it left gives
/// the uninterrupted run's metrics, with its training time carried over.
#[test]
fn a_run_killed_mid_epoch_resumes_from_its_timed_checkpoint() -> Result<()> {
    set_mirror();
    let dir = tempfile::tempdir()?;
    let spec = small_spec("gpt-mini", "last_2_blocks", false)?;
    let sharing = PrefixSharing {
        dir: None,
        from_end: vec![],
    };
    let whole = dir.path().join("whole");
    train::run(
        &spec,
        &whole,
        Device::Cpu,
        true,
        &sharing,
        &mut |_: &str| {},
    )?;
    let (run, killed) = (dir.path().join("run"), dir.path().join("killed"));
    // A checkpoint after every step (the interval is one millisecond).
    llmlab::finetune::set_checkpoint_minutes(1e-6);
    let r = train::run(
        &spec,
        &run,
        Device::Cpu,
        true,
        &sharing,
        &mut SnapshotAt {
            at: 6,
            run: &run,
            to: &killed,
        },
    );
    llmlab::finetune::set_checkpoint_minutes(llmlab::finetune::DEFAULT_CHECKPOINT_MINUTES);
    r?;
    let state: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        killed.join("checkpoints/last/state.json"),
    )?)?;
    assert_eq!(state["format"], 2, "a versioned checkpoint: {state}");
    let at = state["state"]["step"].as_u64().expect("step") as usize;
    let steps_per_epoch = common::metric_lines(&whole)?
        .iter()
        .find_map(|l| (l["epoch"] == 2).then(|| l["step"].as_u64()))
        .flatten()
        .expect("an evaluation in epoch 2") as usize;
    assert!(
        (1..6).contains(&at) && at < steps_per_epoch,
        "a checkpoint inside epoch 1 (steps per epoch >= {steps_per_epoch}), not {state}"
    );
    let seconds_before = state["state"]["train_seconds"]
        .as_f64()
        .expect("train_seconds");
    assert!(seconds_before > 0.0);
    assert!(!killed.join("status.json").exists());
    let corrupt = dir.path().join("corrupt");
    copy_tree(&killed, &corrupt)?;
    // The same checkpoint as llmlab wrote it before format 2: `[state, step]` with the task's
    // own counter name, no manifest.
    let legacy = dir.path().join("legacy");
    copy_tree(&killed, &legacy)?;
    let s = &state["state"];
    let old_state = serde_json::json!([{
        "step": s["step"], "epoch": s["epoch"], "next_group": s["next_group"],
        "examples_seen": s["seen"], "train_seconds": s["train_seconds"],
    }, state["step"]]);
    let ck = legacy.join("checkpoints");
    std::fs::write(ck.join("last/state.json"), old_state.to_string())?;
    std::fs::remove_file(ck.join("last/manifest.json"))?;
    std::fs::remove_dir_all(ck.join("previous"))?;
    // Resumes a folder, checks the log says where from and the metrics are the whole run's.
    let resume = |run: &Path, from: usize, what: &str| -> Result<(ClassifyOutcome, Vec<String>)> {
        let mut logs = Vec::new();
        let out = train::run(&spec, run, Device::Cpu, false, &sharing, &mut |m: &str| {
            logs.push(m.to_string())
        })?;
        let line = format!("resuming at step {from}");
        assert!(logs.iter().any(|l| l.contains(&line)), "{what}: {logs:?}");
        common::assert_same_metrics(&whole, run, CLASSIFY_KEYS, what)?;
        Ok((out, logs))
    };
    let (resumed, _) = resume(&killed, at, "killed and resumed")?;
    assert!(resumed.result.train_seconds > seconds_before);

    // The newest checkpoint cut short (a full disk, a copy broken off): the resume says so,
    // uses the one before it, and still ends on the uninterrupted metrics.
    let tensors = corrupt.join("checkpoints/last/trainable.safetensors");
    let bytes = std::fs::read(&tensors)?;
    std::fs::write(&tensors, &bytes[..bytes.len() / 2])?;
    let previous: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        corrupt.join("checkpoints/previous/state.json"),
    )?)?;
    let before = previous["state"]["step"].as_u64().expect("step") as usize;
    assert!(before < at, "previous {before}, last {at}");
    let (_, logs) = resume(&corrupt, before, "resumed from the previous")?;
    assert!(
        logs.iter()
            .any(|l| l.contains("checkpoints/last is unusable")
                && l.contains("trainable.safetensors has")
                && l.contains("trying the previous one")),
        "{logs:?}"
    );

    // A format-1 checkpoint (before versions and manifests) still resumes.
    resume(&legacy, at, "resumed from format 1")?;
    Ok(())
}

/// The reference's head (`head.weight`, `head.bias`) copied into the classifier's new head.
fn copy_head(clf: &mut Classifier, r: &BTreeMap<String, Tensor>) {
    tch::no_grad(|| {
        clf.head.ws.copy_(&r["head.weight"]);
        if let Some(b) = &mut clf.head.bs {
            b.copy_(&r["head.bias"]);
        }
    });
}

/// Trains `trained` as the reference did (AdamW, lr 1e-3, weight decay 0.1, one step per
/// reference loss on its `ids`/`lens`/`labels`) and checks the class logits before, each step's
/// loss and the logits after against it; returns the logits after.
fn steps_match_reference(
    clf: &Classifier,
    trained: &[(String, Tensor)],
    r: &BTreeMap<String, Tensor>,
    what: &str,
) -> Result<Tensor> {
    let mut opt = AdamW::over(trained, 0.1);
    let (ids, lens, labels) = (&r["ids"], &r["lens"], &r["labels"]);
    let before = tch::no_grad(|| clf.logits(ids, lens, false));
    common::assert_close(&before, &r["before"], 1e-5, 1e-4, &format!("{what} logits"))?;
    for (step, want) in Vec::<f64>::try_from(&r["losses"])?.iter().enumerate() {
        opt.zero_grad();
        let loss = class_loss(&clf.logits(ids, lens, true), labels, -100);
        let got = loss.double_value(&[]);
        assert!(
            (got - want).abs() < 1e-5,
            "{what} step {}: loss {got} vs the reference's {want}",
            step + 1
        );
        loss.backward();
        opt.step(1e-3);
    }
    let after = tch::no_grad(|| clf.logits(ids, lens, false));
    assert!(
        (&after - &before).abs().max().double_value(&[]) > 5e-3,
        "{what}: training moved the logits"
    );
    common::assert_close(
        &after,
        &r["after"],
        1e-4,
        1e-3,
        &format!("{what} logits after the steps"),
    )?;
    Ok(after)
}

/// Parity with PyTorch + transformers on the book's recipe (tests/reference/hf_classify.py): a
/// tiny random GPT-2 saved by transformers (tied embeddings, as GPT-2), a new 2-class head with
/// bias, the chosen strategy trained with the final norm, torch.optim.AdamW with weight decay on
/// every trained tensor. For `last_block`, `all` and `head` and the `last`, `flexible` and `mean`
/// tokens, the class logits before training, the loss of each of 3 steps and the logits after
/// them equal PyTorch's.
#[test]
fn classification_steps_match_pytorch_and_transformers() -> Result<()> {
    let dir = tempfile::tempdir()?;
    common::Reference::script("hf_classify.py")
        .output(dir.path())
        .run()?;
    let spec = format!("gpt2:{}", dir.path().join("model").display());
    for trainable in ["last_block", "all", "head"] {
        for token in ["last", "flexible", "mean"] {
            let what = format!("{trainable}/{token}");
            let r =
                common::read_tensors(&dir.path().join(format!("{trainable}-{token}.safetensors")))?;
            let pos = match token {
                "last" => TokenPos::Last,
                "flexible" => TokenPos::Flexible,
                _ => TokenPos::Mean,
            };
            let mut clf = Classifier::new(LoadedLm::load(&spec, Device::Cpu)?, 2, pos);
            clf.set_dropout(0.0);
            copy_head(&mut clf, &r);
            let trained = clf.set_trainable(Trainable::parse(trainable).expect("strategy"));
            let _after = steps_match_reference(&clf, &trained, &r, &what)?;
        }
    }
    Ok(())
}

/// LoRA parity with Hugging Face PEFT (tests/reference/hf_classify.py --lora): a tiny random
/// Llama (GQA, tied embeddings) saved by transformers, PEFT adapters of rank 4 and alpha 8 on
/// q/k/v/o and gate/up/down (llmlab: `scale: alpha_over_rank`, PEFT's scaling) starting from
/// PEFT's own initial A (B = 0), trained with the final norm and a new head by
/// torch.optim.AdamW: the losses of 3 steps and the logits after them equal PyTorch's, before
/// and after the adapters are merged into the weights; for the `last` and `flexible` tokens.
#[test]
fn lora_classification_steps_match_peft() -> Result<()> {
    let dir = tempfile::tempdir()?;
    common::Reference::script("hf_classify.py")
        .output(dir.path())
        .arg("--lora")
        .run()?;
    let spec = format!("hf:{}", dir.path().join("model").display());
    for token in ["last", "flexible"] {
        let r = common::read_tensors(&dir.path().join(format!("lora-{token}.safetensors")))?;
        let pos = if token == "last" {
            TokenPos::Last
        } else {
            TokenPos::Flexible
        };
        let mut clf = Classifier::new(LoadedLm::load(&spec, Device::Cpu)?, 2, pos);
        clf.set_dropout(0.0);
        clf.add_lora(&LoraConfig {
            rank: 4,
            alpha: 8.0,
            scale: llmlab::nn::lora::LoraScale::AlphaOverRank,
            ..LoraConfig::default()
        });
        let vars = clf.lm.vs.variables();
        let mut copied = 0;
        copy_head(&mut clf, &r);
        tch::no_grad(|| -> Result<()> {
            for (name, init) in r
                .iter()
                .filter_map(|(k, v)| Some((k.strip_prefix("init.")?, v)))
            {
                let mut v = vars
                    .get(name)
                    .ok_or_else(|| anyhow::anyhow!("llmlab has no adapter {name}"))?
                    .shallow_clone();
                assert_eq!(v.size(), init.size(), "{name}");
                v.copy_(init);
                copied += 1;
            }
            Ok(())
        })?;
        let adapters = vars.keys().filter(|k| k.contains(".lora_")).count();
        assert_eq!((copied, adapters), (28, 28), "2 blocks x 7 layers x (A, B)");
        let trained = clf.set_trainable(Trainable::Lora);
        let after = steps_match_reference(&clf, &trained, &r, token)?;
        clf.merge_lora();
        let merged = tch::no_grad(|| clf.logits(&r["ids"], &r["lens"], false));
        common::assert_close(&merged, &after, 1e-5, 1e-4, &format!("{token} merged"))?;
    }
    Ok(())
}

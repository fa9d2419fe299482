//! Experiment files: sweep expansion (grid and zip), `extends`, `--set`, slugs, and strict
//! validation with file/line/column errors; `llmlab run` skipping finished trials.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report
use crate::common;

use anyhow::Result;
use llmlab::experiment::{prepare::prepare, Experiment};
use llmlab::train::PretrainSpec;
use std::path::Path;

const BASE: &str = "name: t
task: pretrain
model:
  preset: gpt-mini
  overrides: {context_length: 32}
data: {dataset: the-verdict}
train:
  epochs: 1
  batch_size: 2
  lr: 1.0e-3
  eval_freq: 5
  eval_iter: 1
";

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn slugs(exp: &Experiment) -> Vec<String> {
    exp.trials().unwrap().into_iter().map(|t| t.slug).collect()
}

#[test]
fn grid_zip_extends_set_and_slugs() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let grid = write(
        dir.path(),
        "grid.yaml",
        &format!("{BASE}sweep:\n  train.lr: [1.0e-3, 4.0e-4]\n  seed: [1, 2, 3]\n"),
    );
    let exp = Experiment::load(&grid, &[])?;
    assert_eq!(exp.name, "t");
    assert_eq!(
        slugs(&exp),
        [
            "lr-0.001_seed-1",
            "lr-0.001_seed-2",
            "lr-0.001_seed-3",
            "lr-0.0004_seed-1",
            "lr-0.0004_seed-2",
            "lr-0.0004_seed-3"
        ]
    );
    // Stable: loading again gives the same slugs, and each trial has its values.
    assert_eq!(slugs(&Experiment::load(&grid, &[])?), slugs(&exp));
    let trials = prepare(&exp)?;
    let Some(spec) = trials[4].1.spec::<PretrainSpec>() else {
        panic!("a pretrain trial")
    };
    assert_eq!((spec.train.lr, spec.seed), (4.0e-4, 2));
    assert_eq!(spec.model.overrides.context_length, Some(32));

    let zip = write(
        dir.path(),
        "zip.yaml",
        &format!("{BASE}sweep:\n  mode: zip\n  axes:\n    train.lr: [1.0e-3, 4.0e-4]\n    seed: [1, 2]\n"),
    );
    assert_eq!(
        slugs(&Experiment::load(&zip, &[])?),
        ["lr-0.001_seed-1", "lr-0.0004_seed-2"]
    );

    // Two axes with the same last segment keep their whole key in the slug.
    let clash = write(
        dir.path(),
        "clash.yaml",
        &format!("{BASE}sweep:\n  train.lr: [0.001]\n  model.lr: [2]\n"),
    );
    assert_eq!(
        slugs(&Experiment::load(&clash, &[])?),
        ["train.lr-0.001_model.lr-2"]
    );

    // extends: the child's keys win, maps merge key by key.
    write(dir.path(), "base.yaml", BASE);
    let child = write(
        dir.path(),
        "child.yaml",
        "extends: base.yaml\nname: child\ntrain: {lr: 5.0e-4}\nsweep: {model.overrides.drop_rate: [0.0, 0.1]}\n",
    );
    let exp = Experiment::load(&child, &["train.epochs=3".into(), "seed=7".into()])?;
    assert_eq!(exp.name, "child");
    assert_eq!(slugs(&exp), ["drop_rate-0.0", "drop_rate-0.1"]);
    let trials = prepare(&exp)?;
    let Some(spec) = trials[1].1.spec::<PretrainSpec>() else {
        panic!("a pretrain trial")
    };
    assert_eq!(spec.train.lr, 5.0e-4);
    assert_eq!(spec.train.batch_size, 2);
    assert_eq!(spec.train.epochs, 3);
    assert_eq!(spec.seed, 7);
    assert_eq!(spec.model.overrides.drop_rate, Some(0.1));
    assert_eq!(spec.model.overrides.context_length, Some(32));

    // --set replaces a sweep axis with sweep.KEY=[...].
    let exp = Experiment::load(&grid, &["sweep.seed=[9]".into()])?;
    assert_eq!(slugs(&exp), ["lr-0.001_seed-9", "lr-0.0004_seed-9"]);
    // Without a sweep there is one trial, "base".
    let plain = write(dir.path(), "plain.yaml", BASE);
    assert_eq!(slugs(&Experiment::load(&plain, &[])?), ["base"]);
    Ok(())
}

/// Bad files, each with the exact error it must give (file:line:column, key, what is accepted).
#[test]
fn validation_errors_name_file_line_key_and_choices() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let d = dir.path().display().to_string();
    let cases: Vec<(&str, String, Vec<&str>, String)> = vec![
        (
            "typo",
            BASE.replace("  lr: 1.0e-3", "  lrr: 1.0e-3"),
            vec![],
            format!("invalid config {d}/typo.yaml:10:3: train.lrr: unknown field `lrr`, expected one of `epochs`, `batch_size`, `lr`, `weight_decay`, `betas`, `eps`, `eval_freq`, `eval_iter`, `grad_accum_steps`, `max_grad_norm`, `schedule`, `checkpoint_every`, `keep_checkpoints`, `threads`, `precision`, `fused_adamw`, `nproc`"),
        ),
        (
            "type",
            BASE.replace("batch_size: 2", "batch_size: two"),
            vec![],
            format!("invalid config {d}/type.yaml:9:3: train.batch_size: invalid type: string \"two\", expected usize"),
        ),
        (
            "range",
            format!("{BASE}sweep:\n  model.overrides.drop_rate: [0.1, 1.5]\n"),
            vec![],
            format!("invalid config {d}/range.yaml:14:3 (sweep, trial drop_rate-1.5): model.overrides.drop_rate: 1.5 is not in [0, 1)"),
        ),
        (
            "sweepkey",
            format!("{BASE}sweep:\n  train.learning_rate: [0.1]\n"),
            vec![],
            format!("invalid config {d}/sweepkey.yaml:14:3 (sweep, trial learning_rate-0.1): train.learning_rate: unknown field `learning_rate`, expected one of `epochs`, `batch_size`, `lr`, `weight_decay`, `betas`, `eps`, `eval_freq`, `eval_iter`, `grad_accum_steps`, `max_grad_norm`, `schedule`, `checkpoint_every`, `keep_checkpoints`, `threads`, `precision`, `fused_adamw`, `nproc`"),
        ),
        (
            "zip",
            format!("{BASE}sweep: {{mode: zip, axes: {{train.lr: [1, 2], seed: [1]}}}}\n"),
            vec![],
            format!("invalid config {d}/zip.yaml:13:1: sweep (mode zip): every axis needs the same number of values, got train.lr: 2, seed: 1"),
        ),
        (
            "data",
            BASE.replace("{dataset: the-verdict}", "{path: /no/such/file.txt}"),
            vec![],
            format!("invalid config {d}/data.yaml:6:8: data.path: /no/such/file.txt does not exist"),
        ),
        (
            "set",
            BASE.to_string(),
            vec!["train.lr=0"],
            "invalid config --set train.lr=0: train.lr: 0 must be > 0".to_string(),
        ),
        (
            "task",
            BASE.replace("task: pretrain", "task: summarize"),
            vec![],
            format!("invalid config {d}/task.yaml:2:1: task: 'summarize' is not a task llmlab runs yet; expected one of: pretrain, generate, classify, instruct, dpo, eval"),
        ),
        (
            "yaml",
            format!("{BASE}  oops: [\n"),
            vec![],
            "not valid YAML".to_string(),
        ),
    ];
    for (name, text, sets, want) in cases {
        let path = write(dir.path(), &format!("{name}.yaml"), &text);
        let sets: Vec<String> = sets.into_iter().map(String::from).collect();
        let err = Experiment::load(&path, &sets).and_then(|e| prepare(&e).map(|_| ()));
        let msg = format!("{:#}", err.expect_err(name));
        if name == "yaml" {
            assert!(
                msg.contains(&want) && msg.contains("yaml.yaml:"),
                "{name}: {msg}"
            );
        } else {
            assert_eq!(msg, want, "{name}");
        }
        // The command line exits with 2 and runs nothing.
        let mut args = vec![
            "run",
            path.to_str().unwrap(),
            "--runs",
            dir.path().to_str().unwrap(),
        ];
        for s in &sets {
            args.extend(["--set", s]);
        }
        let (code, _out, err) = common::llmlab(&args)?;
        assert_eq!(code, 2, "{name}: {err}");
        assert!(!dir.path().join("t").exists(), "{name}: nothing may start");
    }
    Ok(())
}

/// `model: {run: …}` naming a run folder that is not there (DPO after an instruct run that has
/// not run yet) is an error naming the key, its line and the folder, before anything runs.
#[test]
fn a_missing_run_folder_to_start_from_is_named() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let yaml = "name: after\ntask: dpo\nmodel:\n  run: runs/instruct/none\ndata:\n  dataset: preference-data\n";
    let (code, err) = common::llmlab_run(dir.path(), &dir.path().join("runs"), "after", yaml)?;
    assert_eq!(code, 2, "{err}");
    assert!(
        err.contains("after.yaml:4:3: model.run: runs/instruct/none does not exist (relative to"),
        "{err}"
    );
    Ok(())
}

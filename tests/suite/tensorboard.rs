//! TensorBoard event files as TensorBoard itself reads them: a 3-trial sweep written with
//! `llmlab::tensorboard::TbWriter` is loaded by `tests/reference/tb_read.py` (the `tensorboard`
//! package's record reader, `EventAccumulator`, and the HParams plugin's own backend), and every
//! scalar, text sample, hparam value, end status and experiment definition is checked.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report
use crate::common;

use anyhow::Result;
use llmlab::tensorboard::{HParamDomain, HValue, SessionStatus, TbWriter};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::path::Path;

const SCALAR_TAGS: [&str; 3] = ["train/loss", "val/loss", "train/lr"];
const STEPS: [i64; 3] = [0, 5, 10];
const METRICS: [&str; 2] = ["train/loss", "val/loss"];

struct Trial {
    dir: &'static str,
    lr: f64,
    trainable: &'static str,
    tie_weights: bool,
    drop_rate: f64,
    status: SessionStatus,
}

const TRIALS: [Trial; 3] = [
    Trial {
        dir: "lr-1e-3_trainable-head",
        lr: 1e-3,
        trainable: "head",
        tie_weights: true,
        drop_rate: 0.05,
        status: SessionStatus::Success,
    },
    Trial {
        dir: "lr-1e-4_trainable-all",
        lr: 1e-4,
        trainable: "all",
        tie_weights: false,
        drop_rate: 0.1,
        status: SessionStatus::Success,
    },
    Trial {
        dir: "lr-1e-3_trainable-all",
        lr: 1e-3,
        trainable: "all",
        tie_weights: false,
        drop_rate: 0.25,
        status: SessionStatus::Failure,
    },
];

/// A value per trial, tag and step that is not exactly representable in f32.
fn value(trial: usize, tag: usize, step: i64) -> f64 {
    10.0 / (1.0 + step as f64) + trial as f64 * 0.1 + tag as f64 + 0.123_456_789
}

/// Two samples per trial (one per temperature), with Markdown, a newline and non-ASCII text.
fn sample(trial: usize, temperature: &str) -> String {
    format!("Every effort moves you — trial {trial}, T={temperature}\n\n**bold** «ünïcödé» 🚀")
}

const TEMPERATURES: [&str; 2] = ["0.7", "1.4"];

fn hvalues(t: &Trial) -> BTreeMap<String, HValue> {
    BTreeMap::from([
        ("lr".to_string(), HValue::from(t.lr)),
        ("trainable".to_string(), HValue::from(t.trainable)),
        ("tie_weights".to_string(), HValue::from(t.tie_weights)),
        ("drop_rate".to_string(), HValue::from(t.drop_rate)),
    ])
}

fn write_sweep(root: &Path) -> Result<()> {
    let mut exp = TbWriter::new(root)?;
    exp.hparams_experiment(
        &[
            ("lr", HParamDomain::Discrete(vec![1e-3.into(), 1e-4.into()])),
            (
                "trainable",
                HParamDomain::Discrete(vec!["head".into(), "all".into()]),
            ),
            (
                "tie_weights",
                HParamDomain::Discrete(vec![true.into(), false.into()]),
            ),
            (
                "drop_rate",
                HParamDomain::Interval {
                    min: 0.05,
                    max: 0.5,
                },
            ),
        ],
        &METRICS,
    )?;
    exp.flush()?;
    for (i, t) in TRIALS.iter().enumerate() {
        let mut w = TbWriter::new(root.join(t.dir))?;
        w.hparams_session_start(&hvalues(t), "")?;
        for step in STEPS {
            for (k, tag) in SCALAR_TAGS.iter().enumerate() {
                w.scalar(tag, value(i, k, step), step)?;
            }
        }
        for temp in TEMPERATURES {
            w.text(&format!("samples/temperature_{temp}"), &sample(i, temp), 10)?;
        }
        w.hparams_session_end(t.status)?;
        w.flush()?;
    }
    Ok(())
}

fn read_back(root: &Path) -> Result<Value> {
    let out = common::run_reference_uncached("tb_read.py", &[root.to_str().unwrap()])?;
    Ok(serde_json::from_str(&out)?)
}

fn status_name(s: SessionStatus) -> &'static str {
    match s {
        SessionStatus::Unknown => "STATUS_UNKNOWN",
        SessionStatus::Success => "STATUS_SUCCESS",
        SessionStatus::Failure => "STATUS_FAILURE",
        SessionStatus::Running => "STATUS_RUNNING",
    }
}

fn hparams_json(t: &Trial) -> Value {
    json!({"lr": t.lr, "trainable": t.trainable, "tie_weights": t.tie_weights, "drop_rate": t.drop_rate})
}

/// The hparam definitions as `Experiment.hparam_infos` in JSON (proto field names).
fn expected_hparam_infos() -> Value {
    json!([
        {"name": "lr", "display_name": "lr", "type": "DATA_TYPE_FLOAT64",
         "domain_discrete": [0.001, 0.0001]},
        {"name": "trainable", "display_name": "trainable", "type": "DATA_TYPE_STRING",
         "domain_discrete": ["head", "all"]},
        {"name": "tie_weights", "display_name": "tie_weights", "type": "DATA_TYPE_BOOL",
         "domain_discrete": [true, false]},
        {"name": "drop_rate", "display_name": "drop_rate", "type": "DATA_TYPE_FLOAT64",
         "domain_interval": {"min_value": 0.05, "max_value": 0.5}},
    ])
}

fn expected_metric_infos() -> Value {
    Value::Array(
        METRICS
            .iter()
            .map(|m| json!({"name": {"tag": m}, "display_name": m}))
            .collect(),
    )
}

/// `[[step, value], ...]` as (step, f32): TensorBoard keeps scalars as f32, and comparing at
/// f32 also absorbs serde_json's default float parsing, which may be 1 ulp off in f64.
fn f32_series(v: &Value) -> Vec<(i64, f32)> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|p| (p[0].as_i64().unwrap(), p[1].as_f64().unwrap() as f32))
        .collect()
}

/// Every record of every event file passes TensorBoard's CRC checks, none is missing, and
/// `EventAccumulator` gives back each scalar (as f32, by tag and step) and each text sample.
#[test]
fn tensorboard_reads_scalars_and_text_by_tag_and_step() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    write_sweep(tmp.path())?;
    let got = read_back(tmp.path())?;

    // One file per run folder: file_version + 1 experiment; file_version + start + 9 scalars
    // + 2 texts + end per trial.
    let records = got["records"].as_object().unwrap();
    assert_eq!(records.len(), 1 + TRIALS.len(), "{records:?}");
    for (file, n) in records {
        let expected = if file.contains('/') {
            1 + 1 + 9 + 2 + 1
        } else {
            2
        };
        assert_eq!(n.as_u64(), Some(expected), "records in {file}");
    }

    for (i, t) in TRIALS.iter().enumerate() {
        let run = &got["runs"][t.dir];
        let scalars = run["scalars"].as_object().unwrap();
        assert_eq!(scalars.len(), SCALAR_TAGS.len(), "{}: {scalars:?}", t.dir);
        for (k, tag) in SCALAR_TAGS.iter().enumerate() {
            let expected: Vec<(i64, f32)> =
                STEPS.iter().map(|&s| (s, value(i, k, s) as f32)).collect();
            assert_eq!(f32_series(&scalars[*tag]), expected, "{} {tag}", t.dir);
        }
        let text = run["text"].as_object().unwrap();
        assert_eq!(text.len(), TEMPERATURES.len(), "{}: {text:?}", t.dir);
        for temp in TEMPERATURES {
            let tag = format!("samples/temperature_{temp}");
            assert_eq!(
                text[&tag],
                json!([[10, sample(i, temp)]]),
                "{} {tag}",
                t.dir
            );
        }
    }
    // The experiment's folder holds no scalars or text of its own.
    assert_eq!(got["runs"]["."]["scalars"], json!({}));
    assert_eq!(got["runs"]["."]["text"], json!({}));
    Ok(())
}

/// The hparams plugin's data, raw and through the HParams dashboard's backend: the experiment's
/// hparam and metric definitions, and every trial as a session with its hparam values, its end
/// status and its last metric values.
#[test]
fn hparams_dashboard_lists_every_trial_with_its_values_and_status() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    write_sweep(tmp.path())?;
    let got = read_back(tmp.path())?;

    // Raw plugin data: the experiment in the top-level folder, one session per trial folder.
    let top = &got["runs"]["."]["hparams"];
    assert_eq!(top.as_object().unwrap().len(), 1, "{top}");
    let exp = &top["_hparams_/experiment"];
    assert_eq!(exp["_events"], json!(1));
    assert_eq!(exp["experiment"]["hparam_infos"], expected_hparam_infos());
    assert_eq!(exp["experiment"]["metric_infos"], expected_metric_infos());
    for t in &TRIALS {
        let hp = &got["runs"][t.dir]["hparams"];
        assert_eq!(hp.as_object().unwrap().len(), 2, "{}: {hp}", t.dir);
        let start = &hp["_hparams_/session_start_info"]["session_start_info"];
        assert_eq!(start["hparams"], hparams_json(t), "{}", t.dir);
        assert!(
            start["start_time_secs"].as_f64().unwrap() > 1.6e9,
            "{start}"
        );
        let end = &hp["_hparams_/session_end_info"]["session_end_info"];
        // proto3 JSON leaves a default enum out: STATUS_UNKNOWN would be absent.
        assert_eq!(end["status"], json!(status_name(t.status)), "{}", t.dir);
        assert!(end["end_time_secs"].as_f64().unwrap() > 1.6e9, "{end}");
    }

    // The dashboard's experiment: our definitions, hparams sorted by name by the backend
    // (`backend_context._sort_and_reduce_to_hparams_limit`).
    let exp = &got["experiment"];
    let mut sorted = expected_hparam_infos().as_array().unwrap().clone();
    sorted.sort_by_key(|h| h["name"].as_str().unwrap().to_string());
    assert_eq!(exp["hparam_infos"], Value::Array(sorted), "{exp}");
    assert_eq!(exp["metric_infos"], expected_metric_infos(), "{exp}");

    // The dashboard's session groups: one per trial (empty group names), each with its hparams,
    // status, and the last value (step 10) of each metric.
    let groups = got["session_groups"]["session_groups"]
        .as_array()
        .unwrap_or_else(|| panic!("no session groups: {}", got["session_groups"]));
    assert_eq!(got["session_groups"]["total_size"], json!(TRIALS.len()));
    assert_eq!(groups.len(), TRIALS.len(), "{groups:?}");
    for (i, t) in TRIALS.iter().enumerate() {
        let g = groups
            .iter()
            .find(|g| g["name"] == json!(t.dir))
            .unwrap_or_else(|| panic!("no session group {}: {groups:?}", t.dir));
        assert_eq!(g["hparams"], hparams_json(t), "{}", t.dir);
        let sessions = g["sessions"].as_array().unwrap();
        assert_eq!(sessions.len(), 1, "{}: {sessions:?}", t.dir);
        assert_eq!(sessions[0]["name"], json!(t.dir));
        assert_eq!(
            sessions[0]["status"],
            json!(status_name(t.status)),
            "{}",
            t.dir
        );
        for (k, tag) in METRICS.iter().enumerate() {
            let mv = g["metric_values"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["name"]["tag"] == json!(tag))
                .unwrap_or_else(|| panic!("{}: no metric {tag} in {g}", t.dir));
            assert_eq!(mv["training_step"], json!(10), "{} {tag}", t.dir);
            let got = mv["value"].as_f64().unwrap() as f32;
            assert_eq!(got, value(i, k, 10) as f32, "{} {tag}", t.dir);
        }
    }
    Ok(())
}

/// `tensorboard --inspect` (the CLI users run to debug a log folder) goes through it cleanly.
#[test]
fn tensorboard_inspect_accepts_the_sweep() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    write_sweep(tmp.path())?;
    let out = std::process::Command::new(common::python())
        .args(["-m", "tensorboard.main", "--inspect", "--logdir"])
        .arg(tmp.path())
        .output()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    for t in &TRIALS {
        assert!(text.contains(t.dir), "run {} missing:\n{text}", t.dir);
    }
    for tag in SCALAR_TAGS {
        assert!(text.contains(tag), "tag {tag} missing:\n{text}");
    }
    assert!(!text.contains("Traceback"), "{text}");
    Ok(())
}

/// An unwritable folder is an error naming the path, not a panic; so are bad hparam domains.
#[test]
fn write_errors_name_the_path_and_do_not_panic() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let file = tmp.path().join("not-a-folder");
    std::fs::write(&file, b"x")?;
    let err = TbWriter::new(file.join("run")).err().unwrap();
    let msg = format!("{err:#}");
    assert!(msg.contains("not-a-folder"), "{msg}");
    let io = err.downcast_ref::<llmlab::LlmError>().unwrap();
    assert!(matches!(io, llmlab::LlmError::Io { path, .. } if path.ends_with("run")));

    let mut w = TbWriter::new(tmp.path())?;
    let mixed = HParamDomain::Discrete(vec![1.0.into(), "a".into()]);
    let msg = format!(
        "{:#}",
        w.hparams_experiment(&[("x", mixed)], &["m"]).unwrap_err()
    );
    assert!(msg.contains("'x'") && msg.contains("mix"), "{msg}");
    let empty = HParamDomain::Discrete(vec![]);
    assert!(w.hparams_experiment(&[("y", empty)], &["m"]).is_err());
    let bad = HParamDomain::Interval { min: 1.0, max: 0.0 };
    assert!(w.hparams_experiment(&[("z", bad)], &["m"]).is_err());
    Ok(())
}

/// A resumed run's writer drops what the killed one logged past the checkpoint (steps 4 and 5 of
/// a run resumed after step 3), the killed run's session start/end and a record cut short, so
/// TensorBoard reads one point per step and one session ending in success; a fresh start drops
/// the earlier file altogether.
#[test]
fn a_resumed_writer_prunes_the_killed_runs_later_steps() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let run = dir.path().join("trial");
    let hp = BTreeMap::from([("lr".to_string(), HValue::Number(1e-3))]);
    let killed = {
        let mut w = TbWriter::new(&run)?;
        w.hparams_session_start(&hp, "")?;
        for step in 1..=5 {
            w.scalar("train/loss", 10.0 - step as f64, step)?;
        }
        w.hparams_session_end(SessionStatus::Running)?;
        w.path().to_path_buf()
    };
    // A record the kill cut short: a length and its CRC, no data.
    let mut bytes = std::fs::read(&killed)?;
    bytes.extend_from_slice(&[7, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4]);
    std::fs::write(&killed, &bytes)?;

    let mut w = TbWriter::new(&run)?;
    w.hparams_session_start(&hp, "")?;
    assert!(w.prune_earlier_files(Some(3))?);
    w.session_restart(4)?;
    for step in 4..=6 {
        w.scalar("train/loss", 20.0 - step as f64, step)?;
    }
    w.hparams_session_end(SessionStatus::Success)?;
    let tb = read_back(dir.path())?;
    let points = f32_series(&tb["runs"]["trial"]["scalars"]["train/loss"]);
    assert_eq!(
        points,
        [
            (1, 9.0),
            (2, 8.0),
            (3, 7.0),
            (4, 16.0),
            (5, 15.0),
            (6, 14.0)
        ]
    );
    let hparams = &tb["runs"]["trial"]["hparams"];
    assert_eq!(hparams["_hparams_/session_start_info"]["_events"], 1);
    assert_eq!(
        hparams["_hparams_/session_end_info"]["session_end_info"]["status"],
        "STATUS_SUCCESS"
    );

    // Starting over: nothing of the earlier files is kept.
    let w = TbWriter::new(&run)?;
    assert!(w.prune_earlier_files(None)?);
    let files: Vec<_> = std::fs::read_dir(&run)?.collect::<Result<_, _>>()?;
    assert_eq!(files.len(), 1, "{files:?}");
    assert!(!TbWriter::new(dir.path().join("fresh"))?.prune_earlier_files(None)?);
    Ok(())
}

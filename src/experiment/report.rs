//! `llmlab report runs/<experiment>`: one row per trial (its swept values, status and final
//! metrics), sorted by the experiment's target metric, as a terminal table, Markdown and CSV.
use super::status::read_status;
use super::task::TASKS;
use super::{value_text, Goal, Target};
use crate::error::LlmError;
use anyhow::Result;
use std::path::{Path, PathBuf};

/// One trial's row.
#[derive(Debug, Clone)]
pub struct Row {
    pub slug: String,
    pub status: String,
    /// Swept key → value (as text).
    pub values: Vec<(String, String)>,
    /// Final metrics (last record of metrics.jsonl) and the best validation loss.
    pub metrics: Vec<(String, f64)>,
}

/// What `runs/<experiment>/experiment.json` records for the report.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct ExperimentRecord {
    pub name: String,
    pub task: String,
    pub axes: Vec<String>,
    pub target: Option<Target>,
    pub trials: Vec<(String, Vec<(String, String)>)>,
}

pub fn write_record(dir: &Path, rec: &ExperimentRecord) -> Result<()> {
    crate::error::write_atomic(
        &dir.join("experiment.json"),
        serde_json::to_string_pretty(rec)?.as_bytes(),
    )?;
    Ok(())
}

pub(crate) fn final_metrics(trial_dir: &Path) -> Vec<(String, f64)> {
    let Ok(text) = std::fs::read_to_string(trial_dir.join("metrics.jsonl")) else {
        return Vec::new();
    };
    let records: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    let Some(last) = records.last() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    // The columns of the task whose record it is, else every figure. Later tasks are asked
    // first: pretrain's record (an evaluation, `train_loss`) is also what every training task
    // writes until its final record.
    let keys: Vec<String> = match TASKS
        .iter()
        .rev()
        .map(|t| t.summary())
        .find(|s| last.get(s.marker).is_some())
    {
        Some(s) if !s.columns.is_empty() => s.columns.iter().map(|k| k.to_string()).collect(),
        _ => last
            .as_object()
            .map(|o| o.keys().cloned().collect())
            .unwrap_or_default(),
    };
    for key in keys {
        if let Some(v) = last.get(&key).and_then(|v| v.as_f64()) {
            out.push((key, v));
        }
    }
    let best = records
        .iter()
        .filter_map(|r| r.get("val_loss").and_then(|v| v.as_f64()))
        .fold(f64::INFINITY, f64::min);
    if best.is_finite() {
        out.push(("best_val_loss".into(), best));
    }
    // The figures of an `evaluate:` block, beside the task's own.
    if let Ok(Some(r)) = crate::eval::suite::EvalResults::read(trial_dir) {
        for (k, v) in r.figures {
            if !out.iter().any(|(o, _)| *o == k) {
                out.push((k, v));
            }
        }
    }
    out
}

/// Rows of an experiment folder, sorted by the target metric (unfinished trials last).
pub fn rows(dir: &Path) -> Result<(ExperimentRecord, Vec<Row>)> {
    let path = dir.join("experiment.json");
    let text = crate::error::read_text(&path)?;
    let rec: ExperimentRecord = serde_json::from_str(&text).map_err(|e| LlmError::BadFile {
        path: path.clone(),
        message: format!("not an llmlab experiment record ({e})"),
    })?;
    let mut rows: Vec<Row> = rec
        .trials
        .iter()
        .map(|(slug, values)| {
            let tdir: PathBuf = dir.join(slug);
            Row {
                slug: slug.clone(),
                // A live process marks a trial it runs (a failed one may be running again).
                status: if crate::signal::RunningMarker::is_running(&tdir) {
                    "running".into()
                } else {
                    read_status(&tdir).map(|s| s.status).unwrap_or_else(|| {
                        if tdir.exists() {
                            "interrupted"
                        } else {
                            "not run"
                        }
                        .into()
                    })
                },
                values: values.clone(),
                metrics: final_metrics(&tdir),
            }
        })
        .collect();
    // A Slurm job array's tasks: queued or running, wherever they run (squeue, sacct).
    if super::slurm::read_submission(dir).is_some() {
        let mut status: std::collections::BTreeMap<String, String> = rows
            .iter()
            .map(|r| (r.slug.clone(), r.status.clone()))
            .collect();
        super::slurm::overlay(dir, &mut status);
        for r in &mut rows {
            if let Some(s) = status.remove(&r.slug) {
                r.status = s;
            }
        }
    }
    let target = rec.target.clone().unwrap_or(Target {
        metric: "val_loss".into(),
        mode: Goal::Min,
    });
    let key = |r: &Row| {
        r.metrics
            .iter()
            .find(|(k, _)| *k == target.metric)
            .map(|(_, v)| if target.mode == Goal::Min { *v } else { -*v })
            .unwrap_or(f64::INFINITY)
    };
    rows.sort_by(|a, b| key(a).total_cmp(&key(b)));
    Ok((rec, rows))
}

fn columns(rec: &ExperimentRecord, rows: &[Row]) -> (Vec<String>, Vec<Vec<String>>) {
    let mut metric_names: Vec<String> = Vec::new();
    for r in rows {
        for (k, _) in &r.metrics {
            if !metric_names.contains(k) {
                metric_names.push(k.clone());
            }
        }
    }
    let mut header = vec!["trial".to_string()];
    header.extend(rec.axes.iter().cloned());
    header.push("status".into());
    header.extend(metric_names.iter().cloned());
    let body = rows
        .iter()
        .map(|r| {
            let mut cells = vec![r.slug.clone()];
            for a in &rec.axes {
                cells.push(
                    r.values
                        .iter()
                        .find(|(k, _)| k == a)
                        .map(|(_, v)| v.clone())
                        .unwrap_or_default(),
                );
            }
            cells.push(r.status.clone());
            for m in &metric_names {
                cells.push(
                    r.metrics
                        .iter()
                        .find(|(k, _)| k == m)
                        .map(|(_, v)| {
                            if v.fract() == 0.0 && v.abs() < 1e12 {
                                format!("{v:.0}")
                            } else {
                                format!("{v:.4}")
                            }
                        })
                        .unwrap_or_else(|| "-".into()),
                );
            }
            cells
        })
        .collect();
    (header, body)
}

pub fn markdown(rec: &ExperimentRecord, rows: &[Row]) -> String {
    let (h, body) = columns(rec, rows);
    let mut s = format!("| {} |\n|{}\n", h.join(" | "), " --- |".repeat(h.len()));
    for r in body {
        s.push_str(&format!("| {} |\n", r.join(" | ")));
    }
    s
}

pub fn csv(rec: &ExperimentRecord, rows: &[Row]) -> String {
    let quote = |c: &String| {
        if c.contains([',', '"', '\n']) {
            format!("\"{}\"", c.replace('"', "\"\""))
        } else {
            c.clone()
        }
    };
    let (h, body) = columns(rec, rows);
    let mut s = h.iter().map(quote).collect::<Vec<_>>().join(",") + "\n";
    for r in body {
        s.push_str(&(r.iter().map(quote).collect::<Vec<_>>().join(",") + "\n"));
    }
    s
}

/// A fixed-width table for the terminal.
pub fn terminal(rec: &ExperimentRecord, rows: &[Row]) -> String {
    let (h, body) = columns(rec, rows);
    let widths: Vec<usize> = (0..h.len())
        .map(|i| {
            body.iter()
                .map(|r| r[i].chars().count())
                .chain([h[i].chars().count()])
                .max()
                .unwrap_or(0)
        })
        .collect();
    let line = |cells: &[String]| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_string()
    };
    let mut s = line(&h) + "\n";
    s.push_str(
        &(widths
            .iter()
            .map(|w| "-".repeat(*w))
            .collect::<Vec<_>>()
            .join("  ")
            + "\n"),
    );
    for r in body {
        s.push_str(&(line(&r) + "\n"));
    }
    s
}

/// Writes `summary.md`, `summary.csv` and, per swept axis, `<metric>_by_<axis>.png` beside the
/// trials, and returns the terminal table.
pub fn write_summaries(dir: &Path) -> Result<String> {
    let (rec, rows) = rows(dir)?;
    crate::error::write_atomic(&dir.join("summary.md"), markdown(&rec, &rows).as_bytes())?;
    crate::error::write_atomic(&dir.join("summary.csv"), csv(&rec, &rows).as_bytes())?;
    write_plots(dir, &rec, &rows)?;
    Ok(terminal(&rec, &rows))
}

/// The target metric against each swept axis (PNG, one file per axis).
pub fn write_plots(dir: &Path, rec: &ExperimentRecord, rows: &[Row]) -> Result<Vec<PathBuf>> {
    let metric = rec
        .target
        .as_ref()
        .map_or("val_loss".to_string(), |t| t.metric.clone());
    let mut written = Vec::new();
    for axis in &rec.axes {
        // The axis values in the sweep's order (as the trials list them).
        let mut values: Vec<String> = Vec::new();
        for (_, vals) in &rec.trials {
            if let Some((_, v)) = vals.iter().find(|(k, _)| k == axis) {
                if !values.contains(v) {
                    values.push(v.clone());
                }
            }
        }
        let points: Vec<(usize, f64)> = rows
            .iter()
            .filter_map(|r| {
                let v = r.values.iter().find(|(k, _)| k == axis)?.1.clone();
                let y = r.metrics.iter().find(|(k, _)| *k == metric)?.1;
                Some((values.iter().position(|x| *x == v)?, y))
            })
            .collect();
        let file = dir.join(format!(
            "{}_by_{}.png",
            metric.replace('/', "_"),
            axis.replace('/', "_")
        ));
        let title = format!("{}: {metric} by {axis}", rec.name);
        if crate::plot::plot_metric_by_axis(axis, &values, &points, &metric, &file, &title)? {
            written.push(file);
        }
    }
    Ok(written)
}

/// The record of an experiment's trials (for `experiment.json`).
pub fn record(exp: &super::Experiment, trials: &[super::Trial]) -> ExperimentRecord {
    ExperimentRecord {
        name: exp.name.clone(),
        task: exp.task.clone(),
        axes: exp.axes.iter().map(|(k, _)| k.clone()).collect(),
        target: exp.target.clone(),
        trials: trials
            .iter()
            .map(|t| {
                (
                    t.slug.clone(),
                    t.values
                        .iter()
                        .map(|(k, v)| (k.clone(), value_text(v)))
                        .collect(),
                )
            })
            .collect(),
    }
}

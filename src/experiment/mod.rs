//! Experiment files: one YAML describes a task, its model, data and settings, and a `sweep:` over
//! any of its dotted keys; `llmlab run FILE` runs every trial.
//!
//! ```yaml
//! extends: base.yaml            # optional: shared settings (this file's keys win)
//! name: lr-sweep
//! task: pretrain
//! model: {preset: gpt-mini}
//! data: {dataset: the-verdict}
//! train: {epochs: 2, batch_size: 2, lr: 4.0e-4, eval_freq: 5, eval_iter: 2}
//! sweep:                        # a grid by default; `{mode: zip, axes: {...}}` zips the lists
//!   train.lr: [1.0e-3, 4.0e-4]
//!   seed: [1, 2]
//! target: {metric: val_loss, mode: min}   # how `llmlab report` ranks trials
//! ```
//!
//! Loading resolves `extends` (recursively, paths relative to the file), applies `--set key=value`
//! overrides, expands the sweep into trials, and validates every trial against its task's schema
//! before anything runs. An error names the file, line and column of the offending key, the key,
//! and what is accepted (for an unknown key: the valid ones).
//!
//! The modules: [`task`] (the [`task::Task`] trait and the registry) with one file per task in
//! [`tasks`]; [`prepare`] (validation and config-drift checks before anything runs); [`runner`]
//! (the trials one after the other), [`jobs`] (`--jobs N`, a process per trial) and [`slurm`]
//! (`--backend slurm`, a Slurm job array with a task per trial); [`events`]
//! (progress bars, TensorBoard); [`status`] (a trial's `status.json`); [`report`] (the summary).
pub mod events;
pub mod jobs;
pub mod locate;
pub mod prepare;
pub mod report;
pub mod runner;
pub mod slurm;
pub mod status;
pub mod task;
pub mod tasks;

use crate::error::LlmError;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use serde_yaml::{Mapping, Value};
use std::path::{Path, PathBuf};

/// Keys that belong to the experiment, not to the task's settings.
const EXPERIMENT_KEYS: &[&str] = &["extends", "sweep", "target", "evaluate", "models_from"];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SweepMode {
    Grid,
    Zip,
}

/// How `llmlab report` ranks trials.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Target {
    pub metric: String,
    #[serde(default = "default_goal")]
    pub mode: Goal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Goal {
    Min,
    Max,
}

fn default_goal() -> Goal {
    Goal::Min
}

/// A sweep axis: a dotted key and its values.
pub type Axis = (String, Vec<Value>);

/// A loaded experiment: the merged settings and the sweep axes.
#[derive(Debug, Clone)]
pub struct Experiment {
    pub name: String,
    pub task: String,
    /// The settings every trial starts from (experiment keys removed).
    pub base: Value,
    pub axes: Vec<Axis>,
    pub mode: SweepMode,
    pub target: Option<Target>,
    /// The file and the files it extends (most specific first), for error locations.
    pub files: Vec<(PathBuf, String)>,
    /// `--set` overrides as given.
    pub sets: Vec<String>,
    /// `evaluate:` — evaluations each trial runs on the model it finished (see
    /// [`crate::eval::suite`]); not part of a trial's `config.yaml`, so adding one to a sweep
    /// neither restarts nor blocks its trials: finished ones are evaluated on the next run.
    pub evaluate: Vec<crate::eval::suite::Evaluation>,
}

/// One point of the sweep.
#[derive(Debug, Clone, PartialEq)]
pub struct Trial {
    /// Stable, distinct folder name built from the swept values (`base` without a sweep).
    pub slug: String,
    /// The swept keys and this trial's values, in the file's order.
    pub values: Vec<(String, Value)>,
    /// The trial's full settings.
    pub doc: Value,
}

fn config_err(origin: impl Into<String>, message: String) -> anyhow::Error {
    LlmError::Config {
        origin: origin.into(),
        message,
    }
    .into()
}

/// Reads a YAML file as a mapping, with the file and position in a syntax error.
fn read_yaml(path: &Path) -> Result<(Mapping, String)> {
    let text = crate::error::read_text(path)?;
    let v: Value = serde_yaml::from_str(&text).map_err(|e| {
        let at = e
            .location()
            .map(|l| format!(":{}:{}", l.line(), l.column()))
            .unwrap_or_default();
        config_err(
            format!("{}{at}", path.display()),
            format!("not valid YAML: {e}"),
        )
    })?;
    match v {
        Value::Mapping(m) => Ok((m, text)),
        Value::Null => Ok((Mapping::new(), text)),
        _ => Err(config_err(
            path.display().to_string(),
            "expected a mapping of settings at the top level".into(),
        )),
    }
}

/// Deep merge: maps merge key by key, anything else in `over` replaces `base`.
pub fn merge(base: &mut Value, over: Value) {
    match (base, over) {
        (Value::Mapping(b), Value::Mapping(o)) => {
            for (k, v) in o {
                match b.get_mut(&k) {
                    Some(slot) => merge(slot, v),
                    None => {
                        b.insert(k, v);
                    }
                }
            }
        }
        (slot, v) => *slot = v,
    }
}

/// One `--set KEY=VALUE`: the dotted key and the value read as YAML.
pub fn parse_set(s: &str) -> Result<(&str, Value), LlmError> {
    let (k, v) = s.split_once('=').ok_or_else(|| {
        LlmError::Usage(format!(
            "--set {s}: expected key=value (e.g. train.lr=1e-3)"
        ))
    })?;
    let v: Value = serde_yaml::from_str(v)
        .map_err(|e| LlmError::Usage(format!("--set {s}: the value is not YAML ({e})")))?;
    Ok((k.trim(), v))
}

/// Sets a dotted key (`train.lr`) in a mapping, creating intermediate maps.
pub fn set_dotted(doc: &mut Value, key: &str, value: Value) -> Result<(), String> {
    let mut cur = doc;
    let parts: Vec<&str> = key.split('.').collect();
    for (i, part) in parts.iter().enumerate() {
        // An item of a list by its index (`evaluations.0.mmlu.style`).
        if let Value::Sequence(seq) = cur {
            let n = seq.len();
            let Some(item) = part.parse::<usize>().ok().and_then(|j| seq.get_mut(j)) else {
                return Err(format!(
                    "'{}' is a list of {n} items, so '{key}' can't be set",
                    parts[..i].join(".")
                ));
            };
            if i + 1 == parts.len() {
                *item = value;
                return Ok(());
            }
            cur = item;
            continue;
        }
        let Value::Mapping(m) = cur else {
            return Err(format!(
                "'{}' is not a mapping, so '{key}' can't be set",
                parts[..i].join(".")
            ));
        };
        let k = Value::String(part.to_string());
        if i + 1 == parts.len() {
            m.insert(k, value);
            return Ok(());
        }
        if !matches!(m.get(&k), Some(Value::Mapping(_) | Value::Sequence(_))) {
            m.insert(k.clone(), Value::Mapping(Mapping::new()));
        }
        cur = m.get_mut(&k).expect("inserted above");
    }
    Ok(())
}

pub fn get_dotted<'a>(doc: &'a Value, key: &str) -> Option<&'a Value> {
    key.split('.').try_fold(doc, |cur, part| match cur {
        Value::Sequence(seq) => part.parse::<usize>().ok().and_then(|j| seq.get(j)),
        _ => cur.get(part),
    })
}

/// A value as it reads in a slug or a table: `0.001`, `last_block`, `true`.
pub fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "null".into(),
        other => serde_yaml::to_string(other)
            .unwrap_or_default()
            .trim()
            .replace('\n', " "),
    }
}

/// `models_from: runs/EXP`: a sweep of `model` over the finished trial folders of another
/// experiment, in name order.
fn models_from_axis(v: &Value, axes: &[Axis], mode: SweepMode) -> Result<Axis, String> {
    let Some(dir) = v.as_str().map(PathBuf::from) else {
        return Err(format!(
            "models_from: {}: expected a folder of trials, e.g. runs/freeze-sweep",
            value_text(v)
        ));
    };
    if axes.iter().any(|(k, _)| k == "model") {
        return Err("models_from: model is swept too; give the models one way".into());
    }
    if mode == SweepMode::Zip && !axes.is_empty() {
        return Err("models_from: with a zip sweep; use a grid (the default)".into());
    }
    let entries =
        std::fs::read_dir(&dir).map_err(|e| format!("models_from: {}: {e}", dir.display()))?;
    let mut trials: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| crate::train::RunDir::at(p).finished().unwrap_or(false))
        .collect();
    trials.sort();
    if trials.is_empty() {
        return Err(format!(
            "models_from: {} holds no finished trial (run that experiment first)",
            dir.display()
        ));
    }
    let values = trials
        .into_iter()
        .map(|p| Value::String(p.display().to_string()))
        .collect();
    Ok(("model".into(), values))
}

fn slug_part(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl Experiment {
    /// Loads `path` with its `extends` chain and the `--set` overrides.
    pub fn load(path: &Path, sets: &[String]) -> Result<Self> {
        let mut files = Vec::new();
        let mut chain: Vec<Mapping> = Vec::new();
        let mut next = Some(path.to_path_buf());
        while let Some(p) = next.take() {
            if files.iter().any(|(f, _): &(PathBuf, String)| f == &p) {
                return Err(config_err(
                    p.display().to_string(),
                    "extends: the files extend each other in a cycle".into(),
                ));
            }
            let (m, text) = read_yaml(&p)?;
            if let Some(e) = m.get("extends") {
                let Some(rel) = e.as_str() else {
                    let (line, col) = locate::locate(&text, "extends").unwrap_or((1, 1));
                    return Err(config_err(
                        format!("{}:{line}:{col}", p.display()),
                        "extends: expected a file name".into(),
                    ));
                };
                let dir = p.parent().unwrap_or(Path::new("."));
                let target = dir.join(rel);
                if !target.is_file() {
                    let (line, col) = locate::locate(&text, "extends").unwrap_or((1, 1));
                    return Err(config_err(
                        format!("{}:{line}:{col}", p.display()),
                        format!("extends: {} does not exist", target.display()),
                    ));
                }
                next = Some(target);
            }
            files.push((p, text));
            chain.push(m);
        }
        let mut doc = Value::Mapping(Mapping::new());
        for m in chain.into_iter().rev() {
            merge(&mut doc, Value::Mapping(m));
        }
        for s in sets {
            let (k, v) = parse_set(s)?;
            if let Some(axis) = k.strip_prefix("sweep.") {
                // `--set sweep.train.lr=[1e-3]`: the axis key is literal (it has dots itself).
                let sweep = match &mut doc {
                    Value::Mapping(m) => m
                        .entry(Value::String("sweep".into()))
                        .or_insert_with(|| Value::Mapping(Mapping::new())),
                    _ => unreachable!("merged mappings"),
                };
                let target = match sweep {
                    Value::Mapping(sm) if sm.contains_key("axes") => sm.get_mut("axes"),
                    other => Some(other),
                };
                match target {
                    Some(Value::Mapping(am)) => {
                        am.insert(Value::String(axis.into()), v);
                    }
                    _ => {
                        return Err(LlmError::Usage(format!(
                            "--set {s}: the file's sweep is not a mapping"
                        ))
                        .into())
                    }
                }
                continue;
            }
            let swept = doc.get("sweep").is_some_and(|sw| {
                sw.get(k).is_some() || sw.get("axes").is_some_and(|a| a.get(k).is_some())
            });
            if swept {
                return Err(LlmError::Usage(format!(
                    "--set {s}: {k} is swept by the file; change its values with --set sweep.{k}=[...]"
                ))
                .into());
            }
            set_dotted(&mut doc, k, v).map_err(|m| LlmError::Usage(format!("--set {s}: {m}")))?;
        }
        let origin = path.display().to_string();
        let at = |key: &str| -> String {
            match files
                .iter()
                .find_map(|(f, t)| locate::locate(t, key).map(|lc| (f, lc)))
            {
                Some((f, (l, c))) => format!("{}:{l}:{c}", f.display()),
                None => origin.clone(),
            }
        };
        let Value::Mapping(mut m) = doc else {
            unreachable!("merged mappings")
        };
        m.remove("extends");
        let target = match m.remove("target") {
            None => None,
            Some(t) => Some(serde_yaml::from_value::<Target>(t).map_err(|e| {
                config_err(
                    at("target"),
                    format!("target: {e} (expected {{metric: NAME, mode: min|max}})"),
                )
            })?),
        };
        let evaluate = match m.remove("evaluate") {
            None | Some(Value::Null) => Vec::new(),
            Some(v) => {
                let list: Vec<crate::eval::suite::Evaluation> = serde_yaml::from_value(v)
                    .map_err(|e| {
                        config_err(
                            at("evaluate"),
                            format!("evaluate: {e} (expected a list such as [{{mmlu: {{subjects: anatomy}}}}, {{perplexity: {{dataset: the-verdict}}}}])"),
                        )
                    })?;
                crate::eval::suite::validate("evaluate", &list).map_err(|e| match e {
                    LlmError::Config { message, .. } => config_err(at("evaluate"), message),
                    other => other.into(),
                })?;
                list
            }
        };
        let models_from = m.remove("models_from");
        let (mut axes, mode) = match m.remove("sweep") {
            None | Some(Value::Null) => (Vec::new(), SweepMode::Grid),
            Some(Value::Mapping(s)) => {
                parse_sweep(s).map_err(|msg| config_err(at("sweep"), msg))?
            }
            Some(_) => {
                return Err(config_err(
                    at("sweep"),
                    "sweep: expected a mapping of dotted keys to lists of values".into(),
                ))
            }
        };
        let name = match m.get("name") {
            Some(Value::String(n)) if !n.trim().is_empty() && !n.contains(['/', '\\']) => n.clone(),
            Some(other) => {
                return Err(config_err(
                    at("name"),
                    format!(
                        "name: {}: expected a non-empty folder name",
                        value_text(other)
                    ),
                ))
            }
            None => path
                .file_stem()
                .and_then(|s| s.to_str())
                .unwrap_or("experiment")
                .to_string(),
        };
        let task = match m.get("task") {
            None => "pretrain".to_string(),
            Some(Value::String(t)) => t.clone(),
            Some(other) => {
                return Err(config_err(
                    at("task"),
                    format!("task: {}: expected a task name", value_text(other)),
                ))
            }
        };
        if let Some(v) = models_from {
            let axis = models_from_axis(&v, &axes, mode)
                .map_err(|msg| config_err(at("models_from"), msg))?;
            axes.insert(0, axis);
        }
        Ok(Self {
            name,
            task,
            base: Value::Mapping(m),
            axes,
            mode,
            target,
            files,
            sets: sets.to_vec(),
            evaluate,
        })
    }

    /// "file:line:col" of a dotted key, searching the file and then the files it extends.
    pub fn location(&self, key: &str) -> String {
        self.files
            .iter()
            .find_map(|(f, t)| {
                locate::locate(t, key).map(|(l, c)| format!("{}:{l}:{c}", f.display()))
            })
            .unwrap_or_else(|| {
                self.files
                    .first()
                    .map(|(f, _)| f.display().to_string())
                    .unwrap_or_default()
            })
    }

    /// The trials of the sweep (one, named `base`, without a sweep).
    pub fn trials(&self) -> Result<Vec<Trial>> {
        let combos: Vec<Vec<(String, Value)>> = if self.axes.is_empty() {
            vec![Vec::new()]
        } else {
            match self.mode {
                SweepMode::Grid => {
                    let mut out: Vec<Vec<(String, Value)>> = vec![Vec::new()];
                    for (k, vals) in &self.axes {
                        out = out
                            .into_iter()
                            .flat_map(|prefix| {
                                vals.iter().map(move |v| {
                                    let mut p = prefix.clone();
                                    p.push((k.clone(), v.clone()));
                                    p
                                })
                            })
                            .collect();
                    }
                    out
                }
                SweepMode::Zip => {
                    let n = self.axes[0].1.len();
                    (0..n)
                        .map(|i| {
                            self.axes
                                .iter()
                                .map(|(k, vals)| (k.clone(), vals[i].clone()))
                                .collect()
                        })
                        .collect()
                }
            }
        };
        // Slugs: the last segment of each key unless two axes share it, then the whole key.
        let short: Vec<String> = self
            .axes
            .iter()
            .map(|(k, _)| {
                let last = k.rsplit('.').next().unwrap_or(k);
                let clash = self
                    .axes
                    .iter()
                    .filter(|(o, _)| o.rsplit('.').next() == Some(last))
                    .count()
                    > 1;
                if clash {
                    k.clone()
                } else {
                    last.to_string()
                }
            })
            .collect();
        let mut trials = Vec::with_capacity(combos.len());
        for values in combos {
            let mut doc = self.base.clone();
            for (k, v) in &values {
                set_dotted(&mut doc, k, v.clone()).map_err(|m| {
                    config_err(self.location("sweep"), format!("sweep key {k}: {m}"))
                })?;
            }
            let slug = if values.is_empty() {
                "base".to_string()
            } else {
                values
                    .iter()
                    .zip(&short)
                    .map(|((_, v), s)| format!("{}-{}", slug_part(s), slug_part(&value_text(v))))
                    .collect::<Vec<_>>()
                    .join("_")
            };
            trials.push(Trial { slug, values, doc });
        }
        let mut seen = std::collections::BTreeSet::new();
        for t in &trials {
            if !seen.insert(t.slug.clone()) {
                return Err(config_err(
                    self.location("sweep"),
                    format!(
                        "sweep: two trials would share the folder '{}' (repeated values?)",
                        t.slug
                    ),
                ));
            }
        }
        Ok(trials)
    }

    /// Deserializes a trial's settings into the task's spec type; an error names the file,
    /// line and column of the key, the key, and (for unknown keys) the accepted ones.
    pub fn parse_trial<T: serde::de::DeserializeOwned>(&self, trial: &Trial) -> Result<T> {
        let de = trial.doc.clone();
        serde_path_to_error::deserialize::<_, T>(de).map_err(|e| {
            let path = e.path().to_string();
            let inner = e.into_inner().to_string();
            // For an unknown field the path stops at its parent: name the field itself.
            let key = match inner.split('`').nth(1) {
                Some(f) if inner.starts_with("unknown field") => {
                    if path == "." || path.is_empty() {
                        f.to_string()
                    } else if path.rsplit('.').next() == Some(f) {
                        path.clone()
                    } else {
                        format!("{path}.{f}")
                    }
                }
                _ => path.clone(),
            };
            config_err(self.origin_of(&key, trial), format!("{key}: {inner}"))
        })
    }

    /// Where a trial's value of `key` comes from: the sweep axis (with the trial), a `--set`,
    /// or the file (and line) that writes it.
    pub fn origin_of(&self, key: &str, trial: &Trial) -> String {
        if trial.values.iter().any(|(k, _)| k == key) {
            format!(
                "{} (sweep, trial {})",
                self.location(&format!("sweep.{key}")),
                trial.slug
            )
        } else if let Some(s) = self
            .sets
            .iter()
            .find(|s| s.split('=').next().map(str::trim) == Some(key))
        {
            format!("--set {s}")
        } else {
            self.location(key)
        }
    }
}

fn parse_sweep(s: Mapping) -> Result<(Vec<Axis>, SweepMode), String> {
    let (axes_map, mode) = if s.contains_key("axes") {
        let mode = match s.get("mode").map(value_text).as_deref() {
            None | Some("grid") => SweepMode::Grid,
            Some("zip") => SweepMode::Zip,
            Some(other) => return Err(format!("sweep.mode: '{other}': expected grid or zip")),
        };
        for k in s.keys() {
            let k = value_text(k);
            if k != "axes" && k != "mode" {
                return Err(format!(
                    "sweep.{k}: unknown key; with `axes`, sweep takes only `mode` and `axes`"
                ));
            }
        }
        match s.get("axes") {
            Some(Value::Mapping(a)) => (a.clone(), mode),
            _ => return Err("sweep.axes: expected a mapping of dotted keys to lists".into()),
        }
    } else {
        (s, SweepMode::Grid)
    };
    let mut axes = Vec::new();
    for (k, v) in axes_map {
        let key = value_text(&k);
        if EXPERIMENT_KEYS.contains(&key.as_str()) || key == "name" || key == "task" {
            return Err(format!("sweep: '{key}' can't be swept"));
        }
        match v {
            Value::Sequence(vals) if !vals.is_empty() => axes.push((key, vals)),
            _ => {
                return Err(format!(
                    "sweep.{key}: expected a non-empty list of values, e.g. [0.0, 0.1]"
                ))
            }
        }
    }
    if mode == SweepMode::Zip {
        let lens: Vec<usize> = axes.iter().map(|(_, v)| v.len()).collect();
        if lens.windows(2).any(|w| w[0] != w[1]) {
            return Err(format!(
                "sweep (mode zip): every axis needs the same number of values, got {}",
                axes.iter()
                    .map(|(k, v)| format!("{k}: {}", v.len()))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
    }
    Ok((axes, mode))
}

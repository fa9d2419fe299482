//! Instruction data (book ch07 §7.2): entries of `instruction`, `input` and `output` read from
//! the book's `instruction-data.json` (through the data registry) or any JSON array / JSONL file
//! of that shape (field names configurable), and the book's 85/5/10 split.
use crate::error::{read_text, write_atomic, LlmError};
pub use crate::prompt::Entry;
use crate::prompt::PromptStyle;
use anyhow::Result;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// `data:` of an instruction fine-tuning experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstructDataSpec {
    /// A registered data set (`instruction-data`, the book's 1,100 entries).
    #[serde(default)]
    pub dataset: Option<String>,
    /// Or a `.json` file (an array of objects) or a `.jsonl` file (one object a line).
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// The key holding the instruction.
    #[serde(default = "default_instruction_field")]
    pub instruction_field: String,
    /// The key holding the optional input (a missing key or `null` is an empty input).
    #[serde(default = "default_input_field")]
    pub input_field: String,
    /// The key holding the reference output.
    #[serde(default = "default_output_field")]
    pub output_field: String,
    /// Train / validation / test fractions. As the book: train = int(f_train·n), test =
    /// int(f_test·n), validation = the rest; train is taken first, then test, then validation.
    #[serde(default = "default_split")]
    pub split: (f64, f64, f64),
    /// Shuffle (with the experiment's seed) before splitting; the book keeps the file's order.
    #[serde(default)]
    pub shuffle: bool,
    /// Keep only the first N entries of each split (a quick subset; the split itself is unchanged).
    #[serde(default)]
    pub max_train: Option<usize>,
    #[serde(default)]
    pub max_val: Option<usize>,
    #[serde(default)]
    pub max_test: Option<usize>,
    /// How an example becomes text: alpaca (the book), phi3 (exercise 7.1), chat (the model's
    /// own template).
    #[serde(default)]
    pub prompt_style: PromptStyle,
    /// Truncate every batch row to this many tokens (the book: 1024).
    #[serde(default = "default_max_len")]
    pub allowed_max_length: usize,
    /// Exercise 7.2: leave the instruction and input tokens out of the loss.
    #[serde(default)]
    pub mask_instruction: bool,
    /// Pack several examples (each ended by the end-of-text token) into one row of up to
    /// `allowed_max_length` tokens instead of one padded example a row.
    #[serde(default)]
    pub packing: bool,
}

fn default_max_len() -> usize {
    1024
}

fn default_instruction_field() -> String {
    "instruction".into()
}
fn default_input_field() -> String {
    "input".into()
}
fn default_output_field() -> String {
    "output".into()
}
fn default_split() -> (f64, f64, f64) {
    (0.85, 0.05, 0.1)
}

impl Default for InstructDataSpec {
    fn default() -> Self {
        Self {
            dataset: None,
            path: None,
            instruction_field: default_instruction_field(),
            input_field: default_input_field(),
            output_field: default_output_field(),
            split: default_split(),
            shuffle: false,
            max_train: None,
            max_val: None,
            max_test: None,
            prompt_style: PromptStyle::Alpaca,
            allowed_max_length: default_max_len(),
            mask_instruction: false,
            packing: false,
        }
    }
}

/// The three splits.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Splits {
    pub train: Vec<Entry>,
    pub val: Vec<Entry>,
    pub test: Vec<Entry>,
}

impl InstructDataSpec {
    /// The first problem with the settings (a message starting with the key), if any.
    pub fn check(&self) -> Option<String> {
        if self.dataset.is_some() && self.path.is_some() {
            return Some("data.dataset and data.path: give one of them, not both".into());
        }
        let (a, b, c) = self.split;
        if [a, b, c].iter().any(|f| !(f.is_finite() && *f >= 0.0)) || (a + b + c - 1.0).abs() > 1e-6
        {
            return Some(format!(
                "data.split: [{a}, {b}, {c}]: expected three fractions >= 0 that sum to 1 (train, validation, test)"
            ));
        }
        if self.allowed_max_length < 2 {
            return Some(format!(
                "data.allowed_max_length: {}: expected at least 2",
                self.allowed_max_length
            ));
        }
        if self.max_train == Some(0) || self.max_val == Some(0) {
            return Some("data.max_train and data.max_val: expected at least 1".into());
        }
        None
    }

    /// The file the settings name (the registry's `instruction-data` by default).
    pub fn file(&self) -> Result<PathBuf> {
        if let Some(p) = &self.path {
            return Ok(p.clone());
        }
        let name = self.dataset.as_deref().unwrap_or("instruction-data");
        let reg = crate::data::registry::Registry::builtin()?;
        let dir = reg.fetch(name)?;
        let ds = reg.get(name)?;
        let file = ds
            .files
            .iter()
            .map(|f| dir.join(&f.path))
            .find(|p| p.extension().is_some_and(|e| e == "json" || e == "jsonl"))
            .ok_or_else(|| {
                LlmError::Usage(format!(
                    "data set '{name}' has no .json or .jsonl file; give data.path instead"
                ))
            })?;
        Ok(file)
    }

    /// Reads every entry of the file.
    pub fn read(&self) -> Result<Vec<Entry>> {
        let path = self.file()?;
        read_entries(
            &path,
            &self.instruction_field,
            &self.input_field,
            (&self.output_field, "output"),
        )
    }

    /// The book's split (after a seeded shuffle when `shuffle` is on), then the per-split caps.
    pub fn split(&self, entries: &[Entry], seed: u64) -> Splits {
        let mut all = entries.to_vec();
        if self.shuffle {
            all.shuffle(&mut StdRng::seed_from_u64(seed));
        }
        let n = all.len();
        let n_train = (n as f64 * self.split.0) as usize;
        let n_test = ((n as f64 * self.split.2) as usize).min(n - n_train);
        let mut rest = all.split_off(n_train);
        let train = all;
        let val = rest.split_off(n_test);
        let test = rest;
        let cap = |mut v: Vec<Entry>, m: Option<usize>| {
            if let Some(m) = m {
                v.truncate(m);
            }
            v
        };
        Splits {
            train: cap(train, self.max_train),
            val: cap(val, self.max_val),
            test: cap(test, self.max_test),
        }
    }
}

/// Reads a JSON array or JSONL file of instruction records. `output` is the field read as the
/// entry's output and the `data.` key that names it (`output`; `chosen` for preference data),
/// for the message when a record lacks it.
pub fn read_entries(
    path: &Path,
    instruction_field: &str,
    input_field: &str,
    (output_field, output_key): (&str, &str),
) -> Result<Vec<Entry>> {
    let text = read_text(path)?;
    let bad = |m: String| LlmError::BadFile {
        path: path.to_path_buf(),
        message: m,
    };
    let records: Vec<(usize, serde_json::Value)> = if text.trim_start().starts_with('[') {
        let v: Vec<serde_json::Value> = serde_json::from_str(&text)
            .map_err(|e| bad(format!("not a JSON array of objects ({e})")))?;
        v.into_iter().enumerate().map(|(i, r)| (i + 1, r)).collect()
    } else {
        let mut out = Vec::new();
        for (i, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let v = serde_json::from_str(line)
                .map_err(|e| bad(format!("line {}: not a JSON object ({e})", i + 1)))?;
            out.push((i + 1, v));
        }
        out
    };
    let mut entries = Vec::with_capacity(records.len());
    for (k, rec) in records {
        let serde_json::Value::Object(obj) = rec else {
            return Err(bad(format!("record {k}: expected a JSON object")).into());
        };
        let field = |name: &str, required: bool| -> Result<String, LlmError> {
            match obj.get(name) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                None | Some(serde_json::Value::Null) if !required => Ok(String::new()),
                Some(other) => Err(bad(format!(
                    "record {k}: '{name}' is {other}, expected a string"
                ))),
                None => Err(bad(format!(
                    "record {k}: no '{name}' field (set data.{}_field to the key your file uses)",
                    if name == instruction_field {
                        "instruction"
                    } else {
                        output_key
                    }
                ))),
            }
        };
        entries.push(Entry {
            instruction: field(instruction_field, true)?,
            input: field(input_field, false)?,
            output: field(output_field, true)?,
            raw: obj.clone(),
        });
    }
    if entries.is_empty() {
        return Err(bad("no records".into()).into());
    }
    Ok(entries)
}

/// Writes `train.json`, `val.json` and `test.json` (the records as read) into `dir`.
pub fn write_splits(dir: &Path, s: &Splits) -> Result<()> {
    for (name, part) in [("train", &s.train), ("val", &s.val), ("test", &s.test)] {
        let v: Vec<&serde_json::Map<String, serde_json::Value>> =
            part.iter().map(|e| &e.raw).collect();
        write_atomic(
            &dir.join(format!("{name}.json")),
            serde_json::to_string_pretty(&v)?.as_bytes(),
        )?;
    }
    Ok(())
}

//! Classification data (book ch06 §6.2–6.3): reading labelled texts, the balanced and seeded
//! 70/10/20 split of the SMS Spam Collection, and padded token batches.
use crate::error::{read_text, write_atomic, LlmError};
use anyhow::Result;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use tch::{Device, Tensor};

/// One labelled text; `line` is where it starts in its file (1-based), for error messages.
#[derive(Debug, Clone, PartialEq)]
pub struct Example {
    pub text: String,
    pub label: usize,
    pub line: usize,
}

/// How inputs are padded (book ch06 §6.3 and its additional experiments).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Padding {
    /// To the longest training example (the book's default); longer texts are truncated.
    #[default]
    Longest,
    /// To `data.max_length` tokens.
    Fixed,
    /// To the model's context length.
    Context,
    /// No padding: every text keeps its own length (needs `train.batch_size: 1`; use
    /// `train.grad_accum_steps` for a larger effective batch).
    None,
}

/// `data:` of a classification experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassifyDataSpec {
    /// A registered data set (`sms-spam-collection`).
    #[serde(default)]
    pub dataset: Option<String>,
    /// Or a `.csv` / `.tsv` file with a header row, or a `.jsonl` file.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// The column (or JSON key) holding the text.
    #[serde(default = "default_text_column")]
    pub text_column: String,
    /// The column (or JSON key) holding the label.
    #[serde(default = "default_label_column")]
    pub label_column: String,
    /// The class names in id order (default: the sorted distinct labels; `[ham, spam]` for the
    /// SMS data, as the book maps ham → 0, spam → 1). A label outside the list is an error.
    #[serde(default)]
    pub labels: Option<Vec<String>>,
    /// Undersample every class to the size of the smallest (the book's `create_balanced_dataset`).
    #[serde(default = "yes")]
    pub balance: bool,
    /// Keep at most this many examples per class (after balancing): a quick subset.
    #[serde(default)]
    pub max_per_class: Option<usize>,
    /// Train / validation / test fractions (the book: 0.7 / 0.1 / 0.2; the test split takes the rest).
    #[serde(default = "default_split")]
    pub split: (f64, f64, f64),
    #[serde(default)]
    pub padding: Padding,
    /// Truncate texts to this many tokens (and, with `padding: fixed`, pad to it).
    #[serde(default)]
    pub max_length: Option<usize>,
}

fn default_text_column() -> String {
    "text".into()
}
fn default_label_column() -> String {
    "label".into()
}
fn yes() -> bool {
    true
}
fn default_split() -> (f64, f64, f64) {
    (0.7, 0.1, 0.2)
}

impl Default for ClassifyDataSpec {
    fn default() -> Self {
        Self {
            dataset: Some(SMS_SPAM.into()),
            path: None,
            text_column: default_text_column(),
            label_column: default_label_column(),
            labels: None,
            balance: true,
            max_per_class: None,
            split: default_split(),
            padding: Padding::Longest,
            max_length: None,
        }
    }
}

/// The registry name of the SMS Spam Collection.
pub const SMS_SPAM: &str = "sms-spam-collection";

impl ClassifyDataSpec {
    /// The first problem with the settings (key and what is accepted).
    pub fn check(&self) -> Option<String> {
        match (&self.dataset, &self.path) {
            (None, None) => return Some("data: expected `dataset: NAME` or `path: FILE`".into()),
            (Some(_), Some(_)) => {
                return Some("data: give either `dataset` or `path`, not both".into())
            }
            _ => {}
        }
        let (a, b, c) = self.split;
        if [a, b, c].iter().any(|f| !(0.0..=1.0).contains(f))
            || a <= 0.0
            || (a + b + c - 1.0).abs() > 1e-6
        {
            return Some(format!(
                "data.split = [{a}, {b}, {c}]: expected three fractions in [0, 1] summing to 1, the first > 0"
            ));
        }
        if self.padding == Padding::Fixed && self.max_length.is_none() {
            return Some("data.padding = fixed needs data.max_length".into());
        }
        if self.max_length == Some(0) {
            return Some("data.max_length = 0: expected at least 1".into());
        }
        if self.max_per_class == Some(0) {
            return Some("data.max_per_class = 0: expected at least 1".into());
        }
        if let Some(l) = &self.labels {
            if l.len() < 2 {
                return Some(format!(
                    "data.labels has {} entries: a classifier needs at least 2 classes",
                    l.len()
                ));
            }
        }
        None
    }

    /// The input file (the registry's, downloaded or mirrored, or `path`).
    pub fn file(&self) -> Result<PathBuf> {
        match (&self.dataset, &self.path) {
            (Some(name), _) => {
                let reg = crate::data::registry::Registry::builtin()?;
                let ds = reg.get(name)?.clone();
                let dir = reg.fetch(name)?;
                Ok(dir.join(&ds.files[0].path))
            }
            (None, Some(p)) => Ok(p.clone()),
            (None, None) => Err(LlmError::Usage("data: no dataset or path".into()).into()),
        }
    }

    /// Reads every labelled text and the class names.
    pub fn read(&self) -> Result<(Vec<Example>, Vec<String>)> {
        let file = self.file()?;
        let raw = if self.dataset.as_deref() == Some(SMS_SPAM) {
            read_sms_spam(&file)?
        } else {
            read_table(&file, &self.text_column, &self.label_column)?
        };
        let labels = match &self.labels {
            Some(l) => l.clone(),
            None if self.dataset.as_deref() == Some(SMS_SPAM) => vec!["ham".into(), "spam".into()],
            None => {
                let mut l: Vec<String> = raw.iter().map(|r| r.1.clone()).collect();
                l.sort();
                l.dedup();
                l
            }
        };
        if labels.len() < 2 {
            return Err(LlmError::BadFile {
                path: file,
                message: format!(
                    "found {} distinct label(s); a classifier needs at least 2",
                    labels.len()
                ),
            }
            .into());
        }
        let mut out = Vec::with_capacity(raw.len());
        for (text, label, line) in raw {
            let Some(id) = labels.iter().position(|l| *l == label) else {
                return Err(LlmError::BadFile {
                    path: file,
                    message: format!(
                        "line {line}: label '{label}' is not one of the classes [{}]",
                        labels.join(", ")
                    ),
                }
                .into());
            };
            out.push(Example {
                text,
                label: id,
                line,
            });
        }
        Ok((out, labels))
    }
}

/// The SMS Spam Collection: `label<TAB>text` per record, no header, with quoted fields as
/// Python's `csv` module (and pandas, which the book uses) read them: 5,572 messages.
pub fn read_sms_spam(path: &Path) -> Result<Vec<(String, String, usize)>> {
    let text = read_text(path)?;
    let mut rdr = csv::ReaderBuilder::new()
        .delimiter(b'\t')
        .has_headers(false)
        .flexible(true)
        .from_reader(text.as_bytes());
    let mut out = Vec::new();
    for rec in rdr.records() {
        let rec = rec.map_err(|e| bad(path, e.to_string()))?;
        let line = rec.position().map_or(0, |p| p.line() as usize);
        if rec.len() != 2 {
            return Err(bad(
                path,
                format!(
                    "line {line}: expected `label<TAB>text`, found {} field(s)",
                    rec.len()
                ),
            )
            .into());
        }
        let text = rec[1].to_string();
        if text.trim().is_empty() {
            return Err(bad(path, format!("line {line}: empty text")).into());
        }
        out.push((text, rec[0].to_string(), line));
    }
    Ok(out)
}

fn bad(path: &Path, message: String) -> LlmError {
    LlmError::BadFile {
        path: path.to_path_buf(),
        message,
    }
}

/// A `.csv`/`.tsv` file with a header row, or a `.jsonl` file, with a text and a label column.
pub fn read_table(
    path: &Path,
    text_col: &str,
    label_col: &str,
) -> Result<Vec<(String, String, usize)>> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    let content = read_text(path)?;
    let mut out = Vec::new();
    match ext.as_str() {
        "jsonl" | "json" => {
            for (i, line) in content.lines().enumerate() {
                let n = i + 1;
                if line.trim().is_empty() {
                    continue;
                }
                let v: serde_json::Value = serde_json::from_str(line)
                    .map_err(|e| bad(path, format!("line {n}: not a JSON object: {e}")))?;
                let get = |k: &str| -> Result<String, LlmError> {
                    match v.get(k) {
                        Some(serde_json::Value::String(s)) => Ok(s.clone()),
                        Some(serde_json::Value::Number(x)) => Ok(x.to_string()),
                        Some(serde_json::Value::Bool(b)) => Ok(b.to_string()),
                        Some(_) => Err(bad(
                            path,
                            format!("line {n}: key '{k}' is not a string or number"),
                        )),
                        None => Err(bad(path, format!("line {n}: missing key '{k}'"))),
                    }
                };
                let text = get(text_col)?;
                if text.trim().is_empty() {
                    return Err(bad(path, format!("line {n}: empty text in '{text_col}'")).into());
                }
                out.push((text, get(label_col)?, n));
            }
        }
        "csv" | "tsv" => {
            let mut rdr = csv::ReaderBuilder::new()
                .delimiter(if ext == "tsv" { b'\t' } else { b',' })
                .from_reader(content.as_bytes());
            let headers = rdr.headers().map_err(|e| bad(path, e.to_string()))?.clone();
            let col = |name: &str| {
                headers.iter().position(|h| h == name).ok_or_else(|| {
                    bad(
                        path,
                        format!(
                            "line 1: no column '{name}'; the header has: {}",
                            headers.iter().collect::<Vec<_>>().join(", ")
                        ),
                    )
                })
            };
            let (ti, li) = (col(text_col)?, col(label_col)?);
            for rec in rdr.records() {
                let rec = rec.map_err(|e| bad(path, e.to_string()))?;
                let n = rec.position().map_or(0, |p| p.line() as usize);
                let (Some(text), Some(label)) = (rec.get(ti), rec.get(li)) else {
                    return Err(bad(path, format!("line {n}: fewer fields than the header")).into());
                };
                if text.trim().is_empty() {
                    return Err(bad(path, format!("line {n}: empty text in '{text_col}'")).into());
                }
                out.push((text.to_string(), label.to_string(), n));
            }
        }
        _ => {
            return Err(bad(path, "expected a .csv, .tsv or .jsonl file".into()).into());
        }
    }
    if out.is_empty() {
        return Err(bad(path, "no examples".into()).into());
    }
    Ok(out)
}

/// The three splits.
#[derive(Debug, Clone, PartialEq)]
pub struct Splits {
    pub train: Vec<Example>,
    pub val: Vec<Example>,
    pub test: Vec<Example>,
}

/// Balances (undersampling every class to the smallest, seeded), caps per class, shuffles with
/// the seed and splits: `floor(n·train)` / `floor(n·val)` / the rest, as the book's `random_split`.
pub fn split(examples: &[Example], n_classes: usize, spec: &ClassifyDataSpec, seed: u64) -> Splits {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut by_class: Vec<Vec<Example>> = vec![Vec::new(); n_classes];
    for e in examples {
        by_class[e.label].push(e.clone());
    }
    let smallest = by_class
        .iter()
        .map(Vec::len)
        .filter(|&n| n > 0)
        .min()
        .unwrap_or(0);
    let mut keep = Vec::new();
    for class in by_class.iter_mut() {
        let mut cap = class.len();
        if spec.balance {
            cap = cap.min(smallest);
        }
        if let Some(m) = spec.max_per_class {
            cap = cap.min(m);
        }
        if cap < class.len() {
            class.shuffle(&mut rng);
            class.truncate(cap);
            class.sort_by_key(|e| e.line); // file order, as pandas' sample then concat keeps rows
        }
        keep.append(class);
    }
    keep.shuffle(&mut rng);
    let n = keep.len();
    let n_train = (n as f64 * spec.split.0).floor() as usize;
    let n_val = (n as f64 * spec.split.1).floor() as usize;
    let test = keep.split_off(n_train + n_val);
    let val = keep.split_off(n_train);
    Splits {
        train: keep,
        val,
        test,
    }
}

/// Writes `train.csv`, `validation.csv` and `test.csv` (columns `Label,Text`, the label as its
/// class id) like the book.
pub fn write_splits(dir: &Path, s: &Splits) -> Result<()> {
    for (name, part) in [
        ("train", &s.train),
        ("validation", &s.val),
        ("test", &s.test),
    ] {
        let mut w = csv::Writer::from_writer(Vec::new());
        w.write_record(["Label", "Text"])?;
        for e in part.iter() {
            w.write_record([e.label.to_string(), e.text.clone()])?;
        }
        let bytes = w.into_inner().map_err(|e| anyhow::anyhow!("{e}"))?;
        write_atomic(&dir.join(format!("{name}.csv")), &bytes)?;
    }
    Ok(())
}

/// Token ids of one split, truncated, with each example's length before padding.
#[derive(Debug, Clone)]
pub struct Encoded {
    pub ids: Vec<Vec<i64>>,
    pub lens: Vec<i64>,
    pub labels: Vec<i64>,
    /// The padded length (`None`: no padding).
    pub pad_to: Option<usize>,
    pub pad_id: i64,
}

impl Encoded {
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Inputs `(b, T)`, their unpadded lengths `(b,)` and labels `(b,)` of the examples `idx`.
    pub fn batch(&self, idx: &[usize], device: Device) -> (Tensor, Tensor, Tensor) {
        let t = self
            .pad_to
            .unwrap_or_else(|| idx.iter().map(|&i| self.ids[i].len()).max().unwrap_or(1));
        let mut flat = Vec::with_capacity(idx.len() * t);
        for &i in idx {
            let row = &self.ids[i];
            flat.extend_from_slice(row);
            flat.extend(std::iter::repeat_n(self.pad_id, t - row.len()));
        }
        let x = Tensor::from_slice(&flat)
            .view([idx.len() as i64, t as i64])
            .to(device);
        let lens: Vec<i64> = idx.iter().map(|&i| self.lens[i]).collect();
        let ys: Vec<i64> = idx.iter().map(|&i| self.labels[i]).collect();
        (
            x,
            Tensor::from_slice(&lens).to(device),
            Tensor::from_slice(&ys).to(device),
        )
    }
}

/// Encodes a split: ids (with `bos` first when given), truncated to `max_len`, padded (in
/// [`Encoded::batch`]) to `pad_to`.
pub fn encode(
    examples: &[Example],
    tok: &crate::data::tokenizer::BpeTokenizer,
    bos: Option<i64>,
    max_len: Option<usize>,
    pad_to: Option<usize>,
    pad_id: i64,
) -> Result<Encoded> {
    let mut ids = Vec::with_capacity(examples.len());
    let mut lens = Vec::with_capacity(examples.len());
    for e in examples {
        let mut v: Vec<i64> = bos.into_iter().collect();
        v.extend(tok.encode(&e.text)?.into_iter().map(i64::from));
        if let Some(m) = max_len {
            v.truncate(m);
        }
        lens.push(v.len() as i64);
        ids.push(v);
    }
    Ok(Encoded {
        labels: examples.iter().map(|e| e.label as i64).collect(),
        ids,
        lens,
        pad_to,
        pad_id,
    })
}

pub use crate::finetune::batches;

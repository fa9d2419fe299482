//! Preference data (book ch07/04 `dpo-from-scratch.ipynb`): entries with an instruction, an
//! optional input, and a `chosen` and a `rejected` response (the book's
//! `instruction-data-with-preference.json`, 1,100 entries), split as the instruction data
//! (85 % / 5 % / 10 % in file order: 935 train, 55 validation, 110 test), tokenized as the book's
//! `PreferenceDataset` and batched as its `custom_collate_fn`.
use crate::error::LlmError;
use crate::instruct::data::{read_entries, InstructDataSpec, Splits};
use crate::prompt::{Entry, PromptStyle, Prompter};
use crate::resolve::LoadedLm;
use anyhow::Result;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use tch::{Device, Tensor};

/// `data:` of a DPO experiment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PreferenceDataSpec {
    /// A registered data set (default `preference-data`, the book's file).
    #[serde(default)]
    pub dataset: Option<String>,
    /// Or a `.json` file (an array of objects) or a `.jsonl` file (one object a line).
    #[serde(default)]
    pub path: Option<PathBuf>,
    #[serde(default = "instruction")]
    pub instruction_field: String,
    #[serde(default = "input")]
    pub input_field: String,
    #[serde(default = "chosen")]
    pub chosen_field: String,
    #[serde(default = "rejected")]
    pub rejected_field: String,
    /// Train / validation / test fractions, taken as the instruction data's (see
    /// [`InstructDataSpec::split`]).
    #[serde(default = "default_split")]
    pub split: (f64, f64, f64),
    #[serde(default)]
    pub shuffle: bool,
    #[serde(default)]
    pub max_train: Option<usize>,
    #[serde(default)]
    pub max_val: Option<usize>,
    #[serde(default)]
    pub max_test: Option<usize>,
    /// How a prompt becomes text (the book: alpaca).
    #[serde(default)]
    pub prompt_style: PromptStyle,
    /// Truncate every batch row to this many tokens (the book: 1024).
    #[serde(default = "default_max_len")]
    pub allowed_max_length: usize,
    /// Leave the prompt out of the log-probabilities (the book's `mask_prompt_tokens`).
    #[serde(default = "yes")]
    pub mask_prompt: bool,
}

fn instruction() -> String {
    "instruction".into()
}
fn input() -> String {
    "input".into()
}
fn chosen() -> String {
    "chosen".into()
}
fn rejected() -> String {
    "rejected".into()
}
fn default_split() -> (f64, f64, f64) {
    (0.85, 0.05, 0.1)
}
fn default_max_len() -> usize {
    1024
}
fn yes() -> bool {
    true
}

impl Default for PreferenceDataSpec {
    fn default() -> Self {
        Self {
            dataset: None,
            path: None,
            instruction_field: instruction(),
            input_field: input(),
            chosen_field: chosen(),
            rejected_field: rejected(),
            split: default_split(),
            shuffle: false,
            max_train: None,
            max_val: None,
            max_test: None,
            prompt_style: PromptStyle::Alpaca,
            allowed_max_length: default_max_len(),
            mask_prompt: true,
        }
    }
}

/// One preference pair: the rejected response beside the entry (whose `output` is the chosen
/// one; `raw` keeps every field of the record).
#[derive(Debug, Clone, PartialEq)]
pub struct Pair {
    pub entry: Entry,
    pub rejected: String,
}

/// The splits of the pairs, and how many pairs carry no signal (chosen = rejected).
#[derive(Debug, Clone)]
pub struct PairSplits {
    pub train: Vec<Pair>,
    pub val: Vec<Pair>,
    pub test: Vec<Pair>,
    pub identical: usize,
}

impl PairSplits {
    /// The records of each split (for `train.json`, `val.json`, `test.json`).
    pub fn entries(&self) -> Splits {
        let e = |v: &[Pair]| v.iter().map(|p| p.entry.clone()).collect();
        Splits {
            train: e(&self.train),
            val: e(&self.val),
            test: e(&self.test),
        }
    }
}

impl PreferenceDataSpec {
    /// The instruction-data settings that read and split the same file.
    fn as_instruct(&self) -> InstructDataSpec {
        InstructDataSpec {
            dataset: match (&self.dataset, &self.path) {
                (None, None) => Some("preference-data".into()),
                (d, _) => d.clone(),
            },
            path: self.path.clone(),
            instruction_field: self.instruction_field.clone(),
            input_field: self.input_field.clone(),
            output_field: self.chosen_field.clone(),
            split: self.split,
            shuffle: self.shuffle,
            max_train: self.max_train,
            max_val: self.max_val,
            max_test: self.max_test,
            prompt_style: self.prompt_style,
            allowed_max_length: self.allowed_max_length,
            mask_instruction: self.mask_prompt,
            packing: false,
        }
    }

    /// The first problem with the settings (a message starting with the key), if any.
    pub fn check(&self) -> Option<String> {
        self.as_instruct().check()
    }

    /// Reads every pair of the file; a record without its chosen or rejected response is an
    /// error naming the record.
    pub fn read(&self) -> Result<Vec<Pair>> {
        let spec = self.as_instruct();
        let path = spec.file()?;
        let entries = read_entries(
            &path,
            &self.instruction_field,
            &self.input_field,
            (&self.chosen_field, "chosen"),
        )?;
        entries
            .into_iter()
            .enumerate()
            .map(|(i, entry)| match entry.raw.get(&self.rejected_field) {
                Some(serde_json::Value::String(r)) => Ok(Pair {
                    rejected: r.clone(),
                    entry,
                }),
                other => Err(LlmError::BadFile {
                    path: path.clone(),
                    message: format!(
                        "record {}: {} (set data.rejected_field to the key your file uses)",
                        i + 1,
                        match other {
                            None => format!("no '{}' field", self.rejected_field),
                            Some(v) =>
                                format!("'{}' is {v}, expected a string", self.rejected_field),
                        }
                    ),
                }
                .into()),
            })
            .collect()
    }

    /// The split (as the instruction data's), with the pairs whose responses are identical
    /// counted.
    pub fn split(&self, pairs: &[Pair], seed: u64) -> PairSplits {
        let identical = pairs
            .iter()
            .filter(|p| p.entry.output == p.rejected)
            .count();
        // Split indices the way the entries are split, then take the pairs.
        let index_entries: Vec<Entry> = (0..pairs.len())
            .map(|i| Entry::new(&i.to_string(), "", ""))
            .collect();
        let s = self.as_instruct().split(&index_entries, seed);
        let take = |v: Vec<Entry>| -> Vec<Pair> {
            v.iter()
                .map(|e| pairs[e.instruction.parse::<usize>().unwrap_or(0)].clone())
                .collect()
        };
        PairSplits {
            train: take(s.train),
            val: take(s.val),
            test: take(s.test),
            identical,
        }
    }
}

/// A tokenized pair (the book's `PreferenceDataset` item): the chosen and the rejected full
/// texts, and how many leading tokens are left out of their log-probabilities.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedPair {
    pub chosen: Vec<i64>,
    pub rejected: Vec<i64>,
    pub masked: usize,
}

/// Tokenizes pairs as the book's `PreferenceDataset`: `prompt + response(chosen)` and
/// `prompt + response(rejected)`, each encoded whole. With `mask_prompt` the prompt's tokens
/// are masked, and in the Alpaca style two more, as the book's collate does
/// (`mask[:prompt.shape[0]+2] = False`, meant for the newlines before "### Response").
pub fn encode(
    lm: &LoadedLm,
    prompter: &Prompter,
    pairs: &[Pair],
    mask_prompt: bool,
) -> Result<Vec<EncodedPair>> {
    pairs
        .iter()
        .map(|p| {
            let prompt = prompter.prompt(&p.entry);
            let extra = if prompter.style == PromptStyle::Alpaca {
                2
            } else {
                0
            };
            let masked = if mask_prompt {
                lm.encode_prompt(&prompt)?.len() + extra
            } else {
                0
            };
            Ok(EncodedPair {
                chosen: lm
                    .encode_prompt(&(prompt.clone() + &prompter.response(&p.entry.output)))?,
                rejected: lm.encode_prompt(&(prompt + &prompter.response(&p.rejected)))?,
                masked,
            })
        })
        .collect()
}

/// A batch of pairs: the chosen sequences (rows `0..n`) then the rejected ones (rows `n..2n`),
/// padded to one length, with the mask of the tokens whose log-probabilities count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PairBatch {
    pub ids: Vec<i64>,
    pub mask: Vec<bool>,
    /// Pairs in the batch (the tensors have twice as many rows).
    pub pairs: usize,
    pub cols: usize,
}

impl PairBatch {
    /// `(ids, mask)` tensors `(2·pairs, cols)` on `device`.
    pub fn tensors(&self, device: Device) -> (Tensor, Tensor) {
        let shape = [2 * self.pairs as i64, self.cols as i64];
        (
            Tensor::from_slice(&self.ids).view(shape).to(device),
            Tensor::from_slice(&self.mask).view(shape).to(device),
        )
    }
}

/// The book's `custom_collate_fn`: every chosen and rejected sequence padded with `pad_id` to
/// the batch's longest of either + 1, its mask off on the padding and on the first `masked`
/// tokens, then every row truncated to `allowed_max_length`.
pub fn collate(
    batch: &[&EncodedPair],
    pad_id: i64,
    allowed_max_length: Option<usize>,
) -> PairBatch {
    let longest = batch
        .iter()
        .map(|p| p.chosen.len().max(p.rejected.len()) + 1)
        .max()
        .unwrap_or(1);
    let cols = allowed_max_length.map_or(longest, |m| longest.min(m));
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for rejected in [false, true] {
        for p in batch {
            let seq = if rejected { &p.rejected } else { &p.chosen };
            for j in 0..cols {
                ids.push(seq.get(j).copied().unwrap_or(pad_id));
                mask.push(j < seq.len() && j >= p.masked);
            }
        }
    }
    PairBatch {
        ids,
        mask,
        pairs: batch.len(),
        cols,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The book's worked example shape: two pairs, a prompt of 3 tokens (+2 masked), chosen
    /// and rejected of different lengths, padded to the longest + 1, then truncated.
    #[test]
    fn collate_pads_masks_and_truncates_as_the_book() {
        let a = EncodedPair {
            chosen: vec![1, 2, 3, 4, 5, 6, 7],
            rejected: vec![1, 2, 3, 4, 5, 8],
            masked: 5,
        };
        let b = EncodedPair {
            chosen: vec![9, 9, 9, 9, 9, 9, 9, 9],
            rejected: vec![9, 9, 9, 9, 9, 9, 9, 9, 9, 1],
            masked: 5,
        };
        let batch = collate(&[&a, &b], 0, None);
        assert_eq!((batch.pairs, batch.cols), (2, 11));
        // Row 0: a's chosen; row 2: a's rejected.
        assert_eq!(&batch.ids[..11], &[1, 2, 3, 4, 5, 6, 7, 0, 0, 0, 0]);
        assert_eq!(&batch.ids[22..33], &[1, 2, 3, 4, 5, 8, 0, 0, 0, 0, 0]);
        let m = |r: usize| -> Vec<u8> {
            batch.mask[r * 11..(r + 1) * 11]
                .iter()
                .map(|&x| x as u8)
                .collect()
        };
        assert_eq!(m(0), [0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 0]);
        assert_eq!(m(1), [0, 0, 0, 0, 0, 1, 1, 1, 0, 0, 0]);
        assert_eq!(m(2), [0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0]);
        assert_eq!(m(3), [0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 0]);
        let cut = collate(&[&a, &b], 0, Some(7));
        assert_eq!(cut.cols, 7);
        assert_eq!(&cut.ids[21..28], &[9, 9, 9, 9, 9, 9, 9]);
        assert_eq!(
            cut.mask[21..28].iter().filter(|&&x| x).count(),
            2,
            "b's rejected keeps positions 5 and 6"
        );
    }
}

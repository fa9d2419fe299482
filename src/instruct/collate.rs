//! Batching instruction examples (book ch07 §7.3 `custom_collate_fn`, exercise 7.2's
//! `custom_collate_with_masking_fn`), and optional packing of several examples per row.
use tch::{Device, Tensor};

/// One tokenized example: the whole text and how many of its tokens are the prompt
/// (instruction and input).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Encoded {
    pub ids: Vec<i64>,
    pub prompt_len: usize,
}

impl Encoded {
    pub fn new(ids: Vec<i64>, prompt_len: usize) -> Self {
        Self { ids, prompt_len }
    }
}

/// The collate settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CollateOptions {
    /// Pads and ends every example (`<|endoftext|>`, 50256 for GPT-2).
    pub pad_id: i64,
    /// Target value the loss skips (PyTorch's -100).
    pub ignore_index: i64,
    /// Truncate inputs and targets to this many tokens.
    pub allowed_max_length: Option<usize>,
    /// Exercise 7.2: set the targets of the instruction and input tokens to `ignore_index`.
    pub mask_instruction: bool,
}

impl Default for CollateOptions {
    fn default() -> Self {
        Self {
            pad_id: 50256,
            ignore_index: -100,
            allowed_max_length: None,
            mask_instruction: false,
        }
    }
}

/// Inputs and targets as row-major vectors with their shape `(b, t)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Batch {
    pub inputs: Vec<i64>,
    pub targets: Vec<i64>,
    pub rows: usize,
    pub cols: usize,
}

impl Batch {
    /// `(inputs, targets)` tensors `(b, t)` on `device`.
    pub fn tensors(&self, device: Device) -> (Tensor, Tensor) {
        let shape = [self.rows as i64, self.cols as i64];
        (
            Tensor::from_slice(&self.inputs).view(shape).to(device),
            Tensor::from_slice(&self.targets).view(shape).to(device),
        )
    }

    /// Targets that count in the loss.
    pub fn n_targets(&self, ignore_index: i64) -> usize {
        self.targets.iter().filter(|&&t| t != ignore_index).count()
    }
}

/// The book's collate: each example gets one end-of-text token and is padded to the batch's
/// longest example + 1; targets are the inputs shifted by one; every padding target but the
/// first is `ignore_index`; then (exercise 7.2) the prompt's targets are masked; then rows are
/// truncated to `allowed_max_length`.
pub fn collate(batch: &[&Encoded], opts: &CollateOptions) -> Batch {
    let batch_max_length = batch.iter().map(|e| e.ids.len() + 1).max().unwrap_or(1);
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    let mut cols = 0;
    for item in batch {
        let mut padded = item.ids.clone();
        padded.push(opts.pad_id);
        padded.resize(batch_max_length, opts.pad_id);
        let mut inp = padded[..padded.len() - 1].to_vec();
        let mut tgt = padded[1..].to_vec();
        // Replace all but the first padding tokens in targets by ignore_index.
        for t in tgt.iter_mut().filter(|t| **t == opts.pad_id).skip(1) {
            *t = opts.ignore_index;
        }
        if opts.mask_instruction {
            // targets[:instruction_length-1] = -100
            let n = item.prompt_len.saturating_sub(1).min(tgt.len());
            tgt[..n].fill(opts.ignore_index);
        }
        if let Some(m) = opts.allowed_max_length {
            inp.truncate(m);
            tgt.truncate(m);
        }
        cols = inp.len();
        inputs.extend(inp);
        targets.extend(tgt);
    }
    Batch {
        inputs,
        targets,
        rows: batch.len(),
        cols,
    }
}

/// Packing: consecutive examples, each followed by the end-of-text token, share a row of at
/// most `max_length` inputs (an example longer than a row gets a row of its own, truncated).
/// Returns the rows as `(ids, keep)`, where `keep[i]` says whether the target of position `i`
/// (the token `ids[i + 1]`) counts in the loss.
pub fn pack(
    items: &[&Encoded],
    max_length: usize,
    opts: &CollateOptions,
) -> Vec<(Vec<i64>, Vec<bool>)> {
    let mut rows: Vec<(Vec<i64>, Vec<bool>)> = Vec::new();
    let mut cur: (Vec<i64>, Vec<bool>) = (Vec::new(), Vec::new());
    for e in items {
        // Token j of the example is a target (of position j - 1) unless it is in the prompt.
        let mut ids = e.ids.clone();
        ids.push(opts.pad_id);
        let keep: Vec<bool> = (0..ids.len())
            .map(|j| !(opts.mask_instruction && j < e.prompt_len))
            .collect();
        if !cur.0.is_empty() && cur.0.len() + ids.len() > max_length + 1 {
            rows.push(std::mem::take(&mut cur));
        }
        cur.0.extend(ids);
        cur.1.extend(keep);
    }
    if !cur.0.is_empty() {
        rows.push(cur);
    }
    rows.into_iter()
        .map(|(mut ids, keep)| {
            ids.truncate(max_length + 1);
            // keep[i] for the target of position i is the flag of token i + 1.
            let k: Vec<bool> = keep[1..ids.len()].to_vec();
            (ids, k)
        })
        .collect()
}

/// Batches packed rows: inputs padded with `pad_id`, targets shifted by one, every padding and
/// masked target `ignore_index`.
pub fn collate_packed(rows: &[&(Vec<i64>, Vec<bool>)], opts: &CollateOptions) -> Batch {
    let cols = rows
        .iter()
        .map(|(ids, _)| ids.len().saturating_sub(1))
        .max()
        .unwrap_or(0)
        .max(1);
    let (mut inputs, mut targets) = (Vec::new(), Vec::new());
    for (ids, keep) in rows {
        for i in 0..cols {
            if i + 1 < ids.len() {
                inputs.push(ids[i]);
                targets.push(if keep[i] {
                    ids[i + 1]
                } else {
                    opts.ignore_index
                });
            } else {
                inputs.push(opts.pad_id);
                targets.push(opts.ignore_index);
            }
        }
    }
    Batch {
        inputs,
        targets,
        rows: rows.len(),
        cols,
    }
}

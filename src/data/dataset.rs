//! Sliding-window data set and loader (book ch02 §2.6, `GPTDatasetV1` + `create_dataloader_v1`).
use crate::error::LlmError;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use tch::{Device, Tensor};

/// Input/target windows over one token stream: window `i` is `ids[s..s+max_length]` and its
/// target is the same window shifted by one token, for `s = 0, stride, 2*stride, …` while
/// `s < len - max_length` (exactly the book's `range(0, len(token_ids) - max_length, stride)`).
#[derive(Debug, Clone)]
pub struct GptDataset {
    ids: Vec<i64>,
    starts: Vec<usize>,
    max_length: usize,
}

impl GptDataset {
    pub fn new(ids: &[u32], max_length: usize, stride: usize) -> Result<Self, LlmError> {
        if max_length == 0 || stride == 0 {
            return Err(LlmError::Usage(format!(
                "max_length ({max_length}) and stride ({stride}) must be at least 1"
            )));
        }
        if ids.len() <= max_length {
            return Err(LlmError::TextTooShort {
                tokens: ids.len(),
                max_length,
            });
        }
        let starts = (0..ids.len() - max_length).step_by(stride).collect();
        Ok(Self {
            ids: ids.iter().map(|&i| i as i64).collect(),
            starts,
            max_length,
        })
    }

    pub fn len(&self) -> usize {
        self.starts.len()
    }

    pub fn is_empty(&self) -> bool {
        self.starts.is_empty()
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The `i`-th (input, target) pair as token-id slices.
    pub fn get(&self, i: usize) -> (&[i64], &[i64]) {
        let s = self.starts[i];
        (
            &self.ids[s..s + self.max_length],
            &self.ids[s + 1..s + self.max_length + 1],
        )
    }
}

/// Batches of a [`GptDataset`]: `batch_size`, seeded shuffle per epoch, `drop_last`.
#[derive(Debug, Clone)]
pub struct DataLoader {
    pub dataset: GptDataset,
    pub batch_size: usize,
    pub shuffle: bool,
    pub drop_last: bool,
    pub seed: u64,
}

impl DataLoader {
    pub fn new(
        dataset: GptDataset,
        batch_size: usize,
        shuffle: bool,
        drop_last: bool,
        seed: u64,
    ) -> Result<Self, LlmError> {
        if batch_size == 0 {
            return Err(LlmError::Usage("batch_size must be at least 1".into()));
        }
        Ok(Self {
            dataset,
            batch_size,
            shuffle,
            drop_last,
            seed,
        })
    }

    /// Number of batches per epoch.
    pub fn num_batches(&self) -> usize {
        let n = self.dataset.len();
        if self.drop_last {
            n / self.batch_size
        } else {
            n.div_ceil(self.batch_size)
        }
    }

    /// Window order for an epoch: identity, or a permutation seeded by `(seed, epoch)`.
    pub fn order(&self, epoch: usize) -> Vec<usize> {
        let mut idx: Vec<usize> = (0..self.dataset.len()).collect();
        if self.shuffle {
            let mut rng =
                StdRng::seed_from_u64(self.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ epoch as u64);
            idx.shuffle(&mut rng);
        }
        idx
    }

    /// Batch `b` of epoch `epoch` as `(inputs, targets)`, each `(batch, max_length)` int64.
    pub fn batch(&self, epoch: usize, b: usize, device: Device) -> (Tensor, Tensor) {
        let order = self.order(epoch);
        self.batch_in_order(&order, b, device)
    }

    /// Batch `b` of a window order from [`order`](Self::order).
    pub fn batch_in_order(&self, order: &[usize], b: usize, device: Device) -> (Tensor, Tensor) {
        let lo = b * self.batch_size;
        let hi = (lo + self.batch_size).min(order.len());
        let t = self.dataset.max_length as i64;
        let mut x = Vec::with_capacity((hi - lo) * t as usize);
        let mut y = Vec::with_capacity((hi - lo) * t as usize);
        for &i in &order[lo..hi] {
            let (inp, tgt) = self.dataset.get(i);
            x.extend_from_slice(inp);
            y.extend_from_slice(tgt);
        }
        let n = (hi - lo) as i64;
        (
            Tensor::from_slice(&x).view([n, t]).to_device(device),
            Tensor::from_slice(&y).view([n, t]).to_device(device),
        )
    }

    /// All batches of one epoch, in order.
    pub fn iter_epoch(
        &self,
        epoch: usize,
        device: Device,
    ) -> impl Iterator<Item = (Tensor, Tensor)> + '_ {
        let order = self.order(epoch);
        (0..self.num_batches()).map(move |b| self.batch_in_order(&order, b, device))
    }
}

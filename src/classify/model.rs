//! The classifier (book ch06 §6.5): a pretrained GPT or Llama-family model whose output head is
//! replaced by a `num_classes` head, which reads one token's (or the mean) final hidden state.
//! Which parameters train is a [`Trainable`] strategy; LoRA adapters come from [`crate::nn::lora`].
use crate::error::LlmError;
use crate::models::lm::{AnyModel, LoadedLm};
use crate::nn::lora::LoraConfig;
use crate::nn::Linear;
use serde::{Deserialize, Serialize};
use tch::nn::Module;
use tch::{Kind, Tensor};

/// Which token's hidden state feeds the head.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenPos {
    /// The last position, padding or not (the book).
    #[default]
    Last,
    /// The first position.
    First,
    /// The last non-padding token of each example.
    Flexible,
    /// The mean over the non-padding tokens.
    Mean,
}

/// `finetune.trainable`: what is trained besides the new head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trainable {
    /// The new head only.
    Head,
    /// The head and the final norm (the last layer before the head).
    LastLayer,
    /// The last N transformer blocks, the final norm and the head (`last_block`,
    /// `last_2_blocks`, `last_N_blocks`).
    LastBlocks(usize),
    /// Every parameter.
    All,
    /// LoRA adapters (`finetune.lora`) with the final norm and the head; the base weights stay frozen.
    Lora,
}

impl Trainable {
    pub const ACCEPTED: &'static str =
        "head, last_layer, last_block, last_2_blocks, last_N_blocks (any N >= 1), all, lora";

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "head" => Self::Head,
            "last_layer" => Self::LastLayer,
            "last_block" => Self::LastBlocks(1),
            "all" => Self::All,
            "lora" => Self::Lora,
            _ => {
                let n = s.strip_prefix("last_")?.strip_suffix("_blocks")?;
                let n: usize = n.parse().ok()?;
                if n == 0 {
                    return None;
                }
                Self::LastBlocks(n)
            }
        })
    }

    pub fn name(&self) -> String {
        match self {
            Self::Head => "head".into(),
            Self::LastLayer => "last_layer".into(),
            Self::LastBlocks(1) => "last_block".into(),
            Self::LastBlocks(n) => format!("last_{n}_blocks"),
            Self::All => "all".into(),
            Self::Lora => "lora".into(),
        }
    }

    /// The first block whose parameters train (`n_layers` when none does), i.e. where a frozen
    /// prefix ends; `0` when the embeddings or adapters in every block train.
    pub fn first_trained_block(&self, n_layers: usize) -> usize {
        match self {
            Self::Head | Self::LastLayer => n_layers,
            Self::LastBlocks(k) => n_layers.saturating_sub(*k),
            Self::All | Self::Lora => 0,
        }
    }
}

impl Serialize for Trainable {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.name())
    }
}

impl<'de> Deserialize<'de> for Trainable {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Trainable::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown trainable '{s}'; expected one of: {}",
                Trainable::ACCEPTED
            ))
        })
    }
}

/// A language model with a classification head.
pub struct Classifier {
    pub lm: LoadedLm,
    pub head: Linear,
    pub token: TokenPos,
    pub num_classes: i64,
}

impl std::fmt::Debug for Classifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Classifier")
            .field("model", &self.lm.name)
            .field("num_classes", &self.num_classes)
            .field("token", &self.token)
            .finish()
    }
}

impl Classifier {
    /// Adds a fresh `cls_head` (PyTorch's `nn.Linear` initialisation, drawn from the current
    /// libtorch seed) to a loaded model.
    pub fn new(lm: LoadedLm, num_classes: i64, token: TokenPos) -> Self {
        let emb = match &lm.model {
            AnyModel::Gpt(m) => m.cfg.emb_dim,
            AnyModel::Llama(m) => m.cfg.emb_dim,
        };
        let head = crate::nn::layers::linear(lm.vs.root() / "cls_head", emb, num_classes, true);
        Self {
            lm,
            head,
            token,
            num_classes,
        }
    }

    pub fn n_layers(&self) -> usize {
        match &self.lm.model {
            AnyModel::Gpt(m) => m.trf_blocks.len(),
            AnyModel::Llama(m) => m.trf_blocks.len(),
        }
    }

    pub fn context_length(&self) -> i64 {
        self.lm.context_length()
    }

    /// Sets the dropout rate of every block (and the embeddings).
    pub fn set_dropout(&mut self, p: f64) {
        match &mut self.lm.model {
            AnyModel::Gpt(m) => {
                m.cfg.drop_rate = p;
                for b in &mut m.trf_blocks {
                    b.drop_rate = p;
                    b.att.dropout = p;
                }
            }
            AnyModel::Llama(m) => m.set_drop_rate(p),
        }
    }

    pub fn drop_rate(&self) -> f64 {
        match &self.lm.model {
            AnyModel::Gpt(m) => m.cfg.drop_rate,
            AnyModel::Llama(m) => m.cfg.drop_rate,
        }
    }

    /// Turns the causal mask of every attention layer on or off.
    pub fn set_causal(&mut self, causal: bool) {
        match &mut self.lm.model {
            AnyModel::Gpt(m) => m.trf_blocks.iter_mut().for_each(|b| b.att.causal = causal),
            AnyModel::Llama(m) => m.trf_blocks.iter_mut().for_each(|b| b.att.causal = causal),
        }
    }

    /// Adds LoRA adapters (`lora_A`, `lora_B` beside each adapted weight).
    pub fn add_lora(&mut self, cfg: &LoraConfig) {
        self.lm.add_lora(cfg);
    }

    /// Folds every adapter into its weight.
    pub fn merge_lora(&mut self) {
        self.lm.merge_lora();
    }

    /// Marks what `strategy` trains (`requires_grad`) and freezes everything else; returns the
    /// trained variables, sorted by name.
    pub fn set_trainable(&mut self, strategy: Trainable) -> Vec<(String, Tensor)> {
        let n = self.n_layers();
        let first = strategy.first_trained_block(n);
        let trained = |name: &str| -> bool {
            if name.starts_with("cls_head.") {
                return true;
            }
            if name.starts_with("out_head.") {
                return false; // the language-model head the new head replaces: unused
            }
            match strategy {
                Trainable::Head => false,
                Trainable::All => true,
                Trainable::Lora => name.starts_with("final_norm.") || name.contains(".lora_"),
                Trainable::LastLayer | Trainable::LastBlocks(_) => {
                    name.starts_with("final_norm.")
                        || name
                            .strip_prefix("trf_blocks.")
                            .and_then(|r| r.split('.').next())
                            .and_then(|i| i.parse::<usize>().ok())
                            .is_some_and(|i| i >= first)
                }
            }
        };
        let mut out = Vec::new();
        for (name, t) in self.lm.vs.variables() {
            let on = trained(&name);
            let _ = t.set_requires_grad(on);
            if on {
                out.push((name, t));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// The input of block 0.
    pub fn embed(&self, idx: &Tensor, train: bool) -> Tensor {
        match &self.lm.model {
            AnyModel::Gpt(m) => m.embed(idx, train),
            AnyModel::Llama(m) => m.embed(idx, train),
        }
    }

    /// Runs blocks `from..to` on `x`.
    pub fn blocks(&self, x: &Tensor, from: usize, to: usize, train: bool) -> Tensor {
        let mut x = x.shallow_clone();
        for i in from..to {
            x = match &self.lm.model {
                AnyModel::Gpt(m) => m.trf_blocks[i].forward_t(&x, train),
                AnyModel::Llama(m) => m.block_forward(i, &x, train),
            };
        }
        x
    }

    /// Final norm, token selection and head: `(b, T, emb)` → `(b, num_classes)`; `lens` are the
    /// unpadded lengths `(b,)`.
    pub fn head_logits(&self, x: &Tensor, lens: &Tensor) -> Tensor {
        let h = match &self.lm.model {
            AnyModel::Gpt(m) => m.final_norm.forward(x),
            AnyModel::Llama(m) => m.final_norm.forward(x),
        };
        let (b, t, _) = h.size3().expect("(b, T, emb) hidden states");
        let pooled = match self.token {
            TokenPos::Last => h.select(1, t - 1),
            TokenPos::First => h.select(1, 0),
            TokenPos::Flexible => {
                let idx = (lens - 1)
                    .clamp(0, t - 1)
                    .view([b, 1, 1])
                    .expand([b, 1, h.size()[2]], false);
                h.gather(1, &idx, false).squeeze_dim(1)
            }
            TokenPos::Mean => {
                let pos = Tensor::arange(t, (Kind::Int64, h.device())).view([1, t]);
                let mask = pos
                    .lt_tensor(&lens.view([b, 1]))
                    .to_kind(h.kind())
                    .unsqueeze(-1);
                (&h * &mask).sum_dim_intlist(1, false, h.kind())
                    / mask.sum_dim_intlist(1, false, h.kind())
            }
        };
        self.head.forward(&pooled)
    }

    /// Class logits of token ids `(b, T)` from blocks `from..` on precomputed inputs `x`
    /// (`from = 0` and `x = embed(idx)` is the plain path).
    pub fn logits_from(&self, x: &Tensor, from: usize, lens: &Tensor, train: bool) -> Tensor {
        let h = self.blocks(x, from, self.n_layers(), train);
        self.head_logits(&h, lens)
    }

    /// Class logits of token ids `(b, T)`.
    pub fn logits(&self, idx: &Tensor, lens: &Tensor, train: bool) -> Tensor {
        self.logits_from(&self.embed(idx, train), 0, lens, train)
    }
}

/// Cross-entropy of class logits against labels, with the book's `ignore_index`.
pub fn class_loss(logits: &Tensor, labels: &Tensor, ignore_index: i64) -> Tensor {
    logits.cross_entropy_loss::<Tensor>(labels, None, tch::Reduction::Mean, ignore_index, 0.0)
}

/// Number of correct predictions.
pub fn correct(logits: &Tensor, labels: &Tensor) -> i64 {
    logits
        .argmax(-1, false)
        .eq_tensor(labels)
        .sum(Kind::Int64)
        .int64_value(&[])
}

/// The first problem with a strategy for a model with `n_layers` blocks.
pub fn check_trainable(t: Trainable, n_layers: usize) -> Result<(), LlmError> {
    if let Trainable::LastBlocks(k) = t {
        if k > n_layers {
            return Err(LlmError::Usage(format!(
                "finetune.trainable = {}: the model has only {n_layers} blocks",
                t.name()
            )));
        }
    }
    Ok(())
}

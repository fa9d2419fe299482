//! The classifier (book ch06 §6.5): a pretrained GPT or Llama-family model whose output head is
//! replaced by a `num_classes` head, which reads one token's (or the mean) final hidden state.
//! Which parameters train is a [`Trainable`] strategy; LoRA adapters come from [`crate::nn::lora`].
use crate::error::LlmError;
pub use crate::models::pooling::TokenPos;
pub use crate::models::trainable::{Method, Trainable};
use crate::nn::lora::LoraConfig;
use crate::nn::Linear;
use crate::resolve::{AnyModel, LoadedLm};
use tch::nn::Module;
use tch::{Kind, Tensor};

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
        let head = crate::resolve::saved::class_head(&lm, num_classes);
        Self {
            lm,
            head,
            token,
            num_classes,
        }
    }

    pub fn n_layers(&self) -> usize {
        self.lm.model.n_layers()
    }

    pub fn context_length(&self) -> i64 {
        self.lm.context_length()
    }

    /// Sets the dropout rate of every block (and the embeddings).
    pub fn set_dropout(&mut self, p: f64) {
        self.lm.model.set_drop_rate(p);
    }

    pub fn drop_rate(&self) -> f64 {
        self.lm.model.drop_rate()
    }

    /// Turns the causal mask of every attention layer on or off.
    pub fn set_causal(&mut self, causal: bool) {
        self.lm.model.set_causal(causal);
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
    /// trained variables, sorted by name. The new head (`cls_head`) always trains; the
    /// language-model head it replaces (`out_head`) never does.
    pub fn set_trainable(&mut self, strategy: Trainable) -> Vec<(String, Tensor)> {
        self.set_trainable_with(strategy, Method::Full)
    }

    /// [`Self::set_trainable`] with LoRA as the method on the chosen blocks.
    pub fn set_trainable_with(
        &mut self,
        strategy: Trainable,
        method: Method,
    ) -> Vec<(String, Tensor)> {
        crate::finetune::set_trainable(
            &self.lm,
            strategy,
            method,
            Some("cls_head."),
            Some("out_head."),
        )
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
        self.head
            .forward(&crate::models::pooling::pool(&h, lens, self.token))
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

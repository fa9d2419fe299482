//! Low-rank adaptation (book appendix E): a frozen linear layer `W x + b` plus a trainable
//! low-rank update `scale · (dropout(x) A) B`, with `A` `(in, rank)` initialised like the book
//! (`kaiming_uniform_(a=√5)`, i.e. uniform in ±1/√rank) and `B` `(rank, out)` zero, so a fresh
//! adapter leaves the model's outputs unchanged.
use serde::{Deserialize, Serialize};
use tch::nn;
use tch::Tensor;

/// How the update is scaled.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraScale {
    /// `alpha`, as the book's `LoRALayer` (`alpha * (x @ A @ B)`).
    #[default]
    Alpha,
    /// `alpha / rank`, as Hugging Face PEFT and the LoRA paper.
    AlphaOverRank,
}

/// Which linear layers of each transformer block get an adapter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LoraTarget {
    /// Query, key, value and output projections.
    Attention,
    /// The feed-forward layers (GPT: both; Llama: gate, up and down).
    FeedForward,
}

/// `finetune.lora`: rank, alpha, dropout on the adapter's input, target modules.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraConfig {
    #[serde(default = "default_rank")]
    pub rank: i64,
    #[serde(default = "default_alpha")]
    pub alpha: f64,
    #[serde(default)]
    pub dropout: f64,
    #[serde(default = "default_targets")]
    pub targets: Vec<LoraTarget>,
    #[serde(default)]
    pub scale: LoraScale,
}

fn default_rank() -> i64 {
    16
}
fn default_alpha() -> f64 {
    16.0
}
fn default_targets() -> Vec<LoraTarget> {
    vec![LoraTarget::Attention, LoraTarget::FeedForward]
}

impl Default for LoraConfig {
    fn default() -> Self {
        Self {
            rank: default_rank(),
            alpha: default_alpha(),
            dropout: 0.0,
            targets: default_targets(),
            scale: LoraScale::Alpha,
        }
    }
}

impl LoraConfig {
    pub fn scaling(&self) -> f64 {
        match self.scale {
            LoraScale::Alpha => self.alpha,
            LoraScale::AlphaOverRank => self.alpha / self.rank as f64,
        }
    }

    /// The first problem with the settings, as a message naming the key.
    pub fn check(&self) -> Option<String> {
        if self.rank < 1 {
            return Some(format!(
                "finetune.lora.rank = {}: expected an integer >= 1",
                self.rank
            ));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Some(format!(
                "finetune.lora.alpha = {}: expected a number > 0",
                self.alpha
            ));
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Some(format!(
                "finetune.lora.dropout = {}: expected a value in [0, 1)",
                self.dropout
            ));
        }
        if self.targets.is_empty() {
            return Some(
                "finetune.lora.targets is empty: expected attention and/or feed_forward".into(),
            );
        }
        None
    }
}

thread_local! {
    static ADAPTERS_OFF: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every LoRA adapter of this thread's models left out, so a model with
/// adapters computes as its base model (PEFT's `disable_adapter()`; DPO's reference model
/// without a second copy of the weights).
pub fn without_adapters<T>(f: impl FnOnce() -> T) -> T {
    let before = ADAPTERS_OFF.with(|c| c.replace(true));
    let out = f();
    ADAPTERS_OFF.with(|c| c.set(before));
    out
}

/// One adapter: `A` `(in, rank)`, `B` `(rank, out)`.
#[derive(Debug)]
pub struct Lora {
    pub a: Tensor,
    pub b: Tensor,
    pub scale: f64,
    pub dropout: f64,
}

impl Lora {
    /// Creates `lora_A` and `lora_B` under `p` (the linear layer's path).
    pub fn new(p: &nn::Path, in_dim: i64, out_dim: i64, cfg: &LoraConfig) -> Self {
        let bound = 1.0 / (cfg.rank as f64).sqrt();
        Self {
            a: p.var(
                "lora_A",
                &[in_dim, cfg.rank],
                nn::Init::Uniform {
                    lo: -bound,
                    up: bound,
                },
            ),
            b: p.zeros("lora_B", &[cfg.rank, out_dim]),
            scale: cfg.scaling(),
            dropout: cfg.dropout,
        }
    }

    /// `y` plus the update for input `x` `(…, in)` → `(…, out)`; `y` unchanged inside
    /// [`without_adapters`].
    pub fn add_delta(&self, y: Tensor, x: &Tensor, train: bool) -> Tensor {
        if ADAPTERS_OFF.with(|c| c.get()) {
            return y;
        }
        y + x
            .dropout(self.dropout, train)
            .matmul(&self.a)
            .matmul(&self.b)
            * self.scale
    }

    /// `scale · (A B)ᵀ`, the update as a `(out, in)` weight.
    pub fn weight_delta(&self) -> Tensor {
        self.a.matmul(&self.b).tr() * self.scale
    }
}

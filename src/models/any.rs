//! Either model family behind one type ([`AnyModel`]), with what fine-tuning and the resolver
//! ask of a model whatever its family: sizes, dropout, the forward pass, the layers LoRA adapts.
use crate::models::gpt::GptModel;
use crate::models::llama::LlamaModel;
use crate::nn::lora::LoraTarget;
use crate::nn::Linear;
use tch::Tensor;

/// Either model family.
#[derive(Debug)]
pub enum AnyModel {
    Gpt(GptModel),
    Llama(LlamaModel),
}

impl AnyModel {
    /// Logits `(b, n, vocab)` of token ids `(b, n)`; dropout on when `train`.
    pub fn forward_t(&self, idx: &Tensor, train: bool) -> Tensor {
        match self {
            Self::Gpt(m) => m.forward_t(idx, train),
            Self::Llama(m) => m.forward_t(idx, train),
        }
    }

    /// The number of transformer blocks.
    pub fn n_layers(&self) -> usize {
        match self {
            Self::Gpt(m) => m.trf_blocks.len(),
            Self::Llama(m) => m.trf_blocks.len(),
        }
    }

    /// The width of the hidden states (`emb_dim`).
    pub fn emb_dim(&self) -> i64 {
        match self {
            Self::Gpt(m) => m.cfg.emb_dim,
            Self::Llama(m) => m.cfg.emb_dim,
        }
    }

    pub fn context_length(&self) -> i64 {
        match self {
            Self::Gpt(m) => m.cfg.context_length,
            Self::Llama(m) => m.cfg.context_length,
        }
    }

    pub fn vocab_size(&self) -> i64 {
        match self {
            Self::Gpt(m) => m.cfg.vocab_size,
            Self::Llama(m) => m.cfg.vocab_size,
        }
    }

    /// Turns the causal mask of every attention layer on or off.
    pub fn set_causal(&mut self, causal: bool) {
        match self {
            Self::Gpt(m) => m.trf_blocks.iter_mut().for_each(|b| b.att.causal = causal),
            Self::Llama(m) => m.trf_blocks.iter_mut().for_each(|b| b.att.causal = causal),
        }
    }

    pub fn drop_rate(&self) -> f64 {
        match self {
            Self::Gpt(m) => m.cfg.drop_rate,
            Self::Llama(m) => m.cfg.drop_rate,
        }
    }

    /// Sets the dropout rate of every block (and the embeddings).
    pub fn set_drop_rate(&mut self, p: f64) {
        match self {
            Self::Gpt(m) => {
                m.cfg.drop_rate = p;
                for b in &mut m.trf_blocks {
                    b.drop_rate = p;
                    b.att.dropout = p;
                }
            }
            Self::Llama(m) => m.set_drop_rate(p),
        }
    }

    /// The layers LoRA adapts, by target, in the blocks `blocks`.
    pub fn lora_layers(
        &mut self,
        targets: &[LoraTarget],
        blocks: std::ops::Range<usize>,
    ) -> Vec<&mut Linear> {
        let att = targets.contains(&LoraTarget::Attention);
        let ff = targets.contains(&LoraTarget::FeedForward);
        let per_block: Vec<([&mut Linear; 4], Vec<&mut Linear>)> = match self {
            AnyModel::Gpt(m) => m.trf_blocks[blocks]
                .iter_mut()
                .map(|b| b.linears())
                .collect(),
            AnyModel::Llama(m) => m.trf_blocks[blocks]
                .iter_mut()
                .map(|b| b.linears())
                .collect(),
        };
        let mut out = Vec::new();
        for (attention, feed_forward) in per_block {
            if att {
                out.extend(attention);
            }
            if ff {
                out.extend(feed_forward);
            }
        }
        out
    }
}

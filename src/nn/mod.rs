//! Neural-network blocks the book teaches on their own: attention (ch03), LayerNorm, GELU and
//! the feed-forward network (ch04); and, beyond the book, weight-only 4-bit linear layers for
//! inference ([`quant`]).
pub mod attention;
pub mod layers;
pub mod lora;
pub mod quant;

pub use attention::{
    AttentionImpl, CausalAttention, MultiHeadAttention, MultiHeadAttentionWrapper, SelfAttentionV1,
    SelfAttentionV2,
};
pub use layers::{FeedForward, LayerNorm, Linear};
pub use lora::{Lora, LoraConfig};

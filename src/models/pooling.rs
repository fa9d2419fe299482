//! Which hidden state a sequence-level head reads (book ch06 §6.5 reads the last one): the last
//! position, the first, each row's last real token, or the mean over the real tokens.
use serde::{Deserialize, Serialize};
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

/// Hidden states `(b, T, emb)` → `(b, emb)` at `token`; `lens` are the unpadded lengths `(b,)`.
pub fn pool(h: &Tensor, lens: &Tensor, token: TokenPos) -> Tensor {
    let (b, t, _) = h.size3().expect("(b, T, emb) hidden states");
    match token {
        TokenPos::Last => h.select(1, t - 1),
        TokenPos::First => h.select(1, 0),
        TokenPos::Flexible => {
            // Each row's last real position, (b,) → (b, 1, 1) → (b, 1, emb): gather along
            // the positions picks h[i, lens[i] - 1, :], then (b, 1, emb) → (b, emb).
            let idx = (lens - 1)
                .clamp(0, t - 1)
                .view([b, 1, 1])
                .expand([b, 1, h.size()[2]], false);
            h.gather(1, &idx, false).squeeze_dim(1)
        }
        TokenPos::Mean => {
            // mask (b, T, 1): 1 at the real positions; the masked sum over T divided by
            // the count gives (b, emb).
            let pos = Tensor::arange(t, (Kind::Int64, h.device())).view([1, t]);
            let mask = pos
                .lt_tensor(&lens.view([b, 1]))
                .to_kind(h.kind())
                .unsqueeze(-1);
            (h * &mask).sum_dim_intlist(1, false, h.kind())
                / mask.sum_dim_intlist(1, false, h.kind())
        }
    }
}

"""The book's GPTModel with PyTorch's fused kernels: F.layer_norm, F.gelu(approximate="tanh")
and F.scaled_dot_product_attention (the "optimized PyTorch" twin of llmlab's benchmarks).
Same parameter names and numbers as book_gpt.GPTModel."""
import torch
import torch.nn as nn
import torch.nn.functional as F

import book_gpt as B


class FastLayerNorm(B.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x, (x.shape[-1],), self.scale, self.shift, self.eps)


class FastGELU(nn.Module):
    def forward(self, x):
        return F.gelu(x, approximate="tanh")


class FastMHA(B.MultiHeadAttention):
    def forward(self, x):
        b, n, _ = x.shape
        q = self.W_query(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.W_key(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.W_value(x).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        p = self.dropout.p if self.training else 0.0
        ctx = F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True)
        return self.out_proj(ctx.transpose(1, 2).contiguous().view(b, n, self.d_out))


def GPTModel(cfg):
    model = B.GPTModel(cfg)
    for blk in model.trf_blocks:
        old = blk.att
        blk.att = FastMHA(cfg["emb_dim"], cfg["emb_dim"], cfg["context_length"], cfg["drop_rate"],
                          cfg["n_heads"], cfg["qkv_bias"])
        blk.att.load_state_dict(old.state_dict())
        for name in ("norm1", "norm2"):
            ln = FastLayerNorm(cfg["emb_dim"])
            ln.load_state_dict(getattr(blk, name).state_dict())
            setattr(blk, name, ln)
        blk.ff.layers[1] = FastGELU()
    fn = FastLayerNorm(cfg["emb_dim"])
    fn.load_state_dict(model.final_norm.state_dict())
    model.final_norm = fn
    return model

"""Writes a parity fixture for llmlab's GPT: weights, inputs and reference outputs.

Usage: gen_gpt.py --out DIR --config '{"vocab_size": ..}' [--seed S] [--batch B] [--seq N]

DIR/weights.safetensors  the book GPTModel's full state_dict (mask buffers included, as the
                         book saves them)
DIR/io.safetensors       in_idx (B, N) int64, logits (B, N, V) f32, generated (B, N + 8) int64
                         from the book's generate_text_simple
DIR/attention.safetensors every ch03 attention module's weights (prefixed sa1./sa2./ca./wrap./mha.)
                         with its input and output
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file

import book_gpt as B


def contiguous(sd, prefix=""):
    return {prefix + k: v.detach().contiguous().clone() for k, v in sd.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--config", required=True)
    ap.add_argument("--seed", type=int, default=123)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=6)
    ap.add_argument("--new-tokens", type=int, default=8)
    a = ap.parse_args()
    cfg = json.loads(a.config)
    os.makedirs(a.out, exist_ok=True)
    torch.manual_seed(a.seed)
    torch.set_num_threads(2)

    model = B.GPTModel(cfg).eval()
    save_file(contiguous(model.state_dict()), os.path.join(a.out, "weights.safetensors"))
    in_idx = torch.randint(0, cfg["vocab_size"], (a.batch, a.seq))
    with torch.no_grad():
        logits = model(in_idx)
    gen = B.generate_text_simple(model, in_idx, a.new_tokens, cfg["context_length"])
    save_file({"in_idx": in_idx, "logits": logits.contiguous(), "generated": gen},
              os.path.join(a.out, "io.safetensors"))

    # ch03 attention modules on one input.
    d_in, d_out, heads, ctx = 6, 4, 2, 8
    x = torch.rand(2, 5, d_in)
    t = {"x": x}
    sa1 = B.SelfAttention_v1(d_in, d_out)
    sa2 = B.SelfAttention_v2(d_in, d_out)
    ca = B.CausalAttention(d_in, d_out, ctx, 0.0, qkv_bias=True).eval()
    wrap = B.MultiHeadAttentionWrapper(d_in, d_out, ctx, 0.0, heads).eval()
    mha = B.MultiHeadAttention(d_in, d_out * heads, ctx, 0.0, heads, qkv_bias=True).eval()
    with torch.no_grad():
        t["sa1_out"] = sa1(x[0])
        t["sa2_out"] = sa2(x[0])
        t["ca_out"] = ca(x)
        t["wrap_out"] = wrap(x)
        t["mha_out"] = mha(x)
    for name, m in [("sa1", sa1), ("sa2", sa2), ("ca", ca), ("wrap", wrap), ("mha", mha)]:
        t.update(contiguous({k: v for k, v in m.state_dict().items() if not k.endswith("mask")}, name + "."))
    save_file(t, os.path.join(a.out, "attention.safetensors"))
    print(json.dumps({"params": sum(p.numel() for p in model.parameters())}))


if __name__ == "__main__":
    main()

"""A tiny random GPT2LMHeadModel written by transformers (save_pretrained, safetensors), with
its logits for fixed ids and its greedy continuation (model.generate(do_sample=False)).

Usage: gen_hf_gpt2.py OUT_DIR [--tied 0|1]
Writes OUT_DIR/model/{config.json,model.safetensors} and OUT_DIR/io.safetensors.
"""
import argparse
import os

import torch
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("out")
    ap.add_argument("--tied", type=int, default=1)
    ap.add_argument("--new-tokens", type=int, default=12)
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=211, n_positions=32, n_embd=48, n_layer=3, n_head=4,
                     tie_word_embeddings=bool(a.tied), bos_token_id=0, eos_token_id=210, pad_token_id=210)
    model = GPT2LMHeadModel(cfg).eval()
    # Larger-than-default random weights so the logits are far from uniform.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(os.path.join(a.out, "model"), safe_serialization=True)
    ids = torch.randint(1, 200, (2, 9))
    with torch.no_grad():
        logits = model(ids).logits
        gen = model.generate(ids[:1], do_sample=False, max_new_tokens=a.new_tokens, min_new_tokens=a.new_tokens,
                             pad_token_id=210)
    save_file({"ids": ids, "logits": logits.contiguous(), "generated": gen.contiguous()},
              os.path.join(a.out, "io.safetensors"))


if __name__ == "__main__":
    main()

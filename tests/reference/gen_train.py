"""Reference training steps for llmlab's AdamW and loss: the book's GPTModel trained with
torch.optim.AdamW (+ clip_grad_norm_) on fixed batches, dropout 0 (llm.c's test_gpt2 idea).

Writes DIR/weights.safetensors (initial state dict), DIR/train.safetensors with
inputs_<i>/targets_<i> for each step, grads_0.<name> (gradients of the first step, before
clipping), losses (steps,), grad_norms (steps,), lrs (steps,) and final.<name> (weights after all steps).
"""
import argparse
import json
import math
import os

import torch
from safetensors.torch import save_file

import book_gpt as B


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--max-grad-norm", type=float, default=0.5)
    ap.add_argument("--warmup", type=int, default=2)
    a = ap.parse_args()
    torch.manual_seed(7)
    torch.set_num_threads(2)
    cfg = {"vocab_size": 101, "context_length": 12, "emb_dim": 32, "n_heads": 4, "n_layers": 2,
           "drop_rate": 0.0, "qkv_bias": False}
    model = B.GPTModel(cfg)
    os.makedirs(a.out, exist_ok=True)
    save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()},
              os.path.join(a.out, "weights.safetensors"))
    opt = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=a.weight_decay)
    out, losses, norms, lrs = {}, [], [], []
    total = a.steps
    initial_lr, min_lr = a.lr * 0.1, a.lr * 0.01
    for step in range(a.steps):
        # Appendix D: linear warm-up, then cosine decay.
        if step < a.warmup:
            lr = initial_lr + step * (a.lr - initial_lr) / a.warmup
        else:
            progress = (step - a.warmup) / (total - a.warmup)
            lr = min_lr + (a.lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
        for g in opt.param_groups:
            g["lr"] = lr
        x = torch.randint(0, cfg["vocab_size"], (3, 10))
        y = torch.randint(0, cfg["vocab_size"], (3, 10))
        out[f"inputs_{step}"], out[f"targets_{step}"] = x, y
        opt.zero_grad()
        logits = model(x)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
        loss.backward()
        if step == 0:
            for n, p in model.named_parameters():
                out[f"grads_0.{n}"] = p.grad.detach().clone()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), a.max_grad_norm)
        opt.step()
        losses.append(loss.item())
        norms.append(norm.item())
        lrs.append(lr)
    out["losses"] = torch.tensor(losses, dtype=torch.float64)
    out["grad_norms"] = torch.tensor(norms, dtype=torch.float64)
    out["lrs"] = torch.tensor(lrs, dtype=torch.float64)
    for n, p in model.named_parameters():
        out[f"final.{n}"] = p.detach().clone()
    save_file(out, os.path.join(a.out, "train.safetensors"))
    print(json.dumps({"cfg": cfg, "initial_lr": initial_lr, "min_lr": min_lr}))


if __name__ == "__main__":
    main()

"""Reference for llmlab's fused AdamW: torch.optim.AdamW(fused=True) on a few random tensors.

Writes DIR/fused_adamw.safetensors with init.<name> (parameters before the first step),
grad_<i>.<name> (the gradient of step i), lrs (steps,), and after the last step final.<name>,
exp_avg.<name>, exp_avg_sq.<name>; prints the hyper-parameters as JSON.
"""
import argparse
import json
import os

import torch
from safetensors.torch import save_file

SHAPES = {"w_a": (7, 5), "b_a": (13,), "w_b": (3, 4, 6), "s": (1,)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=5)
    a = ap.parse_args()
    torch.manual_seed(11)
    hp = {"betas": (0.9, 0.95), "eps": 1e-8, "weight_decay": 0.1}
    params = {n: torch.nn.Parameter(torch.randn(s)) for n, s in SHAPES.items()}
    out = {f"init.{n}": p.detach().clone() for n, p in params.items()}
    opt = torch.optim.AdamW(params.values(), lr=1e-3, fused=True, **hp)
    lrs = [1e-3 * (1 - 0.15 * i) for i in range(a.steps)]
    for i, lr in enumerate(lrs):
        for g in opt.param_groups:
            g["lr"] = lr
        for n, p in params.items():
            p.grad = torch.randn_like(p) * (0.1 + i)
            out[f"grad_{i}.{n}"] = p.grad.clone()
        opt.step()
    for n, p in params.items():
        st = opt.state[p]
        out[f"final.{n}"] = p.detach().clone()
        out[f"exp_avg.{n}"] = st["exp_avg"].clone()
        out[f"exp_avg_sq.{n}"] = st["exp_avg_sq"].clone()
    out["lrs"] = torch.tensor(lrs, dtype=torch.float64)
    os.makedirs(a.out, exist_ok=True)
    save_file(out, os.path.join(a.out, "fused_adamw.safetensors"))
    print(json.dumps({"beta1": hp["betas"][0], "beta2": hp["betas"][1], "eps": hp["eps"],
                      "weight_decay": hp["weight_decay"], "names": list(SHAPES)}))


if __name__ == "__main__":
    main()

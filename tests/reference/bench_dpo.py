"""DPO training steps per second with the cached reference log-probabilities against the live
reference (a reference forward pass per batch; with LoRA the adapters turned off), one invocation:
experiments/dpo_smollm2.yaml (SmolLM2-135M-Instruct, LoRA) on the first --pairs training pairs, each
variant in a fresh runs folder. Steps/s counts the training loop (steps, the evaluation after the
first step, the epoch's one-token sample); the cache's one pass over every pair is reported apart.

    python tests/reference/bench_dpo.py [--llmlab target/release/llmlab] [--threads 2] [--pairs 48] [--out FILE]
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def run(llmlab, threads, pairs, reference):
    with tempfile.TemporaryDirectory() as runs:
        sets = {"dpo.reference": reference, "data.max_train": pairs, "data.max_val": 8,
                "generation.responses": "false", "generation.max_new_tokens": 1,
                "train.eval_freq": 1000, "train.eval_iter": 1}
        cmd = [llmlab, "run", os.path.join(ROOT, "experiments", "dpo_smollm2.yaml"), "--runs", runs,
               "--threads", str(threads), "--device", "cpu"]
        for k, v in sets.items():
            cmd += ["--set", f"{k}={v}"]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if p.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr}")
        trial = os.path.join(runs, "dpo-smollm2", "base")
        last = json.loads(open(os.path.join(trial, "metrics.jsonl")).read().splitlines()[-1])
        m = re.search(r"reference log-probabilities of \d+ pairs in ([0-9.]+)s", p.stderr + p.stdout)
        return {"steps": last["step"], "train_seconds": last["train_seconds"], "wall": wall,
                "cache_seconds": float(m.group(1)) if m else 0.0, "val_loss": last["val_loss"],
                "val_reward_margin": last["val_reward_margin"]}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llmlab", default=os.path.join(ROOT, "target", "release", "llmlab"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--out")
    a = ap.parse_args()
    live = run(a.llmlab, a.threads, a.pairs, "live")
    cached = run(a.llmlab, a.threads, a.pairs, "cached")
    sps = {k: r["steps"] / r["train_seconds"] for k, r in (("live", live), ("cached", cached))}
    lines = [f"## DPO step: cached reference vs live (SmolLM2-135M-Instruct, LoRA, {a.pairs} pairs, batch 8)", "",
             f"Command: `python tests/reference/bench_dpo.py --threads {a.threads} --pairs {a.pairs}`", "",
             "| reference | steps | steps/s | ratio | cache pass | wall time | val loss | val margin |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for k, r in (("live", live), ("cached", cached)):
        lines.append(f"| {k} | {r['steps']} | {sps[k]:.3f} | {sps[k] / sps['live']:.2f} | {r['cache_seconds']:.1f} s |"
                     f" {r['wall']:.1f} s | {r['val_loss']:.6f} | {r['val_reward_margin']:.6f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

"""Wall time of the 5-trial freeze sweep (experiments/freeze_sweep.yaml) with frozen-prefix reuse
against the same sweep with reuse off, each in a fresh runs folder, in one invocation.

    python tests/reference/bench_freeze.py [--llmlab target/release/llmlab] [--threads 2] [--out FILE]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def sweep(llmlab, threads, reuse, extra):
    with tempfile.TemporaryDirectory() as runs:
        cmd = [llmlab, "run", os.path.join(ROOT, "experiments", "freeze_sweep.yaml"),
               "--runs", runs, "--threads", str(threads),
               "--set", f"finetune.reuse_frozen={'true' if reuse else 'false'}", *extra]
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        secs = time.perf_counter() - t0
        if p.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr}")
        acc = {}
        base = os.path.join(runs, "freeze-sweep")
        for slug in sorted(os.listdir(base)):
            m = os.path.join(base, slug, "metrics.jsonl")
            if os.path.isfile(m):
                last = json.loads(open(m).read().splitlines()[-1])
                acc[slug] = (last["val_accuracy"], last["test_accuracy"], last["val_loss"])
        return secs, acc


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llmlab", default=os.path.join(ROOT, "target", "release", "llmlab"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], help="extra --set for both sweeps")
    ap.add_argument("--out")
    a = ap.parse_args()
    extra = [x for s in a.set for x in ("--set", s)]
    t_off, acc_off = sweep(a.llmlab, a.threads, False, extra)
    t_on, acc_on = sweep(a.llmlab, a.threads, True, extra)
    lines = ["## Frozen-prefix reuse: 5-trial freeze sweep (experiments/freeze_sweep.yaml)", "",
             f"Command: `python tests/reference/bench_freeze.py --threads {a.threads}`", "",
             "| sweep | wall time | ratio |", "| --- | ---: | ---: |",
             f"| reuse off (every block at every step) | {t_off:.1f} s | 1.00 |",
             f"| reuse on (frozen blocks computed once, shared) | {t_on:.1f} s | {t_on / t_off:.2f} |", "",
             "| trial | val acc (off / on) | test acc (off / on) | val loss (off / on) |",
             "| --- | --- | --- | --- |"]
    for slug in acc_off:
        o, n = acc_off[slug], acc_on.get(slug, (float("nan"),) * 3)
        lines.append(f"| {slug} | {o[0]:.4f} / {n[0]:.4f} | {o[1]:.4f} / {n[1]:.4f} | {o[2]:.6f} / {n[2]:.6f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

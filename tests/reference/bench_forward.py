"""`make bench`: forward-pass tokens/s, llmlab vs the book's PyTorch GPT, in one run.

Each round runs llmlab (`llmlab bench forward`) and the PyTorch reference in fresh processes,
interleaved (A B A B ...), with the same config, batch x seq, dtype (f32), threads and
warm-up/iteration counts; the table reports medians over rounds and the ratio llmlab / PyTorch.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def torch_worker(a):
    import torch

    sys.path.insert(0, HERE)
    import book_gpt as B
    import yaml_lite

    torch.set_num_threads(a.threads)
    torch.manual_seed(123)
    cfg = yaml_lite.load(os.path.join(HERE, "..", "..", "configs", "models", a.config + ".yaml"))
    model = B.GPTModel(cfg).eval()
    x = torch.randint(0, cfg["vocab_size"], (a.batch, a.seq))
    times = []
    with torch.no_grad():
        for _ in range(a.warmup):
            model(x)
        for _ in range(a.iters):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    times.sort()
    med = times[len(times) // 2]
    print(json.dumps({"impl": "pytorch-book", "median_s": med, "tokens_per_s": a.batch * a.seq / med,
                      "threads": torch.get_num_threads()}))


def run(cmd, env):
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llmlab", default="target/release/llmlab")
    ap.add_argument("--config", default="gpt2-small")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--json-out")
    a = ap.parse_args()
    if a.worker:
        return torch_worker(a)
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    common = ["--config", a.config, "--batch", str(a.batch), "--seq", str(a.seq),
              "--warmup", str(a.warmup), "--iters", str(a.iters)]
    ours, ref = [], []
    for r in range(a.rounds):
        ours.append(run([a.llmlab, "bench", "forward", *common, "--threads", str(a.threads),
                         "--device", a.device], env)["tokens_per_s"])
        ref.append(run([sys.executable, __file__, "--worker", *common, "--threads", str(a.threads)],
                       env)["tokens_per_s"])
        print(f"round {r + 1}: llmlab {ours[-1]:.1f} tok/s, pytorch {ref[-1]:.1f} tok/s", flush=True)
    mo, mr = statistics.median(ours), statistics.median(ref)
    spread = lambda v: (max(v) - min(v)) / statistics.median(v) * 100
    print()
    print(f"forward pass, {a.config}, batch {a.batch} x {a.seq}, f32, {a.threads} threads, {a.device}, "
          f"median of {a.rounds} rounds x {a.iters} iters")
    print(f"| impl | tokens/s | spread |")
    print(f"| --- | ---: | ---: |")
    print(f"| llmlab (SDPA, fused layer_norm/gelu) | {mo:.1f} | {spread(ours):.0f}% |")
    print(f"| PyTorch, book GPTModel | {mr:.1f} | {spread(ref):.0f}% |")
    print(f"ratio llmlab / PyTorch: {mo / mr:.2f}x")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"llmlab": ours, "pytorch": ref, "ratio": mo / mr}, f)


if __name__ == "__main__":
    main()

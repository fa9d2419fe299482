#!/usr/bin/env bash
# GPU check for a lent GPU machine (no Rust toolchain there): run from the repository root with
# the release binary and the test binaries built here and carried along:
#   carry: target/release/llmlab, target/release/deps (test binaries), tests/, configs/
#   LD_LIBRARY_PATH must point at that machine's torch lib folder.
# Writes its figures to $OUT (or ./gpu-out).
set -uo pipefail
OUT="${OUT:-gpu-out}"; mkdir -p "$OUT"
PY="${PY:-/opt/torch/.venv/bin/python}"
TORCH_LIB="$($PY -c 'import torch, os; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export LD_LIBRARY_PATH="$TORCH_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LLMLAB_DATA_MIRROR="${LLMLAB_DATA_MIRROR:-$PWD/shared/data}"
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())' | tee -a "$OUT/gpu.txt"
# The integration tests are one binary, target/release/deps/suite-<hash> (the newest, if older
# builds left others); its `cuda::` tests are the #[ignore]d CUDA checks.
SUITE="$(ls -t target/release/deps/suite-* 2>/dev/null | while read -r f; do [ -x "$f" ] && [ -f "$f" ] && { echo "$f"; break; }; done)"
if [ -n "$SUITE" ]; then
  "$SUITE" --ignored --test-threads=1 cuda:: 2>&1 | tee "$OUT/cuda_tests.txt"
else
  echo "no test binary target/release/deps/suite-* (build it with cargo test --release --no-run)" | tee "$OUT/cuda_tests.txt"
fi
B=target/release/llmlab
{
  for b in 8 32; do $B bench forward --device cuda --config gpt2-small --batch $b --seq 256 --warmup 3 --iters 10; done
  for b in 8 32; do
    for fa in false true; do
      $B bench train --device cuda --config gpt2-small --batch $b --seq 256 --warmup 3 --iters 10 --fused-adamw $fa
    done
    $B bench train --device cuda --config gpt2-small --batch $b --seq 256 --warmup 3 --iters 10 --fused-adamw true --precision bf16
  done
  $B bench generate --device cuda --config gpt2-small --new-tokens 128
  $B bench generate --device cuda --config gpt2-small --new-tokens 128 --no-cache
} 2>&1 | tee "$OUT/bench_gpu.jsonl"

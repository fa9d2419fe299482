#!/usr/bin/env bash
# The 4-trial sweep of tests/suite/slurm.rs as one Slurm job array (--cpus-per-trial 1) against
# the same sweep here with --jobs 2 (--threads 2: one thread a trial). Prints the wall time of
# each and, for both, the latency from the command's start to the first optimizer step of any
# trial (the first record in a metrics.jsonl: step 0's evaluation, written after that step).
# Needs the one-node cluster (scripts/slurm-local.sh start) and LLMLAB_DATA_MIRROR.
#   tests/reference/bench_slurm.sh [target/release/llmlab]
set -euo pipefail
BIN=$(realpath "${1:-target/release/llmlab}")
: "${LLMLAB_DATA_MIRROR:?set LLMLAB_DATA_MIRROR}"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
cd "$WORK"
head -c 3000 "$LLMLAB_DATA_MIRROR/the-verdict/the-verdict.txt" > short.txt
cat > arr.yaml <<YAML
name: arr
model:
  preset: gpt-mini
  overrides: {context_length: 16, emb_dim: 32, n_heads: 2, n_layers: 1, drop_rate: 0.1}
data: {path: $WORK/short.txt, train_ratio: 0.9}
train: {epochs: 2, batch_size: 4, lr: 1.0e-3, eval_freq: 2, eval_iter: 1, checkpoint_every: 2}
generate: {max_new_tokens: 3}
sweep: {train.lr: [1.0e-3, 5.0e-4], seed: [1, 2]}
YAML
now() { date +%s.%N; }
# Runs "$@" in the background; prints "first-step-latency wall-time" in seconds.
measure() {
    local runs=$1; shift
    local t0 first="" t1
    t0=$(now)
    "$@" >/dev/null 2>"$runs.log" &
    local pid=$!
    while kill -0 "$pid" 2>/dev/null; do
        if [[ -z "$first" ]] && compgen -G "$runs/arr/*/metrics.jsonl" >/dev/null \
            && [[ -n "$(cat "$runs"/arr/*/metrics.jsonl 2>/dev/null | head -c1)" ]]; then
            first=$(now)
        fi
        sleep 0.05
    done
    wait "$pid"
    t1=$(now)
    echo "$(echo "$first - $t0" | bc) $(echo "$t1 - $t0" | bc)"
}
read -r l_first l_wall < <(measure local "$BIN" run arr.yaml --runs local --threads 2 --jobs 2)
read -r s_first s_wall < <(measure slurm "$BIN" run arr.yaml --runs slurm --backend slurm --cpus-per-trial 1 --wait)
printf '%-22s %18s %10s\n' run "first step (s)" "wall (s)"
printf '%-22s %18.1f %10.1f\n' "local --jobs 2" "$l_first" "$l_wall"
printf '%-22s %18.1f %10.1f\n' "slurm array (1 CPU)" "$s_first" "$s_wall"

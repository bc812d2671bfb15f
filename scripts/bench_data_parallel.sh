#!/usr/bin/env bash
# Data-parallel scaling on this machine: one process next to `--data-parallel 2` (DDP) and
# `--data-parallel 2 --fsdp`, on a randomly initialised Llama of about 13M parameters
# (scripts/make_wide_model.py: hidden 512, 4 layers, MLP 1536), AdamW, float32, the same
# global batch (16 rows of 128 tokens). The replicas talk over QUIC on loopback. Prints, per
# layout, the mean training throughput over steps 3..N (tokens of the whole step per second)
# the training state (parameters + gradients + optimizer state) each worker holds, and how long
# rank 0 waited after its last pass for the gradient all-reduce (what backward did not hide),
# from metrics.jsonl.
#
#   scripts/bench_data_parallel.sh [PP_BINARY] [STEPS]
#
# VOCAB=V gives the model V embedding rows (and output rows) instead of the tokenizer's 384, as
# real models have (padding rows no token uses); MICRO_BATCH=R splits each replica's share into
# micro-batches of R rows, so a step makes several forward and backward passes.
#
# Each worker computes on every core unless RAYON_NUM_THREADS says otherwise: the script runs
# the two-process layouts both ways (sharing the cores, and one thread each).
set -euo pipefail
cd "$(dirname "$0")/.."
pp=${1:-target/release/pp}
steps=${2:-10}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 scripts/make_wide_model.py "$work/model" --hidden 512 --layers 4 --intermediate 1536 \
  ${VOCAB:+--vocab "$VOCAB"}
python3 - "$work/data.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(256):
        words = " ".join(f"w{(i * 7 + j) % 97}" for j in range(120))
        f.write(json.dumps({"text": f"row {i}: {words}"}) + "\n")
PY
run() {
  local name=$1 threads=$2
  shift 2
  local out="$work/$name"
  env ${threads:+RAYON_NUM_THREADS=$threads} "$pp" train "$work/model" --data "$work/data.jsonl" \
    --out "$out" --batch-size 16 --steps "$steps" --max-len 128 --no-shuffle --dtype f32 \
    ${MICRO_BATCH:+--micro-batch-size "$MICRO_BATCH"} "$@" >/dev/null 2>&1
  python3 - "$out/metrics.jsonl" "$name" "${threads:-all}" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if "train_tokens_per_s" in l][2:]
mean = sum(r["train_tokens_per_s"] for r in rows) / len(rows)
state = sorted({k: v for k, v in rows[-1].items() if k.startswith("memory_rank")}.items())
per_rank = ", ".join(f"{v:.1f}" for _, v in state) or "-"
waits = [r["data_parallel_reduce_wait_s"] for r in rows if "data_parallel_reduce_wait_s" in r]
wait = f"{1000 * sum(waits) / len(waits):.0f}" if waits else "-"
print(f"{sys.argv[2]:<22} {sys.argv[3]:>7} {mean:>10.0f} {per_rank:>24} {wait:>12}")
PY
}
printf "%-22s %7s %10s %24s %12s\n" layout threads tokens/s "state MB per worker" "wait ms"
run "one process" ""
run "data-parallel 2" "" --data-parallel 2
run "data-parallel 2" 1 --data-parallel 2
run "data-parallel 2, fsdp" "" --data-parallel 2 --fsdp
run "data-parallel 2, fsdp" 1 --data-parallel 2 --fsdp

#!/bin/bash
# Usage: scripts/bench_placement.sh [PP_BINARY]
# Two nodes on this machine, node 0 on the CPU and node 1 on wgpu (lavapipe): placement by
# measured speed against an even split; tokens/s from metrics.jsonl (median of steps 3..).
export XDG_RUNTIME_DIR=/tmp PP_TOKEN=t
PP=${1:-target/release/pp}
REPO=$(cd "$(dirname "$0")/.." && pwd)
DATA=$(mktemp -d)/text.jsonl
python3 -c "
import json, sys
with open(sys.argv[1], 'w') as f:
    for i in range(600): f.write(json.dumps({'text': f'row {i}: pipelines move activations forward over links'}) + '\\n')" "$DATA"
F="$REPO/tests/fixtures/llama3-tiny/hf --data $DATA --max-len 64 --pack --steps 10 --batch-size 8 --dtype f32 --lr 1e-4 --no-shuffle --microbatches 4"
run() { # name port extra...
  local name=$1 port=$2; shift 2
  rm -rf /tmp/pb-$name
  N="--nnodes 2 --rdzv 127.0.0.1:$port --join-timeout 120"
  ( $PP train $F --out /tmp/pb-$name $N --device cpu --rdzv-host "$@" > /tmp/pb-$name-0.log 2>&1 ) &
  sleep 1
  $PP train $F --out /tmp/pb-$name $N --device wgpu --node-rank 1 "$@" > /tmp/pb-$name-1.log 2>&1
  wait
  grep "^plan\|^  rank" /tmp/pb-$name-0.log
  python3 - /tmp/pb-$name/metrics.jsonl <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if '"train_tokens_per_s"' in l]
tps = [r["train_tokens_per_s"] for r in rows[2:]]
busy = {k: statistics.median(r[k] for r in rows[2:]) for k in rows[-1] if k.endswith("_busy_s")}
print(f"tokens/s median {statistics.median(tps):.0f} over {len(tps)} steps; busy {busy}; loss {rows[-1]['train_loss']:.4f}")
PY
}
run measured 29421
run even 29422 --split 2

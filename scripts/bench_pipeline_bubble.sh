#!/usr/bin/env bash
# Measured pipeline bubble next to the simulator's prediction for the same schedule and the
# measured pass times: `pp train --stages N` on the bundled tiny Llama (4 layers) over QUIC on
# loopback, for each schedule. Every step, rank 0 records `pipeline_bubble` (idle share of all
# ranks over the slowest rank's wall time for the step's passes) and `pipeline_bubble_simulated`
# (the simulator with the step's mean F/B/I/W times and free transfers) in metrics.jsonl; this
# script prints their means over steps 3..N.
#
#   scripts/bench_pipeline_bubble.sh [PP_BINARY] [STEPS]
set -euo pipefail
cd "$(dirname "$0")/.."
pp=${1:-target/release/pp}
steps=${2:-12}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 - "$work/data.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(64):
        words = " ".join(f"w{(i * 7 + j) % 97}" for j in range(40))
        f.write(json.dumps({"text": f"row {i}: {words}"}) + "\n")
PY
printf "%-12s %5s %5s %10s %10s\n" schedule ranks micro measured simulated
for ranks in 2 4; do
  for schedule in gpipe 1f1b interleaved zbh1 zbv; do
    case $schedule in interleaved|zbv) stages=$((2 * ranks));; *) stages=$ranks;; esac
    [ "$stages" -le 4 ] || continue   # the tiny model has 4 layers
    micro=$((2 * ranks))
    out="$work/$schedule-$ranks"
    "$pp" train tests/fixtures/llama3-tiny/hf --data "$work/data.jsonl" --out "$out" \
      --batch-size $((4 * micro)) --steps "$steps" --max-len 128 --no-shuffle \
      --stages "$ranks" --schedule "$schedule" --microbatches "$micro" >/dev/null 2>&1
    python3 - "$out/metrics.jsonl" "$schedule" "$ranks" "$micro" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if "pipeline_bubble" in l][2:]
mean = lambda k: sum(r[k] for r in rows) / len(rows)
print(f"{sys.argv[2]:<12} {sys.argv[3]:>5} {sys.argv[4]:>5} {100 * mean('pipeline_bubble'):>9.1f}% "
      f"{100 * mean('pipeline_bubble_simulated'):>9.1f}%")
PY
  done
done

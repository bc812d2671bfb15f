#!/usr/bin/env bash
# Pipeline training across two "machines" (network namespaces from scripts/netns.sh, one node
# each, one worker per node) at several link rates and wire dtypes, on a wide model whose
# activations are a visible share of a step (scripts/make_wide_model.py). Prints tokens/s (the
# median over steps after the first), the last loss, and the step time the plan expected (at
# the measured device speeds and link) next to the measured one, per run. Needs root and numpy.
#
#   scripts/bench_netns.sh target/release/pp [STEPS]
set -euo pipefail
pp=$(realpath "$1")
steps=${2:-8}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"; "$root/scripts/netns.sh" down ppbench 2' EXIT

python3 "$root/scripts/make_wide_model.py" "$work/model" --hidden 1024 --layers 2
# Rows of a few hundred tokens each.
python3 - "$work/data.jsonl" <<'PY'
import json, random, sys
random.seed(0)
words = "pipeline stage activation gradient micro batch schedule bubble link node token".split()
with open(sys.argv[1], "w") as f:
    for _ in range(64):
        f.write(json.dumps({"text": " ".join(random.choice(words) for _ in range(300))}) + "\n")
PY

run() {
    local rate=$1 wire=$2 out="$work/out-$1-$2"
    "$root/scripts/netns.sh" up ppbench 2 "$rate"
    for node in 0 1; do
        PP_TOKEN=bench ip netns exec "ppbench$node" "$pp" train "$work/model" --data "$work/data.jsonl" \
            --out "$out" --nnodes 2 --rdzv 10.77.0.1:29400 --node-rank "$node" \
            --max-len 512 --batch-size 8 --microbatches 4 --steps "$steps" --dtype f32 \
            --wire-dtype "$wire" --no-shuffle >/dev/null 2>"$work/node$node.log" &
    done
    wait || { cat "$work"/node*.log >&2; exit 1; }
    "$root/scripts/netns.sh" down ppbench 2
    python3 - "$out/metrics.jsonl" "$rate" "$wire" "$work/node0.log" <<'PY'
import json, re, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if "train_tokens_per_s" in l]
speed = statistics.median(r["train_tokens_per_s"] for r in rows[1:])
# A step's length from each rank's busy time and the measured bubble.
def step(r):
    busy = [v for k, v in r.items() if re.fullmatch(r"pipeline_rank\d+_busy_s", k)]
    return sum(busy) / (len(busy) * (1 - r["pipeline_bubble"]))
measured = statistics.median(step(r) for r in rows[1:]) * 1e3
plan = re.search(r"expected ([\d.]+) (ms|s) per step", open(sys.argv[4]).read())
expected = float(plan[1]) * (1 if plan[2] == "ms" else 1e3)
print(f"| {sys.argv[2]:>8} | {sys.argv[3]:>4} | {speed:8.0f} | {rows[-1]['train_loss']:.4f} "
      f"| {expected:6.0f} | {measured:6.0f} |")
PY
}

echo "| link     | wire | tokens/s | last loss | expected ms/step | measured ms/step |"
echo "| -------- | ---- | -------: | --------: | ---------------: | ---------------: |"
run none f32
for rate in 1gbit 100mbit; do
    for wire in f32 bf16 fp8; do
        run "$rate" "$wire"
    done
done

#!/usr/bin/env bash
# Nodes without a shared filesystem: how fast node 1 receives its stage of the model from
# node 0, and what gathering checkpoints on node 0 costs. Two "machines" (network namespaces
# from scripts/netns.sh) at a link rate; node 0 holds a native model cut in two stages (a wide
# random Llama from scripts/make_wide_model.py) and the data, node 1 names paths it lacks.
# Prints, per link rate: node 1's receive rate for its stage file, and the wall time of a
# 2-step run saving a checkpoint after every step, gathered on node 0 vs kept on each node.
# Needs root, numpy and safetensors.
#
#   scripts/bench_files.sh target/release/pp [HIDDEN] [LAYERS]
set -euo pipefail
pp=$(realpath "$1")
hidden=${2:-2048}
layers=${3:-8}
root=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"; "$root/scripts/netns.sh" down ppfiles 2' EXIT

python3 "$root/scripts/make_wide_model.py" "$work/hf" --hidden "$hidden" --layers "$layers" \
    --intermediate "$((hidden * 2))"
"$pp" convert "$work/hf" "$work/node0/model" --stages 2 >/dev/null
python3 - "$work/node0/data.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(16):
        f.write(json.dumps({"text": f"row {i}: pipelines move activations forward"}) + "\n")
PY
du -h "$work/node0/model"/stage-*.bin | sed 's/^/# /'

# One run of both nodes; prints node 1's receive lines and the wall time.
run() {
    local rate=$1 label=$2; shift 2
    "$root/scripts/netns.sh" up ppfiles 2 "$rate"
    rm -rf "$work/node1/cache" "$work"/node*/out
    local start=$(date +%s.%N)
    for node in 0 1; do
        PP_TOKEN=bench ip netns exec "ppfiles$node" "$pp" train "$work/node$node/model" \
            --data "$work/node$node/data.jsonl" --out "$work/node$node/out" \
            --cache-dir "$work/node$node/cache" --nnodes 2 --rdzv 10.77.0.1:29400 \
            --node-rank "$node" --max-len 64 --batch-size 4 --microbatches 2 --steps 2 \
            --save-every 1 --dtype f32 --no-shuffle "$@" >/dev/null 2>"$work/node$node.log" &
    done
    wait || { cat "$work"/node*.log >&2; exit 1; }
    local end=$(date +%s.%N)
    "$root/scripts/netns.sh" down ppfiles 2
    grep -h "received model/stage" "$work/node1.log" | sed "s/^/# $rate: /" || true
    printf '| %-7s | %-22s | %6.1f s |\n' "$rate" "$label" "$(echo "$end - $start" | bc)"
}

echo "| link    | checkpoints            | wall time |"
echo "| ------- | ---------------------- | --------: |"
for rate in none 1gbit; do
    run "$rate" "gathered on node 0"
    run "$rate" "--save-on-each-node" --save-on-each-node
done

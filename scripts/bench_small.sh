#!/usr/bin/env bash
# "bench-small", pp next to PyTorch in one run on this machine's CPU: a randomly initialised
# float32 Llama with 32M parameters (hidden 512, 8 layers, 8 query / 4 key-value heads, MLP 1408,
# vocabulary 8192), 256-token rows, AdamW, full fine-tuning.
#
#   one device, batch 4        pp train                 vs scripts/bench_train_torch.py (2 threads)
#   2 stages, batch 8, 4 micro pp train --stages 2      vs scripts/bench_pipeline_torch.py (gloo)
#                              (1f1b, gpipe, zbh1)         (1f1b, gpipe; 1 thread per stage)
#
# pp reads pre-tokenized {"input_ids","labels"} rows of a checkpoint that transformers saved and
# `pp convert` converted; each pipeline rank is a process with one compute thread, as PyTorch's.
# Prints tokens/s (median over steps after the first two) and, for pp's pipelines, the measured
# bubble next to the simulator's.
#
#   scripts/bench_small.sh [PP_BINARY] [STEPS]
# Needs torch and transformers (not needed by pp itself or its tests).
set -euo pipefail
cd "$(dirname "$0")/.."
pp=$(realpath "${1:-target/release/pp}")
steps=${2:-8}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
size=(--hidden 512 --layers 8 --heads 8 --kv-heads 4 --intermediate 1408 --vocab 8192 --seq 256)

python3 - "$work" "${size[@]}" <<'PY'
import json, random, sys
sys.path.insert(0, "scripts")
import torch
from transformers import LlamaForCausalLM
from bench_train_torch import build_config, parse_args

work = sys.argv[1]
sys.argv = [sys.argv[0]] + sys.argv[2:]
args = parse_args()
torch.manual_seed(0)
LlamaForCausalLM(build_config(args)).to(torch.float32).save_pretrained(f"{work}/hf")
rng = random.Random(0)
with open(f"{work}/rows.jsonl", "w") as f:
    for _ in range(256):
        ids = [rng.randrange(args.vocab) for _ in range(args.seq)]
        f.write(json.dumps({"input_ids": ids, "labels": ids}) + "\n")
PY
"$pp" convert "$work/hf" "$work/native" >/dev/null

# Median tokens/s and mean bubbles over steps 3.. of a metrics.jsonl.
summary() {
  python3 - "$1" <<'PY'
import json, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if "train_tokens_per_s" in l][2:]
line = f"{statistics.median(r['train_tokens_per_s'] for r in rows):8.0f} tok/s"
if rows and "pipeline_bubble" in rows[0]:
    mean = lambda k: 100 * statistics.mean(r[k] for r in rows)
    line += f"   bubble {mean('pipeline_bubble'):4.1f}% (simulated {mean('pipeline_bubble_simulated'):4.1f}%)"
print(line)
PY
}

train() {
  local out="$work/run-$1"; shift
  "$pp" train "$work/native" --data "$work/rows.jsonl" --out "$out" --device cpu \
    --optimizer adamw --lr 1e-4 --max-len 256 --no-shuffle --steps "$steps" "$@" >/dev/null
  summary "$out/metrics.jsonl"
}

echo "pp     one device, batch 4:          $(train single --batch-size 4)"
for schedule in 1f1b gpipe zbh1; do
  echo "pp     2 stages $schedule, batch 8/4:  $(RAYON_NUM_THREADS=1 train "$schedule" \
    --batch-size 8 --stages 2 --schedule "$schedule" --microbatches 4)"
done
torch_tps() {
  python3 -c "import json, sys; print('%8.0f tok/s' % json.loads(sys.stdin.read().splitlines()[-1])['tokens_per_s'])"
}
echo "torch  one device, batch 4:          $(python3 scripts/bench_train_torch.py "${size[@]}" \
  --batch 4 --threads 2 --attn sdpa --steps $((steps + 2)) | torch_tps)"
for schedule in 1f1b gpipe; do
  echo "torch  2 stages $schedule, batch 8/4:  $(python3 scripts/bench_pipeline_torch.py "${size[@]}" \
    --batch 8 --microbatches 4 --schedule "$schedule" --steps $((steps + 2)) | torch_tps)"
done

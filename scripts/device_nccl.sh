#!/usr/bin/env bash
# The NCCL path on a GPU machine, in one short run (no Rust toolchain needed there): the
# NCCL collectives' tests (the timeout one only on two GPUs or more) and all-reduce bench over
# every GPU, then `pp train` on one GPU next to the same run all-reducing over a group of one
# (NCCL, then the ring), and as --data-parallel replicas over NCCL and the ring (one per GPU,
# when there are two or more).
#
#   scripts/device_nccl.sh PP_BINARY TRANSPORT_TEST_BINARY COLLECTIVES_BENCH_BINARY
#
# Build the three here: `cargo build --release` (target/release/pp), then
# `cargo test -p pp-transport --features nccl --release --no-run` and
# `cargo bench -p pp-transport --features nccl --bench collectives --no-run`, which print the
# test and bench executables' paths; strip them and compress them with xz to fit the device's
# carry limit (pp: 72 MB stripped, 12 MB with xz). libnccl comes from PyTorch's wheel when no
# system copy is found; cudarc looks for libnccl.so, which wheels ship only as libnccl.so.2.
set -euo pipefail
pp=$1 tests=$2 bench=$3
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
if ! /sbin/ldconfig -p | grep -q 'libnccl.so '; then
  lib=$(python3 -c 'import nvidia.nccl, os; print(os.path.join(list(nvidia.nccl.__path__)[0], "lib"))')
  ln -s "$lib/libnccl.so.2" "$work/libnccl.so"
  export LD_LIBRARY_PATH="$work${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
gpus=$(nvidia-smi -L | wc -l)
echo "== $gpus GPU(s); NCCL from ${LD_LIBRARY_PATH:-the system}"
# A failure is reported and the rest still runs: device time is short.
"$tests" --ignored nccl_collectives_equal_the_ring || echo "== FAILED: the NCCL collectives test"
if [ "$gpus" -ge 2 ]; then
  "$tests" --ignored a_member_that_stops || echo "== FAILED: the NCCL timeout test"
fi
"$bench" --mib 25 --rounds 50 || echo "== FAILED: the collectives bench"
python3 scripts/make_wide_model.py "$work/model" --hidden 1024 --layers 8 --intermediate 2816
python3 - "$work/data.jsonl" <<'PY'
import json, sys
with open(sys.argv[1], "w") as f:
    for i in range(512):
        f.write(json.dumps({"text": " ".join(f"w{(i * 7 + j) % 97}" for j in range(250))}) + "\n")
PY
train() {
  local name=$1
  shift
  "$pp" train "$work/model" --data "$work/data.jsonl" --out "$work/$name" --batch-size 16 \
    --steps 12 --max-len 256 --no-shuffle --dtype f32 "$@" >"$work/$name.log" 2>&1 \
    || { echo "$name failed:"; tail -5 "$work/$name.log"; return; }
  python3 - "$work/$name/metrics.jsonl" "$name" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if "train_tokens_per_s" in l][2:]
tps = sum(r["train_tokens_per_s"] for r in rows) / len(rows)
wait = [r.get("data_parallel_reduce_wait_s", 0) for r in rows]
print(f"{sys.argv[2]:<28} {tps:9.0f} tokens/s  all-reduce wait {1e3 * sum(wait) / len(wait):.1f} ms/step")
PY
}
train one-gpu --device cuda:0
# World size 1: the all-reduce machinery over a group of one, NCCL next to the ring.
train one-gpu-nccl-world-1 --device cuda:0 --collectives nccl --microbatches 1
train one-gpu-ring-world-1 --device cuda:0 --collectives ring --microbatches 1
if [ "$gpus" -ge 2 ]; then
  train "ddp-x$gpus-nccl" --data-parallel "$gpus" --collectives nccl
  train "ddp-x$gpus-ring" --data-parallel "$gpus"
  train "fsdp-x$gpus-nccl" --data-parallel "$gpus" --fsdp --collectives nccl
fi

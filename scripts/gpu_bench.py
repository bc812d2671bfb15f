#!/usr/bin/env python3
"""pp against PyTorch + transformers on one GPU, in one run: full fine-tuning steps of Llama
models with random weights, and the memory of the 24 GB recipe.

Phases, in this order (each run bounded in time, the whole within --budget seconds; a failure
is recorded and the run goes on):

  sanity      One step of `pp train --device cuda` on the tiny shape: a missing driver, NVRTC
              or CUDA header shows here. On a machine whose CubeCL caches are cold the step
              compiles ~200 kernels and autotunes every matmul shape first (over 100 s on an
              H200, 2026-12-04), so it has its own limit, --sanity-timeout; it warms the
              autotune cache (./target/autotune in a checkout) for the phases after it.
  throughput  For each --shapes entry (1b = Llama-3.2-1B, 8b = Llama-3-8B; tiny for a quick
              check on any machine): a random bf16 checkpoint and random token rows, then
              `pp train --dtype bf16` (float32 master weights, bf16 compute) and PyTorch with
              the same weights, data and settings (float32 master weights under bf16 autocast;
              attention `eager` and `sdpa`). Reports tokens/s, MFU and peak device memory.
              The 8B shape runs with activation checkpointing on both sides, and only on a GPU
              with at least --min-8b-gib of memory (float32 weights and gradients: 64 GB).
  curve       --curve-steps steps of both on the same data (a small vocabulary so the loss
              falls): the largest relative difference of the per-step losses (target: 1%).
  recipe      The 8B shape (or the first shape) at --recipe-seq tokens with Adafactor,
              optimizer-in-backward, activation checkpointing and CPU offload: pp's measured
              peak next to `pp plan`'s estimate.

    # on the GPU machine, with the carried binary:
    python3 scripts/gpu_bench.py --pp ./pp --out gpu-bench
    # here, to check the script end to end on a tiny shape:
    python3 scripts/gpu_bench.py --pp target/release/pp --out /tmp/gb --shapes tiny \\
        --device cpu --torch-device cpu --steps 2 --warmup 1 --seq 64 --recipe-seq 128 \\
        --curve-steps 5 --curve-seq 64

MFU = tokens/s x (6 N + 12 L H Q S) / peak, with N the parameters of every matmul (all but the
input embedding), L layers, H heads, Q head size, S the sequence (PaLM's accounting), and the
peak dense bf16 rate of the GPU (--peak-tflops, else looked up by name).

Writes OUT/results.json and OUT/results.md as it goes; every command's output is kept in
OUT/logs/. Each PyTorch run is a child process (`--torch-run`), so a hung or failed one is killed
and frees its memory before the next run.
Needs torch and transformers (not needed by pp itself or its tests).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

SHAPES = {
    # Llama-3.2-1B: tied embeddings, 128k vocabulary.
    "1b": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=8192, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    # Llama-3-8B.
    "8b": dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
               intermediate_size=14336, vocab_size=128256, tie_word_embeddings=False, rope_theta=500000.0),
    # For checking this script on a CPU or a software GPU.
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=172, vocab_size=512, tie_word_embeddings=False, rope_theta=10000.0),
}

# Dense bf16 tensor-core peak, TFLOP/s.
PEAK_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.0, "RTX 4090": 165.2,
               "RTX 3090": 71.0}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pp", required=True, help="the pp binary")
    p.add_argument("--out", required=True, type=Path, help="results and scratch directory")
    p.add_argument("--shapes", default="1b,8b", help="comma-separated: 1b, 8b, tiny")
    p.add_argument("--device", default="cuda", help="pp's --device")
    p.add_argument("--torch-device", default="cuda", help="PyTorch's device")
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--batch", type=int, default=1, help="rows per step")
    p.add_argument("--steps", type=int, default=6, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--optimizer-1b", default="adamw")
    p.add_argument("--optimizer-8b", default="adafactor",
                   help="AdamW's float32 state for 8B (64 GB) does not fit an 80 GB card beside the rest")
    p.add_argument("--recipe-seq", type=int, default=4096)
    p.add_argument("--curve-steps", type=int, default=50)
    p.add_argument("--curve-seq", type=int, default=512)
    p.add_argument("--phases", default="sanity,throughput,curve,recipe")
    p.add_argument("--budget", type=int, default=540, help="seconds for the whole run")
    p.add_argument("--min-8b-gib", type=float, default=130.0,
                   help="GPU memory the 8B throughput run needs (skipped below)")
    p.add_argument("--attn", default="eager,sdpa", help="PyTorch attention implementations")
    p.add_argument("--peak-tflops", type=float, help="the GPU's dense bf16 peak")
    p.add_argument("--timeout", type=int, default=300, help="seconds per pp or PyTorch run")
    p.add_argument("--sanity-timeout", type=int, default=300,
                   help="seconds for the sanity step, which compiles and autotunes from cold")
    p.add_argument("--torch-run", help=argparse.SUPPRESS)
    return p.parse_args()


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = args.out
        self.logs = args.out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.results = {"args": {k: str(v) for k, v in vars(args).items()}, "runs": [], "errors": []}
        self.started = time.time()

    def left(self):
        """Seconds left of --budget."""
        return self.args.budget - (time.time() - self.started)

    # --- bookkeeping -------------------------------------------------------------------------

    def record(self, entry):
        print(json.dumps(entry), flush=True)
        self.results["runs"].append(entry)
        self.save()

    def fail(self, what, error):
        print(f"FAILED {what}: {error}", file=sys.stderr, flush=True)
        self.results["errors"].append({"what": what, "error": str(error)[-2000:]})
        self.save()

    def save(self):
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1))
        (self.out / "results.md").write_text(markdown(self.results))

    def run(self, name, command, timeout=None):
        """Runs a command, logging its output; raises with the tail of stderr on failure."""
        log = self.logs / f"{name}.log"
        started = time.time()
        with open(log, "w") as f:
            f.write("$ " + " ".join(map(str, command)) + "\n")
            f.flush()
            limit = max(10, min(timeout or self.args.timeout, self.left()))
            try:
                proc = subprocess.run(list(map(str, command)), stdout=f, stderr=subprocess.STDOUT,
                                      timeout=limit)
            except subprocess.TimeoutExpired:
                raise RuntimeError(f"timed out after {limit:.0f}s (log: {log})") from None
        text = log.read_text()
        if proc.returncode != 0:
            raise RuntimeError(f"exit {proc.returncode} after {time.time() - started:.0f}s: "
                               + "\n".join(text.splitlines()[-15:]))
        return text

    # --- inputs ------------------------------------------------------------------------------

    def environment(self):
        import torch
        import transformers
        env = {"torch": torch.__version__, "transformers": transformers.__version__,
               "python": sys.version.split()[0]}
        try:
            env["pp"] = self.run("pp-version", [self.args.pp, "--version"]).splitlines()[-1]
        except Exception as e:  # noqa: BLE001 - reported, not fatal
            env["pp"] = f"unknown ({e})"
        if torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["cuda"] = torch.version.cuda
            env["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
        self.results["environment"] = env
        peak = self.args.peak_tflops
        if peak is None:
            peak = next((v for k, v in PEAK_TFLOPS.items() if k in env.get("gpu", "")), None)
        self.peak_flops = peak * 1e12 if peak else None
        env["peak_tflops"] = peak
        self.save()

    def model(self, shape):
        """A random bf16 Llama checkpoint of `shape` (made once)."""
        directory = self.out / f"model-{shape}"
        if (directory / "config.json").exists():
            return directory
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        config = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(8192, self.args.recipe_seq),
                             rms_norm_eps=1e-5, use_cache=False, bos_token_id=1, eos_token_id=2)
        torch.manual_seed(0)
        device = self.args.torch_device
        with torch.device(device):
            model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(directory, safe_serialization=True, max_shard_size="5GB")
        del model
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        return directory

    def data(self, name, rows, seq, vocab):
        """`rows` pre-tokenized rows of `seq` random ids below `vocab`, every token scored."""
        import random
        path = self.out / f"data-{name}.jsonl"
        rng = random.Random(0)
        with open(path, "w") as f:
            for _ in range(rows):
                ids = [rng.randrange(vocab) for _ in range(seq)]
                f.write(json.dumps({"input_ids": ids, "labels": ids}) + "\n")
        return path

    # --- the two trainers --------------------------------------------------------------------

    def pp_train(self, name, model, data, seq, steps, optimizer, extra=(), lr=1e-5, timeout=None):
        out = self.out / f"run-{name}"
        subprocess.run(["rm", "-rf", str(out)])
        command = [self.args.pp, "train", model, "--data", data, "--out", out,
                   "--device", self.args.device, "--dtype", "bf16", "--optimizer", optimizer,
                   "--batch-size", self.args.batch, "--steps", steps, "--max-len", seq,
                   "--no-shuffle", "--lr", lr, "--lr-schedule", "constant", "--weight-decay", "0",
                   *extra]
        started = time.time()
        log = self.run(f"pp-{name}", command, timeout)
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        steps_seen = [m for m in metrics if "train_loss" in m]
        timed = steps_seen[self.args.warmup:] or steps_seen[-1:]
        note = next((line for line in log.splitlines() if line.startswith("device:")), "")
        peaks = [m["train_device_memory_peak"] for m in steps_seen if "train_device_memory_peak" in m]
        # The final model is not needed, and an 8B one is 16 GB of a small disk.
        (self.logs / f"pp-{name}.metrics.jsonl").write_text((out / "metrics.jsonl").read_text())
        subprocess.run(["rm", "-rf", str(out)])
        return {
            "tokens_per_s": statistics.median(m["train_tokens_per_s"] for m in timed),
            "losses": [m["train_loss"] for m in steps_seen],
            "peak_gib": round(max(peaks) / 2**30, 2) if peaks else None,
            "device_note": note,
            "wall_s": round(time.time() - started, 1),
        }

    def torch_train(self, name, model_dir, data, seq, steps, optimizer, attn, lr=1e-5, checkpointing=False):
        """PyTorch + transformers in a child process (see `torch_steps`)."""
        spec = dict(model=str(model_dir), data=str(data), seq=seq, steps=steps, optimizer=optimizer,
                    attn=attn, lr=lr, checkpointing=checkpointing, batch=self.args.batch,
                    warmup=self.args.warmup, device=self.args.torch_device)
        log = self.run(f"torch-{name}", [sys.executable, __file__, "--pp", "-", "--out", self.out,
                                         "--torch-run", json.dumps(spec)])
        return json.loads(log.strip().splitlines()[-1])

    def mfu(self, shape, seq, tokens_per_s):
        if not self.peak_flops:
            return None
        s = SHAPES[shape]
        h, layers, heads = s["hidden_size"], s["num_hidden_layers"], s["num_attention_heads"]
        head_dim = h // heads
        kv = s["num_key_value_heads"] * head_dim
        per_layer = h * (h + 2 * kv) + h * h + 3 * h * s["intermediate_size"]
        matmul_params = layers * per_layer + h * s["vocab_size"]
        flops_per_token = 6 * matmul_params + 12 * layers * heads * head_dim * seq
        return round(tokens_per_s * flops_per_token / self.peak_flops, 4)

    # --- phases ------------------------------------------------------------------------------

    def sanity(self):
        """One tiny step on the device: a broken CUDA setup shows in seconds, not in every phase."""
        model = self.model("tiny")
        data = self.data("sanity", 1, 32, SHAPES["tiny"]["vocab_size"])
        try:
            r = self.pp_train("sanity", model, data, 32, 1, "adamw",
                              timeout=self.args.sanity_timeout)
            self.record({"phase": "sanity", "shape": "tiny", "seq": 32, "framework": "pp",
                         "note": r["device_note"], "wall_s": r["wall_s"]})
            return True
        except Exception as e:  # noqa: BLE001
            self.fail("sanity", e)
            return False

    def throughput(self, shape):
        args = self.args
        optimizer = args.optimizer_8b if shape == "8b" else args.optimizer_1b
        # 8B's float32 weights and gradients are 64 GB: its activations are checkpointed on both
        # sides, and it runs only where that leaves room.
        checkpointing = shape == "8b"
        memory = self.results["environment"].get("gpu_memory_gib", 0)
        if shape == "8b" and memory < args.min_8b_gib:
            self.fail("throughput 8b", f"skipped: {memory} GiB of GPU memory < --min-8b-gib {args.min_8b_gib}")
            return
        model = self.model(shape)
        steps = args.warmup + args.steps
        data = self.data(f"{shape}-{args.seq}", args.batch * steps, args.seq, SHAPES[shape]["vocab_size"])
        common = {"phase": "throughput", "shape": shape, "seq": args.seq, "batch": args.batch,
                  "optimizer": optimizer, "checkpointing": checkpointing}
        extra = ["--checkpoint-activations"] if checkpointing else []
        trainers = [("pp", lambda: self.pp_train(f"{shape}-throughput", model, data, args.seq, steps,
                                                 optimizer, extra))]
        for attn in args.attn.split(","):
            trainers.append((f"pytorch-{attn}", lambda attn=attn: self.torch_train(
                f"{shape}-{attn}", model, data, args.seq, steps, optimizer, attn,
                checkpointing=checkpointing)))
        for framework, go in trainers:
            try:
                r = go()
                self.record({**common, "framework": framework, "tokens_per_s": round(r["tokens_per_s"], 1),
                             "mfu": self.mfu(shape, args.seq, r["tokens_per_s"]), "peak_gib": r["peak_gib"],
                             "wall_s": r["wall_s"], "note": r.get("device_note", "")})
            except Exception as e:  # noqa: BLE001 - recorded, the run goes on
                self.fail(f"throughput {shape} {framework}", e)

    def recipe(self, shape):
        args = self.args
        model = self.model(shape)
        seq = args.recipe_seq
        data = self.data(f"{shape}-{seq}", 2, seq, SHAPES[shape]["vocab_size"])
        savers = ["--optimizer-in-backward", "--checkpoint-activations", "--offload-activations", "cpu"]
        try:
            plan = json.loads(self.run(f"plan-{shape}-{seq}", [
                args.pp, "plan", model, "--seq-len", seq, "--dtype", "bf16", "--optimizer", "adafactor",
                *savers, "--json"]).splitlines()[-1])
            planned = plan["stages"][0]["plan"]["total"]
            r = self.pp_train(f"{shape}-recipe", model, data, seq, 2, "adafactor", savers)
            self.record({"phase": "recipe", "shape": shape, "seq": seq, "framework": "pp",
                         "peak_gib": r["peak_gib"], "plan_gib": round(planned / 2**30, 2) if planned else None,
                         "tokens_per_s": round(r["tokens_per_s"], 1), "wall_s": r["wall_s"],
                         "note": r["device_note"]})
        except Exception as e:  # noqa: BLE001
            self.fail(f"recipe {shape}", e)

    def curve(self, shape):
        args = self.args
        model = self.model(shape)
        seq, steps = args.curve_seq, args.curve_steps
        # A small vocabulary makes the loss fall, so the curves have a shape to compare.
        data = self.data(f"curve-{seq}", args.batch * steps, seq, min(1000, SHAPES[shape]["vocab_size"]))
        try:
            ours = self.pp_train(f"{shape}-curve", model, data, seq, steps, "adamw", lr=1e-4)
            theirs = self.torch_train(f"{shape}-curve", model, data, seq, steps, "adamw", "sdpa", lr=1e-4)
            worst = max(abs(a - b) / abs(b) for a, b in zip(ours["losses"], theirs["losses"]))
            self.record({"phase": "curve", "shape": shape, "seq": seq, "steps": steps,
                         "max_relative_loss_diff": round(worst, 5),
                         "pp_losses": [round(x, 4) for x in ours["losses"]],
                         "pytorch_losses": [round(x, 4) for x in theirs["losses"]]})
        except Exception as e:  # noqa: BLE001
            self.fail(f"curve {shape}", e)


def torch_steps(spec):
    """The same step as pp's: float32 master weights under bf16 autocast, global-norm clipping
    at 1, a constant learning rate, rows in file order. Returns tokens/s, losses, peak memory."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.optimization import Adafactor
    device, batch, seq = spec["device"], spec["batch"], spec["seq"]
    started = time.time()
    model = LlamaForCausalLM.from_pretrained(spec["model"], torch_dtype=torch.float32,
                                             attn_implementation=spec["attn"]).to(device)
    model.config.use_cache = False
    if spec["checkpointing"]:
        model.gradient_checkpointing_enable()
    model.train()
    if spec["optimizer"] == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], betas=(0.9, 0.999), eps=1e-8,
                                weight_decay=0.0)
    else:
        opt = Adafactor(model.parameters(), lr=spec["lr"], scale_parameter=False, relative_step=False,
                        warmup_init=False, beta1=None, weight_decay=0.0)
    rows = [json.loads(line)["input_ids"] for line in open(spec["data"])]
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for step in range(spec["steps"]):
        chunk = rows[(step * batch) % len(rows):][:batch]
        ids = torch.tensor(chunk, device=device)
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        losses.append(loss.item())
    timed = times[spec["warmup"]:] or times[-1:]
    return {
        "tokens_per_s": batch * seq / statistics.median(timed),
        "losses": losses,
        "peak_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2) if cuda else None,
        "wall_s": round(time.time() - started, 1),
    }


def markdown(results):
    env = results.get("environment", {})
    lines = [f"GPU: {env.get('gpu', 'none')} · CUDA {env.get('cuda', '-')} · torch {env.get('torch', '-')} · "
             f"transformers {env.get('transformers', '-')} · {env.get('pp', '')}", "",
             "| phase | shape | seq | framework | tokens/s | MFU | peak GiB | plan GiB |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |"]
    for r in results["runs"]:
        if r["phase"] == "curve":
            continue
        lines.append(f"| {r['phase']} | {r['shape']} | {r['seq']} | {r['framework']} | {r.get('tokens_per_s', '')} | "
                     f"{r.get('mfu') if r.get('mfu') is not None else ''} | {r.get('peak_gib') or ''} | "
                     f"{r.get('plan_gib') or ''} |")
    for r in results["runs"]:
        if r["phase"] == "curve":
            lines.append(f"\nLoss curve, {r['steps']} steps at {r['seq']} tokens: largest relative difference "
                         f"{r['max_relative_loss_diff']:.2%}")
    for e in results["errors"]:
        lines.append(f"\nFAILED {e['what']}: {e['error'].splitlines()[-1] if e['error'] else ''}")
    return "\n".join(lines) + "\n"


def main():
    args = parse_args()
    if args.torch_run:
        print(json.dumps(torch_steps(json.loads(args.torch_run))))
        return 0
    bench = Bench(args)
    bench.environment()
    shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        sys.exit(f"unknown shapes {unknown}: choose from {list(SHAPES)}")
    phases = args.phases.split(",")
    if "sanity" in phases and not bench.sanity():
        phases = []  # nothing else can work on this device
    # Most telling first: the 1B throughput, the bf16 loss curve, the 24 GB recipe, then 8B.
    small = [s for s in shapes if s != "8b"]
    for shape in small:
        if "throughput" in phases and bench.left() > 60:
            bench.throughput(shape)
    if "curve" in phases and bench.left() > 60:
        bench.curve("1b" if "1b" in shapes else shapes[0])
    if "recipe" in phases and bench.left() > 60:
        bench.recipe("8b" if "8b" in shapes else shapes[0])
    if "8b" in shapes and "throughput" in phases and bench.left() > 60:
        bench.throughput("8b")
    bench.save()
    print((args.out / "results.md").read_text())
    return 1 if bench.results["errors"] else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except Exception:  # noqa: BLE001 - the partial results are already on disk
        traceback.print_exc()
        sys.exit(2)

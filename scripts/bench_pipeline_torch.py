#!/usr/bin/env python3
"""PyTorch side of the pipeline-throughput comparison: `torch.distributed.pipelining`.

The same randomly initialised float32 Llama as `bench_train_torch.py` (same size flags), split
into two stages at the middle layer (embedding and the first half on stage 0; the second half,
the final norm and the head on stage 1), one process per stage over gloo on this machine, one
thread each. Full fine-tuning steps: the schedule's forward and backward over the micro-batches,
then AdamW on each stage. Prints one JSON line:

    {"framework": "pytorch-pipelining", "schedule": ..., "stages": 2, "microbatches": M,
     "batch": B, "seq": S, "step_ms_median": ..., "tokens_per_s": ...}

    python scripts/bench_pipeline_torch.py --hidden 512 --layers 8 --heads 8 --kv-heads 4 \\
        --intermediate 1408 --vocab 8192 --batch 8 --seq 256 --microbatches 4 --schedule 1f1b

Needs torch and transformers (not needed by pp itself or its tests).
"""
import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe
from transformers import LlamaForCausalLM

from bench_train_torch import build_config

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}
STAGES = 2


class Stage(nn.Module):
    """Half of a `LlamaForCausalLM`: token ids or hidden states in, hidden states or logits out."""

    def __init__(self, model: LlamaForCausalLM, index: int):
        super().__init__()
        layers = model.model.layers
        half = len(layers) // 2
        self.first = index == 0
        self.embed = model.model.embed_tokens if self.first else None
        self.layers = nn.ModuleList(layers[:half] if self.first else layers[half:])
        self.rotary = model.model.rotary_emb
        self.norm = None if self.first else model.model.norm
        self.head = None if self.first else model.lm_head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x) if self.first else x
        positions = torch.arange(h.shape[1]).unsqueeze(0).expand(h.shape[0], -1)
        rotary = self.rotary(h, positions)
        # No mask: sdpa and eager attention are causal by themselves when none is given.
        for layer in self.layers:
            h = layer(h, position_ids=positions, position_embeddings=rotary)
        if self.first:
            return h
        return self.head(self.norm(h))


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The model's own loss: predict each next token (labels are the inputs)."""
    return nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1)
    )


def run(rank: int, args: argparse.Namespace, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=STAGES)
    torch.set_num_threads(args.threads)
    # The same seed on both ranks: the same whole model, of which each keeps its half.
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(build_config(args)).to(torch.float32)
    config = model.config
    stage_module = Stage(model, rank)
    stage_module.train()
    del model
    # Shapes given up front: torch's run-time shape inference exchanges metadata between the
    # stages, and over gloo that exchange deadlocked against the first forward's send here.
    rows = args.batch // args.microbatches
    hidden = torch.empty(rows, args.seq, config.hidden_size)
    ids = torch.empty(rows, args.seq, dtype=torch.long)
    logits = torch.empty(rows, args.seq, config.vocab_size)
    inputs, outputs = (ids, hidden) if rank == 0 else (hidden, logits)
    stage = PipelineStage(
        stage_module, rank, STAGES, torch.device("cpu"), input_args=inputs, output_args=outputs
    )
    loss_fn = causal_lm_loss if rank == STAGES - 1 else None
    schedule = SCHEDULES[args.schedule](stage, args.microbatches, loss_fn=loss_fn)
    optimizer = torch.optim.AdamW(stage_module.parameters(), lr=1e-4)
    vocab = config.vocab_size
    batches = torch.randint(0, vocab, (args.warmup + args.steps, args.batch, args.seq))

    step_seconds = []
    for i, ids in enumerate(batches):
        dist.barrier()
        start = time.perf_counter()
        optimizer.zero_grad()
        if rank == 0:
            schedule.step(ids)
        else:
            schedule.step(target=ids)
        optimizer.step()
        dist.barrier()
        if i >= args.warmup:
            step_seconds.append(time.perf_counter() - start)
    if rank == 0:
        results.put(statistics.median(step_seconds))
    dist.destroy_process_group()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tests/fixtures/llama3-tiny/hf/config.json", help="HF config.json")
    for flag in ["hidden", "layers", "heads", "kv-heads", "intermediate", "vocab"]:
        p.add_argument(f"--{flag}", type=int, help=f"override the config's {flag}")
    p.add_argument("--attn", choices=["eager", "sdpa"], default="sdpa", help="attention implementation")
    p.add_argument("--schedule", choices=sorted(SCHEDULES), default="1f1b")
    p.add_argument("--microbatches", type=int, default=4)
    p.add_argument("--batch", type=int, default=8, help="rows per step, split into micro-batches")
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before the timed ones")
    p.add_argument("--threads", type=int, default=1, help="threads per stage process")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--port", type=int, default=29531)
    args = p.parse_args()
    if args.batch % args.microbatches:
        p.error("--batch must be a multiple of --microbatches")
    if args.steps < 1:
        p.error("--steps must be at least 1")

    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(run, args=(args, args.port, results), nprocs=STAGES, join=True)
    median = results.get()
    print(
        json.dumps(
            {
                "framework": "pytorch-pipelining",
                "torch": torch.__version__,
                "schedule": args.schedule,
                "stages": STAGES,
                "microbatches": args.microbatches,
                "batch": args.batch,
                "seq": args.seq,
                "threads_per_stage": args.threads,
                "attn": args.attn,
                "step_ms_median": round(median * 1e3, 3),
                "tokens_per_s": round(args.batch * args.seq / median, 1),
            }
        )
    )


if __name__ == "__main__":
    main()

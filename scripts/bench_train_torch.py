#!/usr/bin/env python3
"""PyTorch side of the CPU training-throughput comparison with pp's trainer.

Builds a randomly initialised float32 `transformers.LlamaForCausalLM` from a config.json, with
the size flags overriding the config's fields, and times full fine-tuning steps (forward,
backward, AdamW update) on random token ids. Prints one JSON line:

    {"framework": "pytorch", "torch": ..., "transformers": ..., "params": N, "batch": B,
     "seq": S, "threads": T, "attn": ..., "step_ms_median": ..., "tokens_per_s": ...}

where tokens_per_s = batch * seq / median step time.

    python scripts/bench_train_torch.py
    python scripts/bench_train_torch.py --hidden 256 --layers 4 --heads 8 --kv-heads 4 \\
        --intermediate 688 --vocab 2048 --batch 4 --seq 256

Needs torch and transformers (not needed by pp itself or its tests).
"""
import argparse
import json
import statistics
import time

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

# Size flag -> config.json field it overrides.
SIZE_FIELDS = {
    "hidden": "hidden_size",
    "layers": "num_hidden_layers",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "intermediate": "intermediate_size",
    "vocab": "vocab_size",
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="tests/fixtures/llama3-tiny/hf/config.json", help="HF config.json")
    p.add_argument("--hidden", type=int, help="override hidden_size")
    p.add_argument("--layers", type=int, help="override num_hidden_layers")
    p.add_argument("--heads", type=int, help="override num_attention_heads")
    p.add_argument("--kv-heads", type=int, help="override num_key_value_heads")
    p.add_argument("--intermediate", type=int, help="override intermediate_size")
    p.add_argument("--vocab", type=int, help="override vocab_size")
    p.add_argument("--attn", choices=["eager", "sdpa"], default="eager", help="attention implementation")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps before the timed ones")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    if args.steps < 1:
        p.error("--steps must be at least 1")
    return args


def build_config(args: argparse.Namespace) -> LlamaConfig:
    with open(args.config) as f:
        fields = json.load(f)
    for flag, field in SIZE_FIELDS.items():
        value = getattr(args, flag)
        if value is not None:
            fields[field] = value
    # An explicit head_dim (the tiny fixture has one) would no longer match a resized
    # hidden/heads pair; without it LlamaConfig derives hidden_size // num_attention_heads.
    if args.hidden is not None or args.heads is not None:
        fields.pop("head_dim", None)
    # Positions past max_position_embeddings still work, but keep the config truthful about the
    # sequence length it is trained on (the tiny fixture says 128, the default --seq is 256).
    fields["max_position_embeddings"] = max(fields.get("max_position_embeddings", 0), args.seq)
    # With the cache on, every training forward would also build a KV cache it never reads.
    fields["use_cache"] = False
    return LlamaConfig.from_dict(fields, attn_implementation=args.attn)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model = LlamaForCausalLM(build_config(args)).to(torch.float32)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    params = sum(p.numel() for p in model.parameters())

    # All batches are drawn up front so that no timed step pays for generating its input.
    vocab = model.config.vocab_size
    batches = torch.randint(0, vocab, (args.warmup + args.steps, args.batch, args.seq))

    step_seconds = []
    for i, ids in enumerate(batches):
        start = time.perf_counter()
        optimizer.zero_grad()
        # Labels are the inputs themselves: the model shifts them by one position internally.
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        elapsed = time.perf_counter() - start
        if i >= args.warmup:
            step_seconds.append(elapsed)

    median = statistics.median(step_seconds)
    print(
        json.dumps(
            {
                "framework": "pytorch",
                "torch": torch.__version__,
                "transformers": transformers.__version__,
                "params": params,
                "batch": args.batch,
                "seq": args.seq,
                "threads": args.threads,
                "attn": args.attn,
                "step_ms_median": round(median * 1e3, 3),
                "tokens_per_s": round(args.batch * args.seq / median, 1),
            }
        )
    )


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""transformers' `generate` on the prompts scripts/load_test.py sends, for comparison with
`pp serve`: greedy, float32, the same chat template and end-of-sequence tokens (the model's,
and the token the chat template ends a turn with, as pp stops there too).

    python3 scripts/bench_hf_generate.py MODEL_DIR [--max-tokens 64] [--prompts 128] [--batch 32]

Prints tokens/s one prompt at a time (batch 1) and in batches of --batch (left-padded), and the
per-token latency of the former. Needs torch and transformers.
"""
import argparse
import json
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parent.parent


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--data", type=Path, default=ROOT / "configs/data/tool-calls/val.jsonl")
    args = parser.parse_args()
    rows = [json.loads(l) for l in args.data.read_text().splitlines() if l.strip()]
    questions = [next(m["content"] for m in r["messages"] if m["role"] == "user") for r in rows]
    questions = [questions[i % len(questions)] for i in range(args.prompts)]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                           add_generation_prompt=True) for q in questions]
    # pp also stops at the token the chat template ends a turn with; so does this.
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    turn = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\x01a\x01"}],
        tokenize=False)
    end = tokenizer.encode(turn.split("\x01a\x01")[1].strip(), add_special_tokens=False)
    if len(end) == 1:
        eos.add(end[0])
    settings = dict(max_new_tokens=args.max_tokens, do_sample=False,
                    pad_token_id=tokenizer.pad_token_id, eos_token_id=sorted(eos))

    def run(batch):
        tokens, start = 0, time.perf_counter()
        for i in range(0, len(texts), batch):
            inputs = tokenizer(texts[i:i + batch], return_tensors="pt", padding=True,
                               add_special_tokens=False)
            with torch.no_grad():
                out = model.generate(**inputs, **settings)
            new = out[:, inputs["input_ids"].shape[1]:]
            # Tokens before the first end-of-sequence token, as pp counts them.
            for row in new.tolist():
                n = next((k for k, t in enumerate(row) if t in eos), len(row))
                tokens += n
        return tokens, time.perf_counter() - start

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
    for batch in (1, args.batch):
        tokens, seconds = run(batch)
        line = f"batch {batch}: {tokens} tokens in {seconds:.2f} s, {tokens / seconds:.1f} tokens/s"
        if batch == 1:
            line += f", {1000 * seconds / tokens:.2f} ms per token"
        print(line)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""A randomly initialised Llama checkpoint with wide activations and little compute per token,
so that moving activations between pipeline stages is a visible share of a step
(scripts/bench_netns.sh). Uses the llama3-tiny fixture's tokenizer.

    scripts/make_wide_model.py OUT_DIR [--hidden 1024] [--layers 2] [--intermediate 256] [--vocab V]
"""
import argparse
import json
import pathlib
import shutil

import numpy as np
from safetensors.numpy import save_file

FIXTURE = pathlib.Path(__file__).resolve().parent.parent / "tests/fixtures/llama3-tiny/hf"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=pathlib.Path)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--vocab", type=int, help="embedding rows, at least the tokenizer's (default: the tokenizer's)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    config = json.loads((FIXTURE / "config.json").read_text())
    heads = args.hidden // 64
    config.update(
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        head_dim=64,
        max_position_embeddings=1024,
        vocab_size=max(args.vocab or 0, config["vocab_size"]),
    )
    (args.out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"]:
        shutil.copy(FIXTURE / name, args.out / name)
    rng = np.random.default_rng(0)
    h, i, v = args.hidden, args.intermediate, config["vocab_size"]
    kv = config["num_key_value_heads"] * 64

    def normal(*shape):
        return (rng.standard_normal(shape) * 0.02).astype(np.float32)

    tensors = {"model.embed_tokens.weight": normal(v, h), "model.norm.weight": np.ones(h, np.float32), "lm_head.weight": normal(v, h)}
    for layer in range(args.layers):
        p = f"model.layers.{layer}."
        tensors.update({
            p + "input_layernorm.weight": np.ones(h, np.float32),
            p + "post_attention_layernorm.weight": np.ones(h, np.float32),
            p + "self_attn.q_proj.weight": normal(h, h),
            p + "self_attn.k_proj.weight": normal(kv, h),
            p + "self_attn.v_proj.weight": normal(kv, h),
            p + "self_attn.o_proj.weight": normal(h, h),
            p + "mlp.gate_proj.weight": normal(i, h),
            p + "mlp.up_proj.weight": normal(i, h),
            p + "mlp.down_proj.weight": normal(h, i),
        })
    save_file(tensors, str(args.out / "model.safetensors"), metadata={"format": "pt"})


if __name__ == "__main__":
    main()

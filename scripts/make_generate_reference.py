#!/usr/bin/env python3
"""Writes tests/fixtures/<fixture>/generate.json: transformers' greedy `generate` on each
reference model, the ground truth for `pp`'s cached decoding (tests/generate.rs).

    python3 scripts/make_generate_reference.py [tests/fixtures]

Needs torch and transformers. Each model runs in float32 with eager attention (as the fixtures'
other references), no end-of-sequence token, so every prompt gets exactly `new_tokens` tokens.
The smallest gap between the best and second-best logit over all steps is recorded: below
about 1e-4 a token could flip on rounding alone, and the prompts would need changing.
"""
import json
import sys
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

NEW_TOKENS = 24


def prompts(ids):
    """Prompts of different lengths cut from the fixture's reference rows (the chat prompt too)."""
    rows = ids["input_ids"]
    out = [rows[0][:3], rows[-1][:11], rows[0][:17]]
    out.append(ids["chat"])
    return out


def main():
    root = Path(sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures")
    torch.manual_seed(0)
    for fixture in sorted(p for p in root.iterdir() if (p / "hf").is_dir()):
        meta = json.loads((fixture / "meta.json").read_text())
        from safetensors.torch import load_file
        expected = load_file(fixture / "expected.safetensors")
        model = AutoModelForCausalLM.from_pretrained(
            fixture / "hf", dtype=torch.float32, attn_implementation="eager").eval()
        model.generation_config.eos_token_id = None
        source = {"input_ids": expected["input_ids"].tolist(), "chat": meta["chat"]["token_ids"][:40]}
        cases = []
        for prompt in prompts(source):
            with torch.no_grad():
                ids = torch.tensor([prompt])
                # An explicit mask: without one, a prompt token equal to the pad id is masked.
                out = model.generate(ids, attention_mask=torch.ones_like(ids),
                                     max_new_tokens=NEW_TOKENS,
                                     do_sample=False, output_scores=True,
                                     return_dict_in_generate=True)
            new = out.sequences[0, len(prompt):].tolist()
            gaps = [float(torch.topk(s[0], 2).values.diff().abs()) for s in out.scores]
            cases.append({"prompt": prompt, "greedy": new, "smallest_gap": min(gaps)})
        record = {
            "what": "transformers' greedy generate (float32, eager attention, no EOS stop)",
            "generated_by": {"transformers": __import__("transformers").__version__,
                             "torch": torch.__version__},
            "new_tokens": NEW_TOKENS,
            "cases": cases,
        }
        (fixture / "generate.json").write_text(json.dumps(record, indent=1) + "\n")
        print(fixture.name, [round(c["smallest_gap"], 5) for c in cases])


if __name__ == "__main__":
    main()

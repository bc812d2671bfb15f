#!/usr/bin/env python3
"""Checks that a directory written by `pp convert --to hf` is what transformers expects.

Loads the original and the exported checkpoint with `from_pretrained` (each in its stored dtype),
compares every parameter for exact equality, runs both on the same tokens, and checks that the
tokenizer and generation config load. Exits non-zero on any difference.

    python scripts/check_hf_export.py ORIGINAL_HF_DIR EXPORTED_HF_DIR

Needs torch and transformers (not needed by pp itself or its tests).
"""
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig


def main(original_dir: str, exported_dir: str) -> int:
    original = AutoModelForCausalLM.from_pretrained(original_dir, torch_dtype="auto")
    exported = AutoModelForCausalLM.from_pretrained(exported_dir, torch_dtype="auto")
    want, got = original.state_dict(), exported.state_dict()
    if want.keys() != got.keys():
        print(f"parameter names differ: {sorted(set(want) ^ set(got))}")
        return 1
    for name, tensor in want.items():
        if tensor.dtype != got[name].dtype or not torch.equal(tensor, got[name]):
            print(f"parameter {name} differs")
            return 1
    tokenizer = AutoTokenizer.from_pretrained(exported_dir)
    ids = tokenizer("The quick brown fox jumps over the lazy dog", return_tensors="pt").input_ids
    ids = ids % original.config.vocab_size
    with torch.no_grad():
        diff = (original(ids).logits - exported(ids).logits).abs().max().item()
    GenerationConfig.from_pretrained(exported_dir)
    print(
        f"{exported_dir}: {len(want)} parameters identical, "
        f"logits max |diff| {diff:.3g} on {ids.shape[1]} tokens, tokenizer and generation config load"
    )
    return 0 if diff == 0.0 else 1


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1], sys.argv[2]))

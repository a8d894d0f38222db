#!/usr/bin/env python3
"""Check that an `mmrun export --to hf` folder loads in transformers with mmrun's logits.

    python -m venv ../hfenv && ../hfenv/bin/pip install --index-url https://download.pytorch.org/whl/cpu torch \
        && ../hfenv/bin/pip install transformers safetensors
    mmrun export <model> --to hf /tmp/x
    # the folder must hold golden.safetensors ({"input_ids", "logits"}) written by mmrun;
    `MMRUN_EXPORT_DIR=/tmp/e cargo test --test it export::hf_export_for_transformers` writes such folders.
    ../hfenv/bin/python scripts/check-hf-export.py /tmp/e/dense /tmp/e/moe

Loads each folder with AutoModelForCausalLM and AutoTokenizer, renders the chat template, and
prints the max |logit difference| against mmrun's logits (fails above 1e-4).
"""
import sys

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

worst = 0.0
for d in sys.argv[1:]:
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(d)
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert "<|im_start|>assistant" in prompt, prompt
    g = load_file(f"{d}/golden.safetensors")
    with torch.no_grad():
        logits = model(input_ids=g["input_ids"]).logits
    diff = (logits - g["logits"]).abs().max().item()
    worst = max(worst, diff)
    print(f"{d}: {type(model).__name__}, {type(tok).__name__}, max |logit diff| {diff:.3e}, logit std {g['logits'].std().item():.3f}")
assert worst < 1e-4, worst
print("OK")

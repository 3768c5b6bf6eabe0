#!/usr/bin/env python3
"""Builds a Llama-3-8B-shaped checkpoint with random bf16 weights and records what Hugging Face transformers computes
for it, so `cleave selftest --reference DIR` can compare the CUDA backend on the same numbers.

Runs on the GPU machine (torch + transformers, no network):
    python3 tools/hf_reference.py --out /tmp/llama3-8b-dummy --tokenizer tests/fixtures/hf/llama/tokenizer.json

Writes DIR/config.json, sharded *.safetensors, tokenizer.json (only so the directory is complete; prompts are token
ids) and reference.json in the format of tests/fixtures/hf (cases with prompt_ids, greedy_ids, last_prompt_logits).
"""
import argparse
import json
import os
import shutil

import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=8)
    args = ap.parse_args()

    config = LlamaConfig(
        vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=args.layers,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=131072,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001,
        rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192},
    )
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16).eval()
    # Norm weights near 1 but not exactly, so a missing norm weight would show.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    os.makedirs(args.out, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    shutil.copy(args.tokenizer, os.path.join(args.out, "tokenizer.json"))
    # Reload from the files, as a user would: the model built above had `.to(bfloat16)` round every floating
    # buffer, RoPE's inv_freq included, which a loaded model keeps in f32.
    del model
    model = LlamaForCausalLM.from_pretrained(args.out, dtype=torch.bfloat16).to("cuda").eval()
    inv_freq_dtype = str(model.model.rotary_emb.inv_freq.dtype)

    gen = torch.Generator().manual_seed(1)
    cases = []
    for name, length in [("short", 7), ("block_crossing", 33), ("long", 300)]:
        ids = torch.randint(0, config.vocab_size, (length,), generator=gen).tolist()
        x = torch.tensor([ids], device="cuda")
        # A plain argmax loop: generate() would refill EOS handling from the generation config.
        greedy = []
        with torch.no_grad():
            logits = model(x).logits[0, -1].float().cpu()
            for _ in range(args.new_tokens):
                nxt = int(model(x).logits[0, -1].float().argmax())
                greedy.append(nxt)
                x = torch.cat([x, torch.tensor([[nxt]], device="cuda")], dim=1)
        cases.append({"name": name, "prompt_ids": ids, "max_new_tokens": args.new_tokens,
                      "greedy_ids": greedy, "last_prompt_logits": logits.tolist()})
    # The same model in f32: cleave's f32 mode must match it to rounding, which separates bugs from bf16 rounding.
    del model
    model = LlamaForCausalLM.from_pretrained(args.out, dtype=torch.float32).to("cuda").eval()
    for case in cases:
        x = torch.tensor([case["prompt_ids"]], device="cuda")
        greedy = []
        with torch.no_grad():
            case["last_prompt_logits_f32"] = model(x).logits[0, -1].float().cpu().tolist()
            for _ in range(args.new_tokens):
                nxt = int(model(x).logits[0, -1].argmax())
                greedy.append(nxt)
                x = torch.cat([x, torch.tensor([[nxt]], device="cuda")], dim=1)
        case["greedy_ids_f32"] = greedy
    ref = {"architecture": "LlamaForCausalLM", "dtype_saved": "bfloat16", "compute_dtype": "bfloat16",
           "torch_version": torch.__version__, "transformers_version": transformers.__version__,
           "device": torch.cuda.get_device_name(), "bf16_inv_freq_dtype": inv_freq_dtype, "cases": cases}
    with open(os.path.join(args.out, "reference.json"), "w") as f:
        json.dump(ref, f)
    print(f"wrote {args.out}: {len(cases)} cases")


if __name__ == "__main__":
    main()

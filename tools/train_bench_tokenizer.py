#!/usr/bin/env python3
"""Trains a byte-level BPE tokenizer shaped like Llama 3's (its pre-tokenizer regex, byte-level, ~128k vocabulary)
on text found on this machine, for benchmarks that need a realistic tokenizer without downloads (the fixtures'
tokenizers are tiny). Usage: train_bench_tokenizer.py OUT_DIR [VOCAB_SIZE] [--split llama3|qwen2|gpt2]. Writes
OUT_DIR/tokenizer.json and OUT_DIR/config.json, Llama-3-8B's shape: OUT_DIR is then a model directory without weights,
which `cleave serve --backend mock` serves (real tokenization, no model compute).

`--split` picks the pre-tokenizer family (default llama3): `qwen2` is Qwen2's split regex with its NFC normalizer and
chat special tokens and no BOS; `gpt2` is GPT-2's ByteLevel(use_regex=true). The small-vocabulary files under
tests/fixtures/tokenizers were made with this script (see the README there)."""

import argparse
import glob
import json
import os
import sys
import sysconfig

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# Llama 3's pre-tokenizer split (contractions, letters, 1-3 digit groups, punctuation runs, newlines, spaces).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Qwen2's: the same but one digit per piece.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("vocab", nargs="?", type=int, default=128_000)
    parser.add_argument("--split", choices=["llama3", "qwen2", "gpt2"], default="llama3")
    args = parser.parse_args()
    out, vocab = args.out, args.vocab
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True))
    tok = Tokenizer(models.BPE())
    if args.split == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        special_tokens = ["<|endoftext|>"]
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(LLAMA3_SPLIT if args.split == "llama3" else QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
        special_tokens = ["<|begin_of_text|>"] if args.split == "llama3" else ["<|endoftext|>", "<|im_start|>",
                                                                              "<|im_end|>"]
    if args.split == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=special_tokens)
    def texts():
        for path in files:
            try:
                with open(path, encoding="utf-8") as f:
                    yield f.read()
            except (UnicodeDecodeError, OSError):
                continue

    tok.train_from_iterator(texts(), trainer)
    if args.split == "llama3":
        # Like Llama 3's tokenizer, encoding with special tokens prepends <|begin_of_text|> (id 0 here).
        tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                           special_tokens=[("<|begin_of_text|>", 0)])
    else:
        # Like Qwen2's and GPT-2's: no BOS.
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(llama3_8b_config(tok.get_vocab_size()), f, indent=2)
    print(f"{tok.get_vocab_size()} tokens from {len(files)} files -> {out}/tokenizer.json, {out}/config.json")


def llama3_8b_config(n_tokens):
    """Meta-Llama-3-8B's config.json, with BOS at this tokenizer's id. The vocabulary stays Llama 3's 128,256 (ids
    past the tokenizer's decode to nothing, as Llama 3's unused reserved tokens do); EOS keeps Llama 3's ids."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "attention_bias": False,
        "bos_token_id": 0,
        "eos_token_id": [128001, 128009],
        "head_dim": 128,
        "hidden_act": "silu",
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "max_position_embeddings": 8192,
        "model_type": "llama",
        "num_attention_heads": 32,
        "num_hidden_layers": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "vocab_size": max(128256, n_tokens),
    }


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Trains a byte-level BPE tokenizer shaped like Llama 3's (its pre-tokenizer regex, byte-level, ~128k vocabulary)
on text found on this machine, for benchmarks that need a realistic tokenizer without downloads (the fixtures'
tokenizers are tiny). Usage: train_bench_tokenizer.py OUT_DIR [VOCAB_SIZE]. Writes OUT_DIR/tokenizer.json and
OUT_DIR/config.json, Llama-3-8B's shape: OUT_DIR is then a model directory without weights, which `cleave serve
--backend mock` serves (real tokenization, no model compute)."""

import glob
import json
import os
import sys
import sysconfig

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

# Llama 3's pre-tokenizer split (contractions, letters, 1-3 digit groups, punctuation runs, newlines, spaces).
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def main():
    out, vocab = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 128_000
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "**", "*.py"), recursive=True))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<|begin_of_text|>"])
    def texts():
        for path in files:
            try:
                with open(path, encoding="utf-8") as f:
                    yield f.read()
            except (UnicodeDecodeError, OSError):
                continue

    tok.train_from_iterator(texts(), trainer)
    # Like Llama 3's tokenizer, encoding with special tokens prepends <|begin_of_text|> (id 0 here).
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
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

#!/usr/bin/env python3
"""Trains a byte-level BPE tokenizer shaped like Llama 3's (its pre-tokenizer regex, byte-level, ~128k vocabulary)
on text found on this machine, for benchmarks that need a realistic tokenizer without downloads (the fixtures'
tokenizers are tiny). Usage: train_bench_tokenizer.py OUT_DIR [VOCAB_SIZE]. Writes OUT_DIR/tokenizer.json."""

import glob
import os
import sys
import sysconfig

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

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
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    print(f"{tok.get_vocab_size()} tokens from {len(files)} files -> {out}/tokenizer.json")


if __name__ == "__main__":
    main()

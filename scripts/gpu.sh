#!/usr/bin/env bash
# Runs on the GPU machine with only the carried binary (target/release/cleave) and this repository: selftest of
# the CUDA backend (fixtures, an 8B-shaped model against transformers, batch invariance, measured ceilings), then the
# engine benchmark at the Llama-3-8B shape. Results go to the folder given as $1.
set -euo pipefail
out=${1:-gpu-results}
bin=${CLEAVE_BIN:-target/release/cleave}
mkdir -p "$out"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export CLEAVE_CACHE_DIR=${CLEAVE_CACHE_DIR:-/tmp/cleave-cache}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv | tee "$out/gpu.txt"
if [ "${SKIP_REFERENCE:-0}" != 1 ]; then
    python3 tools/hf_reference.py --out /tmp/llama3-8b-dummy --tokenizer tests/fixtures/hf/llama/tokenizer.json 2>&1 | tail -3
    reference=(--reference /tmp/llama3-8b-dummy)
else
    reference=()
fi
# A failed check is reported, not fatal: the benchmark still runs.
"$bin" selftest "${reference[@]}" --json-out "$out/selftest.json" 2>&1 | tee "$out/selftest.txt" || echo "selftest FAILED"
"$bin" bench-engine --backend cuda --model llama3-8b \
    --prompt-tokens ${PROMPTS:-512,2048,8192,32768} --batch ${BATCHES:-1,8,64,256} --context ${CONTEXTS:-1024,4096} \
    --decode-steps 32 --repeat ${REPEAT:-3} > "$out/bench.json" 2> >(tee "$out/bench.log" >&2)
# Where the GPU time goes, op by op (events between ops; graphs off): an 8k prefill, decode at batch 1, 64 and 256.
CLEAVE_PROFILE_OPS=1 "$bin" bench-engine --backend cuda --model llama3-8b --prompt-tokens 8192 --batch 1,64,256 \
    --context 1024 --decode-steps 16 --repeat 1 > "$out/bench-op-profile.json" 2> >(tee "$out/bench-op-profile.log" >&2)
# The same decode points op by op (no CUDA graphs), for the graphs' effect on the same card in the same run.
CLEAVE_CUDA_GRAPHS=0 "$bin" bench-engine --backend cuda --model llama3-8b --prompt-tokens 512 --batch 1,64 \
    --context 1024 --decode-steps 32 --repeat ${REPEAT:-3} > "$out/bench-no-graphs.json" 2> >(tee "$out/bench-no-graphs.log" >&2)
# Decode with the few-row products on cuBLAS only and on our GEMV kernel at every batch it takes (CLEAVE_GEMV=off,
# all), against the measured default above (ours up to batch 4); then op by op at batch 8.
for gemv in off all; do
    CLEAVE_GEMV=$gemv "$bin" bench-engine --backend cuda --model llama3-8b --prompt-tokens 512 --batch 1,2,4,8,16 \
        --context 1024 --decode-steps 32 --repeat ${REPEAT:-3} > "$out/bench-gemv-$gemv.json" 2> >(tee "$out/bench-gemv-$gemv.log" >&2)
done
CLEAVE_GEMV=all CLEAVE_PROFILE_OPS=1 "$bin" bench-engine --backend cuda --model llama3-8b --prompt-tokens 512 --batch 8 \
    --context 1024 --decode-steps 16 --repeat 1 > "$out/bench-gemv-op-profile.json" 2> >(tee "$out/bench-gemv-op-profile.log" >&2)

#!/usr/bin/env bash
# Tensor parallelism on a machine with 2 or 4 GPUs, with only the carried binary and this repository: `cleave selftest
# --tp N` (greedy tokens at N GPUs against one GPU on the fixtures, a 4-KV-head f32 model and the Llama-3-8B shape;
# KV moved between TP layouts), the engine benchmark at the 8B shape at TP 1 and TP 2, and — on 4 GPUs — the
# Llama-3-70B shape served as prefill TP2 + decode TP2 against two TP2 aggregated workers. Results go to $1.
set -euo pipefail
out=${1:-tp-results}
bin=${CLEAVE_BIN:-target/release/cleave}
mkdir -p "$out"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export CLEAVE_CACHE_DIR=${CLEAVE_CACHE_DIR:-/tmp/cleave-cache}
export NCCL_NVLS_ENABLE=0
# cudarc opens NCCL as libnccl.so; hosts without the development package have only libnccl.so.2.
if ! ldconfig -p | grep -q 'libnccl.so '; then
    mkdir -p /tmp/cleave-nccl
    ln -sf "${NCCL_LIB:-/usr/lib/x86_64-linux-gnu/libnccl.so.2}" /tmp/cleave-nccl/libnccl.so
    export LD_LIBRARY_PATH=/tmp/cleave-nccl:$LD_LIBRARY_PATH
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/gpu.txt" || true
nvidia-smi topo -m 2>&1 | tee "$out/topo.txt" || true
n_gpus=$(nvidia-smi -L | wc -l)

# 1. Correctness: N GPUs against one.
for tp in 2 4; do
    [ "$n_gpus" -ge "$tp" ] || continue
    "$bin" selftest --tp "$tp" --json-out "$out/selftest-tp$tp.json" 2>&1 | tee "$out/selftest-tp$tp.txt" \
        || echo "selftest --tp $tp FAILED"
done

# 2. The engine alone at the 8B shape, one GPU against two (decode runs op by op at TP 2: no CUDA graphs yet).
for tp in 1 2; do
    "$bin" bench-engine --backend cuda --model llama3-8b --tp "$tp" --prompt-tokens 2048,8192 --batch 1,64 \
        --context 1024 --decode-steps 32 --repeat 2 > "$out/bench-engine-tp$tp.json" 2> "$out/bench-engine-tp$tp.log" \
        || echo "bench-engine --tp $tp FAILED"
done
CLEAVE_CUDA_GRAPHS=0 "$bin" bench-engine --backend cuda --model llama3-8b --prompt-tokens 2048 --batch 1,64 \
    --context 1024 --decode-steps 32 --repeat 2 > "$out/bench-engine-tp1-no-graphs.json" 2> /dev/null || true

# 3. Four GPUs: Llama-3-70B shape, prefill TP2 + decode TP2 against two TP2 aggregated workers, same workload.
if [ "$n_gpus" -ge 4 ]; then
    "$bin" bench --compare deploy/llama3-70b-tp2-aggregated.yaml deploy/llama3-70b-tp2-disaggregated.yaml \
        --rates "${RATES:-0.5,1}" --num-requests "${NUM_REQUESTS:-40}" --seed 1 \
        --input-len "mix:0.9*lognormal:512:1.0:16:4096,0.1*uniform:4096:16384" --output-len fixed:128 \
        --vocab-size 128000 --gpus 4 --slo-ttft-ms 4000 --slo-itl-ms 100 \
        --output-json "$out/llama3-70b-tp2.json" --plot-dir "$out/plots" 2>&1 | tee "$out/llama3-70b-tp2.txt"
fi

#!/usr/bin/env bash
# Tensor parallelism on a machine with 2 or 4 GPUs, with only the carried binary and this repository: `cleave selftest
# --tp N` (greedy tokens at N GPUs against one GPU on the fixtures, a 4-KV-head f32 model and the Llama-3-8B shape;
# KV moved between TP layouts), the engine benchmark at the 8B shape at TP 1 and TP 2, and — on 4 GPUs — the
# Llama-3-70B shape served as prefill TP2 + decode TP2 against two TP2 aggregated workers. Results go to $1.
# PHASES (default correctness,engine,70b) picks the parts.
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

phases=${PHASES:-correctness,engine,70b}

# 1. Correctness: N GPUs against one.
if [[ $phases == *correctness* ]]; then
    for tp in 2 4; do
        [ "$n_gpus" -ge "$tp" ] || continue
        # Decode graphs are on: NCCL warns that one thread launching graphs for several GPUs can deadlock, hence the
        # timeout.
        timeout 300 "$bin" selftest --tp "$tp" --json-out "$out/selftest-tp$tp.json" 2>&1 | tee "$out/selftest-tp$tp.txt" \
            || echo "selftest --tp $tp FAILED or hung"
    done
fi
# 2. The engine alone at the 8B shape, one GPU against two: TP 2 with decode graphs (the default) and op by op.
if [[ $phases == *engine* ]]; then
    for run in 1 2 2-no-graphs; do
        tp=${run%%-*}
        CLEAVE_TP_GRAPHS=$([ "$run" = 2-no-graphs ] && echo 0 || echo 1) timeout 300 "$bin" bench-engine --backend cuda \
            --model llama3-8b --tp "$tp" --prompt-tokens 2048,8192 --batch 1,64 --context 1024 --decode-steps 32 \
            --repeat 2 > "$out/bench-engine-tp$run.json" 2> "$out/bench-engine-tp$run.log" \
            || echo "bench-engine --tp $run FAILED or hung"
    done
fi
# 3. Four GPUs: Llama-3-70B shape, prefill TP2 + decode TP2 against two TP2 aggregated workers, the workload of
# NVIDIA's published disaggregation result (ISL 3000, OSL 150), over a sweep of rates for the curve of throughput per
# GPU against tokens/s per user. SPECS picks the deployments (two specs at four rates fit one 10-minute call);
# deploy/llama3-70b-tp2-aggregated-chunked.yaml is the chunked-prefill baseline.
# GPUS=8 with the deploy/llama3-70b-8gpu-*.yaml specs is the 8-GPU run (2×TP4 aggregated against the disaggregated
# splits; one or two specs per call).
if [[ $phases == *70b* ]] && [ "$n_gpus" -ge "${GPUS:-4}" ]; then
    specs=(${SPECS:-deploy/llama3-70b-tp2-aggregated.yaml deploy/llama3-70b-tp2-disaggregated.yaml})
    "$bin" bench --compare "${specs[@]}" \
        --rates "${RATES:-0.5,1,2,4}" --num-requests "${NUM_REQUESTS:-30}" --seed 1 \
        --input-len fixed:3000 --output-len fixed:150 --vocab-size 128000 --gpus "${GPUS:-4}" \
        --output-json "$out/llama3-70b-tp2.json" --plot-dir "$out/plots" --serve-log-dir "$out/serve-logs" 2>&1 |
        tee "$out/llama3-70b-tp2.txt"
fi

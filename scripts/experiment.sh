#!/usr/bin/env bash
# The latency-spike experiment on a machine with two GPUs (docs/benchmarks.md): the same seeded workload — Poisson
# arrivals, 90% of prompts lognormal around 512 tokens, 10% uniform in 8k–32k, 256 output tokens — against
#   (A) two aggregated workers, prefill-first;
#   (B) two aggregated workers, chunked prefill with budgets 512 and 2048;
#   (C) one prefill and one decode worker, conditional disaggregation (KV over CUDA IPC),
# at each rate of a sweep, Llama-3-8B shape with dummy bf16 weights. Needs only the carried binary and this
# repository. Results (JSON, SVG plots, the table) go to the folder given as $1. GPUS=4 runs the four-GPU versions
# (deploy/llama3-8b-4gpu-*.yaml: four aggregated workers, or one prefill and three decode workers).
set -euo pipefail
out=${1:-experiment-results}
bin=${CLEAVE_BIN:-target/release/cleave}
mkdir -p "$out"
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export CLEAVE_CACHE_DIR=${CLEAVE_CACHE_DIR:-/tmp/cleave-cache}
export CLEAVE_LOG=${CLEAVE_LOG:-warn}

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
nvidia-smi topo -m > "$out/topo.txt" 2>&1 || true
workload=(--seed "${SEED:-1}" --input-len "mix:0.9*lognormal:512:1.0:16:8192,0.1*uniform:8192:32768"
    --output-len fixed:256 --vocab-size 128000 --gpus "${GPUS:-2}" --slo-ttft-ms 2000 --slo-ttft-max-input-tokens 2048 --slo-itl-ms 50)
if [ "${GPUS:-2}" = 4 ]; then
    disaggregated=deploy/llama3-8b-4gpu-disaggregated.yaml
    default_specs="deploy/llama3-8b-4gpu-aggregated.yaml deploy/llama3-8b-4gpu-chunked.yaml $disaggregated"
else
    disaggregated=deploy/llama3-8b-disaggregated.yaml
    default_specs="deploy/llama3-8b-aggregated.yaml deploy/llama3-8b-chunked-512.yaml deploy/llama3-8b-chunked.yaml
        $disaggregated"
fi
# The unloaded decode step of (C): a few short requests, one at a time.
"$bin" bench --compare "$disaggregated" --rate "${UNLOADED_RATE:-0.5}" --num-requests 6 \
    --seed 2 --input-len fixed:512 --output-len fixed:256 --vocab-size 128000 \
    --output-json "$out/unloaded.json" 2>&1 | tee "$out/unloaded.txt"
specs=(${SPECS:-$default_specs})
"$bin" bench --compare "${specs[@]}" --rates "${RATES:-1,2,4}" --num-requests "${NUM_REQUESTS:-60}" "${workload[@]}" \
    --output-json "$out/experiment.json" --plot-dir "$out/plots" --serve-log-dir "$out/serve-logs" 2>&1 |
    tee "$out/experiment.txt"
# The same requests judged with no stall allowed (every gap within the ITL bound, not each request's p99).
"$bin" bench --rescore "$out/experiment.json" --slo-ttft-ms 2000 --slo-ttft-max-input-tokens 2048 --slo-itl-ms 50 \
    --slo-itl-quantile 100 --output-json "$out/experiment-no-stall.json" 2>&1 | tee "$out/experiment-no-stall.txt"

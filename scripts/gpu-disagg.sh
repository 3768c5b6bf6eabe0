#!/usr/bin/env bash
# Disaggregation on a machine with two GPUs (docs/benchmarks.md): greedy tokens of a disaggregated deployment equal
# an aggregated one's; TTFT of 8k and 32k prompts prefilled remotely (KV over CUDA IPC, then over TCP) against
# prefilled locally on the decode GPU; KV bytes and time from the frontend's metrics. Llama-3-8B shape, dummy bf16
# weights. Needs only the carried binary and this repository; results go to the folder given as $1.
set -euo pipefail
out=${1:-disagg-results}
bin=${CLEAVE_BIN:-target/release/cleave}
mkdir -p "$out" /tmp/specs
export LD_LIBRARY_PATH=/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export CLEAVE_CACHE_DIR=${CLEAVE_CACHE_DIR:-/tmp/cleave-cache}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 | tee "$out/gpu.txt" || true
nvidia-smi topo -m 2>&1 | tee "$out/topo.txt" || true

# 0. KV transfer bandwidth between the two GPUs: CUDA IPC copies and TCP's stages against the link (cuMemcpyPeer).
if [ "${BACKEND:-cuda}" = cuda ]; then
    "$bin" bench-kv-transfer --devices 0,1 --blocks 2048 > "$out/kv-transfer.json" 2> >(tee "$out/kv-transfer.txt" >&2) \
        || echo "bench-kv-transfer FAILED"
fi

# MODEL=tiny BACKEND=cpu VOCAB=256 LENS="100 2000 3000" TTFT_LENS="2048 3000" runs the same flow on a CPU.
model=${MODEL:-llama3-8b}
export VOCAB=${VOCAB:-128000} LENS=${LENS:-100 2000 8192}
spec() { # name, extra YAML lines
    printf 'model: %s\nbackend: %s\nport: 8000\n%b' "$model" "${BACKEND:-cuda}" "$2" > "/tmp/specs/$1.yaml"
}
spec disaggregated 'remote_prefill_tokens_min: 1024\nprefill: {count: 1, devices: [0], scheduler: prefill-first, step_tokens: 32768}\ndecode: {count: 1, devices: [1], scheduler: chunked, step_tokens: 512}\n'
spec local 'remote_prefill_tokens_min: 1000000\nprefill: {count: 1, devices: [0], scheduler: prefill-first, step_tokens: 32768}\ndecode: {count: 1, devices: [1], scheduler: prefill-first, step_tokens: 32768}\n'
spec aggregated 'prefill: {count: 0}\ndecode: {count: 0}\naggregated: {count: 1, devices: [1], scheduler: prefill-first, step_tokens: 32768}\n'

# 1. Greedy tokens: the same prompts, one at a time, on the disaggregated and the aggregated deployment.
tokens() { # spec, output file
    "$bin" serve --config "/tmp/specs/$1.yaml" > "$out/serve-$1.log" 2>&1 &
    local pid=$!
    for _ in $(seq 600); do curl -sf localhost:8000/health > /dev/null && break; sleep 0.5; done
    python3 - "$2" <<'PY'
import json, sys, urllib.request
out = {}
import os
vocab, model = int(os.environ["VOCAB"]), os.environ["MODEL_NAME"]
for n in map(int, os.environ["LENS"].split()):
    ids = [(i * 7919 + n) % (vocab - vocab // 4) + vocab // 4 for i in range(n)]
    body = json.dumps({"model": model, "prompt": ids, "max_tokens": 32, "temperature": 0, "ignore_eos": True}).encode()
    r = urllib.request.urlopen(urllib.request.Request("http://127.0.0.1:8000/v1/completions", body, {"content-type": "application/json"}), timeout=600)
    out[n] = json.load(r)["choices"][0]["text"]
json.dump(out, open(sys.argv[1], "w"))
PY
    curl -s localhost:8000/metrics > "$out/metrics-tokens-$1.txt"
    kill -INT $pid; wait $pid || true
}
export MODEL_NAME=$model
tokens disaggregated "$out/tokens-disaggregated.json"
tokens aggregated "$out/tokens-aggregated.json"
python3 - "$out" <<'PY' | tee "$out/tokens-check.txt"
import json, sys
a = json.load(open(f"{sys.argv[1]}/tokens-disaggregated.json")); b = json.load(open(f"{sys.argv[1]}/tokens-aggregated.json"))
for n in a:
    print(f"prompt {n:>5} tokens: disaggregated == aggregated: {a[n] == b[n]}")
PY

# 2. TTFT, one request at a time: remote prefill over CUDA IPC, over TCP, and local prefill on the decode GPU.
ttft() { # label, spec
    "$bin" serve --config "/tmp/specs/$2.yaml" > "$out/serve-ttft-$1.log" 2>&1 &
    local pid=$!
    for _ in $(seq 600); do curl -sf localhost:8000/health > /dev/null && break; sleep 0.5; done
    for len in ${TTFT_LENS:-8192 32768}; do
        "$bin" bench --url http://127.0.0.1:8000 --rate inf --max-concurrency 1 --num-requests "${N_TTFT:-3}" \
            --seed 3 --input-len "fixed:$len" --output-len fixed:8 --vocab-size "$VOCAB" \
            --output-json "$out/ttft-$1-$len.json" > "$out/ttft-$1-$len.txt" 2>&1 || echo "ttft $1 $len FAILED"
    done
    curl -s localhost:8000/metrics > "$out/metrics-ttft-$1.txt"
    kill -INT $pid; wait $pid || true
}
ttft ipc disaggregated
CLEAVE_KV_TRANSPORT=tcp ttft tcp disaggregated
ttft local local
python3 - "$out" <<'PY' | tee "$out/summary.txt"
import json, sys, glob, os
print(f"{'run':28} {'TTFT p50 ms':>12} {'mean':>10} {'max':>10}")
for f in sorted(glob.glob(f"{sys.argv[1]}/ttft-*.json")):
    s = json.load(open(f))["runs"][0]["summary"]["ttft_ms"]
    print(f"{os.path.basename(f)[5:-5]:28} {s['p50']:12.1f} {s['mean']:10.1f} {s['max']:10.1f}")
PY
cat "$out/tokens-check.txt"

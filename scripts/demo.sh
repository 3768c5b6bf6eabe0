#!/usr/bin/env bash
# The latency-spike comparison in two minutes on a laptop's CPU (tiny preset): the same seeded workload — 90% short
# prompts, 10% of 2k–3.5k tokens — against (A) two aggregated workers prefilling whole prompts, (B) two aggregated
# workers with chunked prefill, (C) one prefill and one decode worker. Each worker is pinned to one core (specs in
# deploy/demo-*.yaml). Look at the ITL columns: a long prompt stalls every request decoding next to it in (A), for
# the whole prefill; (B) slices the stall into chunks; (C) keeps decoding steady. Results go to the folder $1.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-demo-results}
bin=${CLEAVE_BIN:-target/release/cleave}
[ -x "$bin" ] || cargo build --release
"$bin" bench --compare deploy/demo-aggregated.yaml deploy/demo-chunked.yaml deploy/demo-disaggregated.yaml \
    --rate "${RATE:-10}" --num-requests "${NUM_REQUESTS:-150}" --seed 1 \
    --input-len "mix:0.9*lognormal:64:1.0:16:1024,0.1*uniform:2048:3584" --output-len fixed:256 --vocab-size 256 \
    --slo-ttft-ms 200 --slo-ttft-max-input-tokens 1024 --slo-itl-ms 20 --long-prompt-tokens 2048 \
    --output-json "$out/demo.json" --plot-dir "$out/plots"
python3 - "$out/demo.json" <<'PY' || true
import json, sys
runs = json.load(open(sys.argv[1]))["runs"]
print(f"\n{'deployment':34} {'ITL p99 ms':>10} {'p99.9':>8} {'max':>8}   gaps > 100 ms")
for r in runs:
    itl = r["summary"]["itl_ms"]
    stalls = sum(g > 100 for q in r["requests"] for g in q["itl_ms"])
    print(f"{r['target']:34} {itl['p99']:10.2f} {itl['p99_9']:8.2f} {itl['max']:8.1f}   {stalls}")
PY

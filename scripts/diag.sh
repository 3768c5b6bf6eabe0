set -u
export LD_LIBRARY_PATH=/usr/local/cuda/lib64; export CUDA_HOME=/usr/local/cuda; export CLEAVE_CACHE_DIR=/tmp/cleave-cache
B=target/release/cleave
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader
for i in 1 2; do
  s=$(date +%s.%N)
  CLEAVE_LOG=info timeout 300 $B bench-engine --backend cuda --model llama3-8b --prompt-tokens 512 --batch 1 --context 1024 --decode-steps 8 --repeat 1 > $OUT/start$i.json 2> $OUT/start$i.log
  e=$(date +%s.%N); echo "start run $i: $(echo "$e - $s" | bc) s"; grep -E "compiled|loaded|allocated" $OUT/start$i.log | sed 's/^.*INFO//' | cut -c1-150
done
timeout 200 $B selftest --json-out $OUT/selftest.json > $OUT/selftest.txt 2>&1; echo "selftest rc=$?"; tail -25 $OUT/selftest.txt
timeout 200 $B bench-engine --backend cuda --model llama3-8b --prompt-tokens 512 --batch 1,16,32 --context 4096,16384 --decode-steps 16 --repeat 1 > $OUT/decode-long.json 2>$OUT/decode-long.log; echo "bench rc=$?"; tail -12 $OUT/decode-long.log

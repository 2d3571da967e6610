#!/usr/bin/env bash
# One GPU visit: Triton correctness (native tests + randomized sweep), then the benchmark that BENCHMARKS.md
# and benchmarks/results/ are made from. Usage on the GPU machine: bash scripts/gpu_session.sh OUT_DIR
set -uo pipefail
out=${1:-${OUT:-gpu_out}}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1 COLUMNS=160
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/card.txt"
python scripts/gpu_check.py --skip bench,lora_bench --out /tmp/gpu_check > /tmp/gpu_check.log 2>&1
echo "gpu_check exit $?" | tee -a "$out/card.txt"
tail -60 /tmp/gpu_check.log > "$out/gpu_check_tail.txt"
python -m moekit bench --preset nemotron3-nano,qwen3-30b-a3b,gpt-oss-20b,mixtral-8x7b --tokens 8192,32768 \
  --modes fwd,full,lora --lora-rank 16 --impls grouped_mm,moekit-reference,moekit-triton \
  --json "$out/bench.json" --plot "$out/bench.png" 2>&1 | tee "$out/bench.log"
python -m moekit demo --device cuda --steps 50 --baseline-steps 49 --no-progress --json "$out/demo_cuda.json" 2>&1 | tail -25 | tee "$out/demo.log"
PYTHONPATH=src python scripts/probe_wgrad.py 2>&1 | tee "$out/probe_wgrad.txt"
cat "$out/gpu_check_tail.txt"

#!/usr/bin/env bash
# A GPU visit in calls that each fit the device's 10-minute limit:
#   bash scripts/gpu_session.sh OUT_DIR check   Triton correctness: native tests, LoRA sweep, randomized sweep,
#                                               one section at a time (side by side they overfill an 80 GB card)
#   bash scripts/gpu_session.sh OUT_DIR configs 1,2   the randomized and LoRA sweeps with the N-th tile config of
#                                               every kernel family (the check runs config 0, the default; the
#                                               tuner may pick any), two configs per call
#   bash scripts/gpu_session.sh OUT_DIR lora [RANKS] [PRESETS]   issue #4's benchmark: LoRA at each rank (default
#                                               8,16,64) and the frozen base, grouped_mm + PEFT against moekit-triton
#   bash scripts/gpu_session.sh OUT_DIR native  every visit that touches a kernel: pytest -m triton natively (one
#                                               pinned config per kernel family, 8 processes)
#   bash scripts/gpu_session.sh OUT_DIR cold [SHAPES] [TOKENS]   and the cold-cache section: scripts/cold_cache.py,
#                                               first calls with an empty tuning cache (MOEKIT_CACHE_DIR, default a
#                                               new directory) vs the reference, then a second process on the filled
#                                               cache (paths WARM_PATHS, default full,lora-split): same bits, no tuning
#   bash scripts/gpu_session.sh OUT_DIR ab OLD_SRC [PRESETS]   the benchmark table (fwd/full/lora/frozen, 8k and
#                                               32k tokens, grouped_mm and moekit-triton) for older code and this code
#                                               in alternating processes of one call (scripts/ab_bench.py)
#   bash scripts/gpu_session.sh OUT_DIR bench   the benchmark BENCHMARKS.md and benchmarks/results/ are made
#                                               from, the CUDA demo, the loss-curve comparison, the GEMM probe
# Every section runs under `timeout` (SECTION_TIMEOUT seconds, default 400) and writes its own log under OUT_DIR,
# so a section that hangs costs only its own time and what ran before it still comes back.
set -uo pipefail
out=${1:-${OUT:-gpu_out}}
limit=${SECTION_TIMEOUT:-400}
part=${2:-check}
mkdir -p "$out"
export PYTHONPATH=src PYTHONUNBUFFERED=1 COLUMNS=160
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/card.txt"
if [ "$part" = check ]; then
  for section in tests lora sweep; do
    skip=$(echo tests,lora,sweep,bench,lora_bench | tr ',' '\n' | grep -vx "$section" | paste -sd,)
    timeout "$limit" python scripts/gpu_check.py --skip "$skip" --sweep-shards 1 --out "$out/check" \
      > "$out/check_$section.log" 2>&1
    echo "gpu_check $section: exit $?" | tee -a "$out/card.txt"
    tail -25 "$out/check_$section.log"
  done
elif [ "$part" = native ]; then
  # -n 8: the suite compiles a few hundred kernel variants, and compiling is bound by the host's cores
  timeout "$limit" python -m pytest -m triton -q -n 8 -p no:cacheprovider tests > "$out/native_tests.log" 2>&1
  echo "native triton tests: exit $? ($(tail -1 "$out/native_tests.log"))" | tee -a "$out/card.txt"
  grep -E "FAILED|ERROR" "$out/native_tests.log" | head -20
elif [ "$part" = cold ]; then
  shapes=${3:-nemotron3-nano,qwen3-30b-a3b,gpt-oss-20b,mixtral-8x7b,odd-relu2,odd-silu,odd-gpt-oss}
  tokens=${4:-8192,32768}
  cache=${MOEKIT_CACHE_DIR:-$(mktemp -d)}  # must start empty: the first process is the cold one
  tag=$(echo "$shapes" | cut -c1-12 | tr -c 'A-Za-z0-9_\n-' _)
  MOEKIT_CACHE_DIR=$cache timeout "$limit" python scripts/cold_cache.py --shapes "$shapes" --tokens "$tokens" \
    --json "$out/cold_$tag.json" > "$out/cold_$tag.log" 2>&1
  echo "cold cache ($shapes): exit $?" | tee -a "$out/card.txt"
  MOEKIT_CACHE_DIR=$cache timeout "$limit" python scripts/cold_cache.py --shapes "$shapes" --tokens "$tokens" \
    --paths "${WARM_PATHS:-full,lora-split}" --json "$out/warm_$tag.json" --expect "$out/cold_$tag.json" \
    > "$out/warm_$tag.log" 2>&1
  echo "warm cache ($shapes): exit $?" | tee -a "$out/card.txt"
  cat "$out/cold_$tag.log" "$out/warm_$tag.log"
elif [ "$part" = ab ]; then
  # same-call A/B of the benchmark table against older code: OLD_SRC holds its src (git archive REV src | tar -x)
  old_src=${3:?ab needs OLD_SRC}
  presets=${4:-nemotron3-nano,qwen3-30b-a3b,gpt-oss-20b,mixtral-8x7b}
  tag=$(echo "$presets" | cut -c1-12 | tr -c 'A-Za-z0-9_\n-' _)
  timeout "$limit" python scripts/ab_bench.py --variant "old=$old_src" --variant new=src --rounds 1 --timeout "$limit" \
    --json "$out/ab_$tag.json" -- --preset "$presets" --tokens 8192,32768 --modes fwd,full,lora,frozen \
    --lora-rank 16 --impls "${AB_IMPLS:-grouped_mm,moekit-triton}" 2>&1 | tee "$out/ab_$tag.log"
elif [ "$part" = configs ]; then
  for config in $(echo "${3:-1,2}" | tr ',' ' '); do
    for section in sweep lora; do
      skip=$(echo tests,lora,sweep,bench,lora_bench | tr ',' '\n' | grep -vx "$section" | paste -sd,)
      timeout "$limit" python scripts/gpu_check.py --skip "$skip" --sweep-shards 1 --config "$config" \
        --out "$out/config$config" \
        > "$out/config${config}_$section.log" 2>&1
      echo "gpu_check $section, tile config $config: exit $?" | tee -a "$out/card.txt"
      grep -E "^-- (sweep|LoRA sweep)" "$out/config${config}_$section.log" | head -2
    done
  done
elif [ "$part" = lora ]; then
  timeout "$limit" python -m moekit bench --preset "${4:-nemotron3-nano,qwen3-30b-a3b,gpt-oss-20b}" --tokens 8192,32768 \
    --modes lora,frozen --lora-rank "${3:-8,16,64}" --impls grouped_mm,moekit-triton \
    --json "$out/lora.json" 2>&1 | tee "$out/lora.log" | tail -70
else
  timeout "$limit" python -m moekit bench --preset nemotron3-nano,qwen3-30b-a3b,gpt-oss-20b,mixtral-8x7b \
    --tokens 8192,32768 \
    --modes fwd,full,lora --lora-rank 16 --impls grouped_mm,moekit-reference,moekit-triton \
    --json "$out/bench.json" --plot "$out/bench.png" 2>&1 | tee "$out/bench.log" | tail -80
  timeout "$limit" python -m moekit demo --device cuda --steps 50 --baseline-steps 49 --no-progress --json "$out/demo_cuda.json" \
    2>&1 | tail -18 | tee "$out/demo.log"
  timeout "$limit" python scripts/track_curves.py --device cuda --lr 5e-3,2e-3,1e-3 --json "$out/curves.json" \
    > "$out/curves.log" 2>&1
  grep lr "$out/curves.log"
  timeout "$limit" python scripts/probe_wgrad.py > "$out/probe_wgrad.txt" 2>&1
  timeout "$limit" python scripts/probe_sync.py > "$out/probe_sync.txt" 2>&1
  cat "$out/probe_wgrad.txt" "$out/probe_sync.txt"
fi

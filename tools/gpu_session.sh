#!/usr/bin/env bash
# One GPU visit, in parts that each fit one call of the device tool (10 minutes). Run from the repository root:
#
#   bash tools/gpu_session.sh OUT native      pytest -m triton natively: the unit tests of tests/ on the GPU (one
#                                             pinned config per kernel family, 8 processes)
#   bash tools/gpu_session.sh OUT gpu [PARTS] [PYTEST_ARGS...]
#                                             the GPU suite tests/gpu (pytest -m gpu): the Triton engine against the
#                                             reference engine, both against float64, at the model shapes and a
#                                             random sweep, LoRA included, outputs NaN-poisoned; PARTS = lora,sweep
#                                             (default both, each its own process and SECTION_TIMEOUT: give each
#                                             part its own call, `gpu lora` then `gpu sweep`, where both do not fit)
#   bash tools/gpu_session.sh OUT configs [N,M] [PYTEST_ARGS...]
#                                             the GPU suite (without the int64 case) once per tile config N
#                                             (MOEKIT_TRITON_AUTOTUNE=config:N; default 1,2; the dense Hopper spaces have
#                                             5 configs, 0-4, the NF4 ones 7 or 8; `gpu` runs config 0); PYTEST_ARGS select
#                                             within it, e.g. `configs 3 -k lora`
#   bash tools/gpu_session.sh OUT cold [SHAPES] [TOKENS]
#                                             cold-cache correctness (tools/cold_cache.py): every engine path's
#                                             first call with an empty tuning cache (MOEKIT_CACHE_DIR, default a new
#                                             directory) against the reference, then a second process on the filled
#                                             cache (paths WARM_PATHS, default full,lora-split): same bits, no tuning
#   bash tools/gpu_session.sh OUT bench [PRESETS]
#                                             the benchmark table of BENCHMARKS.md: fwd/full/lora r=16/frozen at 8k
#                                             and 32k tokens, grouped_mm (+ PEFT) and moekit-triton, one process
#   bash tools/gpu_session.sh OUT lora [RANKS] [PRESETS]
#                                             LoRA at each rank (default 8,16,64) and the frozen base, grouped_mm +
#                                             PEFT against moekit-triton
#   bash tools/gpu_session.sh OUT ab OLD_SRC [PRESETS]
#                                             the bench table for older code (OLD_SRC holds its src: `git archive REV
#                                             src | tar -x -C .ab_old`) and this code, alternating processes of one
#                                             call (tools/ab_bench.py; AB_IMPLS, default grouped_mm,moekit-triton)
#   bash tools/gpu_session.sh OUT quant       NF4 experts: native NF4 kernel tests, cold-cache first calls of the NF4
#                                             paths, the NF4 LoRA bench, Qwen3-30B-A3B at full size
#                                             (tools/qlora_real_size.py) and the loading path (tools/measure_loading.py);
#                                             each its own timeout; QUANT_PARTS picks sections (see the part)
#   bash tools/gpu_session.sh OUT dist [CASES]
#                                             tests/distributed_worker.py on this machine's GPUs (NCCL, one process per
#                                             GPU, the Triton kernels native; default cases: FSDP2 LoRA, full, QLoRA (and
#                                             double-quantized) and DDP LoRA), each case against one process on the same batch; then
#                                             tests/test_distributed_hf.py on the GPUs (DistributedConfig expert
#                                             parallelism, the Trainer with FSDP2 at load and through accelerate)
#   bash tools/gpu_session.sh OUT curves      the CUDA demo and 50-step LoRA loss curves against transformers
#
# Every visit that touches a kernel runs native, gpu and cold. Each section runs under `timeout` (SECTION_TIMEOUT
# seconds, default 400) and writes its own log (and JSON or JUnit XML) under OUT, so a section that hangs costs
# only its own time and what ran before it still comes back; the last lines printed are the summary.
set -uo pipefail
out=${1:?usage: bash tools/gpu_session.sh OUT PART [ARGS] (see the head of this file)}
part=${2:?usage: bash tools/gpu_session.sh OUT PART [ARGS] (see the head of this file)}
limit=${SECTION_TIMEOUT:-400}
mkdir -p "$out"
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 COLUMNS=160  # (a caller's path: carried wheels)
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$out/card.txt"
presets_all=nemotron3-nano,qwen3-30b-a3b,gpt-oss-20b,mixtral-8x7b
tag() { echo "$1" | cut -c1-12 | tr -c 'A-Za-z0-9_\n-' _; }

gpu_suite() {  # gpu_suite LABEL PARTS [PYTEST_ARGS...]: one pytest process per part of tests/gpu
  local label=$1 parts=$2
  shift 2
  for name in $(echo "$parts" | tr ',' ' '); do
    timeout "$limit" python -m pytest -m gpu -q -rfE -p no:cacheprovider "tests/gpu/test_gpu_$name.py" \
      --junitxml "$out/${label}_$name.xml" "$@" > "$out/${label}_$name.log" 2>&1
    rc=$?
    echo "gpu suite $name ($label, MOEKIT_TRITON_AUTOTUNE=${MOEKIT_TRITON_AUTOTUNE:-0}): exit $rc" \
      "($(tail -1 "$out/${label}_$name.log"))" | tee -a "$out/card.txt"
    grep -E "^(FAILED|ERROR)" "$out/${label}_$name.log" | head -20
  done
}

case "$part" in
native)
  # -n 8: the suite compiles a few hundred kernel variants, and compiling is bound by the host's cores
  timeout "$limit" python -m pytest -m triton -q -n 8 -p no:cacheprovider tests > "$out/native_tests.log" 2>&1
  echo "native triton tests: exit $? ($(tail -1 "$out/native_tests.log"))" | tee -a "$out/card.txt"
  grep -E "FAILED|ERROR" "$out/native_tests.log" | head -20
  ;;
gpu)
  parts=${3:-lora,sweep}
  gpu_suite gpu "$parts" "${@:4}"
  ;;
configs)
  for config in $(echo "${3:-1,2}" | tr ',' ' '); do
    MOEKIT_TRITON_AUTOTUNE=config:$config gpu_suite "config$config" lora,sweep \
      --deselect tests/gpu/test_gpu_sweep.py::test_int64_offsets "${@:4}"
  done
  ;;
cold)
  shapes=${3:-$presets_all,odd-relu2,odd-silu,odd-gpt-oss}
  tokens=${4:-8192,32768}
  cache=${MOEKIT_CACHE_DIR:-$(mktemp -d)}  # must start empty: the first process is the cold one
  t=$(tag "$shapes")
  MOEKIT_CACHE_DIR=$cache timeout "$limit" python tools/cold_cache.py --shapes "$shapes" --tokens "$tokens" \
    --json "$out/cold_$t.json" > "$out/cold_$t.log" 2>&1
  echo "cold cache ($shapes): exit $?" | tee -a "$out/card.txt"
  MOEKIT_CACHE_DIR=$cache timeout "$limit" python tools/cold_cache.py --shapes "$shapes" --tokens "$tokens" \
    --paths "${WARM_PATHS:-full,lora-split}" --json "$out/warm_$t.json" --expect "$out/cold_$t.json" \
    > "$out/warm_$t.log" 2>&1
  echo "warm cache ($shapes): exit $?" | tee -a "$out/card.txt"
  cat "$out/cold_$t.log" "$out/warm_$t.log"
  ;;
bench)
  presets=${3:-$presets_all}
  timeout "$limit" python -m moekit bench --preset "$presets" --tokens 8192,32768 --modes fwd,full,lora,frozen \
    --lora-rank 16 --impls grouped_mm,moekit-triton --json "$out/bench_$(tag "$presets").json" 2>&1 \
    | tee "$out/bench_$(tag "$presets").log" | tail -80
  ;;
lora)
  presets=${4:-nemotron3-nano,qwen3-30b-a3b,gpt-oss-20b}
  timeout "$limit" python -m moekit bench --preset "$presets" --tokens 8192,32768 --modes lora,frozen \
    --lora-rank "${3:-8,16,64}" --impls grouped_mm,moekit-triton --json "$out/lora.json" 2>&1 \
    | tee "$out/lora.log" | tail -70
  ;;
ab)
  old_src=${3:?ab needs OLD_SRC}
  presets=${4:-$presets_all}
  t=$(tag "$presets")
  timeout "$limit" python tools/ab_bench.py --variant "old=$old_src" --variant new=src --rounds 1 --timeout "$limit" \
    --json "$out/ab_$t.json" -- --preset "$presets" --tokens 8192,32768 --modes fwd,full,lora,frozen \
    --lora-rank 16 --impls "${AB_IMPLS:-grouped_mm,moekit-triton}" 2>&1 | tee "$out/ab_$t.log"
  ;;
quant)
  # NF4 experts, sections QUANT_PARTS (default all, in this order; a call fits about three):
  #   tests    tests/gpu/test_gpu_nf4.py (the Hopper gluon kernels), then tests/test_triton_nf4.py natively at tile
  #            configs QUANT_TEST_CONFIGS (default 0 1 3: row tiles of 128 and 256, wide column tiles; 5 and 6 are
  #            4-warp programs); a failure stops the part
  #   cold     first calls (cold cache) of the NF4 paths at the four shapes, T = 2048 then 8192
  #   bench    the NF4 LoRA step beside bf16 LoRA and grouped_mm + PEFT, T = 8192 and 32768 (tuned by cold)
  #   real     Qwen3-30B-A3B at full size (tools/qlora_real_size.py)
  #   loading  the loading path, and reloading the saved NF4 model (tools/measure_loading.py; LOAD_ARGS, e.g. --double-quant)
  #   linear   linear="nf4" (bitsandbytes 4-bit linears) with NF4 experts, LoRA on both, on CUDA (not in the default)
  #   operand  tools/nf4_operand_bench.py: one NF4 GEMM per wgmma operand form and the engine's gluon kernel (not in
  #            the default)
  #   kernels  tools/nf4_row_tile_bench.py (the Hopper kernel's row-tile plans and the Triton NF4 kernel) (not in the
  #            default)
  cache=${MOEKIT_CACHE_DIR:-$(mktemp -d)}
  export MOEKIT_CACHE_DIR=$cache
  for section in $(echo "${QUANT_PARTS:-tests,cold,bench,real,loading}" | tr ',' ' '); do
    case "$section" in
    tests)
      timeout "${TESTS_TIMEOUT:-150}" python -m pytest -m gpu -q -rfE -p no:cacheprovider tests/gpu/test_gpu_nf4.py \
        > "$out/nf4_hopper_tests.log" 2>&1
      rc=$?
      echo "Hopper NF4 kernel tests: exit $rc ($(tail -1 "$out/nf4_hopper_tests.log"))" | tee -a "$out/card.txt"
      grep -E "^(FAILED|ERROR)" "$out/nf4_hopper_tests.log" | head -10
      [ $rc -eq 0 ] || exit 1
      for config in ${QUANT_TEST_CONFIGS:-0 1 3}; do
        MOEKIT_TRITON_AUTOTUNE=config:$config timeout "${TESTS_TIMEOUT:-150}" python -m pytest -m triton -q -n 8 \
          -p no:cacheprovider tests/test_triton_nf4.py > "$out/nf4_tests_$config.log" 2>&1
        rc=$?
        echo "native NF4 tests, config $config: exit $rc ($(tail -1 "$out/nf4_tests_$config.log"))" | tee -a "$out/card.txt"
        grep -E "^(FAILED|ERROR)" "$out/nf4_tests_$config.log" | head -10
        [ $rc -eq 0 ] || exit 1
      done
      ;;
    cold)
      timeout "${COLD_TIMEOUT:-240}" python tools/cold_cache.py --shapes "$presets_all" --paths nf4-frozen,nf4-lora \
        --tokens 2048,8192 --json "$out/cold_nf4.json" > "$out/cold_nf4.log" 2>&1
      echo "cold cache (NF4 paths): exit $? ($(tail -1 "$out/cold_nf4.log"))" | tee -a "$out/card.txt"
      grep -E "WRONG|False|Error" "$out/cold_nf4.log" | head -10
      ;;
    bench)
      timeout "${BENCH_TIMEOUT:-240}" python -m moekit bench --preset "${BENCH_PRESETS:-$presets_all}" \
        --tokens "${BENCH_TOKENS:-8192,32768}" --modes lora --lora-rank 16 --impls grouped_mm,moekit-triton --quant nf4 \
        --json "$out/bench_nf4.json" > "$out/bench_nf4.log" 2>&1
      echo "bench --quant nf4: exit $?" | tee -a "$out/card.txt"
      tail -45 "$out/bench_nf4.log"
      ;;
    real)
      timeout "${REAL_TIMEOUT:-150}" python tools/qlora_real_size.py --model qwen3-30b-a3b --layers 48 --tokens 2048 \
        --rank 16 --steps 3 ${REAL_ARGS:-} --out "$out/real_size.json" > "$out/real_size.log" 2>&1
      echo "real size: exit $?" | tee -a "$out/card.txt"
      tail -18 "$out/real_size.log"
      ;;
    loading)
      timeout "${LOAD_TIMEOUT:-240}" python tools/measure_loading.py --layers 4 ${LOAD_ARGS:-} --out "$out/loading.json" \
        > "$out/loading.log" 2>&1
      echo "loading: exit $?" | tee -a "$out/card.txt"
      tail -14 "$out/loading.log"
      timeout "${LOAD_TIMEOUT:-240}" python -m pytest -q -p no:cacheprovider tests/test_quant_loading.py \
        -k "onto_its_device and cuda" > "$out/saved_nf4.log" 2>&1
      echo "saved NF4 model loads onto CUDA: exit $? ($(tail -1 "$out/saved_nf4.log"))" | tee -a "$out/card.txt"
      ;;
    linear)  # needs bitsandbytes (carry its wheel: the device README's wheel recipe)
      timeout "${LINEAR_TIMEOUT:-120}" python -m pytest -q -p no:cacheprovider tests/test_quant_loading.py \
        -k "qlora_on_linear and cuda" > "$out/linear_nf4.log" 2>&1
      echo "QLoRA with linear=nf4 on CUDA: exit $? ($(tail -1 "$out/linear_nf4.log"))" | tee -a "$out/card.txt"
      grep -E "^(FAILED|ERROR|E )" "$out/linear_nf4.log" | head -10
      ;;
    operand)  # one NF4 GEMM with the weight as each wgmma operand, and the gluon pipelined kernel, against dense
      timeout "${OPERAND_TIMEOUT:-300}" python tools/nf4_operand_bench.py > "$out/nf4_operand.log" 2>&1
      echo "NF4 operand bench: exit $?" | tee -a "$out/card.txt"
      tail -40 "$out/nf4_operand.log"
      ;;
    kernels)
      timeout "${ROW_TILE_TIMEOUT:-240}" python tools/nf4_row_tile_bench.py > "$out/nf4_row_tile.log" 2>&1
      echo "row-tile bench: exit $?" | tee -a "$out/card.txt"
      tail -16 "$out/nf4_row_tile.log"
      ;;
    *)
      echo "unknown quant section '$section': tests, cold, bench, real, loading, linear, operand or kernels"
      exit 2
      ;;
    esac
  done
  ;;
dist)
  cases=${3:-qwen3_moe:fsdp2:lora:triton,nemotron_h_latent:fsdp2:lora:triton,qwen3_moe:fsdp2:full:triton,qwen3_moe:fsdp2:qlora:triton,nemotron_h_latent:fsdp2:qlora:triton,qwen3_moe:fsdp2:qlora-dq:triton,qwen3_moe:ddp:lora:triton}
  gpus=$(nvidia-smi -L | wc -l)
  MOEKIT_DIST_DEVICE=cuda timeout "$limit" python -m torch.distributed.run --standalone --nproc-per-node "$gpus" \
    tests/distributed_worker.py "$out/dist.json" $(echo "$cases" | tr ',' ' ') > "$out/dist.log" 2>&1
  echo "distributed on $gpus GPU(s): exit $?" | tee -a "$out/card.txt"
  tail -5 "$out/dist.log"
  python -c "import json,sys; [print(r['case'], 'loss', '%.1e' % r['loss_err'], 'grad', '%.1e' % r['grad_err'], r['grads'], 'grads', 'ok' if max(r['loss_err'], r['grad_err']) <= 1e-5 and not r['mismatched_names'] else 'WRONG') for r in json.load(open(sys.argv[1]))]" "$out/dist.json"
  # transformers' DistributedConfig (expert parallelism) and the HF Trainer (FSDP2 at load, and accelerate's FSDP2)
  MOEKIT_DIST_DEVICE=cuda timeout "$limit" python -m pytest -q -rfEs -p no:cacheprovider tests/test_distributed_hf.py \
    --junitxml "$out/dist_hf.xml" > "$out/dist_hf.log" 2>&1
  echo "transformers' distributed config and the Trainer on $gpus GPU(s): exit $? ($(tail -1 "$out/dist_hf.log"))" \
    | tee -a "$out/card.txt"
  grep -E "^(FAILED|ERROR|SKIPPED)" "$out/dist_hf.log" | head -20
  ;;
curves)
  timeout "$limit" python -m moekit demo --device cuda --steps 50 --baseline-steps 49 --no-progress \
    --json "$out/demo_cuda.json" 2>&1 | tail -18 | tee "$out/demo.log"
  timeout "$limit" python tools/track_curves.py --device cuda --lr 5e-3,2e-3,1e-3 --json "$out/curves.json" \
    > "$out/curves.log" 2>&1
  grep lr "$out/curves.log"
  ;;
*)
  echo "unknown part '$part': native, gpu, configs, cold, bench, lora, ab, quant, dist or curves (see the head of this file)"
  exit 2
  ;;
esac

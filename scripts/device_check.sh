#!/usr/bin/env bash
# The GPU figures of docs/performance.md on a lent GPU: `scripts/device_check.sh [PART ...]`
# runs the named parts (default: layer step train tests), each under its own time limit so
# one failure costs only its share; two calls (layer step, then train tests) fit the 10-minute
# limit of one. Results land in $OUT:
#   env.txt     nvidia-smi, jax and its devices, pip's view of the install
#   layer.jsonl scripts/benchmark.py --suite=layer at Switch-Base sizes, bf16
#   step.jsonl  --suite=step: t5_base against switch_base with 8 / 64 / 128 experts
#   train/metrics.jsonl  the README's switchmoe-train run (its workdir listed in train.log)
#   tests.log   the test files that run on one accelerator
#   summary.txt each part's exit status and seconds (also printed last)
#   PART.log    each part's output
# (A device call brings back at most 8 files: each call above writes at most 7.)
# Run from the repository root with .whl/ carried (scripts/device_wheels.sh makes it).
# SMALL=1 TEST_PLATFORM=cpu shrinks every size, to check this script itself on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/switchmoe_device}
mkdir -p "$OUT/train"
PY=${PY:-python3}
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

part() {  # part NAME SECONDS COMMAND...: run, log, record status and time
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  printf '%-8s rc=%-3s %4ss  %s\n' "$name" "$rc" "$((SECONDS - start))" "$*" >> "$SUMMARY"
}

if [ -d .whl ] && [ "${SMALL:-0}" != 1 ]; then  # the wheels are the GPU image's (Python 3.12)
  part wheels 120 $PY -m pip install -q --no-index --no-deps .whl/*.whl
fi
# The checkout itself is the package: no install (the image has no index to build from).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi || true; $PY -c 'import jax; print(jax.__version__, jax.devices())'
  $PY -m pip list 2>/dev/null | grep -iE 'jax|flax|optax|orbax|grain|datasets|ml.coll'; } \
  > "$OUT/env.txt" 2>&1

if [ "${SMALL:-0}" = 1 ]; then
  LAYER=(--tokens=512 --d_model=32 --d_ff=64 --experts=8 --repeats=2 --dtype=float32)
  STEP=(--cases t5_tiny switch_tiny --steps=2)
  TRAIN=(--config=configs/switch_tiny.py --config.train.num_steps=4)
  TESTS=(tests/test_dispatch.py -k bucketed)
else
  LAYER=(--tokens=65536 --d_model=768 --d_ff=2048 --experts=8,64,256 --repeats=15
         --dtype=bfloat16 --dispatch=einsum,gather,dropless,dropless:ragged_dot)
  # Batch 32 x 512 / 128: the issue's HF figures are at batch 32, and at the configs' own 256
  # the dense step alone is planned at ~280 GiB (scripts/plan.py); 114 target tokens would
  # leave no routing group of 512 that divides the batch's 32 x 114.
  STEP=(--cases t5_base switch_base switch_base:model.moe.num_experts=64
        switch_base:model.moe.num_experts=128 --steps=10 --batch_size=32
        --set=data.targets_length=128)
  TRAIN=(--config=configs/switch_tiny.py)  # the README's main job, its 300 steps
  TESTS=(tests/test_dispatch.py tests/test_moe.py tests/test_model.py)
fi
PARTS=("$@")
[ ${#PARTS[@]} -gt 0 ] || PARTS=(layer step train tests)
for name in "${PARTS[@]}"; do
  case $name in
    layer) part layer 150 $PY scripts/benchmark.py --suite=layer "${LAYER[@]}" \
             --json="$OUT/layer.jsonl" ;;
    step) part step 270 $PY scripts/benchmark.py --suite=step "${STEP[@]}" \
            --json="$OUT/step.jsonl" ;;
    train) rm -rf /tmp/switchmoe_device_run
           part train 150 $PY -m switchmoe.main --workdir=/tmp/switchmoe_device_run "${TRAIN[@]}"
           cp /tmp/switchmoe_device_run/metrics.jsonl "$OUT/train/" 2>/dev/null
           ls -R /tmp/switchmoe_device_run >> "$OUT/train.log" 2>&1 ;;
    # tests/conftest.py defaults JAX to the CPU; tests that need 8 simulated devices fail here.
    # One process (no xdist workers, which the image may lack): they would share one GPU.
    # -v names each test as it ends, so a part cut short by its limit still says how far it got.
    # Full-precision float32 matmuls: the tests' tolerances against float64 references are
    # for float32, and a GPU's default for float32 matmuls is TF32.
    tests) JAX_PLATFORMS=${TEST_PLATFORM:-cuda} JAX_DEFAULT_MATMUL_PRECISION=highest \
           part tests 150 $PY -m pytest -v \
             -o addopts= -m 'not slow' -p no:xdist -p no:cacheprovider "${TESTS[@]}" ;;
    *) echo "device_check.sh: unknown part '$name' (layer, step, train, tests)" >&2; exit 2 ;;
  esac
done
cat "$SUMMARY"

#!/usr/bin/env bash
# The GPU figures of docs/performance.md in ONE call on a lent GPU. A task is lent 15 minutes of
# device time in all, the machine's start (1-2 min) included, a machine stays warm only 30 s
# after a call, and none starts with under 4 minutes left: so everything runs in one command of
# at most DEADLINE seconds (default 540, inside the 600 s of one call), parts in the order they
# are needed, each under its own limit and the time left. `scripts/device_check.sh [PART ...]`
# runs the named parts (default: train step layer tests). Results in $OUT, never more than the
# 8 files a call brings back, each rewritten as its part goes, so a call cut short keeps them:
#   summary.txt          each part's exit status and seconds (also printed last, with digests)
#   env.txt              nvidia-smi, jax and its devices, pip's view of the install
#   train_metrics.jsonl  the README's switchmoe-train run (300 steps of switch_tiny)
#   step.jsonl           --suite=step: t5_base against switch_base with 8 / 64 / 128 experts
#   layer.jsonl          --suite=layer at Switch-Base sizes, bf16, E = 8 / 64 / 256, with HF's
#                        Switch layer (the image's PyTorch) timed beside ours (--hf)
#   logs.tar.gz          every part's full output (PART.log), the tests' included
# Run from the repository root with .whl/ carried (scripts/device_wheels.sh makes it): they are
# installed into a folder of their own when $PY is the Python they were built for (3.12).
# SMALL=1 TEST_PLATFORM=cpu shrinks every size, to check this script itself on a CPU.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/switchmoe_device}
PY=${PY:-python3}
DEADLINE=${DEADLINE:-540}
mkdir -p "$OUT"
LOGS=$(mktemp -d)
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"

pack() {  # every log so far into $OUT/logs.tar.gz, replaced whole so a kill leaves the last one
  tar -czf "$LOGS.tar.gz" -C "$LOGS" . && mv "$LOGS.tar.gz" "$OUT/logs.tar.gz"
}

part() {  # part NAME LIMIT COMMAND...: run under min(LIMIT, time left), log, record, pack
  local name=$1 limit=$2 start=$SECONDS
  shift 2
  local left=$((DEADLINE - SECONDS))
  if [ "$left" -lt 20 ]; then
    printf '%-8s skipped: %ss left of DEADLINE=%s\n' "$name" "$left" "$DEADLINE" >> "$SUMMARY"
    return
  fi
  [ "$limit" -le "$left" ] || limit=$left
  timeout -k 5 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$? command="$*"
  printf '%-8s rc=%-3s %4ss of %4ss  %s\n' "$name" "$rc" "$((SECONDS - start))" "$limit" \
    "${command:0:150}" >> "$SUMMARY"
  pack
}

# The wheels are cp312 (the GPU image's Python); a folder of their own, first on the path,
# leaves the image's own packages untouched.
if [ -d .whl ] && $PY -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null; then
  part wheels 60 $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target /tmp/switchmoe_site .whl/*.whl
  export PYTHONPATH="/tmp/switchmoe_site${PYTHONPATH:+:$PYTHONPATH}"
fi
# The checkout itself is the package: no install (the image has no index to build from).
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
# Room for Switch-Base-128 (planned at ~95 GiB) beside what earlier cases leave cached.
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-.95}
{ nvidia-smi || true; $PY -c 'import jax; print(jax.__version__, jax.devices())'
  $PY -m pip list 2>/dev/null | grep -iE 'jax|flax|optax|orbax|grain|datasets|ml.coll'; } \
  > "$OUT/env.txt" 2>&1

if [ "${SMALL:-0}" = 1 ]; then
  LAYER=(--tokens=512 --d_model=32 --d_ff=64 --experts=8 --repeats=2 --dtype=bfloat16
         --dispatch=einsum,gather,dropless,dropless:ragged_dot)
  STEP=(--cases t5_tiny switch_tiny --steps=2)
  TRAIN=(--config=configs/switch_tiny.py --config.train.num_steps=4)
  TESTS=(tests/test_dispatch.py -k bucketed)
else
  LAYER=(--tokens=65536 --d_model=768 --d_ff=2048 --experts=8,64,256 --repeats=11
         --dtype=bfloat16 --dispatch=einsum,gather,dropless,dropless:ragged_dot)
  # Batch 32 x 512 / 128: the issue's HF figures are at batch 32, and at the configs' own 256
  # the dense step alone is planned at ~280 GiB (scripts/plan.py); 114 target tokens would
  # leave no routing group of 512 that divides the batch's 32 x 114. 128 experts come last:
  # the targets name 8 and 64.
  STEP=(--cases t5_base switch_base:model.moe.num_experts=8 switch_base:model.moe.num_experts=64
        switch_base:model.moe.num_experts=128 --steps=10 --batch_size=32
        --set=data.targets_length=128)
  TRAIN=(--config=configs/switch_tiny.py)  # the README's main job, its 300 steps
  TESTS=(tests/test_dispatch.py tests/test_moe.py)
fi
# HF's Switch layer beside ours, where PyTorch and transformers import (the GPU image has both).
$PY -c 'import torch, transformers' 2>/dev/null && LAYER+=(--hf)
PARTS=("$@")
[ ${#PARTS[@]} -gt 0 ] || PARTS=(train step layer tests)
for name in "${PARTS[@]}"; do
  case $name in
    train) rm -rf /tmp/switchmoe_device_run
           part train 100 $PY -m switchmoe.main --workdir=/tmp/switchmoe_device_run "${TRAIN[@]}"
           cp /tmp/switchmoe_device_run/metrics.jsonl "$OUT/train_metrics.jsonl" 2>/dev/null ;;
    step) part step 210 $PY scripts/benchmark.py --suite=step "${STEP[@]}" \
            --json="$OUT/step.jsonl" ;;
    # --hf puts PyTorch beside JAX on the GPU: JAX takes 60% of it, not 95%.
    layer) XLA_PYTHON_CLIENT_MEM_FRACTION=.6 part layer 120 $PY scripts/benchmark.py \
             --suite=layer "${LAYER[@]}" --json="$OUT/layer.jsonl" ;;
    # tests/conftest.py defaults JAX to the CPU; tests that need 8 simulated devices skip here.
    # One process (no xdist workers): they would share one GPU. -v names each test as it ends,
    # so a part cut short by its limit still says how far it got. Full-precision float32
    # matmuls: the tests' tolerances against float64 references are for float32, and a GPU's
    # default for float32 matmuls is TF32.
    tests) JAX_PLATFORMS=${TEST_PLATFORM:-cuda} JAX_DEFAULT_MATMUL_PRECISION=highest \
           part tests 90 $PY -m pytest -v \
             -o addopts= -m 'not slow' -p no:xdist -p no:cacheprovider "${TESTS[@]}" ;;
    *) echo "device_check.sh: unknown part '$name' (train, step, layer, tests)" >&2; exit 2 ;;
  esac
done
# What a call's reply shows (its last 12,000 characters): each part's table or last lines.
for name in "${PARTS[@]}"; do
  [ -f "$LOGS/$name.log" ] || continue
  echo "=== $name"
  case $name in
    step|layer) grep -A 40 -E '^(layer|step) suite on' "$LOGS/$name.log" | tail -n 40 ;;
    *) tail -n 4 "$LOGS/$name.log" ;;
  esac
done
rm -rf "$LOGS"
cat "$SUMMARY"

#!/usr/bin/env bash
# Wheels for what a lent GPU machine's image lacks (it reaches no package index), into .whl/
# (git-ignored), for Python 3.12 on x86-64. Carry .whl with the call that runs
# scripts/device_check.sh (docs/performance.md). The image already holds jax, flax, optax,
# orbax-checkpoint, numpy, scipy, safetensors, sentencepiece, absl-py, etils, protobuf, pytest
# and hypothesis; the list below is the rest of setup.cfg's install_requires with its own
# dependencies, each pinned to the range setup.cfg allows.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir .whl
BINARY=(
  'ml_collections>=1.0,<2' 'tensorflow-datasets>=4.9.9,<5' 'grain>=0.2.12,<0.3'
  'array_record>=0.8,<0.9' 'tensorboardX>=2.6,<3' dm-tree immutabledict simple_parsing
  docstring-parser tensorflow-metadata googleapis-common-protos termcolor toml portpicker
)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux_2_28_x86_64 --dest .whl "${BINARY[@]}"
# promise (a tensorflow-datasets dependency) is published only as a source archive; its
# wheel is pure Python.
python3 -m pip wheel -q --no-deps --wheel-dir .whl 'promise>=2.3'
ls .whl
du -sh .whl

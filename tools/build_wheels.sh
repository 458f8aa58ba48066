#!/usr/bin/env bash
# Build .wheels/ (or DIR) on a machine with network access: the packages a bare GPU machine with
# Python 3.12 and torch (CUDA) lacks to run bigllm, for tools/gpu_check.sh to install offline.
#
#   tools/build_wheels.sh [DIR]        # then copy the checkout (with DIR) to the GPU machine
#
# DeepSpeed is an sdist upstream; its wheel is pure Python when built without compiled ops.
# The versions are the ones the README says were tested.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
DIR=${1:-$ROOT/.wheels}
PY=${PYTHON:-python3}
mkdir -p "$DIR"
"$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 --platform any -d "$DIR" \
    megatron-core==0.19.2 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection \
    typing-extensions hjson psutil py-cpuinfo datasets==5.2.0 dill multiprocess
DS_BUILD_OPS=0 "$PY" -m pip wheel --quiet --no-deps --no-build-isolation deepspeed==0.19.8 -w "$DIR"
ls -1 "$DIR"/*.whl

#!/usr/bin/env bash
# One-shot GPU check of bigllm on a bare GPU machine (Python 3.12 + torch with CUDA, no network):
#
#   tools/gpu_check.sh [--wheels DIR]... [--site DIR] [--reinstall] [--out DIR] [--steps 10] [--quick]
#                      [--allow-cpu] [--peak-tflops T] [--mfu-target F] [--skip CHECK]
#
# Before anything runs, checks that every package the check imports (torch >= 2.6, deepspeed, megatron-core,
# pydantic, hjson, msgpack, psutil, einops, pyyaml, sentencepiece, ...) either imports at a version
# pyproject.toml allows or has a wheel in a --wheels folder (default .wheels/ of this checkout; repeatable,
# e.g. WHEELS/common and one WHEELS/megatron-core-*); if not, one line names what is missing and the fix
# (exit 2). The wheels go into --site (default .wheels/site), once: the next run with the same wheels reuses
# it. Then tools/gpu_check.py prints a table (its docstring lists the rows and what fails them); the exit
# code is the number of failed rows. About 7 minutes on one H100 (estimates in gpu_check.py).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WHEEL_DIRS=()
SITE=$ROOT/.wheels/site
REINSTALL=()
ARGS=()
while [ $# -gt 0 ]; do
    case $1 in
        --wheels|--site)
            [ $# -ge 2 ] || { echo "gpu_check: error: $1 needs a directory" >&2; exit 2; }
            if [ "$1" = --wheels ]; then WHEEL_DIRS+=("$2"); else SITE=$2; fi
            shift 2 ;;
        --wheels=*) WHEEL_DIRS+=("${1#--wheels=}"); shift ;;
        --site=*) SITE=${1#--site=}; shift ;;
        --reinstall) REINSTALL=(--reinstall); shift ;;  # install the wheels even where the packages import already
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exec "$PY" "$ROOT/tools/gpu_check.py" --help ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
[ ${#WHEEL_DIRS[@]} -gt 0 ] || WHEEL_DIRS=("$ROOT/.wheels")

# The wheels to install, one path a line (none when every package imports already), or exit 2 with the reason.
wanted=$("$PY" "$ROOT/tools/gpu_check.py" --check-packages ${REINSTALL[@]+"${REINSTALL[@]}"} "${WHEEL_DIRS[@]}")
if [ -n "$wanted" ]; then
    mapfile -t wheels <<< "$wanted"
    stamp=$SITE/.installed
    if [ ${#REINSTALL[@]} -gt 0 ] || [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$wanted" ]; then
        echo "gpu_check: installing ${#wheels[@]} wheels into $SITE"
        mkdir -p "$(dirname "$SITE")"
        rm -rf "$SITE.tmp"
        "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE.tmp" "${wheels[@]}"
        rm -rf "$SITE" && mv "$SITE.tmp" "$SITE"
        printf '%s\n' "$wanted" > "$stamp"
    else
        echo "gpu_check: the ${#wheels[@]} wheels are in $SITE already (--reinstall installs them again)"
    fi
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
cd "$ROOT"
exec "$PY" "$ROOT/tools/gpu_check.py" ${ARGS[@]+"${ARGS[@]}"}

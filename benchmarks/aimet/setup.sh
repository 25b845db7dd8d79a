#!/usr/bin/env bash
# Make the AIMET benchmark environment: a venv at .venv-aimet/ in the repository root with
# torch 2.14.1, torchvision 0.29.1 and aimet-torch (benchmarks/aimet/requirements.txt), plus
# autodac itself (editable, no deps) so that benchmarks/bm_aimet.py can load the reference nets
# and count FLOPs with fvcore exactly as autodac does. Kept out of autodac's own dependencies.
#
#   bash benchmarks/aimet/setup.sh && .venv-aimet/bin/python benchmarks/bm_aimet.py
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="${PYTHON:-python3}"
VENV="$ROOT/.venv-aimet"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --upgrade pip
"$VENV/bin/python" -m pip install -r "$ROOT/benchmarks/aimet/requirements.txt"
"$VENV/bin/python" -m pip install --no-deps -e "$ROOT"
"$VENV/bin/python" - <<'PY'
import torch, torchvision, aimet_torch
from aimet_torch.compress import ModelCompressor  # the compression API bm_aimet.py uses
print("torch", torch.__version__, "torchvision", torchvision.__version__, "aimet_torch", aimet_torch.__version__,
      "CUDA available:", torch.cuda.is_available())
PY

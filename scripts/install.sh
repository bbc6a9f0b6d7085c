#!/usr/bin/env bash
# Install molora (editable) with the given extras, e.g. `bash scripts/install.sh test,demo`.
# Installs the CPU build torch==2.13.0 first when no torch is present, so that pip does not
# pull a multi-GB CUDA build to satisfy the `torch` requirement; an existing torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python -m pip --version >/dev/null
if ! python -c "import torch" >/dev/null 2>&1; then
    python -m pip install -q "torch==2.13.0"
fi
if [ -n "$extras" ]; then
    python -m pip install -q -e ".[${extras}]"
else
    python -m pip install -q -e .
fi

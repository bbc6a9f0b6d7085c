#!/usr/bin/env bash
# The GPU check in one command, offline (one H100/H200, under 6 minutes): `molora bench gpu`,
# whose steps are (1) the core CPU tests under this machine's torch (the torch floor), (2) the
# CUDA tests (`-m gpu`: every path vs eager, Triton vs eager at 4096^2/T=4096 bf16, a bf16 Llama
# training run whose loss falls, QLoRA when bitsandbytes is there), (3) the layer and (4) the
# training benchmarks in bf16 (peak memory against PEFT LoRA). Writes benchmarks/RESULTS-gpu.md
# (copied to $OUT when set). Extra arguments go to `molora bench gpu`.
#
# Never waits on a package index: pip is not called unless GPU_CHECK_WHEELS names a folder of
# wheels, and then only as `pip install --no-index --find-links "$GPU_CHECK_WHEELS"` for the
# modules that are missing. Without CUDA it says so and exits 0 at once (nothing measured).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PIP_NO_INDEX=1
if ! python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device here (or no torch); nothing measured."
    exit 0
fi
wheels="${GPU_CHECK_WHEELS:-}"
for dep in einops:einops yaml:pyyaml accelerate:accelerate safetensors:safetensors tqdm:tqdm transformers:transformers \
    peft:peft triton:triton pytest:pytest; do
    module="${dep%%:*}" package="${dep#*:}"
    python -c "import $module" >/dev/null 2>&1 && continue
    if [ -n "$wheels" ]; then
        echo "gpu_check: installing $package from $wheels (no index)"
        timeout 120 python -m pip install -q --no-index --find-links "$wheels" "$package" \
            || echo "gpu_check: $package is not in $wheels: the steps that need it report it"
    else
        echo "gpu_check: $module is missing (set GPU_CHECK_WHEELS=<folder of wheels> to install it offline)"
    fi
done
for optional in bitsandbytes mixlora; do  # used when present (QLoRA test, MixLoRA row); never required
    python -c "import $optional" >/dev/null 2>&1 && continue
    if [ -n "$wheels" ] && ls "$wheels" | grep -qi "^$optional"; then
        timeout 120 python -m pip install -q --no-index --no-deps --find-links "$wheels" "$optional" || true
    fi
done
exec python -m molora.apps.cli bench gpu "$@"

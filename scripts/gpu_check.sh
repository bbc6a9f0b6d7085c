#!/usr/bin/env bash
# The GPU check in one command (one H100/H200, under 8 minutes): installs what the machine lacks,
# then `molora bench gpu` runs `pytest -m gpu`, the layer and training benchmarks in bf16, and
# writes benchmarks/RESULTS-gpu.md (copied to $OUT when set). Extra arguments go to `molora bench gpu`.
# Without CUDA it says so and exits 0 (nothing measured). Missing packages are installed when a
# package index is reachable and skipped otherwise (the step that needs them reports it).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" TOKENIZERS_PARALLELISM=false
install_if_missing() {  # module, pip spec...  (GPU_CHECK_NO_INSTALL=1: never install)
    local module="$1"; shift
    [ "${GPU_CHECK_NO_INSTALL:-0}" = 1 ] && return 0
    python -c "import $module" >/dev/null 2>&1 && return 0
    echo "gpu_check: installing $*"
    timeout 90 python -m pip install -q "$@" || echo "gpu_check: could not install $* (no network?): skipping"
}
install_if_missing datasets datasets
for dep in einops:einops yaml:pyyaml accelerate:accelerate safetensors:safetensors tqdm:tqdm; do
    install_if_missing "${dep%%:*}" "${dep#*:}"
done
install_if_missing peft peft
install_if_missing triton triton
install_if_missing pytest pytest
install_if_missing mixlora --no-deps mixlora==0.2.3
exec python -m molora.apps.cli bench gpu "$@"

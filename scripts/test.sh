#!/usr/bin/env bash
# Install everything (runtime, model, test tools) and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh test
exec .venv/bin/python -m pytest -q "$@"

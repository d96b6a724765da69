#!/usr/bin/env bash
# Install (if needed) and run the splitserve CLI: scripts/run.sh generate --chat --prompt "..."
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/install.sh
exec .venv/bin/splitserve "$@"

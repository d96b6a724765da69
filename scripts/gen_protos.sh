#!/usr/bin/env bash
# Regenerate the checked-in protobuf / gRPC Python code from the .proto files.
# Needs grpcio-tools (a test/dev dependency): scripts/install.sh test
set -euo pipefail
cd "$(dirname "$0")/.."
for proto in splitserve/kvtransfer/kvtransfer.proto splitserve/platform/grpc_service.proto; do
    [ -f "$proto" ] || continue
    .venv/bin/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. "$proto"
done
echo "regenerated"

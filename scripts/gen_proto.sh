#!/bin/sh
# Regenerates the Python code of protos/ into sidecar/proto/.
# The generated gRPC module imports its sibling by the proto path; rewrite
# that import so the package works where it is installed.
set -eu
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
PATH="$(dirname "$PY"):$PATH"; export PATH
out=sidecar/proto
"$PY" -m grpc_tools.protoc -Iprotos --python_out="$out" --grpc_python_out="$out" \
  --mypy_out="$out" protos/captions/v1/captions.proto
sed -i 's/^from captions\.v1 import/from sidecar.proto.captions.v1 import/' \
  "$out/captions/v1/captions_pb2_grpc.py"
for d in "$out" "$out/captions" "$out/captions/v1"; do
  [ -f "$d/__init__.py" ] || : > "$d/__init__.py"
done

#!/bin/sh
# Regenerate the *_pb2.py / *_pb2.pyi modules from the vendored CRIU .proto files (see README.md).
# Usage: PYTHON=/path/to/venv-with-grpcio-tools/bin/python sh generate.sh
set -eu
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
INCLUDE=$("$PYTHON" -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))')
rm -f ./*_pb2.py ./*_pb2.pyi
"$PYTHON" -m grpc_tools.protoc -I. -I"$INCLUDE" --python_out=. --pyi_out=. ./*.proto
# protoc writes `import core_x86_pb2 as ...` (top-level modules); inside this package they are siblings.
sed -i -E 's/^import ([a-z0-9_]+_pb2) as /from . import \1 as /' ./*_pb2.py
sed -i -E 's/^import ([a-z0-9_]+_pb2) as /from . import \1 as /' ./*_pb2.pyi

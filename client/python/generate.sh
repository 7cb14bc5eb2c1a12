#!/usr/bin/env bash
# Generate the gradserve Python package's protobuf/gRPC stubs (gradserve.v1,
# gradserve.optimizer.v1) and its copy of client/service_config.json, for use without installing:
#
#   client/python/generate.sh            in place: then PYTHONPATH=client/python imports gradserve
#   client/python/generate.sh OUT_DIR    a complete copy of the package in OUT_DIR/gradserve:
#                                        then PYTHONPATH=OUT_DIR imports it
#
# `pip install ./client/python` does the same at build time; both go through
# build_backend/gradserve_build.py, which runs protoc with Debian's grpc_python_plugin.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# Standard library only (tomllib: Python 3.11, Debian 12's python3).
exec /usr/bin/python3 "${here}/build_backend/gradserve_build.py" generate "$@"

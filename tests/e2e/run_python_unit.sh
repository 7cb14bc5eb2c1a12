#!/usr/bin/env bash
# The Python client helpers' unit tests (client/python/test_*.py: no torch, no server), on stubs
# generated from the .proto into a scratch directory so the source tree stays clean.
#
#   tests/e2e/run_python_unit.sh
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
client="${here}/../../client/python"
# The Python packages (grpcio, protobuf, numpy) are installed for the system interpreter only.
python="${GRADSERVE_PYTHON:-/usr/bin/python3}"
stubs="$(mktemp -d)"
trap 'rm -rf "${stubs}"' EXIT

"${client}/generate.sh" "${stubs}" >/dev/null
PYTHONPATH="${stubs}:${client}" "${python}" -m unittest discover -v -s "${client}" -p 'test_*.py'

#!/usr/bin/env bash
# End-to-end: the committed ONNX test models sent as-is by a client generated from the .proto
# against the real gradserve binary. The checks themselves are in python_onnx.py.
#
#   tests/e2e/python_onnx.sh SERVER_BINARY SOURCE_DIR
#
# Passes only if every check passes AND the server exits 0 on SIGTERM.
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 SERVER_BINARY SOURCE_DIR" >&2
  exit 2
fi
server_bin="$1"
source_dir="$(cd "$2" && pwd)"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tests/e2e/server_lib.sh
source "${here}/server_lib.sh"
# The Python packages (grpcio, protobuf, numpy) are installed for the system interpreter only.
python="${GRADSERVE_PYTHON:-/usr/bin/python3}"
work="$(mktemp -d -t gradserve-onnx-XXXXXX)"
trap '_server_cleanup; rm -rf "${work}"' EXIT

# Fresh stubs from the current .proto (see python_tls_token.sh).
"${source_dir}/client/python/generate.sh" "${work}/stubs" >/dev/null
start_server "${server_bin}" --threads 2

check_rc=0
"${python}" "${here}/python_onnx.py" --target "127.0.0.1:${port}" --stubs "${work}/stubs" \
  --data "${source_dir}/tests/data/onnx" || check_rc=$?
server_rc=0
stop_server || server_rc=$?
echo "python onnx checks: exit ${check_rc}; server after SIGTERM: exit ${server_rc}"
[[ ${check_rc} -eq 0 && ${server_rc} -eq 0 ]]

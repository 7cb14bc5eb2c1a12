#!/usr/bin/env bash
# End-to-end: one Python check script against the real gradserve binary, with stubs freshly
# generated from the current .proto. Used by e2e_python_stream (python_stream.py: StreamGradients
# through client/python's TrainingStream), e2e_python_onnx (python_onnx.py: the committed
# ONNX test models sent as-is by a client generated from the .proto) and python_examples
# (python_examples.py: the README's example scripts at a small size).
#
#   tests/e2e/python_checks.sh SERVER_BINARY SOURCE_DIR CHECK_SCRIPT [ARG...]
#
# The script gets --target HOST:PORT --stubs DIR and then ARGs. Passes only if every check
# passes AND the server exits 0 on SIGTERM.
set -euo pipefail

if [[ $# -lt 3 ]]; then
  echo "usage: $0 SERVER_BINARY SOURCE_DIR CHECK_SCRIPT [ARG...]" >&2
  exit 2
fi
server_bin="$1"
source_dir="$(cd "$2" && pwd)"
check_script="$3"
shift 3
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tests/e2e/server_lib.sh
source "${here}/server_lib.sh"
# The Python packages (grpcio, protobuf, numpy) are installed for the system interpreter only.
python="${GRADSERVE_PYTHON:-/usr/bin/python3}"
work="$(mktemp -d -t gradserve-python-XXXXXX)"
trap '_server_cleanup; rm -rf "${work}"' EXIT

# Fresh stubs from the current .proto (see python_tls_token.sh).
"${source_dir}/client/python/generate.sh" "${work}/stubs" >/dev/null
start_server "${server_bin}" --threads 2

check_rc=0
"${python}" "${check_script}" --target "127.0.0.1:${port}" --stubs "${work}/stubs" "$@" ||
  check_rc=$?
server_rc=0
stop_server || server_rc=$?
echo "$(basename "${check_script}"): exit ${check_rc}; server after SIGTERM: exit ${server_rc}"
[[ ${check_rc} -eq 0 && ${server_rc} -eq 0 ]]

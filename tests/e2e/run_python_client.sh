#!/usr/bin/env bash
# End-to-end: start gradserve, run the generated-Python-client check and client/python/example.py
# against it, stop it.
#
#   tests/e2e/run_python_client.sh SERVER_BINARY PROTO_FILE
#
# Passes only if the check passes AND the server exits 0 on SIGTERM (a clean drain).
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 SERVER_BINARY PROTO_FILE" >&2
  exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "${here}/server_lib.sh"
# The Python packages (grpcio, protobuf, numpy) are installed for the system interpreter only.
python="${GRADSERVE_PYTHON:-/usr/bin/python3}"

client="${here}/../../client/python"
stubs="$(mktemp -d)"
trap '_server_cleanup; rm -rf "${stubs}"' EXIT
"${client}/generate.sh" "${stubs}" >/dev/null

start_server "$1" --threads 2
check_rc=0
"${python}" "${here}/python_generated_client.py" --proto "$2" --target "127.0.0.1:${port}" ||
  check_rc=$?
# The README's example (a chain call, then a hand-written graph model), on the package copy
# generate.sh made (-P: nothing from the current directory).
PYTHONPATH="${stubs}" "${python}" -P "${client}/examples/example.py" --target "127.0.0.1:${port}" ||
  check_rc=$?
server_rc=0
stop_server || server_rc=$?
echo "python check: exit ${check_rc}; server after SIGTERM: exit ${server_rc}"
[[ ${check_rc} -eq 0 && ${server_rc} -eq 0 ]]

#!/usr/bin/env bash
# End-to-end: SIGTERM to the real gradserve binary while long calls are in flight. Health must
# turn NOT_SERVING for the drain delay, new calls must then be refused, every call in flight
# must still end OK with the right result, and the server must exit 0. The calls and checks are
# in sigterm_in_flight.py, which also sends the SIGTERM: only it knows when the calls are in
# flight.
#
#   tests/e2e/sigterm_in_flight.sh SERVER_BINARY SOURCE_DIR
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
stubs="$(mktemp -d -t gradserve-sigterm-XXXXXX)"
trap '_server_cleanup; rm -rf "${stubs}"' EXIT

# Stubs generated from the current .proto, never stale ones left in client/python.
"${source_dir}/client/python/generate.sh" "${stubs}" >/dev/null

# One core, so the calls queue behind each other and the last ends seconds after SIGTERM. The
# drain delay leaves ample time for the checks made during it, even under load; the grace is an
# upper bound only (the server exits as soon as its calls are done), so it is generous: calls
# cut off by it would fail the test.
drain=2
grace=40
start_server "${server_bin}" --threads 1 --drain-delay "${drain}" --shutdown-grace "${grace}"

check_rc=0
"${python}" "${here}/sigterm_in_flight.py" --target "127.0.0.1:${port}" \
  --server-pid "${server_pid}" --drain-delay "${drain}" --shutdown-grace "${grace}" \
  --stubs "${stubs}" --client-dir "${source_dir}/client/python" || check_rc=$?
if [[ ${check_rc} -ne 0 ]]; then
  echo "sigterm_in_flight.py failed (exit ${check_rc}); the server's log:" >&2
  cat "${server_log}" >&2
  exit 1  # The EXIT trap kills the server if it is still running.
fi

# The SIGTERM was sent by the script above: only wait for the exit. A server that never exits
# fails through the test's CTest TIMEOUT.
server_rc=0
wait "${server_pid}" || server_rc=$?
server_pid=""
echo "server after SIGTERM: exit ${server_rc}"
if [[ ${server_rc} -ne 0 ]] || ! grep -q 'received SIGTERM' "${server_log}" ||
  ! grep -q '\] stopped$' "${server_log}"; then
  echo "expected exit 0 after 'received SIGTERM' ... 'stopped'; the server's log:" >&2
  cat "${server_log}" >&2
  exit 1
fi

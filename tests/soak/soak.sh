#!/usr/bin/env bash
# Soak: the real gradserve under many concurrent clients with a mix of valid, invalid,
# over-limit, cancelled and deadline-exceeded calls, unary and StreamGradients, for a bounded
# time (loopback only; it ends by itself). See soak_driver.py for the mix and the pass rules.
#
#   tests/soak/soak.sh [--server BIN] [--duration S] [--warmup S] [--clients N]
#                      [--threads N] [--max-rss-growth PCT] [--json FILE]
#
#   --server BIN          default build/release/server/gradserve (build the release preset)
#   --duration S          seconds of load (default 180); --warmup S: RSS baseline time (30)
#   --clients N           concurrent client threads (default 12)
#   --threads N           the server's --threads (default: its own default, all cores)
#   --max-rss-growth PCT  limit on VmRSS growth after warm-up (default 10; -1: not checked,
#                         for sanitizer builds, whose allocator quarantine grows by design)
#
# Exit 0 only if the driver passes and the server then exits 0 on SIGTERM.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source_dir="$(cd "${here}/../.." && pwd)"
server="${source_dir}/build/release/server/gradserve"
duration=180
warmup=30
clients=12
threads=()
growth=10
json=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --server) server="$2"; shift 2 ;;
    --duration) duration="$2"; shift 2 ;;
    --warmup) warmup="$2"; shift 2 ;;
    --clients) clients="$2"; shift 2 ;;
    --threads) threads=(--threads "$2"); shift 2 ;;
    --max-rss-growth) growth="$2"; shift 2 ;;
    --json) json=(--json "$2"); shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "soak.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
if [[ ! -x "${server}" ]]; then
  echo "soak.sh: no server binary at ${server} (build the release preset first)" >&2
  exit 2
fi

# shellcheck source=tests/e2e/server_lib.sh
source "${source_dir}/tests/e2e/server_lib.sh"
max_batch=4096
max_message_bytes=$((8 << 20))
# Room for every client's call in the queue and every client's stream: RESOURCE_EXHAUSTED
# then only ever comes from the limits the mix exceeds on purpose. The simulated clients all
# share 127.0.0.1, one address to the server, so its per-client shares are lifted too.
start_server "${server}" "${threads[@]}" --max-batch "${max_batch}" \
  --max-message-bytes "${max_message_bytes}" --max-queue $((clients * 2)) \
  --max-streams $((clients * 2)) --shutdown-grace 10 \
  --max-streams-per-client $((clients * 2)) --max-queue-per-client $((clients * 2))

driver_rc=0
/usr/bin/python3 "${here}/soak_driver.py" --target "127.0.0.1:${port}" --server-pid "${server_pid}" \
  --proto "${source_dir}/proto/gradserve/v1/gradserve.proto" --duration "${duration}" \
  --warmup "${warmup}" --clients "${clients}" --max-batch "${max_batch}" \
  --max-message-bytes "${max_message_bytes}" --max-rss-growth "${growth}" "${json[@]}" ||
  driver_rc=$?
server_rc=0
stop_server || server_rc=$?
echo "soak driver: exit ${driver_rc}; server after SIGTERM: exit ${server_rc}"
if [[ ${driver_rc} -ne 0 ]]; then
  echo "---- server log (last 40 lines)"
  tail -n 40 "${server_log}" || true
fi
[[ ${driver_rc} -eq 0 && ${server_rc} -eq 0 ]]

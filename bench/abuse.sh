#!/usr/bin/env bash
# The security issue's attacks against a live gradserve, with an innocent client running
# throughout; writes a Markdown table with pass/fail per attack (driver: bench/abuse.py).
#
#   bench/abuse.sh [--quick] [--attack-seconds S] [--rss-budget-mib M] [--only a,b,...]
#                  [--server BIN] [--out DIR] [--name NAME] [-- SERVER_FLAGS...]
#   bench/abuse.sh --rolling [N] [--server BIN] [--out DIR] [-- SERVER_FLAGS...]
#
#   --server BIN        gradserve binary [build/release/server/gradserve]
#   --quick             4 s attacks, 2 s idle baseline (~2.5 min in all); default 10 s / 5 s
#   --attack-seconds S  how long each attack runs
#   --rss-budget-mib M  peak RSS target [3072: the Kubernetes manifest's memory limit]
#   --only LIST         rows to run: planner, heavy-check, unauth-flood, slow-reader,
#                       idle-streams, metrics-trickle (both rows) or metrics-trickle-2/-16,
#                       queue-hog, sigterm
#   --out DIR           results folder [bench/results]; --name NAME: file stem [abuse]
#   --rolling [N]       instead: N rolling restarts (default 50) of 3 replicas under a
#                       round_robin + retry client (client/service_config.json); writes
#                       NAME.md/.json with NAME [abuse-rolling]
#   -- SERVER_FLAGS     passed to every gradserve started, e.g. -- --max-call-seconds 30
#                       (--shutdown-grace 5 unless given; keep --log-level at info or below)
#
# Each row starts a fresh server on a free loopback port; everything goes to 127.0.0.1 and
# every loop stops by itself. Exit 0 only if every row passes (today several do not: that is
# what the table is for). Needs python3-grpcio, python3-numpy and python3-h2
# (deploy/install-deps.sh --bench).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python=/usr/bin/python3
server="${repo}/build/release/server/gradserve"
out="${repo}/bench/results"
mode=run
driver_args=()
server_flags=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --server) server="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --quick) driver_args+=(--quick); shift ;;
    --attack-seconds|--rss-budget-mib|--only|--name) driver_args+=("$1" "$2"); shift 2 ;;
    --rolling)
      mode=rolling
      if [[ $# -gt 1 && "$2" =~ ^[0-9]+$ ]]; then driver_args+=(--restarts "$2"); shift; fi
      shift ;;
    --) shift; server_flags=("$@"); break ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "abuse.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

die() { echo "abuse.sh: $*" >&2; exit 2; }
[[ -x "${server}" ]] || die "no server binary at ${server}: build first (cmake --preset release \
&& cmake --build --preset release --target gradserve), or give --server BIN"
[[ -x "${python}" ]] || die "${python} not found"
"${python}" -c 'import grpc, numpy' 2>/dev/null ||
  die "python3-grpcio and python3-numpy are needed (deploy/install-deps.sh)"
if [[ "${mode}" == run ]]; then
  "${python}" -c 'import h2' 2>/dev/null ||
    die "python3-h2 is needed for the slow-reader attack (deploy/install-deps.sh --bench)"
fi

work="$(mktemp -d -t gradserve-abuse-XXXXXX)"
pidfile="${work}/server.pids"
: >"${pidfile}"
driver_pid=""
cleanup() {
  # The driver kills its servers and children itself; this catches what a killed driver left.
  if [[ -n "${driver_pid}" ]] && kill -0 "${driver_pid}" 2>/dev/null; then
    kill -TERM "${driver_pid}" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "${driver_pid}" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "${driver_pid}" 2>/dev/null || true
  fi
  local pid
  while read -r pid; do
    # Only a pid that is still one of our gradserve processes (pids get reused).
    if [[ -n "${pid}" && "$(readlink "/proc/${pid}/exe" 2>/dev/null)" == "$(readlink -f "${server}")" ]]; then
      kill -KILL "${pid}" 2>/dev/null || true
    fi
  done <"${pidfile}"
  rm -rf "${work}"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The Python stubs, generated into the scratch folder (client/python stays untouched).
"${repo}/client/python/generate.sh" "${work}/stubs" >/dev/null

mkdir -p "${out}"
rc=0
PYTHONPATH="${work}/stubs${PYTHONPATH:+:${PYTHONPATH}}" "${python}" "${repo}/bench/abuse.py" \
  "${mode}" --server "${server}" --out "${out}" --pidfile "${pidfile}" "${driver_args[@]}" \
  -- "${server_flags[@]}" &
driver_pid=$!
wait "${driver_pid}" || rc=$?
driver_pid=""
exit "${rc}"

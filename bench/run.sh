#!/usr/bin/env bash
# The engine against its peers, the machine's peak and the transport floor, in one run.
#
#   bench/run.sh            full run (~6-8 min on 2 cores): 5 interleaved rounds + perf
#   bench/run.sh --quick    smoke run (~2 min): 1 round, shorter timings
#   bench/run.sh --rounds N
#
# Needs a build with the benchmarks (GRADSERVE_BUILD_BENCH, on by default: `cmake --build
# --preset release`) and the peers (`deploy/install-deps.sh --bench`: PyTorch, matplotlib,
# threadpoolctl, OpenBLAS). Writes bench/results/bench.md (tables, targets met or missed),
# bench/results/bench.png (chart) and bench/results/bench.json (every round's raw figures).
# See bench/README.md for what is measured and how to read it.
#
# Each round runs, in an order that rotates from round to round so no side always goes first:
#   engine   build/.../bench/gradserve_engine_bench: cases a-e at 1 and 2 threads, FMA peak,
#            1024^3 GEMM through the engine and on Eigen's own kernel (Google Benchmark, JSON)
#   peers    /usr/bin/python3 bench/peers.py at 1 and 2 threads: PyTorch, numpy backprop,
#            torch checkpointing, OpenBLAS sgemm; once with OPENBLAS_CORETYPE/OPENBLAS_L2_SIZE
#            as the machine sets them and, if it sets either, once with both unset for that
#            command only (env -u)
#   service  bench/.../gradserve_service_bench: ComputeGradients p50 through a gradserve on a
#            free loopback port vs a bare gRPC echo of the same bytes (gradserve_echo_server)
#   profile  the same binary timing the parts of each step alone (GEMMs, element-wise passes,
#            loss, diagnostics)
# Figures drift by ~20% over minutes on shared machines, so comparisons are made within a round
# and the report quotes medians over rounds. After the rounds, where `perf` works,
# `perf record -e cpu-clock` samples each case's step at 1 thread.
#
# Environment: BUILD_DIR [build/release], GRADSERVE [BUILD_DIR/server/gradserve],
#   OUT_DIR [bench/results], PYTHON [/usr/bin/python3], KEEP_WORK=1 keeps the raw folder.
# shellcheck source-path=SCRIPTDIR/..
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build_dir="${BUILD_DIR:-${repo}/build/release}"
engine_bin="${build_dir}/bench/gradserve_engine_bench"
echo_bin="${build_dir}/bench/gradserve_echo_server"
service_bin="${build_dir}/bench/gradserve_service_bench"
server_bin="${GRADSERVE:-${build_dir}/server/gradserve}"
out_dir="${OUT_DIR:-${repo}/bench/results}"
python="${PYTHON:-/usr/bin/python3}"

quick=0
rounds=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --quick) quick=1 ;;
    --rounds) rounds="$2"; shift ;;
    -h|--help) sed -n '2,/^# shellcheck/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "run.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
if ((quick)); then
  rounds="${rounds:-1}"
  engine_min_time=0.1 peer_min_time=0.2 profile_min_time=0.05 perf_min_time=0.5
  service_calls="a=300,b=12"
else
  rounds="${rounds:-5}"
  engine_min_time=0.5 peer_min_time=0.6 profile_min_time=0.1 perf_min_time=2
  service_calls="a=1500,b=40"
fi

for bin in "${engine_bin}" "${echo_bin}" "${service_bin}" "${server_bin}"; do
  [[ -x "${bin}" ]] || { echo "run.sh: ${bin} not found; build first (see --help)" >&2; exit 2; }
done
"${python}" -c 'import torch, numpy, matplotlib, threadpoolctl' 2>/dev/null || {
  echo "run.sh: ${python} lacks torch, numpy, matplotlib or threadpoolctl:" \
    "deploy/install-deps.sh --bench" >&2
  exit 2
}

work="$(mktemp -d -t gradserve-bench-XXXXXX)"
echo_log="${work}/echo.log"
echo_pid=""
# shellcheck source=tests/e2e/server_lib.sh
source "${repo}/tests/e2e/server_lib.sh"  # start_server, stop_server; kills the server on exit.
cleanup() {
  if [[ -n "${echo_pid}" ]] && kill -0 "${echo_pid}" 2>/dev/null; then
    kill -TERM "${echo_pid}" 2>/dev/null || true
    wait "${echo_pid}" 2>/dev/null || true
  fi
  _server_cleanup
  if [[ "${KEEP_WORK:-0}" == 1 ]]; then
    echo "raw results kept in ${work}" >&2
  else
    rm -rf "${work}"
  fi
}
trap cleanup EXIT

# OPENBLAS_CORETYPE / OPENBLAS_L2_SIZE: as set, and unset for the peers' command only.
variants=(set)
if [[ -n "${OPENBLAS_CORETYPE+x}" || -n "${OPENBLAS_L2_SIZE+x}" ]]; then variants+=(unset); fi

load1() { cut -d' ' -f1 /proc/loadavg; }
echo "== load average before the run: $(load1) (figures are noisy while other work runs)" >&2

cd "${repo}"
start_server "${server_bin}" >&2
"${echo_bin}" --listen 127.0.0.1:0 >"${echo_log}" 2>&1 &
echo_pid=$!
echo_port=""
for _ in $(seq 1 100); do
  echo_port="$(sed -n 's/.*(port \([0-9][0-9]*\)).*/\1/p' "${echo_log}" | head -n 1)"
  [[ -n "${echo_port}" ]] && break
  kill -0 "${echo_pid}" 2>/dev/null || { cat "${echo_log}" >&2; exit 1; }
  sleep 0.1
done
[[ -n "${echo_port}" ]] || { echo "run.sh: echo server did not start" >&2; exit 1; }

run_engine() {
  echo "== round $1: engine" >&2
  "${engine_bin}" --benchmark_filter='^(engine|peak|gemm)/' \
    --benchmark_min_time="${engine_min_time}" \
    --benchmark_out="${work}/round$1/engine.json" --benchmark_out_format=json >&2
}
run_peers() {
  local variant threads
  for variant in "${variants[@]}"; do
    for threads in 1 2; do
      echo "== round $1: peers, ${threads} thread(s), OPENBLAS_CORETYPE ${variant}" >&2
      local cmd=("${python}" "${repo}/bench/peers.py" --threads "${threads}"
                 --min-time "${peer_min_time}"
                 --json "${work}/round$1/peers-${variant}-${threads}.json")
      if [[ "$1" == 1 ]]; then cmd+=(--check); fi
      if [[ "${variant}" == unset ]]; then
        env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "${cmd[@]}"
      else
        "${cmd[@]}"
      fi
    done
  done
}
run_profile() {
  echo "== round $1: profile" >&2
  "${engine_bin}" --benchmark_filter='^profile/' --benchmark_min_time="${profile_min_time}" \
    --benchmark_out="${work}/round$1/profile.json" --benchmark_out_format=json >&2
}
run_service() {
  echo "== round $1: service" >&2
  "${service_bin}" --gradserve "127.0.0.1:${port}" --echo "127.0.0.1:${echo_port}" \
    --calls "${service_calls}" --json "${work}/round$1/service.json"
}

# CPU ticks: the whole machine's busy time, and ours (this shell's finished children plus the
# two servers), so each round can report what other processes took.
machine_busy_ticks() {
  local _cpu user nice system _idle _iowait irq softirq steal _rest
  read -r _cpu user nice system _idle _iowait irq softirq steal _rest </proc/stat
  echo $((user + nice + system + irq + softirq + steal))
}
our_ticks() {
  local self server echo_srv
  read -r -a self <"/proc/$$/stat"
  read -r -a server <"/proc/${server_pid}/stat"
  read -r -a echo_srv <"/proc/${echo_pid}/stat"
  # Fields 14-17 (1-based): utime, stime, cutime, cstime. The comm field has no spaces here.
  echo $((self[15] + self[16] + server[13] + server[14] + echo_srv[13] + echo_srv[14]))
}

ticks_per_second="$(getconf CLK_TCK)"
started="$(date +%s)"
sides=(run_engine run_peers run_service run_profile)
for ((r = 1; r <= rounds; ++r)); do
  mkdir -p "${work}/round${r}"
  load1 >"${work}/round${r}/load"
  date +%s >"${work}/round${r}/start"
  busy0="$(machine_busy_ticks)" ours0="$(our_ticks)" t0="$(date +%s%N)"
  for ((i = 0; i < ${#sides[@]}; ++i)); do
    "${sides[$(((i + r - 1) % ${#sides[@]}))]}" "${r}"
  done
  busy1="$(machine_busy_ticks)" ours1="$(our_ticks)" t1="$(date +%s%N)"
  # Other processes' CPU during the round, in % of one core.
  echo $(((busy1 - busy0 - (ours1 - ours0)) * 100 * 1000000000 / (ticks_per_second * (t1 - t0)))) \
    >"${work}/round${r}/other_cpu"
  date +%s >"${work}/round${r}/end"
done
# A sampling profile of each case's step at 1 thread, where perf works (cpu-clock sampling needs
# no hardware counters, so it works in VMs); the report groups the samples by kind of work.
if command -v perf >/dev/null 2>&1 &&
  perf record -q -e cpu-clock -o "${work}/perf-check.data" true >/dev/null 2>&1; then
  for c in a b c d e; do
    echo "== perf: engine/${c}/threads:1" >&2
    perf record -q -e cpu-clock -F 1999 -o "${work}/perf-${c}.data" \
      "${engine_bin}" "--benchmark_filter=^engine/${c}/threads:1/" \
      --benchmark_min_time="${perf_min_time}" >/dev/null 2>&1 &&
      perf report -i "${work}/perf-${c}.data" --no-children --sort dso,symbol --stdio -g none \
        2>/dev/null >"${work}/perf-${c}.txt" || echo "== perf failed for ${c}" >&2
  done
else
  echo "== perf unavailable: no sampling profile" >&2
fi
stop_server >&2
kill -TERM "${echo_pid}" 2>/dev/null || true
wait "${echo_pid}" || true
echo_pid=""

mkdir -p "${out_dir}"
"${python}" "${repo}/bench/report.py" "${work}" --out-dir "${out_dir}" \
  --rounds "${rounds}" --quick "${quick}" --seconds "$(($(date +%s) - started))" \
  --commit "$(git -C "${repo}" describe --always --dirty 2>/dev/null || echo unknown)" \
  --cpu "$(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n 1)" --cores "$(nproc)" \
  --server "${server_bin#"${repo}/"}" \
  --coretype "${OPENBLAS_CORETYPE-<not set>}" --l2size "${OPENBLAS_L2_SIZE-<not set>}"

#!/usr/bin/env bash
# Builds the libFuzzer targets (the fuzz preset) and fuzzes each for a while, starting from the
# committed seed corpus. CI runs `fuzz/run.sh --time 20`; run it longer by hand.
#
#   fuzz/run.sh [--time SECONDS] [--build-dir DIR] [--merge] [TARGET...]
#
#   --time S       seconds per target (default 600)
#   --build-dir D  build tree of the fuzz preset (default build/fuzz)
#   --merge        afterwards, merge the inputs that found new coverage into fuzz/corpus/
#                  (libFuzzer -merge=1 keeps only those that add coverage)
#   TARGET         compute_gradients, check_gradients, stream, graph, onnx (default: all five)
#
# New inputs go to a scratch corpus in the build tree, never into the repository unless
# --merge. A crash, leak, sanitizer report, timeout (10 s per input) or failed check stops the
# target; its input is saved under BUILD_DIR/fuzz-artifacts/ and the script exits 1. Make it a
# regression test by copying it into fuzz/corpus/TARGET/ (the CTest TARGET_fuzz_corpus replays
# that directory) once the bug is fixed.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source_dir="$(dirname "${here}")"
seconds=600
build_dir="${source_dir}/build/fuzz"
merge=0
targets=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --time) seconds="$2"; shift 2 ;;
    --build-dir) build_dir="$2"; shift 2 ;;
    --merge) merge=1; shift ;;
    compute_gradients|check_gradients|stream|graph|onnx) targets+=("$1"); shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "fuzz/run.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done
[[ ${#targets[@]} -gt 0 ]] || targets=(compute_gradients check_gradients stream graph onnx)

cd "${source_dir}"
cmake --preset fuzz -B "${build_dir}" >/dev/null
binaries=()
for t in "${targets[@]}"; do binaries+=("${t}_fuzz"); done
cmake --build "${build_dir}" -j2 --target "${binaries[@]}"

artifacts="${build_dir}/fuzz-artifacts"
mkdir -p "${artifacts}"
export ASAN_OPTIONS="${ASAN_OPTIONS:-halt_on_error=1:detect_leaks=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-halt_on_error=1:print_stacktrace=1}"
summary=()
failed=0
for t in "${targets[@]}"; do
  work="${build_dir}/fuzz-work/${t}"
  mkdir -p "${work}"
  log="${build_dir}/fuzz-${t}.log"
  echo "== fuzzing ${t} for ${seconds} s (log: ${log})"
  rc=0
  # New inputs land in the first corpus directory (the scratch one); the seeds are read only.
  # ONNX seeds are whole exported models, up to ~50 KB.
  max_len=16384
  [[ ${t} == onnx ]] && max_len=65536
  seeds=("${source_dir}/fuzz/corpus/${t}")
  [[ ${t} == onnx ]] && seeds+=("${source_dir}/tests/data/onnx")
  "${build_dir}/fuzz/${t}_fuzz" "${work}" "${seeds[@]}" \
    -max_total_time="${seconds}" -timeout=10 -rss_limit_mb=2048 -max_len="${max_len}" \
    -report_slow_units=2 -print_final_stats=1 -artifact_prefix="${artifacts}/${t}-" \
    >"${log}" 2>&1 || rc=$?
  done_line="$(grep -E '^#[0-9]+[[:space:]]+(DONE|INITED)' "${log}" | tail -n 1 || true)"
  execs="$(sed -n 's/^stat::number_of_executed_units: *//p' "${log}")"
  rate="$(sed -n 's/^stat::average_exec_per_sec: *//p' "${log}")"
  added="$(sed -n 's/^stat::new_units_added: *//p' "${log}")"
  rss="$(sed -n 's/^stat::peak_rss_mb: *//p' "${log}")"
  cov="$(sed -n 's/.* cov: \([0-9]*\) ft: \([0-9]*\) corp: \([0-9]*\).*/cov \1, ft \2, corpus \3/p' \
    <<<"${done_line}")"
  slow="$(grep -c 'Slowest unit' "${log}" || true)"
  if [[ ${rc} -ne 0 ]]; then
    failed=1
    summary+=("${t}: FAILED (exit ${rc}); see ${log}; input in ${artifacts}/")
    echo "---- ${t}: last 60 lines of ${log}" >&2
    tail -n 60 "${log}" >&2
  else
    summary+=("${t}: ok, ${execs:-?} runs, ${rate:-?} exec/s, ${cov:-cov ?}, ${added:-?} new inputs, peak RSS ${rss:-?} MB, slow-unit reports ${slow}")
  fi
  if [[ ${merge} -eq 1 && ${rc} -eq 0 ]]; then
    "${build_dir}/fuzz/${t}_fuzz" -merge=1 -max_len="${max_len}" "${source_dir}/fuzz/corpus/${t}" \
      "${work}" >"${log}.merge" 2>&1
    echo "merged into fuzz/corpus/${t}: $(grep -o 'added [0-9]* new units' "${log}.merge" || true)"
  fi
done
echo "== fuzz summary (${seconds} s per target)"
printf '  %s\n' "${summary[@]}"
exit ${failed}

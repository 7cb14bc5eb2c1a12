#!/usr/bin/env bash
# CI: the whole test suite in release, then under sanitizers, then short fuzz runs, then the
# container image. The README's test command and .ci/run call exactly this (after
# deploy/install-deps.sh).
#
#   tests/ci.sh [--stages LIST] [--fuzz-time SECONDS]
#
#   --stages LIST      comma-separated, in order (default release,asan,tsan,fuzz,image):
#     release  cmake --preset release, build, ctest --preset release: every test
#     asan     the same with AddressSanitizer + UBSan (GCC): every test; any report fails it
#     tsan     ThreadSanitizer (clang-14, libomp + Archer): the concurrency tests (the tsan
#              test preset lists them and says why the others are left out)
#     fuzz     each libFuzzer target for --fuzz-time seconds (fuzz/run.sh), then ctest --preset
#              fuzz replays the committed corpus, crash inputs included
#     image    deploy/smoke-image.sh: builds the image with podman, runs it, compares its answers
#              bit for bit with the release build's gradserve, SIGTERMs it, then brings
#              deploy/compose.yaml up and checks the optimizer's loss falls. The image is built
#              with GRADSERVE_CPU=native, the release preset's flags, so that the comparison can
#              be bit for bit (a portable build differs in the last bits). podman's layer cache
#              keeps the package layer, and build-image.sh's compiler cache means a commit
#              recompiles only what it changed: ~25 s unchanged, 1-2 min after a commit, ~6 min cold
#   --fuzz-time S      seconds per fuzz target (default 20: CI's whole run must stay under 40
#                      minutes on 2 cores; fuzz/run.sh alone defaults to 600)
#
# Prints each stage's wall time at the end; stops at the first stage that fails.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
stages="release,asan,tsan,fuzz,image"
fuzz_time=20
while [[ $# -gt 0 ]]; do
  case "$1" in
    --stages) stages="$2"; shift 2 ;;
    --fuzz-time) fuzz_time="$2"; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "tests/ci.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

times=()
current=""
started_all=$(date +%s)
report() {
  local rc=$?
  [[ -n "${current}" ]] && times+=("${current}: FAILED after $(($(date +%s) - stage_start)) s")
  echo "== tests/ci.sh: stage times"
  printf '  %s\n' "${times[@]}"
  echo "  total: $(($(date +%s) - started_all)) s"
  exit ${rc}
}
trap report EXIT

run_stage() {
  current="$1"
  stage_start=$(date +%s)
  echo "== tests/ci.sh: stage ${current}"
  shift
  "$@"
  times+=("${current}: $(($(date +%s) - stage_start)) s")
  current=""
}

preset() {  # configure, build and test one preset
  cmake --preset "$1"
  cmake --build --preset "$1"
  ctest --preset "$1"
}

fuzz() {
  fuzz/run.sh --time "${fuzz_time}"
  ctest --preset fuzz
}

image() {
  # The reference server and the client: nothing to do if the release stage ran.
  cmake --preset release >/dev/null
  cmake --build --preset release --target gradserve gradclient
  deploy/smoke-image.sh --cpu native --tag gradserve:ci
}

IFS=',' read -r -a stage_list <<<"${stages}"
for stage in "${stage_list[@]}"; do
  case "${stage}" in
    release|asan|tsan) run_stage "${stage}" preset "${stage}" ;;
    fuzz) run_stage fuzz fuzz ;;
    image) run_stage image image ;;
    *) echo "tests/ci.sh: unknown stage ${stage}" >&2; exit 2 ;;
  esac
done

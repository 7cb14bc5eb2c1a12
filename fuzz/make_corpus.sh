#!/usr/bin/env bash
# Regenerates the seed corpus under fuzz/corpus/ with fuzz_make_corpus (fuzz/make_corpus.cc).
# The seeds are deterministic; inputs saved there from crashes (crash-*) are left alone.
#
#   fuzz/make_corpus.sh [BUILD_DIR]     (default build/fuzz, configured with the fuzz preset)
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source_dir="$(dirname "${here}")"
build_dir="${1:-${source_dir}/build/fuzz}"
cd "${source_dir}"
cmake --preset fuzz -B "${build_dir}" >/dev/null
cmake --build "${build_dir}" -j2 --target fuzz_make_corpus
ASAN_OPTIONS=detect_leaks=0 "${build_dir}/fuzz/fuzz_make_corpus" "${here}/corpus"
du -sh "${here}/corpus"

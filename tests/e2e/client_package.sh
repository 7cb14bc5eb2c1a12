#!/usr/bin/env bash
# End-to-end for the C++ client library as another project sees it: install gradserve into a
# scratch prefix, build client/examples/cpp against it with find_package(gradserve), and run
# its training loop against a live server (the loss must fall).
#
#   tests/e2e/client_package.sh BUILD_DIR SOURCE_DIR [CXX_FLAGS [LINKER_FLAGS]]
#
# The flags are the build's own (sanitizer presets): a sanitized static library links only into
# a program built with the same sanitizer.
set -euo pipefail

if [[ $# -lt 2 || $# -gt 4 ]]; then
  echo "usage: $0 BUILD_DIR SOURCE_DIR [CXX_FLAGS [LINKER_FLAGS]]" >&2
  exit 2
fi
build="$1"
source_dir="$2"
cxx_flags="${3:-}"
linker_flags="${4:-}"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source "${here}/server_lib.sh"

scratch="${build}/client-package-test"
rm -rf "${scratch}"
cmake --install "${build}" --prefix "${scratch}/prefix" >/dev/null
cmake -S "${source_dir}/client/examples/cpp" -B "${scratch}/example" \
  -DCMAKE_PREFIX_PATH="${scratch}/prefix" -DCMAKE_BUILD_TYPE=Release \
  -DCMAKE_CXX_FLAGS="${cxx_flags}" -DCMAKE_EXE_LINKER_FLAGS="${linker_flags}" >/dev/null
cmake --build "${scratch}/example" -j2 >/dev/null

start_server "${scratch}/prefix/bin/gradserve" --threads 1
output="$("${scratch}/example/train_step" "127.0.0.1:${port}")"
echo "${output}"
stop_server
first="$(echo "${output}" | awk '/^step 0 /{print $4}')"
last="$(echo "${output}" | awk '/^step 4 /{print $4}')"
awk -v a="${first}" -v b="${last}" 'BEGIN { if (!(b < a)) { print "loss did not fall: " a " -> " b; exit 1 } }'
echo "loss fell from ${first} to ${last}"

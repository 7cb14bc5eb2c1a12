#!/usr/bin/env bash
# End-to-end: `gradclient compute` against the real server on the committed ONNX test models
# (mlp, residual_mlp, dropout_mlp; float32 and float64 files), the batch in .npy files written
# by numpy: the gradient .npy files, loss.txt and output it writes must match PyTorch's
# gradients (compute_onnx.py check), and its errors must say what is wrong and exit non-zero.
#
#   tests/e2e/compute_onnx.sh SERVER_BINARY GRADCLIENT_BINARY SOURCE_DIR
set -euo pipefail

if [[ $# -ne 3 ]]; then
  echo "usage: $0 SERVER_BINARY GRADCLIENT_BINARY SOURCE_DIR" >&2
  exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
data="$(cd "$3" && pwd)/tests/data/onnx"
# shellcheck source=tests/e2e/server_lib.sh
source "${here}/server_lib.sh"
# numpy is installed for the system interpreter only.
python="${GRADSERVE_PYTHON:-/usr/bin/python3}"
work="$(mktemp -d -t gradserve-compute-XXXXXX)"
trap '_server_cleanup; rm -rf "${work}"' EXIT

start_server "$1" --threads 2
client=("$2" --target "127.0.0.1:${port}")

failed=0
for model in mlp residual_mlp dropout_mlp; do
  for precision in float32 float64; do
    dir="${work}/${model}.${precision}"
    mapfile -t args < <("${python}" "${here}/compute_onnx.py" write "${data}/${model}.json" \
      "${precision}" "${dir}")
    file="${data}/${model}.onnx"
    [[ ${precision} == float64 ]] && file="${data}/${model}.f64.onnx"
    # float32: x.npy is float32 and target.npy float64, which only --dtype reconciles.
    dtype=()
    [[ ${precision} == float32 ]] && dtype=(--dtype float32)
    "${client[@]}" compute --onnx "${file}" "${args[@]}" "${dtype[@]}" --return-output \
      --out "${dir}/out" >"${dir}/stdout"
    cat "${dir}/stdout"
    "${python}" "${here}/compute_onnx.py" check "${data}/${model}.json" "${precision}" "${dir}" ||
      failed=1
  done
done

# expect_failure STATUS TEXT ARGS...: gradclient compute ARGS exits STATUS, stderr has TEXT.
expect_failure() {
  local want_rc="$1" text="$2"
  shift 2
  local rc=0
  "${client[@]}" compute "$@" >/dev/null 2>"${work}/stderr" || rc=$?
  if [[ ${rc} -ne ${want_rc} ]] || ! grep -qF -- "${text}" "${work}/stderr"; then
    echo "FAIL: compute $* exited ${rc} (expected ${want_rc}) with stderr:" >&2
    cat "${work}/stderr" >&2
    echo "  (expected it to contain: ${text})" >&2
    failed=1
  else
    echo "ok   error: $(cat "${work}/stderr")"
  fi
}

in="${work}/mlp.float32/in"
base=(--onnx "${data}/mlp.onnx" --input "x=${in}/x.npy" --loss-target "${in}/target.npy")
# Mixed float32 and float64 files without --dtype.
expect_failure 2 "choose one with --dtype" "${base[@]}"
# A parameter of the wrong shape: the server's status, by name, with the parameter named.
"${python}" -c "import numpy, sys; numpy.save(sys.argv[1], numpy.zeros((2, 2), 'float32'))" \
  "${work}/wrong.npy"
expect_failure 1 "ComputeGradients failed: INVALID_ARGUMENT: " "${base[@]}" --dtype float32 \
  --param "net.0.weight=${work}/wrong.npy"
# A truncated batch file: named, with the byte counts.
head -c -8 "${in}/x.npy" >"${work}/short.npy"
expect_failure 2 "short.npy: truncated: shape (4, 5) float32 needs 80 data bytes" --onnx "${data}/mlp.onnx" --input "x=${work}/short.npy" \
  --loss-target "${in}/target.npy" --dtype float32

server_rc=0
stop_server || server_rc=$?
[[ ${failed} -eq 0 && ${server_rc} -eq 0 ]]

#!/usr/bin/env bash
# End-to-end: gradclient against the real server.
# - `compute --onnx` on the committed ONNX test models (mlp, residual_mlp, dropout_mlp; float32
#   and float64 files), the batch in .npy files written by numpy: the gradient .npy files,
#   loss.txt and output it writes must match PyTorch's gradients (compute_onnx.py check).
# - `compute --model` on the committed MLP (client/examples/models: JSON, text format, and its
#   graph form): the .npy files it writes must match numpy's backward pass (compute_model.py),
#   the JSON and text files and the chain and graph forms must write the same bytes, and a
#   chain model given no parameters must write the ones it initialized, which give the same
#   bytes again when passed back with --params.
# - errors say what is wrong (the file, the server's status code by name) and exit non-zero;
#   info/stats --json print JSON; health --service; options after the subcommand.
#
#   tests/e2e/gradclient.sh SERVER_BINARY GRADCLIENT_BINARY SOURCE_DIR
set -euo pipefail

if [[ $# -ne 3 ]]; then
  echo "usage: $0 SERVER_BINARY GRADCLIENT_BINARY SOURCE_DIR" >&2
  exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
source_dir="$(cd "$3" && pwd)"
data="${source_dir}/tests/data/onnx"
models="${source_dir}/client/examples/models"
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

# --- compute --model: the committed MLP, chain and graph, JSON and text format ---------------
batch="${work}/batch"
"${python}" "${here}/compute_model.py" write "${batch}"
# run NAME ARGS...: gradclient compute ARGS --out WORK/NAME, the connection flag after the
# subcommand as a user would type it.
run() {
  local name="$1"
  shift
  "${client[0]}" compute --target "127.0.0.1:${port}" "$@" --out "${work}/${name}" \
    >"${work}/${name}.stdout" || { echo "FAIL: compute $* exited $?"; failed=1; return; }
}
model_check() {
  "${python}" "${here}/compute_model.py" check "$@" || failed=1
}
model_same() {
  "${python}" "${here}/compute_model.py" same "${work}/$1" "${work}/$2" || failed=1
}

run json64 --model "${models}/mlp.json" --input "${batch}/x.npy" --loss-target "${batch}/y.npy" \
  --params "${batch}/params" --return-input-gradient
cat "${work}/json64.stdout"
model_check "${work}/json64" "${batch}/params" "${batch}/x.npy" "${batch}/y.npy" mse 1e-12
grep -q "per-layer diagnostics:" "${work}/json64.stdout" ||
  { echo "FAIL: no per-layer diagnostics"; failed=1; }
run txtpb64 --model "${models}/mlp.txtpb" --input "${batch}/x.npy" \
  --loss-target "${batch}/y.npy" --params "${batch}/params" --return-input-gradient
model_same json64 txtpb64
# x in Fortran order (np.asfortranarray, or a transposed array saved as is): reordered on
# reading, so the same request and the same bytes.
run fortran64 --model "${models}/mlp.json" --input "${batch}/x_fortran.npy" \
  --loss-target "${batch}/y.npy" --params "${batch}/params" --return-input-gradient
model_same json64 fortran64
# float32, every parameter by name.
params32=()
for name in 0.weight 0.bias 2.weight 2.bias; do
  params32+=(--param "${name}=${batch}/params32/${name}.npy")
done
run json32 --model "${models}/mlp.json" --input "${batch}/x32.npy" \
  --loss-target "${batch}/y32.npy" "${params32[@]}"
model_check "${work}/json32" "${batch}/params32" "${batch}/x32.npy" "${batch}/y32.npy" mse 1e-5
# The graph form: inputs by name, the target under the graph's loss_target; same bytes.
run graph32 --model "${models}/mlp_graph.txtpb" --input "x=${batch}/x32.npy" \
  --loss-target "${batch}/y32.npy" --params "${batch}/params32"
model_same json32 graph32
grep -q "per-value diagnostics:" "${work}/graph32.stdout" ||
  { echo "FAIL: no per-value diagnostics"; failed=1; }
# No parameters: initialized and written to params/, which reproduce the same bytes.
run init64 --model "${models}/mlp.json" --input "${batch}/x.npy" --loss-target "${batch}/y.npy" \
  --init-seed 3
cat "${work}/init64.stdout"
model_check "${work}/init64" "${work}/init64/params" "${batch}/x.npy" "${batch}/y.npy" mse 1e-12
run reinit64 --model "${models}/mlp.json" --input "${batch}/x.npy" \
  --loss-target "${batch}/y.npy" --params "${work}/init64/params"
model_same init64 reinit64
# int64 class targets and a loss other than the file's.
run ce64 --model "${models}/mlp.json" --input "${batch}/x.npy" \
  --loss-target "${batch}/classes.npy" --loss cross_entropy --params "${batch}/params"
model_check "${work}/ce64" "${batch}/params" "${batch}/x.npy" "${batch}/classes.npy" \
  cross_entropy 1e-12

mlp=(--model "${models}/mlp.json" --input "${batch}/x.npy" --loss-target "${batch}/y.npy")
# x.npy is a 128-byte header and 256 bytes of data: cut in the data, then in the header.
head -c 300 "${batch}/x.npy" >"${work}/cut.npy"
expect_failure 2 "cut.npy: truncated: shape (8, 4) float64 needs 256 data bytes after the \
128-byte header, but only 172 are present" --model "${models}/mlp.json" \
  --input "${work}/cut.npy" --loss-target "${batch}/y.npy"
head -c 100 "${batch}/x.npy" >"${work}/cut.npy"
expect_failure 2 "cut.npy: truncated: the header needs 128 bytes, the file has 100" \
  --model "${models}/mlp.json" --input "${work}/cut.npy" --loss-target "${batch}/y.npy"
"${python}" -c "import numpy, sys; numpy.save(sys.argv[1], numpy.zeros((8, 4), '>f8'))" \
  "${work}/big.npy"
expect_failure 2 "big.npy: big-endian dtype" --model "${models}/mlp.json" \
  --input "${work}/big.npy" --loss-target "${batch}/y.npy"
expect_failure 2 "parameters missing: 0.weight [16, 4], 0.bias [16], 2.weight [3, 16], 2.bias [3]" \
  --model "${models}/mlp_graph.txtpb" --input "x=${batch}/x32.npy" --loss-target "${batch}/y32.npy"
expect_failure 2 "parameters missing: 2.bias [3]" "${mlp[@]}" \
  --param "0.weight=${batch}/params/0.weight.npy" --param "0.bias=${batch}/params/0.bias.npy" \
  --param "2.weight=${batch}/params/2.weight.npy"
printf '{"layers": [{"linear": {"in_features": 4}}' >"${work}/broken.json"
expect_failure 2 "broken.json: not a gradserve.v1.Model in protobuf JSON" \
  --model "${work}/broken.json" --input "${batch}/x.npy" --loss-target "${batch}/y.npy"
printf 'layers { linear { in_features: 4 out_features: 16 } }\nlayers { rleu {} }\n' \
  >"${work}/broken.txtpb"
expect_failure 2 "broken.txtpb: not a gradserve.v1.Model in protobuf text format: line 2" \
  --model "${work}/broken.txtpb" --input "${batch}/x.npy" --loss-target "${batch}/y.npy"
# The server's refusal, its code by name: 5 features for a Linear(4, 16).
"${python}" -c "import numpy, sys; numpy.save(sys.argv[1], numpy.zeros((8, 5)))" \
  "${work}/x5.npy"
expect_failure 1 "ComputeGradients failed: INVALID_ARGUMENT: " --model "${models}/mlp.json" \
  --input "${work}/x5.npy" --loss-target "${batch}/y.npy"
# --target after the subcommand is the server's address, as everywhere: a .npy there is a
# mistake for --loss-target, said so.
rc=0
"$2" compute --model "${models}/mlp.json" --input "${batch}/x.npy" --target "${batch}/y.npy" \
  2>"${work}/stderr" || rc=$?
if [[ ${rc} -ne 2 ]] || ! grep -qF -- "the loss target file is --loss-target" "${work}/stderr"; then
  echo "FAIL: compute --target y.npy exited ${rc}: $(cat "${work}/stderr")"
  failed=1
else
  echo "ok   error: $(cat "${work}/stderr")"
fi

# --- info/stats --json, health --service, connection flags after the subcommand -------------
after=(--target "127.0.0.1:${port}" --timeout-ms 5000)
"$2" info "${after[@]}" --json >"${work}/info.json"
"$2" stats --json "${after[@]}" >"${work}/stats.json"
"${python}" - "${work}/info.json" "${work}/stats.json" <<'PY' || failed=1
import json, sys
info = json.load(open(sys.argv[1]))
stats = json.load(open(sys.argv[2]))
assert info["api"] == "gradserve.v1" and "linear" in info["layers"], info
calls = {m["method"]: m for m in stats["methods"]}
codes = {c["code"] for c in calls["ComputeGradients"]["by_code"]}
assert "OK" in codes and "INVALID_ARGUMENT" in codes, calls["ComputeGradients"]
assert "calls_in_flight" in stats, stats
print("ok   info --json, stats --json: one JSON object each, codes by name")
PY
expect_health() {
  local want_rc="$1" want="$2" rc=0 got
  shift 2
  got="$("$@")" || rc=$?
  if [[ ${rc} -ne ${want_rc} || "${got}" != "${want}" ]]; then
    echo "FAIL: $* printed '${got}', exit ${rc} (expected '${want}', exit ${want_rc})"
    failed=1
  else
    echo "ok   $*: ${got}"
  fi
}
expect_health 0 SERVING "$2" health "${after[@]}"
expect_health 0 SERVING "$2" --target "127.0.0.1:${port}" health \
  --service gradserve.v1.GradientService
expect_health 1 SERVICE_UNKNOWN "$2" health --service no.such.Service "${after[@]}"

server_rc=0
stop_server || server_rc=$?
[[ ${failed} -eq 0 && ${server_rc} -eq 0 ]]

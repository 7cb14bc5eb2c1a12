#!/usr/bin/env bash
# Generate the Python gRPC stubs for gradserve.v1 and gradserve.optimizer.v1 from the .protos.
#
#   client/python/generate.sh [OUT_DIR]      (default: client/python, next to this script)
#
# Writes OUT_DIR/gradserve/v1/gradserve_pb2{,_grpc}.py and OUT_DIR/gradserve/optimizer/v1/
# optimizer_pb2{,_grpc}.py. Uses protoc plus
# Debian's /usr/bin/grpc_python_plugin rather than python3-grpc-tools, whose bundled protoc is
# too old for the protobuf 4.x runtime (see /work/shared/notes/grpc-on-debian12.md).
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
proto_root="$(cd "${here}/../../proto" && pwd)"
out_dir="${1:-${here}}"
plugin="${GRPC_PYTHON_PLUGIN:-/usr/bin/grpc_python_plugin}"

die() { echo "generate.sh: $*" >&2; exit 1; }
command -v protoc >/dev/null || die "protoc not found (apt install protobuf-compiler)"
[[ -x "${plugin}" ]] || die "${plugin} not found (apt install protobuf-compiler-grpc)"

mkdir -p "${out_dir}/gradserve/v1" "${out_dir}/gradserve/optimizer/v1"
# -I proto_root keeps the package path in the generated imports ("from gradserve.v1 import
# gradserve_pb2"), so the stubs must be imported as the gradserve.v1 package.
protoc -I "${proto_root}" \
  --python_out="${out_dir}" \
  --plugin=protoc-gen-grpc_python="${plugin}" \
  --grpc_python_out="${out_dir}" \
  "${proto_root}/gradserve/v1/gradserve.proto" \
  "${proto_root}/gradserve/optimizer/v1/optimizer.proto"

# Regular packages (not namespace packages) so that another "gradserve" directory on sys.path
# cannot shadow or merge with this one; created only when generating elsewhere.
for pkg in "${out_dir}/gradserve" "${out_dir}/gradserve/v1" "${out_dir}/gradserve/optimizer" \
           "${out_dir}/gradserve/optimizer/v1"; do
  [[ -f "${pkg}/__init__.py" ]] || : > "${pkg}/__init__.py"
done
echo "generated ${out_dir}/gradserve/v1/gradserve_pb2.py, gradserve_pb2_grpc.py and" \
     "${out_dir}/gradserve/optimizer/v1/optimizer_pb2.py, optimizer_pb2_grpc.py"

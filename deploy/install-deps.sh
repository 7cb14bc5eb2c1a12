#!/usr/bin/env bash
# Installs every Debian 12 package gradserve needs to build, test and run.
#   deploy/install-deps.sh            build + test dependencies (the default)
#   deploy/install-deps.sh --bench    also the benchmark peers (PyTorch, matplotlib),
#                                     python3-h2 (bench/abuse.sh) and python3-onnx (exporting
#                                     the ONNX test models, gradserve_onnx.from_torch)
# Idempotent: packages already present are skipped, so the README commands can call it every
# time. Needs root (or sudo) only when something is missing.
set -euo pipefail

packages=(
  cmake g++ make pkg-config git ca-certificates
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev libeigen3-dev libspdlog-dev libcli11-dev
  # oneDNN's float32 GEMM (Note [GEMM backend]); its CMake config asks for OpenCL's headers.
  libdnnl-dev ocl-icd-opencl-dev
  libcpp-httplib-dev  # the Prometheus endpoint (--metrics-listen)
  nlohmann-json3-dev  # gradclient bench --json
  # ONNX import: ModelProto, the checker and shape inference (built on our protobuf 3.21).
  libonnx-dev
  libzip-dev  # gradserve-optimizer's .npz checkpoints
  libgtest-dev libgmock-dev libbenchmark-dev
  python3 python3-grpcio python3-protobuf python3-numpy  # Python-client, compute .npy tests
  openssl  # security_test makes its certificates with the openssl CLI
  clang-14 libomp-14-dev libclang-rt-14-dev  # tests/ci.sh: TSan with libomp + Archer, libFuzzer
  # llvm-symbolizer: tsan.supp matches function names, so TSan must symbolise its reports.
  llvm-14
)
for arg in "$@"; do
  case "$arg" in
    # libopenblas0-pthread: without it Debian's numpy and torch use the reference BLAS.
    # python3-h2: bench/abuse.sh speaks raw HTTP/2 for its slow-reader attack.
    # python3-onnx: tests/data/onnx/export_models.py and gradserve_onnx.from_torch.
    --bench) packages+=(python3-torch python3-matplotlib python3-threadpoolctl
                        libopenblas0-pthread python3-h2 python3-onnx) ;;
    *) echo "install-deps.sh: unknown option $arg" >&2; exit 2 ;;
  esac
done

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "install-deps.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

#!/usr/bin/env bash
# Installs the Debian 12 packages gradserve needs, for one purpose (each mode includes the ones
# above it, except `run`):
#   deploy/install-deps.sh run      the shared libraries the binaries load (the image's runtime
#                                   stage): nothing to compile with
#   deploy/install-deps.sh build    compile gradserve, gradserve-optimizer and gradclient: the
#                                   compiler, CMake and the -dev packages (the image's build stage)
#   deploy/install-deps.sh test     build + everything tests/ci.sh needs: GoogleTest, the Python
#                                   client's packages (scikit-learn and matplotlib for its
#                                   examples), openssl, clang-14/libomp/LLVM (TSan, fuzz),
#                                   podman/runc/debootstrap/uidmap/podman-compose (the image stage),
#                                   python3-yaml (the manifest check), nodejs + npm (the Node
#                                   client's test) and mypy. The default, so that the README's
#                                   commands and .ci/run get all that the tests need
#   deploy/install-deps.sh bench    test + the benchmark peer (PyTorch), python3-h2
#                                   (bench/abuse.sh) and python3-onnx (exporting the ONNX test
#                                   models, gradserve.onnx.from_torch)
#   deploy/install-deps.sh --bench  the same as `bench` (the option this script had first)
# Idempotent: packages already present are skipped, so the README commands can call it every
# time. Needs root (or sudo) only when something is missing.
set -euo pipefail

mode=test
for arg in "$@"; do
  case "$arg" in
    run|build|test|bench) mode=$arg ;;
    --bench) mode=bench ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) echo "install-deps.sh: unknown mode $arg (run, build, test or bench)" >&2; exit 2 ;;
  esac
done

# The runtime halves of the build dependencies: gRPC C++ (with reflection and the health
# service), protobuf, OpenMP, oneDNN (float32 GEMMs), spdlog, cpp-httplib (the metrics
# endpoint), ONNX (model import) and libzip (the optimizer's .npz checkpoints); their own
# dependencies (libgrpc29, abseil, fmt, OpenSSL, OpenCL's loader) follow. The -dev packages of
# `build` pull these in, so only `run` lists them.
run_packages=(
  libgrpc++1.51 libprotobuf32 libgomp1 libdnnl2 libspdlog1.10 libcpp-httplib0.11 libonnx1 libzip4
)
build_packages=(
  cmake g++ make pkg-config git ca-certificates
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev libeigen3-dev libspdlog-dev libcli11-dev
  # oneDNN's float32 GEMM (Note [GEMM backend]); its CMake config asks for OpenCL's headers.
  libdnnl-dev ocl-icd-opencl-dev
  libcpp-httplib-dev  # the Prometheus endpoint (--metrics-listen)
  nlohmann-json3-dev  # gradclient bench --json
  # ONNX import: ModelProto, the checker and shape inference (built on our protobuf 3.21).
  libonnx-dev
  libzip-dev          # gradserve-optimizer writes and reads its checkpoints as .npz
  # Builds compile through it (GRADSERVE_CCACHE; the image build when build-image.sh mounts its
  # cache at /ccache), so a rebuild after a commit recompiles only what the commit changed.
  ccache
)
test_packages=(
  libgtest-dev libgmock-dev libbenchmark-dev
  python3 python3-grpcio python3-protobuf python3-numpy  # Python-client, compute .npy tests
  python3-venv  # python_package: pip install ./client/python into a fresh venv, as the README does
  mypy  # python_typecheck: the package ships py.typed, so its annotations must type-check
  openssl  # security_test makes its certificates with the openssl CLI
  clang-14 libomp-14-dev libclang-rt-14-dev  # tests/ci.sh: TSan with libomp + Archer, libFuzzer
  # llvm-symbolizer: tsan.supp matches function names, so TSan must symbolise its reports.
  llvm-14
  # tests/ci.sh's image stage: build and run the image without a Docker engine
  # (deploy/build-image.sh, deploy/smoke-image.sh) and bring deploy/compose.yaml up. Named
  # one by one because apt here skips recommends: catatonit is `run --init`, netavark +
  # aardvark-dns + iptables the compose network on which the services find each other by name.
  podman runc catatonit netavark aardvark-dns iptables debootstrap uidmap podman-compose
  python3-yaml  # deploy_manifests_test parses compose.yaml and deploy/k8s/
  nodejs npm  # the node_client test: npm ci of client/node's lockfile, node --test (Node >= 18)
  # python_examples runs client/python/examples/train_digits.py (scikit-learn's digits, shipped
  # in the package: no download) and vanishing_gradients.py, which write PNGs with matplotlib.
  python3-sklearn python3-matplotlib
)
# libopenblas0-pthread: without it Debian's numpy and torch use the reference BLAS.
# python3-h2: bench/abuse.sh speaks raw HTTP/2 for its slow-reader attack.
# python3-onnx: tests/data/onnx/export_models.py and gradserve.onnx.from_torch.
bench_packages=(
  python3-torch python3-threadpoolctl libopenblas0-pthread python3-h2
  python3-onnx
)

case "$mode" in
  run) packages=("${run_packages[@]}") ;;
  build) packages=("${build_packages[@]}") ;;
  test) packages=("${build_packages[@]}" "${test_packages[@]}") ;;
  bench) packages=("${build_packages[@]}" "${test_packages[@]}" "${bench_packages[@]}") ;;
esac

missing=()
for p in "${packages[@]}"; do
  # NodeSource's nodejs package carries its own npm and conflicts with Debian's: an npm already
  # on PATH counts as installed, or apt would try to replace that nodejs.
  if [[ "$p" == npm ]] && command -v npm >/dev/null; then continue; fi
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
[ ${#missing[@]} -eq 0 ] && exit 0

sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo"
echo "install-deps.sh: installing ${missing[*]}" >&2
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null

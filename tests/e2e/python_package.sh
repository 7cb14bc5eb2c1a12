#!/usr/bin/env bash
# End-to-end: the Python package as a new user installs it, then against a real server.
#
#   tests/e2e/python_package.sh SERVER_BINARY SOURCE_DIR
#
# 1. `pip install ./client/python` into a fresh venv made with --system-site-packages (Debian's
#    grpcio, protobuf and numpy satisfy the dependencies; the build needs no network), and the
#    package's unit tests (client/python/tests) run against the installed copy;
# 2. its sdist, built by the package's own backend, installs into a second venv away from the
#    repository (the .proto files travel inside it);
# 3. python_package_check.py, with the installed package, against the server.
# Passes only if all of it passes AND the server exits 0 on SIGTERM.
set -euo pipefail
if [[ $# -ne 2 ]]; then
  echo "usage: $0 SERVER_BINARY SOURCE_DIR" >&2
  exit 2
fi
server_bin="$1"
source_dir="$(cd "$2" && pwd)"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tests/e2e/server_lib.sh
source "${here}/server_lib.sh"
work="$(mktemp -d -t gradserve-pypkg-XXXXXX)"
trap '_server_cleanup; rm -rf "${work}"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1
# Debian's interpreter: the one its python3-grpcio and python3-numpy belong to.
/usr/bin/python3 -m venv --system-site-packages "${work}/venv"
venv_python="${work}/venv/bin/python"
"${work}/venv/bin/pip" install --quiet "${source_dir}/client/python"
# From a directory without the sources, so the installed copy is what gets imported.
installed="$(cd "${work}" && "${venv_python}" -c 'import gradserve; print(gradserve.__file__)')"
if [[ "${installed}" != "${work}/venv/"* ]]; then
  echo "import gradserve found ${installed}, not the venv's copy" >&2
  exit 1
fi
(cd "${work}" && "${venv_python}" -m unittest discover -s "${source_dir}/client/python/tests" \
  -p 'test_*.py')

mkdir "${work}/sdist"
sdist="$(cd "${source_dir}/client/python" && /usr/bin/python3 -c '
import sys
sys.path.insert(0, "build_backend")
import gradserve_build
print(gradserve_build.build_sdist(sys.argv[1]))' "${work}/sdist")"
/usr/bin/python3 -m venv --system-site-packages "${work}/venv-sdist"
(cd "${work}" && "${work}/venv-sdist/bin/pip" install --quiet "${work}/sdist/${sdist}" &&
  "${work}/venv-sdist/bin/python" -c 'import gradserve, gradserve.optimizer.v1.optimizer_pb2_grpc
assert gradserve.service_config()')
echo "installed ${installed} and, from ${sdist}, a second copy"

start_server "${server_bin}" --threads 2
check_rc=0
(cd "${work}" && "${venv_python}" "${here}/python_package_check.py" --target "127.0.0.1:${port}") ||
  check_rc=$?
server_rc=0
stop_server || server_rc=$?
echo "python_package_check.py: exit ${check_rc}; server after SIGTERM: exit ${server_rc}"
[[ ${check_rc} -eq 0 && ${server_rc} -eq 0 ]]

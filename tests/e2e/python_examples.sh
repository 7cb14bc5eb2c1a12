#!/usr/bin/env bash
# End-to-end: the Python examples that README.md's commands run, at a small size, against a real
# server, so the stated results and the committed pictures cannot rot unnoticed.
#
#   tests/e2e/python_examples.sh SERVER_BINARY SOURCE_DIR
#
# 1. train_digits.py with SGD and with Adam for 150 steps must reach --min-accuracy 0.9 on the
#    held-out digits (measured: 97.5 % and 97.2 %; other seeds no lower than 91.6 %) and write
#    its two PNGs for each optimizer;
# 2. vanishing_gradients.py --check (10 hidden layers, 20 steps) asserts the per-layer gradient
#    norms' lesson: the sigmoid chain's vanish, the ReLU chain's less, the residual stack's not.
# Needs Debian's python3-sklearn (the digits) and python3-matplotlib (the PNGs): a missing one
# fails the test, naming the package, rather than skipping it. Passes only if all of it passes
# AND the server exits 0 on SIGTERM.
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
# Debian's interpreter: python3-sklearn, python3-matplotlib, grpcio and numpy belong to it.
python="${GRADSERVE_PYTHON:-/usr/bin/python3}"
work="$(mktemp -d -t gradserve-pyexamples-XXXXXX)"
trap '_server_cleanup; rm -rf "${work}"' EXIT

for module in sklearn:python3-sklearn matplotlib:python3-matplotlib; do
  if ! "${python}" -c "import ${module%%:*}" 2>/dev/null; then
    echo "python_examples: ${python} cannot import ${module%%:*}; install Debian's" \
      "${module#*:} (deploy/install-deps.sh does)" >&2
    exit 1
  fi
done

# A complete package copy generated from the current .proto, not the checkout's stubs (which
# may be stale or absent).
"${source_dir}/client/python/generate.sh" "${work}/pkg" >/dev/null
examples="${source_dir}/client/python/examples"
start_server "${server_bin}" --threads 2

check_rc=0
run() {
  echo "+ $*"
  PYTHONPATH="${work}/pkg" "${python}" "$@" || check_rc=$?
}
for optimizer in sgd adam; do
  run "${examples}/train_digits.py" --target "127.0.0.1:${port}" --optimizer "${optimizer}" \
    --steps 150 --log-every 0 --min-accuracy 0.9 --plots "${work}/plots"
  for png in "digits_${optimizer}_loss.png" "digits_${optimizer}_grad_norms.png"; do
    # Every PNG starts with the same 8-byte signature: \x89 P N G \r \n \x1a \n.
    if [[ "$(head -c 8 "${work}/plots/${png}" 2>/dev/null | od -An -tx1 | tr -d ' \n')" != \
          "89504e470d0a1a0a" ]]; then
      echo "train_digits.py --optimizer ${optimizer} did not write a PNG ${png}" >&2
      check_rc=1
    fi
  done
done
run "${examples}/vanishing_gradients.py" --target "127.0.0.1:${port}" --check

server_rc=0
stop_server || server_rc=$?
echo "python examples: exit ${check_rc}; server after SIGTERM: exit ${server_rc}"
[[ ${check_rc} -eq 0 && ${server_rc} -eq 0 ]]

#!/usr/bin/env bash
# The Node.js client's npm dependencies: `npm ci` from client/node's committed lockfile into
# WORK_DIR/node_modules, once per test run (the CTest fixture the Node tests require; they find
# the packages through NODE_PATH), so the source tree stays clean and a user's own
# client/node/node_modules is never replaced.
#
#   tests/e2e/node_install.sh SOURCE_DIR WORK_DIR
#
# Without node or npm this FAILS: a client test that skips quietly when its toolchain is
# missing proves nothing.
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 SOURCE_DIR WORK_DIR" >&2
  exit 2
fi
package="$1/client/node"
work="$2"

for tool in node npm; do
  if ! command -v "${tool}" >/dev/null; then
    echo "node_install: '${tool}' not found; the Node.js client's tests need Node.js >= 18 and" \
         "npm (deploy/install-deps.sh test installs Debian's nodejs and npm)" >&2
    exit 1
  fi
done
major="$(node -p 'process.versions.node.split(".")[0]')"
if (( major < 18 )); then
  echo "node_install: Node.js $(node --version) is too old; the client needs >= 18" >&2
  exit 1
fi
echo "node $(node --version), npm $(npm --version)"

rm -rf "${work}"
mkdir -p "${work}"
cp "${package}/package.json" "${package}/package-lock.json" "${work}/"
# --ignore-scripts: the only dependency script is protobufjs's CLI version check, which the
# client does not use; npm 9 (Debian 12) and newer npms then install exactly the same tree.
(cd "${work}" && npm ci --ignore-scripts --no-audit --no-fund --prefer-offline)

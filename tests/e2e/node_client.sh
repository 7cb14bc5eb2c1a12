#!/usr/bin/env bash
# The Node.js client (client/node): `npm ci` from its committed lockfile into a scratch
# directory, then its unit tests and its end-to-end tests against SERVER_BINARY.
#
#   tests/e2e/node_client.sh SERVER_BINARY SOURCE_DIR WORK_DIR
#
# The packages go to WORK_DIR/node_modules (found through NODE_PATH), so the source tree stays
# clean and a user's own client/node/node_modules is never replaced. Without node or npm this
# FAILS: a client test that skips quietly when its toolchain is missing proves nothing.
set -euo pipefail

if [[ $# -ne 3 ]]; then
  echo "usage: $0 SERVER_BINARY SOURCE_DIR WORK_DIR" >&2
  exit 2
fi
server="$1"
package="$2/client/node"
work="$3"

for tool in node npm; do
  if ! command -v "${tool}" >/dev/null; then
    echo "node_client: '${tool}' not found; the Node.js client's tests need Node.js >= 18 and" \
         "npm (deploy/install-deps.sh test installs Debian's nodejs and npm)" >&2
    exit 1
  fi
done
major="$(node -p 'process.versions.node.split(".")[0]')"
if (( major < 18 )); then
  echo "node_client: Node.js $(node --version) is too old; the client needs >= 18" >&2
  exit 1
fi
echo "node $(node --version), npm $(npm --version)"

mkdir -p "${work}"
cp "${package}/package.json" "${package}/package-lock.json" "${work}/"
# --ignore-scripts: the only dependency script is protobufjs's CLI version check, which the
# client does not use; npm 9 (Debian 12) and newer npms then install exactly the same tree.
(cd "${work}" && npm ci --ignore-scripts --no-audit --no-fund --prefer-offline)

# Run from WORK_DIR, so any file a test leaves in the working directory lands there too.
cd "${work}"
NODE_PATH="${work}/node_modules" GRADSERVE_BINARY="${server}" \
  node --test "${package}/test/unit.test.js" "${package}/test/e2e.test.js"

#!/usr/bin/env bash
# The Node.js client (client/node): its unit tests and its end-to-end tests against
# SERVER_BINARY, on the packages tests/e2e/node_install.sh put in NODE_MODULES_DIR.
#
#   tests/e2e/node_client.sh SERVER_BINARY SOURCE_DIR NODE_MODULES_DIR
set -euo pipefail

if [[ $# -ne 3 ]]; then
  echo "usage: $0 SERVER_BINARY SOURCE_DIR NODE_MODULES_DIR" >&2
  exit 2
fi
server="$1"
package="$2/client/node"
node_modules="$3"
work="$(mktemp -d -t gradserve-node-XXXXXX)"
trap 'rm -rf "${work}"' EXIT

# Run from a scratch directory, so any file a test leaves in the working directory lands there.
cd "${work}"
NODE_PATH="${node_modules}" GRADSERVE_BINARY="${server}" \
  node --test "${package}/test/unit.test.js" "${package}/test/e2e.test.js"

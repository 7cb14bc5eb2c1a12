#!/usr/bin/env bash
# mypy on the gradserve Python package as it ships (issue 14: the package has py.typed, so its
# users' type checkers read our annotations and the generated .pyi stubs):
#
#   tests/client/python_typecheck.sh SOURCE_DIR
#
# A fresh copy of the package with its generated stubs (client/python/generate.sh DIR), so stale
# stubs in the checkout cannot hide an error, checked with client/python/pyproject.toml's
# [tool.mypy]. Fails on any error, and when mypy is missing: a check that skips itself quietly
# would pass on every machine that lacks it.
set -euo pipefail
if [[ $# -ne 1 ]]; then
  echo "usage: $0 SOURCE_DIR" >&2
  exit 2
fi
source_dir="$(cd "$1" && pwd)"
# Debian's interpreter: numpy's stubs, which mypy reads, belong to it.
python=/usr/bin/python3
if ! "${python}" -m mypy --version >/dev/null 2>&1; then
  echo "python_typecheck: mypy is not installed for ${python}; deploy/install-deps.sh test" \
       "installs it (Debian's mypy package)" >&2
  exit 1
fi
work="$(mktemp -d -t gradserve-typecheck-XXXXXX)"
trap 'rm -rf "${work}"' EXIT
"${source_dir}/client/python/generate.sh" "${work}" >/dev/null
cd "${work}"
echo "$("${python}" -m mypy --version) on a generated copy of client/python/gradserve"
# No cache kept between runs (a cold check takes seconds), so a stale one cannot pass it.
"${python}" -m mypy --config-file "${source_dir}/client/python/pyproject.toml" \
  --cache-dir "${work}/.mypy_cache" gradserve

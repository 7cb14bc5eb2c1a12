#!/usr/bin/env bash
# Steps per second of gradserve-optimizer training the (b) model (784-1024-1024-10 ReLU,
# cross-entropy, batch 256, float32, Adam) through 1, 2 and 3 local gradserve replicas, and the
# bytes each step moves.
#
#   bench/scale.sh                    5 rounds of 20 timed steps per configuration (~3 min)
#   bench/scale.sh --rounds 1 --steps 5        a smoke run
#   bench/scale.sh --configs 1x1,2x1,3x1,1x2   REPLICASxTHREADS (the default)
#
# Each configuration runs on fresh processes: R replicas with --threads T each, and an
# optimizer splitting each batch into R parts. The default compares 1, 2 and 3 one-thread
# replicas against one, plus one replica with both cores (1x2): on this 2-core machine the
# ceiling is CPU, not replicas, so 2x1 is the most the machine can give and 3x1 shows what
# oversubscription costs. A run during which other work kept more than --max-other (0.25) cores
# busy is run again, up to --retries (2) times. Writes bench/results/scale.md (medians over
# rounds; ratios taken within a round) and bench/results/scale.json (every run). Driver:
# bench/scale.py.
#
# Environment: BUILD_DIR [build/release], GRADSERVE [BUILD_DIR/server/gradserve],
#   GRADSERVE_OPTIMIZER [BUILD_DIR/optimizer/gradserve-optimizer], PYTHON [/usr/bin/python3].
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build_dir="${BUILD_DIR:-${repo}/build/release}"
gradserve="${GRADSERVE:-${build_dir}/server/gradserve}"
optimizer="${GRADSERVE_OPTIMIZER:-${build_dir}/optimizer/gradserve-optimizer}"
# grpcio, protobuf and numpy are installed for the system interpreter only.
python="${PYTHON:-/usr/bin/python3}"

if [[ "${1:-}" == -h || "${1:-}" == --help ]]; then
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
  exit 0
fi
for bin in "${gradserve}" "${optimizer}"; do
  [[ -x "${bin}" ]] || {
    echo "scale.sh: ${bin} not found: cmake --build --preset release (see --help)" >&2
    exit 2
  }
done
echo "== load average before the run: $(cut -d' ' -f1 /proc/loadavg)" >&2
exec "${python}" "${repo}/bench/scale.py" --gradserve "${gradserve}" --optimizer "${optimizer}" "$@"

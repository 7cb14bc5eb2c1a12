#!/usr/bin/env bash
# End-to-end: `gradclient bench` against a real server, briefly: every call succeeds, every
# response is bit-identical to the first, the JSON is written; a bad --shape is refused.
#
#   tests/e2e/bench_smoke.sh SERVER_BINARY GRADCLIENT_BINARY
set -euo pipefail

if [[ $# -ne 2 ]]; then
  echo "usage: $0 SERVER_BINARY GRADCLIENT_BINARY" >&2
  exit 2
fi
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tests/e2e/server_lib.sh
source "${here}/server_lib.sh"
json="$(mktemp -t gradserve-bench-XXXXXX.json)"
trap '_server_cleanup; rm -f "${json}"' EXIT

start_server "$1"
client=("$2" --target "127.0.0.1:${port}")

"${client[@]}" bench --shape seed --concurrency 4 --channels 2 --duration 1 --warmup 0.2 \
  --verify --no-progress --json "${json}"
"${client[@]}" bench --shape batch=16,layers=32x64x10,loss=cross_entropy,dtype=float64 \
  --concurrency 3 --api cq --threads 2 --duration 10 --max-calls 50 --checkpoint sqrt --verify \
  --no-progress
python3 - "${json}" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
assert r["calls"] > 0 and r["ok"] == r["calls"], r
assert r["errors"] == {} and r["mismatches"] == 0, r
assert 0 < r["latency_us"]["p50"] <= r["latency_us"]["p99"] <= r["latency_us"]["max"], r
print(f"bench JSON ok: {r['calls']} calls, {r['calls_per_s']:.0f}/s")
PY
if "${client[@]}" bench --shape batch=8,layers=4 --duration 1 2>/dev/null; then
  echo "a one-width --shape was accepted" >&2
  exit 1
fi
stop_server

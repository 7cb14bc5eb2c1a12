#!/usr/bin/env bash
# Smoke test of the container image and of deploy/compose.yaml, with podman (no Docker engine, no
# registry): what tests/ci.sh's `image` stage runs.
#
#   deploy/smoke-image.sh [--cpu portable|native] [--reference BIN] [--gradclient BIN]
#                         [--tag NAME:TAG] [--no-build] [--no-compose] [--jobs N]
#
#   --cpu        the image's GRADSERVE_CPU (default portable, the image users get)
#   --reference  a locally built gradserve with the same CPU flags as the image, to compare
#                answers with bit for bit. Default: build/release/server/gradserve for native
#                (the release preset is -march=native), build/portable/server/gradserve for
#                portable, built here with the `portable` preset if missing. A native server's
#                answers differ from a portable one's in the last bits (FMA contraction and
#                vector widths in Eigen's kernels), so the flags must match.
#   --gradclient the client sending the requests (default build/release/client/gradclient)
#   --tag        the image to build and test (default gradserve:smoke, so gradserve:latest is
#                left alone)
#   --no-build   test the image already tagged --tag
#   --no-compose only the single-container checks
#
# Steps, each failing the script:
#   1. deploy/build-image.sh --tag TAG --cpu CPU (skipped with --no-build);
#   2. podman run -d --init --network host with GRADSERVE_PORT/GRADSERVE_METRICS_PORT on free
#      ports; `podman healthcheck run` must pass within 60 s; /metrics must answer;
#   3. gradclient compute on committed ONNX models (an MLP, a residual LayerNorm MLP, a GPT-2
#      block with a tied head), float64 and float32, to the container and to --reference: every
#      gradient file and the loss must be byte-identical;
#   4. podman stop (SIGTERM): the container must exit 0;
#   5. podman-compose -p PROJECT up -d (the 3 replicas + the optimizer, on free host ports):
#      every healthcheck passes, the optimizer logs at least 200 steps of the digits run, the
#      loss falls, every replica served gradients, a SIGTERM to the optimizer exits 0 after a
#      checkpoint and a restart resumes from it; then podman-compose down -v.
# Every container, network and volume it creates is removed on exit, even on failure. Needs root
# (podman); installs nothing itself but what build-image.sh does (deploy/install-deps.sh test
# installs podman-compose).
set -euo pipefail

say() { printf 'smoke-image: %s\n' "$*" >&2; }
die() { say "FAIL: $*"; exit 1; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
top=$(cd "$here/.." && pwd)
python=/usr/bin/python3   # numpy and grpcio are installed for Debian's interpreter only
cpu=portable
reference=""
gradclient="$top/build/release/client/gradclient"
tag=gradserve:smoke
build=1
compose=1
jobs=2
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) cpu=$2; shift 2 ;;
    --reference) reference=$2; shift 2 ;;
    --gradclient) gradclient=$2; shift 2 ;;
    --tag) tag=$2; shift 2 ;;
    --no-build) build=0; shift ;;
    --no-compose) compose=0; shift ;;
    --jobs) jobs=$2; shift 2 ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) say "unknown argument $1 (try --help)"; exit 2 ;;
  esac
done
case "$cpu" in portable|native) ;; *) say "--cpu must be portable or native"; exit 2 ;; esac
[ "$(id -u)" -eq 0 ] || { say "needs root (podman)"; exit 2; }
[ -x "$gradclient" ] || die "no gradclient at $gradclient (cmake --build --preset release first)"

work=$(mktemp -d -t gradserve-smoke-XXXXXX)
cid=""
ref_pid=""
project="gradsmoke$$"
compose_file="$here/compose.yaml"
# build-image.sh writes the containers.conf this machine needs (runc, ulimits); use it for every
# podman call here too.
export CONTAINERS_CONF=${CONTAINERS_CONF:-${GRADSERVE_IMAGE_WORK:-/var/tmp/gradserve-image}/containers.conf}
cleanup() {
  local rc=$?
  set +e
  [ -n "$ref_pid" ] && kill -KILL "$ref_pid" 2>/dev/null && wait "$ref_pid" 2>/dev/null
  [ -n "$cid" ] && podman rm -f -t 0 "$cid" >/dev/null 2>&1
  if [ "$compose" -eq 1 ]; then
    # By the project's label, not by name: whatever podman-compose got to create before a failure.
    for c in $(podman ps -aq --filter "label=io.podman.compose.project=$project"); do
      podman rm -f -t 0 "$c" >/dev/null 2>&1
    done
    for v in $(podman volume ls -q --filter "label=io.podman.compose.project=$project"); do
      podman volume rm -f "$v" >/dev/null 2>&1
    done
    podman network rm -f "${project}_default" >/dev/null 2>&1
  fi
  rm -rf "$work"
  exit $rc
}
trap cleanup EXIT

free_ports() {  # free_ports N: N TCP ports free on the host right now
  "$python" -c '
import socket, sys
socks = [socket.socket() for _ in range(int(sys.argv[1]))]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))' "$1"
}

wait_healthy() {  # wait_healthy CONTAINER SECONDS
  local deadline=$((SECONDS + $2))
  # No systemd here, so podman never runs a healthcheck by itself: run it until it passes.
  until podman healthcheck run "$1" >/dev/null 2>&1; do
    [ "$(podman inspect --format '{{.State.Running}}' "$1")" = true ] ||
      { podman logs "$1" >&2; die "$1 exited before it was healthy"; }
    [ $SECONDS -lt "$deadline" ] || { podman logs "$1" >&2; die "$1 not healthy after $2 s"; }
    sleep 1
  done
}

# ---- 1. the image ----------------------------------------------------------------------------
if [ "$build" -eq 1 ]; then
  t0=$SECONDS
  "$here/build-image.sh" --tag "$tag" --cpu "$cpu" --jobs "$jobs"
  say "image built in $((SECONDS - t0)) s"
fi
podman image exists "$tag" || die "no image $tag"

# The reference server: same compiler, same flags as the image's build stage.
if [ -z "$reference" ]; then
  if [ "$cpu" = native ]; then
    reference="$top/build/release/server/gradserve"
  else
    reference="$top/build/portable/server/gradserve"
    if [ ! -x "$reference" ]; then
      say "building a portable reference gradserve (cmake --preset portable)"
      (cd "$top" && cmake --preset portable >/dev/null &&
        cmake --build build/portable -j"$jobs" --target gradserve >/dev/null)
    fi
  fi
fi
[ -x "$reference" ] || die "no reference gradserve at $reference"

# ---- 2. one container --------------------------------------------------------------------------
read -r port metrics_port ref_port <<<"$(free_ports 3)"
cid=$(podman run -d --init --network host \
  -e GRADSERVE_PORT="$port" -e GRADSERVE_METRICS_PORT="$metrics_port" "$tag")
wait_healthy "$cid" 60
say "container ${cid:0:12} healthy on port $port"
"$python" -c '
import sys, urllib.request
body = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5).read().decode()
sys.exit(0 if "gradserve_" in body else "no gradserve_ metrics")' "$metrics_port" ||
  die "metrics endpoint on $metrics_port"

# ---- 3. the same requests, bit for bit -----------------------------------------------------------
"$reference" --listen "127.0.0.1:$ref_port" --shutdown-grace 1 >"$work/reference.log" 2>&1 &
ref_pid=$!
for _ in $(seq 100); do "$gradclient" --target "127.0.0.1:$ref_port" health >/dev/null 2>&1 && break; sleep 0.1; done
data="$top/tests/data/onnx"
compared=0
for model in mlp residual_mlp gpt_tied; do
  for precision in float64 float32; do
    dir="$work/$model.$precision"
    # The batch numpy writes for the e2e test of the same models (seeded, so the same each run).
    mapfile -t args < <("$python" "$top/tests/e2e/compute_onnx.py" write "$data/$model.json" \
      "$precision" "$dir")
    file="$data/$model.onnx"; dtype=(--dtype float32)
    [ "$precision" = float64 ] && { file="$data/$model.f64.onnx"; dtype=(); }
    for side in container reference; do
      p=$port; [ "$side" = reference ] && p=$ref_port
      "$gradclient" --target "127.0.0.1:$p" compute --onnx "$file" "${args[@]}" "${dtype[@]}" \
        --return-output --out "$dir/$side" >"$dir/$side.txt" ||
        { cat "$dir/$side.txt" >&2; die "$model $precision: compute against the $side failed"; }
    done
    diff -r "$dir/container" "$dir/reference" >/dev/null ||
      die "$model $precision: the image's answer differs from $reference's (diff -r $dir/container $dir/reference)"
    compared=$((compared + $(ls "$dir/container" | wc -l)))
  done
done
kill -TERM "$ref_pid"; wait "$ref_pid" || die "the reference server did not exit 0"; ref_pid=""
say "6 requests, $compared files (gradients, outputs, losses): byte-identical to $(basename "$(dirname "$(dirname "$reference")")")/server/gradserve"

# ---- 4. SIGTERM --------------------------------------------------------------------------------
podman stop -t 30 "$cid" >/dev/null
rc=$(podman inspect --format '{{.State.ExitCode}}' "$cid")
[ "$rc" = 0 ] || { podman logs "$cid" >&2; die "the container exited $rc after SIGTERM"; }
podman rm "$cid" >/dev/null; cid=""
say "SIGTERM: exit 0"

[ "$compose" -eq 1 ] || exit 0

# ---- 5. compose --------------------------------------------------------------------------------
command -v podman-compose >/dev/null || die "podman-compose missing (deploy/install-deps.sh test)"
read -r h_grpc h_metrics h_opt <<<"$(free_ports 3)"
export GRADSERVE_IMAGE="$tag" GRADSERVE_HOST_PORT="$h_grpc" GRADSERVE_METRICS_HOST_PORT="$h_metrics" \
  GRADSERVE_OPTIMIZER_HOST_PORT="$h_opt"
pc=(podman-compose -p "$project" -f "$compose_file")
t0=$SECONDS
"${pc[@]}" up -d --no-build >"$work/compose-up.log" 2>&1 ||
  { cat "$work/compose-up.log" >&2; die "podman-compose up"; }
for svc in gradserve-0 gradserve-1 gradserve-2 optimizer; do
  wait_healthy "${project}_${svc}_1" 60
done
say "compose: 4 containers healthy in $((SECONDS - t0)) s"

opt="${project}_optimizer_1"
# "run digits step 200 loss 0.41 grad_norm 1.2", every --log-every (50) steps.
losses() { podman logs "$opt" 2>&1 | sed -n 's/.*run digits step \([0-9]*\) loss \([0-9.eE+-]*\).*/\1 \2/p'; }
deadline=$((SECONDS + 180))
until [ "$(losses | awk '$1 >= 200' | wc -l)" -gt 0 ]; do
  [ $SECONDS -lt "$deadline" ] || { podman logs "$opt" >&2; die "the optimizer did not reach step 200 in 180 s"; }
  sleep 2
done
losses >"$work/losses"
read -r first_step first_loss <<<"$(head -1 "$work/losses")"
read -r last_step last_loss <<<"$(tail -1 "$work/losses")"
say "digits: loss $first_loss at step $first_step, $last_loss at step $last_step"
awk -v a="$first_loss" -v b="$last_loss" 'BEGIN { exit !(b < 0.8 * a) }' ||
  die "the loss did not fall by 20% between step $first_step and step $last_step"

# Each replica must have computed gradients: the batch is split in 3, one part each.
for i in 0 1 2; do
  podman exec "${project}_gradserve-${i}_1" gradclient stats >"$work/stats$i" 2>&1 ||
    { cat "$work/stats$i" >&2; die "gradclient stats in gradserve-$i"; }
  grep -Eq '^ComputeGradients: [1-9][0-9]* calls' "$work/stats$i" ||
    { cat "$work/stats$i" >&2; die "gradserve-$i computed nothing"; }
done

# SIGTERM to the optimizer: exit 0 with a checkpoint, and a restart resumes from it.
podman stop -t 30 "$opt" >/dev/null
rc=$(podman inspect --format '{{.State.ExitCode}}' "$opt")
[ "$rc" = 0 ] || { podman logs "$opt" >&2; die "the optimizer exited $rc after SIGTERM"; }
podman start "$opt" >/dev/null
deadline=$((SECONDS + 60))
until podman logs "$opt" 2>&1 | grep -q 'run digits: restored at step'; do
  [ $SECONDS -lt "$deadline" ] || { podman logs "$opt" >&2; die "the optimizer did not resume from its checkpoint"; }
  sleep 1
done
say "optimizer: SIGTERM exit 0, $(podman logs "$opt" 2>&1 | grep -o 'restored at step [0-9]*' | tail -1) after the restart"

"${pc[@]}" down -v -t 30 >"$work/compose-down.log" 2>&1 ||
  { cat "$work/compose-down.log" >&2; die "podman-compose down"; }
say "compose: up, trained and down in $((SECONDS - t0)) s"

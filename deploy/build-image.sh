#!/usr/bin/env bash
# Builds the gradserve container image (deploy/Dockerfile) with podman on a machine that has no
# Docker engine and no reachable registry, as on the project's build machines.
#
#   deploy/build-image.sh                  # builds gradserve:latest (localhost/gradserve:latest)
#   deploy/build-image.sh --tag NAME:TAG   # another tag
#   deploy/build-image.sh --jobs N         # parallel compile jobs in the build stage (default 2)
#   deploy/build-image.sh --cpu native     # -march=native binaries (GRADSERVE_CPU; default portable)
#   deploy/build-image.sh --bases-only     # only make sure the two base images exist
#
# What it does, each step skipped when already done (so it is safe to run again and again):
#   1. installs podman, runc, debootstrap and uidmap if missing (Debian packages);
#   2. writes a containers.conf with this machine's two workarounds (runc instead of crun, which
#      refuses the hybrid cgroup layout; ulimits at the hard limits, since root lacks
#      CAP_SYS_RESOURCE) and points CONTAINERS_CONF at it; nothing under /etc changes. An
#      already exported CONTAINERS_CONF is used as it is;
#   3. makes the base images docker.io/library/debian:bookworm and :bookworm-slim locally from a
#      debootstrap minbase root file system (or from localhost/fresh-debian:bookworm, made by
#      shared/tools/fresh-debian-run, when that exists), since no registry can be pulled from;
#   4. podman build --pull=never --format docker (the docker format keeps HEALTHCHECK) with host
#      networking (so apt-get in RUN reaches the mirror), the OCI version and revision labels
#      taken from CMakeLists.txt and git, and a compiler cache ($work/ccache, bind-mounted at
#      /ccache) so that a rebuild after a commit compiles only the files it changed; then removes
#      the image the tag pointed to before, if nothing else uses it.
# Needs root. Work files live in $GRADSERVE_IMAGE_WORK (default /var/tmp/gradserve-image).
set -euo pipefail

say() { printf 'build-image: %s\n' "$*" >&2; }
die() { say "$*"; exit 2; }

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
top=$(cd "$here/.." && pwd)
tag=gradserve:latest
jobs=2
cpu=portable
bases_only=0
while [ $# -gt 0 ]; do
  case "$1" in
    --tag) [ $# -ge 2 ] || die "--tag needs a value"; tag=$2; shift 2 ;;
    --jobs) [ $# -ge 2 ] || die "--jobs needs a value"; jobs=$2; shift 2 ;;
    --cpu) [ $# -ge 2 ] || die "--cpu needs a value"; cpu=$2; shift 2 ;;
    --bases-only) bases_only=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p}' "${BASH_SOURCE[0]}"; exit 0 ;;
    *) die "unknown argument $1 (try --help)" ;;
  esac
done
[ "$(id -u)" -eq 0 ] || die "needs root (podman storage, debootstrap)"

work=${GRADSERVE_IMAGE_WORK:-/var/tmp/gradserve-image}
mkdir -p "$work"
exec 9>"$work/lock"
flock 9   # two runs at once would race on the base images and the work folder

# 1. tools
if ! command -v podman >/dev/null || ! command -v runc >/dev/null || ! command -v debootstrap >/dev/null; then
  say "installing podman, runc, debootstrap, uidmap"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >/dev/null
  apt-get install -y -qq podman runc debootstrap uidmap >/dev/null
fi

# 2. containers.conf
if [ -z "${CONTAINERS_CONF:-}" ]; then
  nofile=$(ulimit -Hn); [ "$nofile" = unlimited ] && nofile=1048576
  nproc=$(cat /proc/sys/kernel/pid_max); hu=$(ulimit -Hu)
  if [ "$hu" != unlimited ] && [ "$nproc" -gt "$hu" ]; then nproc=$hu; fi
  cat >"$work/containers.conf.new" <<EOF
[containers]
default_ulimits = ["nofile=${nofile}:${nofile}", "nproc=${nproc}:${nproc}"]
[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
EOF
  mv "$work/containers.conf.new" "$work/containers.conf"
  export CONTAINERS_CONF="$work/containers.conf"
fi

# 3. base images
full=docker.io/library/debian:bookworm
slim=docker.io/library/debian:bookworm-slim
fresh=localhost/fresh-debian:bookworm
import_dir() {  # import_dir DIR IMAGE
  tar -C "$1" --numeric-owner -c . | podman import -q \
    --change 'CMD ["bash"]' \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    - "$2" >/dev/null
}
if ! podman image exists "$full" || ! podman image exists "$slim"; then
  root="$work/rootfs"
  rm -rf "$root"; mkdir -p "$root"
  trap 'rm -rf "$root"' EXIT
  if podman image exists "$fresh"; then
    say "making the base images from $fresh"
    cid=$(podman create -q "$fresh" true)
    podman export "$cid" | tar -C "$root" --numeric-owner -xf -
    podman rm -f "$cid" >/dev/null
  else
    # shellcheck disable=SC2016  # apt's own $(...) placeholders, not shell expansions
    targets=$(apt-get indextargets --format '$(REPO_URI) $(RELEASE)')
    mirror=$(awk '$2=="bookworm"{print $1; exit}' <<<"$targets")
    secmirror=$(awk '$2=="bookworm-security"{print $1; exit}' <<<"$targets")
    mirror=${mirror:-http://deb.debian.org/debian/}
    secmirror=${secmirror:-http://deb.debian.org/debian-security/}
    say "making the base images with debootstrap from $mirror (about 30 s)"
    debootstrap --variant=minbase bookworm "$root" "$mirror" >"$work/debootstrap.log" 2>&1 \
      || { tail -20 "$work/debootstrap.log" >&2; die "debootstrap failed (log: $work/debootstrap.log)"; }
    rm -f "$root/etc/apt/sources.list"
    cat >"$root/etc/apt/sources.list.d/debian.sources" <<EOF
Types: deb
URIs: $mirror
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: $secmirror
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    # the host's apt accepts a frozen mirror snapshot; the images' apt must too
    echo 'Acquire::Check-Valid-Until "false";' >"$root/etc/apt/apt.conf.d/99no-valid-until"
    chroot "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/*
    : >"$root/etc/resolv.conf"
  fi
  # What the official images add on top of minbase: no .deb cache, no translations.
  cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  echo 'Acquire::Languages "none";' >"$root/etc/apt/apt.conf.d/docker-no-languages"
  podman image exists "$full" || { import_dir "$root" "$full"; say "imported $full"; }
  if ! podman image exists "$slim"; then
    # -slim as upstream makes it: no documentation, manual pages or translations, now or later
    # (copyright files and locale.alias stay).
    cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
    find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
    find "$root/usr/share/doc" -mindepth 1 -type d -empty -delete
    rm -rf "$root"/usr/share/man/* "$root"/usr/share/groff/* "$root"/usr/share/info/* \
           "$root"/usr/share/lintian/* "$root"/usr/share/linda/*
    find "$root/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} +
    import_dir "$root" "$slim"
    say "imported $slim"
  fi
  rm -rf "$root"; trap - EXIT
fi
[ "$bases_only" -eq 1 ] && exit 0

# 4. the image
case "$cpu" in portable|native) ;; *) die "--cpu must be portable or native" ;; esac
version=$(sed -n 's/^project(gradserve VERSION \([0-9.]*\).*/\1/p' "$top/CMakeLists.txt")
revision=$(git -C "$top" rev-parse HEAD 2>/dev/null || echo unknown)
# A tree with uncommitted changes is not that revision: say so in the label.
if [ "$revision" != unknown ] && [ -n "$(git -C "$top" status --porcelain 2>/dev/null)" ]; then
  revision="$revision-dirty"
fi
old=$(podman image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)
say "building $tag ($cpu) from $top with deploy/Dockerfile ($jobs compile jobs)"
mkdir -p "$work/ccache"
podman build --pull=never --format docker --network host -v "$work/ccache:/ccache" \
  --build-arg BUILD_JOBS="$jobs" --build-arg GRADSERVE_CPU="$cpu" \
  --build-arg VERSION="${version:-0.0.0}" --build-arg REVISION="$revision" \
  -t "$tag" -f "$here/Dockerfile" "$top"
new=$(podman image inspect --format '{{.Id}}' "$tag")
# Only an image no tag names any more: `podman rmi ID` would also untag and delete an image that
# another tag (say gradserve:ci next to gradserve:latest) still points to.
if [ -n "$old" ] && [ "$old" != "$new" ] &&
   [ "$(podman image inspect --format '{{len .RepoTags}}' "$old" 2>/dev/null)" = 0 ]; then
  podman rmi "$old" >/dev/null 2>&1 || true   # kept when a container uses it
fi
say "built $tag: image ${new:0:12}, $(podman image inspect --format '{{.Size}}' "$tag" | numfmt --to=iec-i --suffix=B)"

#!/usr/bin/env bash
# Build the dbmtls container image: IMAGE:<version> and IMAGE:latest (IMAGE defaults to dbmtls).
#
#   scripts/image.sh                     # or: make image
#   scripts/image.sh --image registry.example/dbmtls --base debian:bookworm-slim
#   BASE=... IMAGE=... scripts/image.sh  # the same, from the environment
#   WHEELHOUSE=0 scripts/image.sh        # no wheelhouse: pip runs inside the build (needs network)
#   scripts/image.sh --source-hash       # print the hash of what goes into the image, build nothing
#
# Other knobs (environment): NETWORK (none|host: the build's network, default: none when nothing
# in the build needs one), PY_VERSION (the image's Python, default: asked from the base, else
# 3.11), MIRROR and SECURITY_MIRROR (Debian mirrors for the debootstrapped base; SECURITY_MIRROR=""
# skips the security updates), PYTHON (the host Python whose pip fills the wheelhouse).
#
# Why it works this way: the build itself must need no registry and no CA.  Machines behind an
# egress proxy that re-signs TLS have the proxy's CA in the host bundle only, so pip inside a
# build fails with a certificate error, and a machine without a container registry cannot pull
# debian:bookworm-slim.  So the host does the fetching (pip with the host's configuration and
# CA, debootstrap over Debian's plain-http mirror with apt's signatures) and the build runs
# with --network none.  Everyone else gets the same image from the ordinary path.
set -euo pipefail
cd "$(dirname "$0")/.."

IMAGE=${IMAGE:-dbmtls}
BASE=${BASE:-}
NETWORK=${NETWORK:-}
WHEELHOUSE=${WHEELHOUSE:-1}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR-http://deb.debian.org/debian-security}
LOCAL_BASE=dbmtls-base:bookworm   # what debootstrap makes, cached in the daemon's image store
WHEELS=build/wheelhouse           # inside the build context (.dockerignore lets it through)

usage() { sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; }
say() { printf 'image: %s\n' "$*"; }
die() { printf 'image: error: %s\n' "$*" >&2; exit 1; }

# What goes into the image: the files the build context lets through, the Dockerfile and this
# script (which makes the base and the wheelhouse).  The tests compare it with the image's
# io.dbmtls.source-hash label to skip a rebuild when nothing changed.
source_hash() {
  find Dockerfile .dockerignore pyproject.toml setup.py README.md scripts/image.sh src -type f \
      ! -path '*/__pycache__/*' ! -name '*.pyc' ! -path 'src/*.egg-info/*' -print0 \
    | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1
}

while [ $# -gt 0 ]; do
  case "$1" in
    --image) IMAGE=${2:?--image needs a name}; shift 2 ;;
    --base) BASE=${2:?--base needs an image}; shift 2 ;;
    --source-hash) source_hash; exit 0 ;;
    -h|--help) usage; exit 0 ;;
    *) usage >&2; die "unknown argument: $1" ;;
  esac
done

VERSION=$(sed -n 's/^__version__ = "\(.*\)"$/\1/p' src/dbmtls/__init__.py)
[ -n "$VERSION" ] || die "no __version__ in src/dbmtls/__init__.py"
command -v docker >/dev/null || die "docker is not installed (scripts/setup.sh installs docker.io as root)"
docker info >/dev/null 2>&1 || die "the Docker daemon does not answer (start it: dockerd --iptables=false --bridge=none &)"

# One build at a time on this machine: two would both debootstrap, and share build/wheelhouse.
exec 9>"${TMPDIR:-/tmp}/dbmtls-image.lock"
flock 9

start=$SECONDS
has_image() { docker image inspect "$1" >/dev/null 2>&1; }

# --- 1. the base ---------------------------------------------------------------------------
# debian:bookworm-slim when the daemon already has it (or when asked for); otherwise a base made
# here from Debian's mirror, with python3 and python3-venv already in it so that the build's
# apt step is skipped.  It is made once and kept: delete the image to refresh it.
make_base() {
  [ "$(id -u)" = 0 ] || die "making $LOCAL_BASE needs root (debootstrap); or pass --base with an image you have"
  command -v debootstrap >/dev/null || die "debootstrap is not installed (scripts/setup.sh installs it as root)"
  local dir t0=$SECONDS
  dir=$(mktemp -d "${TMPDIR:-/var/tmp}/dbmtls-rootfs.XXXXXX")
  # shellcheck disable=SC2064  # expand $dir now: it is local
  trap "rm -rf '$dir'" EXIT
  say "no local base image: debootstrapping Debian bookworm from $MIRROR (once; cached as $LOCAL_BASE)"
  # minbase: dpkg, apt and the essential packages only; python3 is bookworm's 3.11, the
  # version the wheelhouse is for; ca-certificates is the system trust store.
  debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
    bookworm "$dir" "$MIRROR" > "$dir.log" 2>&1 \
    || { tail -n 30 "$dir.log" >&2; rm -f "$dir.log"; die "debootstrap failed"; }
  rm -f "$dir.log"
  if [ -n "$SECURITY_MIRROR" ]; then
    # debootstrap installs the release as it was at the point release; security fixes since
    # then live in bookworm-security, which debian:bookworm-slim has as well.
    cat > "$dir/etc/apt/sources.list" <<EOF
deb $MIRROR bookworm main
deb $MIRROR bookworm-updates main
deb $SECURITY_MIRROR bookworm-security main
EOF
    if chroot "$dir" sh -c 'export DEBIAN_FRONTEND=noninteractive; apt-get -qq update && apt-get -qq -y upgrade' > "$dir.log" 2>&1; then
      say "base: security and stable updates applied"
    else
      tail -n 20 "$dir.log" >&2
      say "WARNING: could not apply updates from $SECURITY_MIRROR; the base has the point release's packages"
    fi
    rm -f "$dir.log"
  fi
  # Trim what no container reads, as debian:*-slim does: package lists and caches (apt-get
  # update fetches them again), documentation except the copyright files, man pages, locales,
  # logs.  The dpkg filter keeps packages installed later just as lean.
  rm -rf "$dir"/var/lib/apt/lists/* "$dir"/var/cache/apt/* "$dir"/var/cache/debconf/*-old \
         "$dir"/var/log/* "$dir"/usr/share/man/* "$dir"/usr/share/info/* "$dir"/usr/share/lintian \
         "$dir"/usr/share/linda "$dir"/var/lib/dpkg/*-old
  find "$dir/usr/share/doc" -mindepth 1 ! -type d ! -name copyright -delete
  find "$dir/usr/share/doc" -mindepth 1 -type d -empty -delete
  find "$dir/usr/share/locale" -mindepth 1 -maxdepth 1 ! -name locale.alias -exec rm -rf {} +
  cat > "$dir/etc/dpkg/dpkg.cfg.d/docker-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
path-exclude /usr/share/lintian/*
EOF
  # The host's identity must not leak into the image; the runtime provides these files.
  : > "$dir/etc/hostname"; : > "$dir/etc/resolv.conf"; : > "$dir/etc/machine-id"
  tar -C "$dir" --numeric-owner -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'CMD ["bash"]' \
    --change "LABEL org.opencontainers.image.description=\"Debian bookworm minbase + python3 (debootstrap from $MIRROR)\"" \
    --message "debootstrap --variant=minbase bookworm $MIRROR" - "$LOCAL_BASE" >/dev/null
  rm -rf "$dir"
  trap - EXIT
  say "base: made $LOCAL_BASE in $((SECONDS - t0))s ($(docker image inspect -f '{{.Size}}' "$LOCAL_BASE" | numfmt --to=iec) uncompressed)"
}

if [ -z "$BASE" ]; then
  if has_image debian:bookworm-slim; then
    BASE=debian:bookworm-slim
  else
    has_image "$LOCAL_BASE" || make_base
    BASE=$LOCAL_BASE
  fi
fi
say "base: $BASE"

# What the base already has decides the Python version to fetch wheels for and whether the
# build needs a network (for apt).  A base the daemon does not have yet is pulled by the build.
base_python=""
if has_image "$BASE"; then
  # the version only when nothing is missing: python3, its venv module and the CA bundle
  base_python=$(docker run --rm --network none --entrypoint sh "$BASE" -c \
    'test -s /etc/ssl/certs/ca-certificates.crt \
     && python3 -c "import ensurepip, sys; print(\"%d.%d\" % sys.version_info[:2])"' 2>/dev/null || true)
fi
PY_VERSION=${PY_VERSION:-${base_python:-3.11}}

# --- 2. the wheelhouse -----------------------------------------------------------------------
# Filled here, with the host's pip configuration and CA bundle, so that the build needs neither.
# dbmtls is built into a wheel from a copy of the sources (an in-tree setuptools build leaves
# build/lib behind, which can carry deleted modules into the next wheel); its dependencies are
# then downloaded from that wheel's own metadata, so pyproject.toml stays the one list of them.
rm -rf "$WHEELS"
mkdir -p "$WHEELS"
if [ "$WHEELHOUSE" != 0 ]; then
  t0=$SECONDS
  if [ -z "${PYTHON:-}" ]; then
    if [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
  fi
  case "$(uname -m)" in
    x86_64|amd64) arch=x86_64 ;;
    aarch64|arm64) arch=aarch64 ;;
    *) die "no manylinux wheels for $(uname -m): use WHEELHOUSE=0 (pip inside the build)" ;;
  esac
  # pip does not widen manylinux_2_X tags by itself: list every glibc up to bookworm's 2.36.
  # linux_$arch: dbmtls's own wheel (its C extension, compiled here; PyPI never has such wheels)
  platforms=(--platform "linux_$arch" --platform "manylinux2014_$arch")
  for minor in $(seq 17 36); do platforms+=(--platform "manylinux_2_${minor}_$arch"); done
  src=$(mktemp -d "${TMPDIR:-/tmp}/dbmtls-src.XXXXXX")
  cp -r pyproject.toml setup.py README.md src "$src/"
  rm -rf "$src"/src/*.egg-info "$src"/src/dbmtls/*.so
  # (the build backend's chatter goes to build/wheel.log, shown when it fails)
  "$PYTHON" -m pip wheel -q --no-deps --wheel-dir "$WHEELS" "$src" > build/wheel.log 2>&1 \
    || { tail -n 30 build/wheel.log >&2; rm -rf "$src"; die "building the dbmtls wheel failed (build/wheel.log)"; }
  rm -rf "$src"
  # [webhook]: the same image runs the sidecar and `dbmtls webhook` (jsonpatch, lightkube)
  wheel=$(ls "$WHEELS"/dbmtls-"$VERSION"-*.whl)
  "$PYTHON" -m pip download -q --dest "$WHEELS" --only-binary=:all: --implementation cp \
    --python-version "$PY_VERSION" "${platforms[@]}" "$wheel[webhook]" \
    2> >(grep -v '^WARNING: Location' >&2) \
    || die "downloading the dependencies for Python $PY_VERSION ($arch) failed; WHEELHOUSE=0 lets pip run inside the build"
  say "wheelhouse: $(find "$WHEELS" -name '*.whl' | wc -l) wheels for cp${PY_VERSION/./} $arch in $((SECONDS - t0))s"
else
  say "wheelhouse: off (pip inside the build fetches from its index)"
fi

# --- 3. the build ----------------------------------------------------------------------------
# No network when the base has python3 and the wheelhouse has everything; otherwise the host's
# network (the daemon runs with --bridge=none here, so a build step has no other).
if [ -z "$NETWORK" ]; then
  if [ -n "$base_python" ] && [ "$WHEELHOUSE" != 0 ]; then NETWORK=none; else NETWORK=host; fi
fi
revision=$(git rev-parse --short=12 HEAD 2>/dev/null || echo unknown)
hash=$(source_hash)
say "building $IMAGE:$VERSION (network: $NETWORK, python $PY_VERSION)"
previous=$(docker image inspect -f '{{.Id}}' "$IMAGE:$VERSION" 2>/dev/null || true)
t0=$SECONDS
# The classic builder: this daemon (20.10) with no buildx plugin has no BuildKit to offer.
# The step output goes to build/image.log and is shown only when the build fails.
DOCKER_BUILDKIT=0 docker build --force-rm --network "$NETWORK" \
  --build-arg BASE="$BASE" \
  --build-arg VERSION="$VERSION" \
  --build-arg REVISION="$revision" \
  --build-arg SOURCE_HASH="$hash" \
  -t "$IMAGE:$VERSION" -t "$IMAGE:latest" . > build/image.log 2>&1 \
  || {
    tail -n 40 build/image.log >&2
    if grep -q CERTIFICATE_VERIFY_FAILED build/image.log; then
      say "hint: pip inside the build does not trust this network's TLS (a proxy's CA is in the host's" \
          "bundle only): let the host fill the wheelhouse (WHEELHOUSE=1, the default)"
    fi
    die "docker build failed (whole output: build/image.log)"
  }
# The image store must not grow with every rebuild (CI builds on each change of the sources):
# drop the image this build replaced, unless something still uses or names it, and the build
# stages (labelled in the Dockerfile; the next build redoes the venv step, about 10 s).
if [ -n "$previous" ] && [ "$previous" != "$(docker image inspect -f '{{.Id}}' "$IMAGE:$VERSION")" ] \
   && [ "$(docker image inspect -f '{{len .RepoTags}}' "$previous" 2>/dev/null)" = 0 ]; then
  docker rmi "$previous" >/dev/null 2>&1 || true
fi
docker image prune -f --filter label=io.dbmtls.stage=build >/dev/null
size=$(docker image inspect -f '{{.Size}}' "$IMAGE:$VERSION")
say "built $IMAGE:$VERSION and $IMAGE:latest in $((SECONDS - t0))s (total $((SECONDS - start))s): $(numfmt --to=iec "$size") ($size bytes) uncompressed"

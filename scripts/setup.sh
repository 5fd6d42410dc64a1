#!/usr/bin/env bash
# Set up a fresh Debian/Ubuntu machine for dbmtls: OS packages the tests and the
# demo use (installed with apt when missing and we are root), and a virtualenv
# with dbmtls and its test dependencies.  Safe to run again: it only adds what is missing.
#   scripts/setup.sh          # runtime + tests + demo
#   scripts/setup.sh bench    # also the proxies the benchmark compares against, and its charts' matplotlib
set -euo pipefail
cd "$(dirname "$0")/.."

# gcc and libssl-dev: pip compiles dbmtls._native, the native data plane (docs/native.md)
want=(redis-server redis-tools postgresql postgresql-client mariadb-server mariadb-client dnsmasq-base gcc libssl-dev)
if [ "${1:-}" = "bench" ]; then
  # linux-perf: bench/percall.py (perf stat)
  want+=(stunnel4 haproxy nginx-light libnginx-mod-stream pgbouncer linux-perf)
fi

missing=()
for p in "${want[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "setup: installing OS packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup: missing OS packages (install them as root): ${missing[*]}" >&2
    exit 1
  fi
fi

# Docker and debootstrap: the image tests build the container image (scripts/image.sh) and run
# it. Checked by command, not package, so a docker-ce installation counts; only root installs
# them, and without them those tests are skipped with the reason. The test is for the daemon,
# dockerd: some machines carry a lone docker client (in /usr/local/bin) that has no daemon to
# talk to.
have() { command -v "$1" >/dev/null || [ -x "/usr/sbin/$1" ]; }
if ! have dockerd || ! have docker || ! have debootstrap; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    extra=()
    { have dockerd && have docker; } || extra+=(docker.io)
    have debootstrap || extra+=(debootstrap)
    echo "setup: installing OS packages: ${extra[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # Keep apt from starting dockerd with its default bridge and iptables rules, which a
    # container or a locked-down host may refuse (and a failed start fails the install): the
    # tests start the daemon themselves, without either (tests/support/docker.py).
    policy=/usr/sbin/policy-rc.d
    if [ ! -e "$policy" ]; then
      printf '#!/bin/sh\nexit 101\n' > "$policy"
      chmod +x "$policy"
      trap 'rm -f "$policy"' EXIT
    fi
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${extra[@]}" >/dev/null
    if [ "$(trap -p EXIT)" ]; then rm -f "$policy"; trap - EXIT; fi
  else
    echo "setup: docker or debootstrap missing: the container image tests will be skipped" >&2
  fi
fi

# PostgreSQL's binaries live outside PATH on Debian; the tests find them there.
if ! command -v initdb >/dev/null && ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
  echo "setup: initdb not found after installing postgresql" >&2
  exit 1
fi

PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
extras=test
# bench: matplotlib for bench/charts.py (the test extra has it too: a unit test draws the charts)
if [ "${1:-}" = "bench" ]; then extras=test,bench; fi
.venv/bin/python -m pip install -q -e ".[$extras]"
# The extension is optional for pip (a platform without a compiler still gets dbmtls, on the
# Python data plane); here it must have been built, or the native tests would be skipped.
if ! .venv/bin/python -c 'import dbmtls._native' 2>/dev/null; then
  echo "setup: dbmtls._native was not built (see: .venv/bin/python -m pip install -v -e .)" >&2
  exit 1
fi
echo "setup: done ($(.venv/bin/dbmtls version))"

# The dbmtls container image.  scripts/image.sh (make image) builds it; docs/kubernetes.md
# ("The image") says how and why.  Three stages on one base:
#
#   base     Debian's python3 (3.11 on bookworm) and the CA bundle
#   build    a venv at /opt/dbmtls with dbmtls and its dependencies, byte-compiled
#   runtime  base + that venv, nothing else: no compiler, no pip, non-root, read-only friendly
#
# BASE defaults to debian:bookworm-slim for everyone with a registry.  scripts/image.sh passes a
# base it debootstrapped from Debian's mirror instead when no registry can be reached.
ARG BASE=debian:bookworm-slim

FROM ${BASE} AS base
# apt only when the base lacks something: the debootstrapped base has it all already, and a
# build with --network none (the air-gapped path) could not run apt anyway.  The CA bundle is
# the system trust store dbmtls uses when a database sets no caCertificates.
RUN set -eu; \
    missing=""; \
    command -v python3 >/dev/null 2>&1 || missing="python3"; \
    [ -s /etc/ssl/certs/ca-certificates.crt ] || missing="$missing ca-certificates"; \
    if [ -n "$missing" ]; then \
      export DEBIAN_FRONTEND=noninteractive; \
      apt-get update; \
      apt-get install -y --no-install-recommends $missing; \
      apt-get clean; \
      rm -rf /var/lib/apt/lists/*; \
    fi; \
    # a name for uid/gid 65532 (the distroless "nonroot" convention), so tools that look the
    # user up (ps, id, Python's getpass) find one; it has no home and no login shell
    grep -q '^nonroot:' /etc/group || echo 'nonroot:x:65532:' >> /etc/group; \
    grep -q '^nonroot:' /etc/passwd || echo 'nonroot:x:65532:65532:nonroot:/nonexistent:/usr/sbin/nologin' >> /etc/passwd

FROM base AS build
# scripts/image.sh prunes this stage's images once a build is done (they pile up otherwise)
LABEL io.dbmtls.stage=build
# the venv module and its bundled pip, needed here only (the runtime stage never gets them)
RUN set -eu; \
    if ! python3 -c 'import ensurepip, venv' 2>/dev/null; then \
      export DEBIAN_FRONTEND=noninteractive; \
      apt-get update; \
      apt-get install -y --no-install-recommends python3-venv; \
      rm -rf /var/lib/apt/lists/*; \
    fi
# .dockerignore lets only pyproject.toml, setup.py, README.md, src/ and build/wheelhouse/ through.
COPY . /src
# Without a wheelhouse pip compiles dbmtls._native (the native data plane, docs/native.md) here:
# a C compiler and the OpenSSL 3 and Python headers, in this stage only (the runtime stage gets
# the venv, which links the base's libssl3).  The wheelhouse's dbmtls wheel was compiled on the host.
RUN set -eu; \
    if ! ls /src/build/wheelhouse/*.whl >/dev/null 2>&1; then \
      export DEBIAN_FRONTEND=noninteractive; \
      apt-get update; \
      apt-get install -y --no-install-recommends gcc libc6-dev libssl-dev python3-dev; \
      rm -rf /var/lib/apt/lists/*; \
    fi
# The wheelhouse (filled on the host by scripts/image.sh) makes this step need no network and
# no CA bundle: pip is told not to look anywhere else.  Without it, pip fetches from PyPI as
# usual (the ordinary path; it needs network, and the registry's CA if a proxy re-signs TLS).
# pip and setuptools leave the venv afterwards: nothing installs anything at run time.
# compileall: the read-only root filesystem means Python can never write a .pyc at run time,
# so every module is compiled here; unchecked-hash .pycs stay valid whatever the files' mtimes.
RUN set -eu; \
    python3 -m venv /opt/dbmtls; \
    if ls /src/build/wheelhouse/*.whl >/dev/null 2>&1; then \
      /opt/dbmtls/bin/pip install --no-cache-dir --no-index --find-links /src/build/wheelhouse 'dbmtls[webhook]'; \
    else \
      /opt/dbmtls/bin/pip install --no-cache-dir '/src[webhook]'; \
    fi; \
    /opt/dbmtls/bin/pip uninstall -y -q pip setuptools; \
    /opt/dbmtls/bin/python -m compileall -q -f -j 0 --invalidation-mode unchecked-hash /opt/dbmtls/lib; \
    /opt/dbmtls/bin/dbmtls version; \
    /opt/dbmtls/bin/python -c 'import jsonpatch, lightkube, dbmtls._native'

FROM base AS runtime
COPY --from=build /opt/dbmtls /opt/dbmtls
# PYTHONDONTWRITEBYTECODE: never try to write .pycs (the root filesystem is read-only in a pod).
# PYTHONUNBUFFERED: `check --json` output and logs reach `kubectl logs` as they are written.
ENV PATH=/opt/dbmtls/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Numeric, so the kubelet can verify runAsNonRoot without a passwd lookup.
USER 65532:65532
WORKDIR /
# admin.publicListen (GET /healthz /readyz /metrics) for kubelet probes and Prometheus
EXPOSE 15021
# Exec form: dbmtls is PID 1 and gets SIGTERM itself (the graceful drain); no shell runs.
ENTRYPOINT ["dbmtls"]
CMD ["run", "-c", "/etc/dbmtls/config/dbmtls.yaml"]

# Last, so a new commit only changes this metadata layer.
ARG VERSION=dev
ARG REVISION=unknown
ARG SOURCE_HASH=
ARG BASE
LABEL org.opencontainers.image.title="dbmtls" \
      org.opencontainers.image.description="Database-aware mTLS sidecar: plaintext on localhost, verified mutual TLS to the database" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="${BASE}" \
      io.dbmtls.source-hash="${SOURCE_HASH}"

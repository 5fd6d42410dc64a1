"""``dbmtls webhook``: the mutating admission webhook that injects the sidecar into Pods.

The API server POSTs an ``admission.k8s.io/v1`` AdmissionReview to ``/inject`` for every
Pod CREATE the webhook configuration selects.  The answer is the difference, as a JSONPatch,
between the Pod it sent and what ``dbmtls.k8s.inject.inject_object`` makes of it: the same
pure function as ``dbmtls inject``, so what the webhook does is what the CLI prints.  A Pod
the function leaves alone (not opted in, or already injected: ``dbmtls.io/status``, which
makes reinvocation harmless) gets ``allowed: true`` and no patch; a Pod that asks for the
sidecar but cannot get one (``InjectError``) is refused with the function's message.

Endpoints, all on one HTTPS port:

=============================  ======  ======================================================
``/inject``                    POST    AdmissionReview in, AdmissionReview out
``/inject/namespace-default``  POST    the same for the entry of namespaces labelled
                                       ``dbmtls.io/inject=enabled``: inject unless opted out
                                       (``InjectOptions.namespace_default``; also
                                       ``/inject?namespaceDefault=true``)
``/healthz``                   GET     200 while the process runs
``/readyz``                    GET     200 once the serving certificate is loaded (and not
                                       expired) and, when watching, the first DestinationRule
                                       list is in
``/metrics``                   GET     Prometheus text format, ``dbmtls_webhook_*``
=============================  ======  ======================================================

Why a path for the namespace entry and not only the query: a MutatingWebhookConfiguration
cannot send one.  ``clientConfig.url`` forbids query parameters and the API server validates
each segment of ``clientConfig.service.path`` as a DNS-1123 subdomain (lower case, digits,
``-`` and ``.``), so ``/inject?namespaceDefault=true`` is refused when the configuration is
created, while ``/inject/namespace-default`` is accepted.

HTTP/1.1 is parsed by h11, as in the admin server (``dbmtls.admin.server``), on asyncio
streams over TLS.  Connections are kept alive between AdmissionReviews (the API server reuses
them; a TLS handshake per Pod would cost more than the injection) for at most
``IDLE_TIMEOUT``, longer than the 90 s after which Go's HTTP client drops an idle connection,
so that the client, not the server, closes idle connections: a POST on a connection the
server closed at the same moment would fail.  A request must arrive whole within
``READ_TIMEOUT`` of its first byte, its head within ``MAX_HEAD`` bytes and its body within
``MAX_BODY`` (3 MiB: the API server's own limit on a request, so no real Pod is larger).
Anything else gets a plain HTTP error (400, 404, 405, 413, 415) and the connection is closed.

The serving certificate is polled every ``CERT_POLL_INTERVAL`` by the files' ``stat``
(device, inode, size, mtime, through symlinks: a Kubernetes Secret update swaps the
``..data`` symlink, which changes the inode), loaded into a new SSLContext off the event loop
(``load_cert_chain`` checks that the key matches the certificate) and swapped in: new
handshakes use it, open connections keep theirs.  A broken or expired pair keeps the old one,
logs once per change of the files and counts a failure.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import copy
import dataclasses
import datetime as dt
import http
import json
import logging
import os
import signal
import ssl
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import h11
import yaml
from cryptography import x509
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dbmtls.config.model import split_host_port
from dbmtls.k8s.inject import InjectError, InjectOptions, inject_object
from dbmtls.logs import LOG
from dbmtls.tls.context import EncryptedKey, no_passphrase

MAX_HEAD = 16 * 1024
# The API server refuses requests over 3 MiB (its etcd object limit is 1.5 MiB), so no Pod it
# sends us is larger; a bound keeps one client from making us buffer more.
MAX_BODY = 3 * 1024 * 1024
READ_TIMEOUT = 10.0
IDLE_TIMEOUT = 120.0
WRITE_TIMEOUT = 10.0
HANDSHAKE_TIMEOUT = 10.0
MAX_CONNECTIONS = 256
CERT_POLL_INTERVAL = 1.0
# SIGTERM: requests already being read or answered get this long to finish.
SHUTDOWN_GRACE = 5.0
_READ_CHUNK = 64 * 1024
ADMISSION_API = "admission.k8s.io/v1"
DR_GROUP = "networking.istio.io"

Inject = Callable[..., Any]  # the signature of dbmtls.k8s.inject.inject_object


# --- the AdmissionReview, without HTTP ---------------------------------------------------------


class BadReview(ValueError):
    """A body that is not an AdmissionReview this webhook can answer (HTTP 400, no review)."""


@dataclass(frozen=True)
class Verdict:
    """The AdmissionReview to send back, and what happened, for the log and the metrics."""

    review: dict[str, Any]
    result: str  # injected | unchanged | skipped | denied | invalid | error
    message: str = ""
    patch_ops: int = 0


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {"status": "Failure", "code": code, "reason": reason, "message": message}


def _answer(uid: str, response: Mapping[str, Any]) -> dict[str, Any]:
    return {"apiVersion": ADMISSION_API, "kind": "AdmissionReview", "response": {"uid": uid, **response}}


def parse_review(body: bytes) -> dict[str, Any]:
    """The ``request`` of an admission.k8s.io/v1 AdmissionReview with a ``uid``; else ``BadReview``."""
    try:
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadReview(f"the body is not JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("kind") != "AdmissionReview":
        raise BadReview("the body is not an AdmissionReview (kind)")
    if doc.get("apiVersion") != ADMISSION_API:
        # admissionReviewVersions: ["v1"] in the webhook configuration: v1beta1 is never sent
        raise BadReview(f"AdmissionReview apiVersion must be {ADMISSION_API}, got {doc.get('apiVersion')!r}")
    request = doc.get("request")
    if not isinstance(request, dict):
        raise BadReview("the AdmissionReview has no request")
    uid = request.get("uid")
    if not isinstance(uid, str) or not uid:
        raise BadReview("the AdmissionReview request has no uid")
    return request


def _pod_label(pod: object, namespace: object) -> str:
    """``namespace/name`` for the log, ``name`` being ``generateName*`` before the API server picks one."""
    meta = pod.get("metadata") if isinstance(pod, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    name = meta.get("name") or (f"{meta['generateName']}*" if meta.get("generateName") else "?")
    return f"{namespace}/{name}" if namespace else str(name)


def review(
    request: Mapping[str, Any],
    mesh: Sequence[dict[str, Any]],
    options: InjectOptions,
    *,
    inject: Inject = inject_object,
) -> Verdict:
    """Answer one AdmissionReview ``request`` (from ``parse_review``): the webhook's whole decision."""
    import jsonpatch  # the webhook extra; checked at startup (``require_extras``)

    uid = str(request["uid"])
    kind = request.get("kind")
    kind = kind if isinstance(kind, dict) else {}
    if (
        request.get("operation") != "CREATE"
        or kind.get("kind") != "Pod"
        or kind.get("group", "") != ""
        or request.get("subResource")
    ):
        # The webhook configuration asks for pods CREATE only; anything else (a broader rule
        # written by hand, an ephemeral container, a binding) passes untouched.
        return Verdict(_answer(uid, {"allowed": True}), "skipped")
    pod = request.get("object")
    namespace = request.get("namespace") or None
    if not isinstance(pod, dict):
        msg = "the AdmissionReview request has no Pod object"
        return Verdict(_answer(uid, {"allowed": False, "status": _status(400, "BadRequest", msg)}), "invalid", msg)
    if namespace is not None and not isinstance(namespace, str):
        msg = "the AdmissionReview request namespace is not a string"
        return Verdict(_answer(uid, {"allowed": False, "status": _status(400, "BadRequest", msg)}), "invalid", msg)
    try:
        # a copy: the Pod must stay as received to diff against, whatever the function does with it
        injected = inject(copy.deepcopy(pod), mesh, options, namespace=namespace)
        ops = jsonpatch.make_patch(pod, injected).patch
    except InjectError as exc:
        # 422 Invalid, as the API server's own validation answers: the Pod as written cannot
        # get what it asks for; the message names the object and the field to fix.
        status = _status(422, "Invalid", exc.message)
        return Verdict(_answer(uid, {"allowed": False, "status": status}), "denied", exc.message)
    except Exception as exc:  # a bug in the injector must not take the webhook down
        LOG.exception("injector failed", extra={"fields": {"uid": uid, "pod": _pod_label(pod, namespace)}})
        msg = f"dbmtls webhook internal error: {type(exc).__name__}: {exc}"
        return Verdict(_answer(uid, {"allowed": False, "status": _status(500, "InternalError", msg)}), "error", msg)
    if not ops:
        return Verdict(_answer(uid, {"allowed": True}), "unchanged")
    patch = base64.b64encode(json.dumps(ops, separators=(",", ":")).encode()).decode("ascii")
    response = {"allowed": True, "patchType": "JSONPatch", "patch": patch}
    return Verdict(_answer(uid, response), "injected", patch_ops=len(ops))


def decode_patch(review: Mapping[str, Any]) -> list[dict[str, Any]] | None:
    """The JSONPatch operations of an AdmissionReview response (None: no patch). For tests and tools."""
    response = review.get("response") or {}
    if "patch" not in response:
        return None
    try:
        ops = json.loads(base64.b64decode(response["patch"], validate=True))
    except (binascii.Error, json.JSONDecodeError) as exc:
        raise ValueError(f"the patch is not base64 JSON: {exc}") from None
    if not isinstance(ops, list):
        raise ValueError("the patch is not a JSONPatch list")
    return ops


# --- the DestinationRules the injector sees ------------------------------------------------------


class Background(Protocol):
    """Something that runs beside the server (the DestinationRule watcher)."""

    def start(self) -> None: ...

    async def stop(self) -> None: ...


class RuleSource(Protocol):
    """Rules that change while the webhook runs (``dbmtls.k8s.watch.DestinationRuleWatcher``)."""

    def snapshot(self) -> tuple[dict[str, Any], ...]: ...

    @property
    def synced(self) -> bool:
        """The first list is complete (before that the webhook is not ready)."""
        ...

    @property
    def problem(self) -> str | None:
        """Why the rules may be stale or missing, if they may be."""
        ...


def _is_destination_rule(doc: object) -> bool:
    return (
        isinstance(doc, dict)
        and doc.get("kind") == "DestinationRule"
        and str(doc.get("apiVersion", "")).startswith(f"{DR_GROUP}/")
    )


def load_rule_files(paths: Iterable[str]) -> list[dict[str, Any]]:
    """The DestinationRules in multi-document YAML files (``kind: List`` expanded); other kinds ignored.

    Raises ``ValueError`` naming the file for an unreadable file or invalid YAML.
    """
    rules: list[dict[str, Any]] = []
    for path in paths:
        try:
            docs = list(yaml.safe_load_all(Path(path).read_text(encoding="utf-8")))
        except OSError as exc:
            raise ValueError(f"{path}: cannot read: {exc.strerror or exc}") from None
        except UnicodeDecodeError:
            raise ValueError(f"{path}: not UTF-8 text") from None
        except yaml.YAMLError as exc:
            raise ValueError(f"{path}: invalid YAML: {exc}") from None
        for doc in docs:
            items = doc.get("items") if isinstance(doc, dict) and doc.get("kind") == "List" else [doc]
            rules.extend(d for d in items or () if _is_destination_rule(d))
    return rules


class Mesh:
    """The rules from ``-f`` files, then those a watcher keeps (one snapshot per request)."""

    def __init__(self, static: Sequence[dict[str, Any]] = (), source: RuleSource | None = None) -> None:
        self.static = tuple(static)
        self.source = source

    def rules(self) -> tuple[dict[str, Any], ...]:
        return self.static + (self.source.snapshot() if self.source is not None else ())

    def readiness(self) -> list[str]:
        if self.source is None or self.source.synced:
            return []
        return [f"DestinationRules not listed yet: {self.source.problem or 'listing'}"]


# --- the serving certificate --------------------------------------------------------------------


class CertificateError(Exception):
    """A serving certificate/key pair that cannot be used; the message says which and why."""


@dataclass(frozen=True)
class LoadedCert:
    context: ssl.SSLContext
    serial: int
    subject: str
    not_after: dt.datetime


def _file_signature(paths: Sequence[str]) -> tuple[object, ...]:
    """What changes when a file is replaced or rewritten, read without opening it (cheap every second)."""
    out: list[object] = []
    for p in paths:
        try:
            st = os.stat(p)  # through symlinks: the ..data swap gives the file a new inode
        except OSError as exc:
            out.append(("error", exc.errno))
        else:
            out.append((st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
    return tuple(out)


def server_context(cert_file: str, key_file: str) -> LoadedCert:
    """A TLS 1.2+ server context for the pair, checked; ``CertificateError`` if unusable."""
    try:
        with open(cert_file, "rb") as f:
            leaf = x509.load_pem_x509_certificate(f.read())
    except OSError as exc:
        raise CertificateError(f"{cert_file}: cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise CertificateError(f"{cert_file}: not a PEM certificate: {exc}") from None
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    # The API server's Go client offers h2 and http/1.1; this server speaks the latter only.
    ctx.set_alpn_protocols(["http/1.1"])
    try:
        ctx.load_cert_chain(cert_file, key_file, password=no_passphrase)
    except EncryptedKey:
        raise CertificateError(f"{key_file}: the key is encrypted with a passphrase; it must be unencrypted") from None
    except OSError as exc:  # ssl.SSLError is an OSError: key does not match, not PEM, unreadable
        reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
        raise CertificateError(f"{cert_file} / {key_file}: cannot load the pair: {reason}") from None
    return LoadedCert(ctx, leaf.serial_number, leaf.subject.rfc4514_string(), leaf.not_valid_after_utc)


class ServingCertificate:
    """The webhook's certificate, reloaded when its files change; ``context`` is the listener's.

    Every handshake starts on ``context`` (the first pair loaded), whose SNI callback moves
    the connection to the current pair's context before the certificate is chosen: the
    OpenSSL way to serve a different certificate without a new listener.
    """

    def __init__(self, cert_file: str, key_file: str, *, clock: Callable[[], dt.datetime] | None = None) -> None:
        self.cert_file = cert_file
        self.key_file = key_file
        self._clock = clock or (lambda: dt.datetime.now(dt.UTC))
        self.current: LoadedCert | None = None
        self.reloads = {"success": 0, "failure": 0}
        self.last_error: str | None = None
        self._signature: tuple[object, ...] | None = None
        self._listener: ssl.SSLContext | None = None
        self._task: asyncio.Task[None] | None = None

    def load(self) -> LoadedCert:
        """First load, before serving; ``CertificateError`` if the pair cannot be used."""
        signature = _file_signature((self.cert_file, self.key_file))
        loaded = server_context(self.cert_file, self.key_file)
        self._signature = signature
        self._install(loaded)
        if self.expired:
            LOG.error(
                "serving certificate has expired: not ready until it is replaced",
                extra={"fields": {"cert": self.cert_file, "not_after": loaded.not_after.isoformat()}},
            )
        return loaded

    @property
    def context(self) -> ssl.SSLContext:
        if self._listener is None:
            raise RuntimeError("ServingCertificate.load() first")
        return self._listener

    @property
    def expired(self) -> bool:
        return self.current is not None and self.current.not_after <= self._clock()

    def _install(self, loaded: LoadedCert) -> None:
        self.current = loaded
        if self._listener is None:
            self._listener = loaded.context
            self._listener.sni_callback = self._pick_context

    def _pick_context(
        self, conn: ssl.SSLObject | ssl.SSLSocket, _server_name: str | None, _ctx: ssl.SSLContext
    ) -> None:
        # Called on every ClientHello, with or without SNI (OpenSSL's servername callback).
        current = self.current
        if current is not None and current.context is not conn.context:
            conn.context = current.context

    async def check(self) -> bool:
        """Reload if the files changed since the last attempt; True if a new pair is in use."""
        signature = _file_signature((self.cert_file, self.key_file))
        if signature == self._signature:
            return False
        # Remember the files as they were *before* reading them: a change during the load is
        # then seen, and loaded, at the next poll.
        self._signature = signature
        try:
            loaded = await asyncio.to_thread(server_context, self.cert_file, self.key_file)
            if loaded.not_after <= self._clock():
                raise CertificateError(
                    f"{self.cert_file}: the new certificate expired at {loaded.not_after:%Y-%m-%dT%H:%M:%SZ}"
                )
        except CertificateError as exc:
            self.reloads["failure"] += 1
            self.last_error = str(exc)
            LOG.error(
                "serving certificate reload failed, keeping the current one",
                extra={"fields": {"error": str(exc), "serial": self.current and f"{self.current.serial:x}"}},
            )
            return False
        self._install(loaded)
        self.reloads["success"] += 1
        self.last_error = None
        LOG.info(
            "serving certificate reloaded",
            extra={
                "fields": {
                    "subject": loaded.subject,
                    "serial": f"{loaded.serial:x}",
                    "not_after": loaded.not_after.isoformat(),
                }
            },
        )
        return True

    async def _poll(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.check()
            except Exception:  # never let the poller die: the next change must still be seen
                LOG.exception("serving certificate check failed")

    def start(self, interval: float = CERT_POLL_INTERVAL) -> None:
        self._task = asyncio.get_running_loop().create_task(self._poll(interval))

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None


# --- metrics --------------------------------------------------------------------------------------

RESULTS = ("injected", "unchanged", "skipped", "denied", "invalid", "error")
_LOG_LEVELS = {"injected": logging.INFO, "denied": logging.WARNING, "invalid": logging.WARNING, "error": logging.ERROR}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _CertificateCollector(Collector):
    """Reload counts and expiry, read from the ``ServingCertificate`` at scrape time (it owns them)."""

    def __init__(self, cert: ServingCertificate) -> None:
        self.cert = cert

    def collect(self) -> Iterator[Metric]:
        reloads = CounterMetricFamily(
            "dbmtls_webhook_certificate_reloads",
            "Serving certificate reloads by result (failure: the previous certificate stays in use).",
            labels=["result"],
        )
        for result, total in self.cert.reloads.items():
            reloads.add_metric([result], total)
        yield reloads
        current = self.cert.current
        yield GaugeMetricFamily(
            "dbmtls_webhook_certificate_expiry_timestamp_seconds",
            "notAfter of the serving certificate in use, as a Unix time.",
            value=current.not_after.timestamp() if current else 0.0,
        )


class WebhookMetrics:
    """``dbmtls_webhook_*`` in a registry of its own (several servers may share a test process)."""

    def __init__(self, mesh: Mesh, cert: ServingCertificate) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "dbmtls_webhook_requests",
            "AdmissionReviews by result: injected (patched), unchanged (not opted in or already "
            "injected), skipped (not a Pod CREATE), denied (cannot be injected), invalid (not an "
            "AdmissionReview this webhook can answer), error (webhook bug).",
            ["result"],
            registry=self.registry,
        )
        for result in RESULTS:
            self.requests.labels(result)  # zeros, not gaps, on dashboards
        self.http_errors = Counter(
            "dbmtls_webhook_http_errors",
            "Requests refused with an HTTP error (malformed, too large, wrong type...), by status.",
            ["code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "dbmtls_webhook_request_duration_seconds",
            "Time to decide one AdmissionReview (parse, inject, diff), network time excluded.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        rules = Gauge(
            "dbmtls_webhook_destination_rules",
            "DestinationRules the injector knows (from files and watched).",
            registry=self.registry,
        )
        rules.set_function(lambda: len(mesh.rules()))
        self.registry.register(_CertificateCollector(cert))

    def render(self) -> bytes:
        return generate_latest(self.registry)


# --- HTTP -------------------------------------------------------------------------------------------


class _HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class _Request:
    method: str
    target: str
    headers: dict[str, str]  # names lower-cased
    body: bytes


@dataclass
class _Conn:
    busy: bool = False  # a request is being read or answered (an idle one is closed at shutdown)


class _Throttle:
    """At most one line per ``interval`` at WARNING for what a client can repeat at will; DEBUG for the rest."""

    def __init__(self, interval: float = 60.0) -> None:
        self.interval = interval
        self._last: float | None = None

    def level(self) -> int:
        now = time.monotonic()
        if self._last is not None and now - self._last < self.interval:
            return logging.DEBUG
        self._last = now
        return logging.WARNING


def _response(
    conn: h11.Connection, status: int, ctype: str, payload: bytes, *, head_only: bool = False, close: bool = False
) -> bytes:
    headers = [("Content-Type", ctype), ("Content-Length", str(len(payload)))]
    if close:
        headers.append(("Connection", "close"))
    parts = [conn.send(h11.Response(status_code=status, reason=http.HTTPStatus(status).phrase, headers=headers))]
    if not head_only:
        parts.append(conn.send(h11.Data(data=payload)))
    parts.append(conn.send(h11.EndOfMessage()))
    return b"".join(p for p in parts if p)


def _is_json(ctype: str | None) -> bool:
    return ctype is not None and ctype.split(";", 1)[0].strip().lower() == "application/json"


async def _read_request(
    conn: h11.Connection, reader: asyncio.StreamReader, idle: float, state: _Conn
) -> _Request | None:
    """The next request on ``conn``; None when the client closed, or stayed idle for ``idle`` s.

    The wait for a request's first byte is bounded by ``idle``; from then on the whole request
    must arrive within ``READ_TIMEOUT`` and ``state.busy`` is set (a shutdown lets it finish).
    Raises ``_HTTPError`` (400, 413) or ``TimeoutError``.
    """
    started = asyncio.Event()  # a flag the timeout handler can read (set on the first byte)
    try:
        async with asyncio.timeout(idle) as deadline:
            return await _read_events(conn, reader, started, deadline, state)
    except TimeoutError:
        if started.is_set():
            raise
        return None  # an idle kept-alive connection: closed quietly


async def _read_events(
    conn: h11.Connection,
    reader: asyncio.StreamReader,
    started: asyncio.Event,
    deadline: asyncio.Timeout,
    state: _Conn,
) -> _Request | None:
    loop = asyncio.get_running_loop()
    request: h11.Request | None = None
    body = bytearray()
    head_budget = MAX_HEAD

    def begin() -> None:  # the request's first byte: from now on it has READ_TIMEOUT to arrive whole
        if not started.is_set():
            started.set()
            state.busy = True
            deadline.reschedule(loop.time() + READ_TIMEOUT)

    while True:
        try:
            event = conn.next_event()
        except h11.RemoteProtocolError as exc:
            raise _HTTPError(400, f"malformed HTTP request: {exc}") from None
        if event is h11.NEED_DATA:
            if request is None:
                # h11 bounds an incomplete head only; never feeding it more than MAX_HEAD
                # before the head is complete also bounds one that arrives in one read.
                if head_budget <= 0:
                    raise _HTTPError(400, "request head too large")
                data = await reader.read(head_budget)
                head_budget -= len(data)
            else:
                data = await reader.read(_READ_CHUNK)
            if data:
                begin()
            conn.receive_data(data)  # b"": the client closed its side
        elif isinstance(event, h11.Request):
            begin()  # a pipelined request was in h11's buffer already
            if not event.http_version.startswith(b"1."):
                raise _HTTPError(400, "not HTTP/1.x")
            request = event
            length = next((int(v) for k, v in event.headers if k == b"content-length"), 0)  # h11 checked it
            if length > MAX_BODY:
                raise _HTTPError(413, f"request body over {MAX_BODY} bytes")
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise _HTTPError(413, f"request body over {MAX_BODY} bytes")
        elif isinstance(event, h11.EndOfMessage) and request is not None:
            return _Request(
                request.method.decode("ascii").upper(),
                request.target.decode("latin-1"),
                {k.decode("ascii"): v.decode("latin-1") for k, v in request.headers},
                bytes(body),
            )
        elif isinstance(event, h11.ConnectionClosed):
            if started.is_set():
                raise _HTTPError(400, "connection closed in the middle of a request")
            return None
        else:
            raise _HTTPError(400, f"unexpected {type(event).__name__}")


INJECT_PATHS = {"/inject": False, "/inject/namespace-default": True}  # path -> namespace_default


def _query_options(target: str, options: InjectOptions) -> InjectOptions:
    """``options`` for this request: its path's namespace default, then ``?namespaceDefault=``."""
    url = urllib.parse.urlsplit(target)
    options = dataclasses.replace(options, namespace_default=INJECT_PATHS[url.path])
    query = url.query
    try:
        params = urllib.parse.parse_qs(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise _HTTPError(400, f"malformed query {query!r}") from None
    unknown = set(params) - {"namespaceDefault"}
    if unknown:
        raise _HTTPError(400, f"unknown query parameter {sorted(unknown)[0]!r} (known: namespaceDefault)")
    values = params.get("namespaceDefault")
    if values is None:
        return options
    if len(values) != 1 or values[0] not in ("true", "false"):
        raise _HTTPError(400, "namespaceDefault must be true or false")
    return dataclasses.replace(options, namespace_default=values[0] == "true")


class WebhookServer:
    """The HTTPS server: ``/inject`` plus health, readiness and metrics (see the module doc)."""

    def __init__(
        self,
        listen: str,
        cert: ServingCertificate,
        mesh: Mesh,
        options: InjectOptions,
        *,
        inject: Inject = inject_object,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self.listen = listen
        self.cert = cert
        self.mesh = mesh
        self.options = options
        self.inject = inject
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.metrics = WebhookMetrics(mesh, cert)
        self.draining = False
        self._server: asyncio.Server | None = None
        self._conns: dict[asyncio.Task[None], _Conn] = {}
        self.refused = 0
        self._refusal_log = _Throttle()
        self._full_log = _Throttle()

    @property
    def ports(self) -> list[int]:
        assert self._server is not None
        return [int(s.getsockname()[1]) for s in self._server.sockets]

    def readiness(self) -> list[str]:
        problems = []
        if self.draining:
            problems.append("shutting down")
        if self.cert.current is None:
            problems.append("serving certificate not loaded")
        elif self.cert.expired:
            problems.append(f"serving certificate expired at {self.cert.current.not_after:%Y-%m-%dT%H:%M:%SZ}")
        return problems + self.mesh.readiness()

    async def start(self) -> None:
        if self.listen.endswith(":0"):  # any free port (tests); split_host_port wants a real one
            host, port = split_host_port(self.listen[:-2] + ":1")[0], 0
        else:
            host, port = split_host_port(self.listen)
        try:
            self._server = await asyncio.start_server(
                self._connection,
                host=host,
                port=port,
                ssl=self.cert.context,
                ssl_handshake_timeout=HANDSHAKE_TIMEOUT,
                reuse_address=True,
                limit=MAX_HEAD,
            )
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {self.listen}: {exc.strerror or exc}") from None
        LOG.info("webhook listening", extra={"fields": {"listen": self.listen, "ports": self.ports}})

    async def stop(self, grace: float = SHUTDOWN_GRACE) -> None:
        """Stop accepting, close idle connections, give busy ones ``grace`` seconds, then close them."""
        self.draining = True
        if self._server is not None:
            self._server.close()
        for task, state in list(self._conns.items()):
            if not state.busy:
                task.cancel()
        busy = list(self._conns)
        if busy:
            _done, pending = await asyncio.wait(busy, timeout=grace)
            for task in pending:
                task.cancel()
            await asyncio.gather(*busy, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        if len(self._conns) >= self.max_connections or self.draining:
            self.refused += 1
            writer.transport.abort()
            if not self.draining:
                LOG.log(
                    self._full_log.level(),
                    "webhook at its connection limit, closing new connections",
                    extra={"fields": {"limit": self.max_connections, "refused_total": self.refused}},
                )
            return
        state = _Conn()
        self._conns[task] = state
        try:
            await self._serve(reader, writer, state)
        except (ConnectionError, TimeoutError, ssl.SSLError, asyncio.CancelledError):
            writer.transport.abort()
        except Exception:
            LOG.exception("webhook connection failed")
            writer.transport.abort()
        finally:
            del self._conns[task]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, state: _Conn) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        while True:
            state.busy = False
            try:
                request = await _read_request(conn, reader, self.idle_timeout, state)
            except _HTTPError as exc:
                await self._send_error(conn, writer, exc)
                return
            if request is None:
                writer.close()
                return
            status, ctype, payload = await self._route(request)
            close = self.draining or status != 200
            writer.write(_response(conn, status, ctype, payload, head_only=request.method == "HEAD", close=close))
            async with asyncio.timeout(WRITE_TIMEOUT):
                await writer.drain()
            if close or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                writer.close()
                return
            conn.start_next_cycle()

    def _refused(self, exc: _HTTPError) -> None:
        self.metrics.http_errors.labels(str(exc.status)).inc()
        fields = {"status": exc.status, "error": exc.message}
        LOG.log(self._refusal_log.level(), "webhook request refused", extra={"fields": fields})

    async def _send_error(self, conn: h11.Connection, writer: asyncio.StreamWriter, exc: _HTTPError) -> None:
        self._refused(exc)
        if conn.our_state is h11.SEND_RESPONSE or conn.our_state is h11.IDLE:
            try:
                data = _response(conn, exc.status, "text/plain; charset=utf-8", f"{exc.message}\n".encode(), close=True)
            except h11.LocalProtocolError:  # h11 has no request to answer (it could not parse one)
                data = _raw_error(exc)
        else:
            data = _raw_error(exc)
        writer.write(data)
        async with asyncio.timeout(WRITE_TIMEOUT):
            await writer.drain()
        writer.close()

    async def _route(self, request: _Request) -> tuple[int, str, bytes]:
        text = "text/plain; charset=utf-8"
        path = urllib.parse.urlsplit(request.target).path
        if path in INJECT_PATHS:
            try:
                return self._inject(request)
            except _HTTPError as exc:
                self._refused(exc)
                return exc.status, text, f"{exc.message}\n".encode()
        if request.method not in ("GET", "HEAD"):
            return 405, text, b"use GET\n"
        if path == "/healthz":
            return 200, text, b"ok\n"
        if path == "/readyz":
            problems = self.readiness()
            if problems:
                return 503, text, ("not ready\n" + "".join(f"- {p}\n" for p in problems)).encode()
            return 200, text, b"ready\n"
        if path == "/metrics":
            return 200, "text/plain; version=0.0.4; charset=utf-8", self.metrics.render()
        return 404, text, b"not found\n"

    def _inject(self, request: _Request) -> tuple[int, str, bytes]:
        if request.method != "POST":
            raise _HTTPError(405, "use POST with an AdmissionReview")
        if not _is_json(request.headers.get("content-type")):
            raise _HTTPError(415, f"Content-Type must be application/json, got {request.headers.get('content-type')!r}")
        options = _query_options(request.target, self.options)
        started = time.perf_counter()
        try:
            admission = parse_review(request.body)
        except BadReview as exc:
            self.metrics.requests.labels("invalid").inc()
            raise _HTTPError(400, str(exc)) from None
        verdict = review(admission, self.mesh.rules(), options, inject=self.inject)
        elapsed = time.perf_counter() - started
        self.metrics.latency.observe(elapsed)
        self.metrics.requests.labels(verdict.result).inc()
        fields = {
            "uid": admission["uid"],
            "operation": admission.get("operation"),
            "pod": _pod_label(admission.get("object"), admission.get("namespace")),
            "result": verdict.result,
            "patch_ops": verdict.patch_ops or None,
            "reason": verdict.message or None,
            "namespace_default": options.namespace_default or None,
            "duration_ms": round(elapsed * 1000, 2),
        }
        level = _LOG_LEVELS.get(verdict.result, logging.DEBUG)  # unchanged, skipped: DEBUG
        LOG.log(level, "admission", extra={"fields": fields})
        return 200, "application/json", json.dumps(verdict.review, separators=(",", ":")).encode()


def _raw_error(exc: _HTTPError) -> bytes:
    payload = f"{exc.message}\n".encode()
    return (
        f"HTTP/1.1 {exc.status} {http.HTTPStatus(exc.status).phrase}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(payload)}\r\nConnection: close\r\n\r\n"
    ).encode() + payload


# --- the process ------------------------------------------------------------------------------------


def require_extras(*, watch: bool) -> str | None:
    """What is missing for ``dbmtls webhook`` (None: nothing): the ``webhook`` extra's packages."""
    missing = []
    for module, needed in (("jsonpatch", True), ("lightkube", watch)):
        if not needed:
            continue
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if not missing:
        return None
    return (
        f"{' and '.join(missing)} not installed: install dbmtls with the webhook extra (pip install 'dbmtls[webhook]')"
    )


async def serve(
    listen: str,
    cert: ServingCertificate,
    mesh: Mesh,
    options: InjectOptions,
    *,
    watcher: Background | None = None,
    stop: asyncio.Event | None = None,
) -> int:
    """Run until SIGTERM/SIGINT (or ``stop``): the server, the certificate poller and the watcher."""
    loop = asyncio.get_running_loop()
    stop = stop or asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    server = WebhookServer(listen, cert, mesh, options)
    if watcher is not None:
        watcher.start()
    cert.start()
    try:
        await server.start()
        LOG.info(
            "webhook started",
            extra={
                "fields": {
                    "rules_from_files": len(mesh.static),
                    "watch": watcher is not None,
                    "serial": cert.current and f"{cert.current.serial:x}",
                }
            },
        )
        await stop.wait()
        LOG.info("shutting down")
        await server.stop()
    finally:
        await cert.stop()
        if watcher is not None:
            await watcher.stop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
    LOG.info("stopped")
    return 0


def in_cluster() -> bool:
    """Running in a pod: the kubelet sets KUBERNETES_SERVICE_HOST in every container."""
    return bool(os.environ.get("KUBERNETES_SERVICE_HOST"))

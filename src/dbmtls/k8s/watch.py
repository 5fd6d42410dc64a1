"""The DestinationRules of the whole cluster, kept in memory: a list, then a watch (lightkube).

An informer in miniature.  ``DestinationRuleWatcher`` lists ``destinationrules`` of every
namespace, replaces its whole store with the result (so rules deleted while it was not
watching disappear), then watches from the list's ``resourceVersion``: ADDED and MODIFIED
store the rule, DELETED removes it.  The store is a dict keyed by (namespace, name) whose
values are the rules as plain dicts, the shape ``inject_object`` takes; the webhook reads an
immutable snapshot per request.

* Versions: ``networking.istio.io`` ``v1`` first (Istio 1.22+), else ``v1beta1``, else
  ``v1alpha3``, whichever the API server serves (a 404 means "not served"), chosen at each
  list so that an Istio upgrade is followed.  No version served (Istio's CRDs not installed):
  the store is empty, the watcher counts as synced (there can be no rules to miss) and asks
  again after ``backoff_max``.
* Errors: 410 Gone (the version is too old: etcd compacted it), a refused request (403:
  missing RBAC, said in the log), a connection error: list again after a capped exponential
  backoff (``backoff_initial`` doubling to ``backoff_max``); a successful list resets it.
* A watch that goes quiet is restarted from the last version seen after ``watch_timeout``
  plus a margin: the API server ends each watch after ``watch_timeout`` (``timeoutSeconds``)
  and lightkube opens the next one, but a connection that died without a FIN (a node gone,
  a NAT entry dropped) would otherwise wait forever.

lightkube is imported by this module only, and this module only in watch mode: it is the
``webhook`` extra, not a dependency of the sidecar.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import os
from collections.abc import AsyncGenerator, Callable
from typing import Any, cast

from lightkube import ApiError, AsyncClient
from lightkube.config.kubeconfig import KubeConfig
from lightkube.config.models import Cluster, User
from lightkube.generic_resource import GenericNamespacedResource, create_namespaced_resource

from dbmtls.logs import LOG

GROUP = "networking.istio.io"
VERSIONS = ("v1", "v1beta1", "v1alpha3")
KIND = "DestinationRule"
PLURAL = "destinationrules"
LIST_CHUNK = 500
LIST_TIMEOUT = 60.0
WATCH_TIMEOUT = 290  # seconds, sent as timeoutSeconds: under the API server's 5-minute etcd compaction
WATCH_MARGIN = 30.0
BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 60.0

Key = tuple[str, str]


class _ClientConfigError(Exception):
    """The Kubernetes client cannot be set up (no in-cluster token, no kubeconfig)."""


class _NotServed(Exception):
    """No version of the DestinationRule API is served (Istio's CRDs are not installed)."""


def resource(version: str) -> type[GenericNamespacedResource]:
    return create_namespaced_resource(GROUP, version, KIND, PLURAL)


def _plain(obj: Any, version: str) -> dict[str, Any]:
    """A rule as a plain dict, with apiVersion and kind (list items may lack them), without managedFields."""
    doc: dict[str, Any] = copy.deepcopy(obj.to_dict() if hasattr(obj, "to_dict") else dict(obj))
    doc.setdefault("apiVersion", f"{GROUP}/{version}")
    doc.setdefault("kind", KIND)
    meta = doc.get("metadata")
    if isinstance(meta, dict):
        meta.pop("managedFields", None)  # server-side apply bookkeeping: memory, no meaning here
    return doc


def _key(doc: dict[str, Any]) -> Key:
    meta = doc.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


def _version_of(doc: dict[str, Any]) -> str | None:
    rv = (doc.get("metadata") or {}).get("resourceVersion")
    return str(rv) if rv else None


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ApiError):
        status = exc.status
        return f"{status.code} {status.reason or ''}: {status.message or ''}".strip()
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _default_client() -> AsyncClient:
    """In a pod, its ServiceAccount (an error names the missing token); elsewhere KUBECONFIG or ~/.kube/config."""
    if os.environ.get("KUBERNETES_SERVICE_HOST"):
        return AsyncClient(config=KubeConfig.from_service_account())
    return AsyncClient(config=KubeConfig.from_env())


class DestinationRuleWatcher:
    """Lists and watches DestinationRules of all namespaces; ``snapshot()`` is what it knows now."""

    def __init__(
        self,
        client: Callable[[], AsyncClient] | None = None,
        *,
        versions: tuple[str, ...] = VERSIONS,
        watch_timeout: int = WATCH_TIMEOUT,
        backoff_initial: float = BACKOFF_INITIAL,
        backoff_max: float = BACKOFF_MAX,
    ) -> None:
        # A factory, not a client: the client is made on the loop that runs the watch.
        self._make_client = client or _default_client
        self.versions = versions
        self.watch_timeout = watch_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.rules: dict[Key, dict[str, Any]] = {}
        self.version: str | None = None  # the API version in use
        self.resource_version: str | None = None
        self.lists = 0
        self.events = 0
        self.errors = 0
        self.problem: str | None = "not listed yet"
        self._synced = False
        self._snapshot: tuple[dict[str, Any], ...] | None = ()
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_server(cls, url: str, **kwargs: Any) -> DestinationRuleWatcher:
        """A watcher of the API server at ``url`` without credentials (tests, ``kubectl proxy``)."""
        # KubeConfig.from_server leaves the user out, which some lightkube versions refuse.
        config = KubeConfig.from_one(cluster=Cluster(server=url), user=User())
        return cls(lambda: AsyncClient(config=config, trust_env=False), **kwargs)

    # --- what the webhook reads ---------------------------------------------------------

    @property
    def synced(self) -> bool:
        return self._synced

    def snapshot(self) -> tuple[dict[str, Any], ...]:
        """The rules sorted by (namespace, name); the same tuple until something changes."""
        if self._snapshot is None:
            self._snapshot = tuple(self.rules[k] for k in sorted(self.rules))
        return self._snapshot

    async def wait_for(self, predicate: Callable[[DestinationRuleWatcher], bool]) -> None:
        """Wait until ``predicate(self)`` holds, checked after every change (bound it with asyncio.timeout)."""
        async with self._changed:
            await self._changed.wait_for(lambda: predicate(self))

    async def _notify(self) -> None:
        self._snapshot = None
        async with self._changed:
            self._changed.notify_all()

    # --- running ------------------------------------------------------------------------

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self.run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def run(self) -> None:
        """List and watch until cancelled; every failure is logged and retried, none ends it."""
        client: AsyncClient | None = None
        backoff = self.backoff_initial
        try:
            while True:
                try:
                    if client is None:
                        client = self._client()
                    res = await self._list(client)
                    backoff = self.backoff_initial
                    await self._watch(client, res)
                except asyncio.CancelledError:
                    raise
                except _NotServed:
                    await asyncio.sleep(self.backoff_max)
                except Exception as exc:
                    gone = isinstance(exc, ApiError) and exc.status.code == 410
                    await self._failed(exc, backoff, gone=gone)
                    await asyncio.sleep(0 if gone else backoff)
                    if not gone:
                        backoff = min(backoff * 2, self.backoff_max)
        finally:
            if client is not None:
                with contextlib.suppress(Exception):
                    await client.close()

    def _client(self) -> AsyncClient:
        try:
            return self._make_client()
        except Exception as exc:  # no kubeconfig, no service account token (automountServiceAccountToken: false)
            raise _ClientConfigError(f"cannot configure the Kubernetes client: {_describe(exc)}") from exc

    async def _failed(self, exc: Exception, backoff: float, *, gone: bool) -> None:
        self.errors += 1
        self.problem = str(exc) if isinstance(exc, _ClientConfigError) else _describe(exc)
        hint = ""
        if isinstance(exc, ApiError) and exc.status.code == 403:
            hint = (
                " (RBAC: the webhook's ServiceAccount needs get, list and watch on "
                "destinationrules.networking.istio.io)"
            )
        log = LOG.info if gone else LOG.warning if not isinstance(exc, _ClientConfigError) else LOG.error
        log(
            "DestinationRules: list or watch failed, listing again",
            extra={"fields": {"error": self.problem + hint, "retry_in": f"{0 if gone else backoff:g}s"}},
        )
        await self._notify()  # waiters see the problem

    async def _list(self, client: AsyncClient) -> type[GenericNamespacedResource]:
        for version in self.versions:
            res = resource(version)
            items: dict[Key, dict[str, Any]] = {}
            try:
                async with asyncio.timeout(LIST_TIMEOUT):
                    listing = client.list(res, namespace="*", chunk_size=LIST_CHUNK)
                    async for obj in listing:
                        doc = _plain(obj, version)
                        items[_key(doc)] = doc
            except ApiError as exc:
                if exc.status.code == 404:
                    continue  # this version is not served: try the next
                raise
            previous = self.version
            self.rules = items
            self.version = version
            self.resource_version = listing.resourceVersion
            self.lists += 1
            self.problem = None
            self._synced = True
            if previous != version or self.lists == 1:
                LOG.info(
                    "DestinationRules listed",
                    extra={"fields": {"api": f"{GROUP}/{version}", "rules": len(items)}},
                )
            await self._notify()
            return res
        self.rules = {}
        self.version = None
        self.problem = f"no version of {GROUP} DestinationRule is served ({', '.join(self.versions)} tried)"
        if not self._synced:
            LOG.warning(
                "DestinationRules are not served by the API server (Istio CRDs not installed?): "
                "no rules from the cluster",
                extra={"fields": {"retry_in": f"{self.backoff_max:g}s"}},
            )
        self._synced = True  # nothing to wait for: there can be no rule to miss
        await self._notify()
        raise _NotServed

    async def _watch(self, client: AsyncClient, res: type[GenericNamespacedResource]) -> None:
        """Apply events until the watch fails (raises); a quiet watch is restarted from the last version."""
        while True:
            stream = cast(
                AsyncGenerator[tuple[str, Any], None],
                client.watch(
                    res,
                    namespace="*",
                    resource_version=self.resource_version,
                    server_timeout=self.watch_timeout,
                ),
            )
            async with contextlib.aclosing(stream):
                while True:
                    try:
                        async with asyncio.timeout(self.watch_timeout + WATCH_MARGIN):
                            kind, obj = await anext(stream)
                    except TimeoutError:
                        break  # quiet, or a dead connection: watch again from resource_version
                    await self._apply(kind, obj)

    async def _apply(self, kind: str, obj: Any) -> None:
        assert self.version is not None
        doc = _plain(obj, self.version)
        self.events += 1
        self.resource_version = _version_of(doc) or self.resource_version
        if kind in ("ADDED", "MODIFIED"):
            self.rules[_key(doc)] = doc
        elif kind == "DELETED":
            self.rules.pop(_key(doc), None)
        else:  # BOOKMARK (never asked for) or a type a later API adds: only its version counts
            return
        LOG.debug("DestinationRule event", extra={"fields": {"event": kind, "rule": "/".join(_key(doc))}})
        await self._notify()

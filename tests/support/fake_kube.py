"""A fake Kubernetes API server that serves DestinationRules: LIST and WATCH, nothing else.

No API server (nor kind, nor etcd) is available where these tests run, so this stands in for
one, speaking the same HTTP as kube-apiserver for the requests the webhook's watcher makes:

* ``GET /apis/networking.istio.io/<v>/destinationrules`` -> a ``DestinationRuleList`` with
  ``metadata.resourceVersion`` (``limit``/``continue`` honoured, so lightkube's chunked list
  takes several requests);
* the same with ``watch=true&resourceVersion=N`` -> a chunked stream of
  ``{"type": "ADDED"|"MODIFIED"|"DELETED", "object": ...}`` lines for every change after N,
  ended after ``timeoutSeconds`` or by ``drop_watches()``; a version older than the last
  ``compact()`` gets the API server's ``ERROR`` event with a 410 ``Expired`` Status;
* versions not in ``served`` -> 404 with a ``NotFound`` Status; ``forbidden`` -> 403.

Every request is recorded (``requests``).  Mutations (``put``, ``delete``, ...) must be called
on the server's loop; ``FakeKubeThread`` runs one in a thread for subprocess tests.
"""

from __future__ import annotations

import asyncio
import json
import threading
import urllib.parse
from collections.abc import Callable, Coroutine
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")
GROUP = "networking.istio.io"


@dataclass
class Event:
    rv: int
    type: str
    obj: dict[str, Any]


@dataclass
class Seen:
    path: str
    params: dict[str, str]

    @property
    def watch(self) -> bool:
        return self.params.get("watch") == "true"


def _status(code: int, reason: str, message: str) -> dict[str, Any]:
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "details": {},
        "code": code,
    }


def rule(
    namespace: str, name: str, host: str, *, version: str = "v1", mode: str = "MUTUAL", protocol: str | None = None
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if protocol:
        meta["annotations"] = {"dbmtls.io/protocol": protocol}
    return {
        "apiVersion": f"{GROUP}/{version}",
        "kind": "DestinationRule",
        "metadata": meta,
        "spec": {"host": host, "trafficPolicy": {"tls": {"mode": mode, "credentialName": f"{name}-client"}}},
    }


@dataclass
class FakeKube:
    served: tuple[str, ...] = ("v1", "v1beta1", "v1alpha3")
    forbidden: bool = False
    # real list items of a custom resource carry apiVersion and kind; False strips them
    items_with_kind: bool = True
    rv: int = 1000
    objects: dict[tuple[str, str], dict[str, Any]] = field(default_factory=dict)
    history: list[Event] = field(default_factory=list)
    compacted: int = 0
    # never end a watch after timeoutSeconds: a connection that died without a FIN looks like this
    hang_watches: bool = False
    requests: list[Seen] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None
    _changed: asyncio.Condition | None = None
    _drops: int = 0
    _clean_drop: bool = False
    _streams: set[asyncio.Task[None]] = field(default_factory=set)

    # --- state -----------------------------------------------------------------------------

    def _bump(self, kind: str, obj: dict[str, Any]) -> None:
        self.rv += 1
        obj = json.loads(json.dumps(obj))
        obj["metadata"]["resourceVersion"] = str(self.rv)
        obj["metadata"].setdefault("uid", f"uid-{obj['metadata']['namespace']}-{obj['metadata']['name']}")
        obj["metadata"]["managedFields"] = [{"manager": "kubectl", "operation": "Apply"}]
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        if kind == "DELETED":
            self.objects.pop(key, None)
        else:
            self.objects[key] = obj
        self.history.append(Event(self.rv, kind, obj))
        self._wake()

    def put(self, obj: dict[str, Any]) -> None:
        key = (obj["metadata"]["namespace"], obj["metadata"]["name"])
        self._bump("MODIFIED" if key in self.objects else "ADDED", obj)

    def delete(self, namespace: str, name: str) -> None:
        self._bump("DELETED", self.objects[(namespace, name)])

    def compact(self) -> None:
        """Forget the history, as etcd compaction does: older versions get 410 Gone."""
        self.compacted = self.rv
        self.history.clear()

    def drop_watches(self, *, clean: bool = False) -> None:
        """End every open watch: cut (as a dying API server or load balancer) or ``clean``ly (as at timeoutSeconds)."""
        self._drops += 1
        self._clean_drop = clean
        self._wake()

    async def wait_requests(self, predicate: Callable[[], bool]) -> None:
        """Wait until ``predicate()`` holds, checked after every request (bound it with asyncio.timeout)."""
        assert self._changed is not None
        async with self._changed:
            await self._changed.wait_for(predicate)

    def _wake(self) -> None:
        if self._changed is not None:
            changed = self._changed

            async def notify() -> None:
                async with changed:
                    changed.notify_all()

            task = asyncio.get_running_loop().create_task(notify())
            self._streams.add(task)
            task.add_done_callback(self._streams.discard)

    # --- serving ---------------------------------------------------------------------------

    async def start(self) -> FakeKube:
        self._changed = asyncio.Condition()
        self._server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        for task in list(self._streams):
            task.cancel()
        await asyncio.gather(*self._streams, return_exceptions=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def lists(self) -> list[Seen]:
        return [r for r in self.requests if not r.watch]

    def watches(self) -> list[Seen]:
        return [r for r in self.requests if r.watch]

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
            url = urllib.parse.urlsplit(target)
            params = dict(urllib.parse.parse_qsl(url.query))
            self.requests.append(Seen(url.path, params))
            self._wake()
            await self._answer(method, url.path, params, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._streams.discard(task)
            writer.close()

    async def _send(self, writer: asyncio.StreamWriter, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        reason = {200: "OK", 403: "Forbidden", 404: "Not Found"}.get(code, "Error")
        writer.write(
            f"HTTP/1.1 {code} {reason}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
            + data
        )
        await writer.drain()

    async def _answer(self, method: str, path: str, params: dict[str, str], writer: asyncio.StreamWriter) -> None:
        parts = path.strip("/").split("/")
        # apis/networking.istio.io/<version>/destinationrules (all namespaces only)
        if method != "GET" or len(parts) != 4 or parts[:2] != ["apis", GROUP] or parts[3] != "destinationrules":
            await self._send(writer, 404, _status(404, "NotFound", "the server could not find the requested resource"))
            return
        version = parts[2]
        if version not in self.served:
            await self._send(writer, 404, _status(404, "NotFound", "the server could not find the requested resource"))
            return
        if self.forbidden:
            msg = (
                'destinationrules.networking.istio.io is forbidden: User "system:serviceaccount:dbmtls:webhook" '
                'cannot list resource "destinationrules" in API group "networking.istio.io" at the cluster scope'
            )
            await self._send(writer, 403, _status(403, "Forbidden", msg))
            return
        if params.get("watch") == "true":
            await self._watch(version, params, writer)
        else:
            await self._list(version, params, writer)

    def _as(self, obj: dict[str, Any], version: str, *, item: bool = False) -> dict[str, Any]:
        """The object as served at ``version`` (a list item loses apiVersion/kind if so configured)."""
        out = dict(obj, apiVersion=f"{GROUP}/{version}")
        if item and not self.items_with_kind:
            out.pop("apiVersion")
            out.pop("kind", None)
        return out

    async def _list(self, version: str, params: dict[str, str], writer: asyncio.StreamWriter) -> None:
        keys = sorted(self.objects)
        start = int(params.get("continue") or 0)
        limit = int(params.get("limit") or 0) or len(keys) or 1
        page = keys[start : start + limit]
        more = start + limit < len(keys)
        body = {
            "apiVersion": f"{GROUP}/{version}",
            "kind": "DestinationRuleList",
            "metadata": {"resourceVersion": str(self.rv), **({"continue": str(start + limit)} if more else {})},
            "items": [self._as(self.objects[k], version, item=True) for k in page],
        }
        await self._send(writer, 200, body)

    async def _watch(self, version: str, params: dict[str, str], writer: asyncio.StreamWriter) -> None:
        assert self._changed is not None
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n"
            b"Connection: close\r\n\r\n"
        )

        def chunk(doc: dict[str, Any]) -> bytes:
            line = json.dumps(doc).encode() + b"\n"
            return f"{len(line):x}\r\n".encode() + line + b"\r\n"

        since = int(params.get("resourceVersion") or 0)
        if since < self.compacted:
            status = _status(410, "Expired", f"too old resource version: {since} ({self.compacted})")
            writer.write(chunk({"type": "ERROR", "object": status}) + b"0\r\n\r\n")
            await writer.drain()
            return
        drops = self._drops
        timeout = None if self.hang_watches else float(params.get("timeoutSeconds") or 1800)
        try:
            async with asyncio.timeout(timeout):
                while True:
                    for event in [e for e in self.history if e.rv > since]:
                        writer.write(chunk({"type": event.type, "object": self._as(event.obj, version)}))
                        since = event.rv
                    await writer.drain()
                    last = since
                    async with self._changed:
                        await self._changed.wait_for(
                            lambda: self._drops != drops or any(e.rv > last for e in self.history)  # noqa: B023
                        )
                    if self._drops != drops:
                        if self._clean_drop:
                            writer.write(b"0\r\n\r\n")
                            await writer.drain()
                        return  # cut: no terminating chunk, as a dying server
        except TimeoutError:
            writer.write(b"0\r\n\r\n")  # the API server ends a watch cleanly after timeoutSeconds
            await writer.drain()


class FakeKubeThread:
    """A ``FakeKube`` on an event loop of its own thread (for a webhook running as a subprocess)."""

    def __init__(self, fake: FakeKube | None = None) -> None:
        self.fake = fake or FakeKube()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    def __enter__(self) -> FakeKubeThread:
        self._thread.start()
        self.call_async(self.fake.start)
        return self

    def __exit__(self, *exc: object) -> None:
        self.call_async(self.fake.stop)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout=10)
        self.loop.close()

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` on the fake's loop (its state is the loop's)."""

        async def run() -> T:
            return fn(*args)

        return self.call_async(run)

    def call_async(self, fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(fn(), self.loop)
        return future.result(timeout=10)

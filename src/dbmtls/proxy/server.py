"""The process: listeners, one task per app connection, reload and graceful drain.

Start-up order: build every database's TLS material (a failure is logged and
makes the database not ready, so /readyz and the app's errors explain it, and a
later fix of the files is picked up by the reloader), then bind every listener
(a bind failure is fatal: nothing useful can run on a port we do not have).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import os
import socket
import stat
import time

from dbmtls.config.model import Config, split_host_port
from dbmtls.errors import ConfigError, DbmtlsError, Reason, TooManyConnections
from dbmtls.logs import CONN_LOG, LOG
from dbmtls.native import load as load_native
from dbmtls.native.plane import NativePlane
from dbmtls.native.tls import NativeClientTLS
from dbmtls.protocols.spec import ProtocolSpec
from dbmtls.proxy.endpoint import Endpoint
from dbmtls.proxy.limits import Admission, Verdict, raise_fd_limit
from dbmtls.proxy.notice import tell_app
from dbmtls.proxy.preconnect import Pool
from dbmtls.proxy.resolver import make_resolver
from dbmtls.proxy.runtime import Conn, DatabaseRuntime, Session
from dbmtls.proxy.upstream import Dialer, keep_session


def session_class(spec: ProtocolSpec) -> type[Session]:
    """The session driver ``spec.session`` names (``module:Class``).

    A registry entry whose driver does not resolve is a bug of dbmtls: it stops the start
    with an error naming the entry, never falls back to an opaque relay.
    """
    module_name, _, class_name = spec.session.partition(":")
    try:
        driver: type[Session] = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as exc:
        raise RuntimeError(f"protocol {spec.name!r}: session driver {spec.session!r} not found: {exc}") from exc
    return driver


def load_session(spec: ProtocolSpec, rt: DatabaseRuntime) -> Session:
    """The session driver of ``spec``, made for ``rt``."""
    return session_class(spec)(rt)


def runs_native(spec: ProtocolSpec) -> bool:
    """Whether ``dataPlane: native`` applies to the protocol (its session dials or upgrades, and
    relays, through ``sessions.common``; every built-in protocol does; docs/native.md)."""
    return bool(getattr(session_class(spec), "native_capable", False))


class _Accepted(Endpoint):
    __slots__ = ("_proxy", "_rt")

    def __init__(self, proxy: Proxy, rt: DatabaseRuntime) -> None:
        super().__init__()
        self._proxy = proxy
        self._rt = rt

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._proxy._accepted(self, self._rt)


def _peer_name(ep: Endpoint) -> str:
    peer = ep.transport.get_extra_info("peername") if ep.transport else None
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return "unix" if not peer else str(peer)


class Proxy:
    def __init__(self, config: Config, *, dialer: Dialer | None = None) -> None:
        self.config = config
        dialer = dialer or Dialer(make_resolver(config.dns))
        self.dialer = dialer
        self.fd_limits = raise_fd_limit()
        fd_limit = self.fd_limits[1]
        self.admission = Admission(config.maxConnections, fd_limit)
        self.runtimes = {db.name: DatabaseRuntime(db, dialer) for db in config.databases}
        self.sessions = {name: load_session(rt.spec, rt) for name, rt in self.runtimes.items()}
        self.plane: NativePlane | None = None
        self.plane_problem: str | None = None
        if config.dataPlane != "python":  # native, or auto: native when the extension loads
            module, self.plane_problem = load_native()
            if module is not None:
                self.plane = NativePlane(module, threads=config.nativeThreads)
                for rt in self.runtimes.values():
                    if runs_native(rt.spec):
                        rt.native = self.plane
                        rt.tls = NativeClientTLS(rt.db, module)  # before any material is loaded
        self._servers: list[asyncio.Server] = []
        self._unix_bound: dict[str, tuple[int, int]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.draining = False
        self.stopped = asyncio.Event()

    # --- start-up ------------------------------------------------------------------

    def load_material(self) -> list[str]:
        """Load every database's TLS files; return the problems (also logged)."""
        problems = []
        for rt in self.runtimes.values():
            try:
                m = rt.tls.load()
                for w in m.warnings:
                    LOG.warning(w, extra={"fields": {"db": rt.name}})
                if not rt.tls.enabled:
                    LOG.warning(
                        "tls.mode is DISABLE: traffic to the database is NOT encrypted",
                        extra={"fields": {"db": rt.name}},
                    )
                if rt.db.tls.insecureSkipVerify:
                    LOG.warning(
                        "insecureSkipVerify is on: the server certificate and name are NOT verified",
                        extra={"fields": {"db": rt.name}},
                    )
            except ConfigError as exc:
                problems.append(f"{rt.name}: {exc.message}")
                LOG.error("TLS material not loaded", extra={"fields": {"db": rt.name, "error": exc.message}})
        return problems

    def log_resolver(self) -> None:
        """dns.mode direct: say where names will be asked, or why they cannot be (the start goes on:
        each connection reports the problem, and a fixed resolv.conf is picked up when it changes)."""
        resolver = self.dialer.resolver
        if resolver is None:
            return
        setup = resolver.setup()
        if setup.problem:
            LOG.error(
                "dns mode direct: names cannot be resolved",
                extra={"fields": {"error": setup.problem}},
            )
            return
        fields = {
            "nameservers": ",".join(setup.nameservers),
            "search": ",".join(setup.search) or "none",
            "ndots": setup.ndots,
            "resolv_conf": resolver.config.resolvConf,
        }
        LOG.info("dns mode direct: names are resolved through DNS only, never /etc/hosts", extra={"fields": fields})

    def log_data_plane(self) -> None:
        """Say who moves the bytes, per database (and why not native, when it was asked for)."""
        if self.config.dataPlane == "python":
            return
        if self.plane is None:
            # asked for: a warning; the default (auto) on a build without the extension: news
            LOG.log(
                logging.WARNING if self.config.dataPlane == "native" else logging.INFO,
                "dataPlane native is not available: using the python data plane",
                extra={"fields": {"error": self.plane_problem}},
            )
            return
        native = [name for name, rt in self.runtimes.items() if rt.native is not None]
        python = [name for name, rt in self.runtimes.items() if rt.native is None]
        fields: dict[str, object] = {"native": ",".join(native) or "none", "threads": self.plane.threads}
        if python:
            fields["python"] = ",".join(python)
            fields["why"] = "their session drivers run on the python plane only"
        LOG.info("data plane native", extra={"fields": fields})

    async def start(self) -> None:
        before, after = self.fd_limits
        LOG.info(
            "connection limits",
            extra={
                "fields": {
                    "fd_limit": after if after == before else f"{after} (raised from {before})",
                    "max_connections": self.admission.max_connections,
                }
            },
        )
        self.log_resolver()
        self.log_data_plane()
        if self.plane is not None:
            self.plane.start()
        self.load_material()
        self.start_pools()
        loop = asyncio.get_running_loop()
        for rt in self.runtimes.values():
            listen = rt.db.listen

            def factory(rt: DatabaseRuntime = rt) -> _Accepted:
                return _Accepted(self, rt)

            try:
                if listen.startswith("unix:"):
                    path = listen[len("unix:") :]
                    _remove_stale_socket(path)
                    # bind under umask 0117: the socket is created 0660, never more open even briefly
                    old_umask = os.umask(0o117)
                    try:
                        server = await loop.create_unix_server(factory, path, backlog=1024)
                    finally:
                        os.umask(old_umask)
                    st = os.stat(path)
                    self._unix_bound[path] = (st.st_dev, st.st_ino)
                else:
                    host, port = split_host_port(listen)
                    server = await loop.create_server(factory, host, port, reuse_address=True, backlog=1024)
            except (OSError, ConfigError) as exc:
                await self.close_listeners()
                if isinstance(exc, ConfigError):
                    raise
                raise ConfigError(
                    f"cannot listen on {listen}: {exc.strerror or exc}", path=f"databases[{rt.name}].listen"
                ) from None
            self._servers.append(server)
            rt.listening = True
            LOG.info(
                "listening",
                extra={
                    "fields": {
                        "db": rt.name,
                        "protocol": rt.db.protocol,
                        "listen": listen,
                        "upstream": rt.db.address,
                        "tls": rt.db.tls.mode,
                    }
                },
            )

    def start_pools(self) -> None:
        """preconnect: start keeping upstream connections ready (dbmtls.proxy.preconnect)."""
        for rt in self.runtimes.values():
            if rt.db.preconnect.connections and rt.tls.enabled:
                rt.pool = Pool(rt)
                rt.pool.start()

    # --- connections -----------------------------------------------------------------

    def _accepted(self, ep: Endpoint, rt: DatabaseRuntime) -> None:
        if self.draining:
            ep.abort()
            return
        verdict = self.admission.decide(rt.db.maxConnections, rt.relayed)
        if verdict is Verdict.DROP:
            ep.abort()
            self.admission.dropped += 1
            rt.stats.handshake_failures[Reason.TOO_MANY_CONNECTIONS] += 1
            if self.admission.should_log_drop():
                LOG.error(
                    "connections dropped at accept: no file descriptor left to answer them",
                    extra={"fields": {"db": rt.name, "dropped_so_far": self.admission.dropped}},
                )
            return
        conn = Conn(rt, ep, _peer_name(ep))
        if verdict is Verdict.REFUSE:
            per_db = rt.db.maxConnections
            if per_db is not None and rt.relayed >= per_db:
                why = f"{rt.relayed} open to this database (maxConnections {per_db})"
            else:
                why = f"{self.admission.relayed} open in dbmtls (limit {self.admission.max_connections})"
            conn.refused = TooManyConnections(f"too many connections: {why}")
            self.admission.refusing += 1
        else:
            self.admission.relayed += 1
            rt.relayed += 1
        rt.stats.accepted += 1
        rt.active.add(conn)
        task = asyncio.get_running_loop().create_task(self._run(conn))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, conn: Conn) -> None:
        rt = conn.rt
        try:
            failure = await self._session(conn)
            if failure is not None:
                await self._tell(conn, failure)
        except asyncio.CancelledError:
            _abort(conn)
            raise
        except Exception:
            LOG.exception("internal error on a connection", extra={"fields": {"db": rt.name}})
            _abort(conn)
        finally:
            if conn.refused is not None:
                self.admission.refusing -= 1
            else:
                self.admission.relayed -= 1
                rt.relayed -= 1
            rt.active.discard(conn)
            keep_session(conn, replied=False)
            rt.stats.closed += 1
            rt.stats.bytes_from_app += conn.bytes_from_app
            rt.stats.bytes_from_upstream += conn.bytes_from_upstream
            self._log_close(conn)

    async def _session(self, conn: Conn) -> DbmtlsError | None:
        """Run the session; a failure it raises is recorded here, once (the log line and the
        metric read ``conn.error``), and returned to be told to the app."""
        try:
            await self.sessions[conn.rt.name].run(conn)
        except DbmtlsError as exc:
            err = exc.with_database(conn.rt.name)
            conn.error = err
            conn.rt.stats.record_failure(err)
            if conn.upstream is not None:
                conn.upstream.abort_if_open()  # whatever the session left open is useless now
            return err
        return None

    async def _tell(self, conn: Conn, err: DbmtlsError) -> None:
        """Tell the app in its protocol; whatever goes wrong doing so, its connection ends."""
        try:
            await tell_app(conn.app, conn.notice, err)
        except OSError:
            conn.app.abort()
        except Exception:
            LOG.exception("internal error telling the app", extra={"fields": {"db": conn.rt.name}})
            conn.app.abort()

    def _log_close(self, conn: Conn) -> None:
        err = conn.error
        fields = {
            "db": conn.rt.name,
            "client": conn.peer,
            "user": conn.user,
            "bytes_in": conn.bytes_from_app,
            "bytes_out": conn.bytes_from_upstream,
            "duration": f"{time.monotonic() - conn.started:.3f}s",
            "tls": conn.tls_version,
            "cipher": conn.cipher,
            "tls_resumed": conn.tls_resumed if conn.tls_version else None,
            "preconnected": conn.preconnected or None,
            "note": conn.note,
        }
        if err is None:
            CONN_LOG.info("connection closed", extra={"fields": fields})
        else:
            fields["reason"] = err.reason
            fields["error"] = err.message
            if err.hint:
                fields["hint"] = err.hint
            CONN_LOG.warning("connection failed", extra={"fields": fields})

    # --- shutdown --------------------------------------------------------------------

    async def close_listeners(self) -> None:
        for server in self._servers:
            server.close()
        for rt in self.runtimes.values():
            rt.listening = False
        # Remove only the socket files this process bound and that are still ours: another
        # instance may have taken the path over (an overlapping restart).
        for path, ident in self._unix_bound.items():
            with contextlib.suppress(OSError):
                st = os.stat(path)
                if (st.st_dev, st.st_ino) == ident:
                    os.unlink(path)
        self._unix_bound.clear()
        self._servers.clear()

    def close_all(self) -> None:
        """Cancel every connection task (each closes its sockets)."""
        for task in list(self._tasks):
            task.cancel()

    async def drain(self, grace: float) -> None:
        """Stop accepting, let open connections finish for ``grace`` seconds, then close the rest."""
        if self.draining:
            return
        self.draining = True
        active = sum(len(rt.active) for rt in self.runtimes.values())
        LOG.info("draining", extra={"fields": {"open_connections": active, "timeout": f"{grace:g}s"}})
        await self.close_listeners()
        for rt in self.runtimes.values():
            if rt.pool is not None:
                await rt.pool.close()
                rt.pool = None
        if self._tasks:
            _done, pending = await asyncio.wait(list(self._tasks), timeout=grace)
            if pending:
                LOG.warning("drain timeout: closing remaining connections", extra={"fields": {"count": len(pending)}})
                for t in pending:
                    t.cancel()
                await asyncio.wait(pending, timeout=5)
        if self.plane is not None:
            self.plane.close()  # every native connection is over (its task waited for it)
        self.stopped.set()


def _abort(conn: Conn) -> None:
    """Drop every socket of a session that is being cancelled or failed internally."""
    if conn.relay is not None:
        conn.relay.abort()
    if conn.upstream is not None:
        conn.upstream.abort()
    conn.app.abort()


def _remove_stale_socket(path: str) -> None:
    """Replace a socket file nobody listens on (left by a crash); refuse anything else."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise ConfigError(f"cannot listen on unix:{path}: the path exists and is not a socket", path="listen")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(path)
    except OSError:
        os.unlink(path)  # stale: nobody accepts on it
        return
    finally:
        s.close()
    raise ConfigError(f"cannot listen on unix:{path}: another process is listening on it", path="listen")

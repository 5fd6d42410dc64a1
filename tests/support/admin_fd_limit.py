"""An AdminServer alone in a process whose descriptors the test can use up: ``python -m support.admin_fd_limit``.

RLIMIT_NOFILE is per process, so running out of descriptors is tried here, never in the
test process.  Protocol, one line each way: it prints ``port N`` once listening; on ``fill``
it opens /dev/null until EMFILE and prints ``full N``; on ``free`` it closes them again and
prints ``freed``.  Its log goes to stderr.
"""

from __future__ import annotations

import asyncio
import os
import resource
import sys
import threading
from collections.abc import Mapping

import uvloop

from dbmtls.admin.server import AdminServer
from dbmtls.config.model import Config
from dbmtls.logs import setup_logging
from dbmtls.proxy.runtime import DatabaseRuntime
from dbmtls.tls.reload import ReloadCounts
from support.net import free_port

NOFILE = 256


class _Control:
    config = Config()

    @property
    def runtimes(self) -> Mapping[str, DatabaseRuntime]:
        return {}

    @property
    def reload_counts(self) -> Mapping[str, ReloadCounts]:
        return {}

    def readiness(self) -> list[str]:
        return []

    def request_shutdown(self, why: str) -> None:
        pass

    async def reload(self, why: str) -> list[str]:
        return []


async def main() -> None:
    setup_logging("info", "text")
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
    server = AdminServer(_Control(), f"127.0.0.1:{free_port()}")
    await server.start()
    loop = asyncio.get_running_loop()
    hog: list[int] = []
    done = asyncio.Event()

    def fill() -> None:
        try:
            while True:
                hog.append(os.open(os.devnull, os.O_RDONLY))
        except OSError:
            pass
        print(f"full {len(hog)}", flush=True)

    def free() -> None:
        for fd in hog:
            os.close(fd)
        hog.clear()
        print("freed", flush=True)

    def commands() -> None:  # a thread: reading stdin needs no new descriptor, even when there are none
        for line in sys.stdin:
            action = {"fill": fill, "free": free}.get(line.strip())
            if action is not None:
                loop.call_soon_threadsafe(action)
        loop.call_soon_threadsafe(done.set)

    threading.Thread(target=commands, daemon=True).start()
    print(f"port {server.ports[0]}", flush=True)
    await done.wait()
    free()
    await server.stop()


if __name__ == "__main__":
    uvloop.run(main())

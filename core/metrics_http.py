"""A small private HTTP server in the process's own event loop: the gateway's and the workers'
metrics port (`/metrics`, and the worker's `/healthz`), apart from the public API port.

uvicorn (already what serves the API) runs a tiny ASGI app as a second server on the running
loop. Its signal handling is left to the process's main server (or the worker's own handlers):
this one only stops when `stop()` is awaited. A scrape answered here also proves the loop is
not wedged, which is what the worker's liveness probe relies on.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import uvicorn

log = logging.getLogger(__name__)

START_TIMEOUT_S = 10.0


class _Server(uvicorn.Server):
    """uvicorn's server without its signal handlers: the process's own ones stay in place."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class MetricsServer:
    """`await MetricsServer.start(app, host, port)` ... `await server.stop()`."""

    def __init__(self, server: _Server, task: asyncio.Task[None]) -> None:
        self._server = server
        self._task = task

    @classmethod
    async def start(cls, app: Any, host: str, port: int) -> MetricsServer:
        """Serve `app` on host:port; raises RuntimeError if the port can't be bound."""
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            lifespan="off",
            access_log=False,
            log_config=None,
            server_header=False,
            http="h11",
            timeout_keep_alive=5,
            limit_concurrency=32,
        )
        server = _Server(config)
        task = asyncio.create_task(server.serve(), name=f"metrics-server:{port}")
        deadline = asyncio.get_running_loop().time() + START_TIMEOUT_S
        while not server.started:
            if task.done() or asyncio.get_running_loop().time() > deadline:
                server.should_exit = True
                with contextlib.suppress(BaseException):  # uvicorn exits with SystemExit
                    await task
                raise RuntimeError(f"metrics server: could not listen on {host}:{port}")
            await asyncio.sleep(0.01)
        log.info("metrics on http://%s:%d/metrics", host, port)
        return cls(server, task)

    @property
    def port(self) -> int:
        """The bound port (the one asked for, or the one chosen for port 0)."""
        for srv in self._server.servers:
            for sock in srv.sockets:
                return int(sock.getsockname()[1])
        return 0

    async def stop(self) -> None:
        self._server.should_exit = True
        with contextlib.suppress(TimeoutError):  # past it, wait_for cancels the server
            await asyncio.wait_for(self._task, 5.0)

"""Server test helpers: servers in this process or as subprocesses, /health and /metrics polling.

Servers are never waited for with a sleep: ``wait_healthy`` polls /health until a deadline.
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx

STARTUP_SECONDS = 60


def load_engine(package: Path, **config):
    """The package's engine, as ``python PKG serve`` loads it (``config``: EngineConfig fields)."""
    from llmc.runtime.engine import EngineConfig, LLMEngine

    return LLMEngine.from_package(package, config=EngineConfig(**config))


def wait_healthy(url: str, process: subprocess.Popen | None = None, deadline_s: float = STARTUP_SECONDS) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}:\n{process.stdout.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.02)  # poll interval, not a wait for readiness
    raise AssertionError(f"{url}/health did not answer 200 within {deadline_s} s")


def poll_until(condition, deadline_s: float = 20, what: str = "condition"):
    """Call ``condition()`` until it returns something truthy; that value, or an AssertionError."""
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"{what} did not hold within {deadline_s} s")


class InProcessServer:
    """uvicorn serving ``app`` on a free port in a background thread."""

    def __init__(self, app) -> None:
        import uvicorn

        self.socket = socket.socket()
        # asyncio sets TCP_NODELAY only on sockets created with proto IPPROTO_TCP (this one has 0);
        # without it Nagle's algorithm delays each keep-alive response ~40 ms. Accepted sockets inherit it.
        self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on",
                                                    timeout_graceful_shutdown=5))
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve(sockets=[self.socket])),
                                       daemon=True)

    def __enter__(self) -> "InProcessServer":
        self.thread.start()
        wait_healthy(self.url)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.socket.close()


@contextmanager
def serving(engine, **app_options):
    from llmc.runtime.server import create_app

    with InProcessServer(create_app(engine, **app_options)) as server:
        yield server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_process(package: Path, *args: str, env: dict | None = None):
    """``python PKG serve --port P ARGS``; yields (process, url). Killed at the end if still running."""
    port = free_port()
    command = [sys.executable, str(package), "serve", "--port", str(port), *args]
    full_env = {**os.environ, **(env or {})}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(url, process)
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def metric(text: str, name: str, labels: str = "") -> float:
    """The value of ``name{labels}`` in Prometheus exposition ``text``."""
    prefix = f"{name}{{{labels}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    raise AssertionError(f"{prefix.strip()} not in /metrics:\n{text}")

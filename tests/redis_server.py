"""A throwaway ``redis-server`` for the tests and the benchmark: loopback only, a free port,
a temporary directory, no persistence (``--save "" --appendonly no``).

It can be stopped and started again on the same port (Redis restarted: empty, and its
script cache gone), or paused with SIGSTOP (Redis hung: connections are accepted by the
kernel but nothing answers), which is how the tests produce real failures without a mock.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def ping(port: int, timeout: float = 0.2) -> bool:
    """True when a Redis answers PING on ``port`` (raw RESP, no client library needed)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """``with RedisServer() as server: server.url``; ``binary`` defaults to the one on PATH."""

    def __init__(self, binary: str | None = None, port: int | None = None) -> None:
        found = binary or shutil.which("redis-server")
        if found is None:
            raise FileNotFoundError("redis-server is not on PATH")
        self.binary = found
        self.port = port or free_port()
        self._tmp = tempfile.TemporaryDirectory(prefix="shield-redis-")
        self.directory = Path(self._tmp.name)
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start (or start again, on the same port) and wait until it answers PING."""
        log = (self.directory / "redis.log").open("ab")
        self._process = subprocess.Popen(
            [
                self.binary,
                *f"--port {self.port} --bind 127.0.0.1 --appendonly no --daemonize no".split(),
                *["--save", "", "--dir", str(self.directory)],
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not ping(self.port):
            if self._process.poll() is not None:
                tail = (self.directory / "redis.log").read_text(errors="replace")[-2000:]
                raise RuntimeError(f"redis-server exited with {self._process.returncode}: {tail}")
            if time.monotonic() > deadline:
                self.stop()
                raise TimeoutError(f"redis-server did not answer on port {self.port}")
            time.sleep(0.01)

    def stop(self) -> None:
        """Kill it, as a crash would (nothing is persisted, so nothing is lost by it)."""
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.kill()  # also ends a paused server; SIGTERM would wait for a cron tick
            process.wait(timeout=10)

    def pause(self) -> None:
        """Freeze it (SIGSTOP): connections hang instead of being refused."""
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self._process is not None
        os.kill(self._process.pid, signal.SIGCONT)

    def close(self) -> None:
        self.stop()
        self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close()

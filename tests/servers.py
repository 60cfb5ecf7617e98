"""Running an example server as a real process (uvicorn on a free loopback port)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def running(script: Path, log: Path, env: dict[str, str] | None = None) -> Iterator[str]:
    """Start ``python script`` with ``PORT`` set, wait (15 s at most) until ``/health``
    answers, yield its base URL, and always stop it. Its output goes to ``log``."""
    port = free_port()
    environment = {**os.environ, "PORT": str(port), "PYTHONUNBUFFERED": "1", **(env or {})}
    base = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, str(script)], env=environment, stdout=out, stderr=subprocess.STDOUT
        )
        try:
            deadline = time.monotonic() + 15
            while True:
                assert process.poll() is None, f"server exited early:\n{log.read_text()}"
                assert time.monotonic() < deadline, f"server not up in 15 s:\n{log.read_text()}"
                try:
                    if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                time.sleep(0.05)
            yield base
        finally:
            process.terminate()
            try:
                process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()

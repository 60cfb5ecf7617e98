"""HTTP to the audited endpoint: a loopback check first, then one request at a time.

The standard library's ``http.client`` on one kept-alive connection: the audit sends its
requests one after another (an attacker's adaptive queries depend on the answers), which
keeps the load on the owner's server modest and the timings honest.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from ..errors import ConfigurationError

REPORTED_HEADERS = ("ratelimit", "ratelimit-policy", "retry-after", "content-type")


@dataclass(frozen=True)
class Target:
    scheme: str
    host: str
    port: int
    path: str
    addresses: tuple[str, ...]

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.path}"


def resolve_target(url: str, allow_remote: bool = False) -> Target:
    """The target of ``url``; unless ``allow_remote``, every address its host resolves to
    must be loopback (127.0.0.0/8 or ::1; ``localhost`` resolves there)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(
            f"--target {url!r}: expected an http(s) URL of the endpoint, e.g. "
            "'http://127.0.0.1:8000/v1/models/NAME:predict'"
        )
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError:
        raise ConfigurationError(f"--target {url!r}: the port is not a number") from None
    host = parts.hostname
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise ConfigurationError(f"--target {url!r}: cannot resolve {host!r} ({exc})") from None
    addresses = tuple(sorted({str(info[4][0]) for info in infos}))
    remote = [a for a in addresses if not ipaddress.ip_address(a.split("%")[0]).is_loopback]
    if remote and not allow_remote:
        raise ConfigurationError(
            f"--target {url!r}: {host} resolves to {', '.join(remote)}, not a loopback "
            "address; the audit sends attack traffic, so it only targets this machine "
            "unless --allow-remote is given (audit only endpoints you own)"
        )
    path = parts.path or "/"
    if parts.query:
        path += "?" + parts.query
    return Target(parts.scheme, host, port, path, addresses)


def parse_headers(templates: list[str]) -> list[tuple[str, str]]:
    """``'Name: value'`` templates; ``{key}`` in a value becomes each identity's key."""
    headers: list[tuple[str, str]] = []
    for template in templates:
        name, colon, value = template.partition(":")
        if not colon or not name.strip() or " " in name.strip():
            raise ConfigurationError(
                f"--header {template!r}: expected 'Name: value', e.g. 'X-API-Key: {{key}}'"
            )
        headers.append((name.strip(), value.strip()))
    if not any("{key}" in value for _, value in headers):
        raise ConfigurationError(
            "--header: no header carries '{key}', so every simulated identity would look "
            "the same to the shield; e.g. --header 'X-API-Key: {key}' or "
            "--header 'Authorization: Bearer {key}'"
        )
    return headers


@dataclass(frozen=True)
class Reply:
    """One response: ``status`` 0 when the request itself failed (``error`` says why)."""

    status: int
    seconds: float
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


class Client:
    """POSTs JSON bodies to the target, as the identity whose key is given."""

    def __init__(self, target: Target, headers: list[tuple[str, str]], timeout: float) -> None:
        self.target = target
        self.headers = headers
        self.timeout = timeout
        self._connection: http.client.HTTPConnection | None = None
        self.requests = 0

    def _connect(self) -> http.client.HTTPConnection:
        if self._connection is None:
            kind = (
                http.client.HTTPSConnection
                if self.target.scheme == "https"
                else http.client.HTTPConnection
            )
            self._connection = kind(self.target.host, self.target.port, timeout=self.timeout)
        return self._connection

    def post(self, body: bytes, key: str) -> Reply:
        headers = {name: value.replace("{key}", key) for name, value in self.headers}
        headers["Content-Type"] = "application/json"
        self.requests += 1
        started = time.perf_counter()
        for attempt in (1, 2):  # a kept-alive connection the server closed: one retry
            connection = self._connect()
            try:
                connection.request("POST", self.target.path, body=body, headers=headers)
                response = connection.getresponse()
                data = response.read()
            except (OSError, http.client.HTTPException) as exc:
                self.close()
                if attempt == 2:
                    return Reply(0, time.perf_counter() - started, error=type(exc).__name__)
                continue
            kept = {k.lower(): v for k, v in response.getheaders() if k.lower() in REPORTED_HEADERS}
            return Reply(response.status, time.perf_counter() - started, data, kept)
        raise AssertionError("unreachable")

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None

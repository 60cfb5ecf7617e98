"""Who is asking: API key, bearer token, custom callable or client IP.

Sources are tried in the configured order (``IDENTITY=header:x-api-key,bearer,ip``)
and the first that yields a value wins. Keys and tokens are kept only as keyed
BLAKE2b hashes. The client IP is the ASGI peer, or, when the peer is a trusted proxy,
the first untrusted hop of ``X-Forwarded-For`` (or ``Forwarded``), walked from the
right as uvicorn's ``ProxyHeadersMiddleware`` does; addresses are aggregated to a
prefix (IPv4 /32, IPv6 /64 by default) so that one host cannot rotate through the
addresses of its own subnet.
"""

from __future__ import annotations

import hashlib
import inspect
import ipaddress
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal

from cachetools import LRUCache
from starlette.types import Scope

from .keys import derive_key

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
Identify = Callable[[Scope], str | Awaitable[str | None] | None]
ProxyHeader = Literal["x-forwarded-for", "forwarded"]

ANONYMOUS_KEY = "anonymous"
HASHED_KEY = re.compile(r"^(?:(?:header|bearer|ip|custom):[0-9a-f]{24}|anonymous)$")
"""What :meth:`IdentityResolver.hash` produces (and the shared anonymous identity)."""
_TOKEN = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+")  # an HTTP field name (RFC 9110 token)


@dataclass(slots=True)
class Identity:
    """A client as the shield knows it.

    ``key`` is what state is stored under and what events show: a keyed hash, never a
    raw API key. ``network`` is the client's aggregated IP prefix when known (for the
    pooled views of the monitor), whichever source identified it.
    """

    key: str
    source: str
    network: IPNetwork | None = None


def parse_sources(specs: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """Validate identity sources: ``header:<name>``, ``bearer``, ``ip``."""
    sources: list[tuple[str, str]] = []
    for raw in specs:
        spec = raw.strip()
        kind, _, arg = spec.partition(":")
        kind = kind.strip().lower()
        if kind == "header" and _TOKEN.fullmatch(arg.strip()):
            sources.append(("header", arg.strip().lower()))
        elif kind in ("bearer", "ip") and not arg:
            sources.append((kind, ""))
        else:
            raise ValueError(
                f"{spec!r} is not an identity source: expected 'header:<name>', 'bearer' or "
                "'ip', comma-separated in order of preference"
            )
    if not sources:
        raise ValueError("at least one identity source is needed, e.g. 'header:x-api-key,ip'")
    return tuple(sources)


def parse_networks(specs: Sequence[str]) -> tuple[IPNetwork, ...] | Literal["*"]:
    """Validate trusted proxies: CIDRs or addresses, or ``*`` for any peer."""
    cleaned = [s.strip() for s in specs if s.strip()]
    if cleaned == ["*"]:
        return "*"
    networks: list[IPNetwork] = []
    for spec in cleaned:
        try:
            network = ipaddress.ip_network(spec, strict=False)
        except ValueError:
            raise ValueError(
                f"{spec!r} is not an IP address or CIDR: expected e.g. '10.0.0.0/8', "
                "'127.0.0.1' or '::1', or '*' alone to trust every peer"
            ) from None
        mapped = network.network_address.ipv4_mapped if network.version == 6 else None
        if mapped is not None and network.prefixlen >= 96:
            # Peers are compared as IPv4 (parse_ip unmaps them): unmap the network too.
            network = ipaddress.ip_network((mapped, network.prefixlen - 96), strict=False)
        networks.append(network)
    return tuple(networks)


@lru_cache(maxsize=8192)
def parse_ip(host: str) -> IPAddress | None:
    """An IP from a header or ASGI host: tolerates ``[v6]``, ``v4:port``, ``[v6]:port``, quotes."""
    text = host.strip().strip('"')
    if text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def parse_x_forwarded_for(value: str) -> list[str]:
    """Hops of ``X-Forwarded-For``, nearest last."""
    return [hop.strip() for hop in value.split(",")]


def parse_forwarded(value: str) -> list[str]:
    """The ``for=`` node of each element of ``Forwarded`` (RFC 7239), nearest last.

    An element without ``for=`` gives an empty string so that hop positions are kept.
    """
    hops: list[str] = []
    for element in _split_quoted(value, ","):
        node = ""
        for pair in _split_quoted(element, ";"):
            name, _, val = pair.partition("=")
            if name.strip().lower() == "for":
                node = val.strip().strip('"')
        hops.append(node)
    return hops


def _split_quoted(value: str, sep: str) -> list[str]:
    """Split on ``sep`` outside quoted strings; naively when the quotes do not balance.

    Only the client writes unbalanced quotes (proxies append well-formed elements), and
    a quote left open must not swallow the hops a proxy appended after it.
    """
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for char in value:
        if char == '"':
            quoted = not quoted
        if char == sep and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if quoted:
        return value.split(sep)
    parts.append("".join(current))
    return parts


class ProxyResolver:
    """The client address, honouring forwarding headers only from trusted proxies."""

    def __init__(
        self,
        trusted: tuple[IPNetwork, ...] | Literal["*"] = (),
        header: ProxyHeader = "x-forwarded-for",
    ) -> None:
        self.trusted = trusted
        self.header = header.encode("latin-1")
        self._parse = parse_x_forwarded_for if header == "x-forwarded-for" else parse_forwarded

    def is_trusted(self, ip: IPAddress) -> bool:
        if self.trusted == "*":
            return True
        return any(ip in net for net in self.trusted)

    def client_ip(self, scope: Scope) -> IPAddress | None:
        client = scope.get("client")
        peer = parse_ip(str(client[0])) if client else None
        if peer is None or not self.trusted or not self.is_trusted(peer):
            return peer
        # Several header lines are one list, in order (RFC 9110 section 5.3); each line is
        # parsed on its own so that what a client wrote on one cannot spill into the next.
        hops = [
            hop
            for key, value in scope["headers"]
            if key == self.header
            for hop in self._parse(bytes(value).decode("latin-1"))
        ]
        if not hops:
            return peer
        nearest = peer
        for hop in reversed(hops):
            ip = parse_ip(hop)
            if ip is None:
                return nearest  # malformed or obfuscated: the nearest hop we can trust
            if not self.is_trusted(ip):
                return ip
            nearest = ip
        return nearest


@lru_cache(maxsize=8192)
def _aggregate(ip: IPAddress, v4_prefix: int, v6_prefix: int) -> IPNetwork:
    prefix = v4_prefix if ip.version == 4 else v6_prefix
    return ipaddress.ip_network((ip, prefix), strict=False)


class IdentityResolver:
    """Turns a request scope into an :class:`Identity` (or ``None`` when nothing identifies it)."""

    def __init__(
        self,
        sources: Sequence[tuple[str, str]],
        secret: bytes,
        proxies: ProxyResolver | None = None,
        ipv4_prefix: int = 32,
        ipv6_prefix: int = 64,
        identify: Identify | None = None,
    ) -> None:
        self.sources = tuple(sources)
        # Header names looked up per request, encoded once.
        self._lookups = tuple(
            (kind, arg, (arg if kind == "header" else "authorization").encode("latin-1"))
            for kind, arg in self.sources
        )
        self._hasher = hashlib.blake2b(key=derive_key(secret, "identity"), digest_size=12)
        self.proxies = proxies or ProxyResolver()
        self.ipv4_prefix = ipv4_prefix
        self.ipv6_prefix = ipv6_prefix
        self.identify = identify
        self.with_network = True
        """Whether identities carry the client's network even when a key identified them."""
        # Addresses are not secrets: their hashes are cached (bounded) to save work per request.
        self._ip_keys: LRUCache[IPNetwork, str] = LRUCache(maxsize=16_384)
        self._peer_networks: dict[str, IPNetwork | None] = {}

    def hash(self, source: str, value: str) -> str:
        """Keyed hash of a raw identifying value: what is stored instead of the value."""
        hasher = self._hasher.copy()  # cheaper than re-keying BLAKE2b per request
        hasher.update(f"{source}\x00{value}".encode("utf-8", "surrogatepass"))
        return f"{source}:{hasher.hexdigest()}"

    def keys_for(self, value: str) -> list[str]:
        """The hashed keys a raw identifying value (an API key, a token, an address) has
        under each configured source, in their order: what introspection looks up."""
        keys: list[str] = []
        if self.identify is not None:
            keys.append(self.hash("custom", value))
        for kind, arg in self.sources:
            if kind == "ip":
                ip = parse_ip(value)
                if ip is not None:
                    network = _aggregate(ip, self.ipv4_prefix, self.ipv6_prefix)
                    keys.append(self.hash("ip", str(network)))
            else:
                keys.append(self.hash(kind, value if kind == "bearer" else f"{arg}:{value}"))
        return keys

    def network(self, scope: Scope) -> IPNetwork | None:
        if not self.proxies.trusted:  # the peer is the client: cache by its address string
            client = scope.get("client")
            host = str(client[0]) if client else ""
            try:
                return self._peer_networks[host]
            except KeyError:
                pass
            if len(self._peer_networks) >= 16_384:
                self._peer_networks.clear()
            network = self._peer_networks[host] = self._aggregate(scope)
            return network
        return self._aggregate(scope)

    def _aggregate(self, scope: Scope) -> IPNetwork | None:
        ip = self.proxies.client_ip(scope)
        return None if ip is None else _aggregate(ip, self.ipv4_prefix, self.ipv6_prefix)

    async def resolve(self, scope: Scope) -> Identity | None:
        """The identity of a request: the custom ``identify`` first, then the sources."""
        if self.identify is not None:
            value = self.identify(scope)
            if inspect.isawaitable(value):
                value = await value
            if value:
                return Identity(self.hash("custom", str(value)), "custom", self.network(scope))
        return self.from_sources(scope)

    def from_sources(self, scope: Scope) -> Identity | None:
        """The identity from the configured sources alone (no custom callable, no await).

        The client's network is filled in when ``with_network`` is set (the monitor's pools
        need it) or when the identity is the IP itself.
        """
        network = self.network(scope) if self.with_network else None
        headers = scope["headers"]
        for kind, arg, name in self._lookups:
            if kind == "ip":
                if network is None:
                    network = self.network(scope)
                if network is not None:
                    key = self._ip_keys.get(network)
                    if key is None:
                        key = self._ip_keys[network] = self.hash("ip", str(network))
                    return Identity(key, "ip", network)
                continue
            value = _header_value(headers, name)
            if value and kind == "bearer":
                scheme, _, token = value.partition(" ")
                value = token.strip() if scheme.lower() == "bearer" else ""
            if value:
                return Identity(
                    self.hash(kind, value if kind == "bearer" else f"{arg}:{value}"), kind, network
                )
        return None


def _header_value(headers: list[tuple[bytes, bytes]], name: bytes) -> str:
    for key, value in headers:
        if key == name:
            return bytes(value).decode("latin-1").strip()
    return ""

"""Identity: who is asking (API key, bearer token, custom callable, client IP).

``ProxyResolver.client_ip`` is tested with hand-built scopes in the style of uvicorn's
``ProxyHeadersMiddleware`` tests; ``IdentityResolver`` source by source; and the whole
thing through the real middleware with an httpx ``ASGITransport``.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import httpx
import pytest

from asgi_extraction_shield import ExtractionShield
from asgi_extraction_shield.identity import (
    ANONYMOUS_KEY,
    IdentityResolver,
    ProxyResolver,
    parse_networks,
    parse_sources,
)

SECRET = b"s" * 32
TRUSTED = "127.0.0.1,::1,10.0.0.0/8,2001:db8:ffff::/48"
MISSING = object()  # no "client" key in the scope at all


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def make_scope(
    client: Any = ("203.0.113.7", 1234), headers: list[tuple[str, str]] | tuple = ()
) -> dict[str, Any]:
    scope: dict[str, Any] = {
        "type": "http",
        "path": "/predict",
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
    }
    if client is not MISSING:
        scope["client"] = client
    return scope


def ip(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    return None if text is None else ipaddress.ip_address(text)


def proxy(trusted: str, header: str = "x-forwarded-for") -> ProxyResolver:
    return ProxyResolver(parse_networks(trusted.split(",")), header)  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------
# ProxyResolver.client_ip, X-Forwarded-For
# --------------------------------------------------------------------------------------

XFF = "x-forwarded-for"

# fmt: off
XFF_CASES = [
    # untrusted peers: whatever the header says, the peer is the client
    pytest.param(TRUSTED, "203.0.113.7", [(XFF, "1.2.3.4")], "203.0.113.7", id="untrusted-peer-spoofed-xff-ignored"),
    pytest.param(TRUSTED, "203.0.113.7", [(XFF, "10.0.0.1, 127.0.0.1")], "203.0.113.7", id="untrusted-peer-spoofed-trusted-hops-ignored"),
    pytest.param("", "127.0.0.1", [(XFF, "1.2.3.4")], "127.0.0.1", id="no-trusted-proxies-header-ignored"),
    pytest.param("10.0.0.0/8", "::1", [(XFF, "1.2.3.4")], "::1", id="untrusted-ipv6-peer"),
    # trusted peers: walk right to left to the first untrusted hop
    pytest.param(TRUSTED, "127.0.0.1", [(XFF, "1.2.3.4")], "1.2.3.4", id="trusted-peer-single-hop"),
    pytest.param(TRUSTED, "127.0.0.1", [(XFF, "1.2.3.4, 5.6.7.8, 10.0.0.2")], "5.6.7.8", id="chain-first-untrusted-from-right"),
    pytest.param(TRUSTED, "10.0.0.1", [(XFF, "6.6.6.6, 198.51.100.9")], "198.51.100.9", id="spoofed-leftmost-hop-not-believed"),
    pytest.param(TRUSTED, "10.0.0.1", [(XFF, "6.6.6.6, 198.51.100.9, 10.9.9.9, 10.8.8.8")], "198.51.100.9", id="walk-past-several-trusted-hops"),
    pytest.param(TRUSTED, "127.0.0.1", [(XFF, "10.1.1.1, 10.2.2.2")], "10.1.1.1", id="all-hops-trusted-leftmost"),
    pytest.param(TRUSTED, "::1", [(XFF, "198.51.100.7")], "198.51.100.7", id="trusted-ipv6-peer"),
    pytest.param(TRUSTED, "2001:db8:ffff::5", [(XFF, "2001:db8::1")], "2001:db8::1", id="trusted-ipv6-cidr-peer-ipv6-hop"),
    pytest.param(TRUSTED, "127.0.0.1", [(XFF, "  1.2.3.4  ,  10.0.0.7 ")], "1.2.3.4", id="whitespace-around-hops"),
    # '*' trusts every peer (and so every hop)
    pytest.param("*", "203.0.113.7", [(XFF, "1.2.3.4")], "1.2.3.4", id="star-trusts-any-peer"),
    pytest.param("*", "203.0.113.7", [(XFF, "1.2.3.4, 5.6.7.8")], "1.2.3.4", id="star-all-trusted-leftmost"),
    pytest.param("*", "203.0.113.7", [(XFF, "1.2.3.4, junk, 5.6.7.8")], "5.6.7.8", id="star-malformed-stops-walk"),
    # several header lines are one list, in order
    pytest.param(TRUSTED, "127.0.0.1", [(XFF, "198.51.100.1"), (XFF, "198.51.100.2")], "198.51.100.2", id="two-lines-joined-in-order"),
    pytest.param(TRUSTED, "127.0.0.1", [(XFF, "198.51.100.1, 10.0.0.3"), (XFF, "10.0.0.4")], "198.51.100.1", id="two-lines-walked-across"),
    pytest.param(TRUSTED, "127.0.0.1", [(XFF, "198.51.100.1"), ("x-other", "5.5.5.5"), (XFF, "10.0.0.4")], "198.51.100.1", id="lines-separated-by-other-header"),
    # ports
    pytest.param(TRUSTED, "127.0.0.1", [(XFF, "1.2.3.4:5678")], "1.2.3.4", id="ipv4-hop-with-port"),
    pytest.param(TRUSTED, "127.0.0.1", [(XFF, "[2001:db8::1]:443")], "2001:db8::1", id="ipv6-hop-brackets-port"),
    pytest.param(TRUSTED, "127.0.0.1", [(XFF, "[2001:db8::1]")], "2001:db8::1", id="ipv6-hop-brackets-no-port"),
    pytest.param(TRUSTED, "127.0.0.1", [(XFF, "2001:db8::1")], "2001:db8::1", id="ipv6-hop-bare"),
    pytest.param(TRUSTED, "127.0.0.1", [(XFF, "[2001:db8::1]:443, 10.0.0.7:8080")], "2001:db8::1", id="trusted-hop-with-port-walked"),
    # IPv4-mapped IPv6 becomes IPv4
    pytest.param(TRUSTED, "127.0.0.1", [(XFF, "::ffff:1.2.3.4")], "1.2.3.4", id="mapped-hop-becomes-ipv4"),
    pytest.param(TRUSTED, "127.0.0.1", [(XFF, "[::ffff:1.2.3.4]:80")], "1.2.3.4", id="mapped-hop-brackets-port"),
    pytest.param(TRUSTED, "127.0.0.1", [(XFF, "198.51.100.1, ::ffff:10.0.0.9")], "198.51.100.1", id="mapped-trusted-hop-walked"),
    pytest.param(TRUSTED, "::ffff:203.0.113.7", [(XFF, "1.2.3.4")], "203.0.113.7", id="mapped-untrusted-peer-becomes-ipv4"),
    pytest.param(TRUSTED, "::ffff:127.0.0.1", [(XFF, "1.2.3.4")], "1.2.3.4", id="mapped-peer-matches-ipv4-trusted"),
    # malformed, empty, unknown, obfuscated: the nearest trusted hop
    pytest.param(TRUSTED, "127.0.0.1", [(XFF, "garbage")], "127.0.0.1", id="malformed-only-hop-peer"),
    pytest.param(TRUSTED, "127.0.0.1", [(XFF, "1.2.3.4, garbage")], "127.0.0.1", id="malformed-rightmost-hop-peer"),
    pytest.param(TRUSTED, "127.0.0.1", [(XFF, "1.2.3.4, nonsense, 10.0.0.7")], "10.0.0.7", id="malformed-hop-nearest-trusted-hop"),
    pytest.param(TRUSTED, "127.0.0.1", [(XFF, "")], "127.0.0.1", id="empty-header-peer"),
    pytest.param(TRUSTED, "127.0.0.1", [(XFF, "1.2.3.4,,10.0.0.7")], "10.0.0.7", id="empty-hop-nearest-trusted-hop"),
    pytest.param(TRUSTED, "127.0.0.1", [(XFF, "unknown")], "127.0.0.1", id="unknown-hop-peer"),
    pytest.param(TRUSTED, "127.0.0.1", [(XFF, "_hidden")], "127.0.0.1", id="obfuscated-hop-peer"),
    pytest.param(TRUSTED, "127.0.0.1", [(XFF, "1.2.3.4, _hidden")], "127.0.0.1", id="obfuscated-hop-not-skipped"),
    pytest.param(TRUSTED, "127.0.0.1", [(XFF, "1.2.3.4 5.6.7.8")], "127.0.0.1", id="space-separated-hops-malformed"),
    pytest.param(TRUSTED, "127.0.0.1", [(XFF, "1.2.3.4.5")], "127.0.0.1", id="five-octets-malformed"),
    pytest.param(TRUSTED, "127.0.0.1", [(XFF, "example.com")], "127.0.0.1", id="hostname-hop-malformed"),
    pytest.param(TRUSTED, "127.0.0.1", [], "127.0.0.1", id="no-header-peer"),
    # peers that are not IPs
    pytest.param(TRUSTED, MISSING, [(XFF, "1.2.3.4")], None, id="no-scope-client-none"),
    pytest.param(TRUSTED, None, [(XFF, "1.2.3.4")], None, id="scope-client-none"),
    pytest.param("*", ("testclient", 50000), [(XFF, "1.2.3.4")], None, id="testclient-peer-none"),
    pytest.param("*", ("localhost", 50000), [(XFF, "1.2.3.4")], None, id="hostname-peer-none"),
    # only the configured header is read: a client cannot smuggle Forwarded
    pytest.param(TRUSTED, "127.0.0.1", [("forwarded", "for=1.2.3.4")], "127.0.0.1", id="forwarded-not-read-in-xff-mode"),
    pytest.param(TRUSTED, "127.0.0.1", [("forwarded", "for=1.2.3.4"), (XFF, "5.6.7.8")], "5.6.7.8", id="forwarded-ignored-xff-used"),
    pytest.param(TRUSTED, "127.0.0.1", [("x-real-ip", "1.2.3.4")], "127.0.0.1", id="x-real-ip-not-read"),
]
# fmt: on


def _client(peer: Any) -> Any:
    return peer if peer is MISSING or peer is None or isinstance(peer, tuple) else (peer, 4321)


@pytest.mark.parametrize(("trusted", "peer", "headers", "expected"), XFF_CASES)
def test_client_ip_x_forwarded_for(
    trusted: str, peer: Any, headers: list[tuple[str, str]], expected: str | None
) -> None:
    resolver = proxy(trusted, "x-forwarded-for")
    result = resolver.client_ip(make_scope(_client(peer), headers))
    assert result == ip(expected)
    assert type(result) is type(ip(expected))  # IPv4 stays IPv4; mapped IPv6 becomes IPv4


# --------------------------------------------------------------------------------------
# ProxyResolver.client_ip, Forwarded (RFC 7239)
# --------------------------------------------------------------------------------------

FWD = "forwarded"

# fmt: off
FORWARDED_CASES = [
    pytest.param(TRUSTED, "203.0.113.7", [(FWD, "for=1.2.3.4")], "203.0.113.7", id="untrusted-peer-spoofed-forwarded-ignored"),
    pytest.param(TRUSTED, "127.0.0.1", [(FWD, 'for=192.0.2.60;proto=http, for="[2001:db8:cafe::17]:4711"')], "2001:db8:cafe::17", id="rfc7239-example-rightmost-untrusted"),
    pytest.param(TRUSTED, "127.0.0.1", [(FWD, "for=192.0.2.60;proto=http;by=203.0.113.43")], "192.0.2.60", id="for-among-other-params"),
    pytest.param(TRUSTED, "127.0.0.1", [(FWD, "proto=https;for=192.0.2.60")], "192.0.2.60", id="for-not-first-param"),
    pytest.param(TRUSTED, "127.0.0.1", [(FWD, 'for="192.0.2.60:8080"')], "192.0.2.60", id="quoted-ipv4-with-port"),
    pytest.param(TRUSTED, "127.0.0.1", [(FWD, 'for="[2001:db8:cafe::17]"')], "2001:db8:cafe::17", id="quoted-ipv6-no-port"),
    pytest.param(TRUSTED, "127.0.0.1", [(FWD, 'for="[::ffff:192.0.2.60]:80"')], "192.0.2.60", id="quoted-mapped-becomes-ipv4"),
    pytest.param(TRUSTED, "127.0.0.1", [(FWD, "For=192.0.2.60")], "192.0.2.60", id="case-insensitive-For"),
    pytest.param(TRUSTED, "127.0.0.1", [(FWD, "FOR=192.0.2.60;Proto=http")], "192.0.2.60", id="case-insensitive-FOR"),
    pytest.param(TRUSTED, "127.0.0.1", [(FWD, "for = 192.0.2.60 ; proto=http")], "192.0.2.60", id="spaces-around-equals"),
    pytest.param(TRUSTED, "127.0.0.1", [(FWD, "for=192.0.2.43, for=10.0.0.3")], "192.0.2.43", id="walk-past-trusted-element"),
    pytest.param(TRUSTED, "10.0.0.1", [(FWD, "for=6.6.6.6, for=198.51.100.9")], "198.51.100.9", id="spoofed-leftmost-element-not-believed"),
    pytest.param(TRUSTED, "127.0.0.1", [(FWD, "for=10.0.0.1, for=10.0.0.2")], "10.0.0.1", id="all-elements-trusted-leftmost"),
    pytest.param(TRUSTED, "127.0.0.1", [(FWD, "for=192.0.2.1"), (FWD, "for=192.0.2.2")], "192.0.2.2", id="two-lines-joined-in-order"),
    pytest.param(TRUSTED, "127.0.0.1", [(FWD, "for=192.0.2.1"), (FWD, "for=10.0.0.2")], "192.0.2.1", id="two-lines-walked-across"),
    pytest.param(TRUSTED, "127.0.0.1", [(FWD, 'for=192.0.2.60;ext="a,b", for=10.0.0.4')], "192.0.2.60", id="quoted-comma-does-not-split"),
    pytest.param(TRUSTED, "127.0.0.1", [(FWD, 'for=192.0.2.60;ext="a;for=1.1.1.1"')], "192.0.2.60", id="quoted-semicolon-does-not-split"),
    pytest.param(TRUSTED, "127.0.0.1", [(FWD, "for=192.0.2.43, proto=https;by=10.0.0.3")], "127.0.0.1", id="element-without-for-nearest-trusted"),
    pytest.param(TRUSTED, "127.0.0.1", [(FWD, "for=192.0.2.43, proto=https, for=10.0.0.3")], "10.0.0.3", id="element-without-for-after-trusted-hop"),
    pytest.param(TRUSTED, "127.0.0.1", [(FWD, "for=unknown")], "127.0.0.1", id="unknown-peer"),
    pytest.param(TRUSTED, "127.0.0.1", [(FWD, "for=_hidden, for=10.0.0.3")], "10.0.0.3", id="obfuscated-nearest-trusted-hop"),
    pytest.param(TRUSTED, "127.0.0.1", [(FWD, 'for="_gazonk"')], "127.0.0.1", id="quoted-obfuscated-peer"),
    pytest.param(TRUSTED, "127.0.0.1", [(FWD, "for=192.0.2.1, for=_hidden")], "127.0.0.1", id="obfuscated-not-skipped"),
    pytest.param(TRUSTED, "127.0.0.1", [(FWD, "")], "127.0.0.1", id="empty-header-peer"),
    pytest.param(TRUSTED, "127.0.0.1", [(FWD, "for=")], "127.0.0.1", id="empty-for-peer"),
    pytest.param(TRUSTED, "127.0.0.1", [], "127.0.0.1", id="no-header-peer"),
    pytest.param("*", "203.0.113.7", [(FWD, "for=192.0.2.1, for=192.0.2.2")], "192.0.2.1", id="star-all-trusted-leftmost"),
    pytest.param("*", ("testclient", 50000), [(FWD, "for=192.0.2.1")], None, id="testclient-peer-none"),
    pytest.param(TRUSTED, MISSING, [(FWD, "for=192.0.2.1")], None, id="no-scope-client-none"),
    # only the configured header is read: a client cannot smuggle X-Forwarded-For
    pytest.param(TRUSTED, "127.0.0.1", [(XFF, "1.2.3.4")], "127.0.0.1", id="xff-not-read-in-forwarded-mode"),
    pytest.param(TRUSTED, "127.0.0.1", [(XFF, "1.2.3.4"), (FWD, "for=5.6.7.8")], "5.6.7.8", id="xff-ignored-forwarded-used"),
]
# fmt: on


@pytest.mark.parametrize(("trusted", "peer", "headers", "expected"), FORWARDED_CASES)
def test_client_ip_forwarded(
    trusted: str, peer: Any, headers: list[tuple[str, str]], expected: str | None
) -> None:
    resolver = proxy(trusted, "forwarded")
    result = resolver.client_ip(make_scope(_client(peer), headers))
    assert result == ip(expected)
    assert type(result) is type(ip(expected))


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param([(FWD, 'for=9.9.9.9;x="'), (FWD, "for=198.51.100.9")], id="separate-line"),
        pytest.param([(FWD, 'for=9.9.9.9;x=", for=198.51.100.9')], id="same-line-append"),
        pytest.param([(FWD, 'for="'), (FWD, "for=198.51.100.9")], id="bare-quote"),
    ],
)
def test_forwarded_unbalanced_quote_cannot_hide_proxy_appended_hop(
    headers: list[tuple[str, str]],
) -> None:
    # The client 198.51.100.9 sent the first part; the trusted proxy 10.0.0.1 appended
    # "for=198.51.100.9". Whatever the client wrote, the proxy's hop must win.
    resolver = proxy(TRUSTED, "forwarded")
    assert resolver.client_ip(make_scope(("10.0.0.1", 1), headers)) == ip("198.51.100.9")


def test_xff_client_garbage_cannot_hide_proxy_appended_hop() -> None:
    # The X-Forwarded-For counterpart of the test above holds.
    resolver = proxy(TRUSTED, "x-forwarded-for")
    headers = [(XFF, '9.9.9.9;x=", "[::1'), (XFF, "198.51.100.9")]
    assert resolver.client_ip(make_scope(("10.0.0.1", 1), headers)) == ip("198.51.100.9")


def test_ipv4_mapped_trusted_proxy_matches_mapped_peer() -> None:
    resolver = proxy("::ffff:10.0.0.1", "x-forwarded-for")
    scope = make_scope(("::ffff:10.0.0.1", 1), [(XFF, "198.51.100.9")])
    assert resolver.client_ip(scope) == ip("198.51.100.9")


def test_is_trusted() -> None:
    resolver = proxy("10.0.0.0/8,::1")
    assert resolver.is_trusted(ipaddress.ip_address("10.255.0.1"))
    assert resolver.is_trusted(ipaddress.ip_address("::1"))
    assert not resolver.is_trusted(ipaddress.ip_address("11.0.0.1"))
    assert not resolver.is_trusted(ipaddress.ip_address("::2"))
    assert proxy("*").is_trusted(ipaddress.ip_address("203.0.113.7"))


# --------------------------------------------------------------------------------------
# IdentityResolver
# --------------------------------------------------------------------------------------


def resolver(
    sources: str = "header:x-api-key,bearer,ip",
    secret: bytes = SECRET,
    trusted: str = "",
    **kwargs: Any,
) -> IdentityResolver:
    return IdentityResolver(
        parse_sources(sources.split(",")),
        secret,
        ProxyResolver(parse_networks(trusted.split(","))),
        **kwargs,
    )


def resolve(r: IdentityResolver, scope: dict[str, Any]) -> Any:
    return asyncio.run(r.resolve(scope))


API_KEY = "sk-live-0123456789abcdef"


def test_header_source() -> None:
    r = resolver()
    identity = resolve(r, make_scope(headers=[("x-api-key", API_KEY)]))
    assert identity.source == "header"
    assert identity.key == r.hash("header", f"x-api-key:{API_KEY}")
    assert identity.key.startswith("header:")
    assert API_KEY not in identity.key
    # the client network is known whichever source identified the request
    assert identity.network == ipaddress.ip_network("203.0.113.7/32")


def test_header_source_name_is_case_insensitive_in_config() -> None:
    r = resolver("header:X-Api-Key")
    identity = resolve(r, make_scope(headers=[("x-api-key", API_KEY)]))
    assert identity is not None
    assert identity.source == "header"


def test_header_value_is_stripped() -> None:
    r = resolver("header:x-api-key")
    a = resolve(r, make_scope(headers=[("x-api-key", API_KEY)]))
    b = resolve(r, make_scope(headers=[("x-api-key", f"  {API_KEY}\t")]))
    assert a.key == b.key


def test_first_header_line_is_used() -> None:
    r = resolver("header:x-api-key")
    first = resolve(r, make_scope(headers=[("x-api-key", "key-a"), ("x-api-key", "key-b")]))
    assert first.key == r.hash("header", "x-api-key:key-a")


@pytest.mark.parametrize(
    "authorization",
    ["Bearer tok-123", "bearer tok-123", "BEARER tok-123", "Bearer   tok-123  ", "bEaReR tok-123"],
)
def test_bearer_source_scheme_case_insensitive(authorization: str) -> None:
    r = resolver("bearer,ip")
    identity = resolve(r, make_scope(headers=[("authorization", authorization)]))
    assert identity.source == "bearer"
    assert identity.key == r.hash("bearer", "tok-123")
    assert "tok-123" not in identity.key


@pytest.mark.parametrize(
    "authorization",
    [
        "Basic dXNlcjpwYXNzd29yZA==",
        "Digest username=x",
        "Token tok-123",
        "Bearertok-123",
        "Bearer",
        "Bearer ",
        "Bearer    ",
        "tok-123",
        "",
        "   ",
    ],
)
def test_non_bearer_authorization_ignored(authorization: str) -> None:
    r = resolver("bearer,ip")
    identity = resolve(r, make_scope(headers=[("authorization", authorization)]))
    assert identity.source == "ip"  # fell through to the next source
    assert (
        resolve(resolver("bearer"), make_scope(headers=[("authorization", authorization)])) is None
    )


@pytest.mark.parametrize("value", ["", " ", "\t  "])
def test_empty_header_value_ignored(value: str) -> None:
    r = resolver("header:x-api-key,ip")
    identity = resolve(r, make_scope(headers=[("x-api-key", value)]))
    assert identity.source == "ip"
    assert resolve(resolver("header:x-api-key"), make_scope(headers=[("x-api-key", value)])) is None


def test_missing_header_falls_through() -> None:
    r = resolver("header:x-api-key,ip")
    identity = resolve(r, make_scope(headers=[("x-other-key", API_KEY)]))
    assert identity.source == "ip"


def test_ip_source() -> None:
    r = resolver("ip")
    identity = resolve(r, make_scope(("203.0.113.7", 1234)))
    assert identity.source == "ip"
    assert identity.network == ipaddress.ip_network("203.0.113.7/32")
    assert identity.key == r.hash("ip", "203.0.113.7/32")
    assert "203.0.113.7" not in identity.key


@pytest.mark.parametrize("client", [MISSING, None, ("testclient", 50000)])
def test_ip_source_without_ip_is_none(client: Any) -> None:
    assert resolve(resolver("ip"), make_scope(client)) is None
    identity = resolve(resolver("ip,header:x-api-key"), make_scope(client, [("x-api-key", "k")]))
    assert identity.source == "header"
    assert identity.network is None


def test_ip_source_uses_trusted_proxy_header() -> None:
    r = resolver("ip", trusted="10.0.0.0/8")
    scope = make_scope(("10.0.0.1", 1), [("x-forwarded-for", "198.51.100.9")])
    identity = resolve(r, scope)
    assert identity.network == ipaddress.ip_network("198.51.100.9/32")
    assert identity.key == r.hash("ip", "198.51.100.9/32")


def test_no_source_matches_is_none() -> None:
    r = resolver("header:x-api-key,bearer")
    assert resolve(r, make_scope(headers=[("user-agent", "curl")])) is None


BOTH = [("x-api-key", API_KEY), ("authorization", "Bearer tok-123")]


@pytest.mark.parametrize(
    ("sources", "expected"),
    [
        ("header:x-api-key,bearer,ip", "header"),
        ("bearer,header:x-api-key,ip", "bearer"),
        ("ip,bearer,header:x-api-key", "ip"),
        ("header:x-missing,bearer,ip", "bearer"),
        ("header:x-missing,ip,bearer", "ip"),
    ],
)
def test_source_order_first_match_wins(sources: str, expected: str) -> None:
    identity = resolve(resolver(sources), make_scope(headers=BOTH))
    assert identity.source == expected


def test_custom_identify_sync_wins_over_sources() -> None:
    seen: list[Any] = []

    def identify(scope: Any) -> str:
        seen.append(scope)
        return "user-42"

    r = resolver(identify=identify)
    scope = make_scope(headers=BOTH)
    identity = resolve(r, scope)
    assert seen == [scope]
    assert identity.source == "custom"
    assert identity.key == r.hash("custom", "user-42")
    assert "user-42" not in identity.key
    assert identity.network == ipaddress.ip_network("203.0.113.7/32")


def test_custom_identify_async() -> None:
    async def identify(scope: Any) -> str:
        await asyncio.sleep(0)
        return "tenant-7"

    r = resolver(identify=identify)
    identity = resolve(r, make_scope(headers=BOTH))
    assert identity.source == "custom"
    assert identity.key == r.hash("custom", "tenant-7")


def test_custom_identify_non_str_value_is_stringified() -> None:
    r = resolver(identify=lambda scope: 1234)  # type: ignore[arg-type,return-value]
    assert resolve(r, make_scope()).key == r.hash("custom", "1234")


def _sync_none(scope: Any) -> None:
    return None


async def _async_none(scope: Any) -> None:
    return None


async def _async_empty(scope: Any) -> str:
    return ""


@pytest.mark.parametrize("identify", [_sync_none, _async_none, _async_empty, lambda s: ""])
def test_custom_identify_none_falls_through(identify: Any) -> None:
    r = resolver(identify=identify)
    identity = resolve(r, make_scope(headers=BOTH))
    assert identity.source == "header"
    assert identity.key == r.hash("header", f"x-api-key:{API_KEY}")
    assert resolve(resolver("header:x-api-key", identify=identify), make_scope()) is None


# keys are keyed hashes


def test_same_value_same_secret_same_key() -> None:
    scope = make_scope(headers=[("x-api-key", API_KEY)])
    assert resolve(resolver(), scope).key == resolve(resolver(), scope).key


def test_different_secret_different_key() -> None:
    scope = make_scope(headers=[("x-api-key", API_KEY)])
    a = resolve(resolver(secret=b"a" * 32), scope)
    b = resolve(resolver(secret=b"b" * 32), scope)
    assert a.key != b.key
    assert a.key.startswith("header:") and b.key.startswith("header:")


def test_different_values_different_keys() -> None:
    r = resolver()
    a = resolve(r, make_scope(headers=[("x-api-key", "key-a")]))
    b = resolve(r, make_scope(headers=[("x-api-key", "key-b")]))
    assert a.key != b.key


def test_same_value_different_source_different_key() -> None:
    r = resolver("header:x-api-key,header:x-token,bearer")
    via_header = resolve(r, make_scope(headers=[("x-api-key", "tok-123")]))
    via_other_header = resolve(r, make_scope(headers=[("x-token", "tok-123")]))
    via_bearer = resolve(r, make_scope(headers=[("authorization", "Bearer tok-123")]))
    custom = resolve(resolver(identify=lambda s: "tok-123"), make_scope())
    keys = {via_header.key, via_other_header.key, via_bearer.key, custom.key}
    assert len(keys) == 4


def test_hash_shape_and_determinism() -> None:
    r = resolver()
    key = r.hash("header", "x-api-key:" + API_KEY)
    source, _, digest = key.partition(":")
    assert source == "header"
    assert len(digest) == 24
    int(digest, 16)  # hex
    assert key == r.hash("header", "x-api-key:" + API_KEY)
    assert API_KEY not in key
    # non-UTF-8-encodable values (lone surrogates) still hash
    assert r.hash("custom", "\ud800") != r.hash("custom", "\ud801")


# IP aggregation


def _ip_identity(r: IdentityResolver, host: str) -> Any:
    return resolve(r, make_scope((host, 1)))


def test_ipv4_default_prefix_32() -> None:
    r = resolver("ip")
    a = _ip_identity(r, "203.0.113.7")
    b = _ip_identity(r, "203.0.113.8")
    assert a.network == ipaddress.ip_network("203.0.113.7/32")
    assert a.key != b.key


def test_ipv6_default_prefix_64_same_subnet_same_key() -> None:
    r = resolver("ip")
    a = _ip_identity(r, "2001:db8:1:2::1")
    b = _ip_identity(r, "2001:db8:1:2:ffff:ffff:ffff:fffe")
    assert a.network == b.network == ipaddress.ip_network("2001:db8:1:2::/64")
    assert a.key == b.key


def test_ipv6_different_64_different_key() -> None:
    r = resolver("ip")
    a = _ip_identity(r, "2001:db8:1:2::1")
    b = _ip_identity(r, "2001:db8:1:3::1")
    assert a.network != b.network
    assert a.key != b.key


def test_ipv4_prefix_24() -> None:
    r = resolver("ip", ipv4_prefix=24)
    a = _ip_identity(r, "203.0.113.7")
    b = _ip_identity(r, "203.0.113.200")
    c = _ip_identity(r, "203.0.114.7")
    assert a.network == ipaddress.ip_network("203.0.113.0/24")
    assert a.key == b.key
    assert a.key != c.key


def test_ipv6_prefix_configurable() -> None:
    r48 = resolver("ip", ipv6_prefix=48)
    assert _ip_identity(r48, "2001:db8:1:2::1").key == _ip_identity(r48, "2001:db8:1:3::1").key
    assert _ip_identity(r48, "2001:db8:1::1").key != _ip_identity(r48, "2001:db8:2::1").key
    r128 = resolver("ip", ipv6_prefix=128)
    assert _ip_identity(r128, "2001:db8::1").key != _ip_identity(r128, "2001:db8::2").key


def test_ipv4_mapped_peer_aggregated_as_ipv4() -> None:
    r = resolver("ip", ipv4_prefix=24)
    mapped = _ip_identity(r, "::ffff:203.0.113.7")
    plain = _ip_identity(r, "203.0.113.9")
    assert mapped.network == ipaddress.ip_network("203.0.113.0/24")
    assert mapped.key == plain.key


def test_network_method() -> None:
    r = resolver("ip", ipv4_prefix=16)
    assert r.network(make_scope(("198.51.100.9", 1))) == ipaddress.ip_network("198.51.0.0/16")
    assert r.network(make_scope(MISSING)) is None


# parse_sources / parse_networks


@pytest.mark.parametrize(
    ("specs", "expected"),
    [
        (["header:x-api-key"], (("header", "x-api-key"),)),
        (["header:X-API-Key"], (("header", "x-api-key"),)),
        ([" Header : x_api_key "], (("header", "x_api_key"),)),
        (["BEARER", "Ip"], (("bearer", ""), ("ip", ""))),
        (
            ["ip", "header:x-api-key", "bearer"],
            (("ip", ""), ("header", "x-api-key"), ("bearer", "")),
        ),
    ],
)
def test_parse_sources(specs: list[str], expected: tuple[tuple[str, str], ...]) -> None:
    assert parse_sources(specs) == expected


@pytest.mark.parametrize(
    "spec",
    [
        "header:",
        "header:  ",
        "header",
        "header:x api",
        "header:x/y",
        "header:x:y",
        "header:x;y",
        "cookie:session",
        "api-key",
        "ip:1.2.3.4",
        "bearer:token",
        "",
        "*",
    ],
)
def test_parse_sources_errors(spec: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_sources([spec])
    message = str(exc.value)
    assert repr(spec.strip()) in message
    assert "header:<name>" in message and "bearer" in message and "'ip'" in message


def test_parse_sources_empty() -> None:
    with pytest.raises(ValueError, match="at least one identity source"):
        parse_sources([])


def test_parse_sources_error_names_the_bad_one() -> None:
    with pytest.raises(ValueError, match="'cookie'"):
        parse_sources(["header:x-api-key", "cookie", "ip"])


def test_parse_sources_rejects_non_ascii_header_name() -> None:
    with pytest.raises(ValueError):
        parse_sources(["header:ключ"])


@pytest.mark.parametrize(
    ("specs", "expected"),
    [
        (["*"], "*"),
        ([" * "], "*"),
        (["*", "", " "], "*"),
        ([], ()),
        (["", "  "], ()),
        (["127.0.0.1"], (ipaddress.ip_network("127.0.0.1/32"),)),
        (["::1"], (ipaddress.ip_network("::1/128"),)),
        (
            ["10.0.0.0/8", " 192.168.0.0/16 ", "2001:db8::/32"],
            (
                ipaddress.ip_network("10.0.0.0/8"),
                ipaddress.ip_network("192.168.0.0/16"),
                ipaddress.ip_network("2001:db8::/32"),
            ),
        ),
        (["10.1.2.3/8"], (ipaddress.ip_network("10.0.0.0/8"),)),  # host bits allowed
    ],
)
def test_parse_networks(specs: list[str], expected: Any) -> None:
    assert parse_networks(specs) == expected


@pytest.mark.parametrize(
    ("specs", "bad"),
    [
        (["localhost"], "localhost"),
        (["10.0.0.0/33"], "10.0.0.0/33"),
        (["1.2.3.4.5"], "1.2.3.4.5"),
        (["10.0.0.0/8", " nope "], "nope"),
        (["*", "10.0.0.0/8"], "*"),
        (["10.0.0.0/8", "*"], "*"),
        (["*", "*"], "*"),
        (["::1/129"], "::1/129"),
        (["10.0.0.0/-1"], "10.0.0.0/-1"),
    ],
)
def test_parse_networks_errors(specs: list[str], bad: str) -> None:
    with pytest.raises(ValueError) as exc:
        parse_networks(specs)
    message = str(exc.value)
    assert repr(bad) in message
    assert "CIDR" in message
    assert "'*' alone" in message


# --------------------------------------------------------------------------------------
# Through the real middleware
# --------------------------------------------------------------------------------------


class App:
    def __init__(self) -> None:
        self.calls = 0

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        self.calls += 1
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/plain")],
            }
        )
        await send({"type": "http.response.body", "body": b"ok"})


def make_client(shield: ExtractionShield, host: str = "203.0.113.7") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=shield, client=(host, 1234))
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


@pytest.fixture(autouse=True)
def _no_shield_env(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for var in list(os.environ):
        if var.upper().startswith("EXTRACTION_SHIELD_"):
            monkeypatch.delenv(var)


@pytest.mark.anyio
async def test_middleware_separate_buckets_per_api_key() -> None:
    t = [1000.0]
    app = App()
    shield = ExtractionShield(
        app,
        secret_key="k" * 32,
        rate_limit="1/minute",
        identity="header:x-api-key",
        clock=lambda: t[0],
    )
    async with make_client(shield) as client:
        a1 = await client.post("/predict", headers={"x-api-key": "key-a"})
        b1 = await client.post("/predict", headers={"x-api-key": "key-b"})
        a2 = await client.post("/predict", headers={"x-api-key": "key-a"})
        b2 = await client.post("/predict", headers={"x-api-key": "key-b"})
        assert (a1.status_code, b1.status_code, a2.status_code, b2.status_code) == (
            200,
            200,
            429,
            429,
        )
        assert app.calls == 2
        # same peer IP, yet an anonymous request has its own (shared) bucket
        assert (await client.post("/predict")).status_code == 200
        t[0] += 60.0  # one token refilled per minute
        assert (await client.post("/predict", headers={"x-api-key": "key-a"})).status_code == 200


@pytest.mark.anyio
async def test_middleware_anonymous_shared_bucket() -> None:
    t = [1000.0]
    app = App()
    shield = ExtractionShield(
        app,
        secret_key="k" * 32,
        rate_limit="1/minute",
        identity="header:x-api-key",
        clock=lambda: t[0],
    )
    async with (
        make_client(shield, "203.0.113.7") as one,
        make_client(shield, "198.51.100.9") as two,
    ):
        first = await one.post("/predict")
        second = await two.post("/predict")  # another address, still the same anonymous identity
        assert first.status_code == 200
        assert second.status_code == 429
        assert second.headers["content-type"] == "application/problem+json"
        keyed = await one.post("/predict", headers={"x-api-key": "key-a"})
        assert keyed.status_code == 200
    assert app.calls == 2
    assert ANONYMOUS_KEY == "anonymous"


@pytest.mark.anyio
async def test_middleware_anonymous_reject() -> None:
    app = App()
    shield = ExtractionShield(
        app,
        secret_key="k" * 32,
        rate_limit="100/minute",
        identity="header:x-api-key",
        anonymous="reject",
        clock=lambda: 1000.0,
    )
    async with make_client(shield) as client:
        refused = await client.post("/predict", headers={"authorization": "Bearer tok"})
        assert refused.status_code == 401
        assert refused.headers["content-type"] == "application/problem+json"
        body = refused.json()
        assert body["status"] == 401
        assert body["title"] == "Unauthorized"
        assert app.calls == 0
        ok = await client.post("/predict", headers={"x-api-key": "key-a"})
        assert ok.status_code == 200
        assert app.calls == 1


@pytest.mark.anyio
async def test_middleware_ip_identity_behind_trusted_proxy() -> None:
    t = [1000.0]
    app = App()
    shield = ExtractionShield(
        app,
        secret_key="k" * 32,
        rate_limit="1/minute",
        identity="ip",
        trusted_proxies="10.0.0.0/8",
        clock=lambda: t[0],
    )
    async with (
        make_client(shield, "10.0.0.1") as via_proxy,
        make_client(shield, "203.0.113.7") as direct,
    ):
        # behind the trusted proxy, each forwarded client has its own bucket
        assert (
            await via_proxy.get("/x", headers={"x-forwarded-for": "198.51.100.1"})
        ).status_code == 200
        assert (
            await via_proxy.get("/x", headers={"x-forwarded-for": "198.51.100.2"})
        ).status_code == 200
        assert (
            await via_proxy.get("/x", headers={"x-forwarded-for": "198.51.100.1"})
        ).status_code == 429
        # an untrusted peer cannot rotate identities by spoofing the header
        assert (await direct.get("/x", headers={"x-forwarded-for": "1.1.1.1"})).status_code == 200
        assert (await direct.get("/x", headers={"x-forwarded-for": "2.2.2.2"})).status_code == 429

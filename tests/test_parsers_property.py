"""Property tests for every header and text parser of the configuration and identity.

Each parser must only ever raise what it documents (``ValueError`` for configuration,
nothing for request headers, which are attacker-controlled) and return values of the
documented shape; generated valid inputs must round-trip.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from asgi_extraction_shield.identity import (
    IdentityResolver,
    ProxyResolver,
    parse_forwarded,
    parse_ip,
    parse_networks,
    parse_sources,
    parse_x_forwarded_for,
)
from asgi_extraction_shield.limiter import Rate

FAST = settings(
    max_examples=100, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow]
)

IP_TYPES = (ipaddress.IPv4Address, ipaddress.IPv6Address)
TRUSTED_NETS = parse_networks(["127.0.0.1", "::1", "10.0.0.0/8", "2001:db8:ffff::/48"])
TRUSTED_PEERS = [
    "127.0.0.1",
    "::1",
    "10.0.0.1",
    "10.200.3.4",
    "2001:db8:ffff::9",
    "::ffff:10.0.0.1",
]
UNTRUSTED_PEERS = ["203.0.113.7", "198.51.100.9", "2001:db8::1", "::ffff:203.0.113.7"]

latin1_text = st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=255), max_size=60)
any_text = st.text(max_size=60)


def normalized(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> Any:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def assert_ip_or_none(value: object) -> None:
    assert value is None or isinstance(value, IP_TYPES)
    if isinstance(value, ipaddress.IPv6Address):
        assert value.ipv4_mapped is None  # mapped addresses always come back as IPv4


# --------------------------------------------------------------------------------------
# strategies for hops: mostly IP-like, sometimes garbage
# --------------------------------------------------------------------------------------

ports = st.integers(min_value=0, max_value=65535)
ipv4s = st.ip_addresses(v=4)
ipv6s = st.ip_addresses(v=6)
ips = st.one_of(
    ipv4s, ipv6s, st.sampled_from([*TRUSTED_PEERS, *UNTRUSTED_PEERS]).map(ipaddress.ip_address)
)


@st.composite
def ip_text(draw: st.DrawFn) -> tuple[str, Any]:
    """An IP as a forwarding header writes it, with the IP it must parse to."""
    ip = draw(ips)
    if ip.version == 4:
        text = draw(st.sampled_from([str(ip), f"{ip}:{draw(ports)}"]))
    else:
        text = draw(st.sampled_from([str(ip), f"[{ip}]", f"[{ip}]:{draw(ports)}"]))
    if draw(st.booleans()):
        text = f'"{text}"'
    pad = draw(st.sampled_from(["", " ", "  ", "\t"]))
    return pad + text + pad, normalized(ip)


garbage_hop = st.one_of(
    st.sampled_from(
        ["", "unknown", "_hidden", "_gazonk", "localhost", "1.2.3.4.5", "[::1", "::1]"]
    ),
    st.text(
        alphabet=st.characters(min_codepoint=32, max_codepoint=255, exclude_characters=","),
        max_size=15,
    ),
)
hop = st.one_of(
    ip_text().map(lambda pair: pair[0]), ip_text().map(lambda pair: pair[0]), garbage_hop
)


# --------------------------------------------------------------------------------------
# parse_ip
# --------------------------------------------------------------------------------------


@FAST
@given(any_text)
def test_parse_ip_total(text: str) -> None:
    assert_ip_or_none(parse_ip(text))


@FAST
@given(ips)
def test_parse_ip_roundtrip_plain(ip: Any) -> None:
    assert parse_ip(str(ip)) == normalized(ip)
    assert parse_ip(ip.exploded) == normalized(ip)


@FAST
@given(ip_text())
def test_parse_ip_roundtrip_header_forms(pair: tuple[str, Any]) -> None:
    text, expected = pair
    result = parse_ip(text)
    assert result == expected
    assert type(result) is type(expected)


# --------------------------------------------------------------------------------------
# parse_x_forwarded_for / parse_forwarded
# --------------------------------------------------------------------------------------


@FAST
@given(any_text)
def test_parse_x_forwarded_for_total(text: str) -> None:
    hops = parse_x_forwarded_for(text)
    assert isinstance(hops, list)
    assert len(hops) == text.count(",") + 1  # positions are kept, even of empty hops
    assert all(isinstance(h, str) and h == h.strip() and "," not in h for h in hops)


@FAST
@given(st.lists(ip_text(), min_size=1, max_size=6), st.sampled_from([",", ", ", " , "]))
def test_parse_x_forwarded_for_roundtrip(pairs: list[tuple[str, Any]], sep: str) -> None:
    hops = parse_x_forwarded_for(sep.join(text for text, _ in pairs))
    assert [parse_ip(h) for h in hops] == [ip for _, ip in pairs]


@FAST
@given(any_text)
def test_parse_forwarded_total(text: str) -> None:
    hops = parse_forwarded(text)
    assert isinstance(hops, list)
    assert 1 <= len(hops) <= text.count(",") + 1
    assert all(isinstance(h, str) for h in hops)
    if '"' not in text:
        assert len(hops) == text.count(",") + 1


@st.composite
def forwarded_element(draw: st.DrawFn) -> tuple[str, Any]:
    """One RFC 7239 element with a ``for=`` node, and the IP it must yield."""
    ip = draw(ips)
    if ip.version == 4:
        node = draw(st.sampled_from([str(ip), f'"{ip}:{draw(ports)}"', f'"{ip}"']))
    else:
        node = draw(st.sampled_from([f'"[{ip}]"', f'"[{ip}]:{draw(ports)}"']))
    name = draw(st.sampled_from(["for", "For", "FOR", "fOr"]))
    pairs = [f"{name}={node}"]
    for extra in draw(
        st.lists(
            st.sampled_from(
                ["proto=https", "by=203.0.113.43", 'host="example.com"', 'ext="a,b;c"']
            ),
            max_size=2,
        )
    ):
        pairs.insert(draw(st.integers(0, len(pairs))), extra)
    return ";".join(pairs), normalized(ip)


@FAST
@given(st.lists(forwarded_element(), min_size=1, max_size=5), st.sampled_from([",", ", "]))
def test_parse_forwarded_roundtrip(elements: list[tuple[str, Any]], sep: str) -> None:
    hops = parse_forwarded(sep.join(text for text, _ in elements))
    assert [parse_ip(h) for h in hops] == [ip for _, ip in elements]


# --------------------------------------------------------------------------------------
# ProxyResolver.client_ip with arbitrary header bytes
# --------------------------------------------------------------------------------------

peers = st.sampled_from([*TRUSTED_PEERS, *UNTRUSTED_PEERS, "testclient", "", "localhost"])
trusted_configs = st.sampled_from([TRUSTED_NETS, "*", ()])
modes = st.sampled_from(["x-forwarded-for", "forwarded"])


@st.composite
def header_value(draw: st.DrawFn, mode: str) -> str:
    """Arbitrary latin-1 text, or a plausible chain of hops for ``mode``."""
    hops = draw(st.lists(hop, max_size=5))
    if mode == "forwarded":
        hops = [f"for={h}" if draw(st.booleans()) or not h else h for h in hops]
    return draw(st.one_of(latin1_text, st.just(", ".join(hops))))


@st.composite
def request(draw: st.DrawFn) -> tuple[ProxyResolver, dict[str, Any], str]:
    mode = draw(modes)
    resolver = ProxyResolver(draw(trusted_configs), mode)  # type: ignore[arg-type]
    names = st.sampled_from(["x-forwarded-for", "forwarded", "x-real-ip"])
    headers = draw(st.lists(st.tuples(names, header_value(mode)), max_size=4))
    scope = {
        "type": "http",
        "client": (draw(peers), 1234),
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
    }
    return resolver, scope, mode


def header_hops(scope: dict[str, Any], mode: str) -> list[str]:
    values = [v.decode("latin-1") for k, v in scope["headers"] if k == mode.encode()]
    parse = parse_x_forwarded_for if mode == "x-forwarded-for" else parse_forwarded
    return parse(",".join(values)) if values else []


@settings(max_examples=300, deadline=None, database=None)
@given(request())
def test_client_ip_is_peer_or_a_hop(req: tuple[ProxyResolver, dict[str, Any], str]) -> None:
    resolver, scope, mode = req
    result = resolver.client_ip(scope)
    assert_ip_or_none(result)
    peer = parse_ip(scope["client"][0])
    if peer is None:
        assert result is None
        return
    candidates = {peer} | {parse_ip(h) for h in header_hops(scope, mode)}
    assert result in candidates
    if not resolver.trusted or not resolver.is_trusted(peer):
        assert result == peer
    if not header_hops(scope, mode):
        assert result == peer


@FAST
@given(
    st.sampled_from(UNTRUSTED_PEERS),
    modes,
    st.lists(st.tuples(st.sampled_from(["x-forwarded-for", "forwarded"]), latin1_text), max_size=4),
)
def test_untrusted_peer_always_wins(peer: str, mode: str, headers: list[tuple[str, str]]) -> None:
    resolver = ProxyResolver(TRUSTED_NETS, mode)  # type: ignore[arg-type]
    scope = {
        "type": "http",
        "client": (peer, 1),
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
    }
    assert resolver.client_ip(scope) == normalized(ipaddress.ip_address(peer))


@FAST
@given(st.sampled_from(TRUSTED_PEERS), modes, latin1_text, latin1_text)
def test_other_header_is_never_read(peer: str, mode: str, theirs: str, ours: str) -> None:
    """Adding any value of the header that is not configured changes nothing."""
    other = "forwarded" if mode == "x-forwarded-for" else "x-forwarded-for"
    resolver = ProxyResolver("*", mode)  # type: ignore[arg-type]
    base = [(mode.encode(), ours.encode("latin-1"))]
    with_other = [(other.encode(), theirs.encode("latin-1")), *base]
    a = resolver.client_ip({"type": "http", "client": (peer, 1), "headers": base})
    b = resolver.client_ip({"type": "http", "client": (peer, 1), "headers": with_other})
    assert a == b


real_clients = st.sampled_from(["198.51.100.9", "203.0.113.200", "2001:db8::77"])


@FAST
@given(latin1_text, real_clients, st.sampled_from(["127.0.0.1", "10.0.0.1"]), st.booleans())
def test_xff_proxy_appended_hop_wins(prefix: str, client: str, peer: str, separate: bool) -> None:
    """Whatever the client sent, the untrusted hop its trusted proxy appended is the client."""
    resolver = ProxyResolver(TRUSTED_NETS, "x-forwarded-for")
    if separate:
        headers = [
            (b"x-forwarded-for", prefix.encode("latin-1")),
            (b"x-forwarded-for", client.encode()),
        ]
    else:
        headers = [(b"x-forwarded-for", f"{prefix}, {client}".encode("latin-1"))]
    scope = {"type": "http", "client": (peer, 1), "headers": headers}
    assert resolver.client_ip(scope) == ipaddress.ip_address(client)


def _forwarded_scope(prefix: str, client: str, peer: str, separate: bool) -> dict[str, Any]:
    node = f'"[{client}]"' if ":" in client else client
    if separate:
        headers = [(b"forwarded", prefix.encode("latin-1")), (b"forwarded", f"for={node}".encode())]
    else:
        headers = [(b"forwarded", f"{prefix}, for={node}".encode("latin-1"))]
    return {"type": "http", "client": (peer, 1), "headers": headers}


no_quote_text = st.text(
    alphabet=st.characters(min_codepoint=0, max_codepoint=255, exclude_characters='"'), max_size=60
)


@FAST
@given(no_quote_text, real_clients, st.sampled_from(["127.0.0.1", "10.0.0.1"]), st.booleans())
def test_forwarded_proxy_appended_hop_wins_without_quotes(
    prefix: str, client: str, peer: str, separate: bool
) -> None:
    resolver = ProxyResolver(TRUSTED_NETS, "forwarded")
    scope = _forwarded_scope(prefix, client, peer, separate)
    assert resolver.client_ip(scope) == ipaddress.ip_address(client)


@FAST
@given(latin1_text, real_clients, st.sampled_from(["127.0.0.1", "10.0.0.1"]), st.booleans())
@example('for=9.9.9.9;x="', "198.51.100.9", "10.0.0.1", True)
def test_forwarded_proxy_appended_hop_wins(
    prefix: str, client: str, peer: str, separate: bool
) -> None:
    resolver = ProxyResolver(TRUSTED_NETS, "forwarded")
    scope = _forwarded_scope(prefix, client, peer, separate)
    assert resolver.client_ip(scope) == ipaddress.ip_address(client)


# --------------------------------------------------------------------------------------
# Rate.parse
# --------------------------------------------------------------------------------------

UNITS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


@FAST
@given(any_text)
def test_rate_parse_only_value_error(text: str) -> None:
    try:
        rate = Rate.parse(text)
    except ValueError:
        return
    assert rate.count >= 1 and rate.period >= 1


rate_like = st.builds(
    lambda count, sep, mult, unit, plural, space: f"{count}{sep}{mult}{space}{unit}{plural}",
    st.text(alphabet="0123456789 -+", max_size=8),
    st.sampled_from(["/", " per ", "per", "//", ":", ""]),
    st.text(alphabet="0123456789 -", max_size=6),
    st.sampled_from([*UNITS, "Minute", "HOUR", "sec", "min", "week", "dayss", ""]),
    st.sampled_from(["", "s", "S", "es"]),
    st.sampled_from(["", " ", "  "]),
)


@FAST
@given(rate_like)
def test_rate_parse_rate_like_only_value_error(text: str) -> None:
    try:
        rate = Rate.parse(text)
    except ValueError:
        return
    assert isinstance(rate.count, int) and rate.count >= 1
    assert rate.period >= 1 and rate.interval > 0


def test_rate_parse_huge_multiple_is_value_error() -> None:
    with pytest.raises(ValueError):
        Rate.parse("1/" + "9" * 400 + " seconds")


@FAST
@given(
    st.integers(min_value=1, max_value=10**6),
    st.one_of(st.none(), st.integers(min_value=1, max_value=1000)),
    st.sampled_from(list(UNITS)),
    st.booleans(),
    st.sampled_from(["/", " / ", " per ", "per"]),
    st.sampled_from([str.lower, str.upper, str.title]),
)
def test_rate_parse_roundtrip(
    count: int, multiple: int | None, unit: str, plural: bool, sep: str, case: Any
) -> None:
    period = f"{multiple} " if multiple is not None else ""
    text = f"{count}{sep}{period}{case(unit)}{'s' if plural else ''}"
    rate = Rate.parse(f"  {text} ")
    assert rate.count == count
    assert rate.period == (multiple or 1) * UNITS[unit]
    assert rate.interval == pytest.approx(rate.period / count)


@FAST
@given(st.sampled_from(["0/second", "0/minute", "5/0 seconds", "00/hour", "1/000 days"]))
def test_rate_parse_zero_is_value_error(text: str) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Rate.parse(text)


# --------------------------------------------------------------------------------------
# parse_sources
# --------------------------------------------------------------------------------------

source_like = st.one_of(
    any_text,
    st.sampled_from(["ip", "bearer", "IP", " Bearer ", "header:", "header", "cookie:x"]),
    st.builds(
        lambda k, a: f"{k}:{a}", st.sampled_from(["header", "Header", "ip", "bearer"]), any_text
    ),
)


@FAST
@given(st.lists(source_like, max_size=4))
def test_parse_sources_only_value_error(specs: list[str]) -> None:
    try:
        sources = parse_sources(specs)
    except ValueError as exc:
        assert str(exc)
        return
    assert len(sources) == len(specs) >= 1
    for kind, arg in sources:
        assert kind in ("header", "bearer", "ip")
        if kind == "header":
            assert arg and arg == arg.lower() == arg.strip()
            assert re.fullmatch(r"[a-z0-9!#$%&'*+.^_`|~-]+", arg)  # an RFC 9110 token
        else:
            assert arg == ""


header_names = st.from_regex(r"[A-Za-z0-9_-]{1,20}", fullmatch=True)
valid_source = st.one_of(
    st.sampled_from(["ip", "bearer", "IP", "Bearer"]).map(lambda s: (s, (s.lower(), ""))),
    header_names.map(lambda n: (f"header:{n}", ("header", n.lower()))),
)


@FAST
@given(st.lists(valid_source, min_size=1, max_size=5))
def test_parse_sources_roundtrip(pairs: list[tuple[str, tuple[str, str]]]) -> None:
    assert parse_sources([spec for spec, _ in pairs]) == tuple(parsed for _, parsed in pairs)


@FAST
@given(st.lists(source_like, max_size=4))
@example(["header:ключ"])
def test_accepted_sources_never_break_resolve(specs: list[str]) -> None:
    try:
        sources = parse_sources(specs)
    except ValueError:
        return
    resolver = IdentityResolver(sources, b"s" * 32)
    scope = {"type": "http", "client": ("203.0.113.7", 1), "headers": [(b"x-api-key", b"k")]}
    asyncio.run(resolver.resolve(scope))


# --------------------------------------------------------------------------------------
# parse_networks
# --------------------------------------------------------------------------------------

network_like = st.one_of(
    any_text,
    st.sampled_from(["*", " * ", "", "localhost", "10.0.0.0/33", "::1/129"]),
    st.builds(lambda ip, p: f"{ip}/{p}", ips, st.integers(-1, 130)),
)


@FAST
@given(st.lists(network_like, max_size=4))
def test_parse_networks_only_value_error(specs: list[str]) -> None:
    try:
        result = parse_networks(specs)
    except ValueError as exc:
        assert "CIDR" in str(exc)
        return
    if result == "*":
        assert [s.strip() for s in specs if s.strip()] == ["*"]
    else:
        assert isinstance(result, tuple)
        assert len(result) == len([s for s in specs if s.strip()])
        assert all(isinstance(n, ipaddress.IPv4Network | ipaddress.IPv6Network) for n in result)


@FAST
@given(st.lists(st.tuples(ips, st.integers(0, 128)), max_size=5), st.sampled_from(["", " "]))
def test_parse_networks_roundtrip(pairs: list[tuple[Any, int]], pad: str) -> None:
    pairs = [(ip, prefix % (ip.max_prefixlen + 1)) for ip, prefix in pairs]
    specs = [f"{pad}{ip}/{prefix}{pad}" for ip, prefix in pairs]
    expected = tuple(
        _unmapped(ipaddress.ip_network((ip, prefix), strict=False)) for ip, prefix in pairs
    )
    assert parse_networks(specs) == expected


def _unmapped(network: Any) -> Any:
    """IPv4-mapped IPv6 networks are compared as IPv4, like the peers they must match."""
    if network.version == 6 and network.prefixlen >= 96:
        mapped = network.network_address.ipv4_mapped
        if mapped is not None:
            return ipaddress.ip_network((mapped, network.prefixlen - 96))
    return network


@FAST
@given(st.lists(st.sampled_from(["", " ", "\t"]), max_size=3), st.sampled_from(["*", " *", "* "]))
def test_parse_networks_star(blanks: list[str], star: str) -> None:
    assert parse_networks([*blanks, star]) == "*"

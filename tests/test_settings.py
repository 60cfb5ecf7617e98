"""Settings from the environment, every invalid-setting error, secrets never shown."""

from __future__ import annotations

import importlib.util
import logging
from typing import Any

import pytest
from pydantic import SecretStr

from asgi_extraction_shield import ConfigurationError, ShieldSettings

SECRET = "do-not-print-me-0123456789"


def test_defaults() -> None:
    s = ShieldSettings()
    assert s.mode == "enforce" and s.rate.count == 600 and s.rate.period == 60.0
    assert s.identity == ["header:x-api-key", "bearer", "ip"]
    assert "/health" in s.exempt_paths and s.protected_paths == ["*"]
    assert s.storage_url == "memory://" and s.failure_mode == "open" and s.secret_key is None


def test_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "MODE": "shadow",
        "RATE_LIMIT": "100/hour",
        "BURST": "20",
        "IDENTITY": "header:x-client-id, ip",
        "TRUSTED_PROXIES": "10.0.0.0/8,::1",
        "PROXY_HEADER": "forwarded",
        "PROTECTED_PATHS": "/v1/*,/v2/models/*",
        "EXEMPT_PATHS": '["/health"]',
        "MAX_BODY_BYTES": "2048",
        "MAX_IDENTITIES": "50",
        "FAILURE_MODE": "closed",
        "SECRET_KEY": SECRET,
        "EXPOSE_HEADERS": "false",
        "ANONYMOUS": "reject",
        "IPV4_PREFIX": "24",
        "IPV6_PREFIX": "48",
    }
    for name, value in env.items():
        monkeypatch.setenv("EXTRACTION_SHIELD_" + name, value)
    s = ShieldSettings()
    assert s.mode == "shadow" and s.rate.count == 100 and s.burst == 20
    assert s.identity == ["header:x-client-id", "ip"]
    assert s.trusted_proxies == ["10.0.0.0/8", "::1"] and s.proxy_header == "forwarded"
    assert s.protected_paths == ["/v1/*", "/v2/models/*"] and s.exempt_paths == ["/health"]
    assert (s.max_body_bytes, s.max_identities, s.failure_mode) == (2048, 50, "closed")
    assert s.secret_key is not None and s.secret_key.get_secret_value() == SECRET
    assert s.expose_headers is False and s.anonymous == "reject"
    assert (s.ipv4_prefix, s.ipv6_prefix) == (24, 48)


def test_lowercase_environment_names_work(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("extraction_shield_mode", "shadow")
    assert ShieldSettings().mode == "shadow"


@pytest.mark.parametrize(
    ("var", "value", "accepted"),
    [
        ("MODE", "observe", "'enforce' or 'shadow'"),
        ("RATE_LIMIT", "600/fortnight", "'<count>/<unit>'"),
        ("RATE_LIMIT", "0/minute", "at least 1"),
        ("BURST", "0", "greater than or equal to 1"),
        ("BURST", "many", "valid integer"),
        ("IDENTITY", "cookie:session", "'header:<name>', 'bearer' or 'ip'"),
        ("IDENTITY", "header:", "'header:<name>'"),
        ("IDENTITY", ",", "at least one identity source"),
        ("TRUSTED_PROXIES", "10.0.0.0/8,proxy.local", "IP address or CIDR"),
        ("TRUSTED_PROXIES", "*,10.0.0.1", "IP address or CIDR"),
        ("PROXY_HEADER", "x-real-ip", "'x-forwarded-for' or 'forwarded'"),
        ("IPV4_PREFIX", "33", "less than or equal to 32"),
        ("IPV6_PREFIX", "-1", "greater than or equal to 0"),
        ("PROTECTED_PATHS", "v1/*", "expected '/...' or a glob"),
        ("EXEMPT_PATHS", "[not json", "JSON"),
        ("MAX_BODY_BYTES", "-5", "greater than or equal to 0"),
        ("MAX_IDENTITIES", "0", "greater than or equal to 1"),
        ("FAILURE_MODE", "sometimes", "'open' or 'closed'"),
        ("EXPOSE_HEADERS", "perhaps", "valid boolean"),
        ("ANONYMOUS", "allow", "'shared' or 'reject'"),
    ],
)
def test_invalid_values_name_variable_value_and_form(
    monkeypatch: pytest.MonkeyPatch, var: str, value: str, accepted: str
) -> None:
    monkeypatch.setenv("EXTRACTION_SHIELD_" + var, value)
    with pytest.raises(ConfigurationError) as info:
        ShieldSettings()
    message = str(info.value)
    assert f"EXTRACTION_SHIELD_{var}=" in message
    assert repr(value) in message or value in message
    assert accepted in message


def test_unknown_variable_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("EXTRACTION_SHIELD_RATE_LIMT", "1/second")
    caplog.set_level(logging.WARNING, logger="asgi_extraction_shield")
    ShieldSettings()
    assert "EXTRACTION_SHIELD_RATE_LIMT is not a setting" in caplog.text


def test_unknown_constructor_argument_is_an_error() -> None:
    with pytest.raises(ConfigurationError, match="is not a setting"):
        ShieldSettings(rate="1/second")  # type: ignore[call-arg]


def test_secret_never_shown(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXTRACTION_SHIELD_SECRET_KEY", SECRET)
    s = ShieldSettings()
    assert SECRET not in repr(s) and SECRET not in str(s)
    assert all(SECRET not in value for _, value, _ in s.describe())
    assert isinstance(s.secret_key, SecretStr)


def test_secret_not_echoed_in_validation_errors() -> None:
    with pytest.raises(ConfigurationError) as info:
        ShieldSettings(secret_key=12345, mode="nope")  # type: ignore[arg-type]
    assert "12345" not in str(info.value)


def test_every_field_is_described() -> None:
    for name, field in ShieldSettings.model_fields.items():
        assert field.description and len(field.description) > 20, name
    for env, _, description in ShieldSettings().describe():  # nested groups too
        assert len(description) > 20, env


def test_typed_overrides_cover_every_setting() -> None:
    from asgi_extraction_shield.settings import ShieldOverrides

    assert set(ShieldOverrides.__annotations__) == set(ShieldSettings.model_fields)


def test_add_middleware_type_checks(tmp_path: Any) -> None:
    """``app.add_middleware(ExtractionShield, ...)`` passes mypy --strict; typos do not."""
    api = importlib.util.find_spec("mypy.api")
    assert api is not None
    from mypy import api as mypy_api

    good = tmp_path / "good.py"
    good.write_text(
        "from fastapi import FastAPI\n"
        "from asgi_extraction_shield import ExtractionShield\n"
        "app = FastAPI()\n"
        "app.add_middleware(ExtractionShield)\n"
        "app.add_middleware(ExtractionShield, rate_limit='5/second', on_event=print)\n"
    )
    bad = tmp_path / "bad.py"
    bad.write_text(good.read_text() + "app.add_middleware(ExtractionShield, rate_limt='5')\n")
    out, _, status = mypy_api.run(["--strict", "--no-incremental", str(good)])
    assert status == 0, out
    out, _, status = mypy_api.run(["--strict", "--no-incremental", str(bad)])
    assert status == 1 and "rate_limt" in out

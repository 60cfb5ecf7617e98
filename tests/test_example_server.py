"""The example model server (examples/model_server.py): its model, its API, its shield."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import httpx
import numpy as np
import pytest
from starlette.types import ASGIApp

from asgi_extraction_shield import ExtractionShield

from .servers import running

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "model_server.py"
PREDICT = "/v1/models/blobs:predict"


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("model_server", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ms = _load_example()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _client(app: ASGIApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def _assert_probability_rows(predictions: object, n_rows: int) -> np.ndarray:
    p = np.asarray(predictions, dtype=np.float64)
    assert p.shape == (n_rows, ms.N_CLASSES)
    assert (p >= 0).all()
    np.testing.assert_allclose(p.sum(axis=1), 1.0, rtol=0, atol=1e-6)
    return p


def test_model_beats_chance_on_held_out_data() -> None:
    p = ms.model.predict_proba(ms.X_TEST)
    _assert_probability_rows(p, len(ms.X_TEST))
    accuracy = float((p.argmax(axis=1) == ms.Y_TEST).mean())
    assert accuracy > 0.8  # chance is 0.1
    train_accuracy = float((ms.model.predict_proba(ms.X_TRAIN).argmax(axis=1) == ms.Y_TRAIN).mean())
    assert train_accuracy > 0.8


@pytest.mark.anyio
async def test_predict_returns_one_probability_row_per_instance() -> None:
    x = ms.X_TEST[:5]
    async with _client(ms.app) as client:
        response = await client.post(PREDICT, json={"instances": x.tolist()})
    assert response.status_code == 200, response.text
    p = _assert_probability_rows(response.json()["predictions"], 5)
    np.testing.assert_allclose(p, ms.model.predict_proba(x), rtol=0, atol=1e-12)
    assert "ratelimit-policy" in response.headers
    assert "ratelimit" in response.headers


@pytest.mark.anyio
async def test_health_is_exempt_and_metadata_is_kserve_v1() -> None:
    async with _client(ms.app) as client:
        health = await client.get("/health")
        metadata = await client.get("/v1/models/blobs")
        unknown = await client.get("/v1/models/nope")
    assert health.status_code == 200
    assert "ratelimit" not in health.headers
    assert "ratelimit-policy" not in health.headers
    assert metadata.status_code == 200
    assert metadata.json() == {"name": "blobs", "ready": True}
    assert unknown.status_code == 404


ROW = [0.0] * 64


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("content", "status", "message"),
    [
        (b"not json", 400, "not valid JSON"),
        (b'{"instances": [[NaN' + b", 0" * 63 + b"]]}", 400, "NaN"),
        (b'{"instances": [[Infinity' + b", 0" * 63 + b"]]}", 400, "Infinity"),
        (b'{"instances": [[1e999' + b", 0" * 63 + b"]]}", 422, "instances[0][0]"),
        (b"[1, 2, 3]", 422, "instances"),
        (b'{"inputs": [[0]]}', 422, "instances"),
        (b'{"instances": []}', 422, "non-empty"),
        (b'{"instances": [[1, 2, 3]]}', 422, "3 values"),
        (b'{"instances": [5]}', 422, "expected 64"),
        (b'{"instances": [["a"' + b", 0" * 63 + b"]]}", 422, "not a number"),
        (b'{"instances": [[true' + b", 0" * 63 + b"]]}", 422, "not a number"),
        (b'{"instances": [[null' + b", 0" * 63 + b"]]}", 422, "not a number"),
    ],
)
async def test_bad_input_is_a_client_error_with_a_message(
    content: bytes, status: int, message: str
) -> None:
    async with _client(ms.app) as client:
        response = await client.post(
            PREDICT, content=content, headers={"content-type": "application/json"}
        )
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


@pytest.mark.anyio
async def test_unknown_model_and_too_many_instances() -> None:
    batch = {"instances": [ROW] * (ms.MAX_INSTANCES + 1)}
    async with _client(ms.create_app()) as client:  # the model server's own checks
        unknown = await client.post("/v1/models/nope:predict", json={"instances": [ROW]})
        too_many = await client.post(PREDICT, json=batch)
    assert unknown.status_code == 404
    assert too_many.status_code == 422
    async with _client(ms.app) as client:  # the shield charges one token per instance
        over = await client.post(PREDICT, json=batch)
    assert over.status_code == 429 and "1001 tokens" in over.json()["detail"]


@pytest.mark.anyio
async def test_rate_limit_from_env_refuses_the_fourth_prediction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EXTRACTION_SHIELD_RATE_LIMIT", "3/minute")
    monkeypatch.setenv("EXTRACTION_SHIELD_SECRET_KEY", "a-test-secret-of-enough-length")
    shielded = ExtractionShield(ms.create_app())  # settings are read here, from the env
    async with _client(shielded) as client:
        answers = [await client.post(PREDICT, json={"instances": [ROW]}) for _ in range(4)]
        health = await client.get("/health")
    assert [r.status_code for r in answers] == [200, 200, 200, 429]
    refused = answers[3]
    assert refused.headers["content-type"] == "application/problem+json"
    assert int(refused.headers["retry-after"]) > 0
    assert refused.json()["status"] == 429
    assert health.status_code == 200  # exempt paths are never refused


def test_running_the_example_serves_predictions(tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    with running(EXAMPLE, log) as base:
        response = httpx.post(base + PREDICT, json={"instances": ms.X_TEST[:3].tolist()}, timeout=5)
        assert response.status_code == 200, response.text
        _assert_probability_rows(response.json()["predictions"], 3)
        assert "ratelimit" in response.headers
    assert f"curl -si {base}{PREDICT}" in log.read_text()

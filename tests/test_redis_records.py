"""Watermark records on a real redis-server: what every worker marked, in one place.

Skipped without ``redis-server`` outside CI, failed under CI (fixtures in conftest).
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from asgi_extraction_shield.cli import main
from asgi_extraction_shield.storage import RedisStorage
from asgi_extraction_shield.storage.redis_records import RedisRecordSink, read_records
from asgi_extraction_shield.watermark.dawn import DAWN

from .conftest import FakeClock, client, shield
from .redis_server import RedisServer
from .test_monitor import APP

pytestmark = pytest.mark.anyio
PATH = "/v1/models/m:predict"
# Marks a fifth of the input space, so a few dozen queries carry marks.
SETTINGS: dict[str, Any] = {
    "watermark": "dawn:rate=0.2:classes=10",
    "rate_limit": "100000/minute",
    "monitor": {"enabled": False},
    "redis_timeout": 2.0,
}


def _dawn(app: Any) -> DAWN:
    (dawn,) = app.watermarks
    assert isinstance(dawn, DAWN)
    return dawn


async def _send(apps: list[Any], n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    clients = [client(app) for app in apps]
    for i in range(n):
        body = {"instances": [rng.uniform(0, 16, 64).round(3).tolist()]}
        r = await clients[i % len(clients)].post(PATH, json=body, headers={"x-api-key": "thief"})
        assert r.status_code == 200
    for c in clients:
        await c.aclose()


async def test_two_workers_records_meet_on_redis(
    redis_server: RedisServer, raw: Any, clock: FakeClock, tmp_path: Path
) -> None:
    workers = [shield(APP, clock, storage_url=redis_server.url, **SETTINGS) for _ in range(2)]
    await _send(workers, 60, seed=3)
    for app in workers:
        for sink in app.record_sinks:
            await sink.flush()
    local = [_dawn(app).store.records() for app in workers]
    assert all(local), "each worker marked some of the queries it served"
    storage = workers[0].storage
    assert isinstance(storage, RedisStorage)
    on_redis = [record async for _, record in read_records(storage)]
    # Everything either worker marked, in the order each marked it, under one identity.
    assert sorted(json.dumps(r, sort_keys=True) for r in on_redis) == sorted(
        json.dumps(r, sort_keys=True) for records in local for r in records
    )
    assert {r["identity"] for r in on_redis} == {local[0][0]["identity"]}
    keys = [k async for k in raw.scan_iter(match="*:wm")]
    assert len(keys) == 1 and 0 < await raw.pttl(keys[0]) <= 30 * 86_400_000
    # The export is what verify --records reads: one record per line, the input included.
    out = tmp_path / "records.jsonl"
    argv = ["records", "--storage-url", redis_server.url, "--out", str(out)]
    assert await asyncio.to_thread(main, argv) == 0  # the command runs its own event loop
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == len(on_redis) and all(len(r["input"]) == 64 for r in lines)
    for app in workers:
        await app.storage.close()


async def test_the_list_is_capped_and_a_down_redis_drops_without_failing(
    redis_server: RedisServer, raw: Any, clock: FakeClock
) -> None:
    storage = RedisStorage(redis_server.url, prefix="cap", timeout=2.0)
    sink = RedisRecordSink(storage, per_identity=5, ttl=60.0, clock=clock)
    for i in range(12):
        sink.add("header:abc", [{"input": [i], "label": i % 3}])
    await sink.flush()
    kept = [record async for _, record in read_records(storage, "header:abc")]
    assert [r["input"] for r in kept] == [[7], [8], [9], [10], [11]]  # the most recent
    assert 0 < await raw.pttl("{cap:header:abc}:wm") <= 60_000
    assert sink.written == 12 and sink.dropped == 0
    redis_server.stop()
    sink.add("header:abc", [{"input": [99]}])  # returns at once, whatever Redis does
    await sink.flush()
    assert sink.dropped == 1
    await storage.close()


async def test_records_need_redis(capsys: pytest.CaptureFixture[str]) -> None:
    assert await asyncio.to_thread(main, ["records", "--storage-url", "memory://"]) == 2
    assert "WATERMARK_RECORDS_PATH" in capsys.readouterr().err

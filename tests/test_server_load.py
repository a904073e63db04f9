"""Load: 40 concurrent streaming clients against ``charloom serve --max-concurrency 2`` (loopback only,
bounded in count and time). Every answer is a complete stream (200) or a clean refusal (503 with
Retry-After), nothing else, and ``/health`` keeps answering throughout."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

CLIENTS = 40
BODY = {"prompt": "the quick ", "max_tokens": 400, "temperature": 1.0, "stream": True}


@pytest.fixture()
def cli_server(tiny_run: Path):
    """``charloom serve`` as a user starts it, in a subprocess on a free port; stopped by its pid."""
    proc = subprocess.Popen([sys.executable, "-m", "charloom", "serve", str(tiny_run), "--port", "0",
                             "--max-concurrency", "2", "--max-queue", "2", "--time-limit", "20s"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        line = proc.stdout.readline()
        assert " on http://127.0.0.1:" in line, line or proc.stderr.read()
        yield line.split(" on ", 1)[1].split("/ ", 1)[0]
    finally:
        proc.terminate()
        proc.wait(10)


async def _client(http: "httpx.AsyncClient", url: str) -> tuple[int, str]:
    """One streaming request: (status, '' if it ended as it should, else what went wrong)."""
    async with http.stream("POST", url + "/v1/completions", json=BODY) as r:
        body = (await r.aread()).decode()
    if r.status_code == 503:
        ok = r.headers.get("retry-after") == "1" and json.loads(body)["error"]["type"] == "server_busy"
        return 503, "" if ok else f"bad 503: {r.headers} {body}"
    if r.status_code != 200:
        return r.status_code, body
    events = [e[len("data: "):] for e in body.split("\n\n") if e.startswith("data: ")]
    finish = [c["finish_reason"] for e in events[:-1] for c in json.loads(e)["choices"] if c["finish_reason"]]
    return 200, "" if events[-1] == "[DONE]" and finish == ["length"] else f"incomplete stream: {body[-300:]}"


async def _load(url: str) -> tuple[Counter, list[str], list[float]]:
    health_times: list[float] = []
    stop = asyncio.Event()

    async def watch_health(http: "httpx.AsyncClient") -> None:
        while not stop.is_set():
            start = time.monotonic()
            r = await http.get(url + "/health", timeout=10)
            assert r.status_code == 200 and r.json()["status"] == "ok"
            health_times.append(time.monotonic() - start)
            await asyncio.sleep(0.05)

    limits = httpx.Limits(max_connections=CLIENTS + 5, max_keepalive_connections=0)
    async with httpx.AsyncClient(limits=limits, timeout=60) as http, httpx.AsyncClient(timeout=10) as health_http:
        watcher = asyncio.create_task(watch_health(health_http))
        results = await asyncio.gather(*[_client(http, url) for _ in range(CLIENTS)], return_exceptions=True)
        stop.set()
        await watcher  # re-raises if /health ever failed
        final = (await health_http.get(url + "/health")).json()
    statuses = Counter(r[0] if isinstance(r, tuple) else type(r).__name__ for r in results)
    problems = [repr(r) if not isinstance(r, tuple) else r[1] for r in results if not isinstance(r, tuple) or r[1]]
    assert final["running"] == 0 and final["waiting"] == 0, final
    return statuses, problems, health_times


def test_forty_streaming_clients_against_two_slots(cli_server):
    start = time.monotonic()
    statuses, problems, health_times = asyncio.run(asyncio.wait_for(_load(cli_server), timeout=120))
    print(f"\nload: {dict(statuses)} in {time.monotonic() - start:.1f}s; /health answered {len(health_times)} times, "
          f"slowest {max(health_times):.3f}s")
    assert problems == []
    assert set(statuses) <= {200, 503} and sum(statuses.values()) == CLIENTS
    assert statuses[200] >= 2 and statuses[503] >= 1
    assert len(health_times) >= 2

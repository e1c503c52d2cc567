"""``autotune serve``: 200 concurrent requests on loopback all answered and counted, bad requests refused
with OpenAI-style JSON while the server keeps serving, SSE streaming, and graceful shutdown (in-process
and by SIGTERM to the real command). Every wait is bounded, so a hang fails instead of stalling."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

CONTEXT = 64
VOCAB = 512


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def tiny_engine(batch_size: int = 8, delay_ms: float = 5.0) -> Any:
    from autotune.config import TrialConfig
    from autotune.engine import Engine
    from autotune.hardware import probe

    cfg = TrialConfig(batch_size=batch_size, max_queue_delay_ms=delay_ms)
    return Engine.build("preset:llama-tiny", cfg, probe("cpu"), max_context=CONTEXT)


class LiveServer:
    """uvicorn in a thread on a free loopback port; ``stop()`` is what SIGTERM does (should_exit)."""

    def __init__(self, engine: Any) -> None:
        import uvicorn

        from autotune.serve import create_app

        self.engine = engine
        self.app = create_app(engine)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", backlog=1024)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start in 30 s"
            assert self.thread.is_alive(), "server thread died"
            time.sleep(0.02)
        return self

    def stop(self, timeout: float = 30) -> None:
        self.server.should_exit = True
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "server did not shut down"

    def metric(self, name: str, **labels: str) -> float:
        return float(self.app.state.metrics.registry.get_sample_value(name, labels or None) or 0.0)


@pytest.fixture(scope="module")
def live() -> Iterator[LiveServer]:
    srv = LiveServer(tiny_engine()).start()
    yield srv
    srv.stop()


def post(url: str, body: Any, **kw: Any) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json=body, timeout=30, **kw)


def test_200_concurrent_requests_all_answered_and_counted(live: LiveServer) -> None:
    n = 200
    before = {
        "ok": live.metric("autotune_requests_total", code="200"),
        "tokens": live.metric("autotune_output_tokens_total"),
        "e2e": live.metric("autotune_e2e_seconds_count"),
    }
    wanted = [(1 + i % 8, 4 + i % 20) for i in range(n)]  # (max_tokens, prompt length)

    async def one(client: httpx.AsyncClient, max_tokens: int, plen: int) -> httpx.Response:
        prompt = [5 + (j * 7) % (VOCAB - 5) for j in range(plen)]
        return await client.post("/v1/completions", json={"prompt": prompt, "max_tokens": max_tokens})

    async def burst() -> list[httpx.Response]:
        limits = httpx.Limits(max_connections=n)
        async with httpx.AsyncClient(base_url=live.url, timeout=60, limits=limits) as client:
            return await asyncio.wait_for(asyncio.gather(*(one(client, m, p) for m, p in wanted)), timeout=90)

    t = time.perf_counter()
    responses = asyncio.run(burst())
    elapsed = time.perf_counter() - t
    assert len(responses) == n
    assert [r.status_code for r in responses] == [200] * n
    for r, (max_tokens, plen) in zip(responses, wanted, strict=True):
        doc = r.json()
        assert doc["usage"] == {
            "prompt_tokens": plen,
            "completion_tokens": max_tokens,
            "total_tokens": plen + max_tokens,
        }
        assert doc["choices"][0]["finish_reason"] == "length"
        assert doc["autotune"]["e2e_ms"] > 0 and 1 <= doc["autotune"]["batch_rows"] <= 8
    # every request counted once, its tokens and its latency recorded
    assert live.metric("autotune_requests_total", code="200") - before["ok"] == n
    assert live.metric("autotune_output_tokens_total") - before["tokens"] == sum(m for m, _ in wanted)
    assert live.metric("autotune_e2e_seconds_count") - before["e2e"] == n
    assert live.metric("autotune_in_flight_requests") == 0
    assert live.metric("autotune_queue_depth") == 0
    assert live.metric("autotune_batch_rows_count") >= n
    print(f"200 concurrent requests answered in {elapsed:.1f} s")


@pytest.mark.parametrize(
    ("body", "status", "param"),
    [
        ({"prompt": [5] * CONTEXT, "max_tokens": 1}, 400, "prompt"),  # no room left in the context
        ({"prompt": [5] * 10, "max_tokens": CONTEXT - 9}, 400, "max_tokens"),  # prompt + output > context
        ({"prompt": [5] * 10, "max_tokens": 0}, 422, "max_tokens"),
        ({"prompt": [5] * 10, "max_tokens": -3}, 422, "max_tokens"),
        ({"prompt": [5] * 10, "max_tokens": "many"}, 422, "max_tokens"),
        ({"prompt": "", "max_tokens": 4}, 422, "prompt"),
        ({"prompt": [], "max_tokens": 4}, 422, "prompt"),
        ({"prompt": [5, -1], "max_tokens": 4}, 422, "prompt"),
        ({"prompt": [5, VOCAB], "max_tokens": 4}, 400, "prompt"),  # outside the vocabulary
        ({"max_tokens": 4}, 422, "prompt"),
        ({"prompt": "hi", "max_tokens": 4, "temperature": 2.5}, 422, "temperature"),
        ([1, 2, 3], 422, None),
    ],
)
def test_bad_requests_get_json_errors_and_server_keeps_serving(
    live: LiveServer, body: Any, status: int, param: str | None
) -> None:
    before = live.metric("autotune_requests_total", code=str(status))
    r = post(live.url, body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] == "invalid_request_error" and err["param"] == param
    assert "Traceback" not in r.text
    assert live.metric("autotune_requests_total", code=str(status)) == before + 1
    assert post(live.url, {"prompt": [5] * 10, "max_tokens": 2}).status_code == 200


def test_malformed_json_is_a_400_json_error(live: LiveServer) -> None:
    for raw in (b"{not json", b"", b'{"prompt": "x", "max_tokens": 4'):
        r = httpx.post(
            f"{live.url}/v1/completions", content=raw, headers={"content-type": "application/json"}, timeout=30
        )
        assert r.status_code in (400, 422), r.text
        assert r.json()["error"]["message"]
    r = httpx.post(f"{live.url}/v1/completions", content=b"prompt=hi", timeout=30)  # not JSON at all
    assert r.status_code in (400, 422) and "error" in r.json()
    assert httpx.get(f"{live.url}/nowhere", timeout=30).json()["error"]["type"] == "not_found_error"
    assert post(live.url, {"prompt": "still serving", "max_tokens": 2}).status_code == 200


def test_text_prompt_and_temperature_accepted_but_decoding_is_greedy(live: LiveServer) -> None:
    r = post(
        live.url, {"model": "anything", "prompt": "hello there", "max_tokens": 5, "temperature": 1.3, "top_p": 0.9}
    )
    assert r.status_code == 200
    assert r.headers["x-autotune-decoding"] == "greedy"
    doc = r.json()
    assert doc["object"] == "text_completion" and doc["autotune"]["decoding"] == "greedy"
    assert doc["usage"]["completion_tokens"] == 5 and isinstance(doc["choices"][0]["text"], str)


def test_stream_sends_openai_chunks_then_done(live: LiveServer) -> None:
    with httpx.stream(
        "POST", f"{live.url}/v1/completions", json={"prompt": [9] * 8, "max_tokens": 6, "stream": True}, timeout=30
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 6


def test_health_and_prometheus_text(live: LiveServer) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    h = httpx.get(f"{live.url}/health", timeout=30).json()
    assert h["status"] == "ok" and h["max_context"] == CONTEXT and h["config"]["batch_size"] == 8
    r = httpx.get(f"{live.url}/metrics", timeout=30)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    families = {f.name: f.type for f in text_string_to_metric_families(r.text)}
    for name, kind in {
        "autotune_requests": "counter",
        "autotune_output_tokens": "counter",
        "autotune_prompt_tokens": "counter",
        "autotune_queue_depth": "gauge",
        "autotune_in_flight_requests": "gauge",
        "autotune_batch_rows": "histogram",
        "autotune_e2e_seconds": "histogram",
        "autotune_ttft_seconds": "histogram",
        "autotune_tpot_seconds": "histogram",
        "autotune_queue_seconds": "histogram",
    }.items():
        assert families.get(name) == kind, name


def test_graceful_shutdown_finishes_in_flight_requests() -> None:
    srv = LiveServer(tiny_engine(batch_size=2, delay_ms=0)).start()
    n = 24
    answers: list[int] = []

    async def burst() -> None:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as client:
            tasks = [
                asyncio.create_task(client.post("/v1/completions", json={"prompt": [7] * 8, "max_tokens": 16}))
                for _ in range(n)
            ]
            deadline = time.monotonic() + 30
            while srv.metric("autotune_in_flight_requests") < n:  # all accepted, most still queued
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
            srv.server.should_exit = True  # what SIGTERM does: stop accepting, drain, then lifespan end
            answers.extend(r.status_code for r in await asyncio.wait_for(asyncio.gather(*tasks), 60))

    asyncio.run(burst())
    srv.thread.join(30)
    assert not srv.thread.is_alive()
    assert answers == [200] * n
    assert srv.engine._threads == [] and srv.engine._closed  # the engine drained and stopped after the requests


def write_export(path: Path, *, tuned_tps: float = 1.0, slo_max: float = 60_000.0, config: dict | None = None) -> Path:
    """A valid export file for the tiny preset on this machine, without running a study."""
    from autotune.config import TrialConfig
    from autotune.hardware import probe

    hw = probe("cpu")
    lat = {p: 10.0 for p in ("p50", "p90", "p95", "p99")}
    doc = {
        "schema_version": 1,
        "autotune_version": "0.1.0",
        "exported_at": "2026-01-01T00:00:00Z",
        "study": "handmade",
        "trial": 0,
        "model": "preset:llama-tiny",
        "model_seed": 0,
        "hardware": {**hw.model_dump(mode="json"), "fingerprint": hw.fingerprint()},
        "slo": [{"metric": "e2e_ms", "percentile": "p95", "max": slo_max}],
        "workload": {
            "requests": 32,
            "prompt_tokens": 16,
            "output_tokens": 8,
            "max_duration_s": 10,
            "arrival": {"type": "closed"},
        },
        "config": (config or TrialConfig(batch_size=4, max_queue_delay_ms=2).model_dump(mode="json")),
        "metrics": {
            "output_tokens_per_s": tuned_tps,
            "requests_per_s": tuned_tps / 8,
            "e2e_ms": lat,
            "ttft_ms": lat,
            "tpot_ms": lat,
            "peak_memory_mb": 300.0,
            "memory_kind": "process_peak_rss",
            "requests_measured": 32,
        },
        "confirmation": None,
    }
    path.write_text(json.dumps(doc, indent=2))
    return path


def test_cli_serve_drains_on_sigterm(tmp_path: Path) -> None:
    export = write_export(tmp_path / "best.json")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "autotune.cli", "serve", str(export), "--port", str(port)],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.communicate()[1]
            assert time.monotonic() < deadline, "serve did not come up in 90 s"
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert post(url, {"prompt": [5] * 30, "max_tokens": 1}).status_code == 400  # context is 16 + 8 here

        async def burst() -> list[int]:
            async with httpx.AsyncClient(base_url=url, timeout=60) as client:
                tasks = [
                    asyncio.create_task(client.post("/v1/completions", json={"prompt": [6] * 16, "max_tokens": 8}))
                    for _ in range(16)
                ]
                await asyncio.sleep(0.05)  # accepted, not all finished
                proc.send_signal(signal.SIGTERM)
                return [r.status_code for r in await asyncio.wait_for(asyncio.gather(*tasks), 60)]

        assert asyncio.run(burst()) == [200] * 16
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    assert "Traceback" not in proc.stderr.read()  # type: ignore[union-attr]


def test_shutdown_does_not_wait_on_a_client_that_left() -> None:
    srv = LiveServer(tiny_engine(batch_size=1, delay_ms=0)).start()

    async def leave() -> None:
        async with httpx.AsyncClient(base_url=srv.url, timeout=30) as client:
            body = {"prompt": [7] * 8, "max_tokens": 16, "stream": True}
            task = asyncio.create_task(client.post("/v1/completions", json=body))
            deadline = time.monotonic() + 30
            while srv.metric("autotune_in_flight_requests") < 1:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.005)
            task.cancel()  # the client hangs up before its stream starts

    asyncio.run(leave())
    srv.stop(timeout=30)  # returns once the engine has finished the orphaned request
    assert srv.metric("autotune_in_flight_requests") == 0

"""``autotune serve``: 200 concurrent requests on loopback all answered and counted, bad requests refused
with OpenAI-style JSON while the server keeps serving, SSE streaming, and graceful shutdown (in-process
and by SIGTERM to the real command); requests up to the model's context with the ones outside the tuned
shape flagged; the official ``openai`` client against /v1/models, completions and chat (plain and
streamed, and its error types); security headers on every response. Every wait is bounded, so a hang
fails instead of stalling."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import free_port

CONTEXT = 64
VOCAB = 512
OUTSIDE = "X-Autotune-Outside-Tuned-Shape"


def tiny_engine(batch_size: int = 8, delay_ms: float = 5.0) -> Any:
    from autotune.config import TrialConfig
    from autotune.engines.builtin.engine import Engine
    from autotune.hardware import probe

    cfg = TrialConfig(batch_size=batch_size, max_queue_delay_ms=delay_ms)
    return Engine.build("preset:llama-tiny", cfg, probe("cpu"), max_context=CONTEXT)


class LiveServer:
    """uvicorn in a thread on a free loopback port; ``stop()`` is what SIGTERM does (should_exit)."""

    def __init__(self, engine: Any, **app_kwargs: Any) -> None:
        import uvicorn

        from autotune.serve import create_app

        self.engine = engine
        self.app = create_app(engine, **app_kwargs)
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
    srv = LiveServer(tiny_engine(), max_context=CONTEXT).start()
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
        live.url,
        {"model": "preset:llama-tiny", "prompt": "hello there", "max_tokens": 5, "temperature": 1.3, "top_p": 0.9},
    )
    assert r.status_code == 200
    assert r.headers["x-autotune-decoding"] == "greedy"
    doc = r.json()
    assert doc["object"] == "text_completion" and doc["autotune"]["decoding"] == "greedy"
    assert doc["usage"]["completion_tokens"] == 5 and isinstance(doc["choices"][0]["text"], str)
    r = post(live.url, {"model": "anything", "prompt": "hello there", "max_tokens": 5})
    assert r.status_code == 404  # OpenAI's answer for a model not served, not an echo of the name
    assert r.json()["error"] == {
        "message": "The model `anything` does not exist: this server serves `preset:llama-tiny` (GET /v1/models)",
        "type": "invalid_request_error",
        "param": "model",
        "code": "model_not_found",
    }


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
    assert h["config"]["model"] == h["model"] and h["model"]  # the model served, never null
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
        [sys.executable, "-m", "autotune.cli", "serve", str(export), "--port", str(port), "--max-context", "40"],
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
        # tuned on prompts of 16 and outputs of 8; --max-context 40 caps prompt + max_tokens
        h = httpx.get(f"{url}/health", timeout=10).json()
        assert h["max_context"] == 40 and h["tuned_shape"] == {"prompt_tokens": 16, "output_tokens": 8, "context": 24}
        r = post(url, {"prompt": [5] * 30, "max_tokens": 1})
        assert r.status_code == 200 and r.headers[OUTSIDE] == "prompt_tokens 30 > 16 tuned"
        assert post(url, {"prompt": [5] * 30, "max_tokens": 11}).json()["error"]["param"] == "max_tokens"
        assert post(url, {"prompt": [5] * 40, "max_tokens": 1}).status_code == 400
        assert OUTSIDE.lower() not in post(url, {"prompt": [5] * 16, "max_tokens": 8}).headers

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
        # uvicorn re-raises the signal once drained: killed by it, or the CLI's SIGTERM handler's exit 143
        assert proc.wait(timeout=60) in (0, 143, -signal.SIGTERM)
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


# -- the whole model context, and the tuned shape -----------------------------------------------------
TUNED_PROMPT, TUNED_OUTPUT = 32, 16  # a workload of prompts up to 32 tokens, outputs up to 16
LM = "builtin:tiny-lm"  # a real model with 512 positions and a real tokenizer


def lm_engine(**cfg: Any) -> Any:
    """tiny-lm built as ``load_engine`` builds an export's engine: caches sized for the tuned workload."""
    from autotune.config import TrialConfig
    from autotune.engines.builtin.engine import Engine
    from autotune.hardware import probe

    config = TrialConfig(**{"batch_size": 8, "max_queue_delay_ms": 5.0, **cfg})
    ctx = TUNED_PROMPT + TUNED_OUTPUT
    return Engine.build(LM, config, probe("cpu"), prompt_pad_to=TUNED_PROMPT, max_context=ctx)


@pytest.fixture(scope="module")
def wide() -> Iterator[LiveServer]:
    srv = LiveServer(lm_engine()).start()
    yield srv
    srv.stop()


def test_serves_the_models_context_and_flags_requests_outside_the_tuned_shape(wide: LiveServer) -> None:
    h = httpx.get(f"{wide.url}/health", timeout=30).json()
    assert h["max_context"] == h["model_max_context"] == 512  # not the workload's 48
    assert h["tuned_shape"] == {"prompt_tokens": 32, "output_tokens": 16, "context": 48}
    before, counted = h["outside_tuned_shape"], wide.metric("autotune_outside_tuned_shape_requests_total")
    # ordinary requests, many longer than the tuned workload: all answered, the longer ones flagged
    shapes = [(8 + (i * 37) % 400, 1 + (i * 7) % 24) for i in range(48)]  # (prompt, max_tokens)

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=wide.url, timeout=60) as client:
            calls = (client.post("/v1/completions", json={"prompt": [9] * p, "max_tokens": m}) for p, m in shapes)
            return await asyncio.wait_for(asyncio.gather(*calls), timeout=120)

    responses = asyncio.run(burst())
    assert [r.status_code for r in responses] == [200] * len(shapes)
    for r, (p, m) in zip(responses, shapes, strict=True):
        assert r.json()["usage"]["completion_tokens"] == m
        reasons = ([f"prompt_tokens {p} > 32 tuned"] if p > 32 else []) + (
            [f"max_tokens {m} > 16 tuned"] if m > 16 else []
        )
        assert r.headers.get(OUTSIDE) == ("; ".join(reasons) or None), (p, m)
        assert r.json()["autotune"]["outside_tuned_shape"] == reasons
    outside = sum(p > 32 or m > 16 for p, m in shapes)
    assert 0 < outside < len(shapes)
    # within each bound but not their sum
    r = post(wide.url, {"prompt": [9] * 32, "max_tokens": 16})
    assert OUTSIDE.lower() not in r.headers and r.json()["autotune"]["outside_tuned_shape"] == []
    # the model's context is the limit now, and streaming says it too
    with httpx.stream(
        "POST", f"{wide.url}/v1/completions", json={"prompt": [9] * 511, "max_tokens": 1, "stream": True}, timeout=30
    ) as s:
        assert s.status_code == 200 and s.headers[OUTSIDE] == "prompt_tokens 511 > 32 tuned"
        assert [line for line in s.iter_lines() if line][-1] == "data: [DONE]"
    assert post(wide.url, {"prompt": [9] * 512, "max_tokens": 1}).json()["error"]["param"] == "prompt"
    assert post(wide.url, {"prompt": [9] * 500, "max_tokens": 13}).json()["error"]["param"] == "max_tokens"
    h = httpx.get(f"{wide.url}/health", timeout=30).json()["outside_tuned_shape"]
    assert h["requests"] - before["requests"] == outside + 1
    assert h["prompt_tokens"] - before["prompt_tokens"] == sum(p > 32 for p, _ in shapes) + 1
    assert h["max_tokens"] - before["max_tokens"] == sum(m > 16 for _, m in shapes)
    assert wide.metric("autotune_outside_tuned_shape_requests_total") - counted == outside + 1


def test_max_context_option_caps_requests_and_may_not_exceed_the_models() -> None:
    from autotune.errors import AutotuneError
    from autotune.serve import create_app

    engine = lm_engine()
    with pytest.raises(AutotuneError, match="exceeds the model's 512 positions"):
        create_app(engine, max_context=513)
    srv = LiveServer(engine, max_context=100).start()
    try:
        assert httpx.get(f"{srv.url}/health", timeout=30).json()["max_context"] == 100
        assert post(srv.url, {"prompt": [9] * 99, "max_tokens": 1}).status_code == 200
        r = post(srv.url, {"prompt": [9] * 100, "max_tokens": 1})
        assert r.status_code == 400 and "served context is 100" in r.json()["error"]["message"]
    finally:
        srv.stop()


def test_continuous_scheduler_takes_a_request_longer_than_the_tuned_workload() -> None:
    """Its page pool was sized for batch 1 of 48 tokens: a 400-token prompt stopped the whole manager."""
    srv = LiveServer(lm_engine(batch_size=1, scheduler="continuous")).start()
    try:
        r = post(srv.url, {"prompt": [9] * 400, "max_tokens": 60})
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 60 and r.headers[OUTSIDE].startswith("prompt_tokens 400")
        assert post(srv.url, {"prompt": [9] * 20, "max_tokens": 4}).status_code == 200  # and it keeps serving
    finally:
        srv.stop()


# -- the official openai client ---------------------------------------------------------------------
TEMPLATE = (
    "{% for m in messages %}<|bos|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture
def client(wide: LiveServer) -> Iterator[Any]:
    import openai

    with openai.OpenAI(base_url=f"{wide.url}/v1", api_key="unused", max_retries=0, timeout=60) as c:
        yield c


@pytest.fixture
def chat_template(wide: LiveServer) -> Iterator[str]:
    """tiny-lm's tokenizer has no chat template: give it a simple one for the test."""
    tok = wide.engine.tokenizer
    assert not getattr(tok, "chat_template", None)
    tok.chat_template = TEMPLATE
    try:
        yield TEMPLATE
    finally:
        tok.chat_template = None


def test_openai_client_lists_and_retrieves_the_served_model(client: Any, wide: LiveServer) -> None:
    import openai

    models = client.models.list()
    assert [m.id for m in models.data] == [LM] and models.data[0].owned_by == "autotune"
    assert client.models.retrieve(LM).id == LM
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("gpt-4o")
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("org/other-model")  # sent as org%2Fother-model


def test_openai_client_completions_plain_streamed_and_batched(client: Any) -> None:
    import openai

    one = client.completions.create(model=LM, prompt="The cat sat on the", max_tokens=6, temperature=0.7)
    assert one.object == "text_completion" and one.model == LM and len(one.choices) == 1
    assert one.choices[0].finish_reason == "length" and one.usage.completion_tokens == 6
    text = one.choices[0].text
    assert text.strip()
    streamed = list(client.completions.create(model=LM, prompt="The cat sat on the", max_tokens=6, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == text  # greedy: the same text
    assert streamed[-1].choices[0].finish_reason == "length" and streamed[-1].usage.completion_tokens == 6
    # a list of prompts: one choice per prompt, in order
    prompts = ["The cat sat on the", "Once upon a time", "A"]
    many = client.completions.create(model=LM, prompt=prompts, max_tokens=6)
    assert [c.index for c in many.choices] == [0, 1, 2] and many.choices[0].text == text
    singles = [client.completions.create(model=LM, prompt=p, max_tokens=6).choices[0].text for p in prompts]
    assert [c.text for c in many.choices] == singles
    assert many.usage.completion_tokens == 18
    assert many.usage.prompt_tokens == sum(
        client.completions.create(model=LM, prompt=p, max_tokens=1).usage.prompt_tokens for p in prompts
    )
    ids = client.completions.create(model=LM, prompt=[[9] * 5, [9] * 7], max_tokens=2)
    assert [c.index for c in ids.choices] == [0, 1] and ids.usage.prompt_tokens == 12
    streamed = list(client.completions.create(model=LM, prompt=prompts, max_tokens=6, stream=True))
    texts = {i: "".join(c.choices[0].text for c in streamed if c.choices[0].index == i) for i in range(3)}
    assert texts == dict(enumerate(singles))
    # refusals come back as the client's error types
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=LM, prompt="hi", max_tokens=2, n=2)
    assert e.value.param == "n"
    with pytest.raises(openai.NotFoundError) as nf:
        client.completions.create(model="gpt-3.5-turbo-instruct", prompt="hi", max_tokens=2)
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=LM, prompt=[9] * 600, max_tokens=2)  # beyond the model's 512


def test_openai_client_chat_needs_a_chat_template(client: Any) -> None:
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=LM, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert "no chat template" in e.value.message and e.value.param == "messages"


def test_openai_client_chat_plain_and_streamed_with_a_template(
    client: Any, wide: LiveServer, chat_template: str
) -> None:
    import openai

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]
    rendered = wide.engine.tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    chat = client.chat.completions.create(model=LM, messages=messages, max_tokens=5, temperature=0.2)
    assert chat.object == "chat.completion" and chat.model == LM and chat.id.startswith("chatcmpl-")
    msg = chat.choices[0].message
    assert msg.role == "assistant" and isinstance(msg.content, str) and msg.content.strip()
    assert chat.choices[0].finish_reason == "length"
    assert chat.usage.prompt_tokens == len(rendered) and chat.usage.completion_tokens == 5
    # the template's prompt, continued greedily: the same text as that prompt sent to /v1/completions
    assert client.completions.create(model=LM, prompt=list(rendered), max_tokens=5).choices[0].text == msg.content
    chunks = list(client.chat.completions.create(model=LM, messages=messages, max_tokens=5, stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks) and chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].usage.completion_tokens == 5
    parts = [{"role": "user", "content": [{"type": "text", "text": "Tell me "}, {"type": "text", "text": "a story."}]}]
    assert (
        client.chat.completions.create(model=LM, messages=parts, max_completion_tokens=3).usage.completion_tokens == 3
    )
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=LM, messages=messages, max_tokens=2, n=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4o", messages=messages, max_tokens=2)
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    with pytest.raises(openai.BadRequestError, match="image_url"):
        client.chat.completions.create(model=LM, messages=image, max_tokens=2)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "stream": "yes"}, "stream"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "stream": 1}, "stream"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": "2"}, "max_tokens"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "n": 0}, "n"),
        ("/v1/completions", {"prompt": [5, "hi"], "max_tokens": 2}, "prompt"),
        ("/v1/completions", {"prompt": ["hi", ""], "max_tokens": 2}, "prompt"),
        ("/v1/completions", {"prompt": [[5], []], "max_tokens": 2}, "prompt"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "stream": "yes"}, "stream"),
        ("/v1/chat/completions", {"messages": [], "max_tokens": 2}, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, "messages"),
        ("/v1/chat/completions", {"prompt": "hi"}, "messages"),
    ],
)
def test_strict_request_types_are_422(wide: LiveServer, path: str, body: Any, param: str) -> None:
    r = httpx.post(f"{wide.url}{path}", json=body, timeout=30)
    assert r.status_code == 422, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"].startswith(param)


def test_security_headers_on_every_response_errors_included(live: LiveServer, monkeypatch: Any) -> None:
    from autotune.serve import SECURITY_HEADERS

    got = {
        "completion": post(live.url, {"prompt": [5] * 4, "max_tokens": 1}),
        "400": post(live.url, {"prompt": [5] * CONTEXT, "max_tokens": 1}),
        "404 model": post(live.url, {"model": "nope", "prompt": [5], "max_tokens": 1}),
        "404 route": httpx.get(f"{live.url}/nowhere", timeout=30),
        "405": httpx.get(f"{live.url}/v1/completions", timeout=30),
        "422": post(live.url, {"prompt": "hi", "stream": "yes"}),
        "400 json": httpx.post(
            f"{live.url}/v1/completions", content=b"{", headers={"content-type": "application/json"}, timeout=30
        ),
        "health": httpx.get(f"{live.url}/health", timeout=30),
        "metrics": httpx.get(f"{live.url}/metrics", timeout=30),
        "models": httpx.get(f"{live.url}/v1/models", timeout=30),
        "openapi": httpx.get(f"{live.url}/openapi.json", timeout=30),
    }
    with httpx.stream("POST", f"{live.url}/v1/completions", json={"prompt": [5], "stream": True}, timeout=30) as r:
        r.read()
        got["stream"] = r

    async def broken(prompt: Any) -> list[int]:
        raise RuntimeError("tokenizer fell over")

    monkeypatch.setattr(live.engine, "aencode", broken)  # an unexpected exception: Starlette's 500 path
    got["500"] = post(live.url, {"prompt": "hello", "max_tokens": 1})
    monkeypatch.undo()
    assert got["500"].status_code == 500 and got["500"].json()["error"]["type"] == "server_error"
    assert got["completion"].status_code == got["stream"].status_code == 200
    for what, r in got.items():
        for key, value in SECURITY_HEADERS.items():
            assert r.headers.get(key) == value, (what, key)
    csp = SECURITY_HEADERS["Content-Security-Policy"]
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert SECURITY_HEADERS["X-Content-Type-Options"] == "nosniff" and SECURITY_HEADERS["X-Frame-Options"] == "DENY"

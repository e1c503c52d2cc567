"""Serve one tuned :class:`~autotune.engine.Engine` over HTTP, OpenAI-style.

``POST /v1/completions`` takes ``prompt`` (text, or a list of token ids so lengths are exact),
``max_tokens``, ``temperature`` and ``stream``. The tuned engine decodes greedily with a forced
output length, so ``temperature`` is accepted (0..2, for client compatibility) and ignored: the
response says so in the ``X-Autotune-Decoding: greedy`` header and its ``autotune`` field.
Streaming sends OpenAI-format server-sent events, but the text arrives when the request's batch
finishes, not token by token. ``GET /health`` reports the config served; ``GET /metrics`` is
Prometheus text (``autotune_*``). On shutdown uvicorn stops accepting, in-flight requests finish,
then the engine drains its queue and stops.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

if TYPE_CHECKING:
    from autotune.engine import Engine, GenerationResult

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
DECODING_HEADER = {"X-Autotune-Decoding": "greedy"}


class CompletionRequest(BaseModel):
    """The subset of OpenAI's completion request the tuned engine honours; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    prompt: Annotated[str, Field(min_length=1)] | Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    stream: bool = False


class ApiError(Exception):
    """A request the server refuses, rendered as OpenAI's ``{"error": {...}}`` body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def error_body(message: str, kind: str = "invalid_request_error", param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": None}}


class ServerMetrics:
    """Prometheus series in a registry of their own, so several apps (tests) never collide."""

    def __init__(self, engine: Engine) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "autotune_requests", "completion requests answered, by HTTP status", ["code"], registry=r
        )
        self.prompt_tokens = Counter("autotune_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.output_tokens = Counter("autotune_output_tokens", "tokens generated for finished requests", registry=r)
        self.in_flight = Gauge(
            "autotune_in_flight_requests", "completion requests accepted, not yet answered", registry=r
        )
        self.queue_depth = Gauge("autotune_queue_depth", "requests waiting in the engine's batcher queue", registry=r)
        self.queue_depth.set_function(lambda: float(engine._queue.qsize()))
        self.batch_rows = Histogram(
            "autotune_batch_rows", "rows of the batch each request ran in", buckets=BATCH_BUCKETS, registry=r
        )

        def hist(name: str, doc: str) -> Histogram:
            return Histogram(name, doc, buckets=LATENCY_BUCKETS, registry=r)

        self.e2e = hist("autotune_e2e_seconds", "engine submit to last token")
        self.ttft = hist("autotune_ttft_seconds", "engine submit to first token (prefill done)")
        self.tpot = hist("autotune_tpot_seconds", "time per output token after the first")
        self.queue = hist("autotune_queue_seconds", "time waiting for a batch")
        self.http = hist("autotune_request_seconds", "HTTP request received to response ready")
        info = Gauge("autotune_config_info", "the config served (labels); value 1", ["model", "config"], registry=r)
        info.labels(model=str(getattr(engine.info, "ref", "") or ""), config=engine.config.label()).set(1)

    def observe(self, res: GenerationResult) -> None:
        self.prompt_tokens.inc(res.prompt_tokens)
        self.output_tokens.inc(res.output_tokens)
        self.batch_rows.observe(res.batch_rows)
        self.e2e.observe(res.e2e_s)
        self.ttft.observe(res.ttft_s)
        self.tpot.observe(res.tpot_s)
        self.queue.observe(res.queue_s)


def _timings(res: GenerationResult) -> dict[str, Any]:
    """Engine-side timings, so a client (``autotune verify --url``) can compare with the tuned figures."""
    return {
        "decoding": "greedy",
        "e2e_ms": res.e2e_s * 1000,
        "ttft_ms": res.ttft_s * 1000,
        "tpot_ms": res.tpot_s * 1000,
        "queue_ms": res.queue_s * 1000,
        "batch_rows": res.batch_rows,
    }


def create_app(engine: Engine, *, model_name: str | None = None, manage_engine: bool = True) -> FastAPI:
    """The HTTP app for ``engine``. With ``manage_engine`` the app starts it and, on shutdown, drains and stops it."""
    disable_created_metrics()  # the *_created series only add noise to a scrape
    metrics = ServerMetrics(engine)
    name = model_name or str(getattr(engine.info, "ref", "") or "autotune")
    state = {"draining": False, "in_flight": 0}
    idle = asyncio.Event()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if manage_engine:
            engine.start()
        idle.set()
        try:
            yield
        finally:
            state["draining"] = True  # uvicorn already stopped accepting; refuse what still slips in
            if state["in_flight"]:
                await idle.wait()  # every accepted request resolves: the engine finishes what it queued
            if manage_engine:
                await asyncio.to_thread(engine.stop)  # finishes whatever the queue still holds

    app = FastAPI(title="autotune serve", lifespan=lifespan)
    app.state.metrics = metrics
    app.state.engine = engine

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        if request.url.path == "/v1/completions":
            metrics.requests.labels(code=str(exc.status)).inc()
        return JSONResponse(error_body(exc.message, exc.kind, exc.param), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            status, message, param = 400, f"request body is not valid JSON: {first.get('msg', '')}", None
        else:
            loc = [str(p) for p in first.get("loc", ()) if p != "body"]
            param = loc[0] if loc else None  # 'prompt', not pydantic's 'prompt.constrained-str'
            status, message = 422, f"{param or 'body'}: {first.get('msg', 'invalid')}"
        if request.url.path == "/v1/completions":
            metrics.requests.labels(code=str(status)).inc()
        return JSONResponse(error_body(message, param=param), status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(str(exc.detail), kind="not_found_error" if exc.status_code == 404 else "error"),
            status_code=exc.status_code,
        )

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        if request.url.path == "/v1/completions":
            metrics.requests.labels(code="500").inc()
        return JSONResponse(error_body(f"{type(exc).__name__}: {exc}", kind="server_error"), status_code=500)

    async def _prompt_ids(req: CompletionRequest) -> list[int]:
        vocab = int(getattr(engine.info, "vocab_size", 0) or 0)
        if isinstance(req.prompt, list):
            if vocab and max(req.prompt) >= vocab:
                raise ApiError(400, f"prompt holds token id {max(req.prompt)}; the vocabulary has {vocab}", "prompt")
            return list(req.prompt)
        ids = await engine.aencode(req.prompt)  # on the text thread, batched: the loop stays free
        if not ids:
            raise ApiError(400, "prompt encodes to no tokens", "prompt")
        return ids

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Response:
        t_http = time.perf_counter()
        if state["draining"]:
            raise ApiError(503, "server is shutting down", kind="server_error")
        ids = await _prompt_ids(req)
        ctx = engine.max_context
        if len(ids) >= ctx:
            raise ApiError(400, f"prompt is {len(ids)} tokens; the model's context is {ctx}", "prompt")
        if len(ids) + req.max_tokens > ctx:
            raise ApiError(
                400,
                f"max_tokens must be 1..{ctx - len(ids)}: prompt ({len(ids)}) + max_tokens ({req.max_tokens}) "
                f"exceeds the context ({ctx})",
                "max_tokens",
            )
        from autotune.engine import EngineClosed

        try:
            future = engine.submit(ids, req.max_tokens)
        except EngineClosed:
            raise ApiError(503, "engine is stopped", kind="server_error") from None
        state["in_flight"] += 1
        idle.clear()
        metrics.in_flight.inc()
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        created = int(time.time())
        loop = asyncio.get_running_loop()
        answer: asyncio.Future[GenerationResult] = loop.create_future()

        def finished(f: Any) -> None:
            """Runs on the loop once the engine is done with the request, even if the client has gone:
            so shutdown never waits on a request nobody will collect."""
            err = f.exception() if not f.cancelled() else asyncio.CancelledError()
            if err is None:
                metrics.observe(f.result())
                metrics.requests.labels(code="200").inc()
                metrics.http.observe(time.perf_counter() - t_http)
            else:
                metrics.requests.labels(code="500").inc()
            if not answer.done():  # the handler may have been cancelled (client hung up)
                if err is None:
                    answer.set_result(f.result())
                else:
                    answer.set_exception(err)
            state["in_flight"] -= 1
            metrics.in_flight.dec()
            if not state["in_flight"]:
                idle.set()

        # Not asyncio.wrap_future: cancelling that (a client hanging up) cancels the engine's future,
        # and the engine's worker would then fail setting its result.
        future.add_done_callback(lambda f: loop.call_soon_threadsafe(finished, f))

        async def result() -> GenerationResult:
            return await answer

        def body(res: GenerationResult, text: str | None, finish: str | None) -> dict[str, Any]:
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
            return {
                "id": rid,
                "object": "text_completion",
                "created": created,
                "model": req.model or name,
                "choices": [choice],
            }

        def usage(res: GenerationResult) -> dict[str, int]:
            return {
                "prompt_tokens": res.prompt_tokens,
                "completion_tokens": res.output_tokens,
                "total_tokens": res.prompt_tokens + res.output_tokens,
            }

        if not req.stream:
            res = await result()
            doc = body(res, await engine.adecode(res), "length")
            doc["usage"] = usage(res)
            doc["autotune"] = _timings(res)
            return JSONResponse(doc, headers=DECODING_HEADER)

        async def events() -> AsyncIterator[str]:
            try:
                res = await result()
            except Exception as exc:  # the response has started: report the failure as an event
                yield f"data: {json.dumps(error_body(f'{type(exc).__name__}: {exc}', kind='server_error'))}\n\n"
                yield "data: [DONE]\n\n"
                return
            yield f"data: {json.dumps(body(res, await engine.adecode(res), None))}\n\n"
            last = body(res, "", "length")
            last["usage"] = usage(res)
            last["autotune"] = _timings(res)
            yield f"data: {json.dumps(last)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream", headers=DECODING_HEADER)

    @app.get("/health")
    async def health() -> JSONResponse:
        from autotune.measure import peak_memory

        mem, kind = peak_memory(engine)
        doc = {
            "status": "draining" if state["draining"] else "ok",
            "model": name,
            "config": engine.config.model_dump(mode="json"),
            "max_context": engine.max_context,
            "vocab_size": int(engine.info.vocab_size),
            "first_token_id": len(getattr(engine.tokenizer, "all_special_ids", []) or [0]),
            "decoding": "greedy",
            "in_flight": state["in_flight"],
            "peak_memory_mb": mem,
            "memory_kind": kind,
        }
        return JSONResponse(doc, status_code=503 if state["draining"] else 200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def check_port(host: str, port: int) -> None:
    """Fail in one line before the model loads, not with uvicorn's log after it."""
    import socket

    from autotune.errors import AutotuneError

    try:
        with socket.create_server((host, port), reuse_port=False):
            pass
    except OSError as e:
        raise AutotuneError(f"cannot listen on {host}:{port}: {e.strerror or e}") from None


def serve(
    engine: Engine,
    *,
    host: str = "127.0.0.1",
    port: int = 8001,
    model_name: str | None = None,
    graceful_timeout_s: float | None = None,
    log_level: str = "warning",
) -> None:
    """Run the app under uvicorn until SIGINT/SIGTERM; in-flight requests finish before the engine stops."""
    import uvicorn

    app = create_app(engine, model_name=model_name)
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=log_level,
        timeout_graceful_shutdown=graceful_timeout_s,  # type: ignore[arg-type]  # a float works (asyncio.wait_for)
        backlog=2048,
        lifespan="on",
    )
    uvicorn.Server(config).run()

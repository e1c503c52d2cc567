"""Serve one tuned :class:`~autotune.engines.builtin.engine.Engine` over HTTP, OpenAI-style.

``POST /v1/completions`` takes ``prompt`` (text, a list of texts, a list of token ids so lengths are
exact, or a list of such lists: one choice per prompt, in order), ``max_tokens``, ``temperature``,
``n`` (1 only), ``stream`` (with ``stream_options``), and vLLM's ``min_tokens`` / ``ignore_eos`` (every
output is exactly ``max_tokens`` long already, so benchmark clients that force the length work as is).
``POST /v1/chat/completions`` takes ``messages`` and builds the prompt
with the tokenizer's chat template (400 when the tokenizer has none). ``GET /v1/models`` and
``GET /v1/models/{id}`` list the one model served; a request naming another model is a 404
``model_not_found``. Bodies are validated strictly (``"stream": "yes"`` is a 422, not true).

The tuned engine decodes greedily with a forced output length, so ``temperature`` is accepted (0..2,
for client compatibility) and ignored: the response says so in the ``X-Autotune-Decoding: greedy``
header and its ``autotune`` field. Streaming sends OpenAI-format server-sent events, but the text
arrives when the request's batch finishes, not token by token.

Requests may be as long as the model's context (or ``--max-context``), not only the shape the config
was tuned on; a request outside that shape (a longer prompt or output) is served and flagged in the
``X-Autotune-Outside-Tuned-Shape`` header, its ``autotune.outside_tuned_shape`` field, a count in
``/health`` and the ``autotune_outside_tuned_shape_requests`` counter: its latency was never measured.

``GET /health`` reports the config served; ``GET /metrics`` is Prometheus text (``autotune_*``).
Every response carries security headers (a CSP allowing nothing, nosniff, frame denial). On shutdown
uvicorn stops accepting, in-flight requests finish, then the engine drains its queue and stops.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal

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
from starlette.types import ASGIApp

from autotune.errors import AutotuneError
from autotune.security import SecurityHeaders

if TYPE_CHECKING:
    from autotune.engines.builtin.engine import Engine, GenerationResult

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
DECODING_HEADER = {"X-Autotune-Decoding": "greedy"}
#: Set on a response whose request is outside the shape the config was tuned on, saying how.
OUTSIDE_HEADER = "X-Autotune-Outside-Tuned-Shape"
#: On every response, errors included. An API serves no pages: the CSP allows nothing and no framing.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
#: The endpoints counted in ``autotune_requests_total``.
GENERATION_PATHS = ("/v1/completions", "/v1/chat/completions")
PROMPT_FORMS = "a string, a list of strings, a list of token ids (>= 0) or a list of token-id lists, none empty"

Text = Annotated[str, Field(min_length=1)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]
Prompt = Text | Annotated[list[Text], Field(min_length=1)] | TokenIds | Annotated[list[TokenIds], Field(min_length=1)]


class _Strict(BaseModel):
    """JSON types as sent: ``"stream": "yes"`` or ``"max_tokens": "5"`` is a 422; unknown fields are ignored."""

    model_config = ConfigDict(extra="ignore", strict=True)


class StreamOptions(_Strict):
    """OpenAI's ``stream_options``: the last chunk carries ``usage`` whether asked for or not."""

    include_usage: bool | None = None


class CompletionRequest(_Strict):
    """The subset of OpenAI's completion request the tuned engine honours."""

    model: str | None = None
    prompt: Prompt
    max_tokens: int | None = Field(None, ge=1, description="tokens generated per prompt (default 16)")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="accepted and ignored: decoding is greedy")
    stream: bool | None = False
    n: int | None = Field(None, ge=1, description="choices per prompt: only 1 (greedy decoding repeats itself)")
    # vLLM's extensions a benchmark client sends to force the output length: accepted, since every
    # output here is exactly max_tokens long already (min_tokens above max_tokens is refused).
    min_tokens: int | None = Field(None, ge=0, description="at most max_tokens: outputs are max_tokens long")
    ignore_eos: bool | None = Field(None, description="accepted: generation never stops at EOS here")
    stream_options: StreamOptions | None = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts, in order: one for a string or a list of token ids, else one per list item."""
        if isinstance(self.prompt, str):
            return [self.prompt]
        ids: list[int] = []
        several: list[str | list[int]] = []
        for item in self.prompt:  # validated: all token ids, or all texts, or all id lists
            if isinstance(item, int):
                ids.append(item)
            else:
                several.append(item)
        return [ids] if ids else several


class ContentPart(_Strict):
    type: str
    text: str | None = None


class ChatMessage(_Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None

    def for_template(self) -> dict[str, str]:
        if self.content is None or isinstance(self.content, str):
            return {"role": self.role, "content": self.content or ""}
        other = sorted({p.type for p in self.content if p.type != "text"})
        if other:
            raise ApiError(400, f"content parts of type {', '.join(other)} are not supported: text only", "messages")
        return {"role": self.role, "content": "".join(p.text or "" for p in self.content)}


class ChatRequest(_Strict):
    """The subset of OpenAI's chat completion request the tuned engine honours."""

    model: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1, description="tokens generated (default 16)")
    max_completion_tokens: int | None = Field(None, ge=1, description="OpenAI's newer name for max_tokens")
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="accepted and ignored: decoding is greedy")
    stream: bool | None = False
    n: int | None = Field(None, ge=1, description="choices: only 1 (greedy decoding repeats itself)")


class ApiError(Exception):
    """A request the server refuses, rendered as OpenAI's ``{"error": {...}}`` body."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        kind: str = "invalid_request_error",
        code: str | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code


def error_body(
    message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class _ServeApp(FastAPI):
    """FastAPI with :class:`SecurityHeaders` outermost, so even the 500s of Starlette's
    ``ServerErrorMiddleware`` (which sits outside ``add_middleware``'s) carry the headers."""

    def build_middleware_stack(self) -> ASGIApp:
        return SecurityHeaders(super().build_middleware_stack(), headers=SECURITY_HEADERS)


@dataclass(frozen=True)
class TunedShape:
    """The request shape the served figures were measured on: the tuned workload's longest prompt, its
    longest output and their sum (None where unknown). Longer requests are served, and flagged."""

    prompt_tokens: int | None = None
    output_tokens: int | None = None
    context: int | None = None

    @classmethod
    def of(cls, engine: Engine) -> TunedShape:
        """From the engine: trials and ``load_engine`` build it with ``prompt_pad_to`` = the workload's longest
        prompt and ``max_context`` = longest prompt + longest output; without a workload the shape is unknown."""
        prompt = engine.prompt_pad_to
        context = int(engine.max_context)
        if prompt is None and context == int(getattr(engine.info, "max_context", 0) or 2048):
            return cls()  # built without a workload: max_context is the model's own
        output = context - prompt if prompt is not None and context > prompt else None
        return cls(prompt, output, context)

    def outside(self, prompt_tokens: int, max_tokens: int) -> dict[str, str]:
        """How a request of this shape exceeds the tuned one, by dimension (empty when it does not)."""
        out: dict[str, str] = {}
        if self.prompt_tokens is not None and prompt_tokens > self.prompt_tokens:
            out["prompt_tokens"] = f"prompt_tokens {prompt_tokens} > {self.prompt_tokens} tuned"
        if self.output_tokens is not None and max_tokens > self.output_tokens:
            out["max_tokens"] = f"max_tokens {max_tokens} > {self.output_tokens} tuned"
        if not out and self.context is not None and prompt_tokens + max_tokens > self.context:
            out["context"] = f"prompt_tokens + max_tokens {prompt_tokens + max_tokens} > {self.context} tuned"
        return out

    def as_dict(self) -> dict[str, int | None]:
        return {"prompt_tokens": self.prompt_tokens, "output_tokens": self.output_tokens, "context": self.context}


def context_limit(engine: Engine, max_context: int | None = None, *, manage_engine: bool = True) -> int:
    """The most tokens (prompt + max_tokens) one request may hold: ``max_context`` when given (at most the
    model's positions), else the model's positions. An engine the app does not manage was started by its
    owner (a trial's) with its caches as they are: its ``request_context`` is the limit."""
    positions = int(getattr(engine.info, "max_context", 0) or 0)
    if max_context is not None:
        if max_context < 2:
            raise AutotuneError(f"--max-context {max_context}: a request needs at least 2 tokens (prompt + output)")
        if positions and max_context > positions:
            raise AutotuneError(f"--max-context {max_context} exceeds the model's {positions} positions")
        if not manage_engine and max_context > engine.request_context:
            raise AutotuneError(
                f"max_context {max_context} exceeds the running engine's request_context ({engine.request_context})"
            )
        return max_context
    if not manage_engine:
        return int(engine.request_context)
    return positions or int(engine.max_context)


class ServerMetrics:
    """Prometheus series in a registry of their own, so several apps (tests) never collide."""

    def __init__(self, engine: Engine) -> None:
        self.registry = r = CollectorRegistry()
        self.requests = Counter(
            "autotune_requests", "completion and chat requests answered, by HTTP status", ["code"], registry=r
        )
        self.outside = Counter(
            "autotune_outside_tuned_shape_requests",
            "requests served outside the shape the config was tuned on (their latency was never measured)",
            registry=r,
        )
        self.prompt_tokens = Counter("autotune_prompt_tokens", "prompt tokens of finished requests", registry=r)
        self.output_tokens = Counter("autotune_output_tokens", "tokens generated for finished requests", registry=r)
        self.in_flight = Gauge(
            "autotune_in_flight_requests", "engine requests (one per prompt) accepted, not yet answered", registry=r
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


def _usage(results: list[GenerationResult]) -> dict[str, int]:
    prompt = sum(r.prompt_tokens for r in results)
    output = sum(r.output_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": output, "total_tokens": prompt + output}


def _sse(doc: dict[str, Any] | str) -> str:
    return f"data: {doc if isinstance(doc, str) else json.dumps(doc)}\n\n"


@dataclass
class _Accepted:
    """One HTTP request's engine requests, submitted: one answer per prompt, in order."""

    answers: list[asyncio.Future[GenerationResult]]
    outside: list[str]  # how the request exceeds the tuned shape (empty: within it)
    extra: dict[str, Any]  # the ``autotune`` field's request-level entries

    @property
    def headers(self) -> dict[str, str]:
        return {**DECODING_HEADER, **({OUTSIDE_HEADER: "; ".join(self.outside)} if self.outside else {})}

    def autotune(self, results: list[GenerationResult]) -> dict[str, Any]:
        """The ``autotune`` field: the slowest request's timings (each prompt's too when several)."""
        doc = _timings(max(results, key=lambda r: r.e2e_s))
        if len(results) > 1:
            doc["choices"] = [_timings(r) for r in results]
        return {**doc, **self.extra}


def create_app(
    engine: Engine,
    *,
    model_name: str | None = None,
    manage_engine: bool = True,
    max_context: int | None = None,
    tuned: TunedShape | None = None,
) -> FastAPI:
    """The HTTP app for ``engine``. With ``manage_engine`` the app starts it and, on shutdown, drains and stops it.

    ``max_context`` caps prompt + max_tokens per request (default: the model's positions; see
    :func:`context_limit`); ``tuned`` is the shape the figures were measured on (default: the engine's).
    """
    disable_created_metrics()  # the *_created series only add noise to a scrape
    metrics = ServerMetrics(engine)
    name = model_name or str(getattr(engine.info, "ref", "") or "autotune")
    limit = context_limit(engine, max_context, manage_engine=manage_engine)
    if manage_engine:
        engine.request_context = limit  # before start(): the continuous scheduler sizes its pages for it
    shape = tuned if tuned is not None else TunedShape.of(engine)
    created = int(time.time())
    state = {"draining": False, "in_flight": 0}
    outside_counts = {"requests": 0, "prompt_tokens": 0, "max_tokens": 0, "context": 0}
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

    # /docs and /redoc would load Swagger from a CDN, which the CSP (and an offline machine) refuses.
    app = _ServeApp(title="autotune serve", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.metrics = metrics
    app.state.engine = engine

    def count(request: Request, status: int) -> None:
        if request.url.path in GENERATION_PATHS:
            metrics.requests.labels(code=str(status)).inc()

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        count(request, exc.status)
        return JSONResponse(error_body(exc.message, exc.kind, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            status, message, param = 400, f"request body is not valid JSON: {first.get('msg', '')}", None
        else:
            # pydantic names the union member tried ('prompt.constrained-str'): keep the field path only
            loc = [str(p) for p in first.get("loc", ()) if p != "body" and not any(c in str(p) for c in "[-")]
            param = loc[0] if loc else None
            status = 422
            if param == "prompt" and len(loc) == 1:
                message = f"prompt: must be {PROMPT_FORMS}"
            else:
                message = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid')}"
        count(request, status)
        return JSONResponse(error_body(message, param=param), status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(
            error_body(str(exc.detail), kind="not_found_error" if exc.status_code == 404 else "error"),
            status_code=exc.status_code,
        )

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        count(request, 500)
        return JSONResponse(error_body(f"{type(exc).__name__}: {exc}", kind="server_error"), status_code=500)

    def check_model(model: str | None) -> None:
        if model is not None and model != name:
            raise ApiError(
                404,
                f"The model `{model}` does not exist: this server serves `{name}` (GET /v1/models)",
                "model",
                code="model_not_found",
            )

    def check_n(n: int | None) -> None:
        if n is not None and n != 1:
            raise ApiError(400, f"n: only 1 choice per prompt is supported (decoding is greedy), not {n}", "n")

    async def prompt_ids(prompt: str | list[int], which: str) -> list[int]:
        vocab = int(getattr(engine.info, "vocab_size", 0) or 0)
        if isinstance(prompt, list):
            if vocab and max(prompt) >= vocab:
                raise ApiError(400, f"{which} holds token id {max(prompt)}; the vocabulary has {vocab}", "prompt")
            return list(prompt)
        ids = await engine.aencode(prompt)  # on the text thread, batched: the loop stays free
        if not ids:
            raise ApiError(400, f"{which} encodes to no tokens", "prompt")
        return ids

    def check_length(ids: list[int], max_tokens: int, which: str, param: str) -> None:
        if len(ids) >= limit:
            raise ApiError(400, f"{which} is {len(ids)} tokens; the served context is {limit}", param)
        if len(ids) + max_tokens > limit:
            raise ApiError(
                400,
                f"max_tokens must be 1..{limit - len(ids)}: {which} ({len(ids)}) + max_tokens ({max_tokens}) "
                f"exceeds the served context ({limit})",
                "max_tokens",
            )

    def accept(prompts: list[list[int]], max_tokens: int, t_http: float) -> _Accepted:
        """Submit every prompt; each answer resolves on the loop when the engine is done with it, even if
        the client has gone, so shutdown never waits on a request nobody will collect."""
        from autotune.engines.builtin.engine import EngineClosed

        if state["draining"]:
            raise ApiError(503, "server is shutting down", kind="server_error")
        longest = max(len(p) for p in prompts)
        outside = shape.outside(longest, max_tokens)
        loop = asyncio.get_running_loop()
        answers: list[asyncio.Future[GenerationResult]] = [loop.create_future() for _ in prompts]
        left, failed = [len(prompts)], [False]

        def finished(f: Future[GenerationResult], answer: asyncio.Future[GenerationResult]) -> None:
            err = f.exception() if not f.cancelled() else asyncio.CancelledError()
            if err is None:
                metrics.observe(f.result())
            failed[0] = failed[0] or err is not None
            if not answer.done():  # the handler may have been cancelled (client hung up)
                if err is None:
                    answer.set_result(f.result())
                else:
                    answer.set_exception(err)
            state["in_flight"] -= 1
            metrics.in_flight.dec()
            if not state["in_flight"]:
                idle.set()
            left[0] -= 1
            if not left[0]:  # the HTTP request is answered once, when its last prompt is done
                metrics.requests.labels(code="500" if failed[0] else "200").inc()
                if not failed[0]:
                    metrics.http.observe(time.perf_counter() - t_http)

        def on_loop(answer: asyncio.Future[GenerationResult]) -> Callable[[Future[GenerationResult]], None]:
            def callback(f: Future[GenerationResult]) -> None:
                loop.call_soon_threadsafe(finished, f, answer)

            return callback

        for i, (ids, answer) in enumerate(zip(prompts, answers, strict=True)):
            try:
                future = engine.submit(ids, max_tokens)
            except EngineClosed:
                if i == 0:
                    raise ApiError(503, "engine is stopped", kind="server_error") from None
                future = Future()
                future.set_exception(RuntimeError("engine is stopped"))
            state["in_flight"] += 1
            idle.clear()
            metrics.in_flight.inc()
            # Not asyncio.wrap_future: cancelling that (a client hanging up) cancels the engine's future,
            # and the engine's worker would then fail setting its result.
            future.add_done_callback(on_loop(answer))
        if outside:
            metrics.outside.inc()
            outside_counts["requests"] += 1
            for key in outside:
                outside_counts[key] += 1
        return _Accepted(answers, list(outside.values()), {"outside_tuned_shape": list(outside.values())})

    async def decoded(results: list[GenerationResult]) -> list[str]:
        return list(await asyncio.gather(*(engine.adecode(r) for r in results)))

    def event_stream(
        acc: _Accepted, chunks: Callable[[list[GenerationResult], list[str]], Awaitable[list[dict[str, Any]]]]
    ) -> StreamingResponse:
        async def events() -> AsyncIterator[str]:
            try:
                results = list(await asyncio.gather(*acc.answers))
                texts = await decoded(results)
            except Exception as exc:  # the response has started: report the failure as an event
                yield _sse(error_body(f"{type(exc).__name__}: {exc}", kind="server_error"))
                yield _sse("[DONE]")
                return
            for doc in await chunks(results, texts):
                yield _sse(doc)
            yield _sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream", headers=acc.headers)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest) -> Response:
        t_http = time.perf_counter()
        check_model(req.model)
        check_n(req.n)
        max_tokens = req.max_tokens or 16
        if req.min_tokens is not None and req.min_tokens > max_tokens:
            raise ApiError(400, f"min_tokens ({req.min_tokens}) exceeds max_tokens ({max_tokens})", "min_tokens")
        raw = req.prompts()
        several = len(raw) > 1
        labels = [f"prompt[{i}]" if several else "prompt" for i in range(len(raw))]
        prompts = list(await asyncio.gather(*(prompt_ids(p, w) for p, w in zip(raw, labels, strict=True))))
        for ids, which in zip(prompts, labels, strict=True):
            check_length(ids, max_tokens, which, "prompt")
        acc = accept(prompts, max_tokens, t_http)
        rid, now = f"cmpl-{uuid.uuid4().hex[:24]}", int(time.time())

        def doc(choices: list[dict[str, Any]]) -> dict[str, Any]:
            model = req.model or name
            return {"id": rid, "object": "text_completion", "created": now, "model": model, "choices": choices}

        def choice(i: int, text: str, finish: str | None) -> dict[str, Any]:
            return {"text": text, "index": i, "logprobs": None, "finish_reason": finish}

        if not req.stream:
            results = list(await asyncio.gather(*acc.answers))
            texts = await decoded(results)
            body = doc([choice(i, t, "length") for i, t in enumerate(texts)])
            body["usage"], body["autotune"] = _usage(results), acc.autotune(results)
            return JSONResponse(body, headers=acc.headers)

        async def chunks(results: list[GenerationResult], texts: list[str]) -> list[dict[str, Any]]:
            out = []
            for i, text in enumerate(texts):
                out += [doc([choice(i, text, None)]), doc([choice(i, "", "length")])]
            out[-1]["usage"], out[-1]["autotune"] = _usage(results), acc.autotune(results)
            return out

        return event_stream(acc, chunks)

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest) -> Response:
        t_http = time.perf_counter()
        check_model(req.model)
        check_n(req.n)
        if req.max_tokens and req.max_completion_tokens and req.max_tokens != req.max_completion_tokens:
            raise ApiError(400, "max_tokens and max_completion_tokens differ: send one", "max_completion_tokens")
        max_tokens = req.max_completion_tokens or req.max_tokens or 16
        tokenizer = engine.tokenizer
        if not getattr(tokenizer, "chat_template", None):
            raise ApiError(
                400,
                f"the tokenizer of {name} has no chat template, so chat messages cannot be turned into a prompt: "
                "send the prompt text to /v1/completions instead",
                "messages",
            )
        messages = [m.for_template() for m in req.messages]

        def render() -> list[int]:
            out = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
            return [int(t) for t in (out["input_ids"] if hasattr(out, "keys") else out)]

        try:
            ids = await asyncio.to_thread(render)  # the template and the tokenizer run off the loop
        except Exception as exc:  # jinja2's TemplateError (raise_exception in templates), a bad role order
            raise ApiError(400, f"the chat template refused the messages: {exc}", "messages") from None
        if not ids:
            raise ApiError(400, "the messages render to no tokens", "messages")
        check_length(ids, max_tokens, "the rendered chat prompt", "messages")
        acc = accept([ids], max_tokens, t_http)
        rid, now, model = f"chatcmpl-{uuid.uuid4().hex[:24]}", int(time.time()), req.model or name

        def doc(kind: str, choice: dict[str, Any]) -> dict[str, Any]:
            return {"id": rid, "object": kind, "created": now, "model": model, "choices": [choice]}

        if not req.stream:
            results = list(await asyncio.gather(*acc.answers))
            (text,) = await decoded(results)
            message = {"role": "assistant", "content": text}
            body = doc("chat.completion", {"index": 0, "message": message, "logprobs": None, "finish_reason": "length"})
            body["usage"], body["autotune"] = _usage(results), acc.autotune(results)
            return JSONResponse(body, headers=acc.headers)

        async def chunks(results: list[GenerationResult], texts: list[str]) -> list[dict[str, Any]]:
            def delta(d: dict[str, str], finish: str | None) -> dict[str, Any]:
                return doc("chat.completion.chunk", {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish})

            last = delta({}, "length")
            last["usage"], last["autotune"] = _usage(results), acc.autotune(results)
            return [delta({"role": "assistant", "content": ""}, None), delta({"content": texts[0]}, None), last]

        return event_stream(acc, chunks)

    def model_card() -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "autotune", "max_model_len": limit}

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        return JSONResponse({"object": "list", "data": [model_card()]})

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> JSONResponse:
        check_model(model_id)
        return JSONResponse(model_card())

    @app.get("/health")
    async def health() -> JSONResponse:
        from autotune.measure import peak_memory

        mem, kind = peak_memory(engine)
        doc = {
            "status": "draining" if state["draining"] else "ok",
            "model": name,
            # The model actually served, also where the config names no variant (was: "model": null).
            "config": {**engine.config.model_dump(mode="json"), "model": engine.config.model or name},
            "max_context": limit,
            "model_max_context": int(getattr(engine.info, "max_context", 0) or 0) or None,
            "tuned_shape": shape.as_dict(),
            "outside_tuned_shape": dict(outside_counts),
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
    max_context: int | None = None,
    graceful_timeout_s: float | None = None,
    log_level: str = "warning",
) -> None:
    """Run the app under uvicorn until SIGINT/SIGTERM; in-flight requests finish before the engine stops."""
    import uvicorn

    app = create_app(engine, model_name=model_name, max_context=max_context)
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

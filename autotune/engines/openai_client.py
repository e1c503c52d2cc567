"""The one replay of a workload over the OpenAI-compatible HTTP API (``/v1/completions``).

``autotune verify --url``, the ``http`` transport's client and :func:`~autotune.engines.server.measure_server`
all send the study's requests through :class:`Replayer`: prompts as token-id lists (so lengths are
exact, and every server tokenizes nothing), the same warm-up rounds and the same closed-loop
concurrency or arrival times as :func:`autotune.measure.run_workload` in-process.

Timing. A streamed request's first token is the arrival of its first chunk with a choice; the
server's own engine timings win where it reports them (``autotune serve``'s ``autotune`` field:
its text arrives when the batch finishes, so the first chunk says nothing about the first token).
Queueing is unknown for other servers (0). A completion must hold exactly ``max_tokens`` tokens
(``usage.completion_tokens``); a shorter one is a failed request, never a faster one.

Faults. :func:`guarded` watches a run: the server's process exiting (when the caller can tell), a
refused connection, or no byte from the server for ``stall_timeout_s`` while requests wait end the
run at once with an :class:`~autotune.engines.server.EngineProcessError` (``died`` / ``hung``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from autotune.engines.server import EngineProcessError, RequestsFailed

if TYPE_CHECKING:
    import httpx

    from autotune.config import TrialConfig
    from autotune.engines.builtin.engine import GenerationResult
    from autotune.measure import Measurement
    from autotune.spec import WorkloadSpec

T = TypeVar("T")
#: How often :func:`guarded` looks at the server.
WATCH_S = 0.2


@dataclass(frozen=True)
class Api:
    """How to talk to one server: its base URL, the ``model`` to name, and what each request carries.

    ``exact_length``: send ``min_tokens`` = ``max_tokens`` and ``ignore_eos`` (vLLM's extensions, which
    ``autotune serve`` accepts) so every completion has the workload's length. ``stream``: stream with
    ``stream_options.include_usage`` (the first token's arrival is then seen). ``greedy``: send
    ``temperature`` 0, as autotune's engine decodes (sampling costs other engines time). ``extra``: more fields.
    """

    url: str
    model: str | None = None
    stream: bool = True
    exact_length: bool = True
    greedy: bool = True
    extra: Mapping[str, Any] = field(default_factory=dict)

    def body(self, prompt: list[int], max_tokens: int) -> dict[str, Any]:
        body: dict[str, Any] = {"prompt": prompt, "max_tokens": max_tokens}
        if self.greedy:
            body["temperature"] = 0.0
        body.update(self.extra)  # the caller's fields win over the defaults above...
        body.update(prompt=prompt, max_tokens=max_tokens)  # ...but not over the workload's
        if self.model is not None:
            body["model"] = self.model
        if self.exact_length:
            body.update(min_tokens=max_tokens, ignore_eos=True)
        if self.stream:
            body.update(stream=True, stream_options={"include_usage": True})
        return body


def client(url: str, read_timeout_s: float | None = None) -> httpx.AsyncClient:
    """An HTTP client without a connection cap (the workload sets the concurrency), keeping every
    connection alive: reconnecting clients would be the harness's cost, counted as the server's.
    A loopback ``url`` ignores proxy settings (``HTTP_PROXY`` without ``NO_PROXY`` would reroute it)."""
    import httpx

    timeout = httpx.Timeout(connect=10.0, read=read_timeout_s, write=60.0, pool=None)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    return httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=not loopback(url))


def loopback(url: str) -> bool:
    """Whether ``url`` names this machine."""
    from urllib.parse import urlsplit

    return (urlsplit(url).hostname or "") in ("127.0.0.1", "localhost", "::1")


class Progress:
    """When the server last sent anything, and how many requests wait for it (the stall watch)."""

    def __init__(self) -> None:
        self.last = time.monotonic()
        self.waiting = 0
        self.refused = 0

    def begin(self) -> None:
        if not self.waiting:  # idle time on the client's side is not the server's stall
            self.last = time.monotonic()
        self.waiting += 1

    def tick(self) -> None:
        self.last = time.monotonic()

    def end(self) -> None:
        self.waiting -= 1


@dataclass
class RemoteRun:
    """What a replay against a server gave, with the server's own description of itself."""

    results: list[GenerationResult]
    t0: float
    t1: float
    stopped_by: str
    health: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class WarmRun:
    """The warm-up rounds: their timings, and the last round's results (a first, rough look)."""

    timings: dict[str, float]
    results: list[GenerationResult]
    t0: float
    t1: float


class Replayer:
    """Sends one workload's requests to one server; failures are collected, never raised mid-run."""

    def __init__(self, http: httpx.AsyncClient, api: Api, progress: Progress | None = None) -> None:
        self.http = http
        self.api = api
        self.progress = progress or Progress()
        self.failures: list[str] = []

    async def one(self, prompt: list[int], max_tokens: int) -> GenerationResult:
        """One completion, timed; raises on an error status, a stream error or a wrong length."""
        from autotune.engines.builtin.engine import GenerationResult

        url = f"{self.api.url}/v1/completions"
        body = self.api.body(prompt, max_tokens)
        doc: dict[str, Any] = {}
        timing: dict[str, Any] = {}
        first: float | None = None
        self.progress.begin()
        t_submit = time.perf_counter()
        try:
            if self.api.stream:
                async with self.http.stream("POST", url, json=body) as r:
                    if r.status_code != 200:
                        raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread()).decode(errors='replace')[:300]}")
                    async for line in r.aiter_lines():
                        self.progress.tick()
                        if not line.startswith("data:"):
                            continue
                        data = line[5:].strip()
                        if data == "[DONE]":
                            break
                        chunk = json.loads(data)
                        if "error" in chunk:
                            raise RuntimeError(f"stream error: {chunk['error'].get('message', chunk['error'])}")
                        if first is None and chunk.get("choices"):
                            first = time.perf_counter()
                        doc["usage"] = chunk.get("usage") or doc.get("usage")
                        timing = chunk.get("autotune") or timing
            else:
                r = await self.http.post(url, json=body)
                self.progress.tick()
                if r.status_code != 200:
                    raise RuntimeError(f"HTTP {r.status_code}: {r.text[:300]}")
                doc = r.json()
                timing = doc.get("autotune") or {}
            t_end = time.perf_counter()
        except Exception as e:
            import httpx

            if isinstance(e, httpx.ConnectError):
                self.progress.refused += 1
            raise
        finally:
            self.progress.end()
        usage = doc.get("usage")
        if not usage:
            raise RuntimeError("the server reported no usage (stream_options.include_usage unsupported?)")
        n = int(usage["completion_tokens"])
        if n != max_tokens:
            raise RuntimeError(
                f"{n} tokens generated, not the {max_tokens} asked: the server stopped early "
                "(exact length needs min_tokens/ignore_eos, or a server that forces the length)"
            )
        ttft = timing.get("ttft_ms")
        return GenerationResult(
            request_id=-1,
            prompt_tokens=int(usage.get("prompt_tokens", len(prompt))),
            output_ids=[0] * n,  # only the count matters here
            t_submit=t_submit,
            t_start=t_submit + float(timing.get("queue_ms", 0.0)) / 1000,
            t_first_token=t_submit + float(ttft) / 1000 if ttft is not None else (first or t_end),
            t_end=t_end,
            batch_rows=int(timing.get("batch_rows", 1)),
            stream=0,
        )

    async def send(self, prompt: tuple[int, ...], max_tokens: int, out: list[GenerationResult]) -> None:
        try:
            out.append(await self.one(list(prompt), max_tokens))
        except Exception as e:  # a lost request is a finding, not a crash of the replay
            self.failures.append(f"{type(e).__name__}: {e}")

    async def warm_up(self, spec: WorkloadSpec, cfg: TrialConfig, vocab_size: int, first_token_id: int) -> WarmRun:
        """One round of batch_size x streams requests (two where the config compiles per shape), as
        :func:`autotune.measure.warm_up` does; warm-up failures are dropped (they recur if they persist)."""
        from autotune.engines.builtin.optimize.compile import needs_fixed_shapes
        from autotune.workload import build_requests

        per_round = spec.warmup_requests if spec.warmup_requests is not None else cfg.batch_size * cfg.streams
        t = time.perf_counter()
        if per_round == 0:
            return WarmRun({"warmup_s": 0.0, "first_batch_s": 0.0}, [], t, t)
        rounds = 2 if needs_fixed_shapes(cfg.backend) else 1
        warm = build_requests(spec, vocab_size, first_token_id=first_token_id, count=per_round * rounds, seed_offset=7)
        first, t_round = 0.0, t
        sink: list[GenerationResult] = []
        for r in range(rounds):
            t_round = time.perf_counter()
            sink = []
            chunk = warm[r * per_round : (r + 1) * per_round]
            await asyncio.gather(*(self.send(q.prompt_ids, q.max_new_tokens, sink) for q in chunk))
            if r == 0:
                first = time.perf_counter() - t
        self.failures.clear()
        t1 = time.perf_counter()
        return WarmRun({"warmup_s": t1 - t, "first_batch_s": first}, sink, t_round, t1)

    async def run(
        self, spec: WorkloadSpec, cfg: TrialConfig, vocab_size: int, first_token_id: int
    ) -> tuple[list[GenerationResult], float, float, str]:
        """The measured replay: (results, t0, t1, stopped_by), as :func:`autotune.measure.run_workload`."""
        from autotune.workload import build_requests, concurrency

        requests = build_requests(spec, vocab_size, first_token_id=first_token_id)
        results: list[GenerationResult] = []
        t0 = time.perf_counter()
        deadline = t0 + spec.max_duration_s
        stopped = "requests"
        if spec.arrival.type == "closed":
            it = iter(requests)
            stop = [False]

            async def client_loop() -> None:
                while True:
                    if time.perf_counter() >= deadline:
                        stop[0] = True
                        return
                    req = next(it, None)
                    if req is None:
                        return
                    await self.send(req.prompt_ids, req.max_new_tokens, results)

            await asyncio.gather(*(client_loop() for _ in range(concurrency(spec, cfg.batch_size, cfg.streams))))
            stopped = "duration" if stop[0] else "requests"
        else:  # poisson, or offline (every arrival_s is 0)
            tasks = []
            for req in requests:
                at = t0 + req.arrival_s
                if at >= deadline:
                    stopped = "duration"
                    break
                delay = at - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(self.send(req.prompt_ids, req.max_new_tokens, results)))
            await asyncio.gather(*tasks)
        t1 = max((r.t_end for r in results), default=time.perf_counter())
        return results, t0, t1, stopped


async def _refuses(http: httpx.AsyncClient, url: str) -> bool:
    """Whether the server refuses connections now (it is gone); a slow answer is not a refusal."""
    import httpx

    try:
        await http.get(f"{url}/v1/models", timeout=2.0)
    except httpx.ConnectError:
        return True
    except httpx.HTTPError:
        return False
    return False


async def guarded(
    work: Awaitable[T],
    replayer: Replayer,
    *,
    alive: Callable[[], bool] | None = None,
    stall_timeout_s: float = 60.0,
) -> T:
    """Run ``work`` while watching the server; cancel it and raise ``died`` / ``hung`` when it fails.

    ``died``: ``alive()`` says the process has exited, or (without ``alive``) a request was refused
    and the server refuses a probe too. ``hung``: requests wait and nothing came for ``stall_timeout_s``.
    A run whose requests failed because the server went away is ``died`` too, not failed requests.
    """
    task = asyncio.ensure_future(work)
    progress, url, seen = replayer.progress, replayer.api.url, [0]

    async def gone() -> bool:
        if alive is not None and not alive():
            return True
        if progress.refused <= seen[0]:
            return False
        seen[0] = progress.refused
        if alive is None:
            return await _refuses(replayer.http, url)
        for _ in range(10):  # refused: the process is on its way out, or was restarting its socket
            await asyncio.sleep(0.1)
            if not alive():
                return True
        return False

    def died() -> EngineProcessError:
        how = "exited" if alive is not None else "stopped accepting connections"
        return EngineProcessError("died", f"the server at {url} {how} mid-run")

    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=WATCH_S)
            if task in done:
                if task.exception() is not None and await gone():
                    raise died()
                return task.result()
            if await gone():
                raise died()
            quiet = time.monotonic() - progress.last
            if progress.waiting and quiet > stall_timeout_s:
                raise EngineProcessError(
                    "hung",
                    f"the server at {url} sent nothing for {quiet:.1f} s while {progress.waiting} request(s) waited "
                    f"(stall limit {stall_timeout_s:g} s)",
                )
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def measure_async(
    api: Api,
    spec: WorkloadSpec,
    cfg: TrialConfig,
    *,
    vocab_size: int,
    first_token_id: int,
    abort_if: Callable[[Measurement], str | None] | None = None,
    alive: Callable[[], bool] | None = None,
    stall_timeout_s: float = 60.0,
    timings: dict[str, float] | None = None,
) -> Measurement:
    """Warm up, maybe stop there (``abort_if``), replay and summarize: the body of ``measure_server``."""
    from autotune.measure import summarize

    timings = dict(timings or {})
    async with client(api.url) as http:
        rep = Replayer(http, api)

        async def body() -> Measurement:
            warm = await rep.warm_up(spec, cfg, vocab_size, first_token_id)
            timings.update(warm.timings)
            if abort_if is not None and warm.results:
                rough = summarize(warm.results, warm.t0, warm.t1, memory_kind="none", timings=timings)
                reason = abort_if(rough)
                if reason:
                    rough.stopped_by = f"early-stop: {reason}"
                    return rough
            results, t0, t1, stopped = await rep.run(spec, cfg, vocab_size, first_token_id)
            if rep.failures:
                raise RequestsFailed(rep.failures, api.url)
            if not results:
                raise RequestsFailed([f"no request finished within {spec.max_duration_s:g} s"], api.url)
            return summarize(results, t0, t1, memory_kind="none", timings=timings, stopped_by=stopped)

        return await guarded(body(), rep, alive=alive, stall_timeout_s=stall_timeout_s)

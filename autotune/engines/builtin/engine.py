"""The Engine: one model, a dynamic batcher and N stream workers.

Trials measure it and deployments serve it (``autotune.deploy.load_engine``), so what was
measured is what runs. It knows nothing about tuning or databases.

Requests go into one queue. Each stream worker takes the oldest request, waits until the
batch is full or the oldest request has waited ``max_queue_delay_ms``, then runs one
``generate`` call for the batch (on its own CUDA stream on GPU, its own thread on CPU).

With ``pipeline_depth`` d > 1 a stream is three threads: one collects and prepares (pads, builds
the tensors, copies them to the device) up to d - 1 batches ahead, one runs them, one delivers
the results. A prepared batch that cannot start yet keeps taking queued requests until it is
full, so running ahead never shrinks batches.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from autotune.config import TrialConfig
from autotune.engines.builtin.continuous import ContinuousScheduler
from autotune.engines.builtin.decoder import StaticDecoder
from autotune.engines.builtin.openmp import release_thread_pool
from autotune.engines.builtin.optimize import ATTENTIONS, BACKENDS, PRECISIONS, QUANTIZERS
from autotune.engines.builtin.optimize.compile import (
    compiles_decoder_step,
    needs_fixed_shapes,
    uses_exported_graph,
    uses_static_decoder,
)
from autotune.engines.builtin.text import TextBatcher
from autotune.hardware import Hardware
from autotune.models import ModelInfo

if TYPE_CHECKING:
    from autotune.engines.builtin.exported import ExportedStep, GraphDecoder


@dataclass
class GenerationResult:
    """One finished request, with the timestamps (perf_counter seconds) that latency is made of."""

    request_id: int
    prompt_tokens: int
    output_ids: list[int]
    t_submit: float
    t_start: float
    t_first_token: float
    t_end: float
    batch_rows: int
    stream: int

    @property
    def output_tokens(self) -> int:
        return len(self.output_ids)

    @property
    def e2e_s(self) -> float:
        return self.t_end - self.t_submit

    @property
    def ttft_s(self) -> float:
        return self.t_first_token - self.t_submit

    @property
    def tpot_s(self) -> float:
        n = self.output_tokens
        return (self.t_end - self.t_first_token) / (n - 1) if n > 1 else 0.0

    @property
    def queue_s(self) -> float:
        return self.t_start - self.t_submit


@dataclass
class _Pending:
    request_id: int
    prompt_ids: list[int]
    max_new_tokens: int
    t_submit: float
    future: Future[GenerationResult] = field(default_factory=Future)


@dataclass
class _Prepared:
    """A batch ready to run: its requests and the padded tensors (on the device for ``generate``)."""

    batch: list[_Pending]
    ids: Any
    mask: Any
    width: int
    new_tokens: int


#: How often a prepared-ahead batch that cannot start yet looks for more queued requests.
FILL_POLL_S = 0.002


@dataclass
class BuildTimings:
    """Seconds spent before serving; kept apart from steady-state measurement."""

    load_s: float = 0.0
    precision_s: float = 0.0
    quantize_s: float = 0.0
    export_s: float = 0.0  # onnxruntime: exporting the graph, or loading it from the disk cache
    export_cached: float = 0.0  # 1.0 when the export came from the disk cache

    def as_dict(self) -> dict[str, float]:
        return dict(self.__dict__)


class _FirstTokenClock:
    """A logits processor that marks when the first new token's logits exist (prefill done).

    A transformers streamer would do this too, but generate() copies every step's tokens to
    the host for it (``tokens.cpu()``), a device sync per step that keeps the CPU from queueing
    the next step while the GPU works; bench/gpu_diag.py measures what that costs. On a GPU
    this records a CUDA event instead and reads it once the batch is done; on a CPU it reads
    the clock.
    """

    def __init__(self, cuda: bool) -> None:
        self.cuda = cuda
        self.calls = 0
        self.t_first: float | None = None
        self.start_event: Any = None
        self.first_event: Any = None
        if cuda:
            import torch

            self.start_event = torch.cuda.Event(enable_timing=True)
            self.start_event.record()

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self.calls == 0:
            if self.cuda:
                import torch

                self.first_event = torch.cuda.Event(enable_timing=True)
                self.first_event.record()
            else:
                self.t_first = time.perf_counter()
        self.calls += 1
        return scores

    def first_token_time(self, t_start: float) -> float | None:
        """perf_counter time of the first token (call after the batch has synchronized)."""
        if self.cuda and self.first_event is not None:
            return t_start + self.start_event.elapsed_time(self.first_event) / 1000.0
        return self.t_first


def _deliver(future: Future[Any], result: Any = None, error: BaseException | None = None) -> None:
    """Resolve a request's future unless its caller cancelled it (an awaiting task that was
    cancelled cancels the future through ``asyncio.wrap_future``); a worker must never die of that."""
    if future.done():
        return
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except InvalidStateError:  # cancelled between the check and the call
        pass


def _deliver_all(
    batch: list[_Pending], results: list[GenerationResult] | None = None, error: BaseException | None = None
) -> None:
    """Resolve every request of a batch: its result, or the batch's error."""
    if error is not None or results is None:
        for p in batch:
            _deliver(p.future, error=error or RuntimeError("the batch produced no results"))
        return
    for p, r in zip(batch, results, strict=True):
        _deliver(p.future, result=r)


class EngineClosed(RuntimeError):
    """Raised by submit() after stop()."""


class Engine:
    """Serve ``generate`` requests for one model under one :class:`TrialConfig`."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        config: TrialConfig,
        hardware: Hardware,
        info: ModelInfo,
        *,
        timings: BuildTimings | None = None,
        prompt_pad_to: int | None = None,
        max_context: int | None = None,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.config = config
        self.hardware = hardware
        self.info = info
        self.timings = timings or BuildTimings()
        self.fixed_shapes = needs_fixed_shapes(config.backend)
        self.prompt_pad_to = prompt_pad_to
        self.max_context = max_context or info.max_context or 2048
        #: The most tokens (prompt + output) one request may hold. ``max_context`` is the shape the caches are
        #: sized for (a trial's workload); a server that takes longer requests raises this (up to the model's
        #: positions) before start(), so the continuous scheduler's page pool can hold one such request.
        self.request_context = self.max_context
        self._continuous: ContinuousScheduler | None = None
        self._decoders: dict[int, StaticDecoder] = {}  # per stream worker (cuda-graphs backend)
        self.exported: ExportedStep | None = None  # the exported-graph backends' graph (set by build())
        self._held: list[_Pending] = []  # queued requests the bucketed scheduler passed over, oldest first
        #: Seconds and calls spent turning text into ids and back (``encode`` / ``decode``), by kind.
        self.text_seconds: dict[str, float] = {}
        self.text_calls: dict[str, int] = {}
        self._held_lock = threading.Lock()
        self.text = TextBatcher(tokenizer, self._count_text)  # servers' tokenize/detokenize, batched
        self.pad_id = int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0)
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._threads: list[threading.Thread] = []
        self._closed = False
        self._next_id = 0
        self._id_lock = threading.Lock()
        import torch

        self._cpu_threads = torch.get_num_threads()  # streams > 1 on CPU split it; start() restores it

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        model_ref: str,
        config: TrialConfig,
        hardware: Hardware,
        *,
        seed: int = 0,
        prompt_pad_to: int | None = None,
        max_context: int | None = None,
    ) -> Engine:
        """Load the model and apply precision, quantization, the attention kernel, then the backend."""
        from autotune.models import load_model

        timings = BuildTimings()
        t = time.perf_counter()
        model, tokenizer, info = load_model(model_ref, device=hardware.device, seed=seed)
        timings.load_s = time.perf_counter() - t
        t = time.perf_counter()
        model = PRECISIONS[config.precision].apply(model, hardware)
        timings.precision_s = time.perf_counter() - t
        t = time.perf_counter()
        model = QUANTIZERS[config.quantization].apply(model, hardware)
        timings.quantize_s = time.perf_counter() - t
        model = ATTENTIONS[config.attention].apply(model, hardware)
        model = BACKENDS[config.backend].apply(model, hardware)  # compiling happens in warm-up (compile_s)
        engine = cls(
            model,
            tokenizer,
            config,
            hardware,
            info,
            timings=timings,
            prompt_pad_to=prompt_pad_to,
            max_context=max_context,
        )
        if uses_exported_graph(config.backend):
            from autotune.engines.builtin.exported import ExportedStep

            engine.exported = ExportedStep.load(model, config.attention, config.backend)
            timings.export_s, timings.export_cached = engine.exported.export_s, float(engine.exported.cached)
        return engine

    # -- lifecycle ----------------------------------------------------------------------------
    def start(self) -> Engine:
        """Start the stream workers (again, after a stop)."""
        if self._threads or self._continuous is not None:
            return self
        self._closed = False
        if self.hardware.device_type != "cuda":
            import torch

            torch.set_num_threads(self._cpu_threads)  # a previous config's split must not linger
            # The workers compute; a pool the caller's thread keeps (from building the model) would
            # make every pool sleep between parallel regions (see openmp.py): 0.78x.
            release_thread_pool()
        if self.config.scheduler == "continuous":
            prompt = self.prompt_pad_to or min(self.max_context // 2, 512)
            self._continuous = ContinuousScheduler(
                self.model, self.config.batch_size, self.max_context, prompt, self.pad_id, self.request_context
            )
            self._continuous.start()
            return self
        for i in range(self.config.streams):
            th = threading.Thread(target=self._worker, args=(i,), name=f"autotune-stream-{i}", daemon=True)
            th.start()
            self._threads.append(th)
        return self

    def stop(self) -> None:
        """Finish queued and in-flight requests, then stop the workers."""
        self._closed = True
        if self._continuous is not None:
            self._continuous.stop()
            self._continuous = None
        for _ in self._threads:
            self._queue.put(None)
        for th in self._threads:
            th.join()
        self._threads.clear()
        self.text.close()

    def reconfigure(self, config: TrialConfig) -> None:
        """Switch to ``config`` without rebuilding: only the runtime knobs (batch size, streams, queue
        delay, scheduler) may differ; the next start() uses them. The engine must be stopped."""
        from autotune.config import MODEL_KNOBS

        if self._threads or self._continuous is not None:
            raise RuntimeError("stop the engine before reconfiguring it")
        differs = [k for k in MODEL_KNOBS if getattr(config, k) != getattr(self.config, k)]
        if differs:
            raise ValueError(f"{', '.join(differs)} change the built model: build a new engine")
        if (config.batch_size, config.streams) != (self.config.batch_size, self.config.streams):
            self._decoders.clear()  # their static caches and graphs fit the old shape: free them
        self.config = config

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- requests -----------------------------------------------------------------------------
    def encode(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            t = time.perf_counter()
            ids = list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"])
            self._count_text("tokenize", time.perf_counter() - t)
            return ids
        return [int(t) for t in prompt]

    def _count_text(self, what: str, seconds: float, items: int = 1) -> None:
        """``items`` requests' text work took ``seconds`` (one call, batched or not)."""
        with self._id_lock:
            self.text_seconds[what] = self.text_seconds.get(what, 0.0) + seconds
            self.text_calls[what] = self.text_calls.get(what, 0) + items

    async def aencode(self, prompt: str | Sequence[int]) -> list[int]:
        """:meth:`encode` for servers: batched with other requests' prompts on the text thread,
        so the event loop never runs the tokenizer."""
        if not isinstance(prompt, str):
            return self.encode(prompt)
        return await asyncio.wrap_future(self.text.encode(prompt))

    async def adecode(self, result: GenerationResult) -> str:
        """:meth:`decode` for servers, batched on the text thread."""
        return await asyncio.wrap_future(self.text.decode(result.output_ids))

    def submit(self, prompt: str | Sequence[int], max_new_tokens: int) -> Future[GenerationResult]:
        """Queue one request; the future resolves when its batch finishes."""
        if self._closed:
            raise EngineClosed("engine is stopped")
        if not self._threads and self._continuous is None:
            self.start()
        ids = self.encode(prompt)
        with self._id_lock:
            rid, self._next_id = self._next_id, self._next_id + 1
        pending = _Pending(rid, ids, int(max_new_tokens), time.perf_counter())
        if self._continuous is not None:
            self._continuous.submit(pending)
        else:
            self._queue.put(pending)
        return pending.future

    async def asubmit(self, prompt: str | Sequence[int], max_new_tokens: int) -> GenerationResult:
        return await asyncio.wrap_future(self.submit(prompt, max_new_tokens))

    def generate(self, prompts: Sequence[str | Sequence[int]], max_new_tokens: int) -> list[GenerationResult]:
        """Run a list of prompts through the batcher and return results in order."""
        futures = [self.submit(p, max_new_tokens) for p in prompts]
        return [f.result() for f in futures]

    def decode(self, result: GenerationResult) -> str:
        t = time.perf_counter()
        text = str(self.tokenizer.decode(result.output_ids, skip_special_tokens=True))
        self._count_text("detokenize", time.perf_counter() - t)
        return text

    # -- workers ------------------------------------------------------------------------------
    def _collect(self) -> list[_Pending] | None:
        if self.config.scheduler == "bucketed":
            return self._collect_bucketed()
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = first.t_submit + self.config.max_queue_delay_ms / 1000.0
        while len(batch) < self.config.batch_size:
            item = self._next_queued(deadline, wait=True)
            if item is None:
                break
            batch.append(item)
        return batch

    def _next_queued(self, deadline: float, *, wait: bool) -> _Pending | None:
        """The next queued request: at once when one is there, else (``wait``) one arriving before
        ``deadline``; None when there is none, or on the shutdown marker (put back for the others)."""
        try:
            item = self._queue.get_nowait()
        except queue.Empty:
            remaining = deadline - time.perf_counter()
            if not wait or remaining <= 0:
                return None
            try:
                item = self._queue.get(timeout=remaining)
            except queue.Empty:
                return None
        if item is None:
            self._queue.put(None)
        return item

    def _collect_bucketed(self) -> list[_Pending] | None:
        """The oldest request, then the queued ones whose prompt lengths are closest to it.

        Candidates are whatever is queued plus arrivals until the batch can be filled with requests
        of the oldest one's exact length or it has waited ``max_queue_delay_ms`` (the delay buys
        choice), up to ``BUCKET_LOOKAHEAD`` batches; the ones not chosen wait, oldest first.
        """
        from autotune.engines.builtin.optimize.schedule import BUCKET_LOOKAHEAD

        size = self.config.batch_size
        with self._held_lock:
            first = self._held.pop(0) if self._held else None
        if first is None:
            first = self._queue.get()
            if first is None:
                return None
        deadline = first.t_submit + self.config.max_queue_delay_ms / 1000.0
        pool: list[_Pending] = []
        with self._held_lock:
            pool, self._held = self._held[: size * BUCKET_LOOKAHEAD], self._held[size * BUCKET_LOOKAHEAD :]
        n = len(first.prompt_ids)
        same = sum(len(p.prompt_ids) == n for p in pool)
        while len(pool) < size * BUCKET_LOOKAHEAD:
            # Take what is queued; wait for more only until a batch of one length is possible.
            item = self._next_queued(deadline, wait=same + 1 < size)
            if item is None:
                break
            pool.append(item)
            same += len(item.prompt_ids) == n
        ranked = sorted(range(len(pool)), key=lambda i: (abs(len(pool[i].prompt_ids) - n), pool[i].t_submit))
        chosen = set(ranked[: size - 1])
        batch = [first, *(pool[i] for i in sorted(chosen))]
        rest = [p for i, p in enumerate(pool) if i not in chosen]
        if rest:
            with self._held_lock:
                self._held = sorted(rest + self._held, key=lambda p: p.t_submit)
        return batch

    def _worker(self, index: int) -> None:
        import torch

        stream_ctx: Any = None
        if self.hardware.device_type == "cuda":
            stream_ctx = torch.cuda.stream(torch.cuda.Stream(device=self.hardware.device))
        elif self.config.streams > 1:
            torch.set_num_threads(self._threads_per_stream())
        if self.config.pipeline_depth > 1:
            self._pipelined(index, stream_ctx)
            return
        while True:
            batch = self._collect()
            if batch is None:
                return
            try:
                results = self._execute(self._prepare(batch), index, stream_ctx)
            except BaseException as err:  # deliver the error to every waiter, keep serving
                _deliver_all(batch, error=err)
                continue
            _deliver_all(batch, results)

    def _pipelined(self, index: int, stream_ctx: Any) -> None:
        """Run batches back to back while a second thread prepares the next ones and a third delivers."""
        ready: queue.Queue[_Prepared | None] = queue.Queue(maxsize=self.config.pipeline_depth - 1)
        done: queue.Queue[tuple[list[_Pending], Any, BaseException | None] | None] = queue.Queue()

        def prepare() -> None:
            while True:
                batch = self._collect()
                if batch is None:
                    ready.put(None)
                    return
                self._fill_while_busy(batch, ready)
                try:
                    item = self._prepare(batch, to_device=True)
                except BaseException as err:
                    done.put((batch, None, err))
                    continue
                ready.put(item)

        def deliver() -> None:
            while (item := done.get()) is not None:
                batch, results, err = item
                _deliver_all(batch, results, error=err)

        helpers = [
            threading.Thread(target=prepare, name=f"autotune-stream-{index}-prepare", daemon=True),
            threading.Thread(target=deliver, name=f"autotune-stream-{index}-deliver", daemon=True),
        ]
        for th in helpers:
            th.start()
        while (prepared := ready.get()) is not None:
            try:
                done.put((prepared.batch, self._execute(prepared, index, stream_ctx), None))
            except BaseException as err:
                done.put((prepared.batch, None, err))
        done.put(None)
        for th in helpers:
            th.join()

    def _fill_while_busy(self, batch: list[_Pending], ready: queue.Queue[_Prepared | None]) -> None:
        """While every prepared slot is taken the batch could not start anyway: keep adding queued
        requests (static scheduler; the bucketed one chose its rows by length already)."""
        if self.config.scheduler != "static":
            return
        while len(batch) < self.config.batch_size and ready.full():
            item = self._next_queued(time.perf_counter() + FILL_POLL_S, wait=True)
            if item is None and self._closed:
                return
            if item is not None:
                batch.append(item)

    def run_batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> list[list[int]]:
        """One generate call on token ids, outside the batcher (used for warm-up and bare timing)."""
        if self._continuous is not None:
            return [r.output_ids for r in self.generate(list(prompts), max_new_tokens)]
        now = time.perf_counter()
        pend = [_Pending(-1, list(p), max_new_tokens, now) for p in prompts]
        return [r.output_ids for r in self._run_batch(pend, 0)]

    def _run_batch(self, batch: list[_Pending], stream: int) -> list[GenerationResult]:
        return self._execute(self._prepare(batch), stream, None)

    def _prepare(self, batch: list[_Pending], *, to_device: bool = False) -> _Prepared:
        """Pad the prompts to one left-padded tensor (and its mask); ``to_device``: copy them to the
        device now, off the running thread (``generate`` path only: the own decoders copy into
        their static buffers)."""
        import torch

        rows = len(batch)
        target_rows = self.config.batch_size if self.fixed_shapes else rows
        longest = max(len(p.prompt_ids) for p in batch)
        width = max(longest, self.prompt_pad_to or 0) if self.fixed_shapes else longest
        new_tokens = max(p.max_new_tokens for p in batch)
        ids = torch.full((max(rows, target_rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(batch):
            n = len(p.prompt_ids)
            ids[i, width - n :] = torch.tensor(p.prompt_ids, dtype=torch.long)
            mask[i, width - n :] = 1
        mask[rows:, -1] = 1  # padding rows attend to one token so softmax stays finite
        own_loop = uses_static_decoder(self.config.backend) or uses_exported_graph(self.config.backend)
        if to_device and not own_loop and self.hardware.device_type == "cuda":
            ids, mask = ids.to(self.hardware.device), mask.to(self.hardware.device)
            torch.cuda.current_stream(self.hardware.device).synchronize()  # copied before another stream reads
        return _Prepared(batch, ids, mask, width, new_tokens)

    def _execute(self, prepared: _Prepared, stream: int, stream_ctx: Any) -> list[GenerationResult]:
        """Run one prepared batch (on the stream worker's CUDA stream when it has one)."""
        if stream_ctx is None:
            return self._generate(prepared, stream)
        with stream_ctx:
            if prepared.ids.device.type == "cuda":  # made on the preparing thread's stream
                import torch

                current = torch.cuda.current_stream(prepared.ids.device)
                prepared.ids.record_stream(current)
                prepared.mask.record_stream(current)
            return self._generate(prepared, stream)

    def _generate(self, p: _Prepared, stream: int) -> list[GenerationResult]:
        import torch

        if uses_static_decoder(self.config.backend) or uses_exported_graph(self.config.backend):
            return self._run_static(p.batch, stream, p.ids, p.mask, p.new_tokens)
        device = self.hardware.device
        from transformers import LogitsProcessorList

        t_start = time.perf_counter()
        clock = _FirstTokenClock(self.hardware.device_type == "cuda")
        with torch.inference_mode():
            out = self.model.generate(
                input_ids=p.ids.to(device),
                attention_mask=p.mask.to(device),
                max_new_tokens=p.new_tokens,
                min_new_tokens=p.new_tokens,
                do_sample=False,
                pad_token_id=self.pad_id,
                logits_processor=LogitsProcessorList([clock]),
            )
            generated = out[:, p.width :].tolist()  # .tolist() synchronizes with the device
        t_end = time.perf_counter()
        t_first = clock.first_token_time(t_start) or t_end
        return _results(p.batch, generated, stream, t_start, t_first, t_end)

    def _threads_per_stream(self) -> int:
        """CPU threads for one stream worker: the cores split between the streams."""
        return max(1, (os.cpu_count() or 1) // self.config.streams)

    def _decoder(self, stream: int, rows: int, width: int, new_tokens: int) -> StaticDecoder | GraphDecoder:
        """This worker's decoder, built (and on CUDA captured) on first use or when a batch outgrows it;
        for onnxruntime, a light one per batch over the stream's session."""
        if self.exported is not None:
            from autotune.engines.builtin.exported import GraphDecoder

            return GraphDecoder(self.exported, self.exported.session(stream, self._threads_per_stream()))
        d = self._decoders.get(stream)
        if d is None or (d.rows, d.width) != (rows, width) or d.max_new_tokens < new_tokens:
            capacity = max(new_tokens, self.max_context - width)
            cuda = self.hardware.device_type == "cuda"
            compile_step = compiles_decoder_step(self.config.backend)
            d = StaticDecoder(self.model, rows, width, capacity, use_graph=cuda, compile=compile_step)
            self._decoders[stream] = d
        return d

    def _run_static(
        self, batch: list[_Pending], stream: int, ids: Any, mask: Any, new_tokens: int
    ) -> list[GenerationResult]:
        decoder = self._decoder(stream, ids.shape[0], ids.shape[1], new_tokens)
        t_start = time.perf_counter()
        clock = _FirstTokenClock(self.hardware.device_type == "cuda")
        decoder.prefill(ids, mask)
        clock(None, None)  # the first new tokens exist once the prefill has run
        generated = decoder.decode(new_tokens).tolist()  # .tolist() synchronizes with the device
        t_end = time.perf_counter()
        t_first = clock.first_token_time(t_start) or t_end
        return _results(batch, generated, stream, t_start, t_first, t_end)


def _results(
    batch: list[_Pending], generated: list[list[int]], stream: int, t_start: float, t_first: float, t_end: float
) -> list[GenerationResult]:
    return [
        GenerationResult(
            request_id=p.request_id,
            prompt_tokens=len(p.prompt_ids),
            output_ids=generated[i][: p.max_new_tokens],
            t_submit=p.t_submit,
            t_start=t_start,
            t_first_token=t_first,
            t_end=t_end,
            batch_rows=len(batch),
            stream=stream,
        )
        for i, p in enumerate(batch)
    ]

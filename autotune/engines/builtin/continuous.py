"""The ``continuous`` scheduler: transformers' continuous batching behind the Engine's submit().

A request joins the running batch at the next step and leaves it when done, over a paged KV
cache sized from the workload (``batch_size`` rows of ``max_context`` tokens), instead of
waiting for a whole static batch to finish. One reader thread blocks on the manager's result
queue and resolves each request's future; timestamps come from the manager's own clock
(``time.perf_counter``, like the static path), so latencies compare across schedulers.
"""

from __future__ import annotations

import math
import threading
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from autotune.engines.builtin.engine import GenerationResult, _Pending

#: KV-cache page size in tokens (transformers' default is 256; smaller wastes less on short requests).
PAGE_SIZE = 64
#: Most tokens one forward step takes in (prefill chunks plus decode rows).
MAX_BATCH_TOKENS = 16384


def _cb_sizes(batch_size: int, max_context: int, prompt_tokens: int, longest: int = 0) -> dict[str, int]:
    pages_per_request = math.ceil(max_context / PAGE_SIZE) + 1
    # A request longer than the tuned shape (up to ``longest`` tokens, a server's limit) must fit the pool
    # on its own, or the manager stops with "No requests can be scheduled" and fails every request.
    return {
        "max_requests_per_batch": batch_size,
        "page_size": PAGE_SIZE,
        "num_blocks": max(batch_size * pages_per_request, math.ceil(longest / PAGE_SIZE) + 1),
        "max_batch_tokens": max(min(batch_size * prompt_tokens, MAX_BATCH_TOKENS), prompt_tokens + batch_size),
    }


class ContinuousScheduler:
    """Owns one ``ContinuousBatchingManager`` for the engine's model."""

    def __init__(
        self, model: Any, batch_size: int, max_context: int, prompt_tokens: int, pad_id: int, longest: int = 0
    ) -> None:
        self.model = model
        self.sizes = _cb_sizes(batch_size, max_context, prompt_tokens, longest)
        self.pad_id = pad_id
        self._mgr: Any = None
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()
        self._reader: threading.Thread | None = None
        self._stopping = threading.Event()
        self._timestamps = True

    def start(self) -> None:
        from transformers import GenerationConfig

        gen = GenerationConfig(do_sample=False, eos_token_id=-1, pad_token_id=self.pad_id, max_new_tokens=16)
        kwargs: dict[str, Any] = {}
        try:  # transformers >= 5.2x: a separate config object
            from transformers.generation.configuration_utils import ContinuousBatchingConfig

            kwargs["continuous_batching_config"] = ContinuousBatchingConfig(**self.sizes)
        except (ImportError, TypeError):  # earlier 4.5x-5.1x: the sizes ride on the generation config
            for key, value in self.sizes.items():
                setattr(gen, key, value)
        self._mgr = self.model.init_continuous_batching(generation_config=gen, **kwargs)
        self._mgr.start()
        self._stopping.clear()
        self._reader = threading.Thread(target=self._read, name="autotune-continuous-reader", daemon=True)
        self._reader.start()

    def submit(self, pending: _Pending) -> None:
        rid = f"r{pending.request_id}"
        with self._lock:
            self._pending[rid] = pending
        try:
            try:
                self._mgr.add_request(
                    pending.prompt_ids, request_id=rid, max_new_tokens=pending.max_new_tokens, record_timestamps=True
                )
            except TypeError:  # older managers have no per-token timestamps
                self._timestamps = False
                self._mgr.add_request(pending.prompt_ids, request_id=rid, max_new_tokens=pending.max_new_tokens)
        except BaseException as err:
            from autotune.engines.builtin.engine import _deliver

            with self._lock:
                self._pending.pop(rid, None)
            _deliver(pending.future, error=err)

    def _read(self) -> None:
        from autotune.engines.builtin.engine import GenerationResult, _deliver

        while True:
            out = self._mgr.get_result(timeout=0.5)  # a blocking queue get, not a spin
            now = time.perf_counter()
            if out is None:
                with self._lock:
                    idle = not self._pending
                if self._stopping.is_set() and (idle or not self._mgr.is_running()):
                    self._fail_rest(RuntimeError("continuous batching stopped before the request finished"))
                    return
                continue
            if not out.is_finished():
                continue
            with self._lock:
                pending = self._pending.pop(out.request_id, None)
                in_flight = len(self._pending) + 1
            if pending is None:
                continue
            if out.error:
                _deliver(pending.future, error=RuntimeError(f"continuous batching: {out.error}"))
                continue
            t_start = out.lifespan[0] if out.lifespan[0] > 0 else pending.t_submit
            stamps = getattr(out, "timestamps", None) or []
            result: GenerationResult = GenerationResult(
                request_id=pending.request_id,
                prompt_tokens=len(pending.prompt_ids),
                output_ids=list(out.generated_tokens)[: pending.max_new_tokens],
                t_submit=pending.t_submit,
                t_start=t_start,
                t_first_token=stamps[0] if stamps else t_start,
                t_end=now,
                batch_rows=min(in_flight, self.sizes["max_requests_per_batch"]),
                stream=0,
            )
            _deliver(pending.future, result=result)

    def _fail_rest(self, err: BaseException) -> None:
        with self._lock:
            rest, self._pending = list(self._pending.values()), {}
        from autotune.engines.builtin.engine import _deliver

        for p in rest:
            _deliver(p.future, error=err)

    def stop(self) -> None:
        """Let in-flight requests finish, then stop the manager's thread."""
        self._stopping.set()
        if self._reader is not None:
            self._reader.join()
            self._reader = None
        if self._mgr is not None:
            self._mgr.stop(block=True)
            self._mgr = None

"""Tokenization and detokenization off the request path, batched.

A server that tokenizes inside its request handler runs the tokenizer on the event loop: every
other request's I/O waits for it, one prompt at a time. :class:`TextBatcher` owns one thread that
takes whatever texts (or id lists) are queued and hands them to the tokenizer in one batched call
(Hugging Face's fast tokenizers encode and decode a list in one Rust call), then resolves each
caller's future; the handler awaits the future and the loop stays free.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

#: Texts taken into one tokenizer call at most.
MAX_BATCH = 64


@dataclass
class _Job:
    kind: str  # "tokenize" | "detokenize"
    payload: Any  # the text, or the ids
    future: Future[Any] = field(default_factory=Future)


class TextBatcher:
    """One background thread that encodes and decodes in batches.

    ``count(kind, seconds, items)`` is told the time of every batched call and how many requests
    it served, so a request's share stays measurable (the engine's text breakdown).
    """

    def __init__(self, tokenizer: Any, count: Callable[[str, float, int], None] | None = None) -> None:
        self.tokenizer = tokenizer
        self._count = count or (lambda kind, seconds, items: None)
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.calls = 0  # tokenizer calls made (each serving one or more requests)

    def encode(self, text: str) -> Future[list[int]]:
        return self._submit(_Job("tokenize", text))

    def decode(self, ids: Sequence[int]) -> Future[str]:
        return self._submit(_Job("detokenize", list(ids)))

    def close(self) -> None:
        """Finish what is queued, then stop the thread (a later call starts it again)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join()

    def _submit(self, job: _Job) -> Future[Any]:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="autotune-text", daemon=True)
                self._thread.start()
        self._queue.put(job)
        return job.future

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = [first]
            stop = False
            while len(jobs) < MAX_BATCH:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is None:
                    stop = True
                    break
                jobs.append(job)
            for kind in ("tokenize", "detokenize"):
                batch = [j for j in jobs if j.kind == kind]
                if batch:
                    self._serve(kind, batch)
            if stop:
                return

    def _serve(self, kind: str, batch: list[_Job]) -> None:
        t = time.perf_counter()
        try:
            if kind == "tokenize":
                out: list[Any] = [list(ids) for ids in self.tokenizer([j.payload for j in batch])["input_ids"]]
            else:
                out = [
                    str(s) for s in self.tokenizer.batch_decode([j.payload for j in batch], skip_special_tokens=True)
                ]
        except Exception:  # one bad item must not fail the others: serve them one by one
            for j in batch:
                self._serve_one(kind, j)
            return
        self.calls += 1
        self._count(kind, time.perf_counter() - t, len(batch))
        for j, value in zip(batch, out, strict=True):
            j.future.set_result(value)

    def _serve_one(self, kind: str, job: _Job) -> None:
        t = time.perf_counter()
        try:
            if kind == "tokenize":
                value: Any = list(self.tokenizer(job.payload)["input_ids"])
            else:
                value = str(self.tokenizer.decode(job.payload, skip_special_tokens=True))
        except Exception as err:
            job.future.set_exception(err)
            return
        self.calls += 1
        self._count(kind, time.perf_counter() - t, 1)
        job.future.set_result(value)

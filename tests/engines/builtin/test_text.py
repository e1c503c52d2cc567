"""The text thread: prompts queued while the tokenizer is busy go into its next call together."""

from __future__ import annotations

import threading
from typing import Any

import pytest

from autotune.engines.builtin.text import TextBatcher
from autotune.models import build_tokenizer


class Gated:
    """A real tokenizer whose first call waits for the test, recording every call's batch size."""

    def __init__(self) -> None:
        self.real = build_tokenizer(512)
        self.sizes: list[int] = []
        self.gate = threading.Event()

    def __call__(self, texts: Any, **kw: Any) -> Any:
        self.sizes.append(len(texts) if isinstance(texts, list) else 1)
        if len(self.sizes) == 1:
            self.gate.wait(10)
        if isinstance(texts, list) and any(not isinstance(t, str) for t in texts):
            raise TypeError("not a text")
        return self.real(texts, **kw)

    def batch_decode(self, ids: Any, **kw: Any) -> Any:
        self.sizes.append(len(ids))
        return self.real.batch_decode(ids, **kw)

    def decode(self, ids: Any, **kw: Any) -> Any:
        return self.real.decode(ids, **kw)


def test_queued_texts_share_one_tokenizer_call_and_keep_their_order() -> None:
    tok, counted = Gated(), []
    text = TextBatcher(tok, lambda kind, seconds, items: counted.append((kind, items)))
    first = text.encode("the first prompt")  # occupies the thread until the gate opens
    while not tok.sizes:
        threading.Event().wait(0.01)
    prompts = [f"prompt number {i}" for i in range(10)]
    futures = [text.encode(p) for p in prompts]
    tok.gate.set()
    got = [f.result(10) for f in futures]
    assert got == [list(tok.real(p)["input_ids"]) for p in prompts]  # each caller gets its own ids
    assert first.result(10) == list(tok.real("the first prompt")["input_ids"])
    assert tok.sizes == [1, 10] and text.calls == 2  # ten prompts, one call
    assert counted == [("tokenize", 1), ("tokenize", 10)]  # the breakdown still counts requests
    back = [text.decode(ids) for ids in got]
    assert [f.result(10) for f in back] == [tok.real.decode(ids, skip_special_tokens=True) for ids in got]
    text.close()


def test_a_bad_item_fails_alone() -> None:
    tok = Gated()
    tok.gate.set()
    text = TextBatcher(tok)
    jobs = [text.encode("fine"), text.encode(123), text.encode("also fine")]  # type: ignore[arg-type]
    assert jobs[0].result(10) and jobs[2].result(10)
    with pytest.raises((TypeError, ValueError)):
        jobs[1].result(10)
    text.close()
    assert text.encode("after close").result(10)  # a later call starts the thread again
    text.close()

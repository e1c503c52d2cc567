"""Schedulers: how queued requests become forward passes.

``static`` is the engine's own dynamic batcher (a batch runs to completion, up to ``batch_size``
rows, after waiting at most ``max_queue_delay_ms``). ``continuous`` hands requests to
transformers' continuous batching (paged KV cache; finished rows are replaced every step), so
short requests do not wait for the longest one in their batch. ``bucketed`` is the static batcher
choosing, among the requests queued (up to ``BUCKET_LOOKAHEAD`` batches' worth), the ones whose
prompt lengths are closest to the oldest request's, so a batch is padded less; the oldest request
always goes first, so none starves. None changes the model, so ``apply`` is the identity; the
engine reads ``config.scheduler``.

``pipeline_depth`` (an integer knob, no registry) is how many batches a stream keeps in flight:
with 2 or more, a preparing thread forms and pads the next batches while one runs, and a
delivering thread hands results back, so the running thread only runs batches (see
:class:`autotune.engines.builtin.engine.Engine`).
"""

from __future__ import annotations

from typing import Any

from autotune.config import TrialConfig
from autotune.engines.builtin.optimize.base import Technique
from autotune.hardware import Hardware


def _identity(model: Any, hw: Hardware) -> Any:
    return model


def _has_continuous_batching(hw: Hardware) -> str | None:
    from importlib.util import find_spec

    if find_spec("transformers.generation.continuous_batching") is None:
        return f"transformers {hw.transformers_version} has no continuous batching (needs >= 4.56)"
    return None


def _continuous_conflict(cfg: TrialConfig, hw: Hardware) -> str | None:
    if cfg.backend != "eager":
        return "continuous batching runs its own forward loop: use backend eager"
    if cfg.streams != 1:
        return "continuous batching is one scheduler loop over the whole batch: use streams 1"
    if cfg.max_queue_delay_ms:
        return "continuous batching admits requests every step, a queue delay only adds latency: use 0"
    if cfg.pipeline_depth != 1:
        return "continuous batching schedules every step in its own loop: use pipeline_depth 1"
    if cfg.quantization == "int8-dynamic" and hw.device_type == "cpu":
        return "fbgemm dynamic int8 modules need the static scheduler"
    return None


#: How many batches' worth of queued requests the bucketed scheduler chooses from.
BUCKET_LOOKAHEAD = 4


def _bucketed_conflict(cfg: TrialConfig, hw: Hardware) -> str | None:
    if cfg.batch_size == 1:
        return "a batch of one has no padding to save: use scheduler static"
    return None


SCHEDULERS: dict[str, Technique] = {
    "static": Technique("static", _identity, description="dynamic batcher; a batch runs to completion"),
    "continuous": Technique(
        "continuous",
        _identity,
        _has_continuous_batching,
        _continuous_conflict,
        description="transformers continuous batching with a paged KV cache",
    ),
    "bucketed": Technique(
        "bucketed",
        _identity,
        conflict=_bucketed_conflict,
        description="dynamic batcher grouping queued requests of similar prompt length (less padding)",
    ),
}

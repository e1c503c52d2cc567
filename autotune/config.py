"""TrialConfig: one point of the search space, the unit that is measured, stored and exported.

Knob names live here, torch-free, so the parent process (tuner, CLI, dashboard) can validate
and reason about configs without importing the engine.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, WithJsonSchema

Precision = Literal["fp32", "tf32", "bf16", "fp16"]
Quantization = Literal["none", "int8-dynamic", "int8-weight-only", "int4-weight-only", "fp8"]
Backend = Literal["eager", "inductor", "inductor-cudagraphs", "cuda-graphs", "onnxruntime", "openvino", "tensorrt"]
Scheduler = Literal["static", "continuous", "bucketed"]
Attention = Literal["sdpa", "sdpa-no-cudnn", "eager", "sdpa-packed"]
#: The programs that generate the tokens (``autotune.engines``): autotune's own, or a serving engine.
EngineName = Literal["builtin", "vllm", "ctranslate2"]

PRECISIONS: tuple[str, ...] = get_args(Precision)
QUANTIZATIONS: tuple[str, ...] = get_args(Quantization)
BACKENDS: tuple[str, ...] = get_args(Backend)
SCHEDULERS: tuple[str, ...] = get_args(Scheduler)
ATTENTIONS: tuple[str, ...] = get_args(Attention)
ENGINES: tuple[str, ...] = get_args(EngineName)

ArgValue = str | int | float | bool


def _args_in(value: Any) -> Any:
    """A mapping (what JSON and YAML hold) as sorted ``(name, value)`` pairs: hashable, one order."""
    if isinstance(value, dict):
        return tuple(sorted(value.items()))
    return tuple(sorted(tuple(pair) for pair in value)) if isinstance(value, list | tuple) else value


#: An engine's own knobs (vLLM's ``max_num_batched_tokens``, CTranslate2's ``intra_threads``), by the
#: engine's own name: stored as sorted pairs so configs stay frozen and hashable; read and written as a
#: JSON object.
EngineArgs = Annotated[
    tuple[tuple[str, ArgValue], ...],
    BeforeValidator(_args_in),
    PlainSerializer(lambda pairs: dict(pairs), return_type=dict[str, ArgValue]),
    WithJsonSchema({"type": "object", "additionalProperties": {"type": ["string", "integer", "number", "boolean"]}}),
]

#: Knobs that change the loaded model (a change means a rebuild), in application order.
MODEL_KNOBS = ("engine", "model", "precision", "quantization", "attention", "backend")
#: Knobs that only change how requests are scheduled onto an already built model.
RUNTIME_KNOBS = ("batch_size", "streams", "max_queue_delay_ms", "scheduler", "pipeline_depth")
KNOBS = RUNTIME_KNOBS + MODEL_KNOBS


class TrialConfig(BaseModel):
    """One inference configuration. Frozen and hashable so it can key caches and dedupe trials."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    batch_size: int = Field(1, ge=1, le=4096, description="Max requests per generate call.")
    precision: Precision = Field("fp32", description="Weight/activation dtype (tf32: fp32 with TF32 matmuls).")
    quantization: Quantization = Field("none", description="Weight (and activation) quantization scheme.")
    streams: int = Field(1, ge=1, le=64, description="Concurrent workers sharing the model.")
    backend: Backend = Field("eager", description="Execution backend for the forward pass.")
    max_queue_delay_ms: float = Field(
        0.0, ge=0.0, le=60_000.0, description="How long the batcher waits to fill a batch."
    )
    scheduler: Scheduler = Field(
        "static",
        description=(
            "static: batches run to completion; continuous: transformers' paged-attention continuous batching; "
            "bucketed: static batches of similar prompt lengths (less padding)."
        ),
    )
    pipeline_depth: int = Field(
        1,
        ge=1,
        le=4,
        description=(
            "Batches in flight per stream: 1 runs collect, prepare, run and deliver in turn; 2+ prepares "
            "up to depth-1 batches on a second thread and delivers results on a third while one runs."
        ),
    )

    model: str | None = Field(
        None, description="A model variant from the spec's list; None: the spec's (reference) model."
    )
    attention: Attention = Field(
        "sdpa",
        description=(
            "Attention kernel: sdpa (PyTorch picks), sdpa-no-cudnn (SDPA without cuDNN), eager (matmuls), "
            "sdpa-packed (SDPA, grouped-query heads packed at decode)."
        ),
    )

    engine: EngineName = Field(
        "builtin",
        description="What generates the tokens: autotune's own engine, or a serving engine (autotune.engines).",
    )
    engine_args: EngineArgs = Field(
        (),
        description="The engine's own knobs by its own names (vLLM: max_num_batched_tokens, ...); "
        "an engine's default is left out.",
    )

    def arg(self, name: str, default: Any = None) -> Any:
        """One of the engine's own knobs, or ``default`` where the config leaves it to the engine."""
        return dict(self.engine_args).get(name, default)

    def key(self) -> str:
        """A short stable hash of the knob values, for dedupe and caches."""
        data = self.model_dump()
        # Knobs added later drop out at their default, so keys from before they existed stay valid.
        for knob, default in _LATER_KNOB_DEFAULTS.items():
            if data[knob] == default:
                del data[knob]
        blob = json.dumps(data, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    def label(self) -> str:
        """A compact human-readable one-liner, e.g. ``b32 fp32 int8-dynamic x1 eager 10ms``."""
        return (
            f"b{self.batch_size} {self.precision} {self.quantization} x{self.streams} "
            f"{self.backend} {self.max_queue_delay_ms:g}ms"
            + (f" {self.scheduler}" if self.scheduler != "static" else "")
            + (f" pipe{self.pipeline_depth}" if self.pipeline_depth != 1 else "")
            + (f" attn={self.attention}" if self.attention != "sdpa" else "")
            + (f" model={self.model}" if self.model else "")
            + (f" engine={self.engine}" if self.engine != "builtin" else "")
            + "".join(f" {k}={v}" for k, v in self.engine_args)
        )


#: Knobs added after the first stored studies, with the default that older configs implicitly ran.
_LATER_KNOB_DEFAULTS: dict[str, Any] = {
    "scheduler": "static",
    "attention": "sdpa",
    "model": None,
    "pipeline_depth": 1,
    "engine": "builtin",
    "engine_args": {},
}


def knob_value(cfg: TrialConfig, knob: str, values: list[Any] | None = None) -> Any:
    """``cfg``'s value of a searched knob: a TrialConfig field, or ``ENGINE.NAME`` for an engine's own
    knob (its value where ``cfg`` runs that engine; otherwise the knob's first value, where it is pinned)."""
    engine, dot, name = knob.partition(".")
    if not dot:
        return getattr(cfg, knob)
    if cfg.engine == engine:
        return cfg.arg(name)
    return values[0] if values else None


BASELINE = TrialConfig()
"""The naive baseline: batch 1, fp32, no quantization, eager, one stream, no queue delay."""

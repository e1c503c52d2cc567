"""SearchSpace: the spec's candidate values, cut down to what the hardware can run.

Values the device cannot run are removed up front (with the reason kept for the study
record); combinations that conflict, or that would not fit in memory, are rejected by
:meth:`SearchSpace.check` before any model is loaded.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from autotune.config import KNOBS, TrialConfig
from autotune.errors import SpaceError
from autotune.hardware import Hardware
from autotune.optimize import REGISTRIES
from autotune.spec import SpaceSpec, StudySpec

if TYPE_CHECKING:
    import optuna

    from autotune.models import ModelInfo

# Bytes per weight for the memory estimate.
_WEIGHT_BYTES = {"fp32": 4.0, "tf32": 4.0, "bf16": 2.0, "fp16": 2.0}
_QUANT_BYTES = {"int8-dynamic": 1.0, "int8-weight-only": 1.0, "int4-weight-only": 0.5, "fp8": 1.0}
MEMORY_HEADROOM = 0.9


def default_values(knob: str, hw: Hardware) -> list[Any]:
    """What to search when the spec leaves a knob out."""
    gpu = hw.device_type == "cuda"
    if knob == "batch_size":
        return [1, 2, 4, 8, 16, 32, 64, 128, 256] if gpu else [1, 2, 4, 8, 16, 32, 64]
    if knob == "streams":
        return [1, 2, 4] if gpu else sorted({1, min(2, hw.cpu_cores)})
    if knob == "max_queue_delay_ms":
        return [0.0, 5.0, 20.0, 50.0]
    if knob == "precision" and not gpu:
        return ["fp32", "bf16"]  # fp16 runs on CPU but only as slow emulation; ask for it explicitly
    return list(REGISTRIES[knob])


@dataclass
class SearchSpace:
    """Per-knob candidate values after hardware filtering, plus the rules for combinations."""

    values: dict[str, list[Any]]
    hardware: Hardware
    model: ModelInfo | None = None
    max_context_tokens: int = 0
    concurrency_rows: int | None = None
    dropped: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_spec(cls, spec: StudySpec, hw: Hardware, model: ModelInfo | None = None) -> SearchSpace:
        values: dict[str, list[Any]] = {}
        dropped: dict[str, str] = {}
        given: SpaceSpec = spec.space
        for knob in KNOBS:
            candidates = getattr(given, knob) or default_values(knob, hw)
            if knob in REGISTRIES:
                kept = []
                for v in candidates:
                    reason = REGISTRIES[knob][v].unsupported(hw)
                    if reason:
                        dropped[f"{knob}={v}"] = reason
                    else:
                        kept.append(v)
                candidates = kept
            if not candidates:
                why = "; ".join(f"{k}: {r}" for k, r in dropped.items() if k.startswith(knob + "="))
                raise SpaceError(f"search space is empty: no {knob} value runs on {hw.summary()} ({why})")
            values[knob] = candidates
        ctx = spec.workload.prompt_tokens.upper + spec.workload.output_tokens.upper
        if model is not None and ctx > model.max_context:
            raise SpaceError(
                f"workload needs {ctx} tokens of context but {model.ref} supports {model.max_context}"
            )
        space = cls(values, hw, model, ctx, spec.workload.arrival.clients, dropped)
        if not any(space.check(c) is None for c in itertools.islice(space.grid(), 100_000)):
            first = next(space.grid())
            raise SpaceError(f"search space is empty: every combination is rejected (e.g. {space.check(first)})")
        return space

    # -- enumeration -----------------------------------------------------------------------
    def size(self) -> int:
        n = 1
        for v in self.values.values():
            n *= len(v)
        return n

    def grid(self) -> Any:
        """Every combination, in knob order (a generator of TrialConfig)."""
        keys = list(self.values)
        for combo in itertools.product(*(self.values[k] for k in keys)):
            yield TrialConfig(**dict(zip(keys, combo)))

    def suggest(self, trial: optuna.Trial) -> TrialConfig:
        return TrialConfig(**{k: trial.suggest_categorical(k, v) for k, v in self.values.items()})

    def optuna_grid(self) -> dict[str, list[Any]]:
        return {k: list(v) for k, v in self.values.items()}

    # -- rules ------------------------------------------------------------------------------
    def estimate_memory_mb(self, cfg: TrialConfig) -> float | None:
        """Weights plus a full KV cache for every row in flight, in MB (None without model info)."""
        m = self.model
        if m is None:
            return None
        wbytes = _QUANT_BYTES.get(cfg.quantization, _WEIGHT_BYTES[cfg.precision])
        weights = m.num_parameters * wbytes
        kv_bytes = _WEIGHT_BYTES[cfg.precision]
        rows = cfg.batch_size * cfg.streams
        kv = rows * self.max_context_tokens * m.num_layers * 2 * m.num_kv_heads * m.head_dim * kv_bytes
        # Activations and logits: vocab-sized logits per row dominate for small models.
        logits = rows * m.vocab_size * 4 * 2
        return (weights + kv + logits) / 2**20

    def check(self, cfg: TrialConfig) -> str | None:
        """Why ``cfg`` cannot run here, or None. Called before any model is loaded."""
        hw = self.hardware
        for knob, registry in REGISTRIES.items():
            tech = registry[getattr(cfg, knob)]
            reason = tech.unsupported(hw) or tech.conflict(cfg, hw)
            if reason:
                return f"{knob}={tech.name}: {reason}"
        est = self.estimate_memory_mb(cfg)
        if est is not None and est > hw.device_memory_mb * MEMORY_HEADROOM:
            return f"estimated memory {est:,.0f} MB exceeds {MEMORY_HEADROOM:.0%} of the device's {hw.device_memory_mb:,} MB"
        return None

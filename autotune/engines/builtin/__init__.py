"""autotune's own engine: transformers plus the ``optimize`` registries behind its batcher.

The engine lives in this package: ``engine`` (the batcher and streams), ``decoder`` and ``exported``
(its own decode loops), ``continuous`` (transformers' continuous batching), ``text`` (tokenizing off
the running thread) and ``optimize/`` (one registry per knob); this is its entry in the engine
registry. Its knobs are the :class:`~autotune.config.TrialConfig` fields, filtered per hardware by
:func:`autotune.space.default_values` and the registries.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, ClassVar, Literal

from autotune.config import KNOBS, RUNTIME_KNOBS
from autotune.engines.base import EngineKnobs, ServingEngine

if TYPE_CHECKING:
    from autotune.config import TrialConfig
    from autotune.engines.builtin.engine import Engine
    from autotune.hardware import Hardware


class BuiltinEngine(ServingEngine):
    name: ClassVar[str] = "builtin"
    kind: ClassVar[Literal["in-process", "server"]] = "in-process"
    runtime_knobs: ClassVar[tuple[str, ...]] = RUNTIME_KNOBS

    def version(self) -> str | None:
        from autotune import __version__

        return __version__

    def install_hint(self) -> str:
        return "it ships with autotune"

    def knobs(self, hw: Hardware) -> EngineKnobs:
        from autotune.space import default_values

        shared, dropped = {}, {}
        for knob in KNOBS:
            if knob in ("engine", "model"):
                continue
            shared[knob], left_out = default_values(knob, hw)
            dropped.update(left_out)
        return EngineKnobs(shared=shared, dropped=dropped)

    def build_engine(
        self,
        model_ref: str,
        config: TrialConfig,
        hardware: Hardware,
        *,
        seed: int = 0,
        prompt_pad_to: int | None = None,
        max_context: int | None = None,
    ) -> Engine:
        from autotune.engines.builtin.engine import Engine

        return Engine.build(
            model_ref, config, hardware, seed=seed, prompt_pad_to=prompt_pad_to, max_context=max_context
        )

"""Engines: the programs that generate the tokens, one module each (see :mod:`autotune.engines.base`).

A plain registry, as Optuna keeps its samplers: ``ENGINES[name]`` is the engine's class; an engine
whose package is missing is still listed, and says how to install it when asked for.
"""

from __future__ import annotations

from autotune.engines.base import EngineKnob, EngineKnobs, EngineUnavailable, ServingEngine

__all__ = ["ENGINES", "EngineKnob", "EngineKnobs", "EngineUnavailable", "ServingEngine", "get_engine"]

#: Engine name -> ``module:Class``, imported on first use (each engine's module is light).
_PATHS = {
    "builtin": "autotune.engines.builtin:BuiltinEngine",
    "vllm": "autotune.engines.vllm:VllmEngine",
    "ctranslate2": "autotune.engines.ctranslate2:CTranslate2Engine",
}
ENGINES: tuple[str, ...] = tuple(_PATHS)


def get_engine(name: str) -> ServingEngine:
    """The engine registered as ``name``."""
    import importlib

    if name not in _PATHS:
        raise EngineUnavailable(f"unknown engine {name!r}; engines: {', '.join(_PATHS)}")
    module, _, cls = _PATHS[name].partition(":")
    engine: ServingEngine = getattr(importlib.import_module(module), cls)()
    return engine

"""autotune: measure LLM inference configurations and find the fastest one that meets a latency SLO.

The package root stays torch-free: importing it never loads torch or a model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

__version__ = "0.1.0"

from autotune.config import BASELINE, TrialConfig
from autotune.errors import (
    AutotuneError,
    ModelError,
    NoFeasibleConfig,
    SpaceError,
    SpecError,
    StorageError,
    TrialFailure,
)
from autotune.spec import StudySpec, load_spec, parse_spec

if TYPE_CHECKING:  # imported lazily at run time (``__getattr__``); typed for checkers all the same
    from autotune.deploy import ExportDocument, load_config, load_engine

_LAZY = {"load_engine": "autotune.deploy", "load_config": "autotune.deploy", "ExportDocument": "autotune.deploy"}


def __getattr__(name: str) -> object:
    """Deployment entry points, imported on first use (the package root stays light)."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'autotune' has no attribute {name!r}")


__all__ = [
    "BASELINE",
    "AutotuneError",
    "ExportDocument",
    "ModelError",
    "NoFeasibleConfig",
    "SpaceError",
    "SpecError",
    "StorageError",
    "StudySpec",
    "TrialConfig",
    "TrialFailure",
    "__version__",
    "load_config",
    "load_engine",
    "load_spec",
    "parse_spec",
]

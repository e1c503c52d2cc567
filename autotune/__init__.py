"""autotune: measure LLM inference configurations and find the fastest one that meets a latency SLO.

The package root stays torch-free: importing it never loads torch or a model.
"""

from __future__ import annotations

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

__all__ = [
    "BASELINE",
    "AutotuneError",
    "ModelError",
    "NoFeasibleConfig",
    "SpaceError",
    "SpecError",
    "StorageError",
    "StudySpec",
    "TrialConfig",
    "TrialFailure",
    "__version__",
    "load_spec",
    "parse_spec",
]

"""Knob implementations, one module per family. Each is a plain registry ``name -> Technique``.

Adding a quantizer or a backend is one function and one entry; :mod:`autotune.space` asks
each entry whether the probed hardware can run it (``unsupported``) and whether it combines
with the rest of a config (``conflict``), so impossible configs are rejected before any model
is loaded. Modules here import torch only inside ``apply``: the tuner imports them torch-free.
"""

from __future__ import annotations

from autotune.engines.builtin.optimize.attention import ATTENTIONS
from autotune.engines.builtin.optimize.base import Technique, is_torchao_available
from autotune.engines.builtin.optimize.compile import BACKENDS
from autotune.engines.builtin.optimize.precision import PRECISIONS
from autotune.engines.builtin.optimize.quantize import QUANTIZERS
from autotune.engines.builtin.optimize.schedule import SCHEDULERS

REGISTRIES: dict[str, dict[str, Technique]] = {
    "precision": PRECISIONS,
    "quantization": QUANTIZERS,
    "attention": ATTENTIONS,
    "backend": BACKENDS,
    "scheduler": SCHEDULERS,
}

__all__ = [
    "ATTENTIONS",
    "BACKENDS",
    "PRECISIONS",
    "QUANTIZERS",
    "REGISTRIES",
    "SCHEDULERS",
    "Technique",
    "is_torchao_available",
]

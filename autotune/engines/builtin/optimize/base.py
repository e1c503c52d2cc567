"""The registry entry type shared by every knob family."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from autotune.config import TrialConfig
    from autotune.hardware import Hardware


def _always(*_: Any) -> None:
    return None


@dataclass(frozen=True)
class Technique:
    """One knob value: how to apply it, and why it might not run here.

    ``apply(model, hw)`` returns the transformed model (it may modify in place).
    ``unsupported(hw)`` and ``conflict(config, hw)`` return a reason string, or None when fine.
    """

    name: str
    apply: Callable[[Any, Hardware], Any]
    unsupported: Callable[[Hardware], str | None] = _always
    conflict: Callable[[TrialConfig, Hardware], str | None] = _always
    description: str = ""


def is_torchao_available() -> bool:
    """True when torchao can be imported (checked without importing it)."""
    from importlib.util import find_spec

    return find_spec("torchao") is not None


def needs_torchao(hw: Hardware) -> str | None:
    if hw.torchao_version is None:
        return "needs torchao (pip install 'autotune[quant]')"
    return None


def needs_cuda(min_cc: tuple[int, int] | None = None) -> Callable[[Hardware], str | None]:
    def check(hw: Hardware) -> str | None:
        if hw.device_type != "cuda":
            return "needs an NVIDIA GPU" + (f" with compute capability >= {min_cc[0]}.{min_cc[1]}" if min_cc else "")
        if min_cc and (hw.compute_capability or (0, 0)) < min_cc:
            cc = ".".join(map(str, hw.compute_capability or ()))
            return f"needs compute capability >= {min_cc[0]}.{min_cc[1]} (this GPU has {cc})"
        return None

    return check


def first_reason(*reasons: str | None) -> str | None:
    return next((r for r in reasons if r), None)

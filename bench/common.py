"""Shared bits of the benchmarks: the machine header and result files."""

from __future__ import annotations

import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """CPU/GPU, cores and library versions, probed (imports torch: call from the bench process only)."""
    from autotune.hardware import probe

    hw = probe()
    return {
        "host": platform.node(),
        "device": hw.device,
        "device_name": hw.device_name,
        "cpu_model": hw.cpu_model,
        "cpu_cores": hw.cpu_cores,
        "memory_mb": hw.host_memory_mb,
        "torch": hw.torch_version,
        "transformers": hw.transformers_version,
        "torchao": hw.torchao_version,
        "python": hw.python_version,
    }


def header(title: str, info: dict[str, Any]) -> None:
    print(f"== {title}")
    print(
        f"machine: {info['device_name']} ({info['device']}), {info['cpu_cores']} cores, {info['memory_mb']} MB; "
        f"torch {info['torch']}, transformers {info['transformers']}, torchao {info['torchao']}"
    )


def spread(values: list[float]) -> dict[str, float]:
    """Median and relative spread ((max - min) / median) of repeated figures."""
    med = statistics.median(values)
    return {
        "median": med,
        "min": min(values),
        "max": max(values),
        "spread_pct": 100 * (max(values) - min(values)) / med if med else float("nan"),
    }


def _commit() -> str:
    """The code that produced a result (with ``+dirty`` when the work tree had changes)."""
    import subprocess

    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=RESULTS.parent, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "autotune", "studies", "bench/*.py"],
            capture_output=True,
            text=True,
            cwd=RESULTS.parents[1],  # the repository root: the pathspecs are relative to it
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def save(name: str, doc: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    now = time.gmtime()
    path = RESULTS / f"{name}-{time.strftime('%Y%m%dT%H%M%SZ', now)}.json"  # keep every run, not the last
    # The code the process started with: a commit made while it ran is not what it ran.
    at_save = _commit()
    stamp = {"commit": _STARTED_AT} | ({"commit_at_save": at_save} if at_save != _STARTED_AT else {})
    doc = {"recorded_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", now), **stamp, **doc}
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


_STARTED_AT = _commit()

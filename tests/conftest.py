"""Shared fixtures. Everything runs offline, on the CPU, on the tiny preset."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from autotune.hardware import Hardware

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
TINY_SPEC = ROOT / "tests" / "data" / "tiny.yaml"


def make_hw(
    device_type: str = "cpu",
    cc: tuple[int, int] | None = None,
    memory_mb: int = 24_000,
    torchao: str | None = "0.18.0",
    compiler: bool = True,
) -> Hardware:
    """A synthetic hardware description for rule tests (no probing)."""
    return Hardware(
        device="cuda:0" if device_type == "cuda" else "cpu",
        device_type=device_type,  # type: ignore[arg-type]
        device_name="NVIDIA H100 80GB HBM3" if device_type == "cuda" else "Test CPU",
        device_memory_mb=memory_mb,
        compute_capability=cc,
        cpu_model="Test CPU",
        cpu_cores=2,
        host_memory_mb=24_000,
        has_c_compiler=compiler,
        python_version="3.11",
        torch_version="2.13.0",
        transformers_version="5.0",
        torchao_version=torchao,
        cuda_version="12.8" if device_type == "cuda" else None,
    )


@pytest.fixture
def cpu_hw() -> Hardware:
    return make_hw()


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """Run the real ``autotune`` command line as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "autotune.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )

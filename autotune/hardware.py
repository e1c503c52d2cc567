"""Hardware probe and fingerprint.

:class:`Hardware` is torch-free data; :func:`probe` imports torch and is meant to run in a
child process (the tuner never imports torch). The fingerprint is what must match for a
tuned config to transfer: device kind and name, memory, capability and the software stack.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
from importlib import metadata
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    from autotune.roofline import Ceilings


class Hardware(BaseModel):
    """What the trial process sees: one device and the software that drives it."""

    model_config = ConfigDict(frozen=True)

    device: str
    device_type: Literal["cpu", "cuda"]
    device_name: str
    device_memory_mb: int
    compute_capability: tuple[int, int] | None = None
    cpu_model: str
    cpu_cores: int
    host_memory_mb: int
    cpu_bf16: bool = False
    has_c_compiler: bool = False
    python_version: str
    torch_version: str
    transformers_version: str
    torchao_version: str | None = None
    cuda_version: str | None = None
    #: Measured ceilings (:func:`autotune.roofline.measure_ceilings`); not part of the fingerprint.
    memory_gb_s: float | None = None
    matmul_tflops: float | None = None
    matmul_dtype: str | None = None

    #: The fields that make timings comparable (not the memory in use or the host name).
    FINGERPRINT_FIELDS: ClassVar[tuple[str, ...]] = (
        "device_type",
        "device_name",
        "device_memory_mb",
        "compute_capability",
        "cpu_model",
        "cpu_cores",
        "torch_version",
        "transformers_version",
        "torchao_version",
        "cuda_version",
    )

    def fingerprint(self) -> str:
        """Hash of :attr:`FINGERPRINT_FIELDS`: equal fingerprints, transferable tuned configs."""
        keys = self.FINGERPRINT_FIELDS
        blob = json.dumps({k: getattr(self, k) for k in keys}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def differences(self, tuned: dict[str, Any]) -> list[str]:
        """What differs between ``tuned`` (a stored ``model_dump``, with its fingerprint) and this hardware."""
        if tuned.get("fingerprint") == self.fingerprint():
            return []
        diffs = []
        for key in self.FINGERPRINT_FIELDS:
            theirs, here = tuned.get(key), getattr(self, key)
            if isinstance(here, tuple):  # JSON stores the compute capability as a list
                here = list(here)
            if isinstance(theirs, tuple):
                theirs = list(theirs)
            if theirs != here:
                diffs.append(f"{key}: tuned on {theirs!r}, here {here!r}")
        return diffs or ["hardware fingerprint differs"]

    def ceilings(self) -> Ceilings | None:
        """The measured ceilings, when the probe measured them."""
        from autotune.roofline import Ceilings

        if self.memory_gb_s is None or self.matmul_tflops is None:
            return None
        return Ceilings(self.memory_gb_s, self.matmul_tflops, self.matmul_dtype or "", 0, 0)

    def summary(self) -> str:
        if self.device_type == "cuda":
            cc = ".".join(map(str, self.compute_capability or ()))
            return f"{self.device_name} (cc {cc}, {self.device_memory_mb} MB), torch {self.torch_version}"
        return f"{self.cpu_model}, {self.cpu_cores} cores, {self.host_memory_mb} MB, torch {self.torch_version}"


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _cpu_info() -> tuple[str, set[str]]:
    name, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and ":" in line:
                    flags = set(line.split(":", 1)[1].split())
                if flags and name:
                    break
    except OSError:
        pass
    return name, flags


def probe(device: str = "auto") -> Hardware:
    """Inspect the machine. ``device`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    import psutil
    import torch

    cuda_ok = torch.cuda.is_available()
    if device == "auto":
        device = "cuda:0" if cuda_ok else "cpu"
    if device == "cuda":
        device = "cuda:0"
    cpu_model, flags = _cpu_info()
    host_mb = psutil.virtual_memory().total // 2**20
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    common = dict(
        cpu_model=cpu_model,
        cpu_cores=cores,
        host_memory_mb=host_mb,
        cpu_bf16=bool({"avx512_bf16", "amx_bf16"} & flags),
        has_c_compiler=any(shutil.which(c) for c in ("cc", "gcc", "clang")),
        python_version=platform.python_version(),
        torch_version=torch.__version__,
        transformers_version=_version("transformers") or "missing",
        torchao_version=_version("torchao"),
    )
    if device.startswith("cuda"):
        if not cuda_ok:
            raise RuntimeError(f"device {device} requested but CUDA is not available")
        idx = int(device.split(":")[1])
        if idx >= torch.cuda.device_count():
            raise RuntimeError(f"device {device} requested but only {torch.cuda.device_count()} GPU(s) exist")
        props = torch.cuda.get_device_properties(idx)
        return Hardware(
            device=device,
            device_type="cuda",
            device_name=props.name,
            device_memory_mb=props.total_memory // 2**20,
            compute_capability=(props.major, props.minor),
            cuda_version=torch.version.cuda,
            **common,
        )
    return Hardware(device="cpu", device_type="cpu", device_name=cpu_model, device_memory_mb=host_mb, **common)

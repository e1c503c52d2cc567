"""OpenMP thread pools: why the engine frees the caller's before its stream workers start.

GNU OpenMP (the runtime PyTorch's CPU wheels bundle) gives every thread that starts a parallel
region its own pool of helper threads, and keeps it until that thread exits. Once the helpers of all
pools outnumber the cores, every pool stops spinning between parallel regions (libgomp's
"throttled" spin count, about 100 spins) and its helpers sleep on a futex instead: one wake-up per
parallel region, tens of thousands per batch of a small model. A process that builds the model on its
main thread (one pool) and generates on a stream worker thread (a second pool) is in that state.
Measured (llama-small b32 int8 on 2 cores, ``python bench/engine_vs_generate.py --precision fp32
--quantization int8-dynamic --modes plain-main,plain-thread,plain-thread:release,plain-thread:release:passive``):
``generate`` on a second thread ran at 0.78x the main thread with ~34,000 voluntary context switches
per 4 batches against 1-8; with the main thread's pool freed first (``omp_pause_resource_all``,
OpenMP 5.0) at 0.96x with 1-5; ``OMP_WAIT_POLICY=PASSIVE`` forces the sleeping on every pool (0.81x).
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

#: Shared objects of the OpenMP runtimes PyTorch ships or links (GNU, Intel, LLVM).
RUNTIMES = ("libgomp", "libiomp5", "libomp")
OMP_PAUSE_SOFT = 1


@functools.cache
def _runtime() -> ctypes.CDLL | None:
    """The OpenMP runtime already loaded into this process (by torch), or None."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:  # not Linux: nothing to free
        return None
    for line in maps.splitlines():
        path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
        name = Path(path).name
        if name.startswith(RUNTIMES) and ".so" in name:
            try:
                lib = ctypes.CDLL(path)  # already mapped: the same handle, nothing new is loaded
            except OSError:
                continue
            if hasattr(lib, "omp_pause_resource_all"):
                lib.omp_pause_resource_all.argtypes = [ctypes.c_int]
                lib.omp_pause_resource_all.restype = ctypes.c_int
                return lib
    return None


def release_thread_pool() -> bool:
    """Free the calling thread's OpenMP pool (its helper threads exit); False when no runtime with
    ``omp_pause_resource_all`` is loaded or it refused. Safe outside a parallel region only; the
    next parallel region on this thread builds a new pool."""
    import torch  # noqa: F401  (loads the runtime this frees)

    lib = _runtime()
    if lib is None:
        return False
    return bool(lib.omp_pause_resource_all(OMP_PAUSE_SOFT) == 0)

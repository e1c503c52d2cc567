"""One measurement per device at a time, across every autotune process on this machine.

Two ``autotune tune`` (or a tune and a ``measure``, a worker, a landscape recording) measuring
on the same device at once both get wrong figures, and the luckier one may win the study. Each
measurement therefore holds an advisory lock (``flock``) on a file named after its device;
a process that finds the device busy says so and waits its turn. Locks are per physical device:
``cuda:0`` and ``cuda:1`` measure side by side, and two machines never share a lock. The kernel
drops a lock when its holder dies, so a killed process never leaves a device locked.

Lock files live in ``$AUTOTUNE_LOCK_DIR`` (default: ``autotune-device-locks`` in the system's
temporary folder, shared by every user of a GPU box).
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

try:
    import fcntl
except ImportError:  # Windows: no flock; measurements are not serialized there
    fcntl = None  # type: ignore[assignment]

LOCK_DIR_ENV = "AUTOTUNE_LOCK_DIR"


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


#: Where "waiting for the device" goes; the CLI points it at its console.
notify: Callable[[str], None] = _stderr

_held: dict[str, int] = {}  # device key -> nesting depth in this process
_guard = threading.Lock()


def lock_dir() -> Path:
    return Path(os.environ.get(LOCK_DIR_ENV) or Path(tempfile.gettempdir()) / "autotune-device-locks")


def device_key(device: str) -> str:
    """The physical device behind ``device``: ``cuda:N`` counts within ``CUDA_VISIBLE_DEVICES``,
    so two processes that see different GPUs as ``cuda:0`` lock different files."""
    if not device.startswith("cuda"):
        return "cpu"
    index = int(device.partition(":")[2] or 0)
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    physical = visible[index] if index < len(visible) else str(index)
    return "cuda-" + "".join(c if c.isalnum() or c in "-_" else "_" for c in physical)


def _open(path: Path) -> tuple[int, bool]:
    """The lock file's descriptor and whether it is writable (another user's file may not be:
    flock works on a read-only descriptor too, the holder line is then not written)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(OSError):  # shared by every user of the machine; sticky like /tmp
        os.chmod(path.parent, 0o1777)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except PermissionError:
        return os.open(path, os.O_RDONLY), False
    with contextlib.suppress(OSError):
        os.fchmod(fd, 0o666)
    return fd, True


def _holder(fd: int) -> str:
    try:
        return os.pread(fd, 400, 0).decode("utf-8", "replace").strip() or "holder unknown"
    except OSError:
        return "holder unknown"


@contextlib.contextmanager
def measuring_on(device: str, what: str = "") -> Iterator[None]:
    """Hold ``device`` for one measurement; wait (saying so once) while another process holds it.

    Re-entrant within a process. ``what`` (e.g. the study's name) is shown to whoever waits.
    """
    key = device_key(device)
    with _guard:
        if _held.get(key):
            _held[key] += 1
            nested = True
        else:
            nested = False
    if nested or fcntl is None:
        try:
            yield
        finally:
            with _guard:
                if nested:
                    _held[key] -= 1
        return
    fd, writable = _open(lock_dir() / f"{key}.lock")
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            t = time.monotonic()
            notify(f"waiting for {device}: another autotune process is measuring on it ({_holder(fd)})")
            fcntl.flock(fd, fcntl.LOCK_EX)  # a signal (Ctrl-C, SIGTERM) interrupts the wait
            notify(f"{device} is free after {time.monotonic() - t:,.0f} s; measuring")
        if writable:
            line = f"pid {os.getpid()}{', ' + what if what else ''}, since {time.strftime('%H:%M:%S')}"
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, line.encode(), 0)
        with _guard:
            _held[key] = 1
        try:
            yield
        finally:
            with _guard:
                _held.pop(key, None)
    finally:
        os.close(fd)  # closing the descriptor releases the lock

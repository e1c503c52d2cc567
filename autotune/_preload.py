"""Imported once by the trial fork server: the heavy modules every trial needs.

Import-time chatter (torchao's missing optional kernels, torch's pytree notices) is sent to
/dev/null so it does not land in the middle of the user's progress bar; each trial's own
output still goes to its log file.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def _quiet_fds() -> Iterator[None]:
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 1)
        os.dup2(devnull, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, devnull):
            os.close(fd)


# torchao stays out of the fork server: importing it queries the GPU, which initializes CUDA, and
# a process with CUDA initialized cannot fork children that use CUDA. A ``None`` entry makes
# ``import torchao`` fail and ``find_spec`` answer "absent" while preloading; trials that
# quantize import it themselves (about a second).
_hidden = "torchao" not in sys.modules
if _hidden:
    sys.modules["torchao"] = None  # type: ignore[assignment]
try:
    with _quiet_fds(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import torch
        import transformers  # noqa: F401
        from transformers.models.llama import modeling_llama  # noqa: F401

        import autotune.engines.builtin.engine
        import autotune.measure  # noqa: F401
finally:
    if _hidden:
        del sys.modules["torchao"]

if torch.cuda.is_initialized():  # a module above touched the GPU: children could not use CUDA
    raise RuntimeError("CUDA was initialized while preloading the trial fork server")

# Ctrl-C is the parent's to handle: it kills its trial process and reports. Trial processes
# forked from this server inherit the ignored SIGINT from their first instruction, so a Ctrl-C
# never prints a child's KeyboardInterrupt traceback over the user's terminal.
signal.signal(signal.SIGINT, signal.SIG_IGN)

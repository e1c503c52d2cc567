"""Imported once by the trial fork server: the heavy modules every trial needs.

Import-time chatter (torchao's missing optional kernels, torch's pytree notices) is sent to
/dev/null so it does not land in the middle of the user's progress bar; each trial's own
output still goes to its log file.
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings


@contextlib.contextmanager
def _quiet_fds() -> object:
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


with _quiet_fds(), warnings.catch_warnings():
    warnings.simplefilter("ignore")
    import torch  # noqa: F401
    import transformers  # noqa: F401
    from transformers.models.llama import modeling_llama  # noqa: F401

    import autotune.engine
    import autotune.measure  # noqa: F401

    with contextlib.suppress(ImportError):
        import torchao  # noqa: F401

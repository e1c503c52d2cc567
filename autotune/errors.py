"""The exception tree. Every error a user can cause derives from :class:`AutotuneError`.

The CLI turns an ``AutotuneError`` into one line on stderr and its ``exit_code``; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations


class AutotuneError(Exception):
    """Base of every error autotune raises on purpose."""

    exit_code: int = 2


class SpecError(AutotuneError):
    """A study spec or config file is missing, malformed or names something impossible."""


class ModelError(AutotuneError):
    """A model reference cannot be resolved (unknown preset, missing path, hub id offline)."""


class StorageError(AutotuneError):
    """The storage URL cannot be opened, or the named study does not exist in it."""


class SpaceError(AutotuneError):
    """The search space is empty once the hardware's limits are applied."""


class LandscapeError(AutotuneError):
    """A recorded landscape file cannot be used: truncated, another schema, other hardware or spec."""


class NoFeasibleConfig(AutotuneError):
    """The study finished but no trial met the SLO."""

    exit_code = 3


class TrialFailure(Exception):
    """A trial ended without a measurement (OOM, crash, timeout, error); ``kind`` says which."""

    def __init__(self, kind: str, reason: str, log: str = "") -> None:
        super().__init__(f"{kind}: {reason}")
        self.kind = kind
        self.reason = reason
        self.log = log

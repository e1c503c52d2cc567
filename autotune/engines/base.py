"""The engine interface: what the search, the measurement and the deployment ask of an engine.

An engine is the program that generates the tokens: autotune's own (transformers plus the
``optimize`` registries and its batcher), or a serving engine users deploy instead (vLLM,
CTranslate2). Each says which knobs it has on the probed hardware (and why it drops the others),
how it starts with a config, which knobs a running instance takes without a restart, and how it
is measured: in the trial process (``in-process``), or as a server in its own Python environment
that the trial replays the workload against over the OpenAI-compatible HTTP API (``server``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from autotune.config import ArgValue, TrialConfig
from autotune.errors import AutotuneError

if TYPE_CHECKING:
    from autotune.engines.builtin.engine import Engine
    from autotune.engines.server import Launch
    from autotune.hardware import Hardware
    from autotune.quality import EvalSet, Reference


class EngineUnavailable(AutotuneError):
    """The engine is not installed (or not usable) here; the message says how to install it."""


@dataclass(frozen=True)
class EngineKnob:
    """One of an engine's own knobs (stored in ``TrialConfig.engine_args`` under ``name``).

    ``values`` are what a study searches when the spec does not list them; ``None`` among them
    means "leave the flag out" (the engine's own default). ``ordinal``: the order of the values
    means something to the sampler (sizes, counts).
    """

    name: str
    values: tuple[ArgValue | None, ...]
    help: str = ""
    ordinal: bool = False


@dataclass
class EngineKnobs:
    """What an engine can search on one machine.

    ``shared``: the :class:`~autotune.config.TrialConfig` knobs it honours, with the values that
    run here (a shared knob it lacks is pinned to its default); ``own``: its own knobs;
    ``dropped``: ``"knob=value"`` (or ``"knob"``) -> why it is not searched here.
    """

    shared: dict[str, list[Any]]
    own: dict[str, EngineKnob] = field(default_factory=dict)
    dropped: dict[str, str] = field(default_factory=dict)


class ServingEngine(ABC):
    """One engine: a plain class per engine, registered by name in :data:`autotune.engines.ENGINES`."""

    #: The name specs and configs use (``engine: vllm``).
    name: ClassVar[str]
    #: ``in-process``: built and measured in the trial process; ``server``: a process of its own.
    kind: ClassVar[Literal["in-process", "server"]]
    #: TrialConfig knobs a running instance takes without a restart (the rest mean a new start).
    runtime_knobs: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def version(self) -> str | None:
        """The installed version, or None where the engine is not installed."""

    def install_hint(self) -> str:
        """How a user installs the engine (shown when it is missing)."""
        return f"autotune engines install {self.name}"

    def require(self) -> str:
        """The installed version; :class:`EngineUnavailable` with the install hint otherwise."""
        v = self.version()
        if v is None:
            raise EngineUnavailable(f"engine {self.name} is not installed; install it with: {self.install_hint()}")
        return v

    @abstractmethod
    def knobs(self, hw: Hardware) -> EngineKnobs:
        """The knobs this engine has on ``hw`` and the values it runs there."""

    def conflict(self, cfg: TrialConfig, hw: Hardware) -> str | None:
        """Why this combination of knob values cannot run (checked before anything starts), or None."""
        return None

    # -- in-process engines ------------------------------------------------------------------------
    def build_engine(
        self,
        model_ref: str,
        config: TrialConfig,
        hardware: Hardware,
        *,
        seed: int = 0,
        prompt_pad_to: int | None = None,
        max_context: int | None = None,
    ) -> Engine:
        """The engine a trial measures and ``autotune serve`` serves, built in this process (the
        built-in engine's batcher and streams around this engine's generation)."""
        raise NotImplementedError(f"engine {self.name} runs as a server of its own")

    # -- server engines ----------------------------------------------------------------------------
    def launch(self, config: TrialConfig, model_dir: Path, hw: Hardware, *, port: int, max_model_len: int) -> Launch:
        """The exact command (and environment) that serves ``config`` on 127.0.0.1:``port``."""
        raise NotImplementedError(f"engine {self.name} is not a server engine")

    def launch_script(
        self, config: TrialConfig, model_dir: Path, hw: Hardware, *, max_model_len: int, comment: str = ""
    ) -> str:
        """:meth:`launch` as a shell script a deployment runs (``autotune export --format NAME``)."""
        raise NotImplementedError(f"engine {self.name} is not a server engine")

    def fidelity_over_http(self, url: str, served_model: str | None, es: EvalSet, ref: Reference) -> dict[str, Any]:
        """The fidelity figures of :func:`autotune.quality.fidelity`, measured through the server's API."""
        raise NotImplementedError(f"engine {self.name} is not a server engine")

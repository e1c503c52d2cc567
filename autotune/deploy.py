"""Deployments load the exported config and get the Engine the trials measured.

    from autotune import load_engine
    engine = load_engine("best.json")            # validated, hardware checked, model checked
    results = engine.generate(prompts, max_new_tokens=64)

The file is validated against :class:`ExportDocument` (its JSON Schema ships as
``autotune/data/export.schema.json``; ``autotune schema`` prints it). A file written by a newer
autotune is refused with the schema version it needs; loading on hardware that differs from the
file's fingerprint warns (``strict=True`` refuses) and says what differs.
"""

from __future__ import annotations

import dataclasses
import json
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from autotune.config import TrialConfig
from autotune.errors import AutotuneError

if TYPE_CHECKING:
    from autotune.engines.builtin.engine import Engine
    from autotune.engines.server import Launch
    from autotune.hardware import Hardware

#: The export schema version this autotune writes and the newest it reads.
SCHEMA_VERSION = 1
SCHEMA_FILE = Path(__file__).parent / "data" / "export.schema.json"


class ConfigFileError(AutotuneError):
    """An exported config file is unreadable, invalid, too new, or does not fit this model/hardware."""


class HardwareMismatchWarning(UserWarning):
    """The config was tuned on other hardware: it runs, but its tuned figures may not hold here."""


class ModelMismatchWarning(UserWarning):
    """The model's files are not the ones the config was tuned with: it runs, but its figures may not hold."""


class ExportDocument(BaseModel):
    """The exported config file (``autotune export`` / ``autotune tune --export``)."""

    model_config = ConfigDict(extra="forbid", title="autotune export")

    schema_version: int = Field(ge=1, le=SCHEMA_VERSION, description="Export format version.")
    autotune_version: str
    exported_at: str = Field(description="UTC time of the export, ISO 8601.")
    study: str
    trial: int = Field(ge=0, description="The study's trial that measured this config.")
    model: str = Field(min_length=1, description="Model reference the config was tuned for.")
    model_seed: int = 0
    model_digest: dict[str, Any] | None = Field(
        None,
        description="sha256 of the model's weights, tokenizer and config files as tuned (autotune.digest); "
        "load_engine and serve warn (strict: refuse) when the files they load differ.",
    )
    hardware: dict[str, Any] = Field(description="The probed hardware, with its fingerprint.")
    slo: list[dict[str, Any]] = Field(
        description="SLO clauses: metric, percentile, and max (or min, for fidelity floors such as top1_agreement)."
    )
    workload: dict[str, Any] | None = Field(None, description="The study's workload spec.")
    config: TrialConfig
    metrics: dict[str, Any] = Field(description="The tuned measurement: tokens/s, latency percentiles, memory.")
    confirmation: dict[str, Any] | None = Field(None, description="Re-measurements of the winner, if any.")


def json_schema() -> dict[str, Any]:
    """The JSON Schema of the export file (what ``SCHEMA_FILE`` holds)."""
    schema = ExportDocument.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema


def _one_line(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"])
        msg = "unknown field" if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{loc}: {msg}" if loc else msg)
    return "; ".join(parts)


def parse_config(data: Any, source: str = "config") -> ExportDocument:
    """Validate an export document; every problem becomes one ConfigFileError line naming the field."""
    if not isinstance(data, dict):
        raise ConfigFileError(f"{source}: expected a JSON object (an autotune export), got {type(data).__name__}")
    version = data.get("schema_version")
    if isinstance(version, int) and version > SCHEMA_VERSION:
        raise ConfigFileError(
            f"{source}: export schema version {version} is newer than this autotune reads ({SCHEMA_VERSION}); "
            f"upgrade autotune to load it"
        )
    try:
        return ExportDocument.model_validate(data)
    except ValidationError as err:
        raise ConfigFileError(f"{source}: {_one_line(err)}") from None


def load_config(path: str | os.PathLike[str]) -> ExportDocument:
    """Read and validate an export file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigFileError(f"{p}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigFileError(f"{p}: cannot read it ({err})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        what = "truncated" if err.pos >= len(text.rstrip()) else "not valid JSON"
        raise ConfigFileError(f"{p}: {what} (line {err.lineno}, column {err.colno}: {err.msg})") from None
    return parse_config(data, str(p))


def hardware_differences(doc: ExportDocument, hw: Hardware) -> list[str]:
    """What differs between the hardware the config was tuned on and ``hw`` (empty when the fingerprint matches)."""
    return hw.differences(doc.hardware)


def load_engine(
    config: str | os.PathLike[str] | ExportDocument | dict[str, Any],
    *,
    strict: bool = False,
    model: str | None = None,
    allow_other_model: bool = False,
    device: str | None = None,
    start: bool = True,
) -> Engine:
    """The Engine the trials measured, with exactly the exported knobs applied.

    ``model`` loads another reference than the one the config was tuned for, which is refused
    unless ``allow_other_model`` (the tuned figures were measured on the original). ``device``
    overrides the exported device (``cuda:1``); ``strict`` turns a hardware mismatch warning, and
    a warning that the model's files differ from the digest the export recorded, into an error.
    """
    from autotune.hardware import probe
    from autotune.spec import WorkloadSpec

    if isinstance(config, ExportDocument):
        doc = config
    elif isinstance(config, dict):
        doc = parse_config(config)
    else:
        doc = load_config(config)
    ref = model or doc.model
    if ref != doc.model and not allow_other_model:
        raise ConfigFileError(
            f"the config was tuned for model {doc.model!r}, not {ref!r}; its figures do not transfer "
            "(pass allow_other_model=True to load it anyway)"
        )
    from autotune.digest import digest_mismatch

    changed = digest_mismatch(doc.model_digest, ref, doc.model_seed)
    if changed:
        if strict:
            raise ConfigFileError(changed)
        warnings.warn(changed, ModelMismatchWarning, stacklevel=2)
    target = device or doc.hardware.get("device") or "auto"
    try:
        hw = probe(target)
    except RuntimeError as err:
        raise ConfigFileError(f"cannot use device {target!r}: {err} (pass device=... to choose another)") from None
    diffs = hardware_differences(doc, hw)
    if diffs:
        msg = "config tuned on other hardware: " + "; ".join(diffs)
        if strict:
            raise ConfigFileError(msg)
        warnings.warn(msg, HardwareMismatchWarning, stacklevel=2)
    workload = WorkloadSpec.model_validate(doc.workload) if doc.workload else None
    pad = workload.prompt_tokens.upper if workload else None
    context = pad + workload.output_tokens.upper if workload and pad else None
    from autotune.engines import get_engine

    plugin = get_engine(doc.config.engine)
    plugin.require()
    if plugin.kind == "server":
        raise ConfigFileError(
            f"this config was measured on engine {doc.config.engine}, a server of its own: "
            "`autotune serve CONFIG` starts it with the measured launch, and `autotune export --format "
            f"{doc.config.engine}` writes that launch"
        )
    engine = plugin.build_engine(ref, doc.config, hw, seed=doc.model_seed, prompt_pad_to=pad, max_context=context)
    return engine.start() if start else engine


def engine_script(doc: dict[str, Any], *, comment: str = "") -> str:
    """A server engine's measured launch as a shell script (``autotune export --format vllm``), with the
    tuned hardware's facts (no probe: the export may be written on another machine)."""
    from autotune.checkpoint import checkpoint_dir
    from autotune.engines import get_engine
    from autotune.hardware import Hardware
    from autotune.spec import WorkloadSpec

    exported = parse_config({k: v for k, v in doc.items() if k != "model_written_from"})
    plugin = get_engine(exported.config.engine)
    ref = str(doc.get("model_written_from") or exported.model)
    folder = checkpoint_dir(ref, exported.model_seed)
    model_dir = Path(folder) if folder is not None else Path(exported.model)
    workload = WorkloadSpec.model_validate(exported.workload) if exported.workload else WorkloadSpec()
    context = int(exported.config.arg("max_model_len") or workload.prompt_tokens.upper + workload.output_tokens.upper)
    hw = Hardware.model_validate(exported.hardware)
    script: str = plugin.launch_script(exported.config, model_dir, hw, max_model_len=context, comment=comment)
    return script


def engine_launch(doc: dict[str, Any], *, port: int, host: str = "127.0.0.1") -> Launch:
    """The measured launch of a server engine's exported config (``vllm``): the same command the trial
    started, on ``host``:``port``, loading the same checkpoint folder."""
    from autotune.checkpoint import checkpoint_dir
    from autotune.engines import get_engine
    from autotune.hardware import probe
    from autotune.spec import WorkloadSpec

    exported = parse_config(doc)
    plugin = get_engine(exported.config.engine)
    plugin.require()
    folder = checkpoint_dir(exported.model, exported.model_seed)
    model_dir = Path(folder) if folder is not None else Path(exported.model)
    workload = WorkloadSpec.model_validate(exported.workload) if exported.workload else WorkloadSpec()
    context = int(exported.config.arg("max_model_len") or workload.prompt_tokens.upper + workload.output_tokens.upper)
    hw = probe(exported.hardware.get("device") or "auto")
    launch = plugin.launch(exported.config, model_dir, hw, port=port, max_model_len=context)
    if host != "127.0.0.1" and "--host" in launch.argv:
        argv = list(launch.argv)
        argv[argv.index("--host") + 1] = host
        launch = dataclasses.replace(launch, argv=argv)
    return launch

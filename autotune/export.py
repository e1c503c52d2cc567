"""The exported config: a versioned JSON file that deployments load and run as-is."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from autotune import __version__
from autotune.deploy import SCHEMA_VERSION
from autotune.errors import NoFeasibleConfig, SpecError
from autotune.tuner import A_CONFIG, best_feasible, confirmation, shown_measurement, trial_measurement

_LATENCY_KEYS = ("p50", "p90", "p95", "p99")


def export_dict(study: optuna.Study, trial: FrozenTrial | None = None) -> dict[str, Any]:
    """The export document for ``trial`` (default: the study's best feasible trial)."""
    trial = trial or best_feasible(study)
    if trial is None:
        raise NoFeasibleConfig(f"study {study.study_name!r} has no trial that meets its SLO; nothing to export")
    m = shown_measurement(study, trial)  # the median re-measurement when there is one
    searched = trial_measurement(trial)
    assert m is not None and searched is not None
    record = confirmation(study, trial)
    attrs = study.user_attrs
    # The trial's model variant when the study searched several, else the study's model.
    model = trial.user_attrs[A_CONFIG].get("model") or attrs.get("spec", {}).get("model")
    return {
        "schema_version": SCHEMA_VERSION,
        "autotune_version": __version__,
        "exported_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "study": study.study_name,
        "trial": trial.number,
        "model": model,
        "model_seed": attrs.get("spec", {}).get("model_seed", 0),
        "model_digest": (attrs.get("model_digests") or {}).get(model),
        "hardware": {**attrs.get("hardware", {}), "fingerprint": attrs.get("fingerprint")},
        "slo": attrs.get("slo", []),
        "workload": attrs.get("spec", {}).get("workload"),
        "config": trial.user_attrs[A_CONFIG],
        "metrics": {
            "output_tokens_per_s": m.output_tokens_per_s,
            "requests_per_s": m.requests_per_s,
            **{k: {p: getattr(m, k)[p] for p in _LATENCY_KEYS} for k in ("e2e_ms", "ttft_ms", "tpot_ms")},
            "peak_memory_mb": m.peak_memory_mb,
            "memory_kind": m.memory_kind,
            "requests_measured": m.requests,
            **({"quality": m.quality} if m.quality else {}),
            # Where the figures above come from, and what the search trial itself measured.
            "source": "re-measurement (median)" if record and record.get("median_run") is not None else "search trial",
            "search": {
                "output_tokens_per_s": searched.output_tokens_per_s,
                "e2e_ms": {p: searched.e2e_ms[p] for p in _LATENCY_KEYS},
            },
        },
        "confirmation": _without_measurements(record),
    }


def _without_measurements(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """A confirmation record without each run's full measurement (the metrics carry the median one)."""
    if record is None:
        return None
    runs = [{k: v for k, v in r.items() if k != "measurement"} for r in record.get("runs", [])]
    return {**record, "runs": runs}


def check_export_path(path: str | Path) -> Path:
    """Refuse, before a study spends its budget, an export path that could not be written at its end."""
    p = Path(path)
    if p.is_dir():
        raise SpecError(f"--export {p}: is a folder; give a file name, e.g. {p / 'best.json'}")
    folder = p.parent
    while not folder.exists() and folder != folder.parent:  # write_export creates the missing folders
        folder = folder.parent
    if not folder.is_dir():
        raise SpecError(f"--export {p}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise SpecError(f"--export {p}: not writable here (folder {folder})")
    return p


def write_export(doc: dict[str, Any], path: str | Path) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves half a config behind."""
    from autotune.translate import write_text_atomic

    try:
        return write_text_atomic(json.dumps(doc, indent=2) + "\n", path)
    except OSError as err:
        raise SpecError(f"cannot write the export to {path}: {err.strerror or err}") from None

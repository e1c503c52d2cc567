"""The prepared GPU check keeps working between the rare sessions that have a GPU: its whole flow
(ceilings, baseline, a real study, repeats of the winner, the verdict) on a CPU, shrunk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT


def test_the_gpu_check_runs_its_whole_flow_on_a_cpu(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "bench/gpu_check.py", "--smoke", "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (path,) = tmp_path.glob("gpu_check-smoke-*.json")
    doc = json.loads(path.read_text())
    assert doc["errors"] == {}
    assert set(doc["phase_s"]) == {"env", "hardware", "baseline", "study", "repeats"}
    assert doc["study"]["exit_code"] == 0 and doc["study"]["best_config"] is not None
    assert len(doc["repeats"]["runs"]) >= 2 and doc["verdict"]["speedup"] > 0

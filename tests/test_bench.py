"""The prepared GPU check keeps working between the rare sessions that have a GPU: its whole flow
(ceilings, baseline, a real study, repeats of the winner, the verdict) on a CPU, shrunk."""

from __future__ import annotations

import json
import os
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


def test_the_gpu_landscape_script_records_and_resumes(tmp_path: Path) -> None:
    """bench/gpu_landscape.sh, on the tests' tiny spec shrunk to 4 configs (LANDSCAPE_SPEC)."""
    from .conftest import four_config_grid

    spec = four_config_grid(tmp_path)
    out = tmp_path / "out"
    path = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    env = {**os.environ, "PATH": path, "LANDSCAPE_SPEC": str(spec), "OUT": str(out)}

    def script() -> subprocess.CompletedProcess[str]:
        cmd = ["bash", "bench/gpu_landscape.sh", "200"]
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=260)

    first = script()
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    land = json.loads((out / "grid-cpu.json").read_text())
    assert len(land["points"]) == 4 and (out / "grid-cpu.log").exists()
    again = script()  # everything recorded: nothing measured again
    assert again.returncode == 0 and "4 configs of 4 recorded" in again.stdout
    assert "[1/4]" not in again.stdout + again.stderr

"""A study on each other engine end to end, as a user runs it: ``autotune tune`` with ``engine: NAME``
(2 trials), the stored trials, the export, and serving and verifying that export.

The CTranslate2 study takes seconds; the vLLM one starts vLLM's CPU build (about a minute per start on
2 cores) for each trial and for the re-measurement, so it runs only where vLLM is installed
(``autotune engines install vllm``; CI installs it and then a missing vLLM fails instead of skipping).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from ..conftest import ROOT, free_port, run_cli

DATA = ROOT / "tests" / "data"


def _trials(work: Path, study: str) -> list[optuna.trial.FrozenTrial]:
    s = optuna.load_study(study_name=study, storage=f"sqlite:///{work}/studies/autotune.db")
    return s.get_trials(deepcopy=False)


def test_a_ctranslate2_study_tunes_exports_and_verifies(tmp_path: Path) -> None:
    pytest.importorskip("ctranslate2", reason="engine ctranslate2: pip install 'autotune[ctranslate2]'")
    res = run_cli("tune", str(DATA / "tiny-ctranslate2.yaml"), "--export", "best.json", cwd=tmp_path, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    trials = _trials(tmp_path, "tiny-ct2")
    measured = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(measured) >= 2
    for t in measured:
        assert t.user_attrs["config"]["engine"] == "ctranslate2"
    doc = json.loads((tmp_path / "best.json").read_text())
    assert doc["config"]["engine"] == "ctranslate2" and doc["metrics"]["output_tokens_per_s"] > 0
    # Fidelity measured on CTranslate2's own numerics: float32 agrees with the reference; int8 on the
    # tiny preset's near-flat random logits flips some top-1s (0.878 on an AVX2-only CPU, 0.979 with AVX-512).
    top1 = doc["metrics"]["quality"]["top1_agreement"]
    assert top1 > (0.95 if doc["config"]["quantization"] == "none" else 0.6), doc["metrics"]["quality"]
    # The export loads as the same engine in a deployment, and replays its workload.
    res = run_cli("verify", "best.json", "--json", "--tolerance", "0.9", cwd=tmp_path, timeout=300)
    assert res.returncode in (0, 3), res.stderr[-2000:]
    replay = json.loads(res.stdout)
    assert replay["config"]["engine"] == "ctranslate2" and replay["measurement"]["requests"] > 0


def _vllm_installed() -> bool:
    from autotune.engines import get_engine

    return get_engine("vllm").version() is not None


@pytest.fixture(scope="module")
def vllm_study(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not _vllm_installed():
        if os.environ.get("AUTOTUNE_REQUIRE_SERVICES") == "1":
            pytest.fail("vLLM is not installed (AUTOTUNE_REQUIRE_SERVICES=1: .ci/run installs it)")
        pytest.skip("vLLM is not installed: autotune engines install vllm")
    work = tmp_path_factory.mktemp("vllm-study")
    res = run_cli("tune", str(DATA / "tiny-vllm.yaml"), "--export", "best.json", cwd=work, timeout=1500)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-3000:]
    return work


@pytest.mark.timeout(1800)
def test_a_vllm_study_measures_vllm_itself_and_exports_its_exact_launch(vllm_study: Path) -> None:
    trials = _trials(vllm_study, "tiny-vllm")
    measured = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(measured) >= 2, [(t.state, t.user_attrs.get("failure")) for t in trials]
    for t in measured:
        assert t.user_attrs["config"]["engine"] == "vllm"
    doc = json.loads((vllm_study / "best.json").read_text())
    cfg = doc["config"]
    assert cfg["engine"] == "vllm" and doc["metrics"]["output_tokens_per_s"] > 0
    quality = doc["metrics"]["quality"]
    assert quality["top1_agreement"] > 0.9 and "approximation" in quality  # prompt_logprobs: top-k only
    for t in measured:  # vLLM's start-up is recorded apart from the measured window
        timings = t.user_attrs["measurement"]["timings"]
        assert timings.get("engine_start_s", 0) > 0 or timings.get("engine_reused") == 1.0
    res = run_cli("export", "tiny-vllm", "--format", "vllm", "--output", "serve.sh", cwd=vllm_study)
    assert res.returncode == 0, res.stderr
    script = (vllm_study / "serve.sh").read_text()
    assert f"--max-num-seqs {cfg['batch_size']}" in script and "--dtype float32" in script
    assert "vllm.entrypoints" in script and subprocess.run(["sh", "-n", str(vllm_study / "serve.sh")]).returncode == 0


@pytest.mark.timeout(900)
def test_autotune_serve_starts_the_measured_vllm_launch_and_verify_replays_against_it(vllm_study: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "autotune.cli", "serve", "best.json", "--port", str(port)],
        cwd=vllm_study,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        import time

        import httpx

        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(2)
        assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
        res = run_cli("verify", "best.json", "--url", url, "--json", "--tolerance", "0.9", cwd=vllm_study, timeout=300)
        assert res.returncode in (0, 3), res.stderr[-2000:]
        assert json.loads(res.stdout)["measurement"]["requests"] > 0
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert subprocess.run(["pgrep", "-f", "--", f"--port {port}"], capture_output=True).returncode == 1  # nothing left

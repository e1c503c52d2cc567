"""Several worker processes share one study through PostgreSQL; killed workers lose nothing."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import optuna
import pytest

from autotune.store import Repository

from .conftest import ROOT, run_cli

SPEC = ROOT / "tests" / "data" / "workers.yaml"
ENV = {"AUTOTUNE_HEARTBEAT_S": "1", "COLUMNS": "200"}


def start(*args: str, cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "autotune.cli", *args],
        cwd=cwd,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, **ENV},
    )


def polled(url: str, name: str) -> optuna.Study:
    """The study through a storage that closes its connection after each use. Polling every 0.3 s
    with a new pooled storage each time (``storage=url``) left its connections open until garbage
    collection (18 after 30 polls), and a slow first trial ran PostgreSQL out of its 100."""
    from sqlalchemy.pool import NullPool

    return optuna.load_study(
        study_name=name, storage=optuna.storages.RDBStorage(url, engine_kwargs={"poolclass": NullPool})
    )


def wait_for(pred: Callable[[], object], timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if pred():
                return
        except KeyError:  # the study does not exist yet
            pass
        time.sleep(0.3)
    raise AssertionError("timed out waiting")


def counted(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return [
        t
        for t in study.trials
        if t.state.name in ("COMPLETE", "FAIL")
        and "duplicate_of" not in t.user_attrs
        and (t.state.name == "COMPLETE" or "failure" in t.user_attrs)
    ]


def test_sqlite_workers_are_refused(tmp_path: Path) -> None:
    res = run_cli("worker", "x", "--storage", f"sqlite:///{tmp_path}/a.db", cwd=tmp_path)
    assert res.returncode == 2 and "use --storage postgresql" in res.stderr


def test_three_workers_finish_the_budget_exactly(pg_database: str, tmp_path: Path) -> None:
    url = pg_database
    # Create the study with one trial, then start three workers at once so they share the rest.
    res = run_cli("tune", str(SPEC), "--storage", url, "--study", "three", "--trials", "1", cwd=tmp_path, env=ENV)
    assert res.returncode == 0, res.stderr
    procs = [start("worker", "three", "--storage", url, "--trials", "24", cwd=tmp_path) for _ in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=400)
        assert p.returncode == 0, err
    study = optuna.load_study(study_name="three", storage=url)
    assert len(counted(study)) == 24
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    with Repository.open(url) as repo:
        rows = {r.trial_number: r for r in repo.list_trials("three")}
    measured = [t for t in counted(study) if t.user_attrs.get("measurement")]
    assert all(rows[t.number].state == "measured" and rows[t.number].e2e_p95_ms for t in measured)


def test_a_killed_worker_loses_nothing(pg_database: str, tmp_path: Path) -> None:
    url = pg_database
    spec = _long_trials(tmp_path, "kill", trials=6, window_s=2.0)  # a trial runs 2 s: long enough to catch
    victim = start("tune", str(spec), "--storage", url, "--study", "kill", cwd=tmp_path)
    wait_for(lambda: any(t.state.name == "RUNNING" and "worker" in t.user_attrs for t in polled(url, "kill").trials))
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=30)
    running = [t for t in optuna.load_study(study_name="kill", storage=url).trials if t.state.name == "RUNNING"]
    assert len(running) == 1
    res = run_cli("tune", str(spec), "--storage", url, "--study", "kill", cwd=tmp_path, env=ENV)
    assert res.returncode == 0, res.stderr
    study = optuna.load_study(study_name="kill", storage=url)
    assert len(counted(study)) == 6
    killed = next(t for t in study.trials if t.number == running[0].number)
    assert killed.state.name == "FAIL"  # failed by the heartbeat check, then queued again:
    assert any(t.system_attrs.get("failed_trial") == killed.number and t.state.name == "COMPLETE" for t in study.trials)


def _long_trials(tmp_path: Path, name: str, trials: int, window_s: float) -> Path:
    """The worker spec with longer measurement windows, so a trial can be caught while it runs."""
    spec = tmp_path / f"{name}.yaml"
    text = SPEC.read_text().replace("trials: 24", f"trials: {trials}").replace("requests: 24", "requests: 100000")
    spec.write_text(text.replace("max_duration_s: 1.5", f"max_duration_s: {window_s}"))
    return spec


def test_a_worker_killed_while_others_run_loses_nothing(pg_database: str, tmp_path: Path) -> None:
    url = pg_database
    spec = _long_trials(tmp_path, "others", trials=8, window_s=2.0)
    res = run_cli("tune", str(spec), "--storage", url, "--study", "others", "--trials", "1", cwd=tmp_path, env=ENV)
    assert res.returncode == 0, res.stderr
    victim = start("worker", "others", "--storage", url, "--trials", "8", cwd=tmp_path)
    other = start("worker", "others", "--storage", url, "--trials", "8", cwd=tmp_path)

    def victim_running() -> bool:
        trials = polled(url, "others").trials
        return any(
            t.state.name == "RUNNING" and t.user_attrs.get("worker", "").endswith(f":{victim.pid}") for t in trials
        )

    wait_for(victim_running)
    victim.send_signal(signal.SIGKILL)
    victim.communicate(timeout=30)
    _, err = other.communicate(timeout=300)
    assert other.returncode == 0, err
    study = optuna.load_study(study_name="others", storage=url)
    assert len(counted(study)) == 8
    killed = [
        t for t in study.trials if t.user_attrs.get("worker", "").endswith(f":{victim.pid}") and t.state.name == "FAIL"
    ]
    assert len(killed) == 1 and "failure" not in killed[0].user_attrs  # died without a verdict: not counted
    retried = [t for t in study.trials if t.system_attrs.get("failed_trial") == killed[0].number]
    assert retried and retried[0].state.name == "COMPLETE"
    with Repository.open(url) as repo:
        rows = {r.trial_number: r for r in repo.list_trials("others")}
    assert all(rows[t.number].state == "measured" for t in counted(study) if t.user_attrs.get("measurement"))


def _pg_ctl(action: str) -> None:
    version = sorted(os.listdir("/etc/postgresql"))[0]
    subprocess.run(
        ["pg_ctlcluster", "--skip-systemctl-redirect", version, "main", action], check=True, capture_output=True
    )


def test_database_restart_mid_study_is_waited_out(pg_database: str, tmp_path: Path) -> None:
    """Stop PostgreSQL under a running study and start it again: the study waits, then finishes intact."""
    if os.geteuid() != 0 or shutil.which("pg_ctlcluster") is None or not os.path.isdir("/etc/postgresql"):
        pytest.skip("needs root and a local pg_ctlcluster-managed PostgreSQL to stop and start")
    url = pg_database
    spec = _long_trials(tmp_path, "restart", trials=5, window_s=1.0)
    proc = start("tune", str(spec), "--storage", url, "--study", "restart", cwd=tmp_path)
    wait_for(lambda: len(counted(polled(url, "restart"))) >= 1)
    try:
        _pg_ctl("stop")
        time.sleep(6)  # longer than a trial, so the tuner meets the outage
    finally:
        _pg_ctl("start")
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    assert "waiting for the database" in out + err and "Traceback" not in err, (out, err)
    study = optuna.load_study(study_name="restart", storage=url)
    assert len(counted(study)) == 5
    numbers = [t.number for t in study.trials]
    assert len(numbers) == len(set(numbers))
    with Repository.open(url) as repo:
        rows = {r.trial_number: r for r in repo.list_trials("restart")}
    assert all(
        rows[t.number].state == "measured" and rows[t.number].e2e_p95_ms
        for t in counted(study)
        if t.user_attrs.get("measurement")
    )


def test_the_pre_measurement_note_skips_the_wal_flush_and_only_it(pg_database: str) -> None:
    """write_trial_attrs(durable=False) turns synchronous_commit off for its own transaction only."""
    import sqlalchemy as sa

    from autotune.tuner import write_trial_attrs

    storage = optuna.storages.RDBStorage(pg_database)
    statements: list[str] = []
    sa.event.listen(storage.engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    trial = optuna.create_study(storage=storage, study_name="durability").ask()
    write_trial_attrs(trial, {"config": {"batch_size": 4}}, {}, durable=False)
    assert any("synchronous_commit" in s for s in statements)
    statements.clear()
    write_trial_attrs(trial, {"measurement": {"tokens_per_s": 1.0}}, {"e2e": -0.5})
    assert not any("synchronous_commit" in s for s in statements)  # results are always flushed
    frozen = storage.get_trial(trial._trial_id)
    assert frozen.user_attrs == {"config": {"batch_size": 4}, "measurement": {"tokens_per_s": 1.0}}
    with storage.engine.connect() as conn:  # SET LOCAL: nothing lingers on the pooled connection
        assert conn.exec_driver_sql("SHOW synchronous_commit").scalar() == "on"


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_a_trials_attributes_go_in_one_statement_per_table(db: str, pg_database: str, tmp_path: Path) -> None:
    """Each attribute table gets one multi-row upsert (not a select and a write per attribute);
    rewriting a key replaces it, and a finished trial is refused as Optuna refuses it."""
    import sqlalchemy as sa

    from autotune.tuner import write_trial_attrs

    url = pg_database if db == "postgresql" else f"sqlite:///{tmp_path / 'attrs.db'}"
    storage = optuna.storages.RDBStorage(url)
    study = optuna.create_study(storage=storage, study_name=f"attrs-{db}")
    trial = study.ask()
    writes: list[str] = []
    sa.event.listen(
        storage.engine,
        "before_cursor_execute",
        lambda *a: writes.append(a[2]) if a[2].lstrip().upper().startswith("INSERT") else None,
    )
    user = {"config": {"batch_size": 4}, "config_key": "b4", "worker": "w:1", "device": "cpu"}
    write_trial_attrs(trial, user, {"e2e": -0.5, "ttft": 0.25})
    assert len(writes) == 2  # user attributes, then the constraints (system attributes)
    write_trial_attrs(trial, {"config_key": "b8"}, {"e2e": 0.1})
    frozen = storage.get_trial(trial._trial_id)
    assert frozen.user_attrs == {**user, "config_key": "b8"}
    assert frozen.constraints == {"e2e": 0.1, "ttft": 0.25}  # e2e replaced, ttft kept
    study.tell(trial, 1.0)
    with pytest.raises(RuntimeError, match="finished"):
        write_trial_attrs(trial, {"late": 1}, {})


@pytest.mark.parametrize("db", ["sqlite", "postgresql"])
def test_a_trials_parameters_are_stored_in_one_commit(db: str, pg_database: str, tmp_path: Path) -> None:
    """params_in_one_write: what suggest picks is stored in one transaction at the block's end,
    Optuna's distribution check still refuses a clash, and a block that raises stores nothing."""
    import sqlalchemy as sa

    from autotune.tuner import params_in_one_write

    url = pg_database if db == "postgresql" else f"sqlite:///{tmp_path / 'params.db'}"
    storage = optuna.storages.RDBStorage(url)
    study = optuna.create_study(storage=storage, study_name=f"params-{db}")
    events: list[str] = []  # parameter inserts and commits (reads commit too), in order
    sa.event.listen(storage.engine, "commit", lambda conn: events.append("commit"))
    sa.event.listen(
        storage.engine,
        "before_cursor_execute",
        lambda *a: events.append("param") if a[2].lstrip().upper().startswith("INSERT INTO TRIAL_PARAMS") else None,
    )

    def stored(trial: optuna.Trial) -> dict[str, object]:  # read by a storage of its own, not the cache
        return optuna.load_study(study_name=f"params-{db}", storage=url).trials[trial.number].params

    trial = study.ask()
    with params_in_one_write(trial):
        rank = trial.suggest_int("batch_rank", 0, 7)
        precision = trial.suggest_categorical("precision", ["fp32", "bf16"])
        assert trial.params == {"batch_rank": rank, "precision": precision}  # suggest reads its picks back
        assert trial.suggest_int("batch_rank", 0, 7) == rank
        assert "param" not in events
        events.clear()
    assert events == ["param", "param", "commit"]
    assert stored(trial) == {"batch_rank": rank, "precision": precision}
    study.tell(trial, 1.0)

    clash = study.ask()
    with pytest.raises(ValueError, match=r"[Cc]annot set different distribution"), params_in_one_write(clash):
        clash.suggest_categorical("batch_rank", ["a", "b"])
    assert stored(clash) == {} and clash.params == {}

    broken = study.ask()
    with pytest.raises(RuntimeError, match="sampler"), params_in_one_write(broken):
        broken.suggest_int("batch_rank", 0, 7)
        raise RuntimeError("sampler broke")
    assert stored(broken) == {} and broken.params == {}
    with params_in_one_write(broken):  # and the storage is the trial's own again
        broken.suggest_int("batch_rank", 0, 7)
    assert set(stored(broken)) == {"batch_rank"}

"""autotune's own tables: Alembic migrations beside Optuna's tables, and the repository.

Every test runs on a real SQLite file and on a real PostgreSQL database (a throwaway database per
module, its schema emptied before each test). PostgreSQL tests are skipped only when the server
cannot be reached (CI starts one on 127.0.0.1:5432).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import optuna
import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.pool import NullPool

from autotune.errors import StorageError
from autotune.measure import Measurement, distribution
from autotune.store import (
    VERSION_TABLE,
    Repository,
    alembic_config,
    check_schema,
    current_revision,
    downgrade,
    head_revision,
    histogram,
    make_engine,
    measurement_dict,
    metadata,
    migration_options,
    upgrade,
)
from autotune.store import migrate as migrate_mod

ROOT = Path(__file__).resolve().parents[1]
OUR_TABLES = {"autotune_studies", "autotune_trials", "autotune_exports", "autotune_references"}

optuna.logging.set_verbosity(optuna.logging.ERROR)


# -- databases ------------------------------------------------------------------------------------


def _reset_pg(url: str) -> None:
    """Empty the module's database between tests (Optuna's tables included)."""
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT", poolclass=NullPool)
    with engine.connect() as conn:
        conn.exec_driver_sql("DROP SCHEMA public CASCADE")
        conn.exec_driver_sql("CREATE SCHEMA public")
    engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'autotune.db'}"
    pg_url: str = request.getfixturevalue("pg_database")
    _reset_pg(pg_url)
    return pg_url


def _tables(url: str) -> set[str]:
    engine = make_engine(url, poolclass=NullPool)
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def _rows(url: str, sql: str) -> list[tuple[Any, ...]]:
    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            return [tuple(r) for r in conn.exec_driver_sql(sql)]
    finally:
        engine.dispose()


@contextmanager
def _optuna_storage(url: str) -> Iterator[optuna.storages.RDBStorage]:
    """Optuna's own storage on ``url``, its connections closed afterwards."""
    storage = optuna.storages.RDBStorage(url)
    try:
        yield storage
    finally:
        storage.engine.dispose()


def _optuna_study(url: str, name: str, n_trials: int = 2) -> None:
    with _optuna_storage(url) as storage:
        study = optuna.create_study(storage=storage, study_name=name)
        study.optimize(lambda t: t.suggest_float("x", 0.0, 1.0), n_trials=n_trials)


def _optuna_trials(url: str, name: str) -> int:
    """How many trials ``optuna.load_study`` sees (it also checks Optuna's schema version)."""
    with _optuna_storage(url) as storage:
        return len(optuna.load_study(study_name=name, storage=storage).trials)


# -- migrations -----------------------------------------------------------------------------------


def test_upgrade_and_downgrade_beside_optuna(url: str) -> None:
    _optuna_study(url, "before")
    optuna_tables = _tables(url)
    optuna_rev = _rows(url, "SELECT version_num FROM alembic_version")
    assert "trials" in optuna_tables and optuna_rev
    assert current_revision(url) is None

    upgrade(url)
    assert _tables(url) == optuna_tables | OUR_TABLES | {VERSION_TABLE}
    assert _rows(url, f"SELECT version_num FROM {VERSION_TABLE}") == [(head_revision(),)]
    assert _rows(url, "SELECT version_num FROM alembic_version") == optuna_rev
    upgrade(url)  # already at head: nothing to do
    assert current_revision(url) == head_revision()

    _optuna_study(url, "after", n_trials=1)
    assert _optuna_trials(url, "before") == 2
    assert _optuna_trials(url, "after") == 1

    downgrade(url, "base")
    assert _tables(url) == optuna_tables | {VERSION_TABLE}  # Alembic keeps its (now empty) version table
    assert _rows(url, f"SELECT version_num FROM {VERSION_TABLE}") == []
    assert current_revision(url) is None
    assert _rows(url, "SELECT version_num FROM alembic_version") == optuna_rev
    assert _optuna_trials(url, "before") == 2
    assert _optuna_trials(url, "after") == 1

    upgrade(url)  # and back up again
    assert _tables(url) >= OUR_TABLES


def test_optuna_dashboard_reads_the_database_after_our_migrations(url: str) -> None:
    import io
    import json
    from wsgiref.util import setup_testing_defaults

    optuna_dashboard = pytest.importorskip("optuna_dashboard")
    _optuna_study(url, "shown", n_trials=3)
    upgrade(url)
    with _optuna_storage(url) as storage:
        app = optuna_dashboard.wsgi(storage)

        def get(path: str) -> tuple[str, Any]:
            environ: dict[str, Any] = {"PATH_INFO": path, "REQUEST_METHOD": "GET", "wsgi.input": io.BytesIO()}
            setup_testing_defaults(environ)
            status: list[str] = []
            body = b"".join(app(environ, lambda s, h, *a: status.append(s)))
            return status[0], json.loads(body)

        status, studies = get("/api/studies")
        assert status.startswith("200") and [s["study_name"] for s in studies["study_summaries"]] == ["shown"]
        status, detail = get(f"/api/studies/{studies['study_summaries'][0]['study_id']}")
        assert status.startswith("200") and len(detail["trials"]) == 3


def test_step_upgrade_from_the_first_revision_keeps_rows(url: str) -> None:
    from autotune.store.models import Study

    upgrade(url, "0001_autotune_initial")
    engine = sa.create_engine(url, poolclass=NullPool)
    with engine.begin() as conn:  # a row written by the older autotune
        row = {"name": "old", "spec": {}, "hardware": {}, "fingerprint": "f", "model_ref": "preset:x"}
        conn.execute(sa.insert(Study).values(**row))
    engine.dispose()
    with pytest.raises(StorageError, match="autotune db upgrade"):
        Repository.open(url)  # the newer code refuses the older schema, saying what to run
    upgrade(url)
    assert current_revision(url) == head_revision()
    with Repository.open(url) as repo:
        assert repo.get_study("old") is not None
    downgrade(url, "0001_autotune_initial")
    assert current_revision(url) == "0001_autotune_initial"


def test_autogenerate_finds_no_diff_and_ignores_optuna(url: str) -> None:
    _optuna_study(url, "neighbour", n_trials=1)
    upgrade(url)
    engine = make_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts=migration_options())
            assert compare_metadata(ctx, metadata) == []
            # Control: without the hooks, Optuna's tables would be proposed for removal.
            bare = MigrationContext.configure(conn, opts={"version_table": VERSION_TABLE})
            removed = {d[1].name for d in compare_metadata(bare, metadata) if d[0] == "remove_table"}
            assert {"studies", "trials", "alembic_version"} <= removed
        downgrade(url, "base")
        with engine.connect() as conn:  # and the hooks do not hide autotune's own tables
            ctx = MigrationContext.configure(conn, opts=migration_options())
            added = {d[1].name for d in compare_metadata(ctx, metadata) if d[0] == "add_table"}
            assert added == OUR_TABLES
    finally:
        engine.dispose()


def test_concurrent_upgrades_wait_for_each_other(url: str) -> None:
    """Workers starting at once on a fresh database: one process migrates, the others find it done."""
    code = "import sys; from autotune.store import upgrade; upgrade(sys.argv[1])"
    procs = [
        subprocess.Popen([sys.executable, "-c", code, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
    assert _rows(url, f"SELECT version_num FROM {VERSION_TABLE}") == [(head_revision(),)]


def test_check_schema_asks_for_upgrade_then_passes(url: str) -> None:
    _optuna_study(url, "neighbour", n_trials=1)  # Optuna's tables alone are not autotune's schema
    with pytest.raises(StorageError, match=r"at revision base .* run `autotune db upgrade --storage "):
        check_schema(url)
    upgrade(url)
    assert check_schema(url) == head_revision()
    engine = make_engine(url, poolclass=NullPool)
    with engine.begin() as conn:
        conn.exec_driver_sql(f"UPDATE {VERSION_TABLE} SET version_num = '9999_from_the_future'")
    engine.dispose()
    with pytest.raises(StorageError, match="9999_from_the_future, newer than"):
        check_schema(url)
    with pytest.raises(StorageError, match="upgrade"):
        Repository.open(url)


def test_check_schema_does_not_create_a_missing_sqlite_file(tmp_path: Path) -> None:
    db = tmp_path / "absent.db"
    with pytest.raises(StorageError, match="run `autotune db upgrade"):
        check_schema(f"sqlite:///{db}")
    assert not db.exists()


def test_sqlite_engine_is_wal_with_busy_timeout(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'wal.db'}")
    with engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 30_000
        assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
    engine.dispose()


def test_storage_errors_are_clear(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(StorageError, match="does not exist"):
        make_engine(f"sqlite:///{tmp_path / 'no' / 'such' / 'dir.db'}")
    monkeypatch.setattr(migrate_mod, "ALEMBIC_DIR", tmp_path / "alembic")
    with pytest.raises(StorageError, match=r"migrations folder .* is missing"):
        alembic_config("sqlite://")


def test_alembic_command_line_uses_our_version_table(tmp_path: Path) -> None:
    """The developer path (alembic.ini at the repository root): upgrade, then `check` finds nothing."""
    db_url = f"sqlite:///{tmp_path / 'cli.db'}"
    for args in (["upgrade", "head"], ["check"]):
        proc = subprocess.run(
            [sys.executable, "-m", "alembic", "-x", f"url={db_url}", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
    assert current_revision(db_url) == head_revision()


# -- repository -----------------------------------------------------------------------------------


def _measurement(n_samples: int = 137) -> Measurement:
    samples = [40.0 + (i * 7.3) % 90.0 for i in range(n_samples)]
    return Measurement(
        output_tokens_per_s=812.5,
        requests_per_s=25.4,
        requests=n_samples,
        output_tokens=n_samples * 32,
        duration_s=5.39,
        e2e_ms=distribution(samples),
        ttft_ms=distribution([s / 4 for s in samples]),
        tpot_ms=distribution([s / 32 for s in samples]),
        queue_ms=distribution([s / 10 for s in samples]),
        mean_batch_rows=7.5,
        peak_memory_mb=1234.5,
        memory_kind="cuda_max_allocated",
        timings={"load_s": 1.25, "quantize_s": 0.5, "compile_s": 0.0, "warmup_s": 0.75},
        e2e_samples_ms=samples,
        stopped_by="requests",
    )


def _repo(url: str) -> Repository:
    upgrade(url)
    repo = Repository.open(url)
    repo.upsert_study(
        "s1",
        spec={"name": "s1", "slo": {"e2e_ms": {"p95": 2000}}},
        hardware={"device": "cpu", "device_name": "Test CPU"},
        fingerprint="0123456789abcdef",
        model_ref="preset:llama-tiny",
        optuna_study_id=1,
    )
    return repo


def test_trial_round_trip_and_idempotent_rerecord(url: str) -> None:
    m = _measurement()
    with _repo(url) as repo:
        kwargs: dict[str, Any] = dict(
            config={"batch_size": 8, "precision": "bf16"},
            config_key="abc123def456",
            state="measured",
            feasible=True,
            measurement=m.to_dict(),
            constraints=[-0.25],
            device="cpu",
            started_at=1_700_000_000.0,
            finished_at=datetime(2023, 11, 14, 22, 14, tzinfo=timezone.utc),
        )
        first = repo.record_trial("s1", 0, **kwargs)
        again = repo.record_trial("s1", 0, **kwargs)  # a retried write
        assert again == first
        [row] = repo.list_trials("s1")

        assert row.config == {"batch_size": 8, "precision": "bf16"} and row.feasible is True
        assert row.output_tokens_per_s == 812.5 and row.requests_per_s == 25.4
        for metric in ("e2e", "ttft", "tpot", "queue"):
            for p in ("p50", "p90", "p95", "p99"):
                assert getattr(row, f"{metric}_{p}_ms") == getattr(m, f"{metric}_ms")[p]
        assert row.peak_memory_mb == 1234.5 and row.memory_kind == "cuda_max_allocated"
        assert row.timings == m.timings
        hist = row.latency_histogram
        assert hist is not None and len(hist["edges"]) == 21 and len(hist["counts"]) == 20
        assert sum(hist["counts"]) == 137
        assert hist["edges"][0] == min(m.e2e_samples_ms) and hist["edges"][-1] == max(m.e2e_samples_ms)
        assert row.e2e_samples == m.e2e_samples_ms
        assert row.started_at == datetime.fromtimestamp(1_700_000_000, timezone.utc)
        assert row.finished_at == datetime(2023, 11, 14, 22, 14, tzinfo=timezone.utc)
        assert row.worker is not None and row.worker.endswith(f":{os.getpid()}")
        assert measurement_dict(row) == m.to_dict()
        assert Measurement.from_dict(measurement_dict(row) or {}) == m

        # A later write of the same trial replaces it, still one row.
        repo.record_trial("s1", 0, **{**kwargs, "state": "infeasible", "feasible": False})
        [row] = repo.list_trials("s1")
        assert (row.id, row.state, row.feasible) == (first, "infeasible", False)


def test_failed_trial_keeps_reason_and_log_tail(url: str) -> None:
    m = _measurement(3).to_dict()
    m["ttft_ms"] = {k: math.nan for k in m["ttft_ms"]}  # nothing measured: NaN
    m["timings"] = {"load_s": 1.5, "compile_s": math.nan, "warmup_s": math.inf}  # and in a JSON column
    with _repo(url) as repo:
        repo.record_trial(
            "s1",
            4,
            config={"batch_size": 64},
            config_key="k64",
            state="failed",
            measurement=m,
            failure={"kind": "crash", "reason": "SIGSEGV in the trial process", "log": "x" * 5000 + "END"},
            worker="gpu-box:4242",
        )
        repo.record_trial("s1", 5, config={"batch_size": 1}, config_key="k1", state="rejected")
        failed, rejected = repo.list_trials("s1")
        assert failed.failure_kind == "crash" and failed.failure_reason == "SIGSEGV in the trial process"
        assert failed.log_excerpt is not None and len(failed.log_excerpt) == 4000 and failed.log_excerpt.endswith("END")
        assert failed.worker == "gpu-box:4242" and failed.feasible is None
        assert failed.ttft_p95_ms is None  # NaN is stored as NULL on both backends
        back = measurement_dict(failed)
        assert back is not None and math.isnan(back["ttft_ms"]["p95"])
        assert failed.timings == {"load_s": 1.5, "compile_s": None, "warmup_s": None}  # strict JSON
        assert rejected.output_tokens_per_s is None and measurement_dict(rejected) is None
        with pytest.raises(ValueError, match="allowed"):
            repo.record_trial("s1", 6, config={}, config_key="k", state="exploded")
        with pytest.raises(StorageError, match="not in autotune's tables"):
            repo.record_trial("nope", 0, config={}, config_key="k", state="measured")


def test_study_upsert_and_status(url: str) -> None:
    with _repo(url) as repo:
        created = repo.get_study("s1")
        assert created is not None and created.status == "running" and created.finished_at is None
        done = repo.set_study_status("s1", "finished")
        assert done.finished_at is not None and done.finished_at.tzinfo is not None
        resumed = repo.upsert_study(
            "s1", spec={"name": "s1", "budget": 32}, hardware={}, fingerprint="f", model_ref="m"
        )
        assert resumed.id == created.id and resumed.status == "running" and resumed.finished_at is None
        assert resumed.optuna_study_id == 1  # kept when not given
        assert repo.get_study("missing") is None
        assert [s.name for s in repo.list_studies()] == ["s1"]


def test_exports_are_versioned_per_study(url: str) -> None:
    with _repo(url) as repo:
        assert repo.latest_export("s1") is None
        versions = [repo.record_export("s1", 3, {"schema_version": 1, "n": i}) for i in range(3)]
        assert versions == [1, 2, 3]
        latest = repo.latest_export("s1")
        assert latest is not None and latest.version == 3 and latest.document == {"schema_version": 1, "n": 2}
        second = repo.get_export("s1", 2)
        assert second is not None and second.document["n"] == 1 and second.format == "json"
        repo.upsert_study("s2", spec={}, hardware={}, fingerprint="f", model_ref="m")
        assert repo.record_export("s2", 0, {"n": 0}) == 1


def test_quality_reference_is_stored_once_per_key_and_first_writer_wins(url: str) -> None:
    payload = bytes(range(256)) * 40  # binary, not text: the column must keep every byte
    with _repo(url) as repo, Repository.open(url) as other:
        assert repo.get_reference("s1", "k") is None
        assert repo.save_reference("s1", "k", payload, perplexity=12.5) == payload
        assert other.save_reference("s1", "k", b"computed again by a second worker") == payload
        assert other.get_reference("s1", "k") == payload and repo.get_reference("s1", "other") is None


def test_concurrent_writers_neither_duplicate_nor_collide(url: str) -> None:
    """Separate engines (as separate workers would have) racing on exports and on one trial."""
    _repo(url).close()
    repos = [Repository.open(url) for _ in range(4)]
    versions: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()

    def work(repo: Repository) -> None:
        try:
            for _ in range(5):
                v = repo.record_export("s1", 0, {"ok": True})
                with lock:
                    versions.append(v)
            repo.record_trial("s1", 9, config={}, config_key="k", state="measured")
        except BaseException as err:  # surfaced below
            errors.append(err)

    threads = [threading.Thread(target=work, args=(r,)) for r in repos]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert sorted(versions) == list(range(1, 21))
    assert [t.trial_number for t in repos[0].list_trials("s1")] == [9]
    for r in repos:
        r.close()


def test_histogram() -> None:
    h = histogram([1.0, 2.0, 3.0, 4.0, 5.0], bins=4)
    assert h == {"edges": [1.0, 2.0, 3.0, 4.0, 5.0], "counts": [1, 1, 1, 2]}
    assert histogram([]) == {"edges": [], "counts": []}
    assert histogram([7.0, 7.0, 7.0]) == {"edges": [7.0, 7.0], "counts": [3]}
    assert sum(histogram([float(i % 13) for i in range(1000)], bins=20)["counts"]) == 1000


def test_store_stays_torch_free() -> None:
    code = "import sys, autotune.store; assert 'torch' not in sys.modules, 'store imported torch'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_migrations_ship_inside_the_package() -> None:
    """Wheels carry ``autotune/data/alembic`` (a link to ``alembic/`` in the source tree)."""
    import tomllib

    import autotune

    packaged = Path(autotune.__file__).parent / "data" / "alembic"
    assert (packaged / "env.py").is_file() and list((packaged / "versions").glob("0002_*.py"))
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["autotune"]
    assert {"data/alembic/*", "data/alembic/versions/*"} <= set(data)

"""Shared fixtures. Everything runs offline, on the CPU, on the tiny preset."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from autotune.hardware import Hardware

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# The suite's own device locks: a study running beside the tests on this machine neither waits for
# the tests' trials nor makes them wait (tests/test_devicelock.py sets its own folder per test).
os.environ.setdefault("AUTOTUNE_LOCK_DIR", tempfile.mkdtemp(prefix="autotune-test-locks-"))
# A trial disturbed by other processes' load waits this long for it to pass (20 s in a study): this
# machine is shared while the suite runs, and a real study's trial line says when it waited.
os.environ.setdefault("AUTOTUNE_QUIET_WAIT_S", "2")

ROOT = Path(__file__).resolve().parents[1]
#: Set by .ci/run, which starts PostgreSQL and installs Chromium: a missing service is then a failure.
REQUIRE_SERVICES = os.environ.get("AUTOTUNE_REQUIRE_SERVICES") == "1"


def skip_unless_required(reason: str) -> None:
    """Skip (saying why) on a machine without the service; fail where CI promised to provide it."""
    if REQUIRE_SERVICES:
        pytest.fail(f"{reason} (AUTOTUNE_REQUIRE_SERVICES=1: .ci/run should have provided it)")
    pytest.skip(reason)


PG_ADMIN_URL = os.environ.get("AUTOTUNE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
TINY_SPEC = ROOT / "tests" / "data" / "tiny.yaml"


def free_port() -> int:
    """A TCP port free on loopback just now (for a server a test starts)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_hw(
    device_type: str = "cpu",
    cc: tuple[int, int] | None = None,
    memory_mb: int = 24_000,
    torchao: str | None = "0.18.0",
    compiler: bool = True,
) -> Hardware:
    """A synthetic hardware description for rule tests (no probing)."""
    return Hardware(
        device="cuda:0" if device_type == "cuda" else "cpu",
        device_type=device_type,
        device_name="NVIDIA H100 80GB HBM3" if device_type == "cuda" else "Test CPU",
        device_memory_mb=memory_mb,
        compute_capability=cc,
        cpu_model="Test CPU",
        cpu_cores=2,
        host_memory_mb=24_000,
        has_c_compiler=compiler,
        python_version="3.11",
        torch_version="2.13.0",
        transformers_version="5.0",
        torchao_version=torchao,
        cuda_version="12.8" if device_type == "cuda" else None,
    )


@pytest.fixture
def cpu_hw() -> Hardware:
    return make_hw()


def four_config_grid(folder: Path) -> Path:
    """The tiny spec shrunk to a 4-config grid (batch 1/4 x 2 queue delays, unquantized) with 0.5-s
    windows, written to ``folder``/grid.yaml: a landscape recording in seconds."""
    text = TINY_SPEC.read_text().replace("batch_size: [1, 4, 8]", "batch_size: [1, 4]")
    text = text.replace("quantization: [none, int8-dynamic]", "quantization: [none]")
    spec = folder / "grid.yaml"
    spec.write_text(text.replace("max_duration_s: 1.5", "max_duration_s: 0.5"))
    return spec


def run_cli(
    *args: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """Run the real ``autotune`` command line as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "autotune.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


@pytest.fixture(scope="module")
def pg_database() -> Iterator[str]:
    """A fresh PostgreSQL database for this module, dropped at the end."""
    try:
        admin = sa.create_engine(
            PG_ADMIN_URL, isolation_level="AUTOCOMMIT", poolclass=NullPool, connect_args={"connect_timeout": 3}
        )
        with admin.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
    except ModuleNotFoundError as err:
        skip_unless_required(f"PostgreSQL driver missing ({err.name}): pip install 'psycopg[binary]'")
    except sa.exc.OperationalError as err:
        first = str(err.orig).strip().splitlines()[0] if err.orig else str(err)
        skip_unless_required(f"PostgreSQL not reachable at {make_url(PG_ADMIN_URL).render_as_string()}: {first}")
    name = f"autotune_test_{uuid.uuid4().hex[:12]}"
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()

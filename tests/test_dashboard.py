"""The web dashboard over a database filled by a real ``autotune tune`` run: JSON API, pages, escaping,
read-only access, bad input, the ``autotune dashboard`` command, schemathesis and PostgreSQL.

Browser tests (headless Chromium driven by Playwright) live in test_dashboard_browser.py.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import os
import sqlite3
import subprocess
import sys
import tarfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import quote

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings

from .conftest import ROOT, TINY_SPEC, free_port, run_cli

XSS = "<script>alert(1)</script>"
XSS_Q = quote(XSS, safe="")


def load_bench() -> ModuleType:
    """bench/dashboard_render.py (not a package): its synthetic-study filler seeds edge cases."""
    spec = importlib.util.spec_from_file_location("dashboard_render", ROOT / "bench" / "dashboard_render.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_BUILT: dict[str, Any] = {}


@pytest.fixture(scope="session")
def dash_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A workdir with studies/autotune.db: a real 4-trial tune of the tiny preset ("tiny"), plus a small
    synthetic study whose name is a script tag and whose failure reasons carry HTML.

    Built once per session even though the browser tests' module imports this fixture (which makes
    pytest register a second, module-local copy of it).
    """
    if "work" not in _BUILT:
        _BUILT["work"] = build_dash_db(tmp_path_factory)
    return _BUILT["work"]


def watch(proc: subprocess.Popen[str], url: str) -> list[tuple[str, int, dict[str, object] | None]]:
    """Poll the study's status and page while ``proc`` (a tune) runs: (path, HTTP status, JSON or None)."""
    from autotune.dashboard import create_app
    from autotune.errors import StorageError

    seen: list[tuple[str, int, dict[str, object] | None]] = []
    client = None
    while proc.poll() is None:
        time.sleep(0.3)
        if client is None:
            try:  # the tune creates the database and its tables first
                client = TestClient(create_app(url), raise_server_exceptions=False)
            except StorageError:
                continue
        res = client.get("/api/studies/tiny/status")
        seen.append(("status", res.status_code, res.json()))
        page = client.get("/studies/tiny")
        seen.append(("page", page.status_code, None))
    return seen


def build_dash_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("dash")
    url = f"sqlite:///{work}/studies/autotune.db"
    # Unquantized only: every trial after the first changes runtime knobs alone, so the pages show
    # reused engines whatever configs the sampler's random start draws.
    spec = work / "tiny.yaml"
    spec.write_text(TINY_SPEC.read_text().replace("quantization: [none, int8-dynamic]", "quantization: [none]"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "autotune.cli", "tune", str(spec)],
        cwd=work,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "COLUMNS": "200"},
    )
    _BUILT["seen"] = watch(proc, url)  # the dashboard reads while the tune writes
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err
    bench = load_bench()
    bench.fill(url, XSS, 30, seed=1)
    from autotune.store import Repository

    with Repository.open(url) as repo:  # a failure reason with markup in it
        row = repo.list_trials(XSS)[0]
        repo.record_trial(
            XSS,
            row.trial_number,
            config=row.config,
            config_key=row.config_key,
            state="failed",
            failure={"kind": "crash", "reason": '<img src=x onerror="alert(2)">', "log": "<b>log</b>"},
        )
    return work


@pytest.fixture(scope="session")
def url(dash_db: Path) -> str:
    return f"sqlite:///{dash_db}/studies/autotune.db"


@pytest.fixture(scope="session")
def client(url: str) -> Iterator[TestClient]:
    from autotune.dashboard import create_app

    with TestClient(create_app(url), raise_server_exceptions=False) as c:
        yield c


def digest(db: Path) -> str:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as con:
        return hashlib.sha256("\n".join(con.iterdump()).encode()).hexdigest()


# -- API -------------------------------------------------------------------------------------------
def test_reads_while_a_study_writes(dash_db: Path) -> None:
    """The dashboard polled the real tune as it ran: never a 5xx, the count only grew, 'running' seen."""
    seen = _BUILT["seen"]
    assert seen, "the tune finished before the dashboard could open its database"
    assert all(code in (200, 404) for _, code, _ in seen), seen  # 404 until the study row exists
    counts = [int(str(body["trials_done"])) for what, code, body in seen if what == "status" and code == 200 and body]
    assert counts == sorted(counts)
    assert any(body and body["status"] == "running" for what, code, body in seen if what == "status" and code == 200)


def test_studies_list(client: TestClient) -> None:
    studies = {s["name"]: s for s in client.get("/api/studies").json()}
    tiny = studies["tiny"]
    assert tiny["model"] == "preset:llama-tiny" and tiny["status"] == "finished"
    assert tiny["trials_done"] == 4 and tiny["budget_trials"] == 4
    by_state = tiny["trials_by_state"]  # the budget counts measured/infeasible/failed, not repeats or rejections
    assert tiny["trials_spent"] == sum(by_state.get(k, 0) for k in ("measured", "infeasible", "failed")) <= 4
    assert tiny["slo"] == ["p95 e2e_ms <= 2000"]
    assert tiny["best_output_tokens_per_s"] > 0 and "cores" in tiny["hardware"]
    assert studies[XSS]["trials_failed"] >= 1


def test_best_download_equals_cli(client: TestClient, dash_db: Path, url: str) -> None:
    res = client.get("/api/studies/tiny/best", params={"format": "json", "download": "true"})
    assert res.status_code == 200 and "attachment" in res.headers["content-disposition"]
    cli = run_cli("best", "tiny", "--json", "--storage", url, cwd=dash_db)
    assert cli.returncode == 0, cli.stderr
    ours, theirs = res.json(), json.loads(cli.stdout)
    ours.pop("exported_at"), theirs.pop("exported_at")  # a timestamp of when each was built
    assert ours == theirs
    detail = client.get("/api/studies/tiny").json()
    assert detail["best_trial"] == ours["trial"] and detail["pareto_latency"] == "e2e_ms.p95"
    assert client.get("/api/studies/tiny/best", params={"format": "yaml"}).status_code == 422
    for fmt, filename in (("vllm", "best-tiny-vllm.sh"), ("tgi", "best-tiny-tgi.env"), ("triton", "config.pbtxt")):
        res = client.get("/api/studies/tiny/best", params={"format": fmt, "download": fmt != "triton"})
        assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain")
        if fmt != "triton":
            assert f'filename="{filename}"' in res.headers["content-disposition"]
        assert f"study: tiny  trial: {ours['trial']}" in res.text
        assert "PLACEHOLDER" in res.text or "written by autotune as this checkpoint folder" in res.text
    res = client.get("/api/studies/tiny/best", params={"format": "triton", "download": "true"})
    assert res.headers["content-type"] == "application/gzip"  # the whole repository entry, not one file
    assert 'filename="tiny-triton-repository.tar.gz"' in res.headers["content-disposition"]
    with tarfile.open(fileobj=io.BytesIO(res.content)) as tar:
        names = tar.getnames()
    assert any(n.endswith("/config.pbtxt") for n in names) and any(n.endswith("/1/model.py") for n in names)


# Older autotune versions took any name; a newline cannot reach a route (Starlette's paths stop at one),
# a carriage return, an escape sequence and shell syntax can.
HOSTILE = 'cr\rtouch PWNED;#$(touch PWNED2)`touch PWNED3`"quote\x1b[2J\u2028x'


def test_hostile_study_names_cannot_inject_into_downloads(dash_db: Path, url: str, tmp_path: Path) -> None:
    """A study named by an older autotune (or another tool) with a newline and shell syntax: every download
    keeps it inside its comments and values; running the vLLM script creates no file."""
    import stat

    from autotune.dashboard import create_app

    load_bench().fill(url, HOSTILE, 6, seed=4)
    with TestClient(create_app(url), raise_server_exceptions=False) as c:
        base = f"/api/studies/{quote(HOSTILE, safe='')}/best"
        files = {
            fmt: c.get(base, params={"format": fmt, "download": "true"}) for fmt in ("json", "vllm", "tgi", "triton")
        }
    for fmt, res in files.items():
        assert res.status_code == 200, (fmt, res.text)
        disposition = res.headers["content-disposition"]
        assert "\n" not in disposition and disposition.count('"') == 2  # a safe file name
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub = bin_dir / "vllm"
    stub.write_text("#!/bin/sh\necho vllm-called\n")
    stub.chmod(stub.stat().st_mode | stat.S_IEXEC)
    script = tmp_path / "run.sh"
    script.write_text(files["vllm"].text)
    run = subprocess.run(
        ["sh", str(script)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        env={"PATH": f"{bin_dir}:/usr/bin:/bin", "MODEL": "org/name"},
    )
    assert run.returncode == 0 and "vllm-called" in run.stdout, run.stderr
    assert not any((tmp_path / f).exists() for f in ("PWNED", "PWNED2", "PWNED3"))
    keys = [line.split("=", 1)[0] for line in files["tgi"].text.splitlines() if line and not line.startswith("#")]
    assert keys and all(k.isupper() and k.replace("_", "").isalnum() for k in keys) and "touch PWNED" not in keys
    with tarfile.open(fileobj=io.BytesIO(files["triton"].content)) as tar:
        pbtxt = next(tar.extractfile(m) for m in tar.getmembers() if m.name.endswith("config.pbtxt"))
        assert pbtxt is not None
        text = pbtxt.read().decode()
    assert all(line.startswith("#") or "touch PWNED" not in line for line in text.splitlines())


def test_the_study_page_says_how_much_time_went_to_measuring_as_the_cli_does(client: TestClient, url: str) -> None:
    import html

    import optuna

    from autotune.tuner import trial_overhead

    want = trial_overhead(optuna.load_study(study_name="tiny", storage=url).get_trials())
    assert want is not None and want["trials"] >= 1
    page = html.unescape(client.get("/studies/tiny").text)
    shares = f"median {100 * want['median']:.0f}% of a trial (max {100 * want['max']:.0f}%)"
    assert f"{shares}, {100 * want['total']:.0f}% of all measured trials' time" in page
    assert f"{want['reused']:.0f} of {want['trials']:.0f} trials reused a built engine" in page


def test_trials_pages_sort_and_filter(client: TestClient) -> None:
    page = client.get(f"/api/studies/{XSS_Q}/trials", params={"limit": 5, "offset": 2}).json()
    assert page["total"] == 30 and [t["number"] for t in page["items"]] == [2, 3, 4, 5, 6]
    by_tps = client.get(
        f"/api/studies/{XSS_Q}/trials", params={"sort": "output_tokens_per_s", "order": "desc", "limit": 500}
    ).json()["items"]
    values = [t["output_tokens_per_s"] for t in by_tps if t["output_tokens_per_s"] is not None]
    assert values == sorted(values, reverse=True) and by_tps[-1]["output_tokens_per_s"] is None  # missing last
    failed = client.get(f"/api/studies/{XSS_Q}/trials", params={"state": "failed"}).json()["items"]
    assert failed and all(t["state"] == "failed" and t["failure_reason"] for t in failed)
    feasible = client.get("/api/studies/tiny/trials", params={"feasible": "true"}).json()["items"]
    assert feasible and all(t["feasible"] for t in feasible)


def test_trial_detail(client: TestClient) -> None:
    t = client.get("/api/studies/tiny/trials/0").json()
    assert t["number"] == 0 and t["output_tokens_per_s"] > 0
    assert set(t["latency"]) == {"e2e", "ttft", "tpot", "queue"} and t["latency"]["e2e"]["p95"] > 0
    assert sum(t["latency_histogram"]["counts"]) == len(t["e2e_samples_ms"]) > 0
    assert "load_s" in t["timings"] and "warmup_s" in t["timings"]
    page = client.get("/studies/tiny/trials/0").text  # where each request's time went, with the trial
    assert 'id="breakdown"' in page and all(f"<th>{k}</th>" in page for k in ("queue", "prefill", "decode"))
    reused = [n for n in range(4) if client.get(f"/api/studies/tiny/trials/{n}").json()["timings"].get("engine_reused")]
    assert reused  # the tiny study changes only runtime knobs between trials
    for n in reused:  # a flag, not a duration: said in the header, kept out of the seconds table
        html = client.get(f"/studies/tiny/trials/{n}").text
        assert "previous trial's built model" in html and "<th>engine_reused</th>" not in html


def test_pareto_front_is_non_dominated(client: TestClient) -> None:
    front = client.get(f"/api/studies/{XSS_Q}/pareto").json()
    assert front["latency"] == "e2e_ms.p95" and front["slo_limit_ms"] == 1500
    pts = front["points"]
    assert pts and [p["latency_ms"] for p in pts] == sorted(p["latency_ms"] for p in pts)
    assert [p["output_tokens_per_s"] for p in pts] == sorted(p["output_tokens_per_s"] for p in pts)
    other = client.get(f"/api/studies/{XSS_Q}/pareto", params={"latency": "ttft_ms.p99"}).json()
    assert other["latency"] == "ttft_ms.p99" and other["slo_limit_ms"] is None


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/api/studies/nope", 404),
        ("/api/studies/nope/trials", 404),
        ("/api/studies/nope/best", 404),
        ("/api/studies/tiny/trials/99999", 404),
        ("/api/studies/tiny/trials/-1", 422),
        ("/api/studies/tiny/trials/abc", 422),
        ("/api/studies/tiny/trials?limit=100000000", 422),
        ("/api/studies/tiny/trials?limit=0", 422),
        ("/api/studies/tiny/trials?sort=__class__", 422),
        ("/api/studies/tiny/pareto?latency=e2e_ms.p42", 422),
        ("/api/nothing", 404),
    ],
)
def test_errors_are_one_line_json(client: TestClient, path: str, status: int) -> None:
    res = client.get(path)
    assert res.status_code == status and res.headers["content-type"].startswith("application/json")
    body = res.json()
    assert set(body) == {"error"} and "Traceback" not in body["error"]


def test_unexpected_errors_are_json_without_traceback(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import sqlalchemy as sa

    from autotune.dashboard import create_app

    app = create_app(url)
    with TestClient(app, raise_server_exceptions=False) as c:
        monkeypatch.setattr(app.state.store, "summary", lambda name: 1 / 0)
        res = c.get("/api/studies/tiny")
        assert res.status_code == 500 and res.json() == {"error": "internal error (ZeroDivisionError)"}

        def down(name: str, **kwargs: object) -> None:
            raise sa.exc.OperationalError("SELECT", {}, Exception("database is locked"))

        monkeypatch.setattr(app.state.store, "study", down)
        res = c.get("/studies/tiny")
        assert res.status_code == 503 and res.json() == {"error": "storage unavailable: database is locked"}


def test_unknown_pages_are_html_404(client: TestClient) -> None:
    for path in ("/studies/nope", "/studies/tiny/trials/999"):
        res = client.get(path)
        assert res.status_code == 404 and "text/html" in res.headers["content-type"]


def test_no_endpoint_writes(client: TestClient, dash_db: Path) -> None:
    db = dash_db / "studies" / "autotune.db"
    before = digest(db)
    for path in ("/", "/studies/tiny", "/studies/tiny/trials/1", "/compare?study=tiny", "/api/studies",
                 "/api/studies/tiny/best", "/api/studies/tiny/trials", "/api/studies/tiny/pareto"):  # fmt: skip
        assert client.get(path).status_code == 200, path
    for method in ("post", "put", "delete", "patch"):
        assert getattr(client, method)("/api/studies/tiny").status_code == 405
    assert digest(db) == before
    import sqlalchemy as sa

    store = client.app.state.store  # type: ignore[attr-defined]
    with pytest.raises(sa.exc.OperationalError, match=r"readonly|read-only|query_only"), store.engine.begin() as conn:
        conn.exec_driver_sql("DELETE FROM autotune_trials")


# -- pages -------------------------------------------------------------------------------------------
def test_pages_render_and_escape(client: TestClient) -> None:
    home = client.get("/")
    assert home.status_code == 200 and "&lt;script&gt;alert(1)&lt;/script&gt;" in home.text
    assert XSS not in home.text
    study = client.get(f"/studies/{XSS_Q}")
    assert study.status_code == 200 and XSS not in study.text and "<img src=x" not in study.text
    assert "&lt;img src=x onerror=" in study.text
    trial = client.get("/studies/%3Cscript%3Ealert(1)%3C%2Fscript%3E/trials/0")
    assert trial.status_code == 200 and "&lt;b&gt;log&lt;/b&gt;" in trial.text and XSS not in trial.text
    tiny = client.get("/studies/tiny").text
    for needle in ('id="fig-pareto"', 'id="fig-history"', 'id="fig-importance"', 'id="fig-parallel"',
                   'id="trials"', "Download export (JSON)", "/static/plotly.min.js"):  # fmt: skip
        assert needle in tiny
    assert "cdn" not in tiny.lower()
    compare = client.get("/compare", params=[("study", "tiny"), ("study", XSS), ("study", "nope")])
    assert compare.status_code == 200 and 'id="fig-compare"' in compare.text and "no study named nope" in compare.text


def test_plotly_served_locally(client: TestClient) -> None:
    res = client.get("/static/plotly.min.js")
    assert res.status_code == 200 and len(res.content) > 1_000_000
    assert client.get("/static/dashboard.js").status_code == 200


def test_never_imports_torch(url: str) -> None:
    code = (
        "import sys\nfrom fastapi.testclient import TestClient\nfrom autotune.dashboard import create_app\n"
        f"c = TestClient(create_app({url!r}))\n"
        "for p in ('/', '/studies/tiny', '/studies/tiny/trials/0', '/api/studies/tiny/best'):\n"
        "    assert c.get(p).status_code == 200, p\n"
        "print('torch' in sys.modules)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False"


# -- running it ----------------------------------------------------------------------------------------
def test_missing_sqlite_file_is_refused_not_created(tmp_path: Path) -> None:
    from autotune.dashboard import create_app
    from autotune.errors import StorageError

    with pytest.raises(StorageError, match="no database file"):
        create_app(f"sqlite:///{tmp_path}/none.db")
    res = run_cli("dashboard", "--storage", f"sqlite:///{tmp_path}/none.db", cwd=tmp_path)
    assert res.returncode == 2 and res.stderr.strip().count("\n") == 0 and "no database file" in res.stderr
    assert not (tmp_path / "none.db").exists()


def test_cli_serves_on_loopback(dash_db: Path) -> None:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "autotune.cli", "dashboard", "--port", str(port)],
        cwd=dash_db,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    assert any(s["name"] == "tiny" for s in json.load(r))
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()[1]
                assert time.monotonic() < deadline, "dashboard did not answer"
                time.sleep(0.3)
        out = subprocess.run(["ss", "-ltn"], capture_output=True, text=True).stdout
        if out:
            assert f"127.0.0.1:{port}" in out and f"0.0.0.0:{port}" not in out
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_postgres_storage(pg_database: str) -> None:
    """The same app on PostgreSQL: pages and API read it; its connections refuse writes."""
    import sqlalchemy as sa

    from autotune.dashboard import create_app

    load_bench().fill(pg_database, "pg-study", 12, seed=3, status="running")
    with TestClient(create_app(pg_database), raise_server_exceptions=False) as c:
        assert [s["name"] for s in c.get("/api/studies").json()] == ["pg-study"]
        assert c.get("/api/studies/pg-study/trials").json()["total"] == 12
        assert c.get("/studies/pg-study").status_code == 200
        assert c.get("/api/studies/pg-study/best").json()["study"] == "pg-study"  # Optuna's side, read-only too
        status = c.get("/api/studies/pg-study/status").json()
        assert status["status"] == "running" and status["trials_done"] == 12
        store = c.app.state.store
        with pytest.raises(sa.exc.InternalError, match="read-only"), store.engine.begin() as conn:
            conn.exec_driver_sql("DELETE FROM autotune_trials")


# -- schemathesis ------------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def api_schema(url: str) -> schemathesis.BaseSchema:
    from autotune.dashboard import create_app

    return schemathesis.openapi.from_asgi("/openapi.json", create_app(url))


@pytest.mark.parametrize("mode", ["positive", "negative"])
def test_openapi_schema_conformance(api_schema: schemathesis.BaseSchema, mode: str) -> None:
    """Every API operation fuzzed from the app's own OpenAPI schema: no 5xx, every response matches it.

    Each case runs as generated (mostly unknown names: 404s) and again on the real study, so the
    success paths are fuzzed too (trial numbers, sort keys, filters, page sizes). Negative mode sends
    values the schema forbids: they must be refused (4xx JSON), never crash.
    """
    ops = [op.ok() for op in api_schema.get_all_operations()]  # type: ignore[union-attr]  # an Err raises here
    assert len(ops) >= 7
    for op in ops:
        if mode == "negative" and not list(op.iter_parameters()):
            continue  # nothing to get wrong

        @given(case=op.as_strategy(generation_mode=schemathesis.GenerationMode(mode)))
        @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case: schemathesis.Case) -> None:
            case.call_and_validate()
            if mode == "positive" and "name" in (case.path_parameters or {}):
                case.path_parameters["name"] = "tiny"
                case.call_and_validate()

        check()


def test_quality_clauses_and_why_a_trial_is_infeasible(tmp_path: Path) -> None:
    """A fast trial that breaks the model shows the clause it missed, with what it measured."""
    import optuna

    from autotune.dashboard import create_app
    from autotune.measure import Measurement
    from autotune.store import Repository, upgrade

    url = f"sqlite:///{tmp_path}/q.db"
    optuna.create_study(storage=url, study_name="q")  # the dashboard reads Optuna's tables beside ours
    upgrade(url)
    dist = {"p50": 10.0, "p90": 12.0, "p95": 13.0, "p99": 14.0, "mean": 10.0, "max": 15.0}
    slo = [{"metric": "e2e_ms", "percentile": "p95", "max": 100.0}, {"metric": "kl", "max": 0.05}]
    slo.append({"metric": "top1_agreement", "min": 0.9})
    with Repository.open(url) as repo:
        repo.upsert_study(
            "q", spec={"model": "builtin:tiny-lm", "slo": slo}, hardware={}, fingerprint="f", model_ref="m"
        )
        for n, (tps, kl, top1, feasible) in enumerate([(100.0, 0.001, 0.99, True), (900.0, 0.31, 0.42, False)]):
            m = Measurement(tps, 1.0, 10, 100, 1.0, dist, dist, dist, dist, 4.0, 100.0, "rss")
            m.quality = {"kl": kl, "top1_agreement": top1, "greedy_agreement": 0.5, "perplexity": 50.0}
            cons = [-0.87, (kl - 0.05) / 0.05, (0.9 - top1) / 0.9]
            repo.record_trial(
                "q",
                n,
                config={"batch_size": 4 * (n + 1)},
                config_key=f"k{n}",
                state="measured" if feasible else "infeasible",
                feasible=feasible,
                measurement=m,
                constraints=cons,
            )
    with TestClient(create_app(url)) as c:
        page = c.get("/studies/q").text
        assert "misses kl &lt;= 0.05 (measured 0.31); top1_agreement &gt;= 0.9 (measured 0.42)" in page
        assert "KL 0.0010" in page  # the best config's fidelity on its card
        trial = c.get("/studies/q/trials/1").text
        assert 'id="missed"' in trial and "fidelity kl" in trial
        assert c.get("/api/studies/q/trials/1").json()["quality"]["kl"] == 0.31


# -- hardening (issue 25) ------------------------------------------------------------------------------------
def test_security_headers_on_every_response(client: TestClient, url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pages, API answers, static files and errors all carry the CSP (this origin only, no framing)."""
    from autotune.dashboard import create_app

    paths = ["/", "/studies/tiny", "/studies/tiny/trials/0", "/compare?study=tiny", "/docs", "/api/studies",
             "/api/studies/tiny/best", "/static/dashboard.js", "/static/plotly.css", "/openapi.json",
             "/api/studies/nope", "/studies/nope", "/api/studies/tiny/trials?limit=0"]  # fmt: skip
    responses = [client.get(p) for p in paths]
    app = create_app(url)
    with TestClient(app, raise_server_exceptions=False) as c:  # a 500 is answered outside the middleware
        monkeypatch.setattr(app.state.store, "summary", lambda name: 1 / 0)
        responses.append(c.get("/api/studies/tiny"))
    assert sorted({r.status_code for r in responses}) == [200, 404, 422, 500]
    for r in responses:
        csp = {d.split()[0]: d.split()[1:] for d in r.headers["content-security-policy"].split("; ")}
        assert csp["default-src"] == ["'self'"] and csp["script-src"] == ["'self'"], r.url
        assert csp["style-src"] == ["'self'"] and csp["frame-ancestors"] == ["'none'"], r.url
        assert all("http" not in v and "*" not in v for vs in csp.values() for v in vs), csp
        assert r.headers["x-content-type-options"] == "nosniff" and r.headers["x-frame-options"] == "DENY", r.url


def _local_refs(html: str) -> list[str]:
    import re

    return re.findall(r'<(?:script|link|img|iframe)\b[^>]*?\s(?:src|href)="([^"]*)"', html)


def test_pages_load_nothing_from_another_host(client: TestClient) -> None:
    """Every script, stylesheet and icon a page names is this server's (offline machines, and no
    third-party code on pages that read the study database); /docs is Swagger UI from an installed
    package, its files served here; ReDoc is gone. No page has inline script or style."""
    import re

    for path in ("/", "/studies/tiny", "/studies/tiny/trials/0", "/compare?study=tiny", "/docs", "/nope"):
        html = client.get(path, headers={"accept": "text/html"}).text
        refs = _local_refs(html)
        assert refs and all((r.startswith("/") and not r.startswith("//")) or r == "data:," for r in refs), (path, refs)
        for ref in refs:
            if ref.startswith("/"):
                assert client.get(ref).status_code == 200, ref
        assert not re.search(r"<script(?![^>]*\bsrc=)(?![^>]*application/json)[^>]*>", html), path  # inline JS
        assert "<style" not in html and " style=" not in html and " onclick=" not in html, path
        assert 'href="/docs"' in html or path == "/nope"
    docs = client.get("/docs").text
    assert "/static/swagger-ui/swagger-ui-bundle.js" in docs and "/static/docs.js" in docs
    assert client.get("/static/swagger-ui/swagger-ui-bundle.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/redoc").status_code == 404
    css = client.get("/static/plotly.css").text  # plotly.js's own rules, which it would otherwise inline
    assert ".js-plotly-plot .plotly .modebar {position:absolute;" in css


def _killed_worker_study(db_url: str) -> None:
    """A study whose worker died mid-trial: Optuna's heartbeat check failed trial 5 and queued it
    again as trial 6, which another worker measured; trial 7 runs now. autotune's table has no row
    for 5 or 7 (the dead worker never recorded 5; 7 is not finished)."""
    import random

    import optuna

    from autotune.store import Repository

    bench = load_bench()
    bench.fill(db_url, "lost", 5, seed=7, status="running")
    import inspect

    retry_kwargs: dict[str, Any] = {"failed_trial_callback": optuna.storages.RetryFailedTrialCallback(max_retry=2)}
    if "heartbeat_stale_trial_callback" in inspect.signature(optuna.storages.RDBStorage).parameters:  # as the tuner
        retry_kwargs = {"heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=2)}
    storage = optuna.storages.RDBStorage(db_url, heartbeat_interval=1, grace_period=1, **retry_kwargs)
    study = optuna.load_study(study_name="lost", storage=storage)
    cfg = {"batch_size": 8, "precision": "fp32", "quantization": "none", "streams": 1, "backend": "eager",
           "max_queue_delay_ms": 0.0, "scheduler": "static"}  # fmt: skip
    trial = study.ask()
    trial.set_user_attr("config", cfg)
    trial.set_user_attr("config_key", "lostkey")
    storage.record_heartbeat(trial._trial_id)
    time.sleep(2.2)
    assert optuna.storages.fail_stale_trials(study) is None
    frozen = study.get_trials()
    assert [t.state.name for t in frozen[5:]] == ["FAIL", "WAITING"]
    retry = study.ask()  # the retry, picked up by a live worker and measured
    assert retry.number == 6 and storage.get_trial(retry._trial_id).system_attrs["failed_trial"] == 5
    m = bench.synthetic_measurement(cfg, random.Random(1))
    with Repository.open(db_url) as repo:
        repo.record_trial("lost", 6, config=cfg, config_key="lostkey", state="measured", feasible=True,
                          measurement=m, constraints=[-0.5])  # fmt: skip
    study.tell(retry, m["output_tokens_per_s"])
    running = study.ask()
    running.set_user_attr("config", cfg)
    assert running.number == 7


def test_a_trial_failed_by_a_killed_worker_is_shown(tmp_path: Path) -> None:
    """Every trial Optuna holds appears with its state: the lost one (failed, retried as 6) and the
    running one, though autotune's table has no row for either; counts, pages and API agree."""
    from autotune.dashboard import create_app

    db_url = f"sqlite:///{tmp_path}/lost.db"
    _killed_worker_study(db_url)
    with TestClient(create_app(db_url), raise_server_exceptions=False) as c:
        items = c.get("/api/studies/lost/trials", params={"limit": 500}).json()["items"]
        assert [t["number"] for t in items] == list(range(8))
        lost, running = items[5], items[7]
        assert lost["state"] == "failed" and lost["failure_kind"] == "lost" and lost["label"].startswith("b8 fp32")
        assert "retried as trial 6" in lost["failure_reason"]
        assert running["state"] == "running" and items[6]["state"] == "measured"
        summary = {s["name"]: s for s in c.get("/api/studies").json()}["lost"]
        before = {k: v for k, v in summary["trials_by_state"].items() if k not in ("running",)}
        assert summary["trials_failed"] == before.get("failed", 0) >= 1 and summary["trials_by_state"]["running"] == 1
        assert summary["trials_done"] == 8 == c.get("/api/studies/lost/status").json()["trials_done"]
        assert c.get("/api/studies/lost").json()["trials_failed"] == summary["trials_failed"]
        failed = c.get("/api/studies/lost/trials", params={"state": "failed"}).json()["items"]
        assert 5 in [t["number"] for t in failed]
        page = c.get("/studies/lost").text
        assert '<a href="/studies/lost/trials/5">5</a>' in page and "retried as trial 6" in page
        assert f"{summary['trials_failed']} failed;" in page and "running 1" in page
        trial = c.get("/studies/lost/trials/5")
        assert trial.status_code == 200 and "retried as trial 6" in trial.text and 'id="optuna-only"' in trial.text
        assert c.get("/api/studies/lost/trials/7").json()["state"] == "running"
        assert c.get("/studies/lost", params={"q": "retried"}).text.count('<tr data-state="failed"') == 1


def _plain_optuna(db_url: str, name: str = "plain") -> None:
    """A study made by Optuna alone: floats, ints and categories, one pruned and one failed trial."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", -4, 4)
        k = trial.suggest_categorical("kind", ["<b>a</b>", "b"])
        n = trial.suggest_int("n", 1, 5)
        if trial.number == 3:
            raise optuna.TrialPruned()
        if trial.number == 4:
            raise ValueError("boom")
        return (x - 1) ** 2 + n + (0.5 if k == "b" else 0.0)

    study = optuna.create_study(study_name=name, storage=db_url, sampler=optuna.samplers.RandomSampler(seed=3))
    study.optimize(objective, n_trials=12, catch=(ValueError,))


def test_a_database_only_optuna_wrote_is_shown_read_only(tmp_path: Path) -> None:
    """No autotune tables: the dashboard opens it as it is (nothing written, no `db upgrade` asked
    for) and shows the study from Optuna's own data: values, params, states, best trial."""
    import optuna
    import sqlalchemy as sa

    from autotune.dashboard import create_app

    db = tmp_path / "optuna.db"
    db_url = f"sqlite:///{db}"
    _plain_optuna(db_url)
    study = optuna.load_study(study_name="plain", storage=db_url)
    before = digest(db)
    with TestClient(create_app(db_url), raise_server_exceptions=False) as c:
        [s] = c.get("/api/studies").json()
        assert s["name"] == "plain" and s["kind"] == "optuna" and s["directions"] == ["minimize"]
        assert s["trials_done"] == 12 and s["trials_by_state"] == {"complete": 10, "pruned": 1, "failed": 1}
        assert s["best_trial"] == study.best_trial.number and s["best_values"] == [study.best_value]
        items = c.get("/api/studies/plain/trials", params={"limit": 500}).json()["items"]
        assert [t["number"] for t in items] == list(range(12))
        for t, ft in zip(items, study.trials, strict=True):
            assert t["params"] == ft.params and t["values"] == ft.values
            assert t["state"] == {"COMPLETE": "complete", "PRUNED": "pruned", "FAIL": "failed"}[ft.state.name]
        by_value = c.get("/api/studies/plain/trials", params={"sort": "value", "limit": 3}).json()["items"]
        assert [t["values"][0] for t in by_value] == sorted(t.value for t in study.trials if t.value is not None)[:3]
        page = c.get("/studies/plain")
        assert page.status_code == 200 and 'id="fig-history"' in page.text and "&lt;b&gt;a&lt;/b&gt;" in page.text
        assert "<b>a</b>" not in page.text and f"trial {study.best_trial.number}</a>" in page.text
        assert c.get("/").text.count("Optuna</span>") == 1
        trial = c.get(f"/studies/plain/trials/{study.best_trial.number}")
        assert trial.status_code == 200 and f"{study.best_value:.6g}" in trial.text
        assert c.get("/api/studies/plain/best").status_code == 404  # no export: not autotune's
        assert c.get("/api/studies/plain/status").json() == {
            "name": "plain", "status": "idle", "trials_done": 12, "updated_at": s["updated_at"]
        }  # fmt: skip
        assert c.get("/api/studies/plain/trials/99").status_code == 404
    assert digest(db) == before
    assert not [t for t in sa.inspect(sa.create_engine(db_url)).get_table_names() if t.startswith("autotune_")]


def test_plain_optuna_studies_beside_autotune_ones(tmp_path: Path) -> None:
    """One database, one autotune study and one plain Optuna study: both listed, each its own page."""
    from autotune.dashboard import create_app

    db_url = f"sqlite:///{tmp_path}/mixed.db"
    load_bench().fill(db_url, "ours", 6, seed=5)
    _plain_optuna(db_url, "theirs")
    with TestClient(create_app(db_url), raise_server_exceptions=False) as c:
        kinds = {s["name"]: s["kind"] for s in c.get("/api/studies").json()}
        assert kinds == {"ours": "autotune", "theirs": "optuna"}
        assert 'id="fig-pareto"' in c.get("/studies/ours").text
        assert "Made by Optuna, not by autotune" in c.get("/studies/theirs").text
        assert c.get("/api/studies/theirs/pareto").status_code == 404
        assert [s for s in c.get("/compare").text.split() if "theirs" in s] == []  # nothing to compare


@pytest.fixture(scope="module")
def big_and_small(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One database with a 600-trial and a 120-trial synthetic study."""
    work = tmp_path_factory.mktemp("big")
    db_url = f"sqlite:///{work}/big.db"
    bench = load_bench()
    bench.fill(db_url, "big", 600, seed=11)
    bench.fill(db_url, "small", 120, seed=11)
    return db_url


def test_page_weight_does_not_grow_with_the_study(big_and_small: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The study page carries one page of the trials table and at most MAX_POINTS points per plot:
    five times the trials, about the same page; the table says where it is and pages on."""
    from autotune.dashboard import create_app, figures

    monkeypatch.setattr(figures, "MAX_POINTS", 60)
    with TestClient(create_app(big_and_small)) as c:
        big, small = c.get("/studies/big").text, c.get("/studies/small").text
        assert len(big) < 1.15 * len(small), (len(big), len(small))
        assert big.count("<tr data-state=") == 100 and "trials 1–100 of 600" in big
        assert 'href="/studies/big?offset=100" rel="next"' in big
        second = c.get("/studies/big", params={"offset": 100}).text
        assert "trials 101–200 of 600" in second and '<a href="/studies/big/trials/100">100</a>' in second
        desc = c.get("/studies/big", params={"sort": "output_tokens_per_s", "order": "desc", "part": "table"}).text
        assert desc.startswith("{#") is False and 'id="trials-part"' in desc and "<html" not in desc
        api = c.get("/api/studies/big/trials", params={"sort": "output_tokens_per_s", "order": "desc"}).json()
        first_rows = [f'<a href="/studies/big/trials/{t["number"]}">' for t in api["items"][:5]]
        assert [desc.index(r) for r in first_rows] == sorted(desc.index(r) for r in first_rows)
        fig = json.loads(big.split('<script type="application/json" id="figs">')[1].split("</script>")[0])
        assert len(fig["pareto"]["data"][0]["x"]) + len(fig["pareto"]["data"][1]["x"]) <= 60 + 30
        assert "drawn: every trial on the front" in big


def test_best_and_pages_never_read_every_trial_through_optuna(
    big_and_small: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Optuna's get_all_trials decodes every attribute of every trial (seconds at 10,000 trials):
    the export reads its one trial, the pages read columns."""
    import optuna

    from autotune.dashboard import create_app

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("read every trial through Optuna")

    monkeypatch.setattr(optuna.storages.RDBStorage, "get_all_trials", refuse)
    monkeypatch.setattr(optuna.storages.RDBStorage, "_get_trials", refuse)  # what Optuna's trial cache calls
    with TestClient(create_app(big_and_small), raise_server_exceptions=False) as c:
        best = c.get("/api/studies/big/best")
        assert best.status_code == 200, best.text
        doc = best.json()
        summary = c.get("/api/studies/big").json()
        assert doc["trial"] == summary["best_trial"]
        assert doc["metrics"]["output_tokens_per_s"] == pytest.approx(summary["best_output_tokens_per_s"])
        for path in ("/", "/studies/big", "/studies/big/trials/3", "/api/studies/big/pareto", "/compare?study=big"):
            assert c.get(path).status_code == 200, path


def test_best_is_the_trial_autotune_best_names(tmp_path: Path) -> None:
    """Re-measured winners rank by their re-measurement and a refuted one is never best, as
    ``autotune.tuner.best_feasible`` ranks them: card, list, summary and export agree with it."""
    import optuna

    from autotune.dashboard import create_app
    from autotune.tuner import best_feasible

    db_url = f"sqlite:///{tmp_path}/conf.db"
    load_bench().fill(db_url, "conf", 40, seed=9)
    study = optuna.load_study(study_name="conf", storage=db_url)
    ranked = sorted(
        (t for t in study.get_trials() if t.user_attrs.get("feasible")), key=lambda t: -t.values[0]
    )  # the search's top three: the first refuted, the third re-measured above the second
    first, second, third = ranked[:3]
    assert first.user_attrs["config_key"] not in (second.user_attrs["config_key"], third.user_attrs["config_key"])
    study.set_user_attr(
        "confirmations",
        {
            first.user_attrs["config_key"]: {"ok": False, "runs": []},
            third.user_attrs["config_key"]: {"ok": True, "runs": [], "remeasured_tokens_per_s": first.values[0] + 1},
        },
    )
    want = best_feasible(study)
    assert want is not None and want.user_attrs["config_key"] == third.user_attrs["config_key"]
    with TestClient(create_app(db_url)) as c:
        summary = c.get("/api/studies/conf").json()
        assert summary["best_trial"] == want.number and summary["best_output_tokens_per_s"] == first.values[0] + 1
        assert c.get("/api/studies/conf/best").json()["trial"] == want.number
        page = c.get("/studies/conf").text
        assert f'href="/studies/conf/trials/{want.number}">trial {want.number}</a>' in page
        assert "median of its re-measurements" in page
        listed = {s["name"]: s for s in c.get("/api/studies").json()}["conf"]
        assert listed["best_trial"] == want.number

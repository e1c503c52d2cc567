"""The web dashboard over a database filled by a real ``autotune tune`` run: JSON API, pages, escaping,
read-only access, bad input, the ``autotune dashboard`` command, schemathesis and PostgreSQL.

Browser tests (headless Chromium driven by Playwright) live in test_dashboard_browser.py.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import socket
import sqlite3
import subprocess
import sys
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

from .conftest import ROOT, TINY_SPEC, run_cli

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
        res = client.get("/api/studies/tiny/best", params={"format": fmt, "download": "true"})
        assert res.status_code == 200 and res.headers["content-type"].startswith("text/plain")
        assert f'filename="{filename}"' in res.headers["content-disposition"]
        assert f"study: tiny  trial: {ours['trial']}" in res.text and "PLACEHOLDER" in res.text


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
        monkeypatch.setattr(app.state.store, "study", lambda name: 1 / 0)
        res = c.get("/api/studies/tiny")
        assert res.status_code == 500 and res.json() == {"error": "internal error (ZeroDivisionError)"}

        def down(name: str) -> None:
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_cli_serves_on_loopback(dash_db: Path) -> None:
    port = _free_port()
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

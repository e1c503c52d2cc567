"""The dashboard in a real browser: headless Debian Chromium driven by Playwright (never a downloaded
browser). Screenshots land in tests/artifacts/ (git-ignored)."""

from __future__ import annotations

import contextlib
import json
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .conftest import ROOT, free_port, run_cli, skip_unless_required
from .test_dashboard import XSS, XSS_Q, dash_db, load_bench, url  # noqa: F401  (session fixtures)

CHROMIUM = Path("/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
]
ARTIFACTS = ROOT / "tests" / "artifacts"


def _require_chromium() -> None:
    if not CHROMIUM.exists():
        skip_unless_required("no /usr/bin/chromium: apt-get install chromium (Debian) to run browser tests")


@pytest.fixture(autouse=True)
def _chromium() -> None:
    _require_chromium()


os.environ.setdefault("PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD", "1")


@contextlib.contextmanager
def serve(storage_url: str) -> Iterator[str]:
    """The dashboard under uvicorn in a thread, on a free loopback port; yields its base URL."""
    import uvicorn

    from autotune.dashboard import create_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(storage_url), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "dashboard server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def base(url: str) -> Iterator[str]:  # noqa: F811
    with serve(url) as root:
        yield root


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    _require_chromium()  # module-scoped, so set up before the autouse check below runs
    playwright = pytest.importorskip("playwright.sync_api")
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    ctx = browser.new_context(accept_downloads=True, viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    errors: list[str] = []
    pg.on("pageerror", lambda e: errors.append(str(e)))
    pg.on("console", lambda m: errors.append(f"console: {m.text}") if "Content Security Policy" in m.text else None)
    # Any resource from another host, and any CSP violation, is an error: the pages are offline-only.
    pg.on("request", lambda r: None if r.url.startswith(("http://127.0.0.1:", "data:")) else errors.append(r.url))
    pg.add_init_script(
        "document.addEventListener('securitypolicyviolation',"
        " e => console.error('Content Security Policy: ' + e.violatedDirective + ' ' + e.blockedURI))"
    )

    def on_dialog(d: Any) -> None:
        errors.append(f"dialog: {d.message}")
        d.dismiss()

    pg.on("dialog", on_dialog)
    pg.errors = errors
    try:
        yield pg
    finally:
        ctx.close()


def shot(page: Any, name: str) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


PARETO_POINTS = """() => {
  const el = document.getElementById('fig-pareto');
  return el.querySelectorAll('.scatterlayer .trace .points path.point').length;
}"""


def test_study_flow(page: Any, base: str, dash_db: Path, url: str) -> None:  # noqa: F811
    page.goto(base + "/")
    page.get_by_role("link", name="tiny", exact=True).click()
    page.wait_for_url("**/studies/tiny")
    page.wait_for_function("() => document.getElementById('fig-pareto').data !== undefined")
    page.wait_for_selector("#fig-parallel .parcatslayer .dimension")  # SVG parallel categories: no WebGL, no eval
    from fastapi.testclient import TestClient

    from autotune.dashboard import create_app

    with TestClient(create_app(url)) as c:
        measured = c.get("/api/studies/tiny/trials", params={"state": "measured"}).json()["total"]
    assert measured >= 1
    assert page.evaluate(PARETO_POINTS) == measured  # one point per completed (measured) trial
    assert page.locator("#trials tbody tr").count() == 4
    page.locator("#trials th", has_text="tokens/s").click()  # sorted by the server, swapped in place
    page.wait_for_selector('#trials[data-sort="output_tokens_per_s-asc"]')
    assert page.url.endswith("/studies/tiny?sort=output_tokens_per_s")  # the view stays in the address
    cells = page.locator("#trials tbody tr td:nth-child(5)").evaluate_all("els => els.map(e => e.dataset.v)")
    values = [float(v) for v in cells if v]
    assert values == sorted(values) and len(values) == measured
    shot(page, "study-tiny")

    with page.expect_download() as dl:
        page.click("#download-json")
    doc = json.loads(Path(dl.value.path()).read_text())
    cli = run_cli("best", "tiny", "--json", "--storage", url, cwd=dash_db)
    assert cli.returncode == 0, cli.stderr
    expected = json.loads(cli.stdout)
    doc.pop("exported_at"), expected.pop("exported_at")
    assert doc == expected

    page.locator("#best h2 a").click()
    page.wait_for_url(f"**/studies/tiny/trials/{expected['trial']}")
    page.wait_for_function("() => document.getElementById('fig-latency').data !== undefined")
    assert page.locator("h1").inner_text().startswith(f"Trial {expected['trial']}")
    assert "load_s" in page.content() and "warmup_s" in page.content()
    shot(page, "trial-tiny")
    assert page.errors == []


def test_studies_list_and_script_names_stay_text(page: Any, base: str) -> None:
    page.goto(base + "/")
    assert page.locator("#studies tbody tr").count() >= 2
    assert page.get_by_role("link", name=XSS).count() == 1  # the name shows as text
    shot(page, "studies")
    page.goto(f"{base}/studies/{XSS_Q}")
    page.wait_for_function("() => document.getElementById('fig-pareto').data !== undefined")
    assert page.locator("h1").inner_text().startswith(XSS)
    page.fill("#trial-filter", "crash")  # filtered by the server as one types: only failed rows left
    page.wait_for_selector('#trials[data-q="crash"]')
    visible = page.locator("#trials tbody tr:visible")
    assert visible.count() >= 1 and all("crash" in t for t in visible.all_inner_texts())
    shot(page, "study-script-name")
    page.goto(f"{base}/compare?study=tiny&study={XSS_Q}")
    page.wait_for_function("() => document.getElementById('fig-compare').data !== undefined")
    shot(page, "compare")
    assert page.errors == []  # no alert() ran, no JS error


def test_running_study_updates_without_reload(page: Any, tmp_path: Path) -> None:
    from autotune.store import Repository

    db_url = f"sqlite:///{tmp_path}/live.db"
    load_bench().fill(db_url, "live", 5, seed=2, status="running")
    with serve(db_url) as root:
        page.goto(root + "/studies/live")
        page.wait_for_function("() => document.getElementById('fig-pareto').data !== undefined")
        page.evaluate("() => { window.__same_document = true; }")
        with Repository.open(db_url) as repo:  # the study writes while the page is open
            row = repo.list_trials("live")[-1]
            m = load_bench().synthetic_measurement(row.config, random.Random(5))
            repo.record_trial("live", 5, config=row.config, config_key="new", state="measured", feasible=True,
                              measurement=m, constraints=[-0.5])  # fmt: skip
        page.wait_for_selector('#live[data-trials="6"]', timeout=15_000)
        assert page.evaluate("() => window.__same_document") is True  # updated in place, not reloaded
        assert page.locator("#trials tbody tr").count() == 6
        page.wait_for_function("() => document.getElementById('fig-pareto').data !== undefined")
        shot(page, "study-live")
    assert page.errors == []


def test_studies_list_follows_new_trials(page: Any, tmp_path: Path) -> None:
    from autotune.store import Repository

    db_url = f"sqlite:///{tmp_path}/list.db"
    load_bench().fill(db_url, "growing", 3, seed=4, status="running")
    with serve(db_url) as root:
        page.goto(root + "/")
        spent = page.locator("#studies tbody tr td").nth(4).inner_text()  # "SPENT / BUDGET"
        first = int(spent.split("/")[0])
        assert 1 <= first <= 3
        with Repository.open(db_url) as repo:
            row = repo.list_trials("growing")[0]
            repo.record_trial("growing", 3, config=row.config, config_key="x", state="failed",
                              failure={"kind": "crash", "reason": "boom", "log": ""})  # fmt: skip
            repo.set_study_status("growing", "finished")
        page.wait_for_function(
            "n => document.querySelector('#studies tbody tr td:nth-child(5)').textContent.trim().startsWith(String(n))",
            arg=first + 1,
            timeout=15_000,
        )
        assert page.locator("#studies .badge").inner_text() == "finished"
    assert page.errors == []


def test_pages_work_under_the_content_security_policy(page: Any, base: str) -> None:
    """Every page under the CSP the server sends (this origin only: no inline script or style, no
    eval): plots drawn with plotly.js's own stylesheet, Swagger UI rendering the API, nothing
    blocked, nothing fetched from another host (the page fixture records both as errors)."""
    csp = page.goto(base + "/studies/tiny").headers["content-security-policy"]
    assert "script-src 'self';" in csp and "unsafe" not in csp
    page.wait_for_selector("#fig-pareto .modebar", state="attached")  # shown on hover
    modebar = page.evaluate("() => getComputedStyle(document.querySelector('#fig-pareto .modebar')).position")
    assert modebar == "absolute"  # plotly.js's rules applied from /static/plotly.css, not an inline <style>
    assert page.locator("style").count() == 0
    page.goto(base + "/studies/tiny/trials/0")
    page.wait_for_function("() => document.getElementById('fig-latency').data !== undefined")
    page.goto(base + "/docs")
    page.wait_for_selector(".swagger-ui .opblock-summary-path")
    paths = page.locator(".opblock-summary-path").all_inner_texts()
    assert "/api/studies/{name}/best" in paths and len(paths) >= 7
    page.locator(".opblock-summary-path", has_text="/api/studies/{name}/trials").first.click()
    page.wait_for_selector(".opblock.is-open .parameters")
    shot(page, "docs")
    assert page.errors == []


def test_trials_table_pages_through_a_large_study(page: Any, tmp_path: Path) -> None:
    """A 230-trial study: the page carries 100 rows; next/previous and sorting fetch the other
    pages in place (no reload), and the address keeps the view."""
    db_url = f"sqlite:///{tmp_path}/paged.db"
    load_bench().fill(db_url, "paged", 230, seed=6)
    with serve(db_url) as root:
        page.goto(root + "/studies/paged")
        page.evaluate("() => { window.__same_document = true; }")
        assert page.locator("#trials tbody tr").count() == 100
        assert "trials 1–100 of 230" in page.locator("#pager").inner_text()
        page.click("#pager a[rel=next]")
        page.wait_for_selector('#trials[data-offset="100"]')
        assert page.locator("#trials tbody tr td:first-child").first.inner_text() == "100"
        page.click("#pager a[rel=next]")
        page.wait_for_selector('#trials[data-offset="200"]')
        assert page.locator("#trials tbody tr").count() == 30
        page.locator("#trials th", has_text="memory MB").click()
        page.wait_for_selector('#trials[data-sort="peak_memory_mb-asc"][data-offset="0"]')
        page.locator("#trials th", has_text="memory MB").click()
        page.wait_for_selector('#trials[data-sort="peak_memory_mb-desc"]')
        top = page.locator("#trials tbody tr td:nth-child(9)").first.get_attribute("data-v")
        assert top is not None and float(top) == 684  # the largest batch's memory in the synthetic data
        page.select_option("#state-filter", "rejected")
        page.wait_for_selector('#trials[data-state="rejected"]')
        states = page.locator("#trials tbody tr td:nth-child(2)").all_inner_texts()
        assert states and set(states) == {"rejected"}
        assert page.evaluate("() => window.__same_document") is True
        assert "state=rejected" in page.url
        page.reload()  # the address kept the view
        assert page.locator("#state-filter").input_value() == "rejected"
        shot(page, "study-paged")
    assert page.errors == []

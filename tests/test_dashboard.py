"""The web dashboard: pages, charts and the token, in-process and in a real headless Chromium.

The fast tests drive the Starlette app with its test client over a ledger filled through the write
API (``test_operator.fill_ledger``). The browser tests (marker ``browser``) load the pages served by
uvicorn in Chromium over the ledger of one real tiny Flower simulation; without /usr/bin/chromium
or the playwright package they skip, unless the CI environment variable is set: there they fail.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from starlette.testclient import TestClient

from server.ledger import Ledger, LedgerError
from server.operator.charts import Series, line_chart, nice_ticks
from server.operator.cli import app as cli_app
from server.operator.dashboard import byte_unit, create_app
from test_operator import USERS, Filled, fill_ledger, ops, round_metrics  # a sibling module: its ledger filler

TOKEN = "s3cret-token"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
SIMULATION_ROUNDS, SIMULATION_USERS = 2, 3


@pytest.fixture(scope="module")
def filled(tmp_path_factory: pytest.TempPathFactory) -> Filled:
    return fill_ledger(f"sqlite:///{tmp_path_factory.mktemp('ledger') / 'ledger.db'}")


@pytest.fixture
def client(filled: Filled) -> Iterator[TestClient]:
    with TestClient(create_app(filled.url)) as test_client:
        yield test_client


# --- pages, in-process --------------------------------------------------------------------------


def test_the_runs_page_lists_every_run_newest_first(client: TestClient, filled: Filled) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    rows = re.findall(r'<tr data-run-id="(\d+)">(.*?)</tr>', page.text, re.S)
    assert [int(run_id) for run_id, _ in rows] == [filled.running_id, filled.run_id]
    completed = _text(rows[1][1])
    assert filled.flower_run_id in completed and "completed" in completed and completed.endswith(" 3")


def test_the_run_page_shows_charts_rounds_clients_and_events(client: TestClient, filled: Filled) -> None:
    page = client.get(f"/runs/{filled.run_id}")
    assert page.status_code == 200
    assert [name for name in re.findall(r'<svg class="chart" data-chart="(\w+)"', page.text)] == [
        "loss", "bytes", "participation"
    ]  # fmt: skip
    assert page.text.count("<polyline") == 8  # 3 loss + 2 bytes + 3 participation series, no gaps
    rounds = re.findall(r'<tr data-round="(\d+)"', page.text)
    assert rounds == ["1", "2", "3"]
    assert f"{round_metrics(2)['eval-loss']:.4f}" in page.text
    assert "Client results of round 3" in page.text  # the last round by default
    clients = _section(page.text, "client-results")
    for user in USERS:
        assert _escaped(user) in clients  # markup-like user ids are shown escaped, verbatim
    assert clients.count(">evaluate<") == 3 and clients.count(">train<") == 3
    assert "node 102 vanished" in _section(page.text, "events")
    assert '<meta http-equiv="refresh"' not in page.text  # only a running run's page refreshes


def test_a_round_is_chosen_with_a_query_parameter(client: TestClient, filled: Filled) -> None:
    page = client.get(f"/runs/{filled.flower_run_id}", params={"round": 2})  # a Flower run id works too
    assert page.status_code == 200 and "Client results of round 2" in page.text
    clients = _section(page.text, "client-results")
    assert "status-failed" in clients and _escaped("code 2: [red]gone[/red]") in clients
    assert client.get(f"/runs/{filled.run_id}", params={"round": 99}).text.count("Client results of round 3") == 1


def test_a_running_run_without_rounds_refreshes_and_says_so(client: TestClient, filled: Filled) -> None:
    page = client.get(f"/runs/{filled.running_id}")
    assert page.status_code == 200
    assert '<meta http-equiv="refresh" content="15">' in page.text
    assert "no rounds recorded yet" in page.text and page.text.count("no data yet") == 3


def test_an_empty_ledger_shows_an_empty_runs_page(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'ledger.db'}"
    Ledger(url).close()  # created by the server, no run yet
    with TestClient(create_app(url)) as empty:
        page = empty.get("/")
        assert page.status_code == 200 and "no runs in this ledger yet" in page.text
        assert empty.get("/runs/1").status_code == 404


def test_an_unknown_run_is_a_404_that_says_why(client: TestClient) -> None:
    page = client.get("/runs/999")
    assert page.status_code == 404 and "no run 999 in the ledger" in page.text


def test_exports_parse_back(client: TestClient, filled: Filled) -> None:
    exported = client.get(f"/runs/{filled.run_id}/export.json")
    assert exported.status_code == 200 and "attachment" in exported.headers["content-disposition"]
    document = json.loads(exported.text)
    assert [r["metrics"] for r in document["rounds"]] == [round_metrics(n) for n in (1, 2, 3)]
    assert len(document["client_results"]) == 12
    table = client.get(f"/runs/{filled.run_id}/export.csv")
    assert table.status_code == 200 and table.text.splitlines()[0].startswith("record,run_id,round")
    assert client.get(f"/runs/{filled.run_id}/export.xml").status_code == 404


def test_the_dashboard_needs_an_existing_ledger_and_never_creates_one(tmp_path: Path) -> None:
    path = tmp_path / "missing" / "ledger.db"
    with pytest.raises(LedgerError, match="no such file"):
        create_app(f"sqlite:///{path}")
    result = ops("serve", "--port", "1", db=f"sqlite:///{path}")
    assert result.exit_code == 1 and "no such file" in result.stderr
    assert not path.parent.exists()


# --- the token ----------------------------------------------------------------------------------


@pytest.fixture
def guarded(filled: Filled) -> Iterator[TestClient]:
    with TestClient(create_app(filled.url, token=TOKEN)) as test_client:
        yield test_client


@pytest.mark.parametrize("path", ["/", "/runs/1", "/runs/1/export.json", "/nowhere"])
def test_without_the_token_every_request_is_refused(guarded: TestClient, path: str) -> None:
    for headers, params in [({}, {}), ({"Authorization": "Bearer wrong"}, {}), ({}, {"token": "wrong"}),
                            ({"Authorization": TOKEN}, {}), ({"Authorization": "Basic " + TOKEN}, {})]:  # fmt: skip
        response = guarded.get(path, headers=headers, params=params)
        assert response.status_code == 401, (headers, params)
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert "completed" not in response.text  # nothing of the ledger leaks


def test_the_token_is_accepted_in_the_header_or_the_query(guarded: TestClient, filled: Filled) -> None:
    assert guarded.get("/", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert guarded.get("/", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200
    page = guarded.get(f"/runs/{filled.run_id}", params={"token": TOKEN})
    assert page.status_code == 200
    links = re.findall(r'href="([^"]+)"', page.text)
    assert links and all(f"token={TOKEN}" in link for link in links)  # a browser can follow them
    assert f'name="token" value="{TOKEN}"' in page.text  # and the round form keeps it


def test_the_token_comes_from_the_environment_for_serve(monkeypatch: pytest.MonkeyPatch, filled: Filled) -> None:
    seen: dict[str, Any] = {}
    monkeypatch.setattr("server.operator.dashboard.serve", lambda url, **kwargs: seen.update(url=url, **kwargs))
    monkeypatch.setenv("FEDGRAFT_DASHBOARD_TOKEN", TOKEN)
    from typer.testing import CliRunner

    result = CliRunner().invoke(cli_app, ["serve", "--db", filled.url, "--port", "8799"])
    assert result.exit_code == 0, result.output
    assert seen == {"url": filled.url, "host": "127.0.0.1", "port": 8799, "token": TOKEN}


# --- charts -------------------------------------------------------------------------------------


def test_nice_ticks_cover_the_data_with_round_steps() -> None:
    assert nice_ticks(0.93, 3.1) == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5]
    assert nice_ticks(1, 1000, integer=True) == [0, 200, 400, 600, 800, 1000]
    assert nice_ticks(1, 2, integer=True) == [1, 2]
    assert nice_ticks(5, 5, integer=True) == [4, 5, 6]


def test_a_missing_value_breaks_the_line_instead_of_dropping_to_zero() -> None:
    chart = line_chart("loss", "Loss", [Series("train", [(1, 2.0), (2, 1.5), (3, None), (4, 1.0), (5, 0.9)])])
    assert chart.count("<polyline") == 2 and chart.count("<circle") == 4
    assert "train, 2: 1.5" in chart
    assert "no data yet" in line_chart("x", "Empty", [Series("train", [(1, None)])])
    assert "&lt;b&gt;" in line_chart("x", "<b>", [Series("a", [(1, 1.0)])])  # titles are escaped


def test_byte_charts_use_a_readable_unit() -> None:
    assert [byte_unit(n) for n in (0, 1023, 3000, 5 * 2**20, 2**50)] == [
        ("B", 1), ("B", 1), ("KiB", 1024), ("MiB", 2**20), ("GiB", 2**30)
    ]  # fmt: skip


# --- in a real browser, over a real simulation --------------------------------------------------


def require_browser() -> Any:
    """playwright's sync API, if it and /usr/bin/chromium are here; else skip (fail under CI)."""
    reason = None
    if not CHROMIUM.exists():
        reason = f"no Chromium at {CHROMIUM} (Debian: apt-get install -y chromium chromium-driver)"
    try:
        from playwright import sync_api
    except ImportError:
        reason = reason or "the playwright package is not installed (pip install playwright)"
    if reason:
        pytest.fail(reason) if os.environ.get("CI") else pytest.skip(reason)
    return sync_api


@pytest.fixture(scope="module")
def playwright_api() -> Any:
    return require_browser()


@pytest.fixture(scope="module")
def simulated(playwright_api: Any, tiny_base: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One real tiny `flwr run` simulation (as in test_simulation.py); its ledger feeds the dashboard."""
    from simulations.run import run_simulation

    run_config = {
        "base-model": str(tiny_base), "base-dtype": "float32", "num-server-rounds": SIMULATION_ROUNDS,
        "min-train-nodes": SIMULATION_USERS, "local-steps": 15, "batch-size": 4, "seq-len": 32,
        "learning-rate": 0.01, "lora-dropout": 0.0, "max-eval-blocks": 16, "min-speeches": 60,
        "node-wait-seconds": 120, "round-timeout": 300,
    }  # fmt: skip
    workdir = tmp_path_factory.mktemp("dashboard-simulation")
    return run_simulation(SIMULATION_USERS, run_config, workdir, cpus_per_client=2, timeout=600)


@pytest.fixture(scope="module")
def live_dashboard(simulated: Any) -> Iterator[str]:
    """The dashboard, with a token, served by uvicorn in a thread on a free loopback port."""
    import uvicorn

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(simulated.ledger_url, token=TOKEN), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the dashboard did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        listener.close()


@pytest.fixture(scope="module")
def browser(playwright_api: Any) -> Iterator[Any]:
    with playwright_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.mark.browser
@pytest.mark.simulation
def test_the_dashboard_shows_a_real_run_in_chromium(
    browser: Any, live_dashboard: str, simulated: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    with Ledger(simulated.ledger_url, read_only=True) as ledger:
        (run,) = [r for r in ledger.runs() if r.flower_run_id == simulated.flower_run_id]
        users = {r.user_id for r in ledger.client_results(run.id, SIMULATION_ROUNDS) if r.user_id}
    assert len(users) == SIMULATION_USERS

    page = browser.new_page(viewport={"width": 1500, "height": 1000})
    page.goto(f"{live_dashboard}/?token={TOKEN}")
    runs_row = page.locator(f'#runs tr[data-run-id="{run.id}"]')
    assert simulated.flower_run_id in runs_row.inner_text() and "completed" in runs_row.inner_text()

    runs_row.locator("a").click()  # the link keeps the token
    page.wait_for_url(re.compile(rf"/runs/{run.id}\?token="))
    assert f"Run {run.id}" in page.locator("h1").inner_text()
    assert simulated.flower_run_id in page.locator("h1").inner_text()
    assert page.locator("#rounds tbody tr").count() == SIMULATION_ROUNDS
    assert page.locator("svg.chart").count() == 3
    assert page.locator('svg.chart[data-chart="loss"] polyline').count() == 3
    assert page.locator('svg.chart[data-chart="loss"]').bounding_box()["width"] > 300  # laid out, visible
    client_users = set(page.locator("#client-results td.user").all_inner_texts())
    assert client_users == users
    screenshot = tmp_path_factory.mktemp("artifacts") / "dashboard.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"dashboard screenshot: {screenshot}")

    page.locator('#rounds tr[data-round="1"] a').click()
    page.wait_for_url(re.compile(r"round=1"))
    assert "round 1" in page.locator("#clients").inner_text()
    page.close()


@pytest.mark.browser
@pytest.mark.simulation
def test_the_browser_is_refused_without_the_token(browser: Any, live_dashboard: str) -> None:
    page = browser.new_page()
    response = page.goto(f"{live_dashboard}/runs/1")
    assert response.status == 401 and "Authorization: Bearer" in page.content()
    assert page.goto(f"{live_dashboard}/?token=wrong").status == 401
    api = page.context.request
    assert api.get(f"{live_dashboard}/", headers={"Authorization": f"Bearer {TOKEN}"}).status == 200
    page.close()


# --- helpers ------------------------------------------------------------------------------------


def _section(html: str, table_id: str) -> str:
    match = re.search(rf'<table id="{table_id}">(.*?)</table>', html, re.S)
    assert match, f"no table {table_id}"
    return match.group(1)


def _text(html: str) -> str:
    return " ".join(re.sub(r"<[^>]+>", " ", html).split())


def _escaped(value: str) -> str:
    from html import escape

    return escape(value, quote=False)

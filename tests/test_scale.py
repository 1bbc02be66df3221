"""Scale: users per min-speeches threshold, the corpus caches, the scale benchmark, and a Ray cluster run."""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
from collections import Counter
from pathlib import Path

import pytest

import shared.data.plays as plays
from deploy.flower import executable, flower_env, free_port, start_process, stop_process
from server.ledger import Ledger
from shared.data import DataError, load_corpus, shakespeare_users, users_per_threshold

# --- users per threshold -----------------------------------------------------------------------------


def _characters_with(speeches, threshold: int) -> int:
    """Counted here independently of shakespeare_users: (play, character) pairs with enough speeches."""
    return sum(1 for count in Counter((s.play, s.character) for s in speeches).values() if count >= threshold)


def test_users_per_threshold_counts_characters_with_enough_speeches():
    speeches = load_corpus()
    counts = users_per_threshold([60, 20, 5, 3, 2])
    assert counts == {threshold: _characters_with(speeches, threshold) for threshold in (60, 20, 5, 3, 2)}
    assert counts[60] == len(shakespeare_users(min_speeches=60))
    assert counts[3] >= 1000  # the corpus reaches a thousand users at min-speeches 3


def test_users_per_threshold_excludes_plays():
    speeches = [s for s in load_corpus() if s.play != "hamlet"]
    assert users_per_threshold([10], exclude_plays=["hamlet"]) == {10: _characters_with(speeches, 10)}


def test_users_per_threshold_refuses_a_threshold_below_two():
    with pytest.raises(DataError, match="at least 2"):
        users_per_threshold([5, 1])


def test_users_cli_prints_the_table(capsys):
    from shared.data.__main__ import main

    assert main(["users", "--min-speeches", "60", "2"]) == 0
    out = capsys.readouterr().out
    counts = users_per_threshold([60, 2])
    assert f"| 60 | {counts[60]} |" in out and f"| 2 | {counts[2]} |" in out


# --- caching -----------------------------------------------------------------------------------------


@pytest.fixture
def tiny_corpus(tmp_path, monkeypatch):
    """Two plays in a corpus of their own, with parse_play and split_texts counted."""
    for genre, play, speakers in (("comedies", "alpha", "AB" * 3), ("tragedies", "beta", "CCD")):
        lines = [f"**{name}**\n\nLine {i} of {name}.\n" for i, name in enumerate(speakers)]
        (tmp_path / genre).mkdir()
        (tmp_path / genre / f"{play}.md").write_text("# Act 1\n\n" + "\n".join(lines))
    monkeypatch.setattr(plays, "shakespeare_root", lambda: tmp_path)
    calls = Counter()

    def counted(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(plays, "parse_play", counted("parse", plays.parse_play))
    monkeypatch.setattr(plays, "split_texts", counted("split", plays.split_texts))
    return calls


def test_corpus_is_parsed_and_split_once_per_process(tiny_corpus):
    first = shakespeare_users(min_speeches=2, seed=123)
    assert [u.user_id for u in first] == ["alpha/A", "alpha/B", "beta/C"]  # D has a single speech
    assert tiny_corpus == {"parse": 2, "split": 3}
    second = shakespeare_users(min_speeches=2, seed=123)
    assert second == first and tiny_corpus == {"parse": 2, "split": 3}  # neither re-parsed nor re-split
    assert len(shakespeare_users(min_speeches=3, seed=123)) == 2  # another threshold: split again, not re-parsed
    assert tiny_corpus == {"parse": 2, "split": 5}


def test_cached_users_cannot_be_changed_through_a_returned_list(tiny_corpus):
    shakespeare_users(min_speeches=2, seed=7).clear()
    assert len(shakespeare_users(min_speeches=2, seed=7)) == 3


# --- parallel clients and the cluster address on the runner's command line ----------------------------


def test_cpus_per_client_defaults_to_every_core_and_refuses_zero(monkeypatch):
    from simulations.run import parse_args

    monkeypatch.setattr("os.cpu_count", lambda: 6)
    assert parse_args([]).cpus_per_client == 6  # one actor with every core
    assert parse_args(["--cpus-per-client", "2"]).cpus_per_client == 2
    with pytest.raises(SystemExit):
        parse_args(["--cpus-per-client", "0"])


def test_a_ray_address_reaches_the_simulation_as_RAY_ADDRESS(tmp_path, monkeypatch):
    from simulations.run import simulation_cli

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(tempfile, "mkdtemp", lambda prefix: str(tmp_path / prefix))  # no Ray folder left in /tmp
    assert simulation_cli(tmp_path / "a", "10.0.0.5:6379").env()["RAY_ADDRESS"] == "10.0.0.5:6379"
    assert "RAY_ADDRESS" not in simulation_cli(tmp_path / "b").env()


# --- the scale benchmark, at a tiny size ---------------------------------------------------------------


@pytest.mark.simulation
def test_scale_benchmark_measures_a_tiny_federation(tiny_base, tmp_path):
    from benchmarks.scale import measure

    row = measure(users=4, sampled=2, rounds=2, base=str(tiny_base), workdir=tmp_path, min_speeches=60,
                  extra={"base-dtype": "float32", "local-steps": 2, "seq-len": 32, "batch-size": 2,
                         "max-eval-blocks": 2})
    assert (row.users, row.sampled, row.rounds) == (4, 2, 2)
    assert row.results_per_round == [2, 2]  # every sampled client's result is in the ledger
    assert row.round_seconds > 0 and 0 < row.server_share < 1
    assert row.ledger_bytes_per_round > 0 and row.server_peak_mib > 0


# --- a Ray cluster: a head and a worker as separate processes -------------------------------------------


def _ray_node(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    return start_process([executable("ray"), "start", "--block", "--disable-usage-stats", *args], env, log)


def _wait_for_nodes(address: str, env: dict[str, str], count: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = subprocess.run([executable("ray"), "status", "--address", address], env=env, capture_output=True,
                                text=True, timeout=60)
        if status.returncode == 0 and status.stdout.count("node_") >= count:
            return
        time.sleep(2)
    raise AssertionError(f"the Ray cluster at {address} did not show {count} nodes within {timeout} s")


@pytest.mark.simulation
def test_federation_runs_on_an_existing_ray_cluster(tiny_base, tmp_path):
    """`ray start --head` with no CPUs and `ray start --address` with one: every client must run on the worker."""
    from simulations.run import run_simulation

    ray_tmp = Path(tempfile.mkdtemp(prefix="fg-rc-"))  # AF_UNIX socket paths must stay under 108 bytes
    env = flower_env(tmp_path / "ray-home", {"RAY_TMPDIR": str(ray_tmp)})
    port = free_port()
    address = f"127.0.0.1:{port}"
    head = _ray_node(["--head", "--port", str(port), "--num-cpus", "0", "--include-dashboard", "false",
                      "--temp-dir", str(ray_tmp)], env, tmp_path / "head.log")
    worker = None
    try:
        _wait_for_nodes(address, env, 1)
        worker = _ray_node(["--address", address, "--num-cpus", "1"], env, tmp_path / "worker.log")
        _wait_for_nodes(address, env, 2)
        run_config = {"base-model": str(tiny_base), "base-dtype": "float32", "num-server-rounds": 1,
                      "min-train-nodes": 3, "local-steps": 2, "batch-size": 2, "seq-len": 32, "max-eval-blocks": 2,
                      "min-speeches": 60, "node-wait-seconds": 120, "round-timeout": 900}
        result = run_simulation(3, run_config, tmp_path / "run", cpus_per_client=1, timeout=1800, ray_address=address)
        # Ray names an actor in its worker's log; the head has no CPUs, so every client actor was the worker's.
        actors = [log for log in (ray_tmp / "session_latest" / "logs").glob("worker-*")
                  if ":actor_name:ClientAppActor" in log.read_text(errors="replace")]
    finally:
        for node in (worker, head):
            if node is not None:
                stop_process(node, timeout=30)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    with Ledger(result.ledger_url, read_only=True) as ledger:
        (run,) = [r for r in ledger.runs() if r.flower_run_id == result.flower_run_id]
        train = [c for c in ledger.client_results(run.id, 1) if c.phase == "train"]
    assert actors, "no ClientAppActor ran on the cluster: the simulation started a Ray of its own"
    assert run.status == "completed"
    assert len(train) == 3 and all(c.status == "ok" for c in train)

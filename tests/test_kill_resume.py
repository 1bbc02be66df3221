"""A real server process killed mid-run (SIGKILL), then the run resumed from the ledger.

The resumed run must end where the same seeded run ends uninterrupted, bit for bit: the server
restores the adapters, FedAdam's moments and the round numbers, and every client draws its batches
and LoRA dropout from its seed and round alone, so the same arithmetic runs in the same order. The
two clients' updates are summed in whatever order they arrive, which is exact for two terms.
"""

from __future__ import annotations

import threading
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file

from server.ledger import Ledger
from simulations.run import SimulationError, SimulationResult, run_simulation

pytestmark = pytest.mark.simulation
ROUNDS, USERS = 5, 2  # rounds enough that a kill after round 1 lands before the last one


def server_processes(flwr_home: str) -> list[psutil.Process]:
    """The processes running our ServerApp: in simulation it runs inside ``flwr-simulation``.

    Only processes of this test's own Flower home are matched.
    """
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            ours = process.environ().get("FLWR_HOME") == flwr_home
        except (psutil.AccessDenied, psutil.NoSuchProcess):
            continue
        if ours and any(name in part for part in (process.info["cmdline"] or [])
                        for name in ("flwr-simulation", "flwr-serverapp")):
            found.append(process)
    return found


def round_committed(ledger_url: str, number: int) -> bool:
    try:
        with Ledger(ledger_url, read_only=True) as ledger:
            runs = ledger.runs()
            return bool(runs) and any(r.number == number and r.finished_at for r in ledger.rounds(runs[-1].id))
    except Exception:  # the ledger file may not exist yet
        return False


def kill_server_after_round(ledger_url: str, flwr_home: str, number: int, deadline: float) -> list[int]:
    """Wait until round ``number`` is committed, then SIGKILL the process running our ServerApp.

    The processes are found before the round ends and the ledger is polled often, so the kill lands
    right after the commit: scanning every process only then let fast rounds finish the whole run.
    """
    targets: list[psutil.Process] = []
    while time.monotonic() < deadline and not targets:
        targets = server_processes(flwr_home)
        time.sleep(0.05)
    while time.monotonic() < deadline and not round_committed(ledger_url, number):
        time.sleep(0.05)
    killed = []
    for process in targets + [p for p in server_processes(flwr_home) if p not in targets]:
        try:
            process.kill()
            killed.append(process.pid)
        except psutil.NoSuchProcess:
            continue
    return killed


def final_global_adapter(result: SimulationResult) -> dict[str, torch.Tensor]:
    """The global adapter the ServerApp saved at the end of the run (server/app.py)."""
    return load_file(result.workdir / "outputs" / f"run-{result.flower_run_id}" / "global-adapter"
                     / "adapter_model.safetensors")


def test_killed_server_resumes_from_the_last_committed_round(tiny_base, tmp_path):
    ledger_url = f"sqlite:///{tmp_path / 'ledger.db'}"
    run_config = {"base-model": str(tiny_base), "base-dtype": "float32", "num-server-rounds": ROUNDS,
                  "min-train-nodes": USERS, "local-steps": 4, "seq-len": 32, "batch-size": 2, "max-eval-blocks": 4,
                  "aggregation": "fedadam", "server-learning-rate": 0.05, "ledger-url": ledger_url,
                  "node-wait-seconds": 60, "round-timeout": 120}
    killed: list[int] = []
    flwr_home = str((tmp_path / "first" / "flwr-home").resolve())
    killer = threading.Thread(target=lambda: killed.extend(
        kill_server_after_round(ledger_url, flwr_home, 1, time.monotonic() + 300)))
    killer.start()
    with pytest.raises(SimulationError):
        run_simulation(USERS, run_config, tmp_path / "first", timeout=400)
    killer.join()
    assert killed, "no flwr-serverapp process was found to kill"

    with Ledger(ledger_url, read_only=True) as ledger:
        (crashed,) = ledger.runs()
        done_before = [r.number for r in ledger.rounds(crashed.id) if r.finished_at]
    assert crashed.status in ("running", "failed") and 1 in done_before and ROUNDS not in done_before, done_before

    result = run_simulation(USERS, {**run_config, "resume-run": crashed.id}, tmp_path / "second", timeout=400)
    with Ledger(ledger_url, read_only=True) as ledger:
        run = ledger.run(crashed.id)
        rounds = ledger.rounds(run.id)
        events = ledger.events(run.id)
        assert len(ledger.runs()) == 1  # the same ledger run continued
        assert run.status == "completed"
        assert [r.number for r in rounds] == list(range(1, ROUNDS + 1))  # no round twice, none missing
        assert all(r.finished_at and r.clients_replied == USERS for r in rounds)
        (resume,) = [e for e in events if e.kind == "resume"]
        assert result.flower_run_id in resume.message
        assert {"", "optimizer:global"} <= set(ledger.checkpoint_domains(run.id, ROUNDS))

    uninterrupted = run_simulation(USERS, {**run_config, "ledger-url": f"sqlite:///{tmp_path / 'reference.db'}"},
                                   tmp_path / "reference", timeout=400)
    expected, resumed = final_global_adapter(uninterrupted), final_global_adapter(result)
    assert expected.keys() == resumed.keys()
    for key, tensor in expected.items():
        assert torch.equal(resumed[key], tensor), key

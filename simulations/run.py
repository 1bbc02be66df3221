"""The main job: a simulated Shakespeare federation on Flower's Simulation Engine, then a report.

    python -m simulations.run                       # embedded defaults (SmolLM2 base, 6 users)
    python -m simulations.run --users 3 --rounds 2 --base path/to/hf-folder

It starts a private simulation SuperLink (its own ports and FLWR_HOME under the work folder, so
nothing leaks between runs), submits the app with ``flwr run``, streams its log lines and a live bar
per round read from the round ledger (simulations/progress.py), checks the run's final status with
``flwr list`` (``flwr run`` exits 0 even when a run fails), stops the SuperLink by PID, and prints
the per-user table from the round ledger.

Where the run config's ``device`` means a GPU on this machine (``auto`` with CUDA present, or
``cuda``), each simulated client asks Ray for ``gpus_per_client`` GPUs (default 1: one client at a
time per GPU); without one, Ray hides the GPUs from the clients and ``auto`` trains on the CPU.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from deploy.flower import (
    PROJECT_ROOT,
    FlowerCli,
    FlowerError,
    executable,
    exit_on_sigterm,
    format_config,
    free_port,
    parse_config,
    start_listening,
    stop_process,
    write_connection,
)
from compressor import prepare_base
from shared.config import FederationConfig
from shared.device import Device, resolve_device
from simulations.progress import LedgerProgress
from simulations.report import per_user_table, write_report

console = Console(stderr=False)
CONNECTION = "local"  # the SuperLink connection in the run's own FLWR_HOME: ":local:", our simulation SuperLink


@dataclass
class SimulationResult:
    flower_run_id: str
    status: str
    ledger_url: str
    workdir: Path
    seconds: float


class SimulationError(FlowerError):
    """Flower reported the simulated run as failed, or ``flwr run`` itself failed."""


def simulation_cli(flwr_home: Path, ray_address: str | None = None) -> FlowerCli:
    """The ``flwr`` CLI of one simulation: its own FLWR_HOME, pinned ports, its own Ray folder.

    With ``ray_address`` (``host:port`` of a cluster's head, started with ``ray start --head``) the
    simulation attaches to that cluster instead of starting Ray: Flower's Ray backend calls
    ``ray.init()`` without an address, which reads RAY_ADDRESS (docs/scale.md).
    """
    write_connection(flwr_home, CONNECTION, {"address": ":local:"})
    env = {
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        # Ray puts AF_UNIX sockets under RAY_TMPDIR, whose paths must stay under 108 bytes.
        "RAY_TMPDIR": tempfile.mkdtemp(prefix="fg-ray-"),
        "RAY_DEDUP_LOGS": "0",
    }
    if ray_address:
        env["RAY_ADDRESS"] = ray_address
    return FlowerCli(flwr_home, CONNECTION, env)


def start_superlink(cli: FlowerCli) -> subprocess.Popen:
    """A simulation SuperLink of our own, on the ports in the CLI's environment; waits until it answers."""
    env = cli.env()
    port = int(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"])
    command = [
        executable("flower-superlink"), "--insecure", "--simulation",
        "--isolation", "subprocess", "--database", str(cli.home / "state.db"),
        "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", str(port),
        "--control-api-address", f"127.0.0.1:{env['FLWR_LOCAL_CONTROL_API_PORT']}",
    ]
    return start_listening(command, env, cli.home / "superlink.log", "127.0.0.1", port, "flower-superlink")


def stop_strays(flwr_home: Path) -> None:
    """Kill what the SuperLink started in sessions of their own (flwr-simulation, Ray) for this home.

    They exit by themselves after a finished run, but not after an aborted one.
    """
    import psutil

    for process in psutil.process_iter():
        try:
            if process.environ().get("FLWR_HOME") == str(flwr_home):
                process.kill()
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue


def run_simulation(num_users: int, run_config: dict[str, object], workdir: Path, cpus_per_client: int = 2,
                   timeout: float = 3600, gpus_per_client: float | None = None,
                   ray_address: str | None = None) -> SimulationResult:
    """Run one simulated federation with ``flwr run``; SimulationError unless it completed.

    ``gpus_per_client``: Ray's ``client-resources-num-gpus`` (a fraction shares a GPU between clients);
    None: 1 where the run config's ``device`` resolves to a GPU here, else 0. ``ray_address``: run the
    clients on that existing Ray cluster (``host:port`` of its head) instead of a private Ray instance.
    DeviceUnavailable, before
    anything starts, for ``device = "cuda"`` on a machine without one. FlowerError when a Flower process
    does not start or cannot be asked for the run's status.
    """
    gpus = simulation_gpus(run_config, gpus_per_client)  # DeviceUnavailable before anything starts
    workdir = workdir.resolve()
    flwr_home = workdir / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    ledger_url = str(run_config.get("ledger-url") or f"sqlite:///{workdir / 'ledger.db'}")
    run_config = {"ledger-url": ledger_url, "output-dir": str(workdir / "outputs"), **run_config}
    cli = simulation_cli(flwr_home, ray_address)
    started = time.monotonic()
    try:
        superlink = start_superlink(cli)
        try:
            federation = {"num-supernodes": num_users, "client-resources-num-cpus": cpus_per_client,
                          "client-resources-num-gpus": gpus}
            rounds = int(run_config.get("num-server-rounds", FederationConfig.num_server_rounds))
            with LedgerProgress(ledger_url, rounds, console) as progress:
                run_id = _stream_run(cli, federation, run_config, timeout, progress)
            status = cli.status(run_id)
        finally:
            stop_process(superlink, timeout=20)
            stop_strays(flwr_home)
    finally:
        shutil.rmtree(cli.extra_env["RAY_TMPDIR"], ignore_errors=True)
    if status != "finished:completed":
        raise SimulationError(f"Flower run {run_id} ended as {status!r}; logs: {flwr_home / 'superlink.log'}")
    return SimulationResult(run_id, status, ledger_url, workdir, time.monotonic() - started)


def simulation_gpus(run_config: dict[str, object], gpus_per_client: float | None) -> float:
    """The GPUs each simulated client asks Ray for (see ``run_simulation``)."""
    device = resolve_device(str(run_config.get("device", FederationConfig.device)))
    if gpus_per_client is not None:
        return gpus_per_client
    return 1.0 if device.type == "cuda" else 0.0


def _stream_run(cli: FlowerCli, federation: dict[str, object], run_config: dict[str, object], timeout: float,
                progress: LedgerProgress) -> str:
    """Run ``flwr run --stream``, echo its progress lines, show the ledger's per round; return the Flower run id."""
    command = cli.command("run", str(PROJECT_ROOT), cli.connection, "--stream",
                          "--federation-config", format_config(federation), "--run-config", format_config(run_config))
    process = subprocess.Popen(command, env=cli.env(), cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, start_new_session=True)
    run_id, deadline = None, time.monotonic() + timeout
    assert process.stdout is not None
    for line in process.stdout:
        line = re.sub(r"\x1b\[[0-9;]*m", "", line.rstrip())
        if match := re.search(r"run (\d+)", line, re.IGNORECASE):
            run_id = run_id or match.group(1)
            progress.follow(run_id)
        if _is_progress(line):
            console.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {line.strip()}", highlight=False)
        if time.monotonic() > deadline:
            stop_process(process)
            raise SimulationError(f"the simulation did not finish within {timeout:.0f} s")
    process.wait()
    if process.returncode != 0 or run_id is None:
        raise SimulationError(f"`flwr run` failed (exit {process.returncode}); see the output above")
    return run_id


def _is_progress(line: str) -> bool:
    keys = ("ROUND", "aggregate_train", "aggregate_evaluate", "configure_train", "Received error", "Traceback",
            "ERROR", "Error:", "Successfully started", "finished in", "Waiting for nodes")
    return any(key in line for key in keys)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=6, help="simulated clients, one Shakespeare character each")
    parser.add_argument("--rounds", type=int, default=3, help="federated rounds")
    parser.add_argument("--base", default="compressed",
                        help="base model: compressed[:recipe.toml|:name] (default: built from the SmolLM2 teacher by "
                             "the shipped recipe), emulator (the shipped emulator recipe: adapters also run on the "
                             "teacher), smollm2, a .gguf file, an HF folder or hub id")
    parser.add_argument("--workdir", type=Path, default=PROJECT_ROOT / "runs" / time.strftime("%Y%m%d-%H%M%S"))
    parser.add_argument("--run-config", default="", help="extra 'key=value ...' run-config overrides")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before the simulation is stopped")
    parser.add_argument("--cpus-per-client", type=int, default=None,
                        help="CPUs Ray gives each simulated client (a whole number): the cores divided by this are "
                             "the clients training at once, one Ray actor each (memory per actor: docs/scale.md); "
                             "default all cores: one actor")
    parser.add_argument("--ray-address", default=None,
                        help="host:port of an existing Ray cluster's head (ray start --head) to run the clients "
                             "on, instead of a private Ray instance on this machine (docs/scale.md)")
    parser.add_argument("--gpus-per-client", type=float, default=None,
                        help="GPUs Ray gives each simulated client (0.5: two share one); default 1 where the "
                             "run config's device means a GPU here, else 0")
    args = parser.parse_args(argv)
    if args.gpus_per_client is not None and args.gpus_per_client < 0:
        parser.error(f"--gpus-per-client must be >= 0, got {args.gpus_per_client}")
    if args.cpus_per_client is not None and args.cpus_per_client <= 0:
        parser.error(f"--cpus-per-client must be > 0, got {args.cpus_per_client}")
    if args.cpus_per_client is None:
        # One actor with every core: on a small machine one actor with all cores beats two with half each.
        args.cpus_per_client = os.cpu_count() or 1
    return args


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()
    args = parse_args(argv)
    try:
        overrides = parse_config(args.run_config)
        device = Device(str(overrides.get("device", FederationConfig.device)))
        resolve_device(device)  # before the base is built: cuda without one fails now, not in every client
    except (FlowerError, ValueError) as error:
        console.print(f"[bold red]--run-config:[/] {error}")
        return 2
    console.rule("[bold]fedgraft: simulated Shakespeare federation")
    console.print(f"Preparing base {args.base!r} (a compressed base is built, a GGUF converted, once; then cached)")
    folder, excluded = prepare_base(args.base, device)
    base = str(folder)
    # By default one actor runs the clients one after another: a round lasts the sum of them (--cpus-per-client).
    run_config = {"base-model": base, "exclude-plays": ",".join(excluded), "num-server-rounds": args.rounds,
                  "min-train-nodes": min(args.users, 2), "round-timeout": 3600, "state-dir": str(args.workdir.absolute() / "devices"),
                  **overrides}
    console.print(f"{args.users} clients, {args.rounds} rounds, base {args.base!r} ({base}), work folder {args.workdir}")
    try:
        result = run_simulation(args.users, run_config, args.workdir, cpus_per_client=args.cpus_per_client,
                                timeout=args.timeout, gpus_per_client=args.gpus_per_client,
                                ray_address=args.ray_address)
    except FlowerError as error:
        console.print(f"[bold red]Simulation failed:[/] {error}")
        return 1
    table = per_user_table(result.ledger_url, result.flower_run_id)
    console.print(table.to_rich())
    report = write_report(result.ledger_url, result.flower_run_id, args.workdir / "report.md", wall_seconds=result.seconds)
    if not table.rows:  # Flower reports a run whose every client failed as completed
        console.print(f"[bold red]No user was evaluated:[/] every client failed; see the ledger's events "
                      f"(.venv/bin/fedgraft-ops events {result.flower_run_id} --db {result.ledger_url})")
        return 1
    console.print(f"Run {result.flower_run_id} completed in {result.seconds / 60:.1f} min. "
                  f"Ledger: {result.ledger_url}  Report: {report}")
    console.print("Use a user's model: .venv/bin/python -m client.use generate "
                  f"--state-dir {run_config['state-dir']} --user {table.rows[0].user_id!r} --prompt 'My lord,'")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The main job: a simulated Shakespeare federation on Flower's Simulation Engine, then a report.

    python -m simulations.run                       # embedded defaults (SmolLM2 base, 6 users)
    python -m simulations.run --users 3 --rounds 2 --base path/to/hf-folder

It starts a private simulation SuperLink (its own ports and FLWR_HOME under the work folder, so
nothing leaks between runs), submits the app with ``flwr run``, streams progress, checks the run's
final status with ``flwr list`` (``flwr run`` exits 0 even when a run fails), stops the SuperLink
by PID, and prints the per-user table from the round ledger.
"""

from __future__ import annotations

import argparse
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


def simulation_cli(flwr_home: Path) -> FlowerCli:
    """The ``flwr`` CLI of one simulation: its own FLWR_HOME, pinned ports, its own Ray folder."""
    write_connection(flwr_home, CONNECTION, {"address": ":local:"})
    return FlowerCli(flwr_home, CONNECTION, {
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
        "FLWR_LOCAL_CONTROL_API_PORT": str(free_port()),
        # Ray puts AF_UNIX sockets under RAY_TMPDIR, whose paths must stay under 108 bytes.
        "RAY_TMPDIR": tempfile.mkdtemp(prefix="fg-ray-"),
        "RAY_DEDUP_LOGS": "0",
    })


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
                   timeout: float = 3600) -> SimulationResult:
    """Run one simulated federation with ``flwr run``; SimulationError unless it completed.

    FlowerError when a Flower process does not start or cannot be asked for the run's status.
    """
    workdir = workdir.resolve()
    flwr_home = workdir / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    ledger_url = str(run_config.get("ledger-url") or f"sqlite:///{workdir / 'ledger.db'}")
    run_config = {"ledger-url": ledger_url, "output-dir": str(workdir / "outputs"), **run_config}
    cli = simulation_cli(flwr_home)
    started = time.monotonic()
    try:
        superlink = start_superlink(cli)
        try:
            federation = {"num-supernodes": num_users, "client-resources-num-cpus": cpus_per_client}
            run_id = _stream_run(cli, federation, run_config, timeout)
            status = cli.status(run_id)
        finally:
            stop_process(superlink, timeout=20)
            stop_strays(flwr_home)
    finally:
        shutil.rmtree(cli.extra_env["RAY_TMPDIR"], ignore_errors=True)
    if status != "finished:completed":
        raise SimulationError(f"Flower run {run_id} ended as {status!r}; logs: {flwr_home / 'superlink.log'}")
    return SimulationResult(run_id, status, ledger_url, workdir, time.monotonic() - started)


def _stream_run(cli: FlowerCli, federation: dict[str, object], run_config: dict[str, object], timeout: float) -> str:
    """Run ``flwr run --stream``, echo round progress, return the Flower run id."""
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
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()
    args = parse_args(argv)
    try:
        overrides = parse_config(args.run_config)
    except FlowerError as error:
        console.print(f"[bold red]--run-config:[/] {error}")
        return 2
    console.rule("[bold]fedgraft: simulated Shakespeare federation")
    console.print(f"Preparing base {args.base!r} (a compressed base is built, a GGUF converted, once; then cached)")
    folder, excluded = prepare_base(args.base)
    base = str(folder)
    # Simulated clients share one actor and run one after another: a round lasts the sum of them.
    run_config = {"base-model": base, "exclude-plays": ",".join(excluded), "num-server-rounds": args.rounds,
                  "min-train-nodes": min(args.users, 2), "round-timeout": 3600, "state-dir": str(args.workdir.absolute() / "devices"),
                  **overrides}
    console.print(f"{args.users} clients, {args.rounds} rounds, base {args.base!r} ({base}), work folder {args.workdir}")
    try:
        result = run_simulation(args.users, run_config, args.workdir, timeout=args.timeout)
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

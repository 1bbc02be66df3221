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
import json
import os
import re
import signal
import socket
import subprocess
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console

from shared.base_model import compressed_recipe, materialize_base
from simulations.report import per_user_table, write_report

PROJECT_ROOT = Path(__file__).resolve().parents[1]
console = Console(stderr=False)


@dataclass
class SimulationResult:
    flower_run_id: str
    status: str
    ledger_url: str
    workdir: Path
    seconds: float


class SimulationError(RuntimeError):
    """The simulation could not start, or Flower reported the run as failed."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flower_env(flwr_home: Path, http_port: int, control_port: int) -> dict[str, str]:
    """Environment for the SuperLink and the CLI: offline, private home, pinned ports."""
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(flwr_home),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # The SuperLink would `uv sync` a fresh venv per run: offline it fails, online it downloads torch.
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
        "FLWR_LOCAL_CONTROL_API_PORT": str(control_port),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # Ray puts AF_UNIX sockets under RAY_TMPDIR, whose paths must stay under 108 bytes.
        "RAY_TMPDIR": tempfile.mkdtemp(prefix="fg-ray-"),
        "RAY_DEDUP_LOGS": "0",
        "TOKENIZERS_PARALLELISM": "false",
        # The SuperLink starts flwr-simulation by name: it must be this venv's, not another on PATH.
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    })
    return env


def start_superlink(flwr_home: Path, env: dict[str, str]) -> subprocess.Popen:
    """A simulation SuperLink of our own, on the ports in ``env``; waits until it answers."""
    (flwr_home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    log = open(flwr_home / "superlink.log", "ab")
    command = [
        str(Path(sys.executable).with_name("flower-superlink")), "--insecure", "--simulation",
        "--isolation", "subprocess", "--database", str(flwr_home / "state.db"),
        "--disable-runtime-dependency-installation", "--host", "127.0.0.1", "--port", env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"],
        "--control-api-address", f"127.0.0.1:{env['FLWR_LOCAL_CONTROL_API_PORT']}",
    ]
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SimulationError(f"flower-superlink exited with code {process.returncode}; see {flwr_home / 'superlink.log'}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", int(env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]))) == 0:
                return process
        time.sleep(0.3)
    stop_process_group(process)
    raise SimulationError("flower-superlink did not start within 60 s")


def stop_process_group(process: subprocess.Popen) -> None:
    """Stop a process we started and everything it spawned (Ray workers included)."""
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait(timeout=10)


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


def _flwr(*args: str) -> list[str]:
    return [str(Path(sys.executable).with_name("flwr")), *args]


def format_run_config(values: dict[str, object]) -> str:
    """``key=value`` pairs as ``flwr run --run-config`` takes them (strings quoted)."""
    def render(value: object) -> str:
        return json.dumps(value) if isinstance(value, str) else str(value).lower() if isinstance(value, bool) else str(value)
    return " ".join(f"{key}={render(value)}" for key, value in values.items())


def run_simulation(num_users: int, run_config: dict[str, object], workdir: Path, cpus_per_client: int = 2,
                   timeout: float = 3600) -> SimulationResult:
    """Run one simulated federation with ``flwr run``; raise SimulationError unless it completed."""
    workdir = workdir.resolve()
    flwr_home = workdir / "flwr-home"
    flwr_home.mkdir(parents=True, exist_ok=True)
    ledger_url = str(run_config.get("ledger-url") or f"sqlite:///{workdir / 'ledger.db'}")
    run_config = {"ledger-url": ledger_url, "output-dir": str(workdir / "outputs"), **run_config}
    env = flower_env(flwr_home, free_port(), free_port())
    started = time.monotonic()
    superlink = start_superlink(flwr_home, env)
    try:
        command = _flwr("run", str(PROJECT_ROOT), "local", "--stream",
                        "--federation-config", f"num-supernodes={num_users} client-resources-num-cpus={cpus_per_client}",
                        "--run-config", format_run_config(run_config))
        run_id = _stream_run(command, env, timeout)
        status = _run_status(run_id, env)
    finally:
        stop_process_group(superlink)
        stop_strays(flwr_home)
        shutil.rmtree(env["RAY_TMPDIR"], ignore_errors=True)
    if status != "finished:completed":
        raise SimulationError(f"Flower run {run_id} ended as {status!r}; logs: {flwr_home / 'superlink.log'}")
    return SimulationResult(run_id, status, ledger_url, workdir, time.monotonic() - started)


def _stream_run(command: list[str], env: dict[str, str], timeout: float) -> str:
    """Run ``flwr run --stream``, echo round progress, return the Flower run id."""
    process = subprocess.Popen(command, env=env, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
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
            stop_process_group(process)
            raise SimulationError(f"the simulation did not finish within {timeout:.0f} s")
    process.wait()
    if process.returncode != 0 or run_id is None:
        raise SimulationError(f"`flwr run` failed (exit {process.returncode}); see the output above")
    return run_id


def _is_progress(line: str) -> bool:
    keys = ("ROUND", "aggregate_train", "aggregate_evaluate", "configure_train", "Received error", "Traceback",
            "ERROR", "Error:", "Successfully started", "finished in", "Waiting for nodes")
    return any(key in line for key in keys)


def _run_status(run_id: str, env: dict[str, str]) -> str:
    output = subprocess.run(_flwr("list", "--run-id", run_id, "--format", "json"), env=env, cwd=PROJECT_ROOT,
                            capture_output=True, text=True, timeout=60).stdout
    try:
        runs = json.loads(output[output.index("{"):])
        return str(runs["runs"][0]["status"])
    except (ValueError, KeyError, IndexError) as error:
        raise SimulationError(f"cannot read the status of run {run_id} from `flwr list`: {output[-500:]!r}") from error


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=6, help="simulated clients, one Shakespeare character each")
    parser.add_argument("--rounds", type=int, default=3, help="federated rounds")
    parser.add_argument("--base", default="compressed",
                        help="base model: compressed[:recipe.toml] (default: built from the SmolLM2 teacher by the "
                             "shipped recipe), smollm2, a .gguf file, an HF folder or hub id")
    parser.add_argument("--workdir", type=Path, default=PROJECT_ROOT / "runs" / time.strftime("%Y%m%d-%H%M%S"))
    parser.add_argument("--run-config", default="", help="extra 'key=value ...' run-config overrides")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before the simulation is stopped")
    return parser.parse_args(argv)


def parse_overrides(text: str) -> dict[str, object]:
    """'a=1 b="x y"' -> {'a': 1, 'b': 'x y'}, values read as TOML scalars."""
    import shlex
    import tomllib
    overrides: dict[str, object] = {}
    for item in shlex.split(text):
        key, _, value = item.partition("=")
        try:
            overrides[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            overrides[key] = value
    return overrides


def exit_on_sigterm() -> None:
    """Turn SIGTERM into an exception so `finally` blocks stop the SuperLink and its Ray workers."""
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)


def prepare_base(spec: str) -> tuple[str, list[str]]:
    """(folder the clients load, plays kept out of the federation) for a base spec.

    A compressed base is healed on public plays; the federation must not contain them.
    """
    recipe = compressed_recipe(spec)
    if recipe is None:
        with console.status("Preparing the base model (a GGUF is converted once, then cached)..."):
            return str(materialize_base(spec)), []
    from shared.compression.pipeline import build_compressed_base
    from shared.compression.recipe import load_recipe

    loaded = load_recipe(recipe or None)
    console.print(f"Compressed base: recipe {loaded.name!r} (built once, then cached)")
    return str(build_compressed_base(loaded)), list(loaded.public_plays)


def main(argv: list[str] | None = None) -> int:
    exit_on_sigterm()
    args = parse_args(argv)
    console.rule("[bold]fedgraft: simulated Shakespeare federation")
    base, excluded = prepare_base(args.base)
    # Simulated clients share one actor and run one after another: a round lasts the sum of them.
    run_config = {"base-model": base, "exclude-plays": ",".join(excluded), "num-server-rounds": args.rounds,
                  "min-train-nodes": min(args.users, 2), "round-timeout": 3600, "state-dir": str(args.workdir.absolute() / "devices"),
                  **parse_overrides(args.run_config)}
    console.print(f"{args.users} clients, {args.rounds} rounds, base {args.base!r} ({base}), work folder {args.workdir}")
    try:
        result = run_simulation(args.users, run_config, args.workdir, timeout=args.timeout)
    except SimulationError as error:
        console.print(f"[bold red]Simulation failed:[/] {error}")
        return 1
    table = per_user_table(result.ledger_url, result.flower_run_id)
    console.print(table.to_rich())
    report = write_report(result.ledger_url, result.flower_run_id, args.workdir / "report.md", wall_seconds=result.seconds)
    console.print(f"Run {result.flower_run_id} completed in {result.seconds / 60:.1f} min. "
                  f"Ledger: {result.ledger_url}  Report: {report}")
    if table.rows:
        console.print("Use a user's model: .venv/bin/python -m client.use generate "
                      f"--state-dir {run_config['state-dir']} --user {table.rows[0].user_id!r} --prompt 'My lord,'")
    return 0


if __name__ == "__main__":
    sys.exit(main())

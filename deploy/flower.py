"""The Flower process kit: environment, executables, ports, processes, config text and the ``flwr`` CLI.

Everything that starts, talks to or stops a Flower process goes through here: the operator and
device commands (``deploy.superlink``, ``deploy.device``), the loopback federation, the simulation
runner (``simulations.run``) and the deployment benchmark.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

# The Flower app (pyproject.toml with [tool.flwr.app]) that `flwr run` submits: this repository.
PROJECT_ROOT = Path(__file__).resolve().parents[1]


class FlowerError(RuntimeError):
    """Starting, calling or stopping a Flower process failed; the message says which and what to do."""


# --- environment and executables -------------------------------------------------------------------


def executable(name: str) -> str:
    """A Flower (or other) executable, preferring the one next to this Python (the project's venv)."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise FlowerError(f"`{name}` not found next to {sys.executable} nor on PATH; activate the project's venv")
    return found


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None, offline: bool = True) -> dict[str, str]:
    """Environment for a Flower process or CLI call: its own FLWR_HOME, no telemetry, offline unless told.

    The venv's bin folder goes first on PATH: flower-superlink and flower-supernode start
    ``flower-superexec``, ``flwr-serverapp``, ``flwr-simulation`` and ``flwr-clientapp`` by bare name.
    ``offline=False`` leaves the model hub reachable (a device whose users come from a hub dataset).
    """
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(Path(flwr_home).resolve()),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        # A SuperLink would `uv sync` a fresh venv per run: offline it fails, online it downloads torch.
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    })
    if offline:
        env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    env.update(extra or {})
    return env


# --- ports -----------------------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen | None = None,
                  what: str = "process", log: Path | None = None) -> None:
    """Return once ``host:port`` accepts connections; FlowerError if ``process`` dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise FlowerError(f"{what} exited with code {process.returncode} before listening on {host}:{port}"
                              + (f"; see {log}" if log else ""))
        if _port_open(host, port):
            return
        time.sleep(0.3)
    raise FlowerError(f"{what} did not listen on {host}:{port} within {timeout:.0f} s" + (f"; see {log}" if log else ""))


# --- starting and stopping processes ---------------------------------------------------------------


def start_process(command: list[str], env: Mapping[str, str] | None, log: Path,
                  cwd: Path = PROJECT_ROOT) -> subprocess.Popen:
    """Start ``command`` detached in a session of its own, appending its output to ``log``.

    Its own session makes it the leader of a process group that ``stop_process`` can signal whole.
    ``env`` None: this process's environment.
    """
    with open(log, "ab") as out:
        return subprocess.Popen(command, env=None if env is None else dict(env), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=cwd)


def start_listening(command: list[str], env: Mapping[str, str] | None, log: Path, host: str, port: int, what: str,
                    timeout: float = 60, cwd: Path = PROJECT_ROOT) -> subprocess.Popen:
    """``start_process``, then wait until it listens on ``host:port``; stopped again if it does not."""
    process = start_process(command, env, log, cwd)
    try:
        wait_for_port(host, port, timeout, process, what, log)
    except BaseException:
        stop_process(process)
        raise
    return process


def _descendants(pid: int) -> list[int]:
    try:
        import psutil
    except ImportError:  # psutil comes with flwr[simulation] (ray); without it only the process group is stopped
        return []
    try:
        return [child.pid for child in psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return []


def _signal(pid: int, sig: int, group: bool) -> None:
    try:
        if group:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie we are the parent of
        finished, _ = os.waitpid(pid, os.WNOHANG)
        return finished == 0
    except ChildProcessError:
        return True


def stop_process(process: subprocess.Popen | int, timeout: float = 15.0, hard: bool = False) -> None:
    """Stop a process started in its own session, its process group, and every descendant.

    Flower starts some helpers in new sessions (the SuperLink's flower-superexec), so the process
    group alone is not enough: descendants are collected first and signalled by PID.
    SIGTERM first (SIGKILL right away if ``hard``), SIGKILL after ``timeout`` seconds.
    """
    pid = process if isinstance(process, int) else process.pid
    if isinstance(process, subprocess.Popen) and process.poll() is not None:
        pids = []
    else:
        pids = [pid]
    pids += _descendants(pid)
    first = signal.SIGKILL if hard else signal.SIGTERM
    _signal(pid, first, group=True)
    for child in pids:
        _signal(child, first, group=False)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.2)
    _signal(pid, signal.SIGKILL, group=True)
    for child in pids:
        if _alive(child):
            _signal(child, signal.SIGKILL, group=False)
    if isinstance(process, subprocess.Popen):
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit so ``finally`` blocks and ``with`` exits stop what this process started."""
    def handler(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)
    signal.signal(signal.SIGTERM, handler)


# --- config text -----------------------------------------------------------------------------------


def render_value(value: object) -> str:
    """A TOML scalar as Flower's ``key=value`` parser takes it (strings double-quoted, TOML escapes).

    Flower cuts a quoted value at its next double quote (its regex knows no escapes), so a string
    with a double quote cannot travel; backslashes, newlines and non-ASCII text are escaped for TOML.
    """
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if '"' in text:
        raise FlowerError(f"config value {text!r} may not contain a double quote")
    # JSON's string escapes (\\, \n, \uXXXX for control characters) are TOML's; raw non-ASCII is valid TOML.
    return json.dumps(text, ensure_ascii=False)


def format_config(values: Mapping[str, object]) -> str:
    """``{'a': 1, 'b': 'x y'}`` -> ``a=1 b="x y"`` (for ``--run-config``, ``--node-config``, ``--federation-config``)."""
    for key in values:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
            raise FlowerError(f"config key {key!r} must be letters, digits, '-' or '_'")
    return " ".join(f"{key}={render_value(value)}" for key, value in values.items())


def parse_config(text: str) -> dict[str, object]:
    """``a=1 b="x y"`` -> ``{'a': 1, 'b': 'x y'}``, values read as TOML scalars (bare words as strings)."""
    values: dict[str, object] = {}
    for item in shlex.split(text):
        key, sep, value = item.partition("=")
        if not sep:
            raise FlowerError(f"config item {item!r} is not key=value")
        try:
            values[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            values[key] = value
    return values


def write_connection(flwr_home: Path, name: str, entry: Mapping[str, object]) -> Path:
    """Add (or replace) the SuperLink connection ``name`` in ``$FLWR_HOME/config.toml``, keeping the others.

    Keys as Flower 1.42 reads them (flwr.cli.constant.SuperLinkConnectionTomlKey): ``address``
    (``":local:"`` for a local simulation SuperLink), ``root-certificates`` (an absolute path) or
    ``insecure = true``. The first connection written becomes the default.
    """
    import tomli_w  # a dependency of flwr

    path = Path(flwr_home) / "config.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    config = tomllib.loads(path.read_text()) if path.exists() else {}
    superlink = config.setdefault("superlink", {})
    superlink[name] = dict(entry)
    superlink.setdefault("default", name)
    # `default` first in the table, for whoever reads the file; TOML does not care.
    config["superlink"] = {"default": superlink.pop("default"), **superlink}
    path.write_text(tomli_w.dumps(config))
    return path


# --- the flwr CLI ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class FlowerCli:
    """The ``flwr`` CLI bound to one FLWR_HOME and one SuperLink connection of its config.toml."""

    home: Path
    connection: str
    extra_env: Mapping[str, str] = field(default_factory=dict)

    def env(self) -> dict[str, str]:
        return flower_env(self.home, self.extra_env)

    def command(self, *args: str) -> list[str]:
        return [executable("flwr"), *args]

    def call(self, args: Iterable[str], timeout: float = 120, cwd: Path = PROJECT_ROOT) -> subprocess.CompletedProcess:
        """Run ``flwr ARGS``; output captured as text."""
        args = list(args)
        try:
            return subprocess.run(self.command(*args), env=self.env(), cwd=cwd, capture_output=True, text=True,
                                  timeout=timeout)
        except subprocess.TimeoutExpired as error:
            raise FlowerError(f"`flwr {' '.join(args)}` did not finish within {timeout:.0f} s") from error

    def json(self, args: Iterable[str], what: str, timeout: float = 120, cwd: Path = PROJECT_ROOT) -> dict:
        """The JSON object ``flwr ARGS --format json`` printed; FlowerError with its output if none."""
        result = self.call([*args, "--format", "json"], timeout, cwd)
        text = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout or "")
        start = text.find("{")
        if start >= 0:
            try:
                value, _ = json.JSONDecoder().raw_decode(text[start:])
                if isinstance(value, dict):
                    return value
            except ValueError:
                pass
        raise FlowerError(f"{what}: no JSON in the output of flwr (exit {result.returncode}): "
                          f"{(result.stdout or '')[-800:]!r} {(result.stderr or '')[-800:]!r}")

    def submit(self, run_config: Mapping[str, object] | str, app: Path = PROJECT_ROOT, timeout: float = 180) -> str:
        """``flwr run APP CONNECTION --run-config ...``; Flower's run id (a string: it is unsigned 64-bit)."""
        args = ["run", str(Path(app).resolve()), self.connection]
        text = run_config if isinstance(run_config, str) else format_config(run_config)
        if text:
            args += ["--run-config", text]
        payload = self.json(args, "submitting the run", timeout, cwd=Path(app))
        if not payload.get("success") or not payload.get("run-id"):
            raise FlowerError(f"`flwr run` did not start a run: {payload}")
        return str(payload["run-id"])

    def status(self, run_id: str) -> str:
        """Flower's status of a run, e.g. ``running``, ``finished:completed``, ``finished:failed``."""
        payload = self.json(["list", self.connection, "--run-id", str(run_id)], f"reading the status of run {run_id}")
        try:
            return str(payload["runs"][0]["status"])
        except (KeyError, IndexError) as error:
            raise FlowerError(f"no status for run {run_id} in {payload}") from error

    def wait(self, run_id: str, timeout: float, poll: float = 5.0) -> str:
        """Poll until the run is finished; its final status. FlowerError after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            status = self.status(run_id)
            if status.startswith("finished"):
                return status
            if time.monotonic() > deadline:
                raise FlowerError(f"run {run_id} still {status!r} after {timeout:.0f} s")
            time.sleep(poll)

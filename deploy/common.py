"""What the operator and device commands share: environment, executables, ports, processes, configs."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# Exit status of flower-supernode when the SuperLink refuses it (unregistered key, unreachable, ...).
SUPERNODE_CONNECTION_ERROR = 305


class DeployError(RuntimeError):
    """A deployment step failed; the message says which and what to do."""


def executable(name: str) -> str:
    """A Flower (or other) executable, preferring the one next to this Python (the project's venv)."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise DeployError(f"`{name}` not found next to {sys.executable} nor on PATH; activate the project's venv")
    return found


def flower_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a Flower process or CLI call: its own FLWR_HOME, offline, no telemetry.

    The venv's bin folder goes first on PATH: flower-superlink and flower-supernode start
    ``flower-superexec``, ``flwr-serverapp`` and ``flwr-clientapp`` by bare name.
    """
    env = dict(os.environ)
    env.update({
        "FLWR_HOME": str(Path(flwr_home).resolve()),
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONUNBUFFERED": "1",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
    })
    env.update(extra or {})
    return env


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def port_open(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((host, port)) == 0


def wait_for_port(host: str, port: int, timeout: float, process: subprocess.Popen | None = None,
                  what: str = "process", log: Path | None = None) -> None:
    """Return once ``host:port`` accepts connections; DeployError if ``process`` dies or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise DeployError(f"{what} exited with code {process.returncode} before listening on {host}:{port}"
                              + (f"; see {log}" if log else ""))
        if port_open(host, port):
            return
        time.sleep(0.3)
    raise DeployError(f"{what} did not listen on {host}:{port} within {timeout:.0f} s" + (f"; see {log}" if log else ""))


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


def render_value(value: object) -> str:
    """A TOML scalar as Flower's ``key=value`` parser takes it (strings double-quoted)."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, float)):
        return repr(value)
    text = str(value)
    if '"' in text or "\\" in text or "\n" in text:
        # Flower splits key=value pairs with a regex that does not understand escapes.
        raise DeployError(f"config value {text!r} may not contain a double quote, backslash or newline")
    return f'"{text}"'


def format_config(values: Mapping[str, object]) -> str:
    """``{'a': 1, 'b': 'x y'}`` -> ``a=1 b="x y"`` (for ``--run-config`` and ``--node-config``)."""
    for key in values:
        if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
            raise DeployError(f"config key {key!r} must be letters, digits, '-' or '_'")
    return " ".join(f"{key}={render_value(value)}" for key, value in values.items())


def parse_config(text: str) -> dict[str, object]:
    """``a=1 b="x y"`` -> ``{'a': 1, 'b': 'x y'}``, values read as TOML scalars (bare words as strings)."""
    import shlex
    import tomllib
    values: dict[str, object] = {}
    for item in shlex.split(text):
        key, sep, value = item.partition("=")
        if not sep:
            raise DeployError(f"config item {item!r} is not key=value")
        try:
            values[key] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError:
            values[key] = value
    return values


def flwr(args: Iterable[str], flwr_home: Path, timeout: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run the ``flwr`` CLI with this deployment's FLWR_HOME; output captured as text."""
    command = [executable("flwr"), *args]
    try:
        return subprocess.run(command, env=flower_env(flwr_home), cwd=cwd or PROJECT_ROOT, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as error:
        raise DeployError(f"`flwr {' '.join(args)}` did not finish within {timeout:.0f} s") from error


def json_output(result: subprocess.CompletedProcess, what: str) -> dict:
    """The JSON object a ``flwr ... --format json`` call printed; DeployError with its output if none."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout or "")
    start = text.find("{")
    if start >= 0:
        try:
            value, _ = json.JSONDecoder().raw_decode(text[start:])
            if isinstance(value, dict):
                return value
        except ValueError:
            pass
    raise DeployError(f"{what}: no JSON in the output of flwr (exit {result.returncode}): "
                      f"{(result.stdout or '')[-800:]!r} {(result.stderr or '')[-800:]!r}")

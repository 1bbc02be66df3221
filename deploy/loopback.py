"""A whole secured federation on one machine: one SuperLink and N SuperNodes as separate processes.

For tests, benchmarks and trying the deployment out; every process is started through the same
commands an operator and a device owner type (``python -m deploy.superlink start``,
``python -m deploy.device start``), and every one is stopped by PID (with its descendants) on exit.

    with LoopbackFederation(workdir) as federation:
        federation.start_superlink()
        federation.add_device("dev0", base="/path/to/base", user="macbeth/MACBETH")
        federation.wait_online(1)
        run_id = federation.submit({"num-server-rounds": 2, ...})
        federation.wait_for_run(run_id, timeout=600)
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from deploy import superlink as operator
from deploy.flower import FlowerError, free_port, start_listening, start_process, stop_process
from deploy.device import keygen

NODE_ID_LINE = re.compile(r"SuperNode ID: (\d+)")


@dataclass
class DeviceProcess:
    """One device of the loopback federation: its key, registration and (current) SuperNode process."""

    name: str
    state_dir: Path
    key: Path
    base: str
    user: str | None = None
    data: Path | None = None
    node_id: str | None = None  # from the registration
    process: subprocess.Popen | None = None
    starts: int = 0
    extra_args: list[str] = field(default_factory=list)
    via_proxy: bool = False  # reach the SuperLink through the fleet proxy instead of directly

    @property
    def log(self) -> Path:
        return self.state_dir / "supernode.log"

    def logged_node_ids(self) -> list[str]:
        """Node ids the SuperNode printed at each start (``SuperNode ID: ...``)."""
        return NODE_ID_LINE.findall(self.log.read_text(errors="replace")) if self.log.exists() else []


class LoopbackFederation:
    """A SuperLink (TLS + node authentication) and SuperNodes on 127.0.0.1, all stopped on exit."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.settings = operator.prepare(self.root / "operator", port=port or free_port())
        self.superlink: subprocess.Popen | None = None
        self.proxy: subprocess.Popen | None = None
        self.proxy_address: str | None = None
        self.devices: dict[str, DeviceProcess] = {}

    def __enter__(self) -> "LoopbackFederation":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    # --- processes ------------------------------------------------------------------------------

    @staticmethod
    def _module(*args: str) -> list[str]:
        """``python -m ARGS`` with this interpreter: the commands an operator or a device owner types."""
        return [sys.executable, "-m", *args]

    def start_superlink(self, timeout: float = 60) -> subprocess.Popen:
        """``python -m deploy.superlink start`` (it execs flower-superlink: same PID); waits until it listens."""
        command = self._module("deploy.superlink", "start", "--dir", str(self.settings.root))
        self.superlink = start_listening(command, None, self.settings.log_file, "127.0.0.1", self.settings.port,
                                         "flower-superlink", timeout)
        return self.superlink

    def start_fleet_proxy(self, timeout: float = 60) -> str:
        """``python -m deploy.fleet_proxy`` on a free loopback port; returns its HOST:PORT."""
        port = free_port()
        command = self._module("deploy.fleet_proxy", "--dir", str(self.settings.root), "--host", "127.0.0.1",
                               "--port", str(port))
        self.proxy = start_listening(command, None, self.settings.root / "fleet-proxy.log", "127.0.0.1", port,
                                     "the fleet proxy", timeout)
        self.proxy_address = f"127.0.0.1:{port}"
        return self.proxy_address

    def new_device(self, name: str, base: str | Path, user: str | None = None, data: Path | None = None,
                   register: bool = True, extra_args: list[str] | None = None, via_proxy: bool = False) -> DeviceProcess:
        """Make a device's key pair and state folder, and register its key unless ``register`` is False."""
        state_dir = self.root / "devices" / name
        state_dir.mkdir(parents=True, exist_ok=True)
        key, public = keygen(self.root / "keys" / name, force=True)
        device = DeviceProcess(name, state_dir, key, str(base), user, data, extra_args=list(extra_args or []),
                               via_proxy=via_proxy)
        if register:
            device.node_id = operator.register_node(self.settings, public, name)
        self.devices[name] = device
        return device

    def start_device(self, device: DeviceProcess) -> subprocess.Popen:
        """``python -m deploy.device start`` (it execs flower-supernode: same PID, own process group)."""
        if device.via_proxy and self.proxy_address is None:
            raise FlowerError("start_fleet_proxy() first")
        address = self.proxy_address if device.via_proxy else self.settings.address
        args = ["deploy.device", "start", "--superlink", address, "--ca", str(self.settings.tls.ca_cert),
                "--key", str(device.key), "--base", device.base, "--state-dir", str(device.state_dir),
                *device.extra_args]
        args += ["--user", device.user] if device.user is not None else ["--data", str(device.data)]
        if device.process is not None and device.process.poll() is None:
            raise FlowerError(f"device {device.name} is already running (PID {device.process.pid})")
        device.process = start_process(self._module(*args), None, device.log)
        device.starts += 1
        return device.process

    def add_device(self, name: str, base: str | Path, user: str | None = None, data: Path | None = None,
                   register: bool = True, via_proxy: bool = False) -> DeviceProcess:
        device = self.new_device(name, base, user, data, register, via_proxy=via_proxy)
        self.start_device(device)
        return device

    def kill_device(self, device: DeviceProcess) -> None:
        """SIGKILL the SuperNode, its process group and every descendant (its SuperExec and ClientApp processes)."""
        if device.process is not None:
            stop_process(device.process, hard=True)

    def stop(self) -> None:
        """Stop every process this federation started, by PID, SuperNodes first."""
        for device in self.devices.values():
            if device.process is not None:
                stop_process(device.process, timeout=10)
        if self.proxy is not None:
            stop_process(self.proxy, timeout=10)
        if self.superlink is not None:
            stop_process(self.superlink, timeout=15)

    # --- state ----------------------------------------------------------------------------------

    def online_node_ids(self) -> set[str]:
        return {str(node["node-id"]) for node in operator.list_nodes(self.settings) if node.get("status") == "online"}

    def wait_online(self, count: int, timeout: float = 90) -> set[str]:
        """Wait until at least ``count`` registered nodes are online; FlowerError naming the logs if not."""
        deadline = time.monotonic() + timeout
        while True:
            online = self.online_node_ids()
            if len(online) >= count:
                return online
            dead = [d.name for d in self.devices.values() if d.process is not None and d.process.poll() is not None]
            if dead or time.monotonic() > deadline:
                raise FlowerError(f"{len(online)} of {count} nodes online after {timeout:.0f} s; exited: {dead}; "
                                  f"logs under {self.root / 'devices'}")
            time.sleep(1.0)

    def submit(self, run_config: dict[str, object]) -> str:
        return self.settings.cli.submit(run_config)

    def wait_for_run(self, run_id: str, timeout: float, poll: float = 2.0) -> str:
        return self.settings.cli.wait(run_id, timeout, poll)


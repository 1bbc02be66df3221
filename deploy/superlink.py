"""Operator commands: prepare and start a SuperLink with TLS and node authentication, register
devices, submit the fedgraft app and check its status.

    python -m deploy.superlink prepare  --dir DEPLOY_DIR [--san HOST ...] [--host 127.0.0.1] [--port 9093]
    python -m deploy.superlink start    --dir DEPLOY_DIR [--background]
    python -m deploy.superlink register --dir DEPLOY_DIR keys/dev0.pub --name dev0
    python -m deploy.superlink nodes    --dir DEPLOY_DIR
    python -m deploy.superlink run      --dir DEPLOY_DIR --run-config 'num-server-rounds=3' [--wait]
    python -m deploy.superlink status   --dir DEPLOY_DIR RUN_ID
    python -m deploy.superlink stop     --dir DEPLOY_DIR          # a --background SuperLink
    python -m deploy.superlink env      --dir DEPLOY_DIR          # export FLWR_HOME=... for plain `flwr`

``prepare`` writes everything into DEPLOY_DIR: ``tls/`` (CA and server certificate), ``deploy.json``
(these settings), ``flwr-home/config.toml`` (the ``flwr`` CLI connection, unless ``--flwr-home``
names another), and later ``state.db`` (Flower's persistent SuperLink state: nodes, runs).

Security: in Flower 1.42 the Control API (submit/stop runs, register nodes) shares the SuperLink's
one HTTP port with the Fleet API and has no authentication in open-source Flower. The SuperLink
therefore listens on 127.0.0.1 unless ``--host`` says otherwise; see docs/deployment.md for exposing
only the Fleet API to devices.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deploy.flower import (
    PROJECT_ROOT,
    FlowerCli,
    FlowerError,
    executable,
    flower_env,
    parse_config,
    start_listening,
    stop_process,
    write_connection,
)
from deploy.tls import DEFAULT_HOSTS, TlsFiles, make_certificates

SETTINGS_FILE = "deploy.json"
DEFAULT_PORT = 9093
DEFAULT_CONNECTION = "fedgraft"
WILDCARD_HOSTS = ("0.0.0.0", "::", "")
INSECURE_WARNING = (
    "WARNING: INSECURE SuperLink: no TLS and no SuperNode authentication. Model updates travel in "
    "clear text and ANY process that reaches the port can join as a node, submit runs or stop them. "
    "Use only on a throw-away loopback setup."
)


@dataclass
class Settings:
    """A prepared deployment, stored as DEPLOY_DIR/deploy.json."""

    dir: str
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    hosts: list[str] = field(default_factory=lambda: list(DEFAULT_HOSTS))
    connection: str = DEFAULT_CONNECTION
    flwr_home: str = ""
    insecure: bool = False

    @property
    def root(self) -> Path:
        return Path(self.dir)

    @property
    def tls(self) -> TlsFiles:
        return TlsFiles.in_folder(self.root / "tls")

    @property
    def database(self) -> Path:
        return self.root / "state.db"

    @property
    def superlink_home(self) -> Path:
        """FLWR_HOME of the SuperLink process itself (app bundles it installs, its ServerApp runs)."""
        return self.root / "superlink-home"

    @property
    def cli_home(self) -> Path:
        return Path(self.flwr_home)

    @property
    def cli(self) -> FlowerCli:
        """The operator's ``flwr`` CLI for this deployment's connection."""
        return FlowerCli(self.cli_home, self.connection)

    @property
    def address(self) -> str:
        """Where the operator's CLI (and devices on this machine) reach the SuperLink."""
        host = "127.0.0.1" if self.host in WILDCARD_HOSTS else self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.root / "superlink.pid"

    @property
    def log_file(self) -> Path:
        return self.root / "superlink.log"

    def save(self) -> None:
        (self.root / SETTINGS_FILE).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, folder: Path) -> "Settings":
        path = Path(folder).resolve() / SETTINGS_FILE
        if not path.exists():
            raise FlowerError(f"{path} not found: run `python -m deploy.superlink prepare --dir {folder}` first")
        return cls(**json.loads(path.read_text()))


# --- prepare ---------------------------------------------------------------------------------------


def prepare(folder: Path, host: str = "127.0.0.1", port: int = DEFAULT_PORT, hosts: list[str] | None = None,
            connection: str = DEFAULT_CONNECTION, flwr_home: Path | None = None, insecure: bool = False,
            days: int = 825) -> Settings:
    """Create the deployment folder: certificates (unless insecure), settings and the CLI connection."""
    root = Path(folder).resolve()
    root.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(hosts or DEFAULT_HOSTS))
    if host not in WILDCARD_HOSTS and host not in names:
        names.append(host)
    settings = Settings(dir=str(root), host=host, port=int(port), hosts=names, connection=connection,
                        flwr_home=str(Path(flwr_home).resolve() if flwr_home else root / "flwr-home"), insecure=insecure)
    if not insecure:
        make_certificates(root / "tls", names, days=days)
    settings.superlink_home.mkdir(exist_ok=True)
    write_connection(settings.cli_home, settings.connection, _connection_entry(settings))
    settings.save()
    return settings


def _connection_entry(settings: Settings) -> dict[str, object]:
    """How the operator's ``flwr`` reaches this SuperLink: its address, and its CA or ``insecure``."""
    if settings.insecure:
        return {"address": settings.address, "insecure": True}
    return {"address": settings.address, "root-certificates": str(settings.tls.ca_cert)}


# --- start / stop ----------------------------------------------------------------------------------


def superlink_command(settings: Settings) -> list[str]:
    command = [executable("flower-superlink")]
    if settings.insecure:
        command.append("--insecure")
    else:
        tls = settings.tls
        if not tls.exist():
            raise FlowerError(f"TLS files missing in {tls.ca_cert.parent}: run `prepare` again")
        command += ["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
                    "--ssl-keyfile", str(tls.server_key), "--enable-supernode-auth"]
    command += ["--database", str(settings.database), "--disable-runtime-dependency-installation",
                "--isolation", "subprocess", "--host", settings.host, "--port", str(settings.port)]
    return command


def superlink_env(settings: Settings) -> dict[str, str]:
    return flower_env(settings.superlink_home)


def _warn_if_exposed(settings: Settings) -> None:
    if settings.insecure:
        print(INSECURE_WARNING, file=sys.stderr)
    if settings.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"WARNING: the SuperLink listens on {settings.host}:{settings.port}. Its Control API (start/stop "
              "runs, register nodes) shares this port and is NOT authenticated in open-source Flower: anyone who "
              "reaches the port controls the federation. Keep it on 127.0.0.1 and expose only /v1/fleet/ through "
              "a reverse proxy (docs/deployment.md).", file=sys.stderr)


def start_background(settings: Settings, timeout: float = 60) -> subprocess.Popen:
    """Start the SuperLink detached (own session), log to DEPLOY_DIR/superlink.log, wait until it listens."""
    _warn_if_exposed(settings)
    host = settings.address.rsplit(":", 1)[0].strip("[]")
    process = start_listening(superlink_command(settings), superlink_env(settings), settings.log_file, host,
                              settings.port, "flower-superlink", timeout, cwd=settings.root)
    settings.pid_file.write_text(f"{process.pid}\n")
    return process


def start_foreground(settings: Settings) -> None:
    """Replace this process with flower-superlink (for a terminal, systemd or a supervisor)."""
    _warn_if_exposed(settings)
    command = superlink_command(settings)
    print("exec " + " ".join(command), file=sys.stderr, flush=True)
    os.chdir(settings.root)
    os.execve(command[0], command, superlink_env(settings))


def stop_background(settings: Settings) -> bool:
    if not settings.pid_file.exists():
        return False
    pid = int(settings.pid_file.read_text().strip())
    stop_process(pid)
    settings.pid_file.unlink(missing_ok=True)
    return True


# --- nodes -----------------------------------------------------------------------------------------


def register_node(settings: Settings, public_key: Path, name: str | None = None) -> str:
    """``flwr supernode register``; returns the node id Flower assigned to the key."""
    public_key = Path(public_key).resolve()
    if not public_key.exists():
        raise FlowerError(f"public key {public_key} not found (devices make it with `python -m deploy.device keygen`)")
    args = ["supernode", "register", str(public_key), settings.connection]
    if name:
        args += ["--name", name]
    payload = settings.cli.json(args, f"registering {public_key.name}")
    if not payload.get("success", False) or payload.get("node-id") in (None, ""):
        raise FlowerError(f"registering {public_key.name} failed: {payload}")
    return str(payload["node-id"])


def list_nodes(settings: Settings) -> list[dict]:
    payload = settings.cli.json(["supernode", "list", settings.connection], "listing SuperNodes")
    return list(payload.get("nodes", []))


# --- runs ------------------------------------------------------------------------------------------


def prepare_base(spec: str) -> str:
    """The folder of the base the run announces (a compressed base is built once, then cached).

    Devices must hold a byte-identical copy: the ServerApp announces its content hash and a client
    refuses to train on anything else. Ship this folder to them; do not rebuild it on a device (the
    compression healing is time-budgeted, so two builds differ).
    """
    from compressor import prepare_base as build_or_find  # heavy imports only for this command

    return str(build_or_find(spec)[0])


# --- command line ----------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy.superlink", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_, description=help_)
        sub.add_argument("--dir", type=Path, required=True, help="the deployment folder")
        return sub

    prep = command("prepare", "create the CA, the server certificate, the settings and the flwr CLI connection")
    prep.add_argument("--host", default="127.0.0.1",
                      help="address the SuperLink binds (default 127.0.0.1; the Control API is on the same port)")
    prep.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"the SuperLink's one HTTP port (default {DEFAULT_PORT})")
    prep.add_argument("--san", action="append", default=None, metavar="HOST",
                      help="a name or IP devices use to reach the SuperLink, for the server certificate "
                           f"(repeatable; default {' '.join(DEFAULT_HOSTS)})")
    prep.add_argument("--connection", default=DEFAULT_CONNECTION, help="name of the connection in config.toml")
    prep.add_argument("--flwr-home", type=Path, default=None,
                      help="FLWR_HOME whose config.toml gets the connection (default DEPLOY_DIR/flwr-home)")
    prep.add_argument("--days", type=int, default=825, help="validity of the server certificate")
    prep.add_argument("--insecure", action="store_true", help="no TLS, no node authentication (loopback experiments only)")

    start = command("start", "start flower-superlink (foreground unless --background)")
    start.add_argument("--background", action="store_true",
                       help="detach, log to DEPLOY_DIR/superlink.log, write DEPLOY_DIR/superlink.pid")
    command("stop", "stop a SuperLink started with --background")
    command("env", "print `export FLWR_HOME=...` to use plain `flwr` commands with this deployment")

    reg = command("register", "register a device's public key (flwr supernode register)")
    reg.add_argument("public_key", type=Path)
    reg.add_argument("--name", default=None)
    command("nodes", "list registered SuperNodes as JSON (flwr supernode list)")

    run = command("run", "submit the fedgraft app; prints the run id")
    run.add_argument("--app", type=Path, default=PROJECT_ROOT, help="the Flower app folder (default: this project)")
    run.add_argument("--run-config", default="", help="'key=value ...' overrides, see docs/run-config.md")
    run.add_argument("--base", default="compressed",
                     help="the base the run announces unless --run-config names base-model: 'compressed' (default, "
                          "built once and cached), 'smollm2' (the teacher), a folder or a .gguf")
    run.add_argument("--wait", action="store_true", help="wait for the run to finish; exit 0 only if it completed")
    run.add_argument("--timeout", type=float, default=6 * 3600, help="seconds --wait waits")

    status = command("status", "print a run's status; exit 0 if finished:completed, 3 while it runs, 1 otherwise")
    status.add_argument("run_id")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "prepare":
            if args.insecure:
                print(INSECURE_WARNING, file=sys.stderr)
            settings = prepare(args.dir, args.host, args.port, args.san, args.connection, args.flwr_home,
                               args.insecure, args.days)
            print(f"Prepared {settings.root}")
            if not settings.insecure:
                print(f"  CA certificate (give to devices): {settings.tls.ca_cert}")
                print(f"  server certificate for: {', '.join(settings.hosts)}")
            print(f"  flwr connection {settings.connection!r} -> {settings.address} in {settings.cli_home / 'config.toml'}")
            print(f"Next: python -m deploy.superlink start --dir {args.dir}")
            return 0
        settings = Settings.load(args.dir)
        if args.command == "start":
            if args.background:
                process = start_background(settings)
                print(f"SuperLink PID {process.pid} listening on {settings.host}:{settings.port}; log {settings.log_file}")
                return 0
            start_foreground(settings)
        elif args.command == "stop":
            print("stopped" if stop_background(settings) else f"no {settings.pid_file}: nothing to stop")
        elif args.command == "env":
            print(f"export FLWR_HOME={settings.cli_home}  # then: flwr ls {settings.connection}")
        elif args.command == "register":
            node_id = register_node(settings, args.public_key, args.name)
            print(node_id)
        elif args.command == "nodes":
            print(json.dumps(list_nodes(settings), indent=2))
        elif args.command == "run":
            run_config = parse_config(args.run_config)
            if "base-model" not in run_config:  # announce the compressed base unless the operator named one
                run_config["base-model"] = prepare_base(args.base)
                print(f"base model: {run_config['base-model']} (devices need a byte-identical copy of this folder)",
                      file=sys.stderr)
            run_id = settings.cli.submit(run_config, args.app)
            print(run_id, flush=True)
            if args.wait:
                status = settings.cli.wait(run_id, args.timeout)
                print(status)
                return 0 if status == "finished:completed" else 1
        elif args.command == "status":
            status = settings.cli.status(args.run_id)
            print(status)
            return 0 if status == "finished:completed" else 3 if not status.startswith("finished") else 1
        return 0
    except FlowerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

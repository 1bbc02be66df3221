"""Device-owner commands: make the device's key pair and start its SuperNode.

    python -m deploy.device keygen --key keys/dev0
    python -m deploy.device start --superlink HOST:PORT --ca ca.crt --key keys/dev0 \\
        --base /path/to/base-folder (--data my-texts.jsonl | --user "macbeth/LADY MACBETH"
        | --hf-dataset ORG/NAME --hf-partition-by COLUMN --partition-id N) \\
        --state-dir ~/fedgraft-device [--background]
    python -m deploy.device stop --state-dir ~/fedgraft-device      # a --background SuperNode

``keygen`` writes an ECDSA P-384 key pair (``ssh-keygen -t ecdsa -b 384``): the private key stays on
the device, the ``.pub`` file goes to the operator, who registers it. ``start`` runs
``flower-supernode`` with TLS (the operator's ``ca.crt``), that private key, its own FLWR_HOME and
Runtime API port under ``--state-dir``, and a node config that names this device's copy of the base
model and its data: ``base-model``, ``data-path``, ``user`` or ``hf-dataset`` (a hub dataset cut
into users by Flower Datasets' ``NaturalIdPartitioner``), and ``state-dir``. The data never leaves
the device; only adapter weights and metrics do.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from deploy.flower import (
    FlowerError,
    executable,
    flower_env,
    format_config,
    free_port,
    parse_config,
    start_process,
    stop_process,
)

INSECURE_WARNING = ("WARNING: INSECURE SuperNode: no TLS, no authentication. Model updates travel in clear text "
                    "to whoever answers at the SuperLink address. Use only against a loopback experiment.")


def keygen(key: Path, force: bool = False, comment: str | None = None) -> tuple[Path, Path]:
    """Create ``key`` (private) and ``key.pub`` with ssh-keygen; refuses to overwrite unless ``force``."""
    key = Path(key).resolve()
    public = key.with_name(key.name + ".pub")
    if key.exists() or public.exists():
        if not force:
            raise FlowerError(f"{key} already exists; a new key means registering the device again (use --force)")
        key.unlink(missing_ok=True)
        public.unlink(missing_ok=True)
    key.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([executable("ssh-keygen"), "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", str(key),
                             "-C", comment or key.name], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        raise FlowerError(f"ssh-keygen failed (exit {result.returncode}): {result.stderr.strip()}")
    os.chmod(key, 0o600)
    return key, public


@dataclass
class Device:
    """How one SuperNode is started."""

    superlink: str
    state_dir: Path
    base: str
    ca: Path | None = None
    key: Path | None = None
    data: Path | None = None
    user: str | None = None
    user_id: str | None = None
    domain: str | None = None
    partition_id: int | None = None
    num_partitions: int | None = None
    hf_dataset: str | None = None
    hf_partition_by: str | None = None
    hf_text_field: str | None = None
    hf_domain_field: str | None = None
    runtime_port: int = 0
    insecure: bool = False
    max_wait_time: float | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).expanduser().resolve()

    @property
    def flwr_home(self) -> Path:
        return self.state_dir / "flwr-home"

    @property
    def pid_file(self) -> Path:
        return self.state_dir / "supernode.pid"

    @property
    def log_file(self) -> Path:
        return self.state_dir / "supernode.log"

    def node_config(self) -> dict[str, object]:
        """The node config the ClientApp reads (client/runtime.py): base, data source, state folder."""
        config: dict[str, object] = {"base-model": _base_spec(self.base), **self._data_source()}
        config["state-dir"] = str(self.state_dir)
        config.update(self.extra)
        return config

    def _data_source(self) -> dict[str, object]:
        """The node-config entries naming this device's one source of data."""
        shakespeare_partition = self.num_partitions is not None or (self.partition_id is not None and not self.hf_dataset)
        sources = [self.data is not None, self.user is not None, self.hf_dataset is not None, shakespeare_partition]
        if sum(sources) != 1:
            raise FlowerError("give exactly one data source: --data FILE.jsonl, --user 'play/CHARACTER', "
                              "--hf-dataset ORG/NAME with --partition-id, or --partition-id with --num-partitions")
        hub_options = (self.hf_partition_by, self.hf_text_field, self.hf_domain_field)
        if self.hf_dataset is None and any(option is not None for option in hub_options):
            raise FlowerError("--hf-partition-by, --hf-text-field and --hf-domain-field go with --hf-dataset")
        if self.data is not None:
            return self._jsonl_source()
        if self.user is not None:
            if not re.fullmatch(r"[a-z0-9-]+/[^/\"\\]+", self.user):
                raise FlowerError(f"--user {self.user!r} must look like 'macbeth/LADY MACBETH' (play/CHARACTER)")
            return {"user": self.user}
        if self.hf_dataset is not None:
            return self._hub_source()
        if self.num_partitions is None or self.partition_id is None or not 0 <= self.partition_id < self.num_partitions:
            raise FlowerError("--partition-id needs --num-partitions, with 0 <= partition-id < num-partitions")
        return {"partition-id": int(self.partition_id), "num-partitions": int(self.num_partitions)}

    def _jsonl_source(self) -> dict[str, object]:
        data = Path(self.data).expanduser().resolve()
        if not data.is_file():
            raise FlowerError(f"data file {data} not found")
        source: dict[str, object] = {"data-path": str(data)}
        if self.user_id:
            source["user-id"] = self.user_id
        if self.domain:
            source["domain"] = self.domain
        return source

    def _hub_source(self) -> dict[str, object]:
        """A hub dataset cut into users by its natural id column; ``partition-id`` picks this device's user."""
        if self.partition_id is None or self.partition_id < 0:
            raise FlowerError("--hf-dataset needs --partition-id N (N >= 0): this device's user is the N-th distinct "
                              "value of the --hf-partition-by column, in sorted order")
        source: dict[str, object] = {"hf-dataset": self.hf_dataset, "partition-id": int(self.partition_id)}
        for key, value in (("hf-partition-by", self.hf_partition_by), ("hf-text-field", self.hf_text_field),
                           ("hf-domain-field", self.hf_domain_field)):
            if value is not None:
                source[key] = value
        return source

    def command(self) -> list[str]:
        """The flower-supernode command line; checks the files it names. Picks the Runtime API port."""
        if not re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}", self.superlink):
            raise FlowerError(f"--superlink {self.superlink!r} must be HOST:PORT (no https:// prefix)")
        command = [executable("flower-supernode"), "--superlink", self.superlink]
        if self.insecure:
            command.append("--insecure")
        else:
            for flag, path in (("--ca", self.ca), ("--key", self.key)):
                if path is None or not Path(path).expanduser().is_file():
                    raise FlowerError(f"{flag} {path} not found (a secure SuperNode needs the operator's CA "
                                      "certificate and this device's private key)")
            command += ["--root-certificates", str(Path(self.ca).expanduser().resolve()),
                        "--auth-supernode-private-key", str(Path(self.key).expanduser().resolve())]
        if not self.runtime_port:
            self.runtime_port = free_port()
        command += ["--node-config", format_config(self.node_config()), "--isolation", "subprocess",
                    "--host", "127.0.0.1", "--port", str(self.runtime_port)]
        if self.max_wait_time is not None:
            command += ["--max-wait-time", str(self.max_wait_time)]
        return command

    def env(self) -> dict[str, str]:
        # A hub dataset is downloaded by the ClientApp (or read from the device's Hugging Face cache).
        return flower_env(self.flwr_home, offline=self.hf_dataset is None)

    def start_background(self, log: Path | None = None) -> subprocess.Popen:
        """Start the SuperNode detached (own session), logging to ``log`` (default STATE_DIR/supernode.log)."""
        command = self.command()
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        if self.insecure:
            print(INSECURE_WARNING, file=sys.stderr)
        process = start_process(command, self.env(), log or self.log_file, cwd=self.state_dir)
        self.pid_file.write_text(f"{process.pid}\n")
        return process

    def start_foreground(self) -> None:
        """Replace this process with flower-supernode."""
        command = self.command()
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        if self.insecure:
            print(INSECURE_WARNING, file=sys.stderr)
        print("exec " + " ".join(command), file=sys.stderr, flush=True)
        os.chdir(self.state_dir)
        os.execve(command[0], command, self.env())


def _base_spec(base: str) -> str:
    """An existing folder or file becomes an absolute path; anything else (a hub id, 'smollm2') is kept."""
    path = Path(base).expanduser()
    if path.exists():
        return str(path.resolve())
    if base.startswith((".", "/", "~")) or base.endswith(".gguf"):
        raise FlowerError(f"--base {base} not found")
    return base


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m deploy.device", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    key = commands.add_parser("keygen", help="make this device's key pair (send KEY.pub to the operator)")
    key.add_argument("--key", type=Path, required=True, help="private key path; the public key is KEY.pub")
    key.add_argument("--force", action="store_true", help="replace an existing key (the device must be registered again)")

    start = commands.add_parser("start", help="start this device's SuperNode")
    start.add_argument("--superlink", required=True, help="the SuperLink as HOST:PORT")
    start.add_argument("--ca", type=Path, help="the operator's CA certificate (ca.crt)")
    start.add_argument("--key", type=Path, help="this device's private key (from keygen)")
    start.add_argument("--base", required=True,
                       help="this device's copy of the base model (HF folder or .gguf); the server checks its hash")
    source = start.add_mutually_exclusive_group()
    source.add_argument("--data", type=Path, help="a JSONL file, one {\"text\": ..., \"domain\": ...} per line")
    source.add_argument("--user", help="a Shakespeare character, e.g. 'macbeth/LADY MACBETH'")
    source.add_argument("--hf-dataset", metavar="ORG/NAME",
                        help="a Hugging Face dataset cut into users by Flower Datasets' NaturalIdPartitioner "
                             "(with --partition-id; needs the hub or a cached copy)")
    start.add_argument("--partition-id", type=int,
                       help="with --hf-dataset: this device's user, the N-th distinct --hf-partition-by value; "
                            "with --num-partitions: a partition of the Shakespeare federation")
    start.add_argument("--num-partitions", type=int)
    start.add_argument("--hf-partition-by", metavar="COLUMN", help="with --hf-dataset: the column naming the user "
                                                                   "(default 'user')")
    start.add_argument("--hf-text-field", metavar="COLUMN", help="with --hf-dataset: the text column (default 'text')")
    start.add_argument("--hf-domain-field", metavar="COLUMN",
                       help="with --hf-dataset: a column whose most common value is the user's domain")
    start.add_argument("--user-id", help="with --data: the id this user gets in the server's ledger")
    start.add_argument("--domain", help="with --data: the domain if the file does not give one")
    start.add_argument("--state-dir", type=Path, required=True,
                       help="this device's folder: Flower home, log, pid file and per-user state")
    start.add_argument("--runtime-port", type=int, default=0,
                       help="loopback port of the SuperNode's own Runtime API (default: a free one)")
    start.add_argument("--node-config", default="", help="extra 'key=value ...' node-config entries")
    start.add_argument("--max-wait-time", type=float, default=None,
                       help="give up after this many seconds without reaching the SuperLink (default: retry forever)")
    start.add_argument("--background", action="store_true",
                       help="detach, log to STATE_DIR/supernode.log, write STATE_DIR/supernode.pid")
    start.add_argument("--insecure", action="store_true", help="no TLS (only against an --insecure SuperLink)")

    stop = commands.add_parser("stop", help="stop a SuperNode started with --background")
    stop.add_argument("--state-dir", type=Path, required=True)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "keygen":
            private, public = keygen(args.key, args.force)
            print(f"private key (stays here): {private}\npublic key (send to the operator): {public}")
            return 0
        if args.command == "stop":
            pid_file = Path(args.state_dir).expanduser() / "supernode.pid"
            if not pid_file.exists():
                print(f"no {pid_file}: nothing to stop")
                return 0
            stop_process(int(pid_file.read_text().strip()))
            pid_file.unlink(missing_ok=True)
            print("stopped")
            return 0
        args.state_dir.expanduser().mkdir(parents=True, exist_ok=True)
        device = Device(superlink=args.superlink, state_dir=args.state_dir, base=args.base, ca=args.ca, key=args.key,
                        data=args.data, user=args.user, user_id=args.user_id, domain=args.domain,
                        partition_id=args.partition_id, num_partitions=args.num_partitions,
                        hf_dataset=args.hf_dataset, hf_partition_by=args.hf_partition_by,
                        hf_text_field=args.hf_text_field, hf_domain_field=args.hf_domain_field,
                        runtime_port=args.runtime_port, insecure=args.insecure, max_wait_time=args.max_wait_time,
                        extra=parse_config(args.node_config) if args.node_config else {})
        if args.background:
            process = device.start_background()
            print(f"SuperNode PID {process.pid}; log {device.log_file}")
            return 0
        device.start_foreground()
        return 0
    except FlowerError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

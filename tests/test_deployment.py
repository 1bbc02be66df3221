"""End to end on loopback: a SuperLink with TLS and node authentication, three SuperNodes as separate
processes (started through deploy.superlink / deploy.device), a real `flwr run`, the server's ledger.

One run of three rounds serves every check: rounds 1-2 with all three devices; in round 3 one
device's SuperNode is SIGKILLed (its whole process group) while its ClientApp trains, the round
completes with the other two replies after Flower's heartbeat timeout (45-60 s), the failure is
recorded against the killed node's id, and the device is restarted so the final evaluation (which
needs min-train-nodes=3) finds it again, under the same node id. Meanwhile a SuperNode with an
unregistered key tries to join and is refused. One device reaches the SuperLink only through
deploy.fleet_proxy, which exposes the Fleet API and nothing else.
"""

from __future__ import annotations

import shutil
import ssl
import stat
import subprocess
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import httpx
import psutil
import pytest

from deploy import superlink as operator
from deploy.flower import FlowerError, format_config, parse_config
from deploy.device import Device
from deploy.device import main as device_main
from deploy.loopback import DeviceProcess, LoopbackFederation
from deploy.tls import certificate_hosts, subject_alt_names
from server.ledger import Ledger, LedgerError

pytestmark = pytest.mark.deployment

# Three characters with >= 60 speeches, from three genres; one with a space in the name.
USERS = {"dev0": "hamlet/KING CLAUDIUS", "dev1": "as-you-like-it/CELIA", "dev2": "coriolanus/BRUTUS"}
VICTIM = "dev2"
VIA_PROXY = "dev1"  # reaches the SuperLink through deploy.fleet_proxy (only /v1/fleet/ exposed)
ROUNDS = 3  # 1-2: all devices; 3: VICTIM is killed mid-round
ROUND_TIMEOUT = 150  # > Flower's 45-60 s detection of a dead node
RUN_TIMEOUT = 360


@dataclass
class Observed:
    federation: LoopbackFederation
    run_id: str
    ledger_url: str
    status: str = ""
    intruder_exit: int | None = None
    intruder_seconds: float = 0.0
    intruder_log: str = ""
    nodes_after_intruder: list[dict] = field(default_factory=list)
    kill_error: str | None = None
    killed_clientapp: list[tuple[int, float]] = field(default_factory=list)  # (pid, seconds after round start)
    victim_log_at_kill: str = ""
    round_open_at_kill: bool = False
    detect_seconds: float | None = None
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def devices(self) -> dict[str, DeviceProcess]:
        return self.federation.devices


def _rounds(ledger_url: str, run_id: str):
    """(run, rounds) of this Flower run in the ledger, or (None, []) while it is not there yet."""
    try:
        with Ledger(ledger_url, read_only=True) as ledger:
            runs = [r for r in ledger.runs() if r.flower_run_id == run_id]
            return (runs[0], ledger.rounds(runs[0].id)) if runs else (None, [])
    except LedgerError:
        return None, []


def _round(ledger_url: str, run_id: str, number: int):
    run, rounds = _rounds(ledger_url, run_id)
    if run is not None and run.status != "running":
        raise FlowerError(f"run {run_id} ended as {run.status!r} before round {number} was over")
    return next((r for r in rounds if r.number == number), None)


def _wait(predicate, timeout: float, what: str, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > deadline:
            raise FlowerError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(poll)
    return value


def _clientapps_since(process, since: float) -> list[psutil.Process]:
    found = []
    try:
        children = psutil.Process(process.pid).children(recursive=True)
    except psutil.Error:
        return []
    for child in children:
        try:
            if "flwr-clientapp" in " ".join(child.cmdline()) and child.create_time() >= since - 1:
                found.append(child)
        except psutil.Error:
            continue
    return found


def _log_count(device: DeviceProcess, text: str) -> int:
    return device.log.read_text(errors="replace").count(text) if device.log.exists() else 0


def _kill_mid_round(federation: LoopbackFederation, observed: Observed) -> None:
    victim = federation.devices[VICTIM]
    url, run_id = observed.ledger_url, observed.run_id
    round3 = _wait(lambda: _round(url, run_id, ROUNDS), 240, f"round {ROUNDS} to start")
    started = round3.started_at.timestamp()
    # Mid-round: the victim has pulled its round-3 train message (its log says so) and started the
    # ClientApp process that works on it.
    _wait(lambda: _log_count(victim, "Start `flwr-clientapp` process") >= ROUNDS, 90,
          f"{VICTIM} to receive its round-{ROUNDS} message", 0.1)
    clientapps = _wait(lambda: _clientapps_since(victim.process, started), 30, f"{VICTIM}'s ClientApp", 0.1)
    observed.victim_log_at_kill = victim.log.read_text(errors="replace")
    federation.kill_device(victim)
    killed = time.monotonic()
    observed.killed_clientapp = [(p.pid, round(p.create_time() - started, 2)) for p in clientapps]
    observed.round_open_at_kill = _round(url, run_id, ROUNDS).finished_at is None
    _wait(lambda: _round(url, run_id, ROUNDS).finished_at is not None, ROUND_TIMEOUT + 30, f"round {ROUNDS} to finish")
    observed.detect_seconds = time.monotonic() - killed
    # The final evaluation needs three nodes again: restart the device (same key, same state folder).
    federation.start_device(victim)


@pytest.fixture(scope="module")
def deployment(tiny_base: Path, tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("deploy")
    federation = LoopbackFederation(root)
    try:
        t0 = time.monotonic()
        federation.start_superlink()
        federation.start_fleet_proxy()
        for name, user in USERS.items():
            # each device has its own copy of the base (the server names it by its own path)
            base = shutil.copytree(tiny_base, root / "bases" / name)
            federation.add_device(name, base, user=user, via_proxy=name == VIA_PROXY)
        federation.wait_online(len(USERS), timeout=90)
        timings = {"setup": time.monotonic() - t0}
        ledger_url = f"sqlite:///{root / 'ledger.db'}"
        run_id = federation.submit({
            "base-model": str(tiny_base), "base-dtype": "float32", "num-server-rounds": ROUNDS,
            "min-train-nodes": len(USERS), "local-steps": 10, "batch-size": 4, "seq-len": 32, "learning-rate": 0.01,
            "lora-dropout": 0.0, "max-eval-blocks": 16, "min-speeches": 60, "node-wait-seconds": 90,
            "round-timeout": ROUND_TIMEOUT, "ledger-url": ledger_url, "output-dir": str(root / "outputs"),
        })
        observed = Observed(federation, run_id, ledger_url, timings=timings)

        # A device whose key the operator never registered.
        intruder = federation.new_device("intruder", tiny_base, user="hamlet/HORATIO", register=False)
        started = time.monotonic()
        federation.start_device(intruder)
        try:
            observed.intruder_exit = intruder.process.wait(timeout=60)
        except subprocess.TimeoutExpired:  # still running: the assertion below reports it
            observed.intruder_exit = None
        observed.intruder_seconds = time.monotonic() - started
        observed.intruder_log = intruder.log.read_text(errors="replace")
        observed.nodes_after_intruder = operator.list_nodes(federation.settings)

        try:
            _kill_mid_round(federation, observed)
        except FlowerError as error:
            observed.kill_error = str(error)
        observed.status = federation.wait_for_run(run_id, timeout=RUN_TIMEOUT)
        observed.timings["run"] = time.monotonic() - t0 - timings["setup"]
        yield observed
    finally:
        federation.stop()


def _node_ids(observed: Observed) -> dict[str, str]:
    return {name: observed.devices[name].node_id for name in USERS}


def test_unregistered_supernode_is_refused(deployment: Observed):
    assert deployment.intruder_exit is not None, f"the intruder was still running after 60 s:\n{deployment.intruder_log[-2000:]}"
    assert deployment.intruder_exit != 0
    assert deployment.intruder_seconds < 60
    # flower-supernode logs Flower's exit code 305 but exits with status 1
    assert "Exit Code: 305" in deployment.intruder_log and "Failed to activate SuperNode" in deployment.intruder_log
    assert {n["node-id"] for n in deployment.nodes_after_intruder} == set(_node_ids(deployment).values())


def test_fleet_proxy_serves_devices_but_not_the_control_api(deployment: Observed):
    federation = deployment.federation
    context = ssl.create_default_context(cafile=str(federation.settings.tls.ca_cert))
    with httpx.Client(verify=context, timeout=30) as client:
        for path in ("/v1/control/list-nodes", "/v1/control/start-run", "/v1/runtime/pull-messages", "/docs"):
            reply = client.post(f"https://{federation.proxy_address}{path}", content=b"")
            assert reply.status_code == 404 and "only the Fleet API" in reply.text, (path, reply.status_code)
        # the SuperLink itself serves the Control API on its port without any credentials
        direct = client.post(f"https://{federation.settings.address}/v1/control/list-nodes", content=b"",
                             headers={"Content-Type": "application/protobuf"})
        assert direct.status_code == 200
    # and the device behind the proxy took part in every round (checked below with the others)
    assert federation.devices[VIA_PROXY].via_proxy


def test_rounds_with_every_device_are_in_the_ledger(deployment: Observed):
    node_ids = _node_ids(deployment)
    with Ledger(deployment.ledger_url, read_only=True) as ledger:
        (run,) = [r for r in ledger.runs() if r.flower_run_id == deployment.run_id]
        rounds = ledger.rounds(run.id)
        assert [r.number for r in rounds] == list(range(1, ROUNDS + 1))
        for round_ in rounds[:2]:
            assert (round_.clients_sampled, round_.clients_replied, round_.clients_failed) == (3, 3, 0)
            assert round_.bytes_down > 0 and round_.bytes_up > 0
            train = [c for c in ledger.client_results(run.id, round_.number) if c.phase == "train"]
            assert sorted(c.status for c in train) == ["ok"] * 3
            # each node trained on the user its own node config names
            assert {c.node_id: c.user_id for c in train} == {node_ids[name]: user for name, user in USERS.items()}
            assert all(c.num_examples > 0 and c.bytes_up > 0 and c.bytes_down > 0 for c in train)


def test_killed_device_fails_only_its_round_and_is_recorded_against_its_node(deployment: Observed):
    assert deployment.kill_error is None, deployment.kill_error
    assert deployment.killed_clientapp and deployment.round_open_at_kill
    # killed after receiving its round-3 train message and before replying to it
    log = deployment.victim_log_at_kill
    assert log.count("Receiving: train message") == ROUNDS and log.count("Sending: train message") == ROUNDS - 1
    victim_id = _node_ids(deployment)[VICTIM]
    with Ledger(deployment.ledger_url, read_only=True) as ledger:
        (run,) = [r for r in ledger.runs() if r.flower_run_id == deployment.run_id]
        round3 = ledger.rounds(run.id)[ROUNDS - 1]
        assert (round3.clients_sampled, round3.clients_replied, round3.clients_failed) == (3, 2, 1)
        train = {c.node_id: c for c in ledger.client_results(run.id, ROUNDS) if c.phase == "train"}
        assert set(train) == set(_node_ids(deployment).values())
        assert train[victim_id].status == "failed", train[victim_id]
        assert all(c.status == "ok" for node, c in train.items() if node != victim_id)
        events = [e for e in ledger.events(run.id) if e.kind == "client-failed"]
        assert [(e.round_number, e.node_id) for e in events] == [(ROUNDS, victim_id)]
    # Flower reports a dead node after missed heartbeats (30 s each, patience 2), within the round timeout
    assert deployment.detect_seconds is not None and deployment.detect_seconds < ROUND_TIMEOUT
    print(f"\nkilled node {victim_id}: error {train[victim_id].error!r}; "
          f"round {ROUNDS} finished {deployment.detect_seconds:.0f} s after the kill; "
          f"ClientApp processes killed (pid, s after round start): {deployment.killed_clientapp}")


def test_run_completes_and_restarted_device_keeps_its_node_id(deployment: Observed):
    assert deployment.status == "finished:completed"
    node_ids = _node_ids(deployment)
    victim = deployment.devices[VICTIM]
    assert victim.starts == 2 and victim.logged_node_ids() == [node_ids[VICTIM]] * 2
    with Ledger(deployment.ledger_url, read_only=True) as ledger:
        (run,) = [r for r in ledger.runs() if r.flower_run_id == deployment.run_id]
        assert run.status == "completed"
        final = [c for c in ledger.client_results(run.id, ROUNDS) if c.phase == "evaluate"]
        assert {c.node_id: c.user_id for c in final if c.status == "ok"} == {node_ids[n]: u for n, u in USERS.items()}
    print(f"\ntimings: {deployment.timings}")


# --- pieces, without processes ------------------------------------------------------------------


def test_prepare_writes_certificates_settings_and_a_flower_connection(tmp_path: Path):
    flwr_home = tmp_path / "home"
    flwr_home.mkdir()
    (flwr_home / "config.toml").write_text('[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = ":local:"\n')
    settings = operator.prepare(tmp_path / "op", port=29999, hosts=["127.0.0.1", "localhost", "fl.example.org"],
                                flwr_home=flwr_home)
    assert certificate_hosts(settings.tls.server_cert) == "IP Address:127.0.0.1, DNS:localhost, DNS:fl.example.org"
    assert stat.S_IMODE(settings.tls.ca_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(settings.tls.server_key.stat().st_mode) == 0o600
    config = tomllib.loads((flwr_home / "config.toml").read_text())["superlink"]
    assert config["default"] == "local" and config["local"] == {"address": ":local:"}  # kept
    assert config["fedgraft"] == {"address": "127.0.0.1:29999", "root-certificates": str(settings.tls.ca_cert)}
    assert operator.Settings.load(tmp_path / "op") == settings
    command = operator.superlink_command(settings)
    for flag in ("--enable-supernode-auth", "--ssl-ca-certfile", "--ssl-certfile", "--ssl-keyfile",
                 "--disable-runtime-dependency-installation"):
        assert flag in command
    assert command[command.index("--host") + 1] == "127.0.0.1"
    assert command[command.index("--database") + 1] == str(settings.database)


def test_insecure_mode_is_explicit(tmp_path: Path, capsys: pytest.CaptureFixture):
    assert operator.main(["prepare", "--dir", str(tmp_path / "op"), "--insecure"]) == 0
    assert "INSECURE" in capsys.readouterr().err
    settings = operator.Settings.load(tmp_path / "op")
    assert "--insecure" in operator.superlink_command(settings)
    assert "--enable-supernode-auth" not in operator.superlink_command(settings)
    config = tomllib.loads((settings.cli_home / "config.toml").read_text())["superlink"]["fedgraft"]
    assert config == {"address": f"127.0.0.1:{operator.DEFAULT_PORT}", "insecure": True}


def test_device_command_and_node_config(tmp_path: Path):
    (tmp_path / "ca.crt").write_text("x")
    (tmp_path / "key").write_text("x")
    (tmp_path / "base").mkdir()
    data = tmp_path / "texts.jsonl"
    data.write_text('{"text": "hello"}\n')
    device = Device(superlink="127.0.0.1:9093", state_dir=tmp_path / "state", base=str(tmp_path / "base"),
                    ca=tmp_path / "ca.crt", key=tmp_path / "key", data=data, user_id="me")
    command = device.command()
    node_config = parse_config(command[command.index("--node-config") + 1])
    assert node_config == {"base-model": str(tmp_path / "base"), "data-path": str(data), "user-id": "me",
                           "state-dir": str(tmp_path / "state")}
    assert command[command.index("--root-certificates") + 1] == str(tmp_path / "ca.crt")
    assert command[command.index("--auth-supernode-private-key") + 1] == str(tmp_path / "key")
    assert command[command.index("--host") + 1] == "127.0.0.1" and int(command[command.index("--port") + 1]) > 0
    with pytest.raises(FlowerError, match="exactly one data source"):
        Device(superlink="127.0.0.1:9093", state_dir=tmp_path, base="smollm2", ca=tmp_path / "ca.crt",
               key=tmp_path / "key").command()
    with pytest.raises(FlowerError, match="not found"):
        Device(superlink="127.0.0.1:9093", state_dir=tmp_path, base=str(tmp_path / "missing"),
               user="macbeth/MACBETH", ca=tmp_path / "ca.crt", key=tmp_path / "key").command()
    with pytest.raises(FlowerError, match="HOST:PORT"):
        Device(superlink="https://x:1", state_dir=tmp_path, base="smollm2", user="macbeth/MACBETH",
               ca=tmp_path / "ca.crt", key=tmp_path / "key").command()


def test_config_rendering():
    assert format_config({"a": 1, "b": "x y", "c": True, "d": 0.5}) == 'a=1 b="x y" c=true d=0.5'
    assert parse_config('a=1 b="x y" c=true d=0.5') == {"a": 1, "b": "x y", "c": True, "d": 0.5}
    with pytest.raises(FlowerError, match="may not contain a double quote"):
        format_config({"a": 'say "hi"'})
    with pytest.raises(FlowerError, match="must be letters, digits"):
        format_config({"a b": 1})
    with pytest.raises(FlowerError, match="'x' is not key=value"):
        parse_config("a=1 x")
    assert subject_alt_names(["10.0.0.1", "::1", "fl.example.org"]) == "IP:10.0.0.1,IP:::1,DNS:fl.example.org"
    with pytest.raises(FlowerError, match="neither an IP address nor a DNS name"):
        subject_alt_names(["https://x"])


def test_config_text_reaches_flower_unchanged():
    """The run config the main job, the comparison and the operator send is what Flower's own parser reads."""
    from flwr.common.config import parse_config_args

    values = {"base-model": "/tmp/my bases/compressed", "learning-rate": 0.002, "server-learning-rate": 1e-05,
              "num-server-rounds": 3, "activation-checkpointing": False, "exclude-plays": "hamlet,macbeth",
              "state-dir": "C:\\runs\\x y", "domain": "comédie\tet\nnuit"}
    text = format_config(values)
    assert text == ('base-model="/tmp/my bases/compressed" learning-rate=0.002 server-learning-rate=1e-05 '
                    'num-server-rounds=3 activation-checkpointing=false exclude-plays="hamlet,macbeth" '
                    'state-dir="C:\\\\runs\\\\x y" domain="comédie\\tet\\nnuit"')
    assert parse_config_args([text]) == values


def test_device_with_a_hub_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    (tmp_path / "base").mkdir()
    device = Device(superlink="127.0.0.1:9093", state_dir=tmp_path / "state", base=str(tmp_path / "base"),
                    insecure=True, hf_dataset="org/letters", hf_partition_by="author", partition_id=4)
    command = device.command()
    assert parse_config(command[command.index("--node-config") + 1]) == {
        "base-model": str(tmp_path / "base"), "hf-dataset": "org/letters", "partition-id": 4,
        "hf-partition-by": "author", "state-dir": str(tmp_path / "state")}
    # the ClientApp downloads the dataset (or reads the device's cache): the hub stays reachable
    assert "HF_HUB_OFFLINE" not in device.env() and "TRANSFORMERS_OFFLINE" not in device.env()
    offline = Device(superlink="127.0.0.1:9093", state_dir=tmp_path / "state", base=str(tmp_path / "base"),
                     insecure=True, user="macbeth/MACBETH").env()
    assert (offline["HF_HUB_OFFLINE"], offline["TRANSFORMERS_OFFLINE"]) == ("1", "1")

    def refused(**source) -> str:
        with pytest.raises(FlowerError) as error:
            Device(superlink="127.0.0.1:9093", state_dir=tmp_path, base=str(tmp_path / "base"), insecure=True,
                   **source).command()
        return str(error.value)

    assert refused(hf_dataset="org/letters").startswith("--hf-dataset needs --partition-id N (N >= 0)")
    assert refused(hf_dataset="org/letters", partition_id=-1).startswith("--hf-dataset needs --partition-id")
    assert refused(hf_dataset="org/letters", partition_id=0, num_partitions=3).startswith("give exactly one data source")
    assert refused(user="macbeth/MACBETH", partition_id=0).startswith("give exactly one data source")
    assert refused(user="macbeth/MACBETH", hf_text_field="body") == (
        "--hf-partition-by, --hf-text-field and --hf-domain-field go with --hf-dataset")
    # the command line: the same check, before anything starts
    code = device_main(["start", "--superlink", "127.0.0.1:9093", "--insecure", "--base", str(tmp_path / "base"),
                        "--hf-dataset", "org/letters", "--state-dir", str(tmp_path / "cli")])
    assert code == 2 and capsys.readouterr().err.startswith("error: --hf-dataset needs --partition-id N")


def test_run_announces_the_compressed_base_unless_the_operator_names_one(monkeypatch, capsys):
    parser = operator._parser()
    assert parser.parse_args(["run", "--dir", "d"]).base == "compressed"
    submitted, built = [], []
    cli = SimpleNamespace(submit=lambda config, app: submitted.append(config) or "42")
    monkeypatch.setattr(operator.Settings, "load", staticmethod(lambda directory: SimpleNamespace(cli=cli)))
    monkeypatch.setattr(operator, "prepare_base", lambda spec: built.append(spec) or f"/cache/{spec}")
    assert operator.main(["run", "--dir", "d", "--run-config", "num-server-rounds=2"]) == 0
    assert built == ["compressed"]
    assert format_config(submitted[0]) == 'num-server-rounds=2 base-model="/cache/compressed"'
    assert operator.main(["run", "--dir", "d", "--run-config", 'base-model="smollm2"']) == 0
    assert built == ["compressed"] and submitted[-1] == {"base-model": "smollm2"}  # nothing built for it

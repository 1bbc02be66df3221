"""Deployment cost on loopback: 1 SuperLink (TLS + node auth) and 2 SuperNodes, a 2-round run.

    .venv/bin/python -m benchmarks.deployment                      # tiny base (seconds per round)
    .venv/bin/python -m benchmarks.deployment --base compressed smollm2   # compressed base vs teacher
    .venv/bin/python -m benchmarks.deployment --write benchmarks/results/deployment.md

Measures, per variant:
- wall time of each round (ledger: round started -> aggregated) and of the whole run (submit -> Flower
  reports it finished), including the final evaluation;
- per-device peak memory: the sum of RSS and the sum of PSS over the SuperNode's process tree
  (flower-supernode, flower-superexec and the flwr-clientapp started per message), sampled with
  psutil every 0.2 s; the same for the SuperLink's tree (SuperLink, SuperExec, ServerApp). RSS sums
  count shared pages (libraries) once per process, so they overstate what the tree uses; PSS splits
  each shared page among the processes that map it, so its sum is the tree's real footprint;
- bytes down / up per device per round, from the ledger's client results (adapter tensors only).

All processes run on this machine and are stopped by PID at the end, also on failure.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import shutil
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import psutil

from deploy.flower import PROJECT_ROOT, FlowerError, exit_on_sigterm
from deploy.loopback import LoopbackFederation
from server.ledger import Ledger

USERS = ["hamlet/KING CLAUDIUS", "as-you-like-it/CELIA", "coriolanus/BRUTUS", "macbeth/MACBETH"]
SAMPLE_SECONDS = 0.2


@dataclass
class TreeSampler:
    """Peak of the summed RSS of a process and its descendants, sampled in a thread."""

    pid_of: callable
    samples: list[tuple[float, int]] = field(default_factory=list)
    pss_samples: list[tuple[float, int]] = field(default_factory=list)

    def sample(self) -> None:
        pid = self.pid_of()
        if pid is None:
            return
        total, total_pss = 0, 0
        try:
            root = psutil.Process(pid)
            processes = [root, *root.children(recursive=True)]
        except psutil.Error:
            return
        for process in processes:
            try:
                memory = process.memory_full_info()  # reads smaps: PSS as well as RSS
                total += memory.rss
                total_pss += getattr(memory, "pss", memory.rss)
            except psutil.Error:
                continue
        now = time.time()
        self.samples.append((now, total))
        self.pss_samples.append((now, total_pss))

    def peak(self, start: float = 0.0, end: float = float("inf")) -> int:
        return max((rss for t, rss in self.samples if start <= t <= end), default=0)

    def peak_pss(self, start: float = 0.0, end: float = float("inf")) -> int:
        return max((pss for t, pss in self.pss_samples if start <= t <= end), default=0)


class Sampling:
    def __init__(self, samplers: dict[str, TreeSampler]) -> None:
        self.samplers = samplers
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for sampler in self.samplers.values():
                sampler.sample()
            self._stop.wait(SAMPLE_SECONDS)

    def __enter__(self) -> "Sampling":
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


@dataclass
class Variant:
    name: str
    server_base: str
    device_base: str
    run_config: dict[str, object]


def tiny_variant(workdir: Path) -> Variant:
    sys.path.insert(0, str(PROJECT_ROOT / "tests"))
    from tiny import build_base_folder

    base = build_base_folder(workdir / "tiny-base")
    return Variant("tiny (2-layer Llama, 32 hidden, fp32)", str(base), str(base), {
        "base-model": str(base), "base-dtype": "float32", "local-steps": 10, "batch-size": 4, "seq-len": 32,
        "learning-rate": 0.01, "lora-dropout": 0.0, "max-eval-blocks": 16,
    })


def smollm2_variant(workdir: Path) -> Variant:
    from compressor import prepare_base

    folder = str(prepare_base("smollm2")[0])
    # The pyproject defaults (bf16, seq-len 128, 12 local steps, batch 4, LoRA r 8 on q,v).
    return Variant("teacher: SmolLM2-135M-Instruct (embedded GGUF, bf16)", "smollm2", folder, {"base-model": "smollm2"})


def compressed_variant(workdir: Path) -> Variant:
    from compressor import prepare_base

    folder = str(prepare_base("compressed")[0])  # built once, then cached (and found by its recipe at run time)
    # The pyproject defaults, as the teacher variant: only the base differs.
    return Variant("compressed base (default recipe, bf16)", "compressed", folder, {"base-model": "compressed"})


VARIANTS = {"tiny": tiny_variant, "compressed": compressed_variant, "smollm2": smollm2_variant}


def run_variant(variant: Variant, workdir: Path, devices: int, rounds: int, timeout: float,
                run_timeout: float) -> dict:
    workdir.mkdir(parents=True, exist_ok=True)
    ledger_url = f"sqlite:///{workdir / 'ledger.db'}"
    with LoopbackFederation(workdir / "federation") as federation:
        federation.start_superlink()
        samplers = {"superlink": TreeSampler(lambda: federation.superlink.pid)}
        names = [f"dev{i}" for i in range(devices)]
        for name, user in zip(names, USERS):
            device = federation.add_device(name, variant.device_base, user=user)
            samplers[name] = TreeSampler(lambda device=device: device.process.pid if device.process else None)
        with Sampling(samplers):
            federation.wait_online(devices, timeout=120)
            idle = {name: _peaks(sampler, 0.0, time.time()) for name, sampler in samplers.items()}
            submitted = time.time()
            run_id = federation.submit({**variant.run_config, "num-server-rounds": rounds, "min-train-nodes": devices,
                                        "node-wait-seconds": 120, "round-timeout": timeout, "ledger-url": ledger_url,
                                        "output-dir": str(workdir / "outputs")})
            status = federation.wait_for_run(run_id, timeout=run_timeout, poll=1.0)
            finished = time.time()
        node_users = {federation.devices[n].node_id: (n, u) for n, u in zip(names, USERS)}
    with Ledger(ledger_url, read_only=True) as ledger:
        (run,) = [r for r in ledger.runs() if r.flower_run_id == run_id]
        rounds_ = ledger.rounds(run.id)
        results = ledger.client_results(run.id)
    return {"variant": variant, "status": status, "run_id": run_id, "run": run, "rounds": rounds_, "results": results,
            "samplers": samplers, "idle": idle, "submitted": submitted, "finished": finished, "node_users": node_users}


def _mib(n: int) -> str:
    return f"{n / 2**20:,.0f}"


def _kib(n: int) -> str:
    return f"{n / 2**10:,.1f}"


def _peaks(sampler: TreeSampler, start: float, end: float) -> str:
    return f"{_mib(sampler.peak(start, end))} ({_mib(sampler.peak_pss(start, end))})"


def render(outcome: dict) -> str:
    variant, rounds_, samplers = outcome["variant"], outcome["rounds"], outcome["samplers"]
    run = outcome["run"]
    ledger_start, ledger_end = run.started_at.timestamp(), (run.finished_at or run.started_at).timestamp()
    lines = [f"### {variant.name}", "",
             f"Flower run {outcome['run_id']}: **{outcome['status']}**. `flwr run` submitted to Flower reporting it "
             f"finished: {outcome['finished'] - outcome['submitted']:.1f} s = ServerApp start-up until its ledger run "
             f"starts {ledger_start - outcome['submitted']:.1f} s + rounds and final evaluation "
             f"{ledger_end - ledger_start:.1f} s + until `flwr list` reports it finished (1 s polling) "
             f"{outcome['finished'] - ledger_end:.1f} s.", ""]
    lines += ["| round | wall time (s) | clients ok / sampled | train loss | " +
              " | ".join(f"{n} peak RSS sum (PSS sum), MiB" for n in samplers) + " |",
              "|---|---|---|---|" + "---|" * len(samplers)]
    for round_ in rounds_:
        start = round_.started_at.timestamp()
        end = (round_.finished_at or datetime.now(timezone.utc)).timestamp()
        wall = end - start
        loss = round_.metrics.get("train-loss")
        loss_text = f"{loss:.3f}" if isinstance(loss, (int, float)) else "-"
        peaks = " | ".join(_peaks(s, start, end) for s in samplers.values())
        lines.append(f"| {round_.number} | {wall:.1f} | {round_.clients_replied} / {round_.clients_sampled} | "
                     f"{loss_text} | {peaks} |")
    last_end = max((r.finished_at for r in rounds_ if r.finished_at), default=None)
    if last_end is not None:
        evaluation = outcome["run"].finished_at
        wall = (evaluation - last_end).total_seconds() if evaluation else float("nan")
        peaks = " | ".join(_peaks(s, last_end.timestamp(), outcome["finished"]) for s in samplers.values())
        lines.append(f"| final evaluation | {wall:.1f} | | | {peaks} |")
    lines.append("| whole run | | | | " + " | ".join(_peaks(s, outcome["submitted"], outcome["finished"])
                                                  for s in samplers.values()) + " |")
    lines.append("| idle (connected, before the run) | | | | " + " | ".join(outcome["idle"].values()) + " |")
    lines += ["", "Bytes per device per round (ledger client results; adapter tensors only, no protocol overhead):", "",
              "| round | phase | device | user | node id | status | down (KiB) | up (KiB) | client seconds |",
              "|---|---|---|---|---|---|---|---|---|"]
    for result in sorted(outcome["results"], key=lambda r: (r.round_number, r.phase != "train", r.node_id)):
        name, user = outcome["node_users"].get(result.node_id, ("?", result.user_id))
        seconds = f"{result.seconds:.1f}" if result.seconds is not None else "-"
        lines.append(f"| {result.round_number} | {result.phase} | {name} | {user} | {result.node_id} | {result.status} | "
                     f"{_kib(result.bytes_down)} | {_kib(result.bytes_up)} | {seconds} |")
    return "\n".join(lines) + "\n"


def summary(outcomes: list[dict]) -> str:
    """One line per base: what a device pays per round, and the ratio to the first base measured."""
    lines = ["| base | status | mean round wall time (s) | device peak PSS, whole run (MiB) | device peak RSS sum (MiB) | "
             "down / up per device per round (KiB) | vs first row: round time | vs first row: device PSS |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    first = None
    for outcome in outcomes:
        rounds_ = [r for r in outcome["rounds"] if r.finished_at]
        wall = sum((r.finished_at - r.started_at).total_seconds() for r in rounds_) / max(len(rounds_), 1)
        devices = [s for name, s in outcome["samplers"].items() if name != "superlink"]
        window = (outcome["submitted"], outcome["finished"])
        pss = max(s.peak_pss(*window) for s in devices)
        rss = max(s.peak(*window) for s in devices)
        train = [r for r in outcome["results"] if r.phase == "train" and r.status == "ok"]
        down = sum(r.bytes_down for r in train) / max(len(train), 1)
        up = sum(r.bytes_up for r in train) / max(len(train), 1)
        first = first or (wall, pss)
        lines.append(f"| {outcome['variant'].name} | {outcome['status']} | {wall:.1f} | {_mib(pss)} | {_mib(rss)} | "
                     f"{_kib(down)} / {_kib(up)} | {wall / first[0]:.2f}x | {pss / first[1]:.2f}x |")
    return "\n".join(lines) + "\n"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import flwr
    import torch
    import transformers
    return (f"{cpu}, {os.cpu_count()} logical CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB RAM, "
            f"{platform.system()} {platform.release()}, Python {platform.python_version()}, flwr {flwr.__version__}, "
            f"torch {torch.__version__}, transformers {transformers.__version__}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", nargs="+", choices=sorted(VARIANTS), default=["tiny"],
                        help="bases to measure, in order; the summary compares each with the first")
    parser.add_argument("--devices", type=int, default=2, choices=range(1, len(USERS) + 1))
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--round-timeout", type=float, default=900)
    parser.add_argument("--run-timeout", type=float, default=1200, help="seconds to wait for one variant's run")
    parser.add_argument("--workdir", type=Path, default=None, help="kept if given; a temporary folder otherwise")
    parser.add_argument("--write", type=Path, default=None, help="write the markdown report here")
    args = parser.parse_args(argv)
    exit_on_sigterm()  # `timeout` or kill -TERM: the federation's __exit__ still stops every process
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="fg-deploy-bench-"))
    sections, outcomes, load_before = [], [], os.getloadavg()
    try:
        for name in args.base:
            variant = VARIANTS[name](workdir / name)
            print(f"== {variant.name}: 1 SuperLink + {args.devices} SuperNodes, {args.rounds} rounds", flush=True)
            started = time.monotonic()
            try:
                outcome = run_variant(variant, workdir / name, args.devices, args.rounds, args.round_timeout,
                                      args.run_timeout)
            except FlowerError as error:
                section = f"### {variant.name}\n\nNot measured: {error}\n"
            else:
                print(f"   {outcome['status']} in {time.monotonic() - started:.0f} s (setup included)", flush=True)
                section = render(outcome)
                outcomes.append(outcome)
            print(section, flush=True)
            sections.append(section)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    command = "python -m benchmarks.deployment " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    report = "\n".join([
        "# Deployment on loopback: 1 SuperLink + SuperNodes (TLS, node authentication)", "",
        f"Command: `{command.strip()}` (from the repository root, venv active)", "",
        f"Machine: {machine()}. Load average before / after: "
        f"{' '.join(f'{x:.1f}' for x in load_before)} / {' '.join(f'{x:.1f}' for x in os.getloadavg())} "
        "(1, 5 and 15 minutes; the benchmark's own processes count).", "",
        f"Measured {time.strftime('%Y-%m-%d %H:%M', time.gmtime())} UTC. Memory: peak of the summed RSS of each process tree, "
        f"sampled every {SAMPLE_SECONDS} s (shared library pages count once per process); PSS: the summed "
        "proportional set size of the same tree (shared pages split among the processes mapping them).", "",
        "## Summary", "", summary(outcomes) if outcomes else "(no variant finished)", "",
        *sections,
    ])
    if args.write:
        args.write.parent.mkdir(parents=True, exist_ok=True)
        args.write.write_text(report)
        print(f"wrote {args.write}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

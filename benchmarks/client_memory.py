"""Where a client's peak memory goes, and what micro-batching buys: one fresh process per case.

For each folder and micro-batch size, a fresh process (peak RSS never goes down) records its peak
(VmHWM) and current RSS after the imports, after ``from_pretrained(dtype=bfloat16)``, and after each
of 4 client steps: LoRA r8 on q_proj,v_proj (fp32), a batch of 4 x 128 tokens (the federation's
defaults) through ``shared.training.accumulate_gradients`` in micro-batches of the given size, as
``train_adapter`` does, then AdamW; and the median time of steps 2-4.

    python benchmarks/client_memory.py                                # the default base; micro-batches 1, 2, 4
    python benchmarks/client_memory.py FOLDER [FOLDER...] --micro 1 4  # any Hugging Face model folders
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "client-memory.md"
ROOT = Path(__file__).resolve().parent.parent
BATCH, SEQ_LEN, STEPS = 4, 128, 4


def _mib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def stages(folder: str, micro_batch: int) -> dict:
    """{"stages": [(stage, peak MiB, current MiB)], "step_seconds": median of steps 2-4} in this process."""
    import torch
    import transformers

    sys.path.insert(0, str(ROOT))
    from shared.adapters import attach_adapter, lora_config
    from shared.config import FederationConfig
    from shared.training import TokenBlocks, accumulate_gradients

    seen = [("imports", _mib("VmHWM"), _mib("VmRSS"))]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    seen.append(("load (bf16)", _mib("VmHWM"), _mib("VmRSS")))
    model.requires_grad_(False)
    model = attach_adapter(model, lora_config(FederationConfig()))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, model.config.vocab_size, (BATCH, SEQ_LEN), generator=torch.Generator().manual_seed(0))
    batch = TokenBlocks(ids, torch.ones_like(ids), ids.clone())
    seconds = []
    for step in range(1, STEPS + 1):
        start = time.perf_counter()
        accumulate_gradients(model, batch, micro_batch)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - start)
        seen.append((f"LoRA step {step}", _mib("VmHWM"), _mib("VmRSS")))
    return {"stages": seen, "step_seconds": statistics.median(seconds[1:])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*")
    parser.add_argument("--micro", type=int, nargs="+", default=[1, 2, BATCH], help="micro-batch sizes")
    parser.add_argument("--one", nargs=2, help=argparse.SUPPRESS)  # the child: FOLDER MICRO, prints JSON
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(stages(args.one[0], int(args.one[1]))))
        return 0
    folders = args.folders
    if not folders:
        sys.path.insert(0, str(ROOT))
        from compressor import build_compressed_base

        folders = [str(build_compressed_base(None))]
    summary, details = [], []
    for folder in folders:
        dtype = json.loads((Path(folder) / "config.json").read_text()).get("dtype", "?")
        for micro in args.micro:
            child = subprocess.run([sys.executable, __file__, "--one", folder, str(micro)], capture_output=True,
                                   text=True, check=True)
            measured = json.loads(child.stdout.strip().splitlines()[-1])
            rows = measured["stages"]
            imports, load, last = rows[0], rows[1], rows[-1]
            summary.append(f"| `{Path(folder).name}` ({dtype}) | {micro} | {imports[1]} | {load[1]} | {last[1]} "
                           f"| {last[1] - imports[1]} | {measured['step_seconds']:.2f} |")
            details += [f"`{Path(folder).name}` (saved as {dtype}), micro-batches of {micro}:", "",
                        "| stage | peak MiB | current MiB |", "|---|---:|---:|",
                        *[f"| {stage} | {peak} | {current} |" for stage, peak, current in rows], ""]
            print(f"{Path(folder).name} micro {micro}: peak {last[1]} MiB ({last[1] - imports[1]} own), "
                  f"step {measured['step_seconds']:.2f} s", flush=True)
    command = " ".join(["python benchmarks/client_memory.py", *(argv if argv is not None else sys.argv[1:])])
    lines = ["# Client memory by stage and micro-batch size", "",
             "Peak RSS (VmHWM) and current RSS in MiB of a fresh process per case: a bfloat16 base, LoRA r8 on "
             f"q_proj,v_proj, {STEPS} steps of a {BATCH} x {SEQ_LEN} batch in micro-batches (gradients accumulated "
             "as `train_adapter` does). *own* is the peak after the steps minus the peak after the imports. "
             "Written by `benchmarks/client_memory.py`.", "",
             f"Command: `{command}`  ",
             f"Machine: {platform.processor() or platform.machine()}, Python {platform.python_version()}", "",
             "| base | micro-batch | imports | after load | after the steps | own | step (s, median of 2-4) |",
             "|---|---:|---:|---:|---:|---:|---:|", *summary, "", *details]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

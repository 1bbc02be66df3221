"""Where a client's peak memory goes: load the base, attach LoRA, train, one stage at a time.

Each folder is measured in a fresh process (peak RSS never goes down): the peak (VmHWM) and current
RSS after the imports, after ``from_pretrained(dtype=bfloat16)``, and after each of 4 LoRA steps (r8 on
q_proj,v_proj, batch 4 x 128: the federation's defaults), as in benchmarks/compression.py.

    python benchmarks/client_memory.py                     # the default compressed base
    python benchmarks/client_memory.py FOLDER [FOLDER...]  # any Hugging Face model folders
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "client-memory.md"
ROOT = Path(__file__).resolve().parent.parent


def _mib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024
    raise RuntimeError(f"{field} not in /proc/self/status (Linux only)")


def stages(folder: str) -> list[tuple[str, int, int]]:
    """(stage, peak MiB, current MiB) in this process."""
    import torch
    import transformers

    sys.path.insert(0, str(ROOT))
    from shared.adapters import attach_adapter, lora_config
    from shared.config import FederationConfig

    seen = [("imports", _mib("VmHWM"), _mib("VmRSS"))]
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    seen.append(("load (bf16)", _mib("VmHWM"), _mib("VmRSS")))
    model.requires_grad_(False)
    model = attach_adapter(model, lora_config(FederationConfig()))
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    batch = torch.randint(0, model.config.vocab_size, (4, 128), generator=torch.Generator().manual_seed(0))
    for step in range(1, 5):
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seen.append((f"LoRA step {step}", _mib("VmHWM"), _mib("VmRSS")))
    return seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folders", nargs="*")
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child: measure this folder, print JSON
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(stages(args.one)))
        return 0
    folders = args.folders
    if not folders:
        sys.path.insert(0, str(ROOT))
        from shared.compression.pipeline import build_compressed_base

        folders = [str(build_compressed_base(None))]
    lines = ["# Client memory by stage", "",
             "Peak RSS (VmHWM) and current RSS in MiB of a fresh process per folder. Written by "
             "`benchmarks/client_memory.py`.", "",
             f"Command: `{' '.join(['python benchmarks/client_memory.py', *(argv if argv is not None else sys.argv[1:])])}`  ",
             f"Machine: {platform.machine()}, Python {platform.python_version()}", ""]
    for folder in folders:
        child = subprocess.run([sys.executable, __file__, "--one", folder], capture_output=True, text=True, check=True)
        measured = json.loads(child.stdout.strip().splitlines()[-1])
        dtype = json.loads((Path(folder) / "config.json").read_text()).get("dtype", "?")
        lines += [f"`{Path(folder).name}` (saved as {dtype}):", "", "| stage | peak MiB | current MiB |", "|---|---:|---:|",
                  *[f"| {stage} | {peak} | {current} |" for stage, peak, current in measured], ""]
        print(f"{folder}: " + ", ".join(f"{stage} {peak}" for stage, peak, _ in measured), flush=True)
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

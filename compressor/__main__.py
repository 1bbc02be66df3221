"""Command line: build a compressed base from a recipe, or print a built base's report.

    python -m compressor build [--recipe PATH] [--teacher SPEC] [--out DIR] [--cache-dir DIR] [--force]
                               [--device auto|cpu|cuda]
    python -m compressor report FOLDER
    python -m compressor key [--recipe PATH] [--teacher SPEC]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from compressor.build import build_compressed_base
from compressor.cache import compressed_folder
from compressor.recipe import DEFAULT_RECIPE, RecipeError, load_recipe
from compressor.report import load_report, print_report
from shared.device import DEVICES, Device, DeviceUnavailable


class CliError(Exception):
    """A command-line problem reported as one line (exit status 2)."""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m compressor", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    build = commands.add_parser("build", help="build (or find cached) the compressed base of a recipe")
    key = commands.add_parser("key", help="print the cache key and folder of a recipe without building")
    for sub in (build, key):
        sub.add_argument("--recipe", type=Path, default=None, help=f"recipe TOML (default: {DEFAULT_RECIPE})")
        sub.add_argument("--teacher", default=None, help="teacher spec overriding the recipe's: smollm2, a .gguf "
                         "file, a Hugging Face folder or hub id")
        sub.add_argument("--cache-dir", type=Path, default=None, help="cache root (default: $FEDGRAFT_CACHE or "
                         "~/.cache/fedgraft); the base goes to <cache>/compressed/<key>")
    build.add_argument("--out", type=Path, default=None, help="also copy the built model folder to DIR")
    build.add_argument("--force", action="store_true", help="rebuild even if cached")
    build.add_argument("--quiet", action="store_true", help="no progress output")
    build.add_argument("--device", choices=DEVICES, default=Device.AUTO.value,
                       help="where healing runs: auto (the GPU when there is one; default), cpu or cuda")

    report = commands.add_parser("report", help="print the compression report of a built folder")
    report.add_argument("folder", type=Path)
    report.add_argument("--json", action="store_true", help="print the JSON instead of the table")

    args = parser.parse_args(argv)
    try:
        if args.command == "report":
            return _report(args.folder, args.json)
        recipe = load_recipe(args.recipe)
        if args.teacher:
            recipe = recipe.replace(teacher=args.teacher)
        if args.command == "key":
            print(compressed_folder(recipe, args.cache_dir))
            return 0
        folder = build_compressed_base(recipe, cache_dir=args.cache_dir, progress=not args.quiet, force=args.force,
                                       device=Device(args.device))
        if args.out is not None:
            folder = _copy(folder, args.out)
        if not args.quiet:
            print_report(folder)
        print(folder)
        return 0
    except (RecipeError, FileNotFoundError, CliError, DeviceUnavailable) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _copy(folder: Path, out: Path) -> Path:
    """Copy the built folder to ``out`` (written next to it first, then renamed)."""
    if out.exists() and any(out.iterdir()):
        raise CliError(f"--out {out} exists and is not empty; choose a new folder")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(folder, partial)
    if out.exists():
        out.rmdir()
    partial.rename(out)
    return out


def _report(folder: Path, as_json: bool) -> int:
    if as_json:
        print(json.dumps(load_report(folder), indent=2))
    else:
        print_report(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())

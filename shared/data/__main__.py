"""The Shakespeare corpus from the command line: how many users each ``min-speeches`` threshold gives.

    python -m shared.data users                                  # 60 40 20 10 5 3 2, all plays
    python -m shared.data users --min-speeches 5 3 --exclude-plays macbeth,pericles
"""

from __future__ import annotations

import argparse
import sys

from shared.data.plays import users_per_threshold
from shared.data.users import DataError

DEFAULT_THRESHOLDS = (60, 40, 20, 10, 5, 3, 2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shared.data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    users = commands.add_parser("users", help="a Markdown table: min-speeches -> users (characters of a play)")
    users.add_argument("--min-speeches", type=int, nargs="+", default=list(DEFAULT_THRESHOLDS))
    users.add_argument("--exclude-plays", default="", help="comma-separated play names, as the run-config key")
    args = parser.parse_args(argv)
    excluded = [name.strip() for name in args.exclude_plays.split(",") if name.strip()]
    try:
        counts = users_per_threshold(args.min_speeches, exclude_plays=excluded)
    except DataError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print("| min-speeches | users |\n|---|---|")
    for threshold, count in counts.items():
        print(f"| {threshold} | {count} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

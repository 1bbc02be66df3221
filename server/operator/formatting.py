"""How numbers, sizes, times and metrics are shown, the same in the terminal and in the browser."""

from __future__ import annotations

import math
from datetime import datetime, timedelta
from typing import Any

# Client metrics worth a column: training loss, held-out loss of the received adapter, held-out loss
# after local training (train) or of the aggregate (evaluate), and of the base alone (evaluate).
# Exports carry every metric.
CLIENT_METRICS = ("train-loss", "eval-loss-before", "eval-loss", "base-loss")
MISSING = "-"


def number(value: Any, digits: int = 4) -> str:
    """A metric value: integers as they are, floats to ``digits`` decimals, None as "-"."""
    if value is None:
        return MISSING
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return str(value)
    return f"{value:.{digits}f}"


def size(num_bytes: int | None) -> str:
    """A byte count in binary units: 512 B, 48.0 KiB, 1.25 MiB, 3.00 GiB."""
    if num_bytes is None:
        return MISSING
    if abs(num_bytes) < 1024:
        return f"{num_bytes} B"
    value = float(num_bytes)
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        value /= 1024
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.1f} {unit}" if abs(value) >= 10 else f"{value:.2f} {unit}"
    raise AssertionError("unreachable")


def seconds(value: float | None) -> str:
    """A short duration in seconds: 0.42 s, 12.3 s, 481 s."""
    if value is None:
        return MISSING
    if value < 10:
        return f"{value:.2f} s"
    return f"{value:.1f} s" if value < 100 else f"{value:.0f} s"


def duration(value: timedelta | None) -> str:
    """A run's length: 42 s, 3 min 05 s, 2 h 04 min."""
    if value is None:
        return MISSING
    total = int(value.total_seconds())
    if total < 60:
        return f"{value.total_seconds():.0f} s"
    minutes, secs = divmod(total, 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def timestamp(value: datetime | None) -> str:
    """A UTC time to the second, as the ledger stores it: 2026-11-29 10:04:31Z."""
    if value is None:
        return MISSING
    return value.strftime("%Y-%m-%d %H:%M:%SZ")


def short_hash(value: str, length: int = 12) -> str:
    return value[:length]

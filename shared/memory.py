"""This process's own peak memory, measured the same way by clients, benchmarks and the build."""

from __future__ import annotations

import resource
import sys
from pathlib import Path


def peak_rss_bytes() -> int:
    """This process's peak resident set in bytes: VmHWM of /proc/self/status (Linux), else ru_maxrss.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss`` on Linux: a process started by fork (or vfork) + exec
    keeps the parent's high-water mark in it, so a child of a big parent reports the parent's peak.
    VmHWM belongs to the address space exec created, so it is the process's own.
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)

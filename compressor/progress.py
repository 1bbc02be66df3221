"""What a build shows while it runs: stage lines and a healing bar on stderr (rich), silent when disabled."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from typing import Any


class Progress:
    """Stage lines and a healing bar on stderr with rich; silent when disabled."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self._progress = None
        self._start = time.perf_counter()
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn
            from rich.progress import Progress as RichProgress

            self.console = Console(stderr=True)
            self._progress = RichProgress(
                TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                TextColumn("{task.fields[info]}"), console=self.console, transient=False,
            )

    def __enter__(self) -> Progress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._progress is not None:
            self._progress.stop()

    def log(self, message: str) -> None:
        if self._progress is not None:
            self._progress.console.print(f"[dim]{time.perf_counter() - self._start:6.1f}s[/] {message}")

    def task(self, description: str, total: int) -> Any:
        if self._progress is None:
            return None
        return self._progress.add_task(description, total=total, info="")

    def advance(self, task: Any, info: str = "") -> None:
        if self._progress is not None and task is not None:
            self._progress.advance(task)
            self._progress.update(task, info=info)


@contextlib.contextmanager
def stage(timings: dict[str, float], name: str, progress: Progress, message: str) -> Iterator[None]:
    """Log ``message``, run the block, and add its seconds to ``timings[name]``."""
    progress.log(message)
    start = time.perf_counter()
    yield
    timings[name] = round(timings.get(name, 0.0) + time.perf_counter() - start, 2)


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """No per-file loading/saving bars from transformers inside the build (it shows its own progress)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()

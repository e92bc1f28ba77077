"""Progress on long work: rich's bar on a terminal, a plain line now and then in a log.

rich draws nothing when its output is not a terminal (a transient bar leaves no trace at all), so a job run under
nohup, a scheduler or `| tee` sat silent for minutes and then printed its result. There the same calls print a
line per task instead: when it starts, at most every `LOG_INTERVAL_S` seconds while it runs, and when it ends.
"""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TextIO

from rich.console import Console
from rich.progress import Progress

LOG_INTERVAL_S = 30.0


def progress_bar(enabled: bool = True, transient: bool = True, console: Console | None = None,
                 columns: tuple = ()) -> Progress | LogProgress:
    """A context manager with rich's `add_task` / `advance`: rich's bar (on stderr unless `console` says otherwise)
    on a terminal, `LogProgress` lines elsewhere, nothing at all when not `enabled`."""
    console = console or Console(stderr=True)
    if enabled and not console.is_terminal:
        return LogProgress(console.file)
    if not enabled:  # rich before 14.3 still ends a disabled bar with a newline: send it nowhere
        console = Console(file=io.StringIO())
    return Progress(*columns, console=console, transient=transient, disable=not enabled)


@contextmanager
def loading_libraries(console: Console, torch: bool = True) -> Iterator[None]:
    """A spinner on a terminal while a model command imports PyTorch, fastai and timm: 3-9 s on 2 cores in which
    nothing else is printed yet, long enough to wonder whether the command started. A log or pipe gets nothing
    (rich draws no status there), so it has no line to grep past. Wrap the imports only: the spinner must be gone
    before the command's own bars and fastai's start. timm, and PyTorch under it, is imported at the end of the block:
    no cxr_fast module imports it at the top, so loading the run would, 1-2 s after the spinner had gone (export's
    spinner covered nothing at all). `torch=False` (the onnx runtime, which never imports PyTorch): no spinner."""
    if not torch:
        yield
        return
    with console.status("loading PyTorch…"):
        yield
        import timm  # noqa: F401


@dataclass
class _Task:
    description: str
    total: float | None
    completed: float = 0
    started: float = field(default_factory=time.monotonic)
    last_line: float = field(default_factory=time.monotonic)


class LogProgress:
    """The part of rich's `Progress` this project uses, writing lines such as
    ``predicting 886 images: 310/886 (35 %), 61 s`` to `stream`."""

    def __init__(self, stream: TextIO | None = None, interval: float = LOG_INTERVAL_S):
        self.stream = stream or sys.stderr
        self.interval = interval
        self.tasks: list[_Task] = []

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def add_task(self, description: str, total: float | None = None, **_) -> int:
        self.tasks.append(_Task(description, total))
        self._line(self.tasks[-1], "started")
        return len(self.tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        task = self.tasks[task_id]
        task.completed += advance
        now = time.monotonic()
        done = task.total is not None and task.completed >= task.total
        if done or now - task.last_line >= self.interval:
            task.last_line = now
            self._line(task, f"{now - task.started:.0f} s" + (", done" if done else ""))

    def _line(self, task: _Task, when: str) -> None:
        if task.total:
            count = f"{task.completed:g}/{task.total:g} ({100 * task.completed / task.total:.0f} %)"
        else:
            count = f"{task.completed:g}"
        print(f"{task.description}: {count}, {when}", file=self.stream, flush=True)

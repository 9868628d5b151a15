"""Progress of long phases, the same everywhere: a rich bar with an ETA in a terminal, periodic plain lines
when stderr is a file or a pipe (batch jobs, `| tee`), nothing when disabled. Both go to stderr, so
stdout keeps only results.

    with progress("probing", total=83) as bar:
        for chunk in chunks:
            ...
            bar.advance(len(chunk))
            bar.note("resumed 3 chunks from the store")   # a line above the bar, or a plain line
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import TextIO

LINE_EVERY_S = 15.0   # plain-line mode: at most one line per this many seconds (and one at the end)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Bar:
    """What a phase reports: `advance(n)` units of `total` done, `describe(text)` a new label, `note(text)`."""

    def advance(self, n: float = 1) -> None: ...

    def describe(self, label: str) -> None: ...

    def note(self, text: str) -> None: ...


class _RichBar(Bar):
    def __init__(self, live, task) -> None:
        self._live, self._task = live, task

    def advance(self, n: float = 1) -> None:
        self._live.advance(self._task, n)

    def describe(self, label: str) -> None:
        self._live.update(self._task, description=label)

    def note(self, text: str) -> None:
        self._live.console.print(text, highlight=False, markup=False)


class _LineBar(Bar):
    """Lines like `probing: 40/83 (48%), 0:00:32 elapsed, about 0:00:35 left`, at most every LINE_EVERY_S."""

    def __init__(self, label: str, total: float, stream: TextIO, every_s: float) -> None:
        self.label, self.total, self.done = label, total, 0.0
        self._stream, self._every = stream, every_s
        self._start = self._last = time.monotonic()

    def _line(self, text: str) -> None:
        print(text, file=self._stream, flush=True)

    def status(self) -> str:
        elapsed = time.monotonic() - self._start
        share = self.done / self.total if self.total else 1.0
        line = f"{self.label}: {self.done:g}/{self.total:g} ({share:.0%}), {_clock(elapsed)} elapsed"
        if 0 < share < 1:
            line += f", about {_clock(elapsed * (1 - share) / share)} left"
        return line

    def advance(self, n: float = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= self._every and self.done < self.total:
            self._last = now
            self._line(self.status())

    def describe(self, label: str) -> None:
        self.label = label

    def note(self, text: str) -> None:
        self._line(text)


@contextlib.contextmanager
def progress(label: str, total: float, enabled: bool = True, *, stream: TextIO | None = None,
             every_s: float = LINE_EVERY_S) -> Iterator[Bar]:
    """A bar for one phase of `total` units; see the module docstring. stream: default sys.stderr."""
    stream = stream or sys.stderr
    if not enabled:
        yield Bar()
        return
    if stream.isatty():
        from rich.console import Console
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                                   TimeRemainingColumn)

        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("ETA"), TimeRemainingColumn())
        with Progress(*columns, console=Console(file=stream)) as live:
            yield _RichBar(live, live.add_task(label, total=total))
        return
    bar = _LineBar(label, total, stream, every_s)
    bar.note(f"{label}: started ({total:g} to do)")
    try:
        yield bar
    finally:
        bar.note(bar.status().replace(f"{bar.label}:", f"{bar.label}: done" if bar.done >= total
                                      else f"{bar.label}: stopped at", 1))

"""Long phases report progress, also when nobody watches a terminal (issue 20, item 5)."""

from __future__ import annotations

import io

import numpy as np

from jaxprobe.runtime import progress as progress_module
from jaxprobe.runtime.batching import run_batched
from jaxprobe.runtime.progress import progress


def test_without_a_terminal_progress_is_periodic_lines_with_an_eta(monkeypatch):
    clock = iter(np.arange(0.0, 1000.0, 10.0))   # every call of the clock is 10 s later
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: float(next(clock)))
    stream = io.StringIO()
    with progress("probing", 4, stream=stream, every_s=15.0) as bar:
        for _ in range(4):
            bar.advance()
        bar.note("resuming, 1 of 5 chunks already in the store")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "probing: started (4 to do)"
    assert any("2/4 (50%)" in line and "left" in line for line in lines)
    assert "resuming" in lines[-2] and lines[-1].startswith("probing: done 4/4 (100%)")


def test_a_stopped_phase_says_where_it_stopped():
    stream = io.StringIO()
    try:
        with progress("SAEs", 10, stream=stream) as bar:
            bar.advance(3)
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert stream.getvalue().splitlines()[-1].startswith("SAEs: stopped at 3/10")


def test_disabled_progress_writes_nothing_and_batches_advance_an_outer_bar():
    stream = io.StringIO()
    with progress("x", 5, enabled=False, stream=stream) as bar:
        bar.advance(5)
    assert stream.getvalue() == ""
    with progress("features", 10, stream=stream, every_s=1e9) as bar:
        out = run_batched(lambda b: {"y": b * 2}, np.arange(10.0), 4, progress=bar)
    assert out["y"].tolist() == [2.0 * i for i in range(10)]
    assert "done 10/10" in stream.getvalue().splitlines()[-1]

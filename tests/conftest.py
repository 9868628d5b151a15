"""Suite-wide pytest hooks.

The suite compiles the same tiny programs in both xdist workers and in the subprocesses its CLI, crash and
multi-host tests start. One persistent XLA compilation cache per run, in a temporary folder the controller
makes and every process inherits through the environment, compiles each once: a program loaded from it is
the same executable. `JAX_COMPILATION_CACHE_DIR` set by the user is kept.

`make test` runs `pytest -n 2 --dist loadgroup`. Two things about that are ours:

- Order. The run ends when the busier worker does, so the slowest work goes out first: every worker puts
  the `slow`-marked tests at the front of its collection, and the scheduler keeps that order (xdist would
  sort units by their number of tests, which says nothing about their time).
- Crashes. When a worker process dies (an abort inside XLA, which this suite has met about once a full
  run and never on demand: one run's stack had it serialising a CPU executable for the compilation cache,
  `compilation_cache.put_executable_and_time`; or the kernel's OOM killer), pytest-xdist 3.8's group
  scheduler can deadlock: it puts the dead worker's finished groups back on the queue as empty units and
  may hand the replacement a single test, which the worker holds until a second one arrives (pytest-xdist
  issues #1323, #1327, #1378); CI then times out with nothing reported. The scheduler below requeues only
  the tests that never ran, keeps every live worker two tests ahead, and runs the test that took a worker
  down once more on a fresh one: a second crash fails it, and a crash that did not repeat is still named
  in the summary, so neither is hidden.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

# The suite's time is mostly XLA compiling tiny programs that then run for milliseconds. LLVM at -O1
# instead of -O2 compiles them 16% faster over test_interventions + test_pipeline (271 s -> 227 s under
# -n 2) and leaves every parity and bit-identity test as it is; the user's own value is kept.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=1".strip()

_OWN_CACHE = "JAX_COMPILATION_CACHE_DIR" not in os.environ
if _OWN_CACHE:   # the controller (or a plain run) gets here first; workers and subprocesses inherit it
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jaxprobe-test-xla-cache-")


def pytest_unconfigure(config):
    if _OWN_CACHE and not hasattr(config, "workerinput"):
        shutil.rmtree(os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)

try:
    from xdist.scheduler import LoadGroupScheduling
except ImportError:   # plain `pytest` without xdist: nothing to schedule
    LoadGroupScheduling = None


def pytest_collection_modifyitems(config, items):
    if hasattr(config, "workerinput"):   # only where the scheduler decides the order
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)


if LoadGroupScheduling is not None:
    class CrashTolerantLoadGroupScheduling(LoadGroupScheduling):

        def __init__(self, config, log=None):
            super().__init__(config, log)
            self.crashed_once: list[str] = []

        def schedule(self):
            self.config.option.loadscopereorder = False   # keep the slow-first collection order
            super().schedule()

        def remove_node(self, node):
            workload = self.assigned_work.pop(node)
            unfinished = {scope: unit for scope, unit in workload.items() if not all(unit.values())}
            if not unfinished:
                return None
            crashed = next(nodeid for unit in unfinished.values() for nodeid, done in unit.items() if not done)
            rerun = crashed not in self.crashed_once
            if rerun:
                self.crashed_once.append(crashed)
            else:
                unfinished[self._split_scope(crashed)][crashed] = True
            self.workqueue.update((scope, unit) for scope, unit in unfinished.items() if not all(unit.values()))
            for other in self.assigned_work:
                self._reschedule(other)
            return None if rerun else crashed   # xdist reports a returned test as failed

        def _reschedule(self, node):
            if node.shutting_down:
                return
            if not self.workqueue:
                node.shutdown()
                return
            # a worker runs a test only once it holds the next one: two pending tests keep it going
            while self.workqueue and self._pending_of(self.assigned_work[node]) < 2:
                self._assign_work_unit(node)

    @pytest.hookimpl(tryfirst=True)
    def pytest_xdist_make_scheduler(config, log):
        if config.getvalue("dist") != "loadgroup":
            return None
        config.crash_tolerant_scheduler = CrashTolerantLoadGroupScheduling(config, log)
        return config.crash_tolerant_scheduler

    def pytest_terminal_summary(terminalreporter, config):
        scheduler = getattr(config, "crash_tolerant_scheduler", None)
        if scheduler is not None and scheduler.crashed_once:
            terminalreporter.write_sep("=", "tests that took their worker down and were run again", red=True)
            for nodeid in scheduler.crashed_once:
                terminalreporter.write_line(nodeid)

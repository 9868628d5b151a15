"""Suite-wide pytest hooks.

The suite compiles the same tiny programs in both xdist workers and in the subprocesses its CLI, crash and
multi-host tests start. One persistent XLA compilation cache per run, in a temporary folder the controller
makes and every process inherits through the environment, compiles each once: a program loaded from it is
the same executable. `JAX_COMPILATION_CACHE_DIR` set by the user is kept.

`make test` runs `pytest -n 2 --dist loadgroup`. When a worker process dies (a native crash inside a
compiler, the kernel's OOM killer), pytest-xdist 3.8's group scheduler can deadlock: it puts the dead
worker's finished groups back on the queue as empty units and may hand the replacement worker a single
test, which the worker holds until a second one arrives (pytest-xdist issues #1323, #1327, #1378). The
run then never ends and CI times out with nothing reported. The scheduler below requeues only the
tests that never ran, never reruns the one that took the worker down (xdist has already reported it
failed), and keeps every live worker at least two tests ahead, so a crash costs one failed test.
"""

from __future__ import annotations

import os
import shutil
import tempfile

import pytest

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


if LoadGroupScheduling is not None:
    class CrashTolerantLoadGroupScheduling(LoadGroupScheduling):

        def remove_node(self, node):
            workload = self.assigned_work.pop(node)
            unfinished = {scope: unit for scope, unit in workload.items() if not all(unit.values())}
            if not unfinished:
                return None
            crashed = next(nodeid for unit in unfinished.values() for nodeid, done in unit.items() if not done)
            unfinished[self._split_scope(crashed)][crashed] = True
            self.workqueue.update((scope, unit) for scope, unit in unfinished.items() if not all(unit.values()))
            for other in self.assigned_work:
                self._reschedule(other)
            return crashed

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
        return CrashTolerantLoadGroupScheduling(config, log) if config.getvalue("dist") == "loadgroup" else None

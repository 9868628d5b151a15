"""The package's layout: the import-linter contracts in pyproject.toml hold, and the light entry points
(`import jaxprobe`, the CLI's --help, the pandas-only analyses) load no JAX."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    """This checkout first on the path, so the subprocess sees the code under test, not an installed copy."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def test_import_contracts_hold():
    pytest.importorskip("importlinter", reason="import-linter is in the dev extra")
    # What the lint-imports console script runs (`python -m importlinter.cli` runs nothing).
    code = "import sys; from importlinter.cli import lint_imports_command; sys.exit(lint_imports_command())"
    done = subprocess.run([sys.executable, "-c", code, "--no-cache", "--no-logo"], cwd=ROOT, env=_env(), check=False,
                          capture_output=True, text=True, timeout=300)
    output = f"{done.stdout}\n{done.stderr}"
    assert done.returncode == 0 and "0 broken" in done.stdout, f"lint-imports failed:\n{output}"


HEAVY = ("jax", "flax", "optax", "pandas", "matplotlib")
# `jaxprobe --help` itself: the app built and its help rendered (Typer exits when done)
HELP = """
import sys
from jaxprobe.cli import app
sys.argv = ["jaxprobe", "--help"]
try:
    app()
except SystemExit as done:
    assert done.code == 0, done.code
"""


@pytest.mark.parametrize(("code", "heavy"), [
    ("import jaxprobe", HEAVY),                                      # public names load on first use
    ("import jaxprobe.cli", HEAVY),                                  # commands import what they run
    (HELP, HEAVY),
    ("import jaxprobe.studies.norms_probing.decoding", ("jax", "flax", "optax")),  # pandas-only analyses
], ids=["jaxprobe", "cli", "cli --help", "norms_probing.decoding"])
def test_light_entry_points_load_no_jax(code, heavy):
    check = f"{code}\nimport sys\nloaded = [m for m in {heavy!r} if m in sys.modules]\nassert not loaded, loaded"
    done = subprocess.run([sys.executable, "-c", check], cwd=ROOT, env=_env(), check=False, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, f"{code.strip()!r} should load none of {heavy}:\n{done.stdout}\n{done.stderr}"

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
    done = subprocess.run([sys.executable, "-c", code, "--no-cache", "--no-logo"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    output = f"{done.stdout}\n{done.stderr}"
    assert done.returncode == 0 and "0 broken" in done.stdout, f"lint-imports failed:\n{output}"

"""The code base stays ruff-clean and mypy-clean (configuration in pyproject.toml)."""

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_ruff_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).with_name("ruff"))
    if not Path(ruff).exists():
        pytest.fail("ruff is not installed: pip install -e .[test]")
    out = subprocess.run([ruff, "check", str(ROOT)], capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


def test_mypy_clean():
    # The mypy of this interpreter's environment, run from the root so that it reads
    # [tool.mypy] in pyproject.toml (the files to check and the strictness).
    if importlib.util.find_spec("mypy") is None:
        pytest.fail("mypy is not installed: pip install -e .[test]")
    out = subprocess.run([sys.executable, "-m", "mypy"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr

"""Locations of the project's non-Python files (scripts, kernel config, scenarios)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def repo_path(*parts: str) -> Path:
    """A path inside the pviommu checkout; raises if it is not there.

    pviommu runs from its checkout (``pip install -e .``), where the provisioning
    scripts and guest scenarios live next to the package.
    """
    path = ROOT.joinpath(*parts)
    if not path.exists():
        raise FileNotFoundError(
            f"{path} is missing: run pviommu from its source checkout (pip install -e .)"
        )
    return path

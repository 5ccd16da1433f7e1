"""Checks a kernel .config against the options a pviommu guest needs."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from .resources import repo_path

_SET = re.compile(r"^(CONFIG_\w+)=(.*)$")
_UNSET = re.compile(r"^# (CONFIG_\w+) is not set$")


def parse_config(text: str) -> dict[str, str]:
    """Parses a kernel config: name -> value ('y', 'm', a string...; 'n' if unset)."""
    values: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if m := _SET.match(line):
            values[m.group(1)] = m.group(2)
        elif m := _UNSET.match(line):
            values[m.group(1)] = "n"
    return values


def default_fragment() -> Path:
    """The project's own fragment, guest-kernel-config/pviommu.config."""
    return repo_path("guest-kernel-config", "pviommu.config")


@dataclass(frozen=True)
class Problem:
    """One option that does not have the value the guest needs."""

    option: str
    wanted: str
    actual: str

    def __str__(self) -> str:
        state = "missing (not set)" if self.actual == "n" else f"is {self.actual}"
        return f"{self.option}: {state}, needs {self.wanted}"


def _acceptable(wanted: str, actual: str) -> bool:
    if wanted == "m":
        return actual in ("m", "y")
    return actual == wanted


def check(config_text: str, fragment_text: str) -> list[Problem]:
    """The options of the fragment the config does not satisfy.

    A wanted ``m`` is also satisfied by ``y``; a wanted ``n`` by absence.
    """
    have = parse_config(config_text)
    problems = []
    for option, wanted in parse_config(fragment_text).items():
        actual = have.get(option, "n")
        if not _acceptable(wanted, actual):
            problems.append(Problem(option, "y or m" if wanted == "m" else wanted, actual))
    return problems

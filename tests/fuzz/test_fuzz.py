"""The fuzz targets in CI: the seed corpus and every crash input run clean, and a short
coverage-guided run of each target (FUZZ_SECONDS, default 3 s each) finds nothing.

A crash input whose fix waits for another file (tests/fuzz/crashes/PENDING.json
names it and why) is an expected failure until then.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pviommu.fuzz import common, engine
from pviommu.fuzz.cli import add_fuzz_parser, cmd_fuzz
from pviommu.fuzz.common import quiet_logging, run_input
from pviommu.fuzz.registry import TARGETS

HERE = Path(__file__).parent
CORPUS = HERE / "corpus"
CRASHES = HERE / "crashes"
PENDING: dict[str, str] = json.loads((CRASHES / "PENDING.json").read_text()) \
    if (CRASHES / "PENDING.json").exists() else {}
SECONDS = float(os.environ.get("FUZZ_SECONDS", "3"))


def _inputs(root: Path) -> list[tuple[str, Path]]:
    return sorted((t.name, f) for t in root.iterdir() if t.is_dir()
                  for f in t.iterdir() if f.is_file()) if root.is_dir() else []


@pytest.fixture(autouse=True)
def _quiet():
    quiet_logging()


def test_every_target_has_seeds():
    assert {t for t, _ in _inputs(CORPUS)} == set(TARGETS)


@pytest.mark.parametrize(("target", "path"), _inputs(CORPUS),
                         ids=[f"{t}/{p.name}" for t, p in _inputs(CORPUS)])
def test_seed_runs_clean(target, path):
    run_input(TARGETS[target].load(), path.read_bytes())


def _crash_params():
    out = []
    for target, path in _inputs(CRASHES):
        key = f"{target}/{path.name}"
        marks = [pytest.mark.xfail(reason=PENDING[key], strict=True)] if key in PENDING else []
        out.append(pytest.param(target, path, id=key, marks=marks))
    return out


@pytest.mark.parametrize(("target", "path"), _crash_params())
def test_crash_input_is_handled(target, path, monkeypatch):
    """Each input a fuzzer found a fault with, run with no known issue tolerated."""
    monkeypatch.setattr(common, "KNOWN_ISSUES", set())
    run_input(TARGETS[target].load(), path.read_bytes())


@pytest.mark.parametrize("target", list(TARGETS))
def test_short_fuzz_run_finds_nothing(target, tmp_path):
    result = engine.run(target, SECONDS, tmp_path / "corpus", tmp_path / "artifacts")
    assert result.executed > 0, result.output[-2000:]
    assert not result.findings, result.summary() + "\n" + result.output[-4000:]


def test_a_finding_is_reported_with_its_input(tmp_path, monkeypatch):
    """The whole pipeline on a known fault: the pending crash input as the corpus, with
    nothing tolerated, is a finding whose input is written out."""
    crashes = [(t, p) for t, p in _inputs(CRASHES)]
    if not crashes:
        pytest.skip("no crash input in the repository")
    target, path = crashes[0]
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / path.name).write_bytes(path.read_bytes())
    monkeypatch.setenv("PVIOMMU_FUZZ_STRICT", "1")
    result = engine.run(target, 1.0, corpus, tmp_path / "artifacts")
    if f"{target}/{path.name}" not in PENDING:
        assert not result.findings, result.summary()
        return
    assert len(result.findings) == 1, result.summary() + result.output[-3000:]
    finding = result.findings[0]
    assert finding.kind == "crash" and "Finding" in finding.message, result.summary()
    assert finding.path is not None and finding.path.read_bytes() == path.read_bytes()


def test_cli_lists_the_targets(capsys):
    import argparse

    parser = argparse.ArgumentParser()
    add_fuzz_parser(parser.add_subparsers())
    assert cmd_fuzz(parser.parse_args(["fuzz", "--list"])) == 0
    assert set(capsys.readouterr().out.split()[::1]) >= set(TARGETS)


def test_hypothesis_fallback_runs_the_same_targets(tmp_path):
    result = engine.run("vmsa", 1.0, tmp_path / "corpus", tmp_path / "artifacts",
                        engine="hypothesis")
    assert result.executed > 0 and result.lines and not result.findings, result.summary()
    assert "hypothesis" in result.engine

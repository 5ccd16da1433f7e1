"""Runs a fuzz target for a time: under atheris (libFuzzer, coverage-guided) when it is
installed, else under hypothesis with the same ``one_input``.

With atheris the target runs in a child process (libFuzzer exits when it is done) and
its report is read from the child's output: inputs executed, coverage (libFuzzer's
``cov``: edges, and ``ft``: features), corpus size, and the first finding (libFuzzer
stops there), whose input is written into the artifacts directory. Without it,
hypothesis generates inputs for ``seconds``, seeds first; coverage is then the number
of pviommu source lines the inputs ran, and a finding is shrunk before it is written.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from .registry import TARGETS, Target

PER_INPUT_TIMEOUT = 10
"""Seconds one input may run before it counts as a hang (libFuzzer's ``-timeout``)."""
RSS_LIMIT_MB = 2048
SEEDS = Path(__file__).resolve().parents[2] / "tests" / "fuzz" / "corpus"
"""The seed corpora in the source tree (``SEEDS/<target>/``), if pviommu runs from one."""


@dataclass
class FuzzFinding:
    """An input the target failed on: the kind (crash, timeout, oom), what happened,
    and where the input was written."""

    kind: str
    message: str
    path: Path | None


@dataclass
class Result:
    """What a run did."""

    target: str
    engine: str
    seconds: float
    executed: int = 0
    edges: int | None = None
    features: int | None = None
    lines: int | None = None
    corpus: int = 0
    findings: list[FuzzFinding] = field(default_factory=list)
    output: str = ""

    @property
    def coverage(self) -> str:
        """The coverage figure as the engine reports it."""
        if self.edges is not None:
            return f"{self.edges} edges, {self.features} features"
        if self.lines is not None:
            return f"{self.lines} lines"
        return "unknown"

    def summary(self) -> str:
        """The report's lines."""
        rate = self.executed / self.seconds if self.seconds else 0.0
        lines = [f"target:    {self.target}",
                 f"engine:    {self.engine}",
                 f"time:      {self.seconds:.1f} s",
                 f"executed:  {self.executed} inputs ({rate:.0f}/s)",
                 f"coverage:  {self.coverage}",
                 f"corpus:    {self.corpus} inputs",
                 f"findings:  {len(self.findings)}"]
        for f in self.findings:
            lines.append(f"  {f.kind}: {f.message}")
            if f.path is not None:
                lines.append(f"    input: {f.path}")
        return "\n".join(lines)


def atheris_available() -> bool:
    """Whether atheris can be imported here."""
    return importlib.util.find_spec("atheris") is not None


def seed_dir(target: str) -> Path | None:
    """The target's seed corpus in the source tree, if there is one."""
    path = SEEDS / target
    return path if path.is_dir() else None


def run(name: str, seconds: float, corpus: Path | None = None,
        artifacts: Path | None = None, engine: str = "auto") -> Result:
    """Fuzzes target ``name`` for ``seconds``. New inputs go to ``corpus`` (a temporary
    directory if None), findings to ``artifacts`` (the current directory if None).
    ``engine`` is "atheris", "hypothesis" or "auto" (atheris if installed)."""
    target = TARGETS[name]
    if engine == "auto":
        engine = "atheris" if atheris_available() else "hypothesis"
    artifacts = Path(artifacts or Path.cwd())
    artifacts.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"pviommu-fuzz-{name}-") as tmp:
        work = Path(corpus) if corpus is not None else Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        if engine == "atheris":
            return _run_atheris(target, seconds, work, artifacts)
        return _run_hypothesis(target, seconds, work, artifacts)


# -- atheris ------------------------------------------------------------------------------

_STATUS = re.compile(r"^#(\d+)\s+\w+\s+cov: (\d+) ft: (\d+) corp: (\d+)/", re.M)
_EXECUTED = re.compile(r"stat::number_of_executed_units: (\d+)")
_WRITTEN = re.compile(r"Test unit written to (\S+)")
_ERROR = re.compile(r"ERROR: libFuzzer: (.+)")
_DONE = re.compile(r"^#(\d+)\s+DONE\s", re.M)


def _run_atheris(target: Target, seconds: float, work: Path, artifacts: Path) -> Result:
    args = [sys.executable, "-m", "pviommu.fuzz.worker", target.name,
            f"-max_total_time={max(int(seconds), 1)}", f"-timeout={PER_INPUT_TIMEOUT}",
            f"-rss_limit_mb={RSS_LIMIT_MB}", f"-max_len={target.max_len}",
            "-print_final_stats=1", f"-artifact_prefix={artifacts}{os.sep}", str(work)]
    seeds = seed_dir(target.name)
    if seeds is not None:
        args.append(str(seeds))  # read, never written: new inputs go to the first
    start = time.monotonic()
    proc = subprocess.run(args, capture_output=True, text=True, errors="replace",
                          timeout=seconds + 120, check=False)
    elapsed = time.monotonic() - start
    out = proc.stdout + proc.stderr
    result = Result(target.name, "atheris (libFuzzer, coverage-guided)", elapsed,
                    output=out)
    status = _STATUS.findall(out)
    if status:
        executed, cov, ft, corp = (int(x) for x in status[-1])
        result.executed, result.edges, result.features, result.corpus = \
            executed, cov, ft, corp
    done = _EXECUTED.search(out) or _DONE.search(out)
    if done:
        result.executed = max(result.executed, int(done.group(1)))
    written = _WRITTEN.search(out)
    if proc.returncode != 0 or written:
        error = _ERROR.search(out)
        kind = error.group(1).strip() if error else "crash"
        if "Uncaught Python exception" in out:
            kind = "crash"
        result.findings.append(FuzzFinding(kind, _python_error(out) or
                                           f"exit status {proc.returncode}",
                                           Path(written.group(1)) if written else None))
    return result


def _python_error(out: str) -> str:
    """The last line of the uncaught exception atheris printed (its type and message)."""
    head = out.find("=== Uncaught Python exception: ===")
    if head < 0:
        return ""
    last = ""
    for line in out[head:].splitlines()[1:]:
        if line.startswith("==") or line.startswith("MS:"):
            break
        if _EXCEPTION_LINE.match(line):
            last = line
    return last


_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception|Finding|Exit|Interrupt)\b")


# -- hypothesis ---------------------------------------------------------------------------

class Hang(Exception):
    """An input ran past the per-input time limit."""


class _Lines:
    """Counts the pviommu source lines run (outside pviommu.fuzz), with sys.settrace."""

    def __init__(self) -> None:
        root = Path(__file__).resolve().parents[1]
        self.prefix = str(root) + os.sep
        self.exclude = str(root / "fuzz") + os.sep
        self.lines: set[tuple[str, int]] = set()

    def trace(self, frame: FrameType, event: str, arg: Any) -> Any:
        filename = frame.f_code.co_filename
        if not filename.startswith(self.prefix) or filename.startswith(self.exclude):
            return None
        return self._local

    def _local(self, frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            self.lines.add((frame.f_code.co_filename, frame.f_lineno))
        return self._local


def _run_hypothesis(target: Target, seconds: float, work: Path, artifacts: Path) -> Result:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from .common import quiet_logging, run_input

    quiet_logging()
    one_input = target.load()
    result = Result(target.name, "hypothesis (random inputs with shrinking, no coverage "
                    "guidance" + ("" if atheris_available() else ": atheris is not installed")
                    + ")", 0.0)
    lines = _Lines()
    failing: list[bytes] = []

    def alarm(signum: int, frame: FrameType | None) -> None:
        raise Hang(f"input ran over {PER_INPUT_TIMEOUT} s")

    def execute(data: bytes) -> None:
        result.executed += 1
        old = signal.signal(signal.SIGALRM, alarm)
        signal.setitimer(signal.ITIMER_REAL, PER_INPUT_TIMEOUT)
        sys.settrace(lines.trace)
        try:
            run_input(one_input, data)
        except BaseException:
            failing.append(data)
            raise
        finally:
            sys.settrace(None)
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)

    seeds = sorted(p for d in (seed_dir(target.name), work) if d is not None
                   for p in d.iterdir() if p.is_file())
    start = time.monotonic()
    deadline = start + seconds
    error: BaseException | None = None
    try:
        for path in seeds:
            execute(path.read_bytes())
        result.corpus = len(seeds)

        @settings(max_examples=200, deadline=None, database=None, derandomize=False,
                  suppress_health_check=list(HealthCheck))
        @given(st.binary(max_size=target.max_len))
        def batch(data: bytes) -> None:
            execute(data)

        while time.monotonic() < deadline:
            batch()
    except Exception as e:  # noqa: BLE001 - every failure of the target is a finding
        error = e
    result.seconds = time.monotonic() - start
    result.lines = len(lines.lines)
    if error is not None:
        data = failing[-1] if failing else b""
        path = artifacts / f"crash-{hashlib.sha1(data).hexdigest()}"
        path.write_bytes(data)
        kind = "timeout" if isinstance(error, Hang) else "crash"
        result.findings.append(FuzzFinding(kind, f"{type(error).__name__}: {error}"
                                           .splitlines()[0], path))
    return result

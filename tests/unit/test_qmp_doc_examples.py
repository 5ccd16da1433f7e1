"""Every example of docs/QMP.md works as written, against a real `pviommu serve`.

The blocks after a ``<!-- docs-test: qmp-shell -->`` or ``<!-- docs-test:
python -->`` comment are run in the directory where the backend listens on
``qmp.sock``, as the docs say (the README's "Running the backend yourself").
"""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from pviommu.resources import repo_path
from tests.fakes.served import ServedBackend

QMP_DOC = repo_path("docs", "QMP.md")
QMP_SHELL = Path(sys.executable).with_name("qmp-shell")


def doc_blocks(text: str, kind: str) -> list[str]:
    """The fenced code blocks that follow a ``<!-- docs-test: KIND -->`` comment."""
    rx = re.compile(rf"<!-- docs-test: {re.escape(kind)} -->\s*\n```[\w-]*\n(.*?)\n```",
                    re.DOTALL)
    return rx.findall(text)


def test_the_blocks_are_found():
    text = QMP_DOC.read_text()
    assert len(doc_blocks(text, "qmp-shell")) == 1
    assert len(doc_blocks(text, "python")) == 1
    assert "0xdead000" not in doc_blocks(text, "qmp-shell")[0]


def _run(argv: list[str], cwd: Path, stdin: str = "") -> str:
    proc = subprocess.run(argv, cwd=cwd, input=stdin, capture_output=True, text=True,
                          timeout=30)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


@pytest.mark.skipif(not QMP_SHELL.exists(), reason="qmp-shell is not in the venv")
async def test_the_qmp_shell_examples_work_as_written(tmp_path):
    [block] = doc_blocks(QMP_DOC.read_text(), "qmp-shell")
    commands = [line.removeprefix("(QEMU) ") for line in block.splitlines()
                if line.startswith("(QEMU) ")]
    assert len(commands) >= 2
    async with ServedBackend.start(tmp_path, extra=[]) as served:
        assert served.qmp == tmp_path / "qmp.sock"
        out = _run([str(QMP_SHELL), "qmp.sock"], tmp_path, "\n".join(commands) + "\n")
    answers = [line for line in out.splitlines() if line.startswith("(QEMU) {")]
    assert len(answers) == len(commands), out
    assert all('"return"' in a and '"error"' not in a for a in answers), out


async def test_the_python_example_works_as_written(tmp_path):
    [block] = doc_blocks(QMP_DOC.read_text(), "python")
    (tmp_path / "example.py").write_text(block)
    async with ServedBackend.start(tmp_path, extra=[]) as served:
        assert served.qmp == tmp_path / "qmp.sock"
        out = _run([sys.executable, "example.py"], tmp_path)
    assert "'faults-reported'" in out and "{'delivered': False}" in out, out

"""pviommu's pytest plugin (registered through the ``pytest11`` entry point).

Fixtures:

- ``make_lab``: an async factory, ``lab = await make_lab(topology, **options)``,
  that starts a :class:`~pviommu.lab.Lab` (a Topology, a topology file, or
  None for ``Topology()``) and stops every lab it made when the test ends;
- ``lab``: one started lab, described by the test's ``lab`` marker
  (``@pytest.mark.lab("topologies/pv.toml")``, or a Topology; none: ``Topology()``).

Markers: ``lab(topology, **options)`` describes the ``lab`` fixture's lab;
``qemu`` is put on every test that uses either fixture, so ``-m "not qemu"``
leaves out the tests that boot guests. A failed test keeps its lab's files
(console log, backend log) and names them in its report.

The fixtures are asyncio fixtures: the plugin needs pytest-asyncio, and the
tests must run in its event loop (``asyncio_mode = "auto"``, or
``@pytest.mark.asyncio`` on each test).
"""

from __future__ import annotations

import importlib.util
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from .lab import Lab
from .topology import Topology

HAVE_PYTEST_ASYNCIO = importlib.util.find_spec("pytest_asyncio") is not None

MakeLab = Callable[..., Awaitable[Lab]]
_FIXTURES = ("lab", "make_lab")
_REPORT = pytest.StashKey[dict[str, pytest.TestReport]]()


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "qemu: boots QEMU and a guest (a pviommu lab)")
    config.addinivalue_line(
        "markers", "lab(topology=None, **options): the lab the `lab` fixture starts: a "
        "pviommu.lab.Topology or a topology file (relative to the test's file)")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if any(f in getattr(item, "fixturenames", ()) for f in _FIXTURES):
            item.add_marker(pytest.mark.qemu)


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]
                              ) -> Any:
    report = yield
    item.stash.setdefault(_REPORT, {})[report.when] = report
    return report


def _failed(node: pytest.Item) -> bool:
    reports = node.stash.get(_REPORT, {})
    return any(r.failed for r in reports.values())


def _topology(spec: Topology | str | Path | None, base: Path) -> Topology | None:
    if spec is None or isinstance(spec, Topology):
        return spec
    path = Path(spec)
    return Topology.from_toml(path if path.is_absolute() else base / path)


if HAVE_PYTEST_ASYNCIO:
    import pytest_asyncio

    @pytest_asyncio.fixture
    async def make_lab(request: pytest.FixtureRequest) -> AsyncIterator[MakeLab]:
        """An async factory of started labs, all stopped when the test ends."""
        labs: list[Lab] = []
        base = Path(str(request.node.path)).parent

        async def make(topology: Topology | str | Path | None = None, **options: Any) -> Lab:
            lab = Lab(_topology(topology, base), **options)
            labs.append(lab)
            await lab.start()
            return lab

        try:
            yield make
        finally:
            failed = _failed(request.node)
            for lab in reversed(labs):
                await lab.stop(failed=failed)
                if failed:
                    request.node.add_report_section(
                        "teardown", "pviommu lab",
                        f"lab files kept in {lab.workdir} (console.log, backend.log)")

    @pytest_asyncio.fixture
    async def lab(request: pytest.FixtureRequest, make_lab: MakeLab) -> Lab:
        """One started lab, as the test's ``lab`` marker describes it."""
        marker = request.node.get_closest_marker("lab")
        args = marker.args if marker else ()
        options = dict(marker.kwargs) if marker else {}
        topology = args[0] if args else options.pop("topology", None)
        return await make_lab(topology, **options)

else:

    @pytest.fixture
    def make_lab() -> MakeLab:
        pytest.fail("pviommu's lab fixtures need pytest-asyncio (pip install pytest-asyncio)")

    @pytest.fixture
    def lab() -> Lab:
        pytest.fail("pviommu's lab fixtures need pytest-asyncio (pip install pytest-asyncio)")

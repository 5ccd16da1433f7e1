"""fio in a lab's guest: the static arm64 build runs the benchmark's kind of job
through the PV-IOMMU and reports it as JSON."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pviommu.lab import Lab, Topology
from pviommu.machine.fio import fio_files, fio_json

pytestmark = pytest.mark.e2e

JOB = ("fio --name=t --filename=/dev/vda --rw=randread --bs=4k --iodepth=16 "
       "--ioengine=libaio --direct=1 --size=8M --runtime=3 --output-format=json")


async def test_fio_reads_through_the_pv_iommu_and_reports_json(tmp_path: Path) -> None:
    files = fio_files()  # built into the cache on first use (about a minute)
    started = time.monotonic()
    async with Lab(Topology(files=files), workdir=tmp_path / "lab") as lab:
        assert (await lab.run("ls -l /bin/fio")).status == 0
        result = await lab.run(JOB, timeout=60, check=True)
        report = fio_json(result.output)
    assert time.monotonic() - started < 45
    assert report["fio version"] == "fio-3.33"
    [job] = report["jobs"]
    assert (job["jobname"], job["error"]) == ("t", 0)
    assert job["job options"]["ioengine"] == "libaio"
    read = job["read"]
    assert read["iops"] > 0 and read["bw"] > 0 and read["total_ios"] > 0
    assert read["io_bytes"] == read["total_ios"] * 4096
    percentiles = read["clat_ns"]["percentile"]
    assert {"50.000000", "99.000000"} <= percentiles.keys()
    assert 0 < percentiles["50.000000"] <= percentiles["99.000000"]
    assert job["write"]["total_ios"] == 0

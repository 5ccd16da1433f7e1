"""The soak's verdict: the backend's own memory (anonymous RSS) must stay flat; the
guest RAM pages its mapping touched (shmem) may grow."""

from pviommu.scenarios import soak


def _report(anon: list[int], shmem: list[int]) -> dict:
    pairs = enumerate(zip(anon, shmem, strict=True))
    samples = [{"t_s": 5.0 * i, "rss_anon_kib": a, "rss_shmem_kib": m, "rss_file_kib": 9000,
                "rss_kib": a + m + 9000, "fds": 25} for i, (a, m) in pairs]
    return {"mode": "pv", "seconds": 60, "guest_status": 0,
            "guest": {"writes": 10, "reads": 12, "verified": 4, "bad": 0,
                      "write_retries": 1, "read_retries": 0},
            "host_blocks_checked": 4, "host_blocks_good": 4,
            "host": {"faults_injected": 3, "mappings_taken": 3},
            "samples": samples, "guest_io_errors": 1, "backend_tracebacks": 0}


def test_guest_pages_touched_do_not_fail_the_soak():
    report = _report(anon=[22000, 22660, 22664, 22668], shmem=[1600, 2240, 5000, 7352])
    assert report["samples"][-1]["rss_kib"] > 1.1 * report["samples"][1]["rss_kib"]
    assert soak.ok(report)
    assert "| 22000 -> 22668 |" in soak.markdown([report])


def test_a_growing_heap_fails_it():
    assert not soak.ok(_report(anon=[22000, 22660, 24000, 25000], shmem=[1600] * 4))


def test_a_growing_fd_count_fails_it():
    report = _report(anon=[22000] * 4, shmem=[1600] * 4)
    report["samples"][-1]["fds"] = 28  # one more than at warm-up is let through
    assert not soak.ok(report)

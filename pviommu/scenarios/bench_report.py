"""The benchmark's tables: medians over rounds, ratios to the built-in path, round
trips per I/O, latency percentiles, and every sample (Markdown for BENCHMARKS.md)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from .workloads import BY_NAME, Workload

ROUND_TRIP_LABEL = {"pv": "MAP+UNMAP", "vsmmu": "MISS+UPDATE+INVALIDATE"}
Samples = dict[tuple[str, str, str], list[dict[str, Any]]]


def _median(values: Sequence[float | None]) -> float | None:
    real = [v for v in values if v is not None]
    return round(statistics.median(real), 2) if real else None


def metric(workload: Workload) -> str:
    """What a workload is compared by: IOPS for small blocks, MiB/s for 1 MiB ones."""
    return "iops" if workload.bs < (1 << 20) else "mib_s"


def format_speed(row: dict[str, Any], workload: Workload) -> str:
    """A result's speed in the workload's unit."""
    if metric(workload) == "iops":
        return f"{row['iops']:.0f} IOPS"
    return f"{row['mib_s']:.1f} MiB/s"


def summarize(samples: Samples, workloads: Sequence[Workload],
              paths: Sequence[str]) -> list[dict[str, Any]]:
    """One row per (IOMMU mode, workload): each path's medians (IOPS, MiB/s, latency
    percentiles), its ratio to the built-in path, its samples and, on the backend's
    paths, its round trips per I/O in each round."""
    table = []
    for mode in ("strict", "lazy"):
        for w in workloads:
            key = metric(w)
            builtin = _median([r[key] for r in samples.get(("builtin", mode, w.name), [])])
            cells: dict[str, Any] = {}
            for path in paths:
                rows = samples.get((path, mode, w.name), [])
                if not rows:
                    continue
                med = _median([r[key] for r in rows])
                cell: dict[str, Any] = {
                    "iops": _median([r["iops"] for r in rows]),
                    "mib_s": _median([r["mib_s"] for r in rows]),
                    "clat_p50_us": _median([r["clat_p50_us"] for r in rows]),
                    "clat_p99_us": _median([r["clat_p99_us"] for r in rows]),
                    "samples": [r[key] for r in rows],
                    "ratio": round(med / builtin, 3) if builtin and med is not None else None}
                if any("round_trips_per_io" in r for r in rows):
                    cell["round_trips"] = ROUND_TRIP_LABEL.get(path, "")
                    cell["round_trips_per_io"] = [r.get("round_trips_per_io") for r in rows]
                    cell["by_kind"] = [r.get("by_kind", {}) for r in rows]
                cells[path] = cell
            if not cells:
                continue
            row: dict[str, Any] = {"iommu": mode, "workload": w.name, "metric": key,
                                   "paths": cells}
            if "vsmmu" in cells and "qsd" in cells and cells["qsd"][key]:
                row["vsmmu_to_qsd"] = round(cells["vsmmu"][key] / cells["qsd"][key], 3)
            table.append(row)
    return table


def _value(cell: dict[str, Any] | None, key: str) -> str:
    if cell is None or cell.get(key) is None:
        return "-"
    v = cell[key]
    return f"{v:.0f}" if key == "iops" else f"{v:.1f}"


def _ratio(cell: dict[str, Any] | None) -> str:
    return "-" if cell is None or cell.get("ratio") is None else f"{cell['ratio']:.2f}"


def _trips(cell: dict[str, Any] | None) -> str:
    values = [v for v in (cell or {}).get("round_trips_per_io", []) if v is not None]
    if not values:
        return "-"
    med = statistics.median(values)
    return f"{med:.1f} ({min(values):.1f}-{max(values):.1f})"


def markdown(result: dict[str, Any]) -> str:
    """The three-way table: PV, vSMMU and built-in, their ratios and round trips per I/O
    (IOPS for 4 KiB workloads, MiB/s for 1 MiB ones)."""
    lines = ["| IOMMU | workload | unit | PV | vSMMU | built-in | PV / built-in "
             "| vSMMU / built-in | PV MAP+UNMAP per I/O | vSMMU MISS+UPDATE+INVALIDATE per I/O |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in result["table"]:
        c, key = row["paths"], row["metric"]
        lines.append(
            f"| {row['iommu']} | {row['workload']} | {'IOPS' if key == 'iops' else 'MiB/s'} | "
            f"{_value(c.get('pv'), key)} | {_value(c.get('vsmmu'), key)} | "
            f"{_value(c.get('builtin'), key)} | {_ratio(c.get('pv'))} | "
            f"{_ratio(c.get('vsmmu'))} | {_trips(c.get('pv'))} | {_trips(c.get('vsmmu'))} |")
    return "\n".join(lines)


def markdown_references(result: dict[str, Any]) -> str:
    """The vSMMU path against QEMU's own SMMUv3 paths: its built-in virtio-blk
    behind the SMMUv3, and its C vhost-user-blk back-end (without IOMMU)."""
    lines = ["| IOMMU | workload | unit | vSMMU | built-in blk behind SMMUv3 "
             "| qemu-storage-daemon, no IOMMU | vSMMU / qemu-storage-daemon |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for row in result["table"]:
        c, key = row["paths"], row["metric"]
        to_qsd = row.get("vsmmu_to_qsd")
        lines.append(
            f"| {row['iommu']} | {row['workload']} | {'IOPS' if key == 'iops' else 'MiB/s'} | "
            f"{_value(c.get('vsmmu'), key)} | {_value(c.get('smmuv3-builtin'), key)} | "
            f"{_value(c.get('qsd'), key)} | {'-' if to_qsd is None else f'{to_qsd:.2f}'} |")
    return "\n".join(lines)


def markdown_latency(result: dict[str, Any]) -> str:
    """Completion latency, p50 / p99 in µs (fio's clat), per path."""
    paths = result.get("paths", [])
    lines = ["| IOMMU | workload | " + " | ".join(paths) + " |",
             "| --- | --- | " + " | ".join(["---:"] * len(paths)) + " |"]
    for row in result["table"]:
        c = row["paths"]
        cells = []
        for p in paths:
            cell = c.get(p)
            if cell is None or cell.get("clat_p50_us") is None:
                cells.append("-")
            else:
                cells.append(f"{cell['clat_p50_us']:.0f} / {cell['clat_p99_us']:.0f}")
        lines.append(f"| {row['iommu']} | {row['workload']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_samples(result: dict[str, Any]) -> str:
    """Every path's per-round samples and the round trips per I/O of each round."""
    paths = result.get("paths", [])
    head = ("| IOMMU | workload | " + " | ".join(paths)
            + " | PV MAP+UNMAP per I/O | vSMMU MISS+UPDATE+INVALIDATE per I/O |")
    lines = [head, "| " + " | ".join(["---"] * (len(paths) + 4)) + " |"]

    def fmt(values: list[Any]) -> str:
        real = [v for v in values if v is not None]
        return ", ".join(f"{x:.1f}" if x < 10 else f"{x:.0f}" for x in real) or "-"
    for row in result["table"]:
        c = row["paths"]
        lines.append(
            f"| {row['iommu']} | {row['workload']} | "
            + " | ".join(fmt(c[p]["samples"]) if p in c else "-" for p in paths)
            + " | " + " | ".join(fmt(c[p].get("round_trips_per_io", [])) if p in c else "-"
                                 for p in ("pv", "vsmmu")) + " |")
    return "\n".join(lines)


def workload_table() -> str:
    """What each workload is, for the document's reader."""
    lines = ["| workload | fio job |", "| --- | --- |"]
    for w in BY_NAME.values():
        lines.append(f"| {w.name} | `--rw={w.rw} --bs={w.bs} --iodepth={w.iodepth} "
                     f"--iomem={'shmhuge' if w.huge else 'malloc'}` |")
    return "\n".join(lines)


MAP_UNMAP_CASE = "PV-IOMMU MAP/UNMAP (vhost-user)"
DOORBELL_CASE = "virtio-blk 4 KiB read, doorbell to MSI-X (vfio-user)"


def _micro(result: dict[str, Any], case: str) -> float | None:
    micro = result.get("micro") or {}
    return next((r["median_us"] for r in micro.get("rows", [])
                 if r["case"] == case and r["placement"] == "any"), None)


def cost_model(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The PV path's time per I/O at queue depth 1, term by term, from numbers of the
    same run: the built-in path's time per I/O, plus the PV-IOMMU round trips per I/O
    (counted) times one MAP/UNMAP round trip (micro-benchmark), plus one blk
    doorbell-to-interrupt round trip (micro-benchmark); against the measured time.
    ``floor_bound`` is the best ratio wake-ups alone allow: the built-in time over
    the built-in time plus one cross-core ping-pong per round trip (and the
    doorbell's)."""
    rtt = _micro(result, MAP_UNMAP_CASE)
    doorbell = _micro(result, DOORBELL_CASE)
    floor = ((result.get("micro") or {}).get("floor", {}).get("unpinned") or {}).get("median_us")
    out = []
    for row in result["table"]:
        w = BY_NAME.get(row["workload"])
        cells = row["paths"]
        if w is None or w.iodepth != 1 or "pv" not in cells or "builtin" not in cells:
            continue
        pv, builtin = cells["pv"], cells["builtin"]
        trips = [v for v in pv.get("round_trips_per_io", []) if v is not None]
        if not (pv["iops"] and builtin["iops"] and trips):
            continue
        n = statistics.median(trips)
        t_builtin, t_pv = 1e6 / builtin["iops"], 1e6 / pv["iops"]
        entry: dict[str, Any] = {"iommu": row["iommu"], "workload": w.name,
                                 "builtin_us": round(t_builtin, 1), "pv_us": round(t_pv, 1),
                                 "round_trips": round(n, 2), "rtt_us": rtt,
                                 "doorbell_us": doorbell}
        if rtt is not None and doorbell is not None:
            predicted = t_builtin + n * rtt + doorbell
            entry["predicted_us"] = round(predicted, 1)
            entry["explained"] = round((n * rtt + doorbell) / max(t_pv - t_builtin, 1e-9), 2)
        if floor is not None:
            entry["floor_us"] = floor
            entry["floor_bound"] = round(t_builtin / (t_builtin + (n + 1) * floor), 2)
        out.append(entry)
    return out


def markdown_cost_model(result: dict[str, Any]) -> str:
    """The cost model's table (see :func:`cost_model`)."""
    lines = ["| IOMMU | workload | built-in µs/I/O | round trips/I/O (N) | MAP/UNMAP RTT µs "
             "| doorbell µs | predicted PV µs/I/O | measured PV µs/I/O "
             "| share of the gap explained | best ratio wake-ups allow |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]

    def f(v: Any) -> str:
        return "-" if v is None else f"{v:.2f}" if isinstance(v, float) and v < 10 else f"{v:.0f}"
    for e in cost_model(result):
        lines.append(f"| {e['iommu']} | {e['workload']} | {f(e['builtin_us'])} | "
                     f"{f(e['round_trips'])} | {f(e['rtt_us'])} | {f(e['doorbell_us'])} | "
                     f"{f(e.get('predicted_us'))} | {f(e['pv_us'])} | "
                     f"{f(e.get('explained'))} | {f(e.get('floor_bound'))} |")
    return "\n".join(lines)

"""The human-readable form of a demo report."""

from __future__ import annotations

from typing import Any


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def format_report(report: dict[str, Any]) -> str:
    """A short summary of a demo report for a terminal."""
    if report["mode"] == "pv":
        return _format_pv(report)
    dma = report["dma"]
    guest = report.get("guest", {})
    lines = [
        f"pviommu demo, mode {report['mode']}",
        f"  guest booted in {report['timings']['boot_s']:.1f}s, "
        f"whole run {report['timings']['total_s']:.1f}s",
        f"  disk {guest.get('disk_pci', '?')} in IOMMU group {guest.get('iommu_group')}",
        f"  DMA read  {_mib(dma['bytes_read'])}: sha256 "
        f"{'matches' if dma['read']['ok'] else 'DIFFERS from'} the host's",
        f"  DMA write {_mib(dma['bytes_written'])}: sha256 "
        f"{'matches' if dma['write']['ok'] else 'DIFFERS from'} the image's",
        f"  faults: {len(report['faults'])}",
    ]
    lines += [f"    {f['source']}: {f['guest_log']}" for f in report["faults"]]
    lines.append(f"  checksums_ok: {str(dma['checksums_ok']).lower()}")
    lines.append(f"  console log: {report['logs']['console']}")
    return "\n".join(lines)


def _format_pv(report: dict[str, Any]) -> str:
    guest = report["guest"]
    iommu = report["iommu"]
    lines = [
        f"pviommu demo, mode {report['mode']}",
        f"  guest booted in {report['timings']['boot_s']:.1f}s, "
        f"whole run {report['timings']['total_s']:.1f}s",
        f"  virtio-iommu driver: {guest['viommu_driver']}; endpoint {guest['endpoint_pci']} "
        f"in IOMMU group {guest['iommu_group']} ({guest['group_type']})",
    ]
    lines += [f"  reserved region {r['start']}-{r['end']} {r['type']}"
              for r in guest["reserved_regions"]]
    for d in iommu["domains"]:
        eps = ", ".join(f"{e:#x}" for e in d["endpoints"])
        kind = "bypass" if d["bypass"] else f"{d['mappings']} mapping(s)"
        lines.append(f"  domain {d['id']}: endpoints {eps}; {kind}")
    reqs = ", ".join(f"{r['type']} {r['status']} x{r['count']}" for r in iommu["requests"])
    lines.append(f"  requests: {reqs or 'none'}")
    lines.append(f"  faults: {len(report['faults'])}")
    for f in report["faults"]:
        event = f.get("qmp_event")
        lines.append(f"    guest: {f['guest_log']}")
        lines.append(f"    QMP IOMMU_FAULT: {event if event else 'not seen'}")
    lines.append(f"  console log: {report['logs']['console']}")
    return "\n".join(lines)

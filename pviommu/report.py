"""The human-readable form of a demo report."""

from __future__ import annotations

from typing import Any


def _mib(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB"


def format_report(report: dict[str, Any]) -> str:
    """A short summary of a demo report for a terminal."""
    if report["mode"] == "pv":
        return _format_pv(report)
    if report["mode"] == "vsmmu":
        return _format_vsmmu(report)
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
        f"  virtio-iommu driver: {guest['viommu_driver']}",
    ]
    lines += [f"  endpoint {e['id']:#x} {e['kind']} at {e['pci']}, IOMMU group "
              f"{e['iommu_group']} ({e['group_type']})" for e in report.get("endpoints", [])]
    lines += [f"  reserved region {r['start']}-{r['end']} {r['type']}"
              for r in guest["reserved_regions"]]
    for d in iommu["domains"]:
        eps = ", ".join(f"{e:#x}" for e in d["endpoints"])
        kind = "bypass" if d["bypass"] else f"{d['mappings']} mapping(s)"
        lines.append(f"  domain {d['id']}: endpoints {eps}; {kind}")
    if "dma" in report:
        dma = report["dma"]
        lines.append(f"  disk: read {_mib(dma['bytes_read'])}, sha256 "
                     f"{'matches' if dma['read']['ok'] else 'DIFFERS from'} the host's; wrote "
                     f"{_mib(dma['bytes_written'])}, sha256 "
                     f"{'matches' if dma['write']['ok'] else 'DIFFERS from'} the image's")
    if "rng" in report:
        rng = report["rng"]
        lines.append(f"  rng: {rng['bytes']} bytes from {rng['current']}"
                     + ("" if rng["ok"] else " (NOT as expected)"))
    if report.get("injected") is not None:
        lines.append(f"  injected fault: {report['injected']}")
    rev = report.get("revocation")
    if rev is not None:
        event = rev["qmp_event"]
        if event is None:
            lines.append("  revoked mapping: none (the armed revocation never triggered)")
        else:
            lines.append(f"  revoked mapping {event['virt-start']:#x}-{event['virt-end']:#x} "
                         f"of endpoint {event['endpoint']:#x} during a disk read")
            lines.append(f"    guest memory behind it unchanged: "
                         f"{'yes' if rev['memory_unchanged'] else 'NO'}; guest carried on: "
                         f"{'yes' if rev['recovered'] else 'no'}")
    lines.append(f"  faults: {len(report['faults'])}")
    for f in report["faults"]:
        event = f.get("qmp_event")
        first, *rest = str(f["guest_log"]).split("\n")
        lines.append(f"    guest: {first}")
        lines += [f"           {line}" for line in rest]
        lines.append(f"    QMP IOMMU_FAULT: {event if event else 'not seen'}")
    if "dma" in report:
        lines.append(f"  checksums_ok: {str(report['dma']['checksums_ok']).lower()}")
    lines.append(f"  console log: {report['logs']['console']}")
    return "\n".join(lines)


def _yes(flag: object) -> str:
    return "yes" if flag else "NO"


def _format_vsmmu(report: dict[str, Any]) -> str:
    vs = report["vsmmu"]
    smmu = vs.get("smmu") or {}
    s2 = vs["stage2"]
    lines = [
        f"pviommu demo, mode {report['mode']}",
        f"  guest booted in {report['timings']['boot_s']:.1f}s, "
        f"whole run {report['timings']['total_s']:.1f}s",
        f"  {smmu.get('driver')} bound {smmu.get('dev')} (QEMU's SMMUv3: the guest's stage 1)",
    ]
    for e in report.get("endpoints", []):
        iotlb = e.get("iotlb") or {}
        lines.append(f"  endpoint {e['id']:#x} {e['kind']} at {e['pci']}, IOMMU group "
                     f"{e['iommu_group']} ({e['group_type']}); IOTLB miss "
                     f"{iotlb.get('miss')}, update {iotlb.get('update')}, "
                     f"invalidate {iotlb.get('invalidate')}")
    lines.append(f"  stage 2 (the backend's): {s2['ias']}-bit IPA, {s2['granule'] >> 10} KiB "
                 f"granule, {s2['ranges']} range(s), {_mib(s2['mapped_bytes'])} mapped, "
                 f"generation {s2['generation']}")
    dma = report["dma"]
    lines.append(f"  disk: read {_mib(dma['bytes_read'])}, sha256 "
                 f"{'matches' if dma['read']['ok'] else 'DIFFERS from'} the host's; wrote "
                 f"{_mib(dma['bytes_written'])}, sha256 "
                 f"{'matches' if dma['write']['ok'] else 'DIFFERS from'} the image's")
    rng = report["rng"]
    lines.append(f"  rng: {rng['bytes']} bytes from {rng['current']}"
                 + ("" if rng["ok"] else " (NOT as expected)"))
    unmap = vs["stage2_unmap"]
    event = unmap.get("qmp_event")
    if event is None:
        lines.append("  stage-2 unmap: none (the armed unmap never triggered)")
    else:
        lines.append(f"  stage-2 unmap of IPA {unmap['ipa']:#x} under a disk read (IOVA "
                     f"{event['input-address']:#x}): guest I/O error: "
                     f"{_yes(unmap.get('guest_io_error'))}; page mapped back, guest read on: "
                     f"{_yes(unmap['recovered'])}")
    rogue = vs["rogue_dma"]
    result = rogue["result"] or {}
    fault = result.get("fault") or {}
    lines.append(f"  rogue DMA read at {rogue['address']:#x}: "
                 + (f"refused at stage {fault.get('stage')}" if fault
                    else "TRANSLATED (the guest had mapped it)")
                 + f"; guest read on: {_yes(rogue['guest_carried_on'])}")
    lines.append(f"  faults: {len(report['faults'])}")
    for f in report["faults"]:
        if f["stage"] == 2:
            ev = f["qmp_event"]
            lines.append(f"    stage 2, host VSMMU_EVENT: {ev['type']} stream {ev['stream-id']:#x}"
                         f" IOVA {ev['input-address']:#x} IPA {ev['ipa']:#x} ({f['access']}, "
                         f"level {ev['level']})")
        else:
            lines.append(f"    stage {f['stage']}, {f['source']}: {f['reason']} endpoint "
                         f"{f['endpoint']:#x} at {f['address']:#x} ({f['access']})"
                         if f["address"] is not None
                         else f"    stage {f['stage']}, {f['source']}: {f['reason']}")
        lines += [f"      guest: {line.replace(chr(9), ' ')}"
                  for line in str(f["guest_log"]).split("\n") if line]
    lines.append(f"  checksums_ok: {str(dma['checksums_ok']).lower()}")
    lines.append(f"  console log: {report['logs']['console']}")
    return "\n".join(lines)

"""The IOMMU's state and counters, asked of the backend over QMP (docs/QMP.md)."""

from __future__ import annotations

from typing import Any

from qemu.qmp import QMPClient

MAPPINGS_SHOWN = 32
"""How many mappings of each domain :func:`pv_state` shows."""


async def query(client: QMPClient, command: str, args: dict[str, Any] | None = None) -> Any:
    """``client.execute`` typed for what QMP answers: JSON values."""
    return await client.execute(command, args)


async def pv_state(client: QMPClient) -> dict[str, Any]:
    """The PV-IOMMU's domains, the first MAPPINGS_SHOWN mappings of each, its
    endpoints, request counters and fault counters."""
    stats = await query(client, "query-viommu-stats")
    domains = await query(client, "query-viommu-domains")
    mappings = {}
    for d in domains:
        found = await query(client, "query-viommu-mappings", {"domain": d["id"]})
        mappings[str(d["id"])] = found[:MAPPINGS_SHOWN]
    return {"domains": domains,
            "mappings": mappings,
            "endpoints": await query(client, "query-viommu-endpoints"),
            "requests": stats["requests"],
            "faults_reported": stats["faults-reported"],
            "faults_dropped": stats["faults-dropped"]}


async def vsmmu_state(client: QMPClient) -> dict[str, Any]:
    """Stage 2 (its shape and mapped ranges) and the host-side event queue."""
    stage2 = await query(client, "query-stage2")
    queue = await query(client, "query-vsmmu-events")
    return {"stage2": {k: stage2[k] for k in ("ias", "oas", "granule", "start-level",
                                              "generation", "table-bytes")}
            | {"ranges": len(stage2["ranges"]),
               "mapped_bytes": sum(r["ipa-end"] - r["ipa-start"] + 1
                                   for r in stage2["ranges"])},
            "events": queue}

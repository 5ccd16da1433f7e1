"""The lab's topology: defaults, validation errors naming the key, TOML round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from pviommu.lab import DEFAULT_DISK, Endpoint, ExtraFile, Iommu, Topology, TopologyError

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "topologies"


def test_default_is_the_pv_demo_machine():
    t = Topology()
    assert t.iommu.kind == "pv" and t.iommu_address == "1.0"
    assert [(p.address, p.endpoint.kind) for p in t.placed()] == [("2.0", "blk"), ("3.0", "rng")]
    assert t.placed()[0].endpoint.size == DEFAULT_DISK
    assert (t.vcpus, t.memory) == (2, 1 << 30)
    assert t.kernel is None and t.modules is None and t.guest_kernel_args() == []
    assert Topology.from_dict({}) == t


def test_empty_endpoint_list_is_kept():
    assert Topology.from_dict({"endpoints": []}).placed() == []


def test_iommu_options_become_kernel_args_before_the_users():
    t = Topology(iommu=Iommu(strict=False, passthrough=True), kernel_args=("quiet",))
    assert t.guest_kernel_args() == ["iommu.strict=0", "iommu.passthrough=1", "quiet"]
    assert Iommu(strict=True).kernel_args() == ["iommu.strict=1"]


def test_pv_options_reach_the_device_config():
    cfg = Iommu(bypass=True, bypass_config=False, max_domains=4, max_mappings=9,
                reserved=((0x1000, 0x1FFF),)).config()
    assert (cfg.bypass, cfg.bypass_config, cfg.max_domains, cfg.max_mappings) == (
        True, False, 4, 9)
    assert [(r.start, r.end) for r in cfg.reserved] == [(0x1000, 0x1FFF)]


def test_addresses_skip_the_given_ones_and_count_expands():
    t = Topology.from_dict({"endpoints": [
        {"kind": "rng", "address": "02.0"}, {"kind": "blk", "count": 2},
        {"kind": "rng", "address": "5.0"}]})
    assert [p.address for p in t.placed()] == ["2.0", "3.0", "4.0", "5.0"]
    assert [p.index for p in t.placed()] == [0, 1, 1, 2]
    assert t.placed()[1].endpoint_id == 0x18


@pytest.mark.parametrize("kind,iommu_addr,first", [
    ("pv", "1.0", "2.0"), ("builtin", "1.0", "2.0"), ("vsmmu", None, "2.0"),
    ("smmuv3", None, "2.0"), ("none", None, "2.0")])
def test_iommu_address_per_kind(kind, iommu_addr, first):
    t = Topology(iommu=Iommu(kind=kind))
    assert t.iommu_address == iommu_addr
    assert t.placed()[0].address == first


def test_iommu_address_moves_the_endpoints():
    t = Topology.from_dict({"iommu": {"address": "2.0"}})
    assert [p.address for p in t.placed()] == ["3.0", "4.0"]


BAD = [
    # (data, key, words the message must hold)
    ({"cpus": 2}, "cpus", ["unknown key", "vcpus", "memory", "endpoints"]),
    ({"vcpus": "2"}, "vcpus", ["an integer", "a string"]),
    ({"vcpus": True}, "vcpus", ["an integer", "a boolean"]),
    ({"vcpus": 0}, "vcpus", ["out of range", "1 to 512"]),
    ({"vcpus": 513}, "vcpus", ["out of range"]),
    ({"memory": "lots"}, "memory", ["64M"]),
    ({"memory": 1.5}, "memory", ["a float"]),
    ({"memory": 1000}, "memory", ["out of range"]),
    ({"memory": (1 << 30) + 512}, "memory", ["MiB"]),
    ({"kernel": "/k"}, "modules", ["go together"]),
    ({"modules": "/m"}, "kernel", ["go together"]),
    ({"kernel": 3, "modules": "/m"}, "kernel", ["a path"]),
    ({"kernel": "", "modules": "/m"}, "kernel", ["empty path"]),
    ({"kernel-args": "quiet"}, "kernel-args", ["a list of strings"]),
    ({"kernel-args": ["quiet", 1]}, "kernel-args[1]", ["a string", "an integer"]),
    ({"kernel-args": [" "]}, "kernel-args[0]", ["empty"]),
    ({"files": "a"}, "files", ["SRC[:DEST]"]),
    ({"files": ["a", "b:rel"]}, "files[1]", ["absolute"]),
    ({"files": ["a:"]}, "files[0]", ["SRC[:DEST]"]),
    ({"iommu": "pv"}, "iommu", ["a table"]),
    ({"iommu": {"kind": "smmu"}}, "iommu.kind", ['"pv"', '"vsmmu"', '"builtin"', '"none"']),
    ({"iommu": {"kind": 1}}, "iommu.kind", ["a string"]),
    ({"iommu": {"lazy": True}}, "iommu.lazy", ["unknown key", "strict", "bypass-config"]),
    ({"iommu": {"strict": "yes"}}, "iommu.strict", ["true or false"]),
    ({"iommu": {"passthrough": 1}}, "iommu.passthrough", ["true or false"]),
    ({"iommu": {"bypass": 0}}, "iommu.bypass", ["true or false"]),
    ({"iommu": {"bypass-config": "no"}}, "iommu.bypass-config", ["true or false"]),
    ({"iommu": {"max-domains": "8"}}, "iommu.max-domains", ["an integer"]),
    ({"iommu": {"max-domains": 0}}, "iommu.max-domains", ["out of range", "1 or more"]),
    ({"iommu": {"max-mappings": 0}}, "iommu.max-mappings", ["out of range"]),
    ({"iommu": {"reserved": "1:2"}}, "iommu.reserved", ["START:END"]),
    ({"iommu": {"reserved": ["1-2"]}}, "iommu.reserved[0]", ["START:END"]),
    ({"iommu": {"reserved": ["0x10:0x20", "9:1"]}}, "iommu.reserved[1]", ["START <= END"]),
    ({"iommu": {"reserved": ["0x1000:0x2fff", "0x2000:0x3fff"]}}, "iommu.reserved",
     ["overlap"]),
    ({"iommu": {"reserved": ["0x8090000:0x8090fff"]}}, "iommu.reserved", ["overlap"]),
    ({"iommu": {"address": "0.0"}}, "iommu.address", ["DEV 1 to 1f"]),
    ({"iommu": {"address": "1.1"}}, "iommu.address", ["functions other than 0"]),
    ({"iommu": {"address": "zz"}}, "iommu.address", ["PCI address"]),
    ({"iommu": {"kind": "vsmmu", "address": "1.0"}}, "iommu.address", ["no PCI function"]),
    ({"iommu": {"kind": "none", "strict": True}}, "iommu.strict", ["without an IOMMU"]),
    ({"iommu": {"kind": "none", "passthrough": True}}, "iommu.passthrough",
     ["without an IOMMU"]),
    *[({"iommu": {"kind": k, key: v}}, f"iommu.{key}", ["only the PV-IOMMU", f'"{k}"'])
      for k in ("vsmmu", "builtin", "none")
      for key, v in (("bypass", True), ("bypass-config", False), ("max-domains", 3),
                     ("max-mappings", 3), ("reserved", ["1:2"]))],
    ({"endpoints": {"kind": "blk"}}, "endpoints", ["an array of tables"]),
    ({"endpoints": ["blk"]}, "endpoints[0]", ["a table"]),
    ({"endpoints": [{"size": "1M"}]}, "endpoints[0].kind", ["missing", '"blk"', '"rng"']),
    ({"endpoints": [{"kind": "net"}]}, "endpoints[0].kind", ['"blk"', '"rng"']),
    ({"endpoints": [{"kind": "rng"}, {"kind": "blk", "readonly": True}]},
     "endpoints[1].readonly", ["unknown key", "ro", "serial", "count"]),
    ({"endpoints": [{"kind": "blk", "image": 5}]}, "endpoints[0].image", ["a path"]),
    ({"endpoints": [{"kind": "blk", "size": "1X"}]}, "endpoints[0].size", ["64M"]),
    ({"endpoints": [{"kind": "blk", "size": 1000}]}, "endpoints[0].size", ["512"]),
    ({"endpoints": [{"kind": "blk", "size": 0}]}, "endpoints[0].size", ["out of range"]),
    ({"endpoints": [{"kind": "blk", "ro": "yes"}]}, "endpoints[0].ro", ["true or false"]),
    ({"endpoints": [{"kind": "blk", "serial": 7}]}, "endpoints[0].serial", ["a string"]),
    ({"endpoints": [{"kind": "blk", "serial": "x" * 21}]}, "endpoints[0].serial",
     ["longer than 20"]),
    ({"endpoints": [{"kind": "blk", "serial": "é"}]}, "endpoints[0].serial", ["ASCII"]),
    ({"endpoints": [{"kind": "rng", "count": 0}]}, "endpoints[0].count", ["out of range"]),
    ({"endpoints": [{"kind": "rng", "count": 1.0}]}, "endpoints[0].count", ["an integer"]),
    ({"endpoints": [{"kind": "rng", "count": 2, "address": "4.0"}]}, "endpoints[0].address",
     ["count = 1"]),
    ({"endpoints": [{"kind": "blk", "count": 2, "image": "/d.img"}]}, "endpoints[0].image",
     ["share"]),
    *[({"endpoints": [{"kind": "rng", key: v}]}, f"endpoints[0].{key}",
       ["only a blk endpoint", '"rng"'])
      for key, v in (("image", "/d"), ("size", "1M"), ("ro", True), ("serial", "s"))],
    ({"endpoints": [{"kind": "rng", "address": "1.0"}]}, "endpoints[0].address",
     ["1.0 is taken by iommu.address"]),
    ({"endpoints": [{"kind": "rng", "address": "3.0"}, {"kind": "rng", "address": "03.0"}]},
     "endpoints[1].address", ["taken by endpoints[0].address"]),
    ({"endpoints": [{"kind": "rng", "address": "20.0"}]}, "endpoints[0].address",
     ["DEV 1 to 1f"]),
    ({"endpoints": [{"kind": "rng", "count": 30}, {"kind": "rng"}]}, "endpoints",
     ["slots"]),
    ({"load-modules": "virtio_iommu"}, "load-modules", ["list of module names"]),
    ({"load-modules": ["virtio_iommu.ko"]}, "load-modules[0]", ["not a module name"]),
    ({"load-modules": [3]}, "load-modules[0]", ["module name"]),
    ({"iommu": {"kind": "smmuv3", "max-domains": 3}}, "iommu.max-domains",
     ["only the PV-IOMMU"]),
    ({"iommu": {"kind": "vsmmu"}, "endpoints": [{"kind": "rng", "reconnect-ms": 200}]},
     "endpoints[0].reconnect-ms", ["only a blk endpoint", "does not even start"]),
    *[({"iommu": {"kind": k}, "endpoints": [{"kind": "blk", "reconnect-ms": 200}]},
       "endpoints[0].reconnect-ms", ["only a vsmmu disk", f'"{k}"'])
      for k in ("pv", "builtin", "smmuv3", "none")],
    ({"iommu": {"kind": "vsmmu"}, "endpoints": [{"kind": "blk", "reconnect-ms": 0}]},
     "endpoints[0].reconnect-ms", ["out of range"]),
    ({"iommu": {"kind": "vsmmu"}, "endpoints": [{"kind": "blk", "reconnect-ms": "1s"}]},
     "endpoints[0].reconnect-ms", ["an integer"]),
]


@pytest.mark.parametrize("data,key,words", BAD, ids=[f"{i}-{b[1]}" for i, b in enumerate(BAD)])
def test_errors_name_the_key_and_what_is_allowed(data, key, words):
    with pytest.raises(TopologyError) as err:
        Topology.from_dict(data)
    assert err.value.key == key
    assert str(err.value).startswith(f"{key}: ")
    for word in words:
        assert word in str(err.value)


def test_topology_error_is_a_value_error():
    assert issubclass(TopologyError, ValueError)


def test_direct_construction_is_validated_too():
    with pytest.raises(TopologyError, match=r"^endpoints\[1\]\.kind: "):
        Topology(endpoints=(Endpoint("rng"), Endpoint("gpu")))
    with pytest.raises(TopologyError, match="^vcpus: "):
        Topology(vcpus=0)


def test_sizes_take_units_and_integers():
    t = Topology.from_dict({"memory": "512M", "endpoints": [
        {"kind": "blk", "size": 1 << 20}, {"kind": "blk", "size": "2G"}]})
    assert t.memory == 512 << 20
    assert [e.size for e in t.endpoints] == [1 << 20, 2 << 30]


@pytest.mark.parametrize("t", [
    Topology(),
    Topology(iommu=Iommu(kind="none"), endpoints=()),
    Topology(iommu=Iommu(kind="builtin", strict=False, address="5.0"), vcpus=1,
             memory=(1 << 30) + (1 << 20), endpoints=(Endpoint("blk", image=Path("/d.img"),
                                                               read_only=True),)),
    Topology(iommu=Iommu(bypass=True, bypass_config=False, max_domains=7, max_mappings=100,
                         reserved=((0x1000, 0x1FFF), (0x4000, 0x4FFF)), passthrough=True),
             endpoints=(Endpoint("blk", size=1536, serial="s", count=3),
                        Endpoint("rng", address="9.0")),
             kernel=Path("/k/Image"), modules=Path("/k/lib/modules/6.1"),
             kernel_args=("quiet", "dyndbg=+p"),
             files=(ExtraFile(Path("/bin/tool"), "/usr/bin/tool"),)),
    Topology(iommu=Iommu(kind="smmuv3", strict=True), load_modules=()),
    Topology(iommu=Iommu(kind="vsmmu"), endpoints=(Endpoint("blk", reconnect_ms=200),
                                                   Endpoint("rng"))),
    Topology(load_modules=("virtio_iommu", "virtio_blk")),
    Topology(iommu=Iommu(page_size_mask=0xFFFFFFFFFFFF0000, input_range=(0x1000, 0xFFFFFFFF),
                         domain_range=(1, 100), probe_size=1024, mmio=True, msi_region=False)),
])
def test_round_trip(t):
    assert Topology.from_dict(t.to_dict()) == t


def test_to_dict_leaves_defaults_out():
    assert Topology().to_dict() == {"iommu": {"kind": "pv"},
                                    "endpoints": [{"kind": "blk", "size": "64M"},
                                                  {"kind": "rng"}]}
    assert Topology(memory=1536 << 20).to_dict()["memory"] == "1536M"


def test_toml_paths_are_relative_to_the_file(tmp_path):
    (tmp_path / "lab.toml").write_text(
        'kernel = "k/Image"\nmodules = "/abs/mods"\nfiles = ["t.sh", "bin/x:/usr/bin/x"]\n'
        '[[endpoints]]\nkind = "blk"\nimage = "disk.img"\n')
    t = Topology.from_toml(tmp_path / "lab.toml")
    assert t.kernel == tmp_path / "k/Image" and t.modules == Path("/abs/mods")
    assert t.files == (ExtraFile(tmp_path / "t.sh", "/root/t.sh"),
                       ExtraFile(tmp_path / "bin/x", "/usr/bin/x"))
    assert t.endpoints[0].image == tmp_path / "disk.img"


def test_toml_file_errors(tmp_path):
    with pytest.raises(TopologyError, match="cannot read topology file"):
        Topology.from_toml(tmp_path / "missing.toml")
    (tmp_path / "bad.toml").write_text("vcpus = \n")
    with pytest.raises(TopologyError, match="not valid TOML"):
        Topology.from_toml(tmp_path / "bad.toml")


def test_example_pv():
    t = Topology.from_toml(EXAMPLES / "pv.toml")
    assert t.iommu.kind == "pv" and t.iommu.strict is False
    assert [(p.address, p.endpoint.kind) for p in t.placed()] == [
        ("2.0", "blk"), ("3.0", "rng"), ("4.0", "rng")]
    assert t.guest_kernel_args()[0] == "iommu.strict=0"
    assert t.files[0].src == EXAMPLES / "pv.toml"
    assert Topology.from_dict(t.to_dict()) == t


def test_example_vsmmu():
    t = Topology.from_toml(EXAMPLES / "vsmmu.toml")
    assert t.iommu.kind == "vsmmu" and t.iommu_address is None
    assert [(p.address, p.endpoint.kind) for p in t.placed()] == [("4.0", "blk"), ("2.0", "rng")]
    assert t.endpoints[0].read_only and (t.vcpus, t.memory) == (4, 2 << 30)
    assert Topology.from_dict(t.to_dict()) == t


def test_guest_modules_follow_the_iommu_and_the_endpoints_unless_given():
    from pviommu.lab.machine import guest_modules
    assert guest_modules(Topology()) == ["virtio_iommu", "virtio_blk", "virtio-rng"]
    assert guest_modules(Topology(iommu=Iommu(kind="vsmmu"))) == ["virtio_blk", "virtio-rng"]
    assert guest_modules(Topology(iommu=Iommu(kind="smmuv3"), endpoints=(Endpoint("rng"),))
                         ) == ["virtio-rng"]
    assert guest_modules(Topology(load_modules=("virtio_iommu",))) == ["virtio_iommu"]


def test_pv_iommu_from_a_device_config_round_trips():
    from pviommu.iommu.pv import IommuConfig, ResvRegion
    config = IommuConfig(bypass=True, page_size_mask=0xFFFFFFFFFFFF0000, input_start=0x1000,
                         input_end=0xFFFFF, domain_end=9, probe_size=1024, mmio=True,
                         msi_doorbell=None, reserved=[ResvRegion(0x10000, 0x1FFFF)])
    iommu = Iommu.pv(config, strict=False)
    assert iommu.strict is False and iommu.config() == config
    assert Iommu.pv(IommuConfig()) == Iommu()


def test_wide_integers_may_be_strings_in_toml():
    t = Topology.from_dict({"iommu": {"page-size-mask": "0xffffffffffff0000"}})
    assert t.iommu.page_size_mask == 0xFFFFFFFFFFFF0000
    with pytest.raises(TopologyError, match="iommu.page-size-mask"):
        Topology.from_dict({"iommu": {"page-size-mask": "lots"}})


def test_a_reconnecting_vsmmu_disk_gets_reconnect_ms_and_a_vsmmu_backend_a_state_dir(tmp_path):
    from pviommu.lab.machine import STATE_DIR, WIRINGS, lab_endpoints

    t = Topology(iommu=Iommu(kind="vsmmu"),
                 endpoints=(Endpoint("blk", reconnect_ms=200), Endpoint("rng")))
    eps = lab_endpoints(t, tmp_path, served=True)
    wiring = WIRINGS["vsmmu"]
    argv = [a for d in wiring.devices(t, eps, tmp_path / "viommu.sock") for a in d.qemu_args()]
    chardevs = [a for a in argv if a.startswith("socket,")]
    assert chardevs[0].endswith(",reconnect-ms=200")
    assert "reconnect-ms" not in chardevs[1]  # the rng: QEMU would not start
    args = wiring.backend_args(t, eps, tmp_path / "viommu.sock")
    assert args[args.index("--state") + 1] == str(tmp_path / STATE_DIR)
    pv = Topology()
    assert "--state" not in WIRINGS["pv"].backend_args(pv, lab_endpoints(pv, tmp_path, True),
                                                       tmp_path / "viommu.sock")

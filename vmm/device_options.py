"""Parse device option strings such as `id=vm0,size=8G,requested-size=512M,block-size=2M`.

The CLI and the Python API both hand these strings to the machine; a bad one raises
`DeviceOptionError` with a one-line message naming the option.
"""

from __future__ import annotations

from dataclasses import dataclass

from vmm.hostmem import BACKENDS, parse_size


class DeviceOptionError(ValueError):
    """A device option string is malformed."""


@dataclass(frozen=True)
class VirtioMemOptions:
    id: str
    size: int
    requested_size: int = 0
    block_size: int = 2 << 20
    node: int | None = None
    memslot_size: int | None = None
    backend: str = "anon"
    prealloc: bool = False


_ON = {"on": True, "yes": True, "true": True, "off": False, "no": False, "false": False}


def _pairs(text: str, option: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in text.split(","):
        if not item:
            continue
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            raise DeviceOptionError(f"{option}: expected key=value, got {item!r}")
        if key in out:
            raise DeviceOptionError(f"{option}: {key} given twice")
        out[key] = value
    return out


def parse_virtio_mem(text: str) -> VirtioMemOptions:
    option = "--virtio-mem"
    kv = _pairs(text, option)
    known = {"id", "size", "requested-size", "block-size", "node", "memslot-size", "backend", "prealloc"}
    unknown = sorted(set(kv) - known)
    if unknown:
        raise DeviceOptionError(f"{option}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    if "id" not in kv or "size" not in kv:
        raise DeviceOptionError(f"{option}: id= and size= are required, e.g. id=vm0,size=8G")

    def size(key: str, default: int | None) -> int | None:
        if key not in kv:
            return default
        try:
            return parse_size(kv[key])
        except ValueError as e:
            raise DeviceOptionError(f"{option}: {key}: {e}") from None

    backend = kv.get("backend", "anon")
    if backend not in BACKENDS:
        raise DeviceOptionError(f"{option}: backend must be one of {', '.join(BACKENDS)}")
    prealloc = kv.get("prealloc", "off").lower()
    if prealloc not in _ON:
        raise DeviceOptionError(f"{option}: prealloc must be on or off")
    node = kv.get("node")
    if node is not None and not node.isdigit():
        raise DeviceOptionError(f"{option}: node must be a NUMA node number")
    return VirtioMemOptions(id=kv["id"], size=size("size", 0), requested_size=size("requested-size", 0),
                            block_size=size("block-size", 2 << 20), node=int(node) if node is not None else None,
                            memslot_size=size("memslot-size", None), backend=backend, prealloc=_ON[prealloc])


@dataclass(frozen=True)
class HvBalloonOptions:
    id: str
    memdev_size: int = 0        # hot-add region; 0 = balloon only
    status_report: bool = False


def parse_hv_balloon(text: str) -> HvBalloonOptions:
    option = "--hv-balloon"
    kv = _pairs(text, option)
    known = {"id", "memdev-size", "status-report"}
    unknown = sorted(set(kv) - known)
    if unknown:
        raise DeviceOptionError(f"{option}: unknown key {unknown[0]!r} (known: {', '.join(sorted(known))})")
    if "id" not in kv:
        raise DeviceOptionError(f"{option}: id= is required, e.g. id=hvb0,memdev-size=4G")
    memdev_size = 0
    if "memdev-size" in kv:
        try:
            memdev_size = parse_size(kv["memdev-size"])
        except ValueError as e:
            raise DeviceOptionError(f"{option}: memdev-size: {e}") from None
    report = kv.get("status-report", "off").lower()
    if report not in _ON:
        raise DeviceOptionError(f"{option}: status-report must be on or off")
    return HvBalloonOptions(id=kv["id"], memdev_size=memdev_size, status_report=_ON[report])

"""QMP and HMP commands for memory devices and memslots.

`query-memory-devices`, `qom-set`/`qom-get` of a device's `requested-size`, pyvmm's own
`query-memslots`, and `info memory-devices` in QEMU's text format (plus, from
virtio_mem_blocks.py, the live block map: `info virtio-mem ID`). The commands reach the
devices through the machine's `virtio_mem` table and its memslot manager, nothing more.
"""

from __future__ import annotations

from typing import Any, Callable

from pyvmm.qmp.commands import QmpCommandError
from pyvmm.qmp.virtio_mem_blocks import register_virtio_mem_block_commands

PERIPHERAL_PREFIX = "/machine/peripheral/"
DEVICE_NOT_FOUND = "DeviceNotFound"


def _device(machine, path: str):
    name = path[len(PERIPHERAL_PREFIX):] if path.startswith(PERIPHERAL_PREFIX) else path
    dev = machine.virtio_mem.get(name)
    if dev is None:
        raise QmpCommandError(f"Device '{path}' not found", DEVICE_NOT_FOUND)
    return dev


def _getters(dev) -> dict[str, Callable[[], Any]]:
    info = dev.info
    return {
        "requested-size": lambda: dev.requested_size,
        "size": lambda: dev.plugged_size,
        "max-size": lambda: info()["max-size"],
        "block-size": lambda: info()["block-size"],
        "memaddr": lambda: info()["memaddr"],
        "node": lambda: info()["node"],
        "usable-region-size": lambda: dev.usable_region_size,
    }


def register_memory_commands(commands, hmp, machine) -> None:
    def query_memory_devices(args: dict) -> list[dict]:
        out = [{"type": "virtio-mem", "data": dev.info()} for dev in machine.virtio_mem.values()]
        balloon = getattr(machine, "hv_balloon", None)
        if balloon is not None:
            out.append({"type": "hv-balloon", "data": balloon.info()})
        return out

    def qom_set(args: dict) -> dict:
        dev = _device(machine, args["path"])
        if args["property"] != "requested-size":
            raise QmpCommandError(f"Property '{args['property']}' is not writable here (only requested-size)")
        value = args["value"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise QmpCommandError("Parameter 'value' expects a size in bytes")
        try:
            dev.requested_size = value
        except ValueError as e:
            raise QmpCommandError(str(e)) from None
        return {}

    def qom_get(args: dict) -> Any:
        dev = _device(machine, args["path"])
        getter = _getters(dev).get(args["property"])
        if getter is None:
            raise QmpCommandError(f"Property '{args['property']}' not found")
        return getter()

    def query_memslots(args: dict) -> list[dict]:
        return [s.as_dict() for s in machine.slots.slots()]

    def info_memory_devices() -> str:
        lines = []
        for entry in query_memory_devices({}):
            info = entry["data"]
            lines.append(f'Memory device [{entry["type"]}]: "{info["id"]}"')
            for key in ("memaddr", "node", "requested-size", "size", "max-size", "block-size", "memdev"):
                if key in info and info[key] is not None:
                    lines.append(f"  {key}: {info[key]}")
        return "".join(line + "\r\n" for line in lines)

    commands.register("query-memory-devices", query_memory_devices, {},
                      help="list memory devices (virtio-mem) with QEMU's field names")
    commands.register("qom-set", qom_set, {"path": "str", "property": "str", "value": "any"},
                      help="set a device property (virtio-mem: requested-size)")
    commands.register("qom-get", qom_get, {"path": "str", "property": "str"},
                      help="read a device property")
    commands.register("query-memslots", query_memslots, {},
                      help="pyvmm: every KVM memslot with its GPA, size, host address and owner")
    hmp.register_info("memory-devices", info_memory_devices, "show memory devices")
    register_virtio_mem_block_commands(commands, hmp, machine)  # info virtio-mem ID, its QMP twin

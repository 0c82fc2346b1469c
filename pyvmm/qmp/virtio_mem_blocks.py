"""A virtio-mem device's block map, live: HMP `info virtio-mem ID` and QMP
`x-pyvmm-query-virtio-mem-blocks {"id": ID}`.

The bitmap is shown as runs of blocks in one of three states, the same three `pyvmm plot`
draws: plugged; unplugged but inside a mapped memslot (its pages PROT_NONE: "protected");
unplugged with no memslot. Runs come from `VirtioMem.block_runs()`, split where the memslot
mapping changes, and each says whether its memslot is mapped: plugged blocks normally are,
but the device registers a PLUG's slots only after it has answered (and serves the blocks
through its MMIO trap if KVM refuses), so a plugged run may briefly, or after such a
refusal, have none. The bitmap and the slot map are read one after the other, not as one
snapshot.
"""

from __future__ import annotations

from typing import Any

from pyvmm.qmp.commands import ERROR_DEVICE_NOT_FOUND, QmpCommandError

PLUGGED = "plugged"
PROTECTED = "protected"
UNPLUGGED = "unplugged"
STATE_TEXT = {PLUGGED: "plugged", PROTECTED: "unplugged, memslot mapped (protected)",
              UNPLUGGED: "unplugged, no memslot"}
PLUGGED_UNMAPPED_TEXT = "plugged, no memslot (not registered yet, or KVM refused it)"
# A hostile or unlucky bitmap can alternate every block (500k runs in 1 TiB): the monitor
# shows this many and says how many it left out; the QMP query returns them all.
MAX_HMP_RUNS = 256

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40


def exact_size(n: int) -> str:
    """A size in the largest binary unit that divides it exactly ("1280 MiB", "4 KiB", "5 B")."""
    for unit, name in ((TiB, "TiB"), (GiB, "GiB"), (MiB, "MiB"), (KiB, "KiB")):
        if n and n % unit == 0:
            return f"{n // unit} {name}"
    return f"{n} B"


def block_map_runs(dev: Any) -> list[dict[str, Any]]:
    """The device's blocks as runs of one state and one memslot mapping, lowest address
    first, covering the region."""
    bs = dev.block_size
    slots = dev.slots
    per_slot = slots.slot_size // bs
    runs: list[dict[str, Any]] = []

    def add(first: int, count: int, state: str, mapped: bool) -> None:
        last = runs[-1] if runs else None
        if last and (last["state"], last["memslot-mapped"]) == (state, mapped) \
                and last["first-block"] + last["blocks"] == first:
            last["blocks"] += count
            last["end"] = dev.addr + (first + count) * bs - 1
            return
        runs.append({"start": dev.addr + first * bs, "end": dev.addr + (first + count) * bs - 1,
                     "first-block": first, "blocks": count, "state": state, "memslot-mapped": mapped})

    for first, count, plugged in dev.block_runs():
        # A run spans one or more slots; split it where the mapping changes.
        block, end = first, first + count
        while block < end:
            slot_end = min(end, (block // per_slot + 1) * per_slot)
            mapped = slots.is_mapped(block // per_slot)
            state = PLUGGED if plugged else PROTECTED if mapped else UNPLUGGED
            add(block, slot_end - block, state, mapped)
            block = slot_end
    return runs


def block_map(dev: Any) -> dict[str, Any]:
    """The QMP answer: the device's sizes and geometry, and its runs."""
    return {"id": dev.id, "memaddr": dev.addr, "max-size": dev.region_size, "block-size": dev.block_size,
            "memslot-size": dev.slots.slot_size, "requested-size": dev.requested_size,
            "size": dev.plugged_size, "usable-region-size": dev.usable_region_size,
            "memslots": dev.slots.count, "memslots-mapped": dev.slots.mapped_count(),
            "runs": block_map_runs(dev)}


def format_block_map(info: dict[str, Any], max_runs: int = MAX_HMP_RUNS) -> str:
    """`info virtio-mem` text: a header, then one line per run."""
    last = info["memaddr"] + info["max-size"] - 1
    nb = info["max-size"] // info["block-size"]
    lines = [
        f'virtio-mem "{info["id"]}": {info["memaddr"]:#x}-{last:#x}, {exact_size(info["max-size"])} '
        f'in {nb} blocks of {exact_size(info["block-size"])}, memslot size {exact_size(info["memslot-size"])}',
        f'  requested-size: {exact_size(info["requested-size"])}, size (plugged): {exact_size(info["size"])}, '
        f'usable-region-size: {exact_size(info["usable-region-size"])}, '
        f'memslots mapped: {info["memslots-mapped"]} of {info["memslots"]}',
    ]
    runs = info["runs"]
    width = len(f'{last:#x}')
    count_width = len(str(max((r["blocks"] for r in runs), default=0)))
    for run in runs[:max_runs]:
        noun = "block " if run["blocks"] == 1 else "blocks"
        text = STATE_TEXT[run["state"]]
        if run["state"] == PLUGGED and not run["memslot-mapped"]:
            text = PLUGGED_UNMAPPED_TEXT
        lines.append(f'  {run["start"]:#0{width}x}-{run["end"]:#0{width}x}  {run["blocks"]:>{count_width}} {noun}  '
                     f'{text}')
    if len(runs) > max_runs:
        lines.append(f"  ... {len(runs) - max_runs} more runs (x-pyvmm-query-virtio-mem-blocks lists them all)")
    return "".join(line + "\n" for line in lines)


def register_virtio_mem_block_commands(commands: Any, hmp: Any, machine: Any) -> None:
    def device(dev_id: str) -> Any:
        dev = machine.virtio_mem.get(dev_id)
        if dev is None:
            raise QmpCommandError(f"Device '{dev_id}' not found", ERROR_DEVICE_NOT_FOUND)
        return dev

    def query_blocks(args: dict) -> dict[str, Any]:
        return block_map(device(args["id"]))

    def info_virtio_mem(args: str) -> str:
        words = args.split()
        if not words:
            known = ", ".join(sorted(machine.virtio_mem)) or "none"
            return f"Error: Parameter 'id' is missing (virtio-mem devices: {known})\n"
        if len(words) > 1:
            return "virtio-mem: extraneous characters at the end of line\n"
        dev = machine.virtio_mem.get(words[0])
        if dev is None:
            return f"Error: Device '{words[0]}' not found\n"
        return format_block_map(block_map(dev))

    commands.register("x-pyvmm-query-virtio-mem-blocks", query_blocks, {"id": "str"},
                      help="pyvmm: a virtio-mem device's block bitmap as runs (plugged / protected / unplugged)")
    hmp.register_info("virtio-mem", info_virtio_mem, "show a virtio-mem device's blocks as runs (info virtio-mem ID)",
                      takes_args=True)

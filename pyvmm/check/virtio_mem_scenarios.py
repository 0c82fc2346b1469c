"""The virtio-mem scenarios. Each starts with nothing plugged (the kit's prepare step
unplugs what the previous one left), states in its docstring what it expects from the
guest, and checks it from both sides: the device's counters over QMP and the guest's own
view through the agent.

Sizes are kept small because guest kernel work is interpreted on a PVM host (plugging
128 MiB about 3 s, writing a 1 MiB pattern about 5 s, each agent command that execs a
program 1 to 3 s).
"""

from __future__ import annotations

import time

from pyvmm.check.outcomes import CheckFailed, ScenarioSkipped
from pyvmm.check.registry import scenario
from pyvmm.check.virtio_mem_kit import REGION_SIZE, VirtioMemContext
from pyvmm.check.waits import MiB, mib

KIT = "virtio-mem"
STEP = 128 * MiB
PATTERN_SIZE = 1 * MiB
HELD_PATTERN_SIZE = 1 * MiB
# Resident bytes of the region the host may keep once all is unplugged (page-table pages
# and the like; the device discards the memory itself).
UNPLUGGED_RSS_SLACK = 1 * MiB
IN_FLIGHT_POLL_S = 0.05
SETTLE_S = 1.0


@scenario(KIT)
def plug_unplug_single_blocks(ctx: VirtioMemContext) -> None:
    """The guest plugs and unplugs one block at a time (its own unit, 4 MiB on x86): the
    device's plugged size and the guest's MemTotal follow every step exactly."""
    before = ctx.fault_counts()
    for n in (1, 2, 1, 0):
        ctx.plug(n * ctx.unit)
    ctx.expect_slots_cover_plugged()
    ctx.expect_no_new_faults(before)


@scenario(KIT)
def plug_unplug_large_steps(ctx: VirtioMemContext) -> None:
    """Steps of 128 and 256 MiB up to 384 MiB and back: plugged size, MemTotal and the
    device's memslots follow, and the guest's memory blocks in the region are online."""
    before = ctx.fault_counts()
    counters = ctx.counters()["requests"]
    for size in (STEP, 3 * STEP):
        ctx.plug(size)
        ctx.expect_slots_cover_plugged()
    blocks = ctx.region_blocks()
    online = sum(b["size"] for b in blocks if b["online"])
    ctx.expect(online >= 3 * STEP, f"3 * 128 MiB plugged, but the guest has only {mib(online)} of memory "
                                   f"blocks online in the device's region: {_describe(blocks)}")
    ctx.plug(STEP)
    ctx.expect_slots_cover_plugged()
    ctx.plug(0)
    ctx.expect_slots_cover_plugged()
    after = ctx.counters()["requests"]
    for kind in ("plug", "unplug"):
        ctx.expect(after.get(kind, {}).get("ack", 0) > counters.get(kind, {}).get("ack", 0),
                   f"the device acknowledged no {kind} request during the steps: {after}")
    ctx.expect_no_new_faults(before)


@scenario(KIT)
def movable_onlining(ctx: VirtioMemContext) -> None:
    """Hot-plugged memory is onlined to ZONE_MOVABLE, where unplug can always migrate pages
    away (memhp_default_state=online_movable, or CONFIG_MHP_DEFAULT_ONLINE_TYPE_ONLINE_MOVABLE)."""
    ctx.request(STEP)
    ctx.wait_plugged(STEP)
    blocks: list[dict] = []

    def onlined() -> bool:
        blocks[:] = ctx.region_blocks()
        return bool(blocks) and all(b["online"] for b in blocks)
    try:
        ctx.wait_until(onlined, ctx.timeout(30.0), "the plugged memory blocks to come online",
                       seen=lambda: _describe(blocks), interval=2.0)
    except CheckFailed:
        raise CheckFailed(f"the guest did not online the memory it plugged ({_describe(blocks)}): "
                          "boot it with memhp_default_state=online_movable (or build it with "
                          "CONFIG_MHP_DEFAULT_ONLINE_TYPE_ONLINE_MOVABLE=y)") from None
    not_movable = [b for b in blocks if b["zone"] != "Movable"]
    if not_movable:
        zones = sorted({b["zone"] for b in not_movable})
        raise CheckFailed(f"hot-plugged memory was onlined to zone {'/'.join(zones)}, not Movable "
                          f"({_describe(not_movable)}), so unplug cannot be guaranteed: boot the guest with "
                          "memhp_default_state=online_movable (it has online_kernel or online), or build it "
                          "with CONFIG_MHP_DEFAULT_ONLINE_TYPE_ONLINE_MOVABLE=y")
    ctx.log(f"{_describe(blocks)}")


@scenario(KIT)
def unplug_while_holding(ctx: VirtioMemContext) -> None:
    """The guest keeps the data it holds in plugged memory while that memory is unplugged
    under it (it migrates the pages out of ZONE_MOVABLE): the pattern still verifies after
    unplugging half, then all; the device counts no access to unplugged memory."""
    before = ctx.fault_counts()
    path = "/tmp/pyvmm-check-held"
    ctx.plug(2 * STEP, memtotal=False)
    # tmpfs pages are movable allocations, which the guest serves from ZONE_MOVABLE first:
    # the plugged memory.
    ctx.agent.pattern_fill(path, HELD_PATTERN_SIZE, seed=0x5EED)
    rss = ctx.region_host_rss()
    ctx.log(f"pattern of {mib(HELD_PATTERN_SIZE)} written; {mib(rss or 0)} of the region resident on the host")
    try:
        ctx.plug(STEP, memtotal=False)
        ctx.expect(ctx.agent.pattern_verify(path, seed=0x5EED),
                   f"data held in plugged memory changed after unplugging half of it: {ctx.agent.last_output.strip()}")
        ctx.plug(0, memtotal=False)
        ctx.expect(ctx.agent.pattern_verify(path, seed=0x5EED),
                   f"data held in plugged memory changed after unplugging all of it: {ctx.agent.last_output.strip()}")
    finally:
        ctx.agent.pattern_free(path)
    ctx.expect_no_new_faults(before)


@scenario(KIT)
def unplug_all(ctx: VirtioMemContext) -> None:
    """From 256 MiB plugged, requested-size 0 makes the guest unplug everything: nothing
    plugged, MemTotal back to its boot value, no memory block and no memslot left in the
    region, and the host no longer holds the memory."""
    ctx.plug(2 * STEP, memtotal=False)
    ctx.region_host_rss()  # learns the region's host address while a memslot is mapped
    ctx.plug(0)
    ctx.expect_slots_cover_plugged()
    left = [b for b in ctx.region_blocks() if b["online"]]
    ctx.expect(not left, f"nothing is plugged but memory blocks stay online in the region: {_describe(left)}")
    rss = ctx.region_host_rss()
    ctx.expect(rss is not None and rss <= UNPLUGGED_RSS_SLACK,
               f"everything is unplugged but {mib(rss or 0)} of the region is still resident on the host")


@scenario(KIT)
def resize_while_in_flight(ctx: VirtioMemContext) -> None:
    """A new requested-size while the guest is still plugging towards the previous one:
    asked for the whole 1 GiB region and, once it has plugged its first chunk, for only
    128 MiB more than that, the guest stops there and its MemTotal agrees."""
    before = ctx.fault_counts()
    ctx.request(REGION_SIZE)
    partial = ctx.wait_until(lambda: ctx.plugged or None, ctx.timeout(60.0),
                             "the guest to start plugging", interval=IN_FLIGHT_POLL_S)
    if partial + STEP >= REGION_SIZE:
        raise ScenarioSkipped("the guest plugged (nearly) the whole region before the change could land")
    target = partial + STEP
    ctx.log(f"{mib(partial)} plugged so far; changing the request")
    ctx.request(target)
    ctx.wait_plugged(target)
    time.sleep(SETTLE_S)  # a late plug for the old request would show now
    ctx.expect(ctx.plugged == target, f"plugged moved past the new request of {mib(target)}: {mib(ctx.plugged)}")
    ctx.wait_memtotal(target)
    ctx.expect_slots_cover_plugged()
    ctx.expect_no_new_faults(before)


@scenario(KIT)
def data_integrity(ctx: VirtioMemContext) -> None:
    """Data the guest wrote in its boot memory survives memory being plugged and unplugged
    next to it (256 MiB and back): the pattern verifies afterwards, and the device counts
    no access to unplugged memory. (Data in plugged memory: unplug-while-holding.)"""
    before = ctx.fault_counts()
    path = "/tmp/pyvmm-check-boot"
    ctx.agent.pattern_fill(path, PATTERN_SIZE, seed=11)
    try:
        ctx.plug(2 * STEP, memtotal=False)
        ctx.plug(0, memtotal=False)
        ctx.expect(ctx.agent.pattern_verify(path, seed=11),
                   f"{path} changed across plug and unplug: {ctx.agent.last_output.strip()}")
        ctx.log("the pattern verifies")
    finally:
        ctx.agent.pattern_free(path)
    ctx.expect_no_new_faults(before)


@scenario(KIT)
def reboot_mid_plug(ctx: VirtioMemContext) -> None:
    """A reboot while the guest is plugging: at the reset the device drops to nothing
    plugged, the new kernel plugs back to the requested size, and its MemTotal agrees."""
    target = 2 * STEP
    ctx.request(target)
    partial = ctx.wait_until(lambda: ctx.plugged or None, ctx.timeout(60.0),
                             "the guest to start plugging", interval=IN_FLIGHT_POLL_S)
    ctx.log(f"{mib(partial)} of {mib(target)} plugged; rebooting the guest")
    resets = ctx.vm_stats()["resets"]
    ctx.agent.reboot()
    ctx.wait_until(lambda: ctx.vm_stats()["resets"] > resets, ctx.timeout(60.0),
                   "the machine to reset after the guest's reboot")
    # The new kernel needs a minute to boot: the reset state is observable well before.
    ctx.expect(ctx.plugged == 0, f"after the reset {mib(ctx.plugged)} is still plugged")
    ctx.expect(not ctx.slots(), f"after the reset memslots stay mapped: {ctx.slots()}")
    ctx.log("reset: nothing plugged, no memslot")
    ctx.wait_agent()
    ctx.wait_plugged(target)
    ctx.wait_memtotal(target)


def _describe(blocks: list[dict]) -> str:
    if not blocks:
        return "no memory blocks"
    return ", ".join(f"memory{b['index']} {b['state']}{' ' + b['zone'] if b['zone'] else ''}" for b in blocks)

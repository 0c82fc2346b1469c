"""hv-balloon: balloon/unballoon throughput on the real guest, host cost per message and per
range, and the page-range set's metadata on a synthetic 1 TiB workload.

Throughput is measured from the QMP `balloon` command until `query-balloon` reports the
target (the guest has answered). QEMU's hv-balloon cannot be the peer on a host whose KVM
has no Hyper-V support (it needs KVM's own Hyper-V emulation), so the table quotes QEMU's
published figure with a Windows guest instead of a same-run measurement, and says so.
"""

from __future__ import annotations

import asyncio
import gc
import random
import sys
import time
import tracemalloc
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from qemu.qmp import QMPClient  # noqa: E402

import pyvmm  # noqa: E402
from devices.hyperv.page_ranges import PageRanges  # noqa: E402

MiB = 1 << 20
BOOT = 1024 * MiB
BALLOON = 512 * MiB
BOOT_TIMEOUT = 900.0
RESIZE_TIMEOUT = 600.0
POLL_S = 0.05
# QEMU's hv-balloon with a Windows guest, from the seed issue: GB per minute.
QEMU_REFERENCE_BALLOON_GB_MIN = 230.0


async def _resize(qmp_path: Path, target: int) -> float:
    client = QMPClient("bench")
    await client.connect(str(qmp_path))
    try:
        t0 = time.monotonic()
        await client.execute("balloon", {"value": target})
        while (await client.execute("query-balloon"))["actual"] != target:
            if time.monotonic() - t0 > RESIZE_TIMEOUT:
                raise RuntimeError(f"the guest did not reach {target} bytes")
            await asyncio.sleep(POLL_S)
        return time.monotonic() - t0
    finally:
        await client.disconnect()


def throughput() -> dict:
    with pyvmm.VM(memory=BOOT, agent=True, boot_timeout=BOOT_TIMEOUT, hv_balloon="id=hvb0") as vm:
        vm.agent.wait_ready(BOOT_TIMEOUT)
        vm.wait_for(lambda: vm.qmp.execute("query-vm-stats")["hv-balloon"]["state"] == "idle", 120,
                    what="hv_balloon to bind")
        t_balloon = asyncio.run(_resize(vm.qmp_path, BOOT - BALLOON))
        t_unballoon = asyncio.run(_resize(vm.qmp_path, BOOT))
        stats = vm.qmp.execute("query-vm-stats")["hv-balloon"]
    gb = BALLOON / 1e9
    return {"size": BALLOON, "balloon-s": t_balloon, "unballoon-s": t_unballoon,
            "balloon-gb-min": gb / t_balloon * 60, "unballoon-gb-min": gb / t_unballoon * 60,
            "per-message-us": stats["processing-time-us"], "per-range-us": stats["range-time-us"]}


def range_metadata(seed: int = 1) -> dict:
    """Balloon 1 TiB of 4 KiB pages in 2 MiB runs in random order, then measure the set."""
    pages_per_run = (2 * MiB) >> 12
    runs = (1 << 40) // (2 * MiB)
    order = list(range(runs))
    random.Random(seed).shuffle(order)
    ranges = PageRanges()
    peak = 0
    t0 = time.perf_counter()
    for i, run in enumerate(order):
        ranges.add(run * pages_per_run, pages_per_run)
        if i % 4096 == 0:
            peak = max(peak, len(ranges))
    elapsed = time.perf_counter() - t0
    del order
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    empty = PageRanges()
    empty_size = tracemalloc.get_traced_memory()[0] - before
    merged = PageRanges()
    for start, count in ranges:  # the same state, measured alone
        merged.add(start, count)
    size = tracemalloc.get_traced_memory()[0] - before - empty_size
    tracemalloc.stop()
    del empty
    return {"runs": runs, "peak-ranges": peak, "final-ranges": len(ranges), "pages": ranges.pages,
            "final-bytes": size, "empty-bytes": empty_size, "us-per-add": elapsed / runs * 1e6}


if __name__ == "__main__":
    print(range_metadata())
    print(throughput())

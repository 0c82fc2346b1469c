"""The hv-balloon scenarios. Each ends at the boot size, except balloon, which leaves 64 MiB
ballooned for unballoon to take back (every scenario copes with starting either way); each
states in its docstring what it expects from the guest, and checks it from both sides: the
device's counters over QMP and the guest's own view through the agent.

Sizes are kept small: hot-adding 128 MiB takes about 20 s of interpreted guest kernel work
on a PVM host, and every agent command that execs a program 1 to 3 s.

Order matters: balloon-under-pressure runs before hot-add. Hot-added memory is onlined to
ZONE_MOVABLE, and Linux 6.12's balloon floor counts all memory alike, so once hot-added
memory is in the guest, ballooning down to the floor takes the boot memory the kernel's
own allocations need, and the guest dies of OOM ("System is deadlocked on memory"; seen
with the default guest). That is worth knowing, but not what this scenario tests.
"""

from __future__ import annotations

from pyvmm.check.hv_balloon_kit import HvBalloonContext
from pyvmm.check.outcomes import CheckFailed
from pyvmm.check.registry import scenario
from pyvmm.check.waits import BALLOON_BASE_S, BALLOON_PER_128M_S, STATUS_REPORT_TIMEOUT_S, MiB, mib, size_timeout

KIT = "hv-balloon"
PAGE = 4096
BALLOON_STEP = 64 * MiB
HOT_ADD_STEP = 128 * MiB
PRESSURE_TARGET = 32 * MiB   # far below Linux's balloon floor for a 256 MiB guest (about 100 MiB)
HELD_PATTERN_SIZE = 2 * MiB
# A status report's "available" is the guest's MemAvailable at the time it was sent; the
# agent reads MemAvailable a little later, in a guest that is idle apart from that.
AVAILABLE_SLACK = 32 * MiB
# Committed memory may exceed RAM (overcommit), but not by orders of magnitude: a report in
# the wrong unit would.
COMMITTED_SANITY_FACTOR = 4
FLOOR_MESSAGE = "Balloon request will be partially fulfilled"
DMESG_LINES = 200


@scenario(KIT)
def balloon(ctx: HvBalloonContext) -> None:
    """Below its boot size the guest balloons: it hands 64 MiB of pages to the host in
    ranges the device accepts, and its MemTotal drops by 64 MiB. (It leaves them ballooned:
    unballoon, next, takes them back.)"""
    before = ctx.counters()["pages"]["ballooned-total"]
    ctx.resize(ctx.boot_size - BALLOON_STEP, memtotal_delta=-BALLOON_STEP)
    pages = ctx.counters()["pages"]
    ctx.expect(pages["ballooned"] == BALLOON_STEP // PAGE,
               f"the device holds {pages['ballooned']} ballooned pages, expected {BALLOON_STEP // PAGE}")
    ctx.expect(pages["ballooned-total"] - before >= BALLOON_STEP // PAGE,
               f"the device counted only {pages['ballooned-total'] - before} pages ballooned")
    ctx.expect_no_bad_ranges()


@scenario(KIT)
def unballoon(ctx: HvBalloonContext) -> None:
    """Raising the target again returns the ballooned pages: the device gets back to the
    boot size with nothing ballooned, and the guest's MemTotal is its boot value again."""
    if ctx.counters()["pages"]["ballooned"] == 0:
        ctx.resize(ctx.boot_size - BALLOON_STEP)
    ctx.resize(ctx.boot_size, memtotal_delta=0)
    pages = ctx.counters()["pages"]
    ctx.expect(pages["ballooned"] == 0, f"{pages['ballooned']} pages are still ballooned at the boot size")
    ctx.expect_no_bad_ranges()


@scenario(KIT)
def balloon_under_pressure(ctx: HvBalloonContext) -> None:
    """Asked to shrink far below its floor while the agent holds memory, the guest gives
    only what it can spare ("partially fulfilled") and stays healthy: the device records the
    shortfall and stops at the floor, the held data verifies, the agent answers."""
    path = "/tmp/pyvmm-check-pressure"
    shortfalls = ctx.counters()["balloon"]["shortfalls"]
    ctx.agent.pattern_fill(path, HELD_PATTERN_SIZE, seed=77)
    try:
        ctx.set_target(PRESSURE_TARGET)
        stats: dict = {}

        def at_floor() -> bool:
            stats.update(ctx.counters())
            return stats["state"] == "idle" and stats["balloon"]["at-floor"]
        ctx.wait_until(at_floor, size_timeout(ctx.boot_size - PRESSURE_TARGET, BALLOON_BASE_S,
                                              BALLOON_PER_128M_S, ctx.scale),
                       "the guest to stop ballooning at its floor",
                       seen=lambda: f"actual {mib(ctx.actual)}, state {stats.get('state')}, "
                                    f"balloon {stats.get('balloon')}")
        actual = ctx.actual
        ctx.log(f"the guest stopped at {mib(actual)}")
        ctx.expect(actual > PRESSURE_TARGET, f"the guest ballooned down to {mib(actual)}, below any sane floor")
        ctx.expect(stats["balloon"]["shortfalls"] > shortfalls,
                   f"the device recorded no shortfall: {stats['balloon']}")
        ctx.agent.ping()
        mem = ctx.meminfo()
        ctx.expect(mem.get("MemAvailable", 0) > 0, f"the guest has no memory available: {mem}")
        ctx.expect(ctx.agent.pattern_verify(path, seed=77),
                   f"the data the agent held changed under balloon pressure: {ctx.agent.last_output.strip()}")
        log = ctx.agent.dmesg(DMESG_LINES)
        ctx.expect(FLOOR_MESSAGE in log, f"the guest's log does not say {FLOOR_MESSAGE!r}")
        ctx.expect_no_bad_ranges()
        ctx.resize(ctx.boot_size)
    finally:
        ctx.agent.pattern_free(path)


@scenario(KIT)
def hot_add(ctx: HvBalloonContext) -> None:
    """Above its boot size the guest takes hot-added memory (from the device's memdev): it
    onlines 128 MiB, its MemTotal grows by that much, and memslots map it."""
    blocks_before = sum(b["size"] for b in ctx.agent.memory_blocks() if b["online"])
    ctx.resize(ctx.boot_size + HOT_ADD_STEP, memtotal_delta=HOT_ADD_STEP)
    mapped = sum(s["size"] for s in ctx.hot_add_slots())
    ctx.expect(mapped >= HOT_ADD_STEP, f"128 MiB hot-added but only {mib(mapped)} of memslots mapped")
    online = sum(b["size"] for b in ctx.agent.memory_blocks() if b["online"])
    ctx.expect(online - blocks_before == HOT_ADD_STEP,
               f"the guest's online memory blocks grew by {mib(online - blocks_before)}, expected 128 MiB")
    hot = ctx.counters()["hot-add"]
    ctx.expect(not hot["failed"] and not hot["refused"], f"the device counted failed hot-adds: {hot}")
    # Back to the boot size: the guest balloons out as much as was added.
    ctx.resize(ctx.boot_size)
    ctx.expect_no_bad_ranges()


@scenario(KIT)
def status_reports(ctx: HvBalloonContext) -> None:
    """The guest posts Dynamic Memory status reports (Linux: every second, after 45 s): a
    fresh HV_BALLOON_STATUS_REPORT event arrives, and its figures are sane: "available" is
    about the guest's MemAvailable, "committed" counts at least the ballooned pages (Linux
    adds them to its committed memory) and is not absurdly large."""
    ctx.qmp.events(clear=True)
    try:
        event = ctx.qmp.wait_event("HV_BALLOON_STATUS_REPORT", timeout=ctx.timeout(STATUS_REPORT_TIMEOUT_S))
    except TimeoutError:
        raise CheckFailed(f"expected an HV_BALLOON_STATUS_REPORT event within "
                          f"{ctx.timeout(STATUS_REPORT_TIMEOUT_S):.0f} s; saw none "
                          f"(last report: {ctx.status_report()})") from None
    report = event["data"]
    available = ctx.meminfo()["MemAvailable"]
    ballooned = ctx.counters()["pages"]["ballooned"] * PAGE
    ctx.log(f"report {report}; MemAvailable {available}; ballooned {ballooned}")
    actual = ctx.actual
    ctx.expect(0 < report["available"] <= actual,
               f"reported available {report['available']} is not within (0, {actual}]")
    ctx.expect(abs(report["available"] - available) <= AVAILABLE_SLACK,
               f"reported available {mib(report['available'])} is far from the guest's MemAvailable {mib(available)}")
    most = COMMITTED_SANITY_FACTOR * (ctx.boot_size + ctx.hot_add_size)
    ctx.expect(max(ballooned, 1) <= report["committed"] <= most,
               f"reported committed {report['committed']} is not within [{ballooned} ballooned, {most}]")
    ctx.expect(ctx.status_report() is not None, "query-hv-balloon-status-report has no report")

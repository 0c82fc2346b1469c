"""hv-balloon with the real Linux guest: its own hv_vmbus and hv_balloon drivers bind to
pyvmm's VMBus and run the Dynamic Memory protocol: balloon, unballoon, hot-add, status reports.

Every QMP command goes through the reference client, qemu.qmp; guest-side facts come from
the agent. One guest serves every check, in order. RAM is preallocated so that ballooned
pages are resident before and must leave the host's RSS when discarded. Hot-add onlines
memory blocks with interpreted kernel code: about 20 s per 128 MiB on a PVM host.
"""

from __future__ import annotations

import time

import pytest
from qemu.qmp import ExecuteError, QMPClient

import pyvmm
from tests.integration.guest_support import BOOT_TIMEOUT, REBOOT_TIMEOUT, require_guest
from tests.procfs import region_rss
from tests.qemu_qmp import next_event, qmp_session

MiB = 1 << 20
BOOT = 512 * MiB
HOT_ADD = 512 * MiB
RESIZE_TIMEOUT = 600.0
# Linux's hv_balloon holds its first status report back 45 s after it binds.
STATUS_TIMEOUT = 240.0

pytestmark = [pytest.mark.guest, require_guest()]


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    with pyvmm.VM(memory=BOOT, boot_timeout=BOOT_TIMEOUT, extra_args=["--mem-prealloc"],
                  hv_balloon=f"id=hvb0,memdev-size={HOT_ADD >> 20}M,status-report=on",
                  log_path=tmp_path_factory.mktemp("console") / "console.log") as vm:
        vm.agent.wait_ready(BOOT_TIMEOUT)
        yield vm


def qmp(vm: pyvmm.VM, command: str, args: dict | None = None):
    async def body(client: QMPClient):
        return await client.execute(command, args)
    return qmp_session(vm, body)


def balloon_and_wait(vm: pyvmm.VM, target: int) -> dict:
    """`balloon`, then the BALLOON_CHANGE that reports `target` reached."""
    async def body(client: QMPClient) -> dict:
        with client.listener() as listener:
            await client.execute("balloon", {"value": target})
            while True:
                event = await next_event(listener, "BALLOON_CHANGE", RESIZE_TIMEOUT)
                if event["data"]["actual"] == target:
                    return event
    event = qmp_session(vm, body)
    assert qmp(vm, "query-balloon") == {"actual": target}
    return event


def ram_slot(vm: pyvmm.VM) -> dict:
    [slot] = [s for s in qmp(vm, "query-memslots") if s["owner"] == "ram"]
    return slot


def hot_add_slots(vm: pyvmm.VM) -> list[dict]:
    return [s for s in qmp(vm, "query-memslots") if s["owner"].startswith("hv-balloon")]


def test_guest_binds_hv_balloon_over_vmbus(vm: pyvmm.VM) -> None:
    vmbus = [d for d in vm.agent.devices() if d["bus"] == "vmbus"]
    assert [d["driver"] for d in vmbus] == ["hv_balloon"], vmbus
    assert vmbus[0]["class_id"] == "{525074dc-8985-46e2-8057-a307dc18a502}"
    log = vm.agent.dmesg(400)
    assert "hv_vmbus: Vmbus version:" in log
    assert "hv_balloon: Using Dynamic Memory protocol version 2.0" in log
    # The capabilities exchange is done when the guest got our info message back.
    assert f"hv_balloon: Max. dynamic memory size: {(BOOT + HOT_ADD) >> 20} MB" in log
    [entry] = [d for d in qmp(vm, "query-memory-devices") if d["type"] == "hv-balloon"]
    assert entry["data"]["id"] == "hvb0" and entry["data"]["max-size"] == HOT_ADD


def test_balloon_lowers_memtotal_and_host_rss(vm: pyvmm.VM) -> None:
    slot = ram_slot(vm)
    lo, hi = slot["host-addr"], slot["host-addr"] + slot["size"]
    before_rss = region_rss(vm.pid, lo, hi)
    before = vm.agent.meminfo()["MemTotal"]
    balloon_and_wait(vm, BOOT - 128 * MiB)
    # Linux's hv_balloon takes ballooned pages out of MemTotal.
    assert before - vm.agent.meminfo()["MemTotal"] == 128 * MiB
    # RAM was preallocated: the 128 MiB the guest gave up left the host.
    assert before_rss - region_rss(vm.pid, lo, hi) >= 120 * MiB
    stats = qmp(vm, "query-vm-stats")["hv-balloon"]
    assert stats["pages"]["ballooned"] == (128 * MiB) >> 12 and stats["bad-ranges"] == {}


def test_balloon_back_returns_the_memory(vm: pyvmm.VM) -> None:
    balloon_and_wait(vm, BOOT)
    vm.wait_for(lambda: vm.agent.meminfo()["MemTotal"] > BOOT - 32 * MiB, 120, what="MemTotal to come back")
    assert qmp(vm, "query-vm-stats")["hv-balloon"]["pages"]["ballooned"] == 0


def test_balloon_above_boot_size_hot_adds(vm: pyvmm.VM) -> None:
    before = vm.agent.meminfo()["MemTotal"]
    assert hot_add_slots(vm) == []
    balloon_and_wait(vm, BOOT + HOT_ADD)
    vm.wait_for(lambda: vm.agent.meminfo()["MemTotal"] - before == HOT_ADD, RESIZE_TIMEOUT,
                what="MemTotal to grow by the hot-added memory")
    assert sum(s["size"] for s in hot_add_slots(vm)) == HOT_ADD
    blocks = vm.agent.memory_blocks()
    assert sum(b["size"] for b in blocks if b["online"]) == BOOT + HOT_ADD


def test_status_reports_arrive(vm: pyvmm.VM) -> None:
    async def body(client: QMPClient) -> dict:
        with client.listener() as listener:
            return await next_event(listener, "HV_BALLOON_STATUS_REPORT", STATUS_TIMEOUT)
    event = qmp_session(vm, body)
    assert 0 < event["data"]["committed"] <= BOOT + HOT_ADD
    assert 0 < event["data"]["available"] <= BOOT + HOT_ADD
    assert set(qmp(vm, "query-hv-balloon-status-report")) == {"committed", "available"}


def test_bad_balloon_values_get_qmp_errors(vm: pyvmm.VM) -> None:
    for value in (0, -4096, "1G"):
        with pytest.raises(ExecuteError) as err:
            qmp(vm, "balloon", {"value": value})
        assert err.value.error_class == "GenericError"


def test_reboot_resets_everything(vm: pyvmm.VM) -> None:
    async def reset(client: QMPClient) -> None:
        with client.listener() as listener:
            await client.execute("system_reset")
            await next_event(listener, "RESET", 30)
    qmp_session(vm, reset)
    assert qmp(vm, "query-balloon") == {"actual": BOOT}
    assert hot_add_slots(vm) == []
    vm.agent.wait_ready(REBOOT_TIMEOUT)
    # The new kernel negotiates afresh and sees only its boot memory.
    deadline = time.monotonic() + 120
    while qmp(vm, "query-vm-stats")["hv-balloon"]["state"] != "idle":
        assert time.monotonic() < deadline, "the rebooted guest did not bind hv_balloon again"
        time.sleep(1)
    assert vm.agent.meminfo()["MemTotal"] <= BOOT

"""The real default guest under pyvmm: console, agent, reboots, power-off.

Boots are slow where KVM interprets guest kernel code (PVM: 1.5–3 minutes), so one VM per
module serves every check, in the order written, and reboots are part of the sequence.
"""

from __future__ import annotations

import time

import pytest
from qemu.qmp import QMPClient

import guest_images
import pyvmm
from tests.integration.guest_support import BOOT_TIMEOUT, REBOOT_TIMEOUT, require_guest
from tests.qemu_qmp import next_event, qmp_session

MEMORY = 256 << 20
# The kernel keeps its image, memmap and early reservations out of MemTotal; this guest
# loses about 5 %. A quarter of RAM is a generous bound that still catches a wrong e820.
MEMTOTAL_SLACK = MEMORY // 4

pytestmark = [pytest.mark.guest, require_guest()]


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    with pyvmm.VM(memory=MEMORY, cpus=1, boot_timeout=BOOT_TIMEOUT,
                  log_path=tmp_path_factory.mktemp("console") / "console.log") as vm:
        yield vm


def test_console_shell_answers(vm: pyvmm.VM) -> None:
    vm.wait_console(r"guest:.*# ", timeout=BOOT_TIMEOUT)
    start = vm.console_offset
    vm.console_write("echo hi\n")
    vm.wait_console(r"\nhi\r?\n", timeout=60, start=start)


def test_memtotal_matches_memory(vm: pyvmm.VM) -> None:
    total = vm.agent.meminfo()["MemTotal"]
    assert MEMORY - MEMTOTAL_SLACK <= total <= MEMORY


def test_boot_memory_blocks_are_online(vm: pyvmm.VM) -> None:
    blocks = vm.agent.memory_blocks()
    assert blocks and all(b["online"] for b in blocks)
    assert sum(b["size"] for b in blocks) == MEMORY


def test_stats_count_exits_and_assists(vm: pyvmm.VM) -> None:
    stats = vm.qmp.execute("query-vm-stats")
    assert stats["exits"]["io"] > 0
    assert stats["memslots"]["count"] == 1
    assert "failed" not in stats["assists"]


def test_guest_runs_on_kvm_clock(vm: pyvmm.VM) -> None:
    status, out = vm.agent.run("cat /sys/devices/system/clocksource/clocksource0/current_clocksource")
    assert status == 0 and out.strip() == "kvm-clock"


def test_guest_clock_stands_still_while_stopped(vm: pyvmm.VM) -> None:
    paused = 8.0
    t0 = time.monotonic()
    before = vm.agent.uptime()
    vm.qmp.execute("stop")
    assert vm.qmp.execute("query-status")["status"] == "paused"
    time.sleep(paused)
    vm.qmp.execute("cont")
    after = vm.agent.uptime()
    host_elapsed = time.monotonic() - t0
    # The guest saw everything but the pause (agent round trips included on both sides).
    assert after - before < host_elapsed - paused * 0.75
    assert after > before
    assert vm.qmp.execute("query-vm-stats")["guest-time-frozen-on-pause"]["kvm-clock"] is True


def test_reboot_through_the_agent(vm: pyvmm.VM) -> None:
    vm.qmp.events()  # drop what came before
    vm.agent.reboot()
    event = vm.qmp.wait_event("RESET", REBOOT_TIMEOUT)
    assert event["data"]["guest"] is True
    vm.agent.wait_ready(REBOOT_TIMEOUT)
    assert vm.qmp.execute("query-vm-stats")["resets"] == 1
    assert vm.agent.meminfo()["MemTotal"] > MEMORY - MEMTOTAL_SLACK


def test_system_reset_through_qemu_qmp(vm: pyvmm.VM) -> None:
    async def body(client: QMPClient) -> dict:
        with client.listener() as listener:
            await client.execute("system_reset")
            return await next_event(listener, "RESET", 30)
    event = qmp_session(vm, body)
    assert event["data"]["guest"] is False
    vm.agent.wait_ready(REBOOT_TIMEOUT)
    assert vm.qmp.execute("query-status")["status"] == "running"
    assert vm.qmp.execute("query-vm-stats")["resets"] == 2


def test_poweroff_from_the_console_exits_zero(vm: pyvmm.VM) -> None:
    vm.wait_console(r"guest:.*# ", timeout=REBOOT_TIMEOUT, start=vm.console_offset - 4096)
    vm.console_write("poweroff\n")
    assert vm.wait_exit(REBOOT_TIMEOUT) == 0


def test_default_image_is_the_one_booted() -> None:
    assert guest_images.is_built(guest_images.default_image())

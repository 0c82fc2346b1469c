"""The real default guest with two vCPUs: both online, and a clean ACPI power-button shutdown."""

from __future__ import annotations

import pytest
from qemu.qmp import QMPClient

import pyvmm
from tests.integration.guest_support import BOOT_TIMEOUT, REBOOT_TIMEOUT, require_guest
from tests.qemu_qmp import next_event, qmp_session

MEMORY = 512 << 20

pytestmark = [pytest.mark.guest, require_guest()]


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    with pyvmm.VM(memory=MEMORY, cpus=2, boot_timeout=BOOT_TIMEOUT,
                  log_path=tmp_path_factory.mktemp("console") / "console.log") as vm:
        yield vm


def test_both_cpus_online(vm: pyvmm.VM) -> None:
    status, out = vm.agent.run("read -r online < /sys/devices/system/cpu/online; echo $online")
    assert status == 0
    assert out.strip() == "0-1"


def test_memtotal_matches_memory(vm: pyvmm.VM) -> None:
    total = vm.agent.meminfo()["MemTotal"]
    assert MEMORY * 3 // 4 <= total <= MEMORY


def test_system_powerdown_through_qemu_qmp_shuts_down_cleanly(vm: pyvmm.VM) -> None:
    async def body(client: QMPClient) -> dict:
        with client.listener() as listener:
            await client.execute("system_powerdown")
            await next_event(listener, "POWERDOWN", 10)
            return await next_event(listener, "SHUTDOWN", REBOOT_TIMEOUT)
    shutdown = qmp_session(vm, body)
    assert shutdown["data"]["guest"] is True
    assert vm.wait_exit(60) == 0
    # The guest shut itself down through ACPI S5 (not a host-side kill): its kernel said so.
    assert "reboot: Power down" in vm.console_text


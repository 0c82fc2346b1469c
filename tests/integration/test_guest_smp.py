"""The real default guest with two vCPUs: both online, and a clean ACPI power-button shutdown."""

from __future__ import annotations

import pytest

import pyvmm
from tests.integration.guest_support import BOOT_TIMEOUT, REBOOT_TIMEOUT, require_guest

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


def test_system_powerdown_shuts_the_guest_down_cleanly(vm: pyvmm.VM) -> None:
    vm.qmp.events()
    assert vm.powerdown(timeout=REBOOT_TIMEOUT) == 0  # system_powerdown, then pyvmm's exit status
    names = [e["event"] for e in vm.qmp.events()]
    assert "POWERDOWN" in names and "SHUTDOWN" in names
    # The guest shut itself down through ACPI S5 (not a host-side kill): its kernel said so.
    assert "reboot: Power down" in vm.console_text

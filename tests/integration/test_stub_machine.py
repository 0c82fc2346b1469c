"""The whole VMM on real KVM with hand-assembled stub kernels (tests/stubkernel.py).

Each test boots a stub that talks to the machine only through port I/O, through the
`pyvmm run` command line or through `pyvmm.VM` and QMP, so a run takes about half a
second. Skipped only where /dev/kvm is missing or not readable and writable.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from pyvmm import VM
from tests import stubkernel

KVM = "/dev/kvm"
if not os.path.exists(KVM):
    _skip_reason = f"{KVM} does not exist on this host"
elif not os.access(KVM, os.R_OK | os.W_OK):
    _skip_reason = f"{KVM} is not readable and writable by this user (os.access R_OK|W_OK failed)"
else:
    _skip_reason = ""
pytestmark = pytest.mark.skipif(bool(_skip_reason), reason=_skip_reason)

REPO = Path(__file__).resolve().parents[2]
EXIT_USAGE = 2
CLI_TIMEOUT = 60  # generous: a shared 2-core machine; a normal run takes under a second
EVENT_TIMEOUT = 10


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "pyvmm.cli", "run", *args], cwd=REPO, env=env,
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=CLI_TIMEOUT)


def assert_clean(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert b"Traceback" not in proc.stderr


@pytest.fixture
def hello(tmp_path: Path) -> Path:
    return stubkernel.hello_poweroff(tmp_path / "hello.elf")


# ------------------------------------------------------------------------------ CLI


def test_hello_prints_and_powers_off(hello: Path) -> None:
    proc = run_cli("--kernel", str(hello), "--memory", "64M")
    assert_clean(proc)
    assert proc.stdout == b"hi\n"


def test_reset_with_no_reboot_exits_zero(tmp_path: Path) -> None:
    stub = stubkernel.write_stub(tmp_path / "reset.elf", stubkernel.print_code(b"R") + stubkernel.reset_code())
    proc = run_cli("--kernel", str(stub), "--memory", "64M", "--no-reboot")
    assert_clean(proc)
    assert proc.stdout == b"R", "the guest must not run again after its reset"


def test_i8042_reset_with_no_reboot_exits_zero(tmp_path: Path) -> None:
    code = stubkernel.print_code(b"K") + stubkernel.out_code(0x64, 0xFE) + stubkernel.HLT_LOOP
    stub = stubkernel.write_stub(tmp_path / "kbdreset.elf", code)
    proc = run_cli("--kernel", str(stub), "--memory", "64M", "--no-reboot")
    assert_clean(proc)
    assert proc.stdout == b"K"


def test_two_vcpus_still_boot(hello: Path) -> None:
    proc = run_cli("--kernel", str(hello), "--memory", "64M", "--cpus", "2")
    assert_clean(proc)
    assert proc.stdout == b"hi\n"


def test_memory_above_the_hole_still_boots(hello: Path) -> None:
    proc = run_cli("--kernel", str(hello), "--memory", "3200M")  # 128 MiB of it from 4 GiB up
    assert_clean(proc)
    assert proc.stdout == b"hi\n"


def test_int3_is_delivered_to_the_guest_idt(tmp_path: Path) -> None:
    """The #BP handler prints B and returns after the int3; then A; then power-off.

    "BA" proves #BP reached the guest's IDT with the return RIP after the int3 (a wrong
    RIP loops printing B, or skips A); on PVM this goes through the emulation assist.
    """
    stub = stubkernel.write_stub(tmp_path / "int3.elf", stubkernel.int3_code())
    proc = run_cli("--kernel", str(stub), "--memory", "64M")
    assert_clean(proc)
    assert proc.stdout == b"BA"


def test_trace_file_of_a_run_with_memory_devices(hello: Path, tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    proc = run_cli("--kernel", str(hello), "--memory", "64M", "--trace", str(trace),
                   "--virtio-mem", "id=vm0,size=512M,requested-size=128M",
                   "--hv-balloon", "id=hvb0,memdev-size=256M")
    assert_clean(proc)
    events = [json.loads(line) for line in trace.read_text().splitlines()]
    assert events[0]["ev"] == "trace-start" and events[-1] == {"t": events[-1]["t"], "ev": "trace-end", "dropped": 0}
    by_ev = {e["ev"]: e for e in events}
    assert by_ev["memslot.add"]["owner"] == "ram" and by_ev["memslot.add"]["size"] == 64 << 20
    vm0 = by_ev["virtio-mem.device"]
    assert (vm0["id"], vm0["region-size"], vm0["requested-size"]) == ("vm0", 512 << 20, 128 << 20)
    assert by_ev["virtio-mem.requested-size"] == {"t": by_ev["virtio-mem.requested-size"]["t"],
                                                  "ev": "virtio-mem.requested-size", "id": "vm0", "size": 128 << 20}
    hvb = by_ev["hv-balloon.device"]
    # the hot-add region sits above the virtio-mem region
    assert hvb["memdev-size"] == 256 << 20 and hvb["hot-add-addr"] >= vm0["addr"] + vm0["region-size"]
    assert by_ev["hv-balloon.state"]["actual"] == 64 << 20


def _damaged_elf(tmp_path: Path) -> Path:
    image = bytearray(stubkernel.elf(stubkernel.poweroff_code()))
    struct.pack_into("<Q", image, 64 + 8, 1 << 63)  # program header p_offset far beyond any file
    path = tmp_path / "damaged.elf"
    path.write_bytes(bytes(image))
    return path


USAGE_ERRORS = {
    "too-many-cpus": lambda tmp, hello: ["--kernel", str(hello), "--cpus", "9"],
    "bad-memory-size": lambda tmp, hello: ["--kernel", str(hello), "--memory", "12Q"],
    "missing-kernel": lambda tmp, hello: ["--kernel", str(tmp / "nosuch")],
    "text-file-kernel": lambda tmp, hello: ["--kernel", str(_text_file(tmp))],
    "unknown-cpu-feature": lambda tmp, hello: ["--kernel", str(hello), "--cpu-features", "+nosuch"],
    "directory-kernel": lambda tmp, hello: ["--kernel", str(tmp)],
    "damaged-elf-kernel": lambda tmp, hello: ["--kernel", str(_damaged_elf(tmp))],
}


def _text_file(tmp_path: Path) -> Path:
    path = tmp_path / "README.txt"
    path.write_text("not a kernel\n")
    return path


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_usage_errors_are_one_line_and_exit_2(tmp_path: Path, hello: Path, case: str) -> None:
    proc = run_cli(*USAGE_ERRORS[case](tmp_path, hello))
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == EXIT_USAGE, err
    assert "Traceback" not in err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("pyvmm: error:"), err
    assert proc.stdout == b""


# ------------------------------------------------------------------------------ pyvmm.VM + QMP


def _vm(stub: Path) -> VM:
    return VM(memory="64M", kernel=stub, agent=False, boot_timeout=30)


def _status(vm: VM) -> dict:
    return vm.qmp.execute("query-status")


def _console_len_settled(vm: VM, quiet: float = 0.3, timeout: float = 5.0) -> int:
    """Console length once no output has arrived for `quiet` seconds."""
    deadline = time.monotonic() + timeout
    last = vm.console_offset
    while time.monotonic() < deadline:
        time.sleep(quiet)
        now = vm.console_offset
        if now == last:
            return now
        last = now
    raise AssertionError("the console never went quiet")


def test_qmp_pause_resume_reset_quit(tmp_path: Path) -> None:
    """A guest that writes '.' to the UART forever: its output shows when it runs."""
    code = (stubkernel.print_code(b"up\n") + stubkernel.out_code(stubkernel.UNCLAIMED_PORT, 0x42, times=3)
            + stubkernel.console_flood_code())
    stub = stubkernel.write_stub(tmp_path / "flood.elf", code)
    with _vm(stub) as vm:
        vm.wait_console(r"up\n\.{100}", timeout=EVENT_TIMEOUT)
        assert (_status(vm)["status"], _status(vm)["running"]) == ("running", True)
        stats = vm.qmp.execute("query-vm-stats")
        assert stats["exits"]["io"] > 100
        assert stats["pio"]["unclaimed-accesses"] == 3 and stats["pio"]["unclaimed-addresses"] == 1

        vm.qmp.execute("stop")
        vm.qmp.wait_event("STOP", EVENT_TIMEOUT)
        assert (_status(vm)["status"], _status(vm)["running"]) == ("paused", False)
        paused_at = _console_len_settled(vm)
        io_paused = vm.qmp.execute("query-vm-stats")["exits"]["io"]
        time.sleep(0.5)
        assert vm.console_offset == paused_at, "a paused guest kept writing"
        assert vm.qmp.execute("query-vm-stats")["exits"]["io"] == io_paused

        vm.qmp.execute("cont")
        vm.qmp.wait_event("RESUME", EVENT_TIMEOUT)
        assert _status(vm)["status"] == "running"
        vm.wait_console(r"\.{100}", timeout=EVENT_TIMEOUT, start=paused_at)

        before_reset = vm.console_offset
        vm.qmp.execute("system_reset")
        vm.qmp.wait_event("RESET", EVENT_TIMEOUT)
        vm.wait_console(r"up\n", timeout=EVENT_TIMEOUT, start=before_reset)  # the stub ran again
        assert _status(vm)["status"] == "running"
        assert vm.qmp.execute("query-vm-stats")["resets"] == 1

        assert vm.qmp.execute("quit") == {}
        assert vm.wait_exit(EVENT_TIMEOUT) == 0


def test_qmp_system_reset_event_says_who_reset(tmp_path: Path) -> None:
    """As in QEMU, a QMP system_reset is reported as a host request, not a guest reset."""
    stub = stubkernel.write_stub(tmp_path / "idle.elf", stubkernel.print_code(b"up\n") + stubkernel.HLT_LOOP)
    with _vm(stub) as vm:
        vm.wait_console(r"up\n", timeout=EVENT_TIMEOUT)
        vm.qmp.execute("system_reset")
        event = vm.qmp.wait_event("RESET", EVENT_TIMEOUT)
        assert event["data"] == {"guest": False, "reason": "host-qmp-system-reset"}


def test_guest_reset_reboots_the_stub(tmp_path: Path) -> None:
    stub = stubkernel.write_stub(tmp_path / "reboot.elf", stubkernel.print_code(b"boot\n") + stubkernel.reset_code())
    with _vm(stub) as vm:
        for _ in range(2):
            event = vm.qmp.wait_event("RESET", EVENT_TIMEOUT)
            assert event["data"]["guest"] is True
        vm.wait_console(r"(boot\n){3}", timeout=EVENT_TIMEOUT)
        assert vm.qmp.execute("query-vm-stats")["resets"] >= 2
        vm.qmp.execute("quit")
        assert vm.wait_exit(EVENT_TIMEOUT) == 0


def test_int3_assist_is_counted(tmp_path: Path) -> None:
    """On a host whose KVM emulates CPL0 code (PVM), int3 reaches the assist: one completion
    and one injected #BP. On VMX/SVM int3 runs natively and never exits."""
    code = stubkernel.int3_code(then=stubkernel.print_code(b"\n") + stubkernel.HLT_LOOP)
    stub = stubkernel.write_stub(tmp_path / "int3-alive.elf", code)
    with _vm(stub) as vm:
        vm.wait_console(r"BA\n", timeout=EVENT_TIMEOUT)
        assists = vm.qmp.execute("query-vm-stats")["assists"]
        if not Path("/sys/module/kvm_pvm").exists():
            assert assists.get("int3", 0) == 0
            pytest.skip("this host's KVM runs int3 natively: no assist to count")
        assert assists.get("int3") == 1 and assists.get("inject:#BP") == 1, assists
        assert assists.get("failed", 0) == 0
        assert vm.console_text.count("B") == 1


# ------------------------------------------------------------------------------ ACPI


def _acpi_tables(machine) -> dict[str, bytes]:
    """Follow the RSDP the machine wrote into guest memory to each XSDT table."""
    from vmm.machine import ACPI_TABLES_ADDR
    read = machine.memory.read
    xsdt_addr = struct.unpack("<Q", read(ACPI_TABLES_ADDR + 24, 8))[0]
    xsdt_len = struct.unpack("<I", read(xsdt_addr + 4, 4))[0]
    tables = {}
    for addr in struct.unpack(f"<{(xsdt_len - 36) // 8}Q", read(xsdt_addr + 36, xsdt_len - 36)):
        length = struct.unpack("<I", read(addr + 4, 4))[0]
        table = read(addr, length)
        tables[table[:4].decode()] = table
    return tables


@pytest.mark.parametrize("node", [None, 1])
def test_srat_exactly_when_a_virtio_mem_device_names_a_node(tmp_path: Path, node) -> None:
    """node= makes the device offer VIRTIO_MEM_F_ACPI_PXM, so the guest needs an SRAT that
    defines that proximity domain: the region, hot-pluggable, in domain `node`."""
    from vmm.device_options import parse_virtio_mem
    from vmm.machine import Machine, MachineConfig
    kernel = stubkernel.hello_poweroff(tmp_path / "hello.elf")
    opts = "id=vm0,size=1G" + (f",node={node}" if node is not None else "")
    machine = Machine(MachineConfig(kernel=kernel, memory=64 << 20, virtio_mem=[parse_virtio_mem(opts)]))
    try:
        tables = _acpi_tables(machine)
        dev = machine.virtio_mem["vm0"]
        if node is None:
            assert "SRAT" not in tables
            return
        srat = tables["SRAT"]
        assert sum(srat) % 256 == 0
        mems, off = [], 48
        while off < len(srat):
            if srat[off] == 1:
                dom, _, base, size, _, flags = struct.unpack_from("<IHQQII", srat, off + 2)
                mems.append((base, size, dom, flags))
            off += srat[off + 1]
        assert mems == [(0, 64 << 20, 0, 1), (dev.addr, dev.region_size, 1, 3)]
    finally:
        machine.close()


def _load_abs(gpa: int, wide: bool) -> bytes:
    """movabs rax, [gpa] (wide) or movabs al, [gpa]: a guest read of an absolute address."""
    return (b"\x48\xa1" if wide else b"\xa0") + struct.pack("<Q", gpa)


def test_guest_touching_virtio_mem_memory_on_real_kvm(tmp_path: Path, monkeypatch) -> None:
    """The three ways a guest reaches a virtio-mem region, on real KVM with a stub guest:

    * a plugged block whose pages the host has not opened yet (here: mprotect refused after
      the PLUG's answer) is opened when the vCPU touches it, and the access completes;
    * an unplugged block in a slot with no memslot exits to the MMIO trap: all-ones, reported;
    * an unplugged block inside a registered slot (PROT_NONE) is reported, and the VM stops
      where KVM could not map it (EFAULT), or, where KVM emulates the access (a PVM host
      interprets guest kernel code), the trap answers it like the previous case.
    """
    from devices.virtio.mem import VIRTIO_MEM_REQ_PLUG, VIRTIO_MEM_RESP_ACK
    from vmm.device_options import parse_virtio_mem
    from vmm.machine import Machine, MachineConfig
    from vmm.hostmem import HostMemoryError

    from vmm.boot.cpu_setup import PDPT_ADDR, PTE_PRESENT, PTE_PS, PTE_RW

    console, events = bytearray(), []
    region = 4 << 30  # above the 32-bit hole; slots of 128 MiB, blocks of 2 MiB
    plugged, unplugged_unmapped, unplugged_mapped = region, region + (128 << 20), region + (2 << 20)
    code = (stubkernel.print_code(b"a") + _load_abs(plugged, True) + stubkernel.print_code(b"b")
            + _load_abs(unplugged_unmapped, False) + b"\x66\xba" + struct.pack("<H", stubkernel.COM1)
            + stubkernel.OUT_DX_AL + stubkernel.print_code(b"c") + _load_abs(unplugged_mapped, True)
            + stubkernel.print_code(b"d") + stubkernel.poweroff_code())
    kernel = stubkernel.write_stub(tmp_path / "touch.elf", code)
    machine = Machine(MachineConfig(kernel=kernel, memory=64 << 20, console_output=console.extend,
                                    virtio_mem=[parse_virtio_mem("id=vm0,size=1G,requested-size=8M")]))
    try:
        dev = machine.virtio_mem["vm0"]
        assert dev.addr == region
        # The boot page tables map the first 4 GiB: identity-map the fifth for the stub too.
        pd = stubkernel.LOAD_ADDR + (1 << 20)
        machine.memory.write(pd, b"".join(struct.pack("<Q", region + (i << 21) | PTE_PRESENT | PTE_RW | PTE_PS)
                                          for i in range(512)))
        machine.memory.write(PDPT_ADDR + 8 * 4, struct.pack("<Q", pd | PTE_PRESENT | PTE_RW))
        machine.add_event_listener(lambda name, data: events.append((name, data)))
        protect = dev.mapping.protect

        def refuse_open(offset: int, size: int, accessible: bool) -> None:
            if accessible:
                raise HostMemoryError("mprotect failed: Cannot allocate memory")
            protect(offset, size, accessible)
        monkeypatch.setattr(dev.mapping, "protect", refuse_open)
        assert dev.handle_request(VIRTIO_MEM_REQ_PLUG, plugged, 1)[0] == VIRTIO_MEM_RESP_ACK
        monkeypatch.undo()
        assert dev.stats()["plugged-inaccessible"] == 1 and dev.slots.is_mapped(0)

        accesses = lambda: [d for n, d in events if n == "PYVMM_UNPLUGGED_MEMORY_ACCESS"]  # noqa: E731
        status_at_end: list[str] = []

        def watch() -> None:
            """Wait for both reports; quit a VM they stopped (the main thread runs the machine)."""
            deadline = time.monotonic() + CLI_TIMEOUT
            while (len(accesses()) < 2 and machine.status() not in ("paused", "shutdown")
                   and time.monotonic() < deadline):
                time.sleep(0.05)
            if accesses()[1:] and accesses()[1]["kind"] == "fault":
                while machine.status() != "paused" and time.monotonic() < deadline:
                    time.sleep(0.05)
            status_at_end.append(machine.status())
            if machine.status() != "shutdown":
                machine.quit()
        threading.Thread(target=watch, daemon=True).start()
        assert machine.run() == 0  # KVM_RUN needs the kick signal handler of the main thread

        first, second = accesses()
        assert (first["gpa"], first["kind"], first["slot-mapped"]) == (unplugged_unmapped, "read", False)
        assert (second["gpa"], second["slot-mapped"]) == (unplugged_mapped, True)
        stats = dev.stats()
        assert stats["plugged-inaccessible"] == 0 and stats["unplugged-accesses"] == 2
        if second["kind"] == "fault":  # KVM could not map it: the VM stopped there
            assert status_at_end == ["paused"] and bytes(console) == b"ab\xffc"
        else:  # KVM emulated the access and the trap answered it
            assert second["kind"] == "read" and bytes(console) == b"ab\xffcd"
    finally:
        machine.close()

"""virtio-mem: plug/unplug throughput against QEMU, host time per request, and start-up cost.

Throughput is measured the same way for both VMMs, through the same qemu.qmp client: from the
`qom-set` of requested-size until `query-memory-devices` reports `size == requested-size`
(the guest driver has plugged or unplugged every block). Same guest kernel, initramfs and
command line. QEMU has no virtio-mmio virtio-mem, so it runs `virtio-mem-pci` on q35 (qboot
firmware, PVH entry of the same vmlinux), which the default guest kernel supports for this
purpose.

Start-up cost: a stub guest that prints a marker and spins, with and without a 1 TiB
virtio-mem device: time to the marker, the VMM's RSS, and the KVM memslots registered.
"""

from __future__ import annotations

import asyncio
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from qemu.qmp import QMPClient  # noqa: E402

import guest_images  # noqa: E402
import handler_floor  # noqa: E402
import pyvmm  # noqa: E402
from boot import QEMU_ONLY_PARAMS  # noqa: E402
from tests.stubkernel import JMP_SELF, print_code, write_stub  # noqa: E402

MiB = 1 << 20
PLUG_SIZE = 512 * MiB
DEVICE_SIZE = "2G"
MEMORY = "256M"
PROMPT = re.compile(rb"guest:.*# ")
BOOT_TIMEOUT = 900.0
RESIZE_TIMEOUT = 900.0
POLL_S = 0.1


async def _resize(qmp_path: Path, dev: str, size: int) -> float:
    """Seconds from qom-set until the device reports `size` plugged."""
    client = QMPClient("bench")
    await client.connect(str(qmp_path))
    try:
        t0 = time.monotonic()
        await client.execute("qom-set", {"path": f"/machine/peripheral/{dev}", "property": "requested-size",
                                         "value": size})
        while True:
            devices = await client.execute("query-memory-devices")
            if next(d["data"]["size"] for d in devices if d["data"]["id"] == dev) == size:
                return time.monotonic() - t0
            if time.monotonic() - t0 > RESIZE_TIMEOUT:
                raise RuntimeError(f"{dev} did not reach {size} bytes plugged")
            await asyncio.sleep(POLL_S)
    finally:
        await client.disconnect()


def plug_cycle(qmp_path: Path, cycles: int) -> tuple[list[float], list[float]]:
    plug, unplug = [], []
    for _ in range(cycles):
        plug.append(asyncio.run(_resize(qmp_path, "vm0", PLUG_SIZE)))
        unplug.append(asyncio.run(_resize(qmp_path, "vm0", 0)))
    return plug, unplug


def pyvmm_run(cycles: int) -> dict:
    with pyvmm.VM(memory=MEMORY, agent=False, boot_timeout=BOOT_TIMEOUT,
                  virtio_mem=[f"id=vm0,size={DEVICE_SIZE}"]) as vm:
        vm.wait_console(PROMPT.pattern.decode(), timeout=BOOT_TIMEOUT)
        cmdline = re.search(r"Command line: (.*?)\r?\n", vm.console_text).group(1)
        plug, unplug = plug_cycle(vm.qmp_path, cycles)
        stats = vm.qmp.execute("query-vm-stats")["virtio-mem"]["vm0"]
        vm.qmp.execute("quit")
    return {"plug": plug, "unplug": unplug, "request-time-us": stats["request-time-us"],
            "after-answer-us": stats["after-answer-us"],
            "slot-adds": stats["slot-adds"], "slot-removes": stats["slot-removes"],
            "slot-size": stats["slot-size"], "cmdline": cmdline}


def qemu_argv(img, cmdline: str, qmp_path: Path, trace_log: Path) -> list[str]:
    return ["qemu-system-x86_64",
            # QEMU's own trace points time its requests: each virtio-mem request is one
            # virtqueue_pop ... virtqueue_flush pair (-msg timestamp=on stamps them in µs).
            "-trace", "virtqueue_pop", "-trace", "virtqueue_flush", "-msg", "timestamp=on", "-D", str(trace_log), "-M", "q35,smbus=off,sata=off", "-bios", "/usr/share/qemu/qboot.rom",
            "-accel", "kvm", "-cpu", "host,-arch-capabilities", "-m", f"{MEMORY},maxmem=4G,slots=1",
            "-smp", "1", "-nodefaults", "-no-user-config", "-nographic", "-serial", "stdio",
            "-object", f"memory-backend-ram,id=mem0,size={DEVICE_SIZE}",
            "-device", "virtio-mem-pci,id=vm0,memdev=mem0,block-size=2M,requested-size=0",
            "-qmp", f"unix:{qmp_path},server=on,wait=off",
            "-kernel", str(img.vmlinux), "-initrd", str(img.initramfs), "-append", f"{cmdline} {QEMU_ONLY_PARAMS}"]


_TRACE_LINE = re.compile(r"@(\d+)\.(\d{6}):(virtqueue_pop|virtqueue_flush) ")


def qemu_request_times_us(trace: str) -> list[float]:
    """Per-request host time from QEMU's log-backend trace: each virtqueue_pop to the
    virtqueue_flush that returns it (virtio-mem answers one request at a time)."""
    times, popped = [], None
    for m in _TRACE_LINE.finditer(trace):
        t = int(m.group(1)) * 1_000_000 + int(m.group(2))
        if m.group(3) == "virtqueue_pop":
            popped = t
        elif popped is not None:
            times.append(float(t - popped))
            popped = None
    return times


def qemu_run(cmdline: str, cycles: int) -> dict:
    img = guest_images.default_image()
    with tempfile.TemporaryDirectory() as d:
        qmp_path = Path(d) / "qmp.sock"
        console = Path(d) / "console.log"
        trace_log = Path(d) / "trace.log"
        with open(console, "wb") as out:
            proc = subprocess.Popen(qemu_argv(img, cmdline, qmp_path, trace_log), stdin=subprocess.DEVNULL,
                                    stdout=out, stderr=subprocess.STDOUT)
        try:
            t0 = time.monotonic()
            while not PROMPT.search(console.read_bytes()):
                if proc.poll() is not None or time.monotonic() - t0 > BOOT_TIMEOUT:
                    raise RuntimeError("QEMU guest did not reach its shell:\n"
                                       + console.read_bytes()[-1500:].decode(errors="replace"))
                time.sleep(0.5)
            start = trace_log.stat().st_size if trace_log.exists() else 0  # skip the driver's start-up
            plug, unplug = plug_cycle(qmp_path, cycles)
            with open(trace_log, "rb") as f:
                f.seek(start)
                request_us = qemu_request_times_us(f.read().decode(errors="replace"))
        finally:
            proc.kill()
            proc.wait()
    if not request_us:
        raise RuntimeError("QEMU's trace has no virtqueue_pop/virtqueue_flush pairs (is its log trace backend built in?)")
    return {"plug": plug, "unplug": unplug, "request-us": request_us}


def throughput(cycles: int = 3) -> dict:
    py = pyvmm_run(cycles)
    qemu = qemu_run(py["cmdline"], cycles)
    gib = PLUG_SIZE / (1 << 30)
    out = {"pyvmm": py, "qemu": qemu, "size": PLUG_SIZE,
           "rig-us": {"warm": request_cost_rig(0.0), "idle": request_cost_rig(RIG_IDLE_S)},
           "floor-us": {lang: {"warm": floor(0.0), "idle": floor(RIG_IDLE_S)}
                        for lang, floor in (("python", handler_floor.handler_floor_us),
                                            ("c", handler_floor.c_handler_floor_us))}}
    for who in (py, qemu):
        who["plug-gib-s"] = gib / statistics.median(who["plug"])
        who["unplug-gib-s"] = gib / statistics.median(who["unplug"])
    return out


RIG_REQUESTS = 64
RIG_IDLE_S = 0.02


def request_cost_rig(idle_s: float) -> float:
    """Median host time per request of the same device code with no guest: a driver model in
    the test suite's bytearray memory sends PLUG/UNPLUG of 64 blocks, `idle_s` apart (0: back
    to back, the code warm in the CPU caches). The device is woken as in a VM: through the
    eventfd that `bind_ioeventfds` would hand to KVM, served by pyvmm's event loop; the rig
    signals that eventfd itself and waits for the device's interrupt."""
    from devices.virtio.event_loop import EventLoop
    from devices.virtio.mem import REQ_FORMAT, RESP_FORMAT, VIRTIO_MEM_REQ_PLUG, VIRTIO_MEM_REQ_UNPLUG, VirtioMem
    from devices.virtio.mmio import VirtioMmioTransport, bind_ioeventfds
    from tests.virtio_driver import ALL_FEATURES, VirtioMmioDriver, make_guest_memory
    from vmm.memory import STABLE_OWNER

    class NoKvm:
        """Takes the ioeventfds KVM would be given, so that the rig can signal them."""

        def __init__(self) -> None:
            self.kicks: dict[int, int] = {}

        def ioeventfd(self, fd: int, addr: int, length: int, datamatch: int, deassign: bool = False) -> None:
            self.kicks[datamatch] = fd

    mem = make_guest_memory(((0, 1 * MiB),), owner=STABLE_OWNER)
    dev = VirtioMem("rig", 128 * MiB, 1024 * MiB, memslots=mem.slots, requested_size=1024 * MiB)
    loop, kvm, irq = EventLoop("rig"), NoKvm(), os.eventfd(0)
    transport = VirtioMmioTransport(dev, mem, lambda: os.eventfd_write(irq, 1), "rig")
    unbind = bind_ioeventfds(transport, kvm, 0, loop)
    try:
        [vq] = VirtioMmioDriver(transport, mem).init(ALL_FEATURES)
        loop.start()
        blocks = 64
        for i in range(RIG_REQUESTS):
            first = (i // 2) % 8 * blocks
            req_type = VIRTIO_MEM_REQ_PLUG if i % 2 == 0 else VIRTIO_MEM_REQ_UNPLUG
            vq.add([REQ_FORMAT.pack(req_type, dev.addr + first * dev.block_size, blocks)], [RESP_FORMAT.size])
            time.sleep(idle_s)
            os.eventfd_write(kvm.kicks[0], 1)
            os.eventfd_read(irq)
            [used] = vq.get_used()
            if RESP_FORMAT.unpack(used.data)[0] != 0:
                raise RuntimeError(f"the rig's request {i} was not acknowledged")
        return dev.stats()["request-time-us"]["p50"]
    finally:
        loop.stop()
        unbind()
        loop.close()
        os.close(irq)
        dev.close()


def _vm_rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def startup_cost(repeat: int = 3) -> dict:
    """Stub guest up to its marker, without and with a 1 TiB virtio-mem device."""
    with tempfile.TemporaryDirectory() as d:
        kernel = write_stub(Path(d) / "spin.elf", print_code(b"up\n") + JMP_SELF)
        results: dict[str, list[tuple[float, int, int]]] = {"without": [], "with 1 TiB virtio-mem": []}
        for _ in range(repeat):
            for name, devices in (("without", []), ("with 1 TiB virtio-mem", ["id=big,size=1T"])):
                t0 = time.monotonic()
                with pyvmm.VM(memory="256M", kernel=kernel, agent=False, virtio_mem=devices) as vm:
                    vm.wait_console("up", timeout=60)
                    elapsed = time.monotonic() - t0
                    slots = vm.qmp.execute("query-vm-stats")["memslots"]["count"]
                    results[name].append((elapsed, _vm_rss(vm.pid), slots))
                    vm.qmp.execute("quit")
    return {name: {"seconds": statistics.median(r[0] for r in runs), "rss": statistics.median(r[1] for r in runs),
                   "memslots": max(r[2] for r in runs), "runs": runs}
            for name, runs in results.items()}


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    print(startup_cost())
    print(throughput())

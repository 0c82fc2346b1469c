"""Places virtio-mmio devices in the guest: MMIO window, interrupt, queue notifications, ACPI.

Each device gets a 4 KiB window from VIRTIO_MMIO_BASE up and an IOAPIC pin of its own. Its
interrupt is an irqfd (an eventfd write raises the pin inside KVM, no exit) and its queue
notifications are ioeventfds served on one event-loop thread, so neither costs a Python exit
on a vCPU thread. The DSDT describes every device as LNRO0005 with its window and interrupt,
which is how an ACPI guest finds them; `virtio_mmio.device=` command-line entries are for a
guest that runs with `acpi=off` (legacy PIC numbering, where an IRQ number is a pin number).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

from bus import Bus
from devices.virtio.device import VirtioDevice
from devices.virtio.event_loop import EventLoop
from devices.virtio.mmio import VirtioMmioTransport, bind_ioeventfds
from firmware.acpi import AcpiDevice
from vmm.memory import GuestMemory

VIRTIO_MMIO_BASE = 0xD000_0000
VIRTIO_MMIO_STRIDE = 0x1000
VIRTIO_MMIO_HID = "LNRO0005"
# IOAPIC pins 5–15 (no legacy device of ours uses them) and 16–22; 23 is the GED.
VIRTIO_GSIS = tuple(range(5, 16)) + tuple(range(16, 23))


class PlacementError(Exception):
    """No room for another virtio-mmio device."""


@dataclass
class PlacedDevice:
    name: str
    device: VirtioDevice
    transport: VirtioMmioTransport
    base: int
    gsi: int
    irq_fd: int
    unbind: Callable[[], None]

    def cmdline_entry(self) -> str:
        return f"virtio_mmio.device=4K@{self.base:#x}:{self.gsi}"

    def acpi_device(self, index: int) -> AcpiDevice:
        return AcpiDevice(name=f"VR{index:02X}", hid=VIRTIO_MMIO_HID, uid=index,
                          mmio=[(self.base, VIRTIO_MMIO_STRIDE)], irqs=[self.gsi], cca=True)


class VirtioPlacement:
    def __init__(self, vm, mmio: Bus, memory: GuestMemory) -> None:
        self._vm = vm
        self._mmio = mmio
        self._memory = memory
        self.loop = EventLoop("virtio-events")
        self.devices: list[PlacedDevice] = []

    def add(self, device: VirtioDevice, name: str) -> PlacedDevice:
        index = len(self.devices)
        if index >= len(VIRTIO_GSIS):
            raise PlacementError(f"at most {len(VIRTIO_GSIS)} virtio-mmio devices fit")
        base = VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_STRIDE
        gsi = VIRTIO_GSIS[index]
        irq_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._vm.irqfd(irq_fd, gsi)
        transport = VirtioMmioTransport(device, self._memory, lambda: os.eventfd_write(irq_fd, 1), name)
        self._mmio.register(base, VIRTIO_MMIO_STRIDE, transport, name)
        unbind = bind_ioeventfds(transport, self._vm, base, self.loop)
        placed = PlacedDevice(name, device, transport, base, gsi, irq_fd, unbind)
        self.devices.append(placed)
        return placed

    def start(self) -> None:
        if self.devices and not self.loop.running:
            self.loop.start()

    def acpi_devices(self) -> list[AcpiDevice]:
        return [d.acpi_device(i) for i, d in enumerate(self.devices)]

    def cmdline_entries(self) -> list[str]:
        return [d.cmdline_entry() for d in self.devices]

    def reset(self) -> None:
        for d in self.devices:
            d.transport.reset()

    def stats(self) -> dict:
        return {d.name: d.transport.stats() for d in self.devices}

    def close(self) -> None:
        for d in self.devices:
            d.unbind()
            try:
                self._vm.irqfd(d.irq_fd, d.gsi, deassign=True)
            except OSError:
                pass
            os.close(d.irq_fd)
        self.loop.close()

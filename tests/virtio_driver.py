"""A virtio-mmio *driver* model for device tests: the guest side of virtio, in Python.

It drives a virtio-mmio BusDevice (e.g. ``VirtioMmioTransport(my_device, mem, irq, "t")``)
through its registers the way Linux's drivers/virtio/virtio_mmio.c and virtio_ring.c do: the
same register order for probing, feature negotiation (high word first), queue setup and
status, the same split-ring layout, kick suppression and interrupt handling. Guest memory is a
real `vmm.memory.GuestMemory` over bytearray-backed memslots, so no KVM is needed.

Typical use in a device test::

    mem = make_guest_memory()                     # 1 MiB of RAM at GPA 0
    irqs = []
    transport = VirtioMmioTransport(MyDevice(), mem, lambda: irqs.append(1), "dev0")
    drv = VirtioMmioDriver(transport, mem)
    [vq] = drv.init()                             # probe, negotiate, set up all queues, DRIVER_OK
    vq.add([request_bytes], [response_size])      # one chain: readable then writable buffers
    vq.kick()                                     # QueueNotify (or an eventfd, see `notify`)
    drv.interrupt()                               # read + ack InterruptStatus, like vm_interrupt
    [used] = vq.get_used()                        # UsedBuffer(head, length, data)

For malformed-input tests, `DriverQueue.write_desc` and `DriverQueue.publish` place raw
descriptors and avail entries, and `GuestAllocator` hands out guest-physical buffers.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from vmm.memory import GuestMemory
from vmm.memslots import MemslotManager

PAGE_SIZE = 4096
MiB = 1 << 20

# Register offsets and bits (include/uapi/linux/virtio_mmio.h, virtio_config.h, virtio_ring.h).
MAGIC_VALUE, VERSION, DEVICE_ID, VENDOR_ID = 0x000, 0x004, 0x008, 0x00C
DEVICE_FEATURES, DEVICE_FEATURES_SEL = 0x010, 0x014
DRIVER_FEATURES, DRIVER_FEATURES_SEL = 0x020, 0x024
QUEUE_SEL, QUEUE_NUM_MAX, QUEUE_NUM, QUEUE_READY, QUEUE_NOTIFY = 0x030, 0x034, 0x038, 0x044, 0x050
INTERRUPT_STATUS, INTERRUPT_ACK, STATUS = 0x060, 0x064, 0x070
QUEUE_DESC_LOW, QUEUE_DESC_HIGH = 0x080, 0x084
QUEUE_AVAIL_LOW, QUEUE_AVAIL_HIGH = 0x090, 0x094
QUEUE_USED_LOW, QUEUE_USED_HIGH = 0x0A0, 0x0A4
SHM_SEL, SHM_LEN_LOW, SHM_LEN_HIGH = 0x0AC, 0x0B0, 0x0B4
CONFIG_GENERATION, CONFIG = 0x0FC, 0x100
INT_VRING, INT_CONFIG = 1, 2
MMIO_MAGIC = 0x74726976

S_ACKNOWLEDGE, S_DRIVER, S_DRIVER_OK, S_FEATURES_OK, S_NEEDS_RESET, S_FAILED = 1, 2, 4, 8, 0x40, 0x80
F_INDIRECT_DESC, F_EVENT_IDX, F_VERSION_1 = 28, 29, 32
TRANSPORT_F_START, TRANSPORT_F_END = 28, 42
# The transport bits Linux's vring_transport_features() keeps; it clears the other ones in 28..41.
LINUX_TRANSPORT_BITS = (28, 29, 32, 33, 34, 36, 38)

DESC_F_NEXT, DESC_F_WRITE, DESC_F_INDIRECT = 1, 2, 4
AVAIL_F_NO_INTERRUPT, USED_F_NO_NOTIFY = 1, 1
DESC = struct.Struct("<QIHH")
ALL_FEATURES = (1 << 64) - 1


class DriverError(Exception):
    """What Linux would report as a probe failure or a BAD_RING."""


# --- guest memory -----------------------------------------------------------------------
class ByteMapping:
    """A `HostMapping` look-alike over a bytearray (what a memslot and GuestMemory need)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.addr = 0  # no host address: the null backend never passes it to KVM
        self.buf = bytearray(size)

    def read(self, offset: int, size: int) -> bytes:
        return bytes(self.buf[offset:offset + size])

    def write(self, offset: int, data: bytes) -> None:
        self.buf[offset:offset + len(data)] = data

    def view(self, offset: int, size: int) -> memoryview:
        return memoryview(self.buf)[offset:offset + size]


class _NullSlotBackend:
    def set_user_memory_region(self, slot: int, gpa: int, size: int, host_addr: int, flags: int = 0) -> None:
        pass


def make_guest_memory(regions: Iterable[tuple[int, int]] = ((0, MiB),), owner: str | None = None) -> GuestMemory:
    """A GuestMemory with one bytearray-backed memslot per (gpa, size); page aligned.

    `owner` names the slots' owner; "ram" (boot RAM) lets devices cache views of it."""
    slots = MemslotManager(_NullSlotBackend())
    for gpa, size in regions:
        slots.add(gpa, size, ByteMapping(size), 0, owner or f"test-ram@{gpa:#x}")
    return GuestMemory(slots)


class GuestAllocator:
    """First-fit allocator of guest-physical ranges (the driver's kmalloc/dma_alloc)."""

    def __init__(self, start: int, end: int) -> None:
        self._free: list[tuple[int, int]] = [(start, end - start)]

    @classmethod
    def for_memory(cls, mem: GuestMemory) -> "GuestAllocator":
        """All of the first memslot, except page 0 (so no buffer sits at GPA 0)."""
        first = mem.slots.slots()[0]
        return cls(first.gpa + PAGE_SIZE, first.end)

    def alloc(self, size: int, align: int = 16) -> int:
        size = max(size, 1)
        for i, (start, length) in enumerate(self._free):
            addr = -(-start // align) * align
            if addr + size <= start + length:
                pieces = [(start, addr - start), (addr + size, start + length - addr - size)]
                self._free[i:i + 1] = [p for p in pieces if p[1]]
                return addr
        raise DriverError(f"guest allocator: no room for {size} bytes")

    def free(self, addr: int, size: int) -> None:
        size = max(size, 1)
        self._free.append((addr, size))
        self._free.sort()
        merged: list[tuple[int, int]] = []
        for start, length in self._free:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((start, length))
        self._free = merged


# --- one split ring, driver side ----------------------------------------------------------
@dataclass
class UsedBuffer:
    head: int
    length: int   # what the device put in the used element
    data: bytes   # the first `length` bytes of the chain's device-writable buffers


@dataclass
class _Inflight:
    descs: list[int]
    in_bufs: list[tuple[int, int]]
    allocations: list[tuple[int, int]] = field(default_factory=list)


def _align(x: int, a: int) -> int:
    return -(-x // a) * a


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


class DriverQueue:
    """The driver side of one split virtqueue, laid out like Linux's vring_init() with
    virtio-mmio's page alignment: descriptors, then the avail ring, then (page aligned) the
    used ring. Indices are free-running 16-bit counters, as in the spec."""

    def __init__(self, mem: GuestMemory, alloc: GuestAllocator, index: int, size: int,
                 notify: Callable[[int], None], event_idx: bool = False, indirect: bool = False) -> None:
        self.mem, self.alloc, self.index, self.size = mem, alloc, index, size
        self.notify = notify
        self.event_idx = event_idx
        self.indirect = indirect  # use indirect tables for multi-buffer chains (if negotiated)
        avail_len = 6 + 2 * size
        self.ring_bytes = _align(16 * size + avail_len, PAGE_SIZE) + 6 + 8 * size
        self.desc_addr = alloc.alloc(self.ring_bytes, PAGE_SIZE)
        self.avail_addr = self.desc_addr + 16 * size
        self.used_addr = _align(self.avail_addr + avail_len, PAGE_SIZE)
        mem.write(self.desc_addr, bytes(self.ring_bytes))
        self.free_descs = list(range(size))
        self.avail_idx = 0      # shadow of avail->idx
        self.last_used = 0      # next used entry to consume
        self.num_added = 0      # since the last kick (virtqueue_kick_prepare's "old")
        self.inflight: dict[int, _Inflight] = {}
        self.avail_flags = 0

    # --- raw ring access (also for malformed-input tests) ------------------------------------
    def write_desc(self, i: int, addr: int, length: int, flags: int = 0, next: int = 0,
                   table: int | None = None) -> None:
        """Write descriptor `i` of the queue's table, or of the indirect table at `table`."""
        base = self.desc_addr if table is None else table
        self.mem.write(base + 16 * i, DESC.pack(addr, length, flags, next))

    def publish(self, head: int) -> None:
        """Put `head` in the next avail slot and advance avail->idx (no free-list bookkeeping)."""
        self.mem.write(self.avail_addr + 4 + 2 * (self.avail_idx % self.size), struct.pack("<H", head & 0xFFFF))
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.mem.write(self.avail_addr + 2, struct.pack("<H", self.avail_idx))
        self.num_added += 1

    def set_avail_idx(self, value: int) -> None:
        """Write avail->idx directly (e.g. to jump it further than the queue size)."""
        self.avail_idx = value & 0xFFFF
        self.mem.write(self.avail_addr + 2, struct.pack("<H", self.avail_idx))

    def _u16(self, gpa: int) -> int:
        return struct.unpack("<H", self.mem.read(gpa, 2))[0]

    @property
    def used_idx(self) -> int:
        return self._u16(self.used_addr + 2)

    @property
    def used_flags(self) -> int:
        return self._u16(self.used_addr)

    @property
    def avail_event(self) -> int:
        """The device's "notify me when avail->idx passes this" (VIRTIO_RING_F_EVENT_IDX)."""
        return self._u16(self.used_addr + 4 + 8 * self.size)

    def set_used_event(self, value: int) -> None:
        self.mem.write(self.avail_addr + 4 + 2 * self.size, struct.pack("<H", value & 0xFFFF))

    def disable_interrupts(self) -> None:
        """virtqueue_disable_cb: VRING_AVAIL_F_NO_INTERRUPT (ignored by devices under event idx)."""
        self.avail_flags |= AVAIL_F_NO_INTERRUPT
        self.mem.write(self.avail_addr, struct.pack("<H", self.avail_flags))

    def enable_interrupts(self) -> None:
        self.avail_flags &= ~AVAIL_F_NO_INTERRUPT
        self.mem.write(self.avail_addr, struct.pack("<H", self.avail_flags))
        if self.event_idx:
            self.set_used_event(self.last_used)

    # --- the virtqueue_add / kick / get_buf cycle -----------------------------------------
    def add(self, out: Sequence[bytes] = (), in_sizes: Sequence[int] = (), indirect: bool | None = None) -> int:
        """Make one chain available: device-readable buffers with `out`, then device-writable
        buffers of `in_sizes` bytes. Returns the head descriptor index."""
        use_indirect = self.indirect if indirect is None else indirect
        count = len(out) + len(in_sizes)
        if not count:
            raise DriverError("a chain needs at least one buffer")
        needed = 1 if use_indirect and count > 1 else count
        if needed > len(self.free_descs):
            raise DriverError(f"queue {self.index}: {needed} descriptors needed, {len(self.free_descs)} free")
        bufs: list[tuple[int, int, int]] = []  # (addr, len, flags)
        allocations = []
        for data in out:
            addr = self.alloc.alloc(len(data))
            allocations.append((addr, len(data)))
            self.mem.write(addr, data)
            bufs.append((addr, len(data), 0))
        in_bufs = []
        for n in in_sizes:
            addr = self.alloc.alloc(n)
            allocations.append((addr, n))
            self.mem.write(addr, bytes(n))
            bufs.append((addr, n, DESC_F_WRITE))
            in_bufs.append((addr, n))
        if use_indirect and len(bufs) > 1:
            table = self.alloc.alloc(16 * len(bufs))
            allocations.append((table, 16 * len(bufs)))
            for i, (addr, n, flags) in enumerate(bufs):
                more = DESC_F_NEXT if i + 1 < len(bufs) else 0
                self.write_desc(i, addr, n, flags | more, i + 1 if more else 0, table=table)
            bufs = [(table, 16 * len(bufs), DESC_F_INDIRECT)]
        descs = [self.free_descs.pop(0) for _ in bufs]
        for i, (addr, n, flags) in enumerate(bufs):
            more = i + 1 < len(bufs)
            self.write_desc(descs[i], addr, n, flags | (DESC_F_NEXT if more else 0), descs[i + 1] if more else 0)
        self.inflight[descs[0]] = _Inflight(descs, in_bufs, allocations)
        self.publish(descs[0])
        return descs[0]

    def kick(self) -> bool:
        """virtqueue_kick: notify the device unless it asked not to be (NO_NOTIFY / avail_event)."""
        new, old = self.avail_idx, (self.avail_idx - self.num_added) & 0xFFFF
        self.num_added = 0
        if self.event_idx:
            needed = vring_need_event(self.avail_event, new, old)
        else:
            needed = not self.used_flags & USED_F_NO_NOTIFY
        if needed:
            self.notify(self.index)
        return needed

    def get_used(self) -> list[UsedBuffer]:
        """virtqueue_get_buf, repeated: everything the device returned since the last call."""
        out = []
        end = self.used_idx
        while self.last_used != end:
            slot = self.last_used % self.size
            head, length = struct.unpack("<II", self.mem.read(self.used_addr + 4 + 8 * slot, 8))
            entry = self.inflight.pop(head, None)
            if entry is None:
                raise DriverError(f"queue {self.index}: device returned head {head}, which is not in flight")
            capacity = sum(n for _, n in entry.in_bufs)
            if length > capacity:
                raise DriverError(f"queue {self.index}: used len {length} exceeds the {capacity} writable bytes")
            data, left = b"", length
            for addr, n in entry.in_bufs:
                take = min(n, left)
                data += self.mem.read(addr, take)
                left -= take
            out.append(UsedBuffer(head, length, data))
            self.free_descs.extend(entry.descs)
            for addr, n in entry.allocations:
                self.alloc.free(addr, n)
            self.last_used = (self.last_used + 1) & 0xFFFF
        if self.event_idx and not self.avail_flags & AVAIL_F_NO_INTERRUPT:
            self.set_used_event(self.last_used)
        return out


# --- the device, through its registers ----------------------------------------------------
@dataclass
class DeviceIdentity:
    version: int
    device_id: int
    vendor_id: int


class VirtioMmioDriver:
    """Linux's virtio_mmio + virtio core, reduced to what a device test needs.

    `dev` is the BusDevice (offsets relative to its base). `notify(index)` is how a kick
    reaches the device: by default a QueueNotify register write; pass e.g.
    ``lambda i: os.eventfd_write(fds[i], 1)`` to go through ioeventfds instead.
    """

    def __init__(self, dev, mem: GuestMemory, alloc: GuestAllocator | None = None,
                 notify: Callable[[int], None] | None = None) -> None:
        self.dev = dev
        self.mem = mem
        self.alloc = alloc or GuestAllocator.for_memory(mem)
        self.notify = notify or (lambda index: self.writel(QUEUE_NOTIFY, index))
        self.features = 0
        self.queues: list[DriverQueue] = []

    # --- register access: readl/writel ----------------------------------------------------
    def readl(self, offset: int) -> int:
        return int.from_bytes(self.dev.read(offset, 4), "little")

    def writel(self, offset: int, value: int) -> None:
        self.dev.write(offset, (value & 0xFFFF_FFFF).to_bytes(4, "little"))

    # --- probe, status, features ----------------------------------------------------------
    def probe(self) -> DeviceIdentity:
        """virtio_mmio_probe: magic, version, device id (0 = placeholder), vendor."""
        magic = self.readl(MAGIC_VALUE)
        if magic != MMIO_MAGIC:
            raise DriverError(f"wrong magic value {magic:#010x}")
        version = self.readl(VERSION)
        if version not in (1, 2):
            raise DriverError(f"version {version} not supported")
        device_id = self.readl(DEVICE_ID)
        if device_id == 0:
            raise DriverError("device id 0: a placeholder")
        return DeviceIdentity(version, device_id, self.readl(VENDOR_ID))

    @property
    def status(self) -> int:
        return self.readl(STATUS) & 0xFF

    def add_status(self, bits: int) -> None:
        """virtio_add_status: read-modify-write, as Linux does."""
        self.writel(STATUS, self.status | bits)

    def reset(self) -> None:
        self.writel(STATUS, 0)
        self.queues = []

    def get_features(self) -> int:
        """vm_get_features: high word first, then low."""
        self.writel(DEVICE_FEATURES_SEL, 1)
        features = self.readl(DEVICE_FEATURES) << 32
        self.writel(DEVICE_FEATURES_SEL, 0)
        return features | self.readl(DEVICE_FEATURES)

    def write_features(self, features: int) -> None:
        """vm_finalize_features' register writes: high word first, then low."""
        self.writel(DRIVER_FEATURES_SEL, 1)
        self.writel(DRIVER_FEATURES, features >> 32)
        self.writel(DRIVER_FEATURES_SEL, 0)
        self.writel(DRIVER_FEATURES, features)

    def negotiate(self, wanted: int = ALL_FEATURES) -> int:
        """virtio_dev_probe's feature part: DRIVER, features, FEATURES_OK and its check."""
        self.add_status(S_DRIVER)
        features = self.get_features() & wanted
        for bit in range(TRANSPORT_F_START, TRANSPORT_F_END):  # vring_transport_features
            if bit not in LINUX_TRANSPORT_BITS:
                features &= ~(1 << bit)
        if not features & (1 << F_VERSION_1):
            raise DriverError("version 2 devices must offer VIRTIO_F_VERSION_1")
        return self.accept_features(features)

    def accept_features(self, features: int) -> int:
        """Write `features` as accepted, set FEATURES_OK and check the device kept it."""
        self.write_features(features)
        self.add_status(S_FEATURES_OK)
        if not self.status & S_FEATURES_OK:
            raise DriverError("device refuses features")
        self.features = features
        return features

    def has_feature(self, bit: int) -> bool:
        return bool(self.features >> bit & 1)

    # --- queues -------------------------------------------------------------------------
    def setup_queue(self, index: int, size: int | None = None, indirect: bool | None = None) -> DriverQueue:
        """vm_setup_vq: select, check not live, read QueueNumMax, lay out the ring, program it."""
        self.writel(QUEUE_SEL, index)
        if self.readl(QUEUE_READY):
            raise DriverError(f"queue {index} is already set up")
        num_max = self.readl(QUEUE_NUM_MAX)
        if num_max == 0:
            raise DriverError(f"queue {index} does not exist")
        num = min(size or num_max, num_max)
        use_indirect = self.has_feature(F_INDIRECT_DESC) if indirect is None else indirect
        q = DriverQueue(self.mem, self.alloc, index, num, lambda i: self.notify(i),
                        event_idx=self.has_feature(F_EVENT_IDX), indirect=use_indirect)
        self.writel(QUEUE_NUM, num)
        for low, addr in ((QUEUE_DESC_LOW, q.desc_addr), (QUEUE_AVAIL_LOW, q.avail_addr),
                          (QUEUE_USED_LOW, q.used_addr)):
            self.writel(low, addr)
            self.writel(low + 4, addr >> 32)
        self.writel(QUEUE_READY, 1)
        self.queues.append(q)
        return q

    def driver_ok(self) -> None:
        self.add_status(S_DRIVER_OK)

    def init(self, wanted: int = ALL_FEATURES, num_queues: int | None = None,
             queue_size: int | None = None) -> list[DriverQueue]:
        """The whole bring-up Linux does: probe, reset, ACKNOWLEDGE, DRIVER, features,
        FEATURES_OK, queues 0..n-1, DRIVER_OK. Returns the queues."""
        self.probe()
        self.reset()
        self.add_status(S_ACKNOWLEDGE)
        self.negotiate(wanted)
        if num_queues is None:
            num_queues = 0
            while True:  # count the queues the device has, as a driver that knows would
                self.writel(QUEUE_SEL, num_queues)
                if not self.readl(QUEUE_NUM_MAX):
                    break
                num_queues += 1
        queues = [self.setup_queue(i, queue_size) for i in range(num_queues)]
        self.driver_ok()
        return queues

    # --- interrupts and config space ------------------------------------------------------
    def interrupt(self) -> int:
        """vm_interrupt: read InterruptStatus and acknowledge exactly those bits."""
        status = self.readl(INTERRUPT_STATUS)
        self.writel(INTERRUPT_ACK, status)
        return status

    def _config_get(self, offset: int, size: int) -> bytes:
        """vm_get: one access for 1/2/4 bytes, two 32-bit reads for 8, bytes otherwise."""
        if size in (1, 2, 4):
            return self.dev.read(CONFIG + offset, size)
        if size == 8:
            return self.dev.read(CONFIG + offset, 4) + self.dev.read(CONFIG + offset + 4, 4)
        return b"".join(self.dev.read(CONFIG + offset + i, 1) for i in range(size))

    def config_read(self, offset: int, size: int, max_retries: int = 100) -> bytes:
        """virtio_cread: read until ConfigGeneration is the same before and after."""
        for _ in range(max_retries):
            before = self.readl(CONFIG_GENERATION)
            data = self._config_get(offset, size)
            if self.readl(CONFIG_GENERATION) == before:
                return data
        raise DriverError("config generation never settled")

    def config_read_int(self, offset: int, size: int) -> int:
        return int.from_bytes(self.config_read(offset, size), "little")

    def config_write(self, offset: int, data: bytes) -> None:
        """vm_set: 8 bytes as two 32-bit writes."""
        if len(data) == 8:
            self.dev.write(CONFIG + offset, data[:4])
            self.dev.write(CONFIG + offset + 4, data[4:])
        else:
            self.dev.write(CONFIG + offset, data)


# --- malformed chains, for testing that a device survives a hostile driver -----------------
def _bad_head(q: DriverQueue) -> None:
    q.publish(q.size)


def _bad_next(q: DriverQueue) -> None:
    q.write_desc(0, q.alloc.alloc(16), 16, DESC_F_NEXT, next=q.size + 3)
    q.publish(0)


def _loop(q: DriverQueue) -> None:
    buf = q.alloc.alloc(16)
    q.write_desc(0, buf, 16, DESC_F_NEXT, next=1)
    q.write_desc(1, buf, 16, DESC_F_NEXT, next=0)
    q.publish(0)


def _gpa_beyond_ram(q: DriverQueue) -> None:
    end = max(s.end for s in q.mem.slots.slots())
    q.write_desc(0, end - 8, 16)
    q.publish(0)


def _gpa_wraps(q: DriverQueue) -> None:
    q.write_desc(0, (1 << 64) - 8, 16)
    q.publish(0)


def _too_large(q: DriverQueue) -> None:
    q.write_desc(0, q.alloc.alloc(16), 32 * MiB + 1)  # over any device limit of <= 32 MiB
    q.publish(0)


def _readable_after_writable(q: DriverQueue) -> None:
    q.write_desc(0, q.alloc.alloc(16), 16, DESC_F_WRITE | DESC_F_NEXT, next=1)
    q.write_desc(1, q.alloc.alloc(16), 16)
    q.publish(0)


def _indirect_table(q: DriverQueue, entries: list[tuple[int, int, int, int]], head_flags: int = 0) -> None:
    table = q.alloc.alloc(16 * len(entries))
    for i, (addr, n, flags, nxt) in enumerate(entries):
        q.write_desc(i, addr, n, flags, nxt, table=table)
    q.write_desc(0, table, 16 * len(entries), DESC_F_INDIRECT | head_flags)
    q.publish(0)


def _nested_indirect(q: DriverQueue) -> None:
    inner = q.alloc.alloc(16)
    q.write_desc(0, q.alloc.alloc(16), 16, table=inner)
    _indirect_table(q, [(inner, 16, DESC_F_INDIRECT, 0)])


def _indirect_and_next(q: DriverQueue) -> None:
    _indirect_table(q, [(q.alloc.alloc(16), 16, 0, 0)], head_flags=DESC_F_NEXT)


def _indirect_bad_len(q: DriverQueue) -> None:
    q.write_desc(0, q.alloc.alloc(32), 24, DESC_F_INDIRECT)
    q.publish(0)


def _indirect_empty(q: DriverQueue) -> None:
    q.write_desc(0, q.alloc.alloc(32), 0, DESC_F_INDIRECT)
    q.publish(0)


def _indirect_outside_ram(q: DriverQueue) -> None:
    end = max(s.end for s in q.mem.slots.slots())
    q.write_desc(0, end, 32, DESC_F_INDIRECT)
    q.publish(0)


def _indirect_bad_next(q: DriverQueue) -> None:
    _indirect_table(q, [(q.alloc.alloc(16), 16, DESC_F_NEXT, 5), (q.alloc.alloc(16), 16, 0, 0)])


def _indirect_loop(q: DriverQueue) -> None:
    buf = q.alloc.alloc(16)
    _indirect_table(q, [(buf, 16, DESC_F_NEXT, 1), (buf, 16, DESC_F_NEXT, 0)])


def _avail_jump(q: DriverQueue) -> None:
    q.set_avail_idx(q.size + 1)


# name -> (the VirtqueueError reason the device side must report, builder). Each builder
# writes into a freshly set-up queue (descriptors 0 and 1) and makes the bad chain available;
# "too-large" assumes the device's max_chain_bytes is at most 32 MiB.
MALFORMED_CHAINS: dict[str, tuple[str, Callable[[DriverQueue], None]]] = {
    "head-out-of-range": ("desc-index-out-of-range", _bad_head),
    "next-out-of-range": ("desc-index-out-of-range", _bad_next),
    "loop": ("chain-loop", _loop),
    "gpa-beyond-ram": ("gpa-out-of-range", _gpa_beyond_ram),
    "gpa-wraps": ("gpa-out-of-range", _gpa_wraps),
    "too-large": ("chain-too-large", _too_large),
    "readable-after-writable": ("readable-after-writable", _readable_after_writable),
    "nested-indirect": ("nested-indirect", _nested_indirect),
    "indirect-and-next": ("bad-indirect", _indirect_and_next),
    "indirect-bad-len": ("bad-indirect", _indirect_bad_len),
    "indirect-empty": ("bad-indirect", _indirect_empty),
    "indirect-outside-ram": ("gpa-out-of-range", _indirect_outside_ram),
    "indirect-next-out-of-range": ("desc-index-out-of-range", _indirect_bad_next),
    "indirect-loop": ("chain-loop", _indirect_loop),
    "avail-idx-jump": ("avail-idx-jump", _avail_jump),
}

"""The virtio-mem device (VIRTIO 1.2 "Memory Device", device id 24) with dynamic memslots.

The device owns one guest-physical region above RAM, cut into blocks that the guest driver
plugs and unplugs through requests on its single virtqueue; the control plane sets
`requested_size` and the driver works towards it. Answers follow the spec and QEMU's
hw/virtio/virtio-mem.c: bad ranges get ERROR, a PLUG beyond `requested_size` gets NACK, host
failures get BUSY (Linux retries those later), and a malformed request (too short, no room
for the response) fails the device through the transport.

Host side, the invariant is: a block's host pages are accessible exactly while it is
plugged. Unplugged blocks are discarded (MADV_DONTNEED / punch hole) and PROT_NONE; a KVM
memslot covers a slot of the region only while one of its blocks is plugged
(`mem_slots.SlotMap`). Guest accesses to unplugged memory land in `on_unplugged_access`:
through the MMIO trap (`trap`, registered over the whole region) for unmapped slots, and
through the machine's EFAULT / KVM_EXIT_MEMORY_FAULT path for PROT_NONE blocks inside a
mapped slot. Device DMA into unplugged blocks is refused with `GuestMemoryError` by the
region's own `HostMapping` instead of crashing the VMM on the PROT_NONE pages.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass
from typing import Callable

from bitarray import bitarray
from bitarray.util import intervals

from devices.listeners import notify
from devices.virtio.device import VIRTIO_ID_MEM, TransportCallbacks, VirtioDevice
from devices.virtio.mem_slots import SlotMap, default_memslot_size
from devices.virtio.queue import DescriptorChain, Virtqueue, VirtqueueError
from vmm.hostmem import BACKENDS, HUGE_PAGE_SIZE, HostMapping, HostMemoryError, format_size
from vmm.memory import GuestMemory, GuestMemoryError
from vmm.memslots import MemslotError, MemslotManager

log = logging.getLogger("pyvmm.virtio.mem")

MiB = 1 << 20

# feature bits (include/uapi/linux/virtio_mem.h)
VIRTIO_MEM_F_ACPI_PXM = 0
VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE = 1

# request types
VIRTIO_MEM_REQ_PLUG = 0
VIRTIO_MEM_REQ_UNPLUG = 1
VIRTIO_MEM_REQ_UNPLUG_ALL = 2
VIRTIO_MEM_REQ_STATE = 3

# response types
VIRTIO_MEM_RESP_ACK = 0
VIRTIO_MEM_RESP_NACK = 1
VIRTIO_MEM_RESP_BUSY = 2
VIRTIO_MEM_RESP_ERROR = 3

# block states in a STATE response
VIRTIO_MEM_STATE_PLUGGED = 0
VIRTIO_MEM_STATE_UNPLUGGED = 1
VIRTIO_MEM_STATE_MIXED = 2

REQ_NAMES = {VIRTIO_MEM_REQ_PLUG: "plug", VIRTIO_MEM_REQ_UNPLUG: "unplug",
             VIRTIO_MEM_REQ_UNPLUG_ALL: "unplug-all", VIRTIO_MEM_REQ_STATE: "state"}
RESP_NAMES = {VIRTIO_MEM_RESP_ACK: "ack", VIRTIO_MEM_RESP_NACK: "nack",
              VIRTIO_MEM_RESP_BUSY: "busy", VIRTIO_MEM_RESP_ERROR: "error"}

# struct virtio_mem_req: le16 type, le16 padding[3], then le64 addr, le16 nb_blocks, le16 padding[3]
REQ_FORMAT = struct.Struct("<H6xQH6x")
VIRTIO_MEM_REQ_SIZE = REQ_FORMAT.size            # 24
# struct virtio_mem_resp: le16 type, le16 padding[3], le16 state
RESP_FORMAT = struct.Struct("<H6xH")
VIRTIO_MEM_RESP_SIZE = RESP_FORMAT.size          # 10
# struct virtio_mem_config
CONFIG_FORMAT = struct.Struct("<QH6xQQQQQ")
VIRTIO_MEM_CONFIG_SIZE = CONFIG_FORMAT.size      # 56

QUEUE_SIZE = 128                 # QEMU's; Linux keeps one request in flight anyway
# A request is 24 bytes and a response 10; two pages leave room for drivers that hand over
# page-sized buffers, and anything larger is a malformed chain the queue rejects.
MAX_CHAIN_BYTES = 8192
# Request times kept for the percentiles in stats(): enough for p99 over a long resize.
REQUEST_TIMES_KEPT = 4096
DEFAULT_BLOCK_SIZE = 2 * MiB     # the x86 THP size: unplugging never splits a huge page
# QEMU sizes the usable region requested_size + 2 x 128 MiB (two x86 memory sections), so
# Linux, which only adds whole aligned memory blocks, can always add one that fits.
VIRTIO_MEM_USABLE_EXTENT = 2 * 128 * MiB
U64_MAX = (1 << 64) - 1
KVM_USER_MEM_SLOTS = 32764       # KVM_CAP_NR_MEMSLOTS here; more slots per device is a config error

SizeChangeListener = Callable[[dict], None]
AccessListener = Callable[[dict], None]


def _percentile_us(samples: deque[int], q: float) -> float:
    """The q-quantile (nearest rank) of nanosecond samples, in µs; 0.0 for none."""
    if not samples:
        return 0.0
    ordered = sorted(samples)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000, 1)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclass(frozen=True)
class _Release:
    """Unplugged memory still to protect and give back to the host, and the slots the
    unplug emptied (work left for after the answer)."""
    offset: int
    size: int
    emptied_slots: list[int]


@dataclass(frozen=True)
class _MapSlots:
    """Plugged blocks whose memslots are still to be registered (work left for after the answer)."""
    first_block: int
    nb_blocks: int


_AfterAnswer = _Release | _MapSlots


class _RegionMapping(HostMapping):
    """The region's host memory, refusing data access to unplugged (PROT_NONE) blocks.

    GuestMemory reads and writes through the memslot's mapping; touching a PROT_NONE page from
    Python would kill the VMM with SIGSEGV, so a guest that points a descriptor at unplugged
    memory must get a `GuestMemoryError` (its device's error path) instead. `read` and `write`
    hold the device lock so an unplug cannot protect the pages mid-copy; a `view` is only
    checked when it is taken.
    """

    def __init__(self, size: int, backend: str, name: str, device: VirtioMem) -> None:
        self._device = device
        super().__init__(size, backend, name)

    def read(self, offset: int, size: int) -> bytes:
        dev = self._device
        with dev._lock:
            if dev._host_range_plugged(offset, size):
                return super().read(offset, size)
        raise dev._refuse_host_access(offset, size, "device-read")

    def write(self, offset: int, data: bytes) -> None:
        dev = self._device
        with dev._lock:
            if dev._host_range_plugged(offset, len(data)):
                super().write(offset, data)
                return
        raise dev._refuse_host_access(offset, len(data), "device-write")

    def view(self, offset: int, size: int) -> memoryview:
        dev = self._device
        with dev._lock:
            if dev._host_range_plugged(offset, size):
                return super().view(offset, size)
        raise dev._refuse_host_access(offset, size, "device-view")


class UnpluggedRegionTrap:
    """A BusDevice over the whole region: catches guest accesses to slots that are not mapped.

    While a slot is registered with KVM the guest's accesses never exit, so only accesses to
    unmapped slots arrive here. Reads return all-ones and writes are dropped, like an unclaimed
    bus address; each is reported to the device. If the block turns out to be plugged (the
    access raced with a PLUG that mapped its slot), the access goes to memory.
    """

    def __init__(self, device: VirtioMem) -> None:
        self._device = device

    def read(self, offset: int, size: int) -> bytes:
        dev = self._device
        data = dev._trap_access(offset, size, None)
        return data if data is not None else b"\xff" * size

    def write(self, offset: int, data: bytes) -> None:
        self._device._trap_access(offset, len(data), bytes(data))


class VirtioMem(VirtioDevice):
    """A virtio-mem device: one region, a block bitmap, dynamic memslots."""

    device_id = VIRTIO_ID_MEM
    num_queues = 1
    queue_max_size = QUEUE_SIZE
    max_chain_bytes = MAX_CHAIN_BYTES

    def __init__(self, id: str, addr: int, region_size: int, *, memslots: MemslotManager,
                 block_size: int = DEFAULT_BLOCK_SIZE, node: int | None = None,
                 memslot_size: int | None = None, backend: str = "anon", prealloc: bool = False,
                 requested_size: int = 0, memdev: str | None = None) -> None:
        self.id = id
        host_page = os.sysconf("SC_PAGE_SIZE")
        backend_page = HUGE_PAGE_SIZE if backend == "hugetlb" else host_page
        if backend not in BACKENDS:
            raise ValueError(f"virtio-mem {id}: unknown memory backend {backend!r} (choose from {', '.join(BACKENDS)})")
        if not _is_power_of_two(block_size):
            raise ValueError(f"virtio-mem {id}: block size {block_size:#x} must be a power of two")
        if block_size < backend_page:
            raise ValueError(f"virtio-mem {id}: block size {format_size(block_size)} is below the "
                             f"{backend} page size {format_size(backend_page)}")
        if region_size <= 0 or region_size % block_size:
            raise ValueError(f"virtio-mem {id}: region size {region_size:#x} must be a positive multiple of "
                             f"the block size {format_size(block_size)}")
        if addr < 0 or addr % block_size or addr + region_size > U64_MAX:
            raise ValueError(f"virtio-mem {id}: region address {addr:#x} must be aligned to the block size "
                             f"{format_size(block_size)}")
        if node is not None and not 0 <= node <= 0xFFFF:
            raise ValueError(f"virtio-mem {id}: node {node} does not fit the 16-bit node_id")
        if memslot_size is None:
            memslot_size = default_memslot_size(region_size, block_size)
        elif memslot_size <= 0 or memslot_size % block_size:
            raise ValueError(f"virtio-mem {id}: memslot size {memslot_size:#x} must be a positive multiple of "
                             f"the block size {format_size(block_size)}")
        if -(-region_size // memslot_size) > KVM_USER_MEM_SLOTS:
            raise ValueError(f"virtio-mem {id}: memslot size {format_size(memslot_size)} would need more than "
                             f"{KVM_USER_MEM_SLOTS} memslots for {format_size(region_size)}")
        self.addr = addr
        self.region_size = region_size
        self.block_size = block_size
        self.node = node
        self.backend = backend
        self.prealloc = prealloc
        self.memdev = memdev if memdev is not None else f"/objects/{id}-memdev"
        self.qom_path = f"/machine/peripheral/{id}"
        self._check_requested(requested_size)

        # Re-entrant: the request path reads guest memory, which may be this region's.
        self._lock = threading.RLock()
        self._nb_blocks = region_size // block_size
        self._bitmap = bitarray(self._nb_blocks)
        self._bitmap.setall(0)
        self._plugged_size = 0
        self._requested_size = requested_size
        self._usable_region_size = self._usable_for(requested_size)

        # MAP_NORESERVE: reserving the region costs neither RSS nor time; nothing is plugged,
        # so nothing is accessible.
        self.mapping = _RegionMapping(region_size, backend, f"virtio-mem-{id}", self)
        self.mapping.protect(0, region_size, False)
        self.slots = SlotMap(memslots, self.mapping, addr, region_size, memslot_size, block_size, f"virtio-mem:{id}")
        self.trap = UnpluggedRegionTrap(self)

        self.size_change_listener: SizeChangeListener | None = None
        self.unplugged_access_listener: AccessListener | None = None

        self._driver_features = 0
        self._queue: Virtqueue | None = None
        self._mem: GuestMemory | None = None
        self._transport: TransportCallbacks | None = None

        self._requests: Counter[tuple[str, str]] = Counter()
        self._malformed = 0
        # Host-side time per answered request: from the notify (or the previous answer in the
        # same batch) to its used-ring entry. Includes slot mapping and discards.
        self._request_ns_total = 0
        self._request_ns_max = 0
        self._requests_timed = 0
        self._request_ns_recent: deque[int] = deque(maxlen=REQUEST_TIMES_KEPT)
        # Host work left for after the answers (slot registration, protect, discard, slot removal).
        self._after_ns_total = 0
        self._after_batches = 0
        self._config_writes = 0
        self._internal_errors = 0
        self._protect_failures = 0
        self._discard_failures = 0
        self._unplugged_accesses: Counter[str] = Counter()
        self._warned: set[str] = set()

    # ------------------------------------------------------------------ virtio device
    def device_features(self) -> int:
        features = 1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE
        if self.node is not None:
            features |= 1 << VIRTIO_MEM_F_ACPI_PXM
        return features

    def ack_features(self, features: int) -> None:
        self.acked_features = features
        self._driver_features = features & self.device_features()

    def config_read(self, offset: int, size: int) -> bytes:
        if size <= 0:
            return b""
        with self._lock:
            cfg = CONFIG_FORMAT.pack(self.block_size, self.node or 0, self.addr, self.region_size,
                                     self._usable_region_size, self._plugged_size, self._requested_size)
        chunk = cfg[offset:offset + size] if 0 <= offset < len(cfg) else b""
        return chunk + bytes(size - len(chunk))

    def config_write(self, offset: int, data: bytes) -> None:
        # Every field is read-only for the driver (spec: "MUST NOT write"); ignore and count.
        with self._lock:
            self._config_writes += 1

    def activate(self, queues: list[Virtqueue], mem: GuestMemory, transport: TransportCallbacks) -> None:
        self._transport = transport
        if not self._driver_features & (1 << VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE):
            # Unplugged blocks really are inaccessible here; a driver that reads them (legacy
            # memory dumps) would hit unmapped slots. The spec lets the device refuse to operate.
            self._queue = None
            transport.fail("virtio-mem-feature: the driver did not accept VIRTIO_MEM_F_UNPLUGGED_INACCESSIBLE")
            return
        if len(queues) != self.num_queues:
            transport.fail(f"virtio-mem-queues: expected {self.num_queues} virtqueue, got {len(queues)}")
            return
        self._queue, self._mem = queues[0], mem

    def reset(self) -> None:
        """Device reset (the driver wrote status 0): forget the queue, keep every block.

        The spec forbids changing block states or plugged memory on a device reset (the guest
        may still use plugged memory, e.g. after unloading its driver); a reboot calls
        `system_reset`, which unplugs everything.
        """
        self._queue = None
        self._mem = None
        self._transport = None
        self._driver_features = 0

    def queue_notify(self, index: int) -> None:
        """Answer every available request. A malformed chain stops the queue: a
        `VirtqueueError` goes to the transport, a protocol violation to `transport.fail`."""
        queue, mem, transport = self._queue, self._mem, self._transport
        if index != 0 or queue is None or mem is None or transport is None:
            return
        answered = False
        events: list[dict] = []
        deferred: list[_AfterAnswer] = []
        started = time.perf_counter_ns()
        try:
            while True:
                chain = queue.pop()
                if chain is None:
                    break
                violation = self._serve(chain, mem, events, deferred)
                if violation is not None:
                    # As QEMU: the chain is not returned, the device needs a reset.
                    with self._lock:
                        self._malformed += 1
                    self._queue = None
                    transport.fail(violation)
                    break
                queue.push(chain, VIRTIO_MEM_RESP_SIZE)
                answered = True
                now = time.perf_counter_ns()
                self._time_request(now - started)
                started = now
        except VirtqueueError:
            with self._lock:
                self._malformed += 1
            self._queue = None
            raise  # the transport stops the queue, sets NEEDS_RESET and counts the reason
        except Exception as e:  # a bug here must not take the event loop down
            log.exception("virtio-mem %s: internal error while handling requests", self.id)
            with self._lock:
                self._internal_errors += 1
            self._queue = None
            transport.fail(f"virtio-mem-internal: {type(e).__name__}: {e}")
        finally:
            if answered:
                transport.signal_used(0)
            self._after_answer(deferred)
            self._fire_size_changes(events)

    # ------------------------------------------------------------------ request path
    def _serve(self, chain: DescriptorChain, mem: GuestMemory, events: list[dict],
               deferred: list[_AfterAnswer]) -> str | None:
        """Answer one request in place. Returns a reason if the chain violates the protocol."""
        raw = chain.read_all(mem)  # bounded by max_chain_bytes; VirtqueueError if unbacked
        if len(raw) < VIRTIO_MEM_REQ_SIZE:
            return (f"virtio-mem-bad-request: request of {len(raw)} bytes, "
                    f"expected {VIRTIO_MEM_REQ_SIZE}")
        if chain.writable_len < VIRTIO_MEM_RESP_SIZE:
            return (f"virtio-mem-bad-request: {chain.writable_len} bytes for the response, "
                    f"need {VIRTIO_MEM_RESP_SIZE}")
        # Only the type and the request-specific data count; padding is ignored (spec).
        req_type, addr, nb_blocks = REQ_FORMAT.unpack_from(raw)
        resp, state = self.handle_request(req_type, addr, nb_blocks, events, deferred)
        chain.write(mem, RESP_FORMAT.pack(resp, state))
        return None

    def handle_request(self, req_type: int, addr: int, nb_blocks: int, events: list[dict] | None = None,
                       deferred: list[_AfterAnswer] | None = None) -> tuple[int, int]:
        """Process one decoded request; returns (response type, state). Counted by type/answer.

        Size-change events are appended to `events` (fired by the caller after the lock is
        released); without a list they are fired here. With `deferred`, the slow host work
        (registering a PLUG's memslots; protecting and discarding an UNPLUG's memory and
        removing the slots it emptied) is left to the caller's `_after_answer`, run once
        the answer is in the used ring; without it, that work happens here.
        """
        own_events = events is None
        events = [] if own_events else events
        with self._lock:
            state = 0
            if req_type == VIRTIO_MEM_REQ_PLUG:
                resp = self._plug(addr, nb_blocks, events, deferred)
            elif req_type == VIRTIO_MEM_REQ_UNPLUG:
                resp = self._unplug(addr, nb_blocks, events, deferred)
            elif req_type == VIRTIO_MEM_REQ_UNPLUG_ALL:
                resp = self._unplug_all(events)
            elif req_type == VIRTIO_MEM_REQ_STATE:
                resp, state = self._state(addr, nb_blocks)
            else:
                # QEMU treats an unknown type as a protocol violation and breaks the device;
                # the spec is silent. ERROR ("error in request") keeps the device usable.
                resp = VIRTIO_MEM_RESP_ERROR
            self._requests[(REQ_NAMES.get(req_type, "unknown"), RESP_NAMES[resp])] += 1
        if own_events:
            self._fire_size_changes(events)
        return resp, state

    def _valid_range(self, addr: int, size: int) -> bool:
        """Block-aligned, non-empty, no wrap-around, entirely inside the usable region."""
        if addr % self.block_size or size <= 0 or addr + size > U64_MAX:
            return False
        return self.addr <= addr and addr + size <= self.addr + self._usable_region_size

    def _plug(self, addr: int, nb_blocks: int, events: list[dict], deferred: list[_AfterAnswer] | None) -> int:
        size = nb_blocks * self.block_size
        if not self._valid_range(addr, size):
            return VIRTIO_MEM_RESP_ERROR
        if self._plugged_size + size > self._requested_size:
            return VIRTIO_MEM_RESP_NACK
        first = (addr - self.addr) // self.block_size
        if self._bitmap.any() and self._bitmap.count(1, first, first + nb_blocks):
            return VIRTIO_MEM_RESP_ERROR
        offset = addr - self.addr
        try:
            self.mapping.protect(offset, size, True)
        except HostMemoryError as e:
            self._protect_failures += 1
            self._warn_once("plug-protect", f"cannot make {format_size(size)} accessible for a plug: {e}")
            return VIRTIO_MEM_RESP_BUSY
        try:
            if self.prealloc:
                self.mapping.populate(offset, size)
            if deferred is None:
                self.slots.map_for_plug(first, nb_blocks)
        except (HostMemoryError, MemslotError, OSError) as e:
            self._warn_once("plug", f"plug of {format_size(size)} at {addr:#x} failed, answering BUSY: {e}")
            self._make_inaccessible(offset, size)
            return VIRTIO_MEM_RESP_BUSY
        self._bitmap[first:first + nb_blocks] = 1
        self.slots.account_plug(first, nb_blocks)
        self._plugged_size += size
        events.append(self._size_event())
        if deferred is not None:
            # Registering a slot waits for every vCPU to leave the guest (KVM synchronizes
            # SRCU): hundreds of µs to ms with a running guest, so it follows the answer.
            # The pages are already accessible: until the slot lands, a guest access exits
            # to the region's MMIO trap, which serves plugged blocks from the same memory.
            deferred.append(_MapSlots(first, nb_blocks))
        return VIRTIO_MEM_RESP_ACK

    def _unplug(self, addr: int, nb_blocks: int, events: list[dict], deferred: list[_AfterAnswer] | None) -> int:
        size = nb_blocks * self.block_size
        if not self._valid_range(addr, size):
            return VIRTIO_MEM_RESP_ERROR
        first = (addr - self.addr) // self.block_size
        if self._bitmap.count(1, first, first + nb_blocks) != nb_blocks:
            return VIRTIO_MEM_RESP_ERROR
        offset = addr - self.addr
        self._bitmap[first:first + nb_blocks] = 0
        self._plugged_size -= size
        release = _Release(offset, size, self.slots.count_unplug(first, nb_blocks))
        events.append(self._size_event())
        if deferred is None:
            self._release_locked(release)
        else:
            # The driver offlined and removed this memory before asking, so nothing it
            # legitimately does touches it now: protecting (which makes KVM zap its mappings),
            # discarding up to a memslot's worth of pages and removing emptied slots can all
            # wait until the answer is out.
            deferred.append(release)
        return VIRTIO_MEM_RESP_ACK

    def _after_answer(self, deferred: list[_AfterAnswer]) -> None:
        """Run the host work the answered requests left behind, in request order."""
        if not deferred:
            return
        started = time.perf_counter_ns()
        with self._lock:
            for work in deferred:
                if isinstance(work, _MapSlots):
                    self._map_slots_locked(work)
                else:
                    self._release_locked(work)
            self._after_ns_total += time.perf_counter_ns() - started
            self._after_batches += 1

    def _map_slots_locked(self, work: _MapSlots) -> None:
        """Register the slots of blocks plugged (and already answered). A refusal is counted;
        the blocks stay plugged and are served through the MMIO trap, slowly but correctly."""
        try:
            # Only slots still holding plugged blocks: a later request in the batch may
            # have unplugged them again.
            self.slots.map_for_plug(work.first_block, work.nb_blocks, in_use_only=True)
        except (MemslotError, OSError) as e:
            self._warn_once("plug-slot", f"cannot register a memslot for plugged memory; the guest's "
                            f"accesses to it are emulated (slow): {e}")

    def _release_locked(self, release: _Release) -> None:
        """Protect and discard what of an unplugged range is still unplugged (a later request
        in the same batch may have plugged part of it again), then drop the slots it emptied
        (KVM deletes an emptied slot ~4x faster). Failures only lose the trap or keep the
        pages on the host: counted and logged, the blocks are unplugged regardless."""
        bs = self.block_size
        first = release.offset // bs
        for value, start, stop in intervals(self._bitmap[first:first + release.size // bs]):
            if value:
                continue
            offset, size = (first + start) * bs, (stop - start) * bs
            self._try_protect(offset, size, False)
            try:
                self.mapping.discard(offset, size)
            except HostMemoryError as e:
                self._discard_failures += 1
                self._warn_once("discard", f"cannot discard unplugged memory (the host keeps it): {e}")
        self.slots.unmap_unused(release.emptied_slots)

    def _unplug_all(self, events: list[dict]) -> int:
        if self._plugged_size:
            bs = self.block_size
            plugged = [(start, stop) for value, start, stop in intervals(self._bitmap) if value]
            self._bitmap.setall(0)
            for start, stop in plugged:
                self._make_inaccessible(start * bs, (stop - start) * bs)
            self._plugged_size = 0
            self.slots.clear()
            events.append(self._size_event())
        # The only place, besides a system reset, where the usable region may shrink.
        self._usable_region_size = self._usable_for(self._requested_size)
        return VIRTIO_MEM_RESP_ACK

    def _state(self, addr: int, nb_blocks: int) -> tuple[int, int]:
        size = nb_blocks * self.block_size
        if not self._valid_range(addr, size):
            return VIRTIO_MEM_RESP_ERROR, 0
        first = (addr - self.addr) // self.block_size
        plugged = self._bitmap.count(1, first, first + nb_blocks)
        if plugged == nb_blocks:
            return VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_STATE_PLUGGED
        if plugged == 0:
            return VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_STATE_UNPLUGGED
        return VIRTIO_MEM_RESP_ACK, VIRTIO_MEM_STATE_MIXED

    def _make_inaccessible(self, offset: int, size: int) -> None:
        """PROT_NONE, then give the pages back (protecting first stops a misbehaving guest
        from faulting pages back in between), for blocks the bitmap already shows unplugged."""
        self._release_locked(_Release(offset, size, []))

    def _try_protect(self, offset: int, size: int, accessible: bool) -> None:
        try:
            self.mapping.protect(offset, size, accessible)
        except HostMemoryError as e:
            self._protect_failures += 1
            self._warn_once(f"protect-{accessible}", f"cannot mprotect {format_size(size)} of the region "
                            f"(accessible={accessible}): {e}")

    def _usable_for(self, requested: int) -> int:
        """QEMU's usable region: requested + 256 MiB, block aligned, capped by the region; 0 for 0."""
        if requested == 0:
            return 0
        usable = min(self.region_size, requested + VIRTIO_MEM_USABLE_EXTENT)
        return -(-usable // self.block_size) * self.block_size

    # ------------------------------------------------------------------ control plane
    @property
    def requested_size(self) -> int:
        return self._requested_size

    @requested_size.setter
    def requested_size(self, value: int) -> None:
        self._check_requested(value)
        with self._lock:
            if value != self._requested_size:
                # Grows the usable region, never shrinks it (spec: only UNPLUG_ALL and a
                # system reset may shrink it).
                self._usable_region_size = max(self._usable_region_size, self._usable_for(value))
                self._requested_size = value
            transport = self._transport
        if transport is not None:
            # Notified even when unchanged, as QEMU does: it pokes a stuck driver.
            transport.signal_config()

    def _check_requested(self, value: int) -> None:
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"virtio-mem {self.id}: requested size must be a non-negative integer, not {value!r}")
        if value % self.block_size:
            raise ValueError(f"virtio-mem {self.id}: requested size {value:#x} is not a multiple of the block "
                             f"size ({format_size(self.block_size)})")
        if value > self.region_size:
            raise ValueError(f"virtio-mem {self.id}: requested size {format_size(value)} exceeds the region size "
                             f"({format_size(self.region_size)})")

    @property
    def plugged_size(self) -> int:
        return self._plugged_size

    @property
    def usable_region_size(self) -> int:
        return self._usable_region_size

    @property
    def driver_features(self) -> int:
        return self._driver_features

    def info(self) -> dict:
        """QEMU's VirtioMEMDeviceInfo (query-memory-devices), same field names."""
        with self._lock:
            return {"memaddr": self.addr, "node": self.node or 0, "requested-size": self._requested_size,
                    "size": self._plugged_size, "max-size": self.region_size, "block-size": self.block_size,
                    "memdev": self.memdev, "id": self.id}

    def block_runs(self) -> list[tuple[int, int, bool]]:
        """The bitmap as runs [(first block, count, plugged)], covering the whole region."""
        with self._lock:
            return [(start, stop - start, bool(value)) for value, start, stop in intervals(self._bitmap)]

    def is_plugged(self, gpa: int) -> bool:
        if not self.region_contains(gpa):
            return False
        return bool(self._bitmap[(gpa - self.addr) // self.block_size])

    def stats(self) -> dict:
        with self._lock:
            requests: dict[str, dict[str, int]] = {}
            for (kind, answer), n in sorted(self._requests.items()):
                requests.setdefault(kind, {})[answer] = n
            return {"requests": requests, "malformed": self._malformed, "internal-errors": self._internal_errors,
                    "config-writes-ignored": self._config_writes,
                    "slot-adds": self.slots.stats.adds, "slot-removes": self.slots.stats.removes,
                    "slot-failures": self.slots.stats.failures, "slots-mapped": self.slots.mapped_count(),
                    "slot-size": self.slots.slot_size, "protect-failures": self._protect_failures,
                    "discard-failures": self._discard_failures,
                    "unplugged-accesses": sum(self._unplugged_accesses.values()),
                    "unplugged-accesses-by-kind": dict(self._unplugged_accesses),
                    "request-time-us": {
                        "count": self._requests_timed,
                        "mean": round(self._request_ns_total / self._requests_timed / 1000, 1)
                        if self._requests_timed else 0.0,
                        "p50": _percentile_us(self._request_ns_recent, 0.50),
                        "p99": _percentile_us(self._request_ns_recent, 0.99),
                        "max": round(self._request_ns_max / 1000, 1)},
                    "after-answer-us": {
                        "count": self._after_batches,
                        "mean": round(self._after_ns_total / self._after_batches / 1000, 1)
                        if self._after_batches else 0.0}}

    def _time_request(self, ns: int) -> None:
        with self._lock:
            self._requests_timed += 1
            self._request_ns_total += ns
            self._request_ns_max = max(self._request_ns_max, ns)
            self._request_ns_recent.append(ns)

    def system_reset(self) -> None:
        """Machine reset / reboot: unplug every block, drop every slot, discard the memory.

        The usable region is recomputed from the (kept) requested size, as QEMU does, so the
        guest re-plugs after it boots.
        """
        events: list[dict] = []
        with self._lock:
            self._unplug_all(events)
        self._fire_size_changes(events)

    def close(self) -> None:
        """Remove the device's slots and release the region (device removal, tests)."""
        with self._lock:
            self._bitmap.setall(0)
            self._plugged_size = 0
            self.slots.clear()
            self.mapping.close()

    # ------------------------------------------------------------------ unplugged access
    def region_contains(self, gpa: int) -> bool:
        return self.addr <= gpa < self.addr + self.region_size

    def on_unplugged_access(self, gpa: int, kind: str) -> dict | None:
        """A guest (or device) access hit unplugged memory: count it and describe it.

        `kind` is free-form ("read", "write", "fault", "device-read", ...). Returns the event
        (also passed to `unplugged_access_listener`), or None when `gpa` is outside the region
        or its block is plugged (then it is not this device's business).
        """
        if not self.region_contains(gpa):
            return None
        with self._lock:
            block = (gpa - self.addr) // self.block_size
            if self._bitmap[block]:
                return None
            self._unplugged_accesses[kind] += 1
            count = sum(self._unplugged_accesses.values())
            slot_mapped = self.slots.is_mapped((gpa - self.addr) // self.slots.slot_size)
        event = {"device": self.id, "gpa": gpa, "kind": kind, "block": block,
                 "slot-mapped": slot_mapped, "count": count}
        if count == 1:
            log.warning("virtio-mem %s: guest accessed unplugged memory at %#x (%s)", self.id, gpa, kind)
        notify(self.unplugged_access_listener, [event], log, f"virtio-mem {self.id}: unplugged-access")
        return event

    def _trap_access(self, offset: int, size: int, data: bytes | None) -> bytes | None:
        """The MMIO trap's access at `offset` into the region; returns the data if it is plugged."""
        with self._lock:
            if self._host_range_plugged(offset, size):
                if data is None:
                    return HostMapping.read(self.mapping, offset, size)
                HostMapping.write(self.mapping, offset, data)
                return None
        self.on_unplugged_access(self.addr + offset, "read" if data is None else "write")
        return None

    def _host_range_plugged(self, offset: int, size: int) -> bool:
        """True when [offset, offset+size) of the region lies in plugged blocks (lock held)."""
        if offset < 0 or size < 0 or offset + size > self.region_size:
            return False
        if size == 0:
            return True
        first, last = offset // self.block_size, (offset + size - 1) // self.block_size
        return self._bitmap.count(1, first, last + 1) == last + 1 - first

    def _refuse_host_access(self, offset: int, size: int, kind: str) -> GuestMemoryError:
        # Report the first unplugged block the access touches (its start may be plugged).
        lo = min(max(offset, 0), self.region_size - 1) // self.block_size
        hi = min(max(offset + size - 1, 0), self.region_size - 1) // self.block_size + 1
        with self._lock:
            first = self._bitmap.find(0, lo, hi)
        gpa = self.addr + (max(offset, first * self.block_size) if first >= 0 else offset)
        self.on_unplugged_access(gpa, kind)
        return GuestMemoryError(f"guest-physical address {gpa:#x} is unplugged memory of virtio-mem {self.id}")

    # ------------------------------------------------------------------ helpers
    def _size_event(self) -> dict:
        return {"id": self.id, "size": self._plugged_size, "qom-path": self.qom_path}

    def _fire_size_changes(self, events: list[dict]) -> None:
        notify(self.size_change_listener, events, log, f"virtio-mem {self.id}: size-change")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("virtio-mem %s: %s", self.id, message)


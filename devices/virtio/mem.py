"""The virtio-mem device (VIRTIO 1.2 "Memory Device", device id 24) with dynamic memslots.

The device owns one guest-physical region above RAM, cut into blocks that the guest driver
plugs and unplugs through requests on its single virtqueue; the control plane sets
`requested_size` and the driver works towards it. Answers follow the spec and QEMU's
hw/virtio/virtio-mem.c: bad ranges get ERROR, a PLUG beyond `requested_size` gets NACK, host
failures get BUSY (Linux retries those later), and a malformed request (too short, no room
for the response) fails the device through the transport.

Host side, the invariant is: whenever the device lock is free, a block's host pages are
accessible exactly while it is plugged. Unplugged blocks are discarded (MADV_DONTNEED /
punch hole) and PROT_NONE; a KVM memslot covers a slot of the region only while one of its
blocks is plugged (`mem_slots.SlotMap`). Requests are answered from the bitmap alone and
that host work follows the answer, under the same lock hold, so the guest waits for none of
it (`queue_notify`). Guest accesses to unplugged memory land in `on_unplugged_access`:
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
from vmm.tracing import NULL_TRACER, AnyTracer

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
UNKNOWN_REQ = len(REQ_NAMES)  # where answers to unknown request types are counted
STATE_NAMES = {VIRTIO_MEM_STATE_PLUGGED: "plugged", VIRTIO_MEM_STATE_UNPLUGGED: "unplugged",
               VIRTIO_MEM_STATE_MIXED: "mixed"}

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
    tracer: AnyTracer = NULL_TRACER  # the machine sets its own

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
        # Plugged blocks whose pages the host refused to make accessible after their PLUG was
        # answered (mprotect fails at vm.max_map_count): nothing may touch them until a retry
        # succeeds (`_make_accessible`). Normally all clear, which the flag says cheaply.
        self._inaccessible = bitarray(self._nb_blocks)
        self._inaccessible.setall(0)
        self._any_inaccessible = False
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

        # Answers by request type (index 4: unknown types) and response type.
        self._answers = [[0] * len(RESP_NAMES) for _ in range(UNKNOWN_REQ + 1)]
        self._malformed = 0
        # Host-side time per answered request: from the notify (or the previous answer in the
        # same batch) to its used-ring entry; the host work after the answers is timed apart.
        self._request_ns_total = 0
        self._request_ns_max = 0
        self._requests_timed = 0
        self._request_ns_recent: deque[int] = deque(maxlen=REQUEST_TIMES_KEPT)
        # Host work left for after the answers, in request order: (request type, first block,
        # blocks, plugged size after the request). Only ever non-empty while the lock is held.
        self._deferred: list[tuple[int, int, int, int]] = []
        self._events: list[dict] = []  # size changes not yet given to the listener
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
        `VirtqueueError` goes to the transport, a protocol violation to `transport.fail`.

        The device lock is held until the host work the answers left behind is done, so
        everything else that touches the region (the vCPUs' traps and faults, device DMA, the
        control plane) finds the host protections matching the bitmap.
        """
        queue, mem, transport = self._queue, self._mem, self._transport
        if index != 0 or queue is None or mem is None or transport is None:
            return
        answered = False
        times: list[int] = []
        try:
            with self._lock:
                started = time.perf_counter_ns()
                try:
                    while True:
                        pair = queue.pop_pair()
                        if pair is not None:  # Linux's request: decoded in place, in boot RAM
                            head, request, response = pair
                            if len(request) >= VIRTIO_MEM_REQ_SIZE and len(response) >= VIRTIO_MEM_RESP_SIZE:
                                resp, state = self._answer(*REQ_FORMAT.unpack_from(request))
                                RESP_FORMAT.pack_into(response, 0, resp, state)
                                violation = None
                            else:
                                violation = self._short_chain(len(request), len(response))
                        else:
                            chain = queue.pop()
                            if chain is None:
                                break
                            head = chain.head
                            violation = self._serve(chain, mem)
                        if violation is not None:
                            # As QEMU: the chain is not returned, the device needs a reset.
                            self._malformed += 1
                            self._queue = None
                            transport.fail(violation)
                            break
                        queue.push_used(head, VIRTIO_MEM_RESP_SIZE)
                        answered = True
                        now = time.perf_counter_ns()
                        times.append(now - started)
                        started = now
                except VirtqueueError:
                    self._malformed += 1
                    self._queue = None
                    raise  # the transport stops the queue, sets NEEDS_RESET and counts the reason
                except Exception as e:  # a bug here must not take the event loop down
                    log.exception("virtio-mem %s: internal error while handling requests", self.id)
                    self._internal_errors += 1
                    self._queue = None
                    transport.fail(f"virtio-mem-internal: {type(e).__name__}: {e}")
                finally:
                    if answered:
                        transport.signal_used(0)
                    self._run_deferred()
                    self._record_times(times)
        finally:
            self._fire_size_changes()

    # ------------------------------------------------------------------ request path
    def _short_chain(self, readable: int, writable: int) -> str | None:
        """The protocol violation of a chain too short for a request or its response, if any."""
        if readable < VIRTIO_MEM_REQ_SIZE:
            return f"virtio-mem-bad-request: request of {readable} bytes, expected {VIRTIO_MEM_REQ_SIZE}"
        if writable < VIRTIO_MEM_RESP_SIZE:
            return f"virtio-mem-bad-request: {writable} bytes for the response, need {VIRTIO_MEM_RESP_SIZE}"
        return None

    def _serve(self, chain: DescriptorChain, mem: GuestMemory) -> str | None:
        """Answer a chain of any other shape (lock held). Returns a reason if it violates the protocol."""
        # Its buffers may lie in this region: settle earlier answers first, so the blocks they
        # plugged are accessible (and unplugged ones are not) before reading or writing them.
        self._run_deferred()
        raw = chain.read_all(mem)  # bounded by max_chain_bytes; VirtqueueError if unbacked
        violation = self._short_chain(len(raw), chain.writable_len)
        if violation is not None:
            return violation
        # Only the type and the request-specific data count; padding is ignored (spec).
        resp, state = self._answer(*REQ_FORMAT.unpack_from(raw))
        chain.write(mem, RESP_FORMAT.pack(resp, state))
        return None

    def handle_request(self, req_type: int, addr: int, nb_blocks: int) -> tuple[int, int]:
        """Process one decoded request and its host work; returns (response type, state)."""
        try:
            with self._lock:
                resp_state = self._answer(req_type, addr, nb_blocks)
                self._run_deferred()
        finally:
            self._fire_size_changes()
        return resp_state

    def _answer(self, req_type: int, addr: int, nb_blocks: int) -> tuple[int, int]:
        """Answer one request (lock held); the host work it needs goes to `_deferred`.

        This is the part the guest waits for, so it only checks the request against the
        bitmap and updates it: making memory accessible or not, discarding it and
        (un)registering memslots follow the answer, in `_run_deferred`.
        """
        tracer = self.tracer
        if tracer.enabled:
            started, size_before = time.perf_counter_ns(), self._plugged_size
            tracer.emit("virtio-mem.request", id=self.id, type=REQ_NAMES.get(req_type, "unknown"), addr=addr,
                        nb_blocks=nb_blocks)
        state = 0  # only a STATE answer fills the state field
        if req_type == VIRTIO_MEM_REQ_PLUG:
            resp = self._plug(addr, nb_blocks)
        elif req_type == VIRTIO_MEM_REQ_UNPLUG:
            resp = self._unplug(addr, nb_blocks)
        elif req_type == VIRTIO_MEM_REQ_UNPLUG_ALL:
            resp = self._unplug_all()
        elif req_type == VIRTIO_MEM_REQ_STATE:
            resp, state = self._state(addr, nb_blocks)
        else:
            # QEMU treats an unknown type as a protocol violation and breaks the device;
            # the spec is silent. ERROR ("error in request") keeps the device usable.
            resp = VIRTIO_MEM_RESP_ERROR
        self._answers[req_type if req_type < UNKNOWN_REQ else UNKNOWN_REQ][resp] += 1
        if tracer.enabled:
            if self._plugged_size != size_before:  # the moment the size changed, for the trace
                tracer.emit("virtio-mem.size", id=self.id, size=self._plugged_size)
            self._trace_response(req_type, addr, nb_blocks, resp, state, time.perf_counter_ns() - started)
        return resp, state

    def _valid_range(self, addr: int, size: int) -> bool:
        """Block-aligned, non-empty, no wrap-around, entirely inside the usable region."""
        if addr % self.block_size or size <= 0 or addr + size > U64_MAX:
            return False
        return self.addr <= addr and addr + size <= self.addr + self._usable_region_size

    def _plug(self, addr: int, nb_blocks: int) -> int:
        size = nb_blocks * self.block_size
        if not self._valid_range(addr, size):
            return VIRTIO_MEM_RESP_ERROR
        if self._plugged_size + size > self._requested_size:
            return VIRTIO_MEM_RESP_NACK
        first = (addr - self.addr) // self.block_size
        if self._bitmap.count(1, first, first + nb_blocks):
            return VIRTIO_MEM_RESP_ERROR
        if self.prealloc:
            # prealloc=on promises the memory exists before the guest is told so: a host
            # that cannot provide it answers BUSY (Linux retries later), as QEMU does.
            offset = addr - self.addr
            try:
                self.mapping.protect(offset, size, True)
            except HostMemoryError as e:
                self._protect_failures += 1
                return self._busy(first, nb_blocks, f"cannot make {format_size(size)} at {addr:#x} accessible: {e}")
            try:
                self.mapping.populate(offset, size)
            except HostMemoryError as e:
                return self._busy(first, nb_blocks, f"cannot preallocate {format_size(size)} at {addr:#x}: {e}")
        self._bitmap[first:first + nb_blocks] = 1
        self._plugged_size += size
        self._deferred.append((VIRTIO_MEM_REQ_PLUG, first, nb_blocks, self._plugged_size))
        return VIRTIO_MEM_RESP_ACK

    def _busy(self, first: int, nb_blocks: int, why: str) -> int:
        """Refuse a PLUG the host cannot serve now: close its blocks again, answer BUSY."""
        self._warn_once("plug-busy", f"{why}; answering BUSY")
        self._release_runs(first, nb_blocks)
        return VIRTIO_MEM_RESP_BUSY

    def _unplug(self, addr: int, nb_blocks: int) -> int:
        size = nb_blocks * self.block_size
        if not self._valid_range(addr, size):
            return VIRTIO_MEM_RESP_ERROR
        first = (addr - self.addr) // self.block_size
        if self._bitmap.count(1, first, first + nb_blocks) != nb_blocks:
            return VIRTIO_MEM_RESP_ERROR
        self._bitmap[first:first + nb_blocks] = 0
        self._plugged_size -= size
        self._deferred.append((VIRTIO_MEM_REQ_UNPLUG, first, nb_blocks, self._plugged_size))
        return VIRTIO_MEM_RESP_ACK

    def _run_deferred(self) -> None:
        """Do the host work of the answered requests, in request order (lock held).

        Each step looks at the bitmap as the whole batch left it, so a block plugged and
        unplugged again in one batch ends up protected and discarded, and vice versa.
        """
        work, self._deferred = self._deferred, []
        if not work:
            return
        started = time.perf_counter_ns()
        for req_type, first, nb_blocks, size_after in work:
            self._events.append(self._size_event(size_after))
            if req_type == VIRTIO_MEM_REQ_PLUG:
                self._settle_plug(first, nb_blocks)
            else:
                self._settle_unplug(first, nb_blocks)
        self._after_ns_total += time.perf_counter_ns() - started
        self._after_batches += 1

    def _settle_plug(self, first: int, nb_blocks: int) -> None:
        """Make answered PLUG blocks accessible and register their memslots.

        Until then a guest access to them waits on the device lock: in the region's MMIO trap
        (slot not registered yet) or in `settle_fault` (slot registered, pages still PROT_NONE).
        Registering a slot waits for every vCPU to leave the guest (KVM synchronizes SRCU),
        hundreds of µs to ms with a running guest, which is why none of this precedes the answer.
        """
        self.slots.account_plug(first, nb_blocks)
        for value, start, stop in intervals(self._bitmap[first:first + nb_blocks]):
            if value:  # still plugged (a later request of the batch may have unplugged some)
                self._make_accessible(first + start, stop - start)
        try:
            # Only slots still holding plugged blocks, for the same reason.
            self.slots.map_for_plug(first, nb_blocks, in_use_only=True)
        except (MemslotError, OSError) as e:
            # The blocks stay plugged and the MMIO trap serves them, slowly but correctly.
            self._warn_once("plug-slot", f"cannot register a memslot for plugged memory; the guest's "
                            f"accesses to it are emulated (slow): {e}")

    def _settle_unplug(self, first: int, nb_blocks: int) -> None:
        """Protect and discard answered UNPLUG blocks, then drop the slots the UNPLUG emptied.

        The driver offlined and removed this memory before asking, so nothing it
        legitimately does touches it in between.
        """
        emptied = self.slots.count_unplug(first, nb_blocks)
        self._release_runs(first, nb_blocks)
        self.slots.unmap_unused(emptied)  # KVM deletes an emptied slot ~4x faster

    def _make_accessible(self, first: int, nb_blocks: int) -> bool:
        """Open plugged blocks to the guest and the VMM (PROT_READ|WRITE). A refusal is counted
        and the blocks are marked inaccessible: their PLUG is answered already, so a guest
        access to them stops the VM (`settle_fault`) and the VMM's own accesses are refused."""
        bs = self.block_size
        try:
            self.mapping.protect(first * bs, nb_blocks * bs, True)
        except HostMemoryError as e:
            self._protect_failures += 1
            self._inaccessible[first:first + nb_blocks] = 1
            self._any_inaccessible = True
            self._warn_once("protect-plugged", f"cannot make {format_size(nb_blocks * bs)} of plugged memory "
                            f"accessible; a guest access to it stops the VM: {e}")
            return False
        if self._any_inaccessible:
            self._forget_inaccessible(first, nb_blocks)
        return True

    def _forget_inaccessible(self, first: int, nb_blocks: int) -> None:
        self._inaccessible[first:first + nb_blocks] = 0
        self._any_inaccessible = self._inaccessible.any()

    def _release_runs(self, first: int, nb_blocks: int) -> None:
        """Protect and discard what of the blocks is unplugged (PROT_NONE first, so a misbehaving
        guest cannot fault pages back in between). Failures only lose the trap or keep the
        pages on the host: counted and logged, the blocks are unplugged regardless."""
        bs = self.block_size
        for value, start, stop in intervals(self._bitmap[first:first + nb_blocks]):
            if value:
                continue
            offset, size = (first + start) * bs, (stop - start) * bs
            try:
                self.mapping.protect(offset, size, False)
            except HostMemoryError as e:
                self._protect_failures += 1
                self._warn_once("protect-unplugged", f"cannot mprotect {format_size(size)} of unplugged "
                                f"memory; guest accesses to it go unnoticed: {e}")
            try:
                self.mapping.discard(offset, size)
            except HostMemoryError as e:
                self._discard_failures += 1
                self._warn_once("discard", f"cannot discard unplugged memory (the host keeps it): {e}")
            if self._any_inaccessible:
                self._forget_inaccessible(first + start, stop - start)

    def _unplug_all(self) -> int:
        self._run_deferred()  # earlier answers of the batch first: their work assumes their bitmap
        if self._plugged_size:
            bs = self.block_size
            plugged = [(start, stop) for value, start, stop in intervals(self._bitmap) if value]
            self._bitmap.setall(0)
            for start, stop in plugged:
                self._release_runs(start, stop - start)
            self._plugged_size = 0
            self.slots.clear()
            self._events.append(self._size_event(0))
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
            if self.tracer.enabled:  # also when unchanged: the control plane asked again
                self.tracer.emit("virtio-mem.requested-size", id=self.id, size=value)
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
            for req_type, row in enumerate(self._answers):
                kind = REQ_NAMES.get(req_type, "unknown")
                for resp, n in enumerate(row):
                    if n:
                        requests.setdefault(kind, {})[RESP_NAMES[resp]] = n
            return {"requests": requests, "malformed": self._malformed, "internal-errors": self._internal_errors,
                    "config-writes-ignored": self._config_writes,
                    "slot-adds": self.slots.stats.adds, "slot-removes": self.slots.stats.removes,
                    "slot-failures": self.slots.stats.failures, "slots-mapped": self.slots.mapped_count(),
                    "slot-size": self.slots.slot_size, "protect-failures": self._protect_failures,
                    "plugged-inaccessible": self._inaccessible.count(1),
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

    def _record_times(self, times: list[int]) -> None:
        """Count the host time of answered requests (lock held)."""
        if times:
            self._requests_timed += len(times)
            self._request_ns_total += sum(times)
            self._request_ns_max = max(self._request_ns_max, *times)
            self._request_ns_recent.extend(times)

    def system_reset(self) -> None:
        """Machine reset / reboot: unplug every block, drop every slot, discard the memory.

        The usable region is recomputed from the (kept) requested size, as QEMU does, so the
        guest re-plugs after it boots.
        """
        try:
            with self._lock:
                tracer = self.tracer
                if tracer.enabled:  # first, so the slot removals and size change below read as its doing
                    tracer.emit("virtio-mem.reset", id=self.id)
                had_blocks = self._plugged_size != 0
                self._unplug_all()
                if tracer.enabled and had_blocks:
                    tracer.emit("virtio-mem.size", id=self.id, size=0)
        finally:
            self._fire_size_changes()

    def close(self) -> None:
        """Remove the device's slots and release the region (device removal, tests)."""
        with self._lock:
            self._deferred.clear()
            self._inaccessible.setall(0)
            self._any_inaccessible = False
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
        if self.tracer.enabled:
            self.tracer.emit("unplugged-access", **event)
        if count == 1:
            log.warning("virtio-mem %s: guest accessed unplugged memory at %#x (%s)", self.id, gpa, kind)
        notify(self.unplugged_access_listener, [event], log, f"virtio-mem {self.id}: unplugged-access")
        return event

    def settle_fault(self, gpa: int) -> bool:
        """A vCPU faulted on `gpa`, which is plugged: KVM found its host page inaccessible.

        That happens when the access raced with the PLUG's host work (its answer goes out
        first); holding the lock means the work is done, so the access can simply be
        retried. The block is opened again in case the host refused before. False if it
        still refuses: the guest cannot be given this memory.
        """
        if not self.region_contains(gpa):
            return False
        with self._lock:
            block = (gpa - self.addr) // self.block_size
            return bool(self._bitmap[block]) and self._make_accessible(block, 1)

    def _trap_access(self, offset: int, size: int, data: bytes | None) -> bytes | None:
        """The MMIO trap's access at `offset` into the region; returns the data if it is plugged."""
        with self._lock:
            if self._any_inaccessible:  # the slot may be unregistered too: try again here
                self._retry_inaccessible(offset, size)
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
        if self._bitmap.count(1, first, last + 1) != last + 1 - first:
            return False
        return not self._any_inaccessible or not self._inaccessible.count(1, first, last + 1)

    def _retry_inaccessible(self, offset: int, size: int) -> None:
        """Try again to open the plugged-but-inaccessible blocks of an access (lock held)."""
        if 0 <= offset and 0 < size and offset + size <= self.region_size:
            first, last = offset // self.block_size, (offset + size - 1) // self.block_size
            for value, start, stop in intervals(self._inaccessible[first:last + 1]):
                if value:
                    self._make_accessible(first + start, stop - start)

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
    def _size_event(self, size: int) -> dict:
        return {"id": self.id, "size": size, "qom-path": self.qom_path}

    def trace_description(self) -> None:
        """The device's geometry and starting requested size, once, when tracing starts."""
        if self.tracer.enabled:
            self.tracer.emit("virtio-mem.device", id=self.id, addr=self.addr, region_size=self.region_size,
                             block_size=self.block_size, slot_size=self.slots.slot_size,
                             requested_size=self._requested_size)
            self.tracer.emit("virtio-mem.requested-size", id=self.id, size=self._requested_size)

    def _trace_response(self, req_type: int, addr: int, nb_blocks: int, resp: int, state: int, ns: int) -> None:
        fields = {"id": self.id, "type": REQ_NAMES.get(req_type, "unknown"), "addr": addr,
                  "nb-blocks": nb_blocks, "resp": RESP_NAMES[resp]}
        if req_type == VIRTIO_MEM_REQ_STATE and resp == VIRTIO_MEM_RESP_ACK:
            fields["state"] = STATE_NAMES.get(state, state)
        self.tracer.emit("virtio-mem.response", **fields, us=round(ns / 1000, 1))

    def _fire_size_changes(self) -> None:
        """Give the listener the size changes so far; called with the lock released."""
        with self._lock:
            events, self._events = self._events, []
        notify(self.size_change_listener, events, log, f"virtio-mem {self.id}: size-change")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("virtio-mem %s: %s", self.id, message)


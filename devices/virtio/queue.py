"""Split virtqueues, device side: take descriptor chains off the available ring, validate them,
and return them on the used ring.

Layout (VIRTIO 1.2, "Split Virtqueues"; Linux include/uapi/linux/virtio_ring.h):

* descriptor table: ``size`` x {le64 addr, le32 len, le16 flags, le16 next}, 16-byte aligned;
* available ring (driver area): le16 flags, le16 idx, le16 ring[size], le16 used_event;
* used ring (device area): le16 flags, le16 idx, {le32 id, le32 len} ring[size], le16 avail_event.

Everything the driver wrote is untrusted. A chain with an out-of-range descriptor index, a loop,
too many descriptors or bytes, a buffer outside guest memory, a bad indirect table or a
readable buffer after a writable one raises `VirtqueueError`, whose ``reason`` is a short key
for counting. After an error the queue is *broken*: ``pop()`` returns None until a new queue is
built (device reset).

Memory ordering: the ring indices are read and written as single aligned 16-bit accesses (so
a concurrently updated index is never torn), the used element is stored before the used
index, and where the protocol needs a store->load fence (publishing the used index / avail
event, then reading the driver's flags / index) `_full_barrier()` provides one.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field

from vmm.memory import GuestMemoryError

VRING_DESC_F_NEXT = 1
VRING_DESC_F_WRITE = 2
VRING_DESC_F_INDIRECT = 4
VRING_USED_F_NO_NOTIFY = 1
VRING_AVAIL_F_NO_INTERRUPT = 1

VIRTQ_MAX_SIZE = 32768  # the largest queue size the spec allows
VRING_DESC_SIZE = 16
VRING_DESC_ALIGN_SIZE = 16
VRING_AVAIL_ALIGN_SIZE = 2
VRING_USED_ALIGN_SIZE = 4
VRING_USED_ELEM_SIZE = 8
MAX_CHAIN_BYTES = (1 << 32) - 1  # the used ring's len is 32-bit: no chain may describe more

_DESC = struct.Struct("<QIHH")
_DESC_PAIR = struct.Struct("<QIHHQIHH")  # a two-entry indirect table
_USED_ELEM = struct.Struct("<II")

# Reasons (VirtqueueError.reason), the keys chain errors are counted by.
E_RING_RANGE = "ring-out-of-range"
E_BAD_QUEUE = "bad-queue-config"
E_AVAIL_JUMP = "avail-idx-jump"
E_DESC_INDEX = "desc-index-out-of-range"
E_LOOP = "chain-loop"
E_GPA = "gpa-out-of-range"
E_TOO_LARGE = "chain-too-large"
E_READ_AFTER_WRITE = "readable-after-writable"
E_INDIRECT_NOT_NEGOTIATED = "indirect-not-negotiated"
E_NESTED_INDIRECT = "nested-indirect"
E_BAD_INDIRECT = "bad-indirect"
E_WRITE_READONLY = "write-to-read-only"
E_WRITABLE_TOO_SMALL = "writable-too-small"

_BARRIER_LOCK = threading.Lock()


def _full_barrier() -> None:
    """A full memory fence between our ring stores and the loads that follow them.

    Python has no fence primitive; taking a lock executes an atomic read-modify-write
    (lock-prefixed on x86), which orders all earlier stores before all later loads.
    """
    _BARRIER_LOCK.acquire()
    _BARRIER_LOCK.release()


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """The event-index test: did the index move past `event_idx` going from old to new?"""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)


class VirtqueueError(Exception):
    """A malformed descriptor chain or ring: out-of-range GPA, loop, too long, bad indirect,
    write to read-only. ``reason`` is the short key it is counted by; ``str()`` is
    "reason: detail", so passing it to `TransportCallbacks.fail` counts the same key."""

    def __init__(self, detail: str, reason: str = "malformed-chain") -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _segments(mem, gpa: int, length: int) -> list[tuple[int, int]]:
    """Split [gpa, gpa+length) into pieces that each lie in one memory region.

    One buffer may straddle two adjacent memslots (e.g. two plugged virtio-mem blocks), which
    GuestMemory refuses as a single access. Raises VirtqueueError if any byte is unbacked.
    """
    if length == 0:
        return []
    if gpa < 0 or length < 0 or gpa + length > 1 << 64:
        raise VirtqueueError(f"buffer {gpa:#x}+{length:#x} wraps the address space", E_GPA)
    lookup = getattr(getattr(mem, "slots", None), "lookup", None)
    if lookup is None:  # a memory without slots: let it say whether it backs the range
        try:
            mem.view(gpa, length)
            return [(gpa, length)]
        except GuestMemoryError:
            raise VirtqueueError(f"buffer {gpa:#x}+{length:#x} is not in guest memory", E_GPA) from None
    slot = lookup(gpa)
    if slot is not None and gpa + length <= slot.end:
        return [(gpa, length)]
    pieces = []
    addr, end = gpa, gpa + length
    while addr < end:
        slot = lookup(addr)
        if slot is None or slot.end <= addr:
            raise VirtqueueError(f"buffer {gpa:#x}+{length:#x} is not in guest memory "
                                 f"(first hole at {addr:#x})", E_GPA)
        n = min(end, slot.end) - addr
        pieces.append((addr, n))
        addr += n
    return pieces


def _read_buffer(mem, gpa: int, length: int) -> bytes:
    return b"".join(mem.read(a, n) for a, n in _segments(mem, gpa, length))


def _write_buffer(mem, gpa: int, data: bytes) -> None:
    pos = 0
    for a, n in _segments(mem, gpa, len(data)):
        mem.write(a, data[pos:pos + n])
        pos += n


@dataclass
class DescriptorChain:
    """One request: its head index (what goes back on the used ring) and its buffers, as
    (guest-physical address, length) pairs, device-readable ones first."""

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        return sum(n for _, n in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)

    def read_all(self, mem) -> bytes:
        """The concatenated device-readable buffers."""
        try:
            return b"".join(_read_buffer(mem, a, n) for a, n in self.readable)
        except GuestMemoryError as e:  # memory went away since pop() checked it
            raise VirtqueueError(str(e), E_GPA) from None

    def write(self, mem, data: bytes) -> int:
        """Scatter `data` over the device-writable buffers; returns the bytes written.

        Raises VirtqueueError (nothing written) if the writable buffers cannot hold it.
        """
        capacity = self.writable_len
        if len(data) > capacity:
            reason = E_WRITE_READONLY if not self.writable else E_WRITABLE_TOO_SMALL
            raise VirtqueueError(f"chain {self.head}: {len(data)} bytes to write, "
                                 f"{capacity} writable", reason)
        pos = 0
        try:
            for a, n in self.writable:
                if pos >= len(data):
                    break
                chunk = data[pos:pos + n]
                _write_buffer(mem, a, chunk)
                pos += len(chunk)
        except GuestMemoryError as e:
            raise VirtqueueError(str(e), E_GPA) from None
        return pos


class Virtqueue:
    """The device side of one split virtqueue.

    ``size == 0`` makes a disabled placeholder (a queue the driver did not set up): ``pop()``
    returns None and ``push()`` drops. Methods are thread-safe (one internal lock).
    """

    def __init__(self, mem, size: int, desc_addr: int, avail_addr: int, used_addr: int,
                 event_idx: bool = False, *, indirect: bool = True,
                 max_chain_bytes: int = MAX_CHAIN_BYTES) -> None:
        self.mem = mem
        self.size = size
        self.desc_addr = desc_addr
        self.avail_addr = avail_addr
        self.used_addr = used_addr
        self.event_idx = event_idx
        self.indirect = indirect
        self.max_chain_bytes = min(max_chain_bytes, MAX_CHAIN_BYTES)
        self.last_avail_idx = 0   # next available-ring entry to take (free-running, mod 2^16)
        self.used_idx = 0         # next used-ring entry to fill (free-running, mod 2^16)
        self.broken: str | None = None  # the reason of the first error; the queue is stopped
        self.enabled = size > 0
        self.popped = 0
        self.pushed = 0
        self.dropped = 0          # pushes after the queue was disabled or broken
        self._signalled_used = 0  # used_idx when the interrupt decision was last taken
        self._lock = threading.Lock()
        # Views of the three ring areas when they lie in memory that cannot go away (boot
        # RAM): each ring access is then one memoryview index instead of a memslot lookup.
        self._desc_view: memoryview | None = None
        self._avail16: memoryview | None = None
        self._used_view: memoryview | None = None
        self._used16: memoryview | None = None
        # The boot-RAM memslot holding the rings, for `pop_pair`: its first GPA, end and view.
        self._ram_base = self._ram_end = 0
        self._ram: memoryview | None = None
        if size:
            self._validate_layout()
            self._cache_ring_views()

    def _validate_layout(self) -> None:
        size = self.size
        if not 0 < size <= VIRTQ_MAX_SIZE or size & (size - 1):
            raise VirtqueueError(f"queue size {size} is not a power of two <= {VIRTQ_MAX_SIZE}", E_BAD_QUEUE)
        for name, addr, align in (("descriptor table", self.desc_addr, VRING_DESC_ALIGN_SIZE),
                                  ("available ring", self.avail_addr, VRING_AVAIL_ALIGN_SIZE),
                                  ("used ring", self.used_addr, VRING_USED_ALIGN_SIZE)):
            if addr % align:
                raise VirtqueueError(f"{name} at {addr:#x} is not {align}-byte aligned", E_BAD_QUEUE)
        for name, addr, length in (("descriptor table", self.desc_addr, VRING_DESC_SIZE * size),
                                   ("available ring", self.avail_addr, 6 + 2 * size),
                                   ("used ring", self.used_addr, 6 + VRING_USED_ELEM_SIZE * size)):
            try:
                _segments(self.mem, addr, length)
            except VirtqueueError:
                raise VirtqueueError(f"{name} {addr:#x}+{length:#x} is not in guest memory", E_RING_RANGE) from None

    def _cache_ring_views(self) -> None:
        stable_view = getattr(self.mem, "stable_view", None)
        if stable_view is None:
            return
        size = self.size
        desc = stable_view(self.desc_addr, VRING_DESC_SIZE * size)
        avail = stable_view(self.avail_addr, 6 + 2 * size)
        used = stable_view(self.used_addr, 6 + VRING_USED_ELEM_SIZE * size)
        if desc is None or avail is None or used is None:
            return
        self._desc_view, self._avail16 = desc, avail.cast("H")
        self._used_view, self._used16 = used, used.cast("H")
        region = self.mem.stable_region(self.desc_addr)
        if region is not None:
            self._ram_base, self._ram = region
            self._ram_end = self._ram_base + len(self._ram)

    # --- ring field access -------------------------------------------------------------
    # The avail ring as 16-bit words: 0 flags, 1 idx, 2.. ring[size], 2+size used_event.
    # The used ring as 16-bit words: 0 flags, 1 idx, then elements, 2+4*size avail_event.
    def _avail_u16(self, word: int) -> int:
        view = self._avail16
        if view is not None:
            return view[word]
        return self._load_u16(self.avail_addr + 2 * word)

    def _store_used_u16(self, word: int, value: int) -> None:
        view = self._used16
        if view is not None:
            view[word] = value & 0xFFFF
            return
        self._store_u16(self.used_addr + 2 * word, value)

    def _load_u16(self, gpa: int) -> int:
        try:
            return self.mem.view(gpa, 2).cast("H")[0]
        except GuestMemoryError as e:
            raise VirtqueueError(str(e), E_RING_RANGE) from None

    def _store_u16(self, gpa: int, value: int) -> None:
        try:
            self.mem.view(gpa, 2).cast("H")[0] = value & 0xFFFF
        except GuestMemoryError as e:
            raise VirtqueueError(str(e), E_RING_RANGE) from None

    def _read_desc(self, table: int, index: int) -> tuple[int, int, int, int]:
        view = self._desc_view
        if view is not None and table == self.desc_addr:  # the caller checked index < size
            return _DESC.unpack_from(view, VRING_DESC_SIZE * index)
        try:
            return _DESC.unpack(self.mem.read(table + VRING_DESC_SIZE * index, VRING_DESC_SIZE))
        except GuestMemoryError as e:
            raise VirtqueueError(str(e), E_RING_RANGE) from None

    # --- public API ---------------------------------------------------------------------
    def disable(self) -> None:
        """Stop using the rings (queue disabled or device reset); later pops/pushes do nothing."""
        with self._lock:
            self.enabled = False

    def pop(self) -> DescriptorChain | None:
        """The next available chain, validated, or None if there is none (or the queue is stopped)."""
        with self._lock:
            if not self.enabled or self.broken:
                return None
            try:
                return self._pop()
            except VirtqueueError as e:
                self.broken = e.reason
                raise

    def pop_pair(self) -> tuple[int, memoryview, memoryview] | None:
        """The next chain if it has the common request/response shape, as (head, readable,
        writable) views; else None, and nothing is taken: the caller goes on with `pop()`.

        The shape is one device-readable buffer then one device-writable buffer, as two
        chained descriptors or a two-entry indirect table (what Linux's virtqueue_add_sgs
        builds for one out and one in buffer), with the table and both buffers in the
        boot-RAM memslot that holds the rings. Such a chain needs none of `pop()`'s general
        walk: a few bounds checks make it as safe, and every other chain, malformed ones
        included, is left for `pop()` to validate and reject. The views stay valid (boot RAM).
        """
        ram = self._ram
        if ram is None:
            return None
        base, end = self._ram_base, self._ram_end
        with self._lock:
            if not self.enabled or self.broken:
                return None
            avail, size, idx = self._avail16, self.size, self.last_avail_idx
            if not 0 < (avail[1] - idx) & 0xFFFF <= size:
                return None
            head = avail[2 + idx % size]
            if head >= size:
                return None
            addr, length, flags, nxt = _DESC.unpack_from(self._desc_view, VRING_DESC_SIZE * head)
            if flags == VRING_DESC_F_INDIRECT:
                if (not self.indirect or length != 2 * VRING_DESC_SIZE or addr % VRING_DESC_ALIGN_SIZE
                        or addr < base or addr + length > end):
                    return None
                out_addr, out_len, out_flags, out_next, in_addr, in_len, in_flags, _ = \
                    _DESC_PAIR.unpack_from(ram, addr - base)
                if out_next != 1:
                    return None
            elif flags == VRING_DESC_F_NEXT and nxt < size:
                out_addr, out_len, out_flags = addr, length, flags
                in_addr, in_len, in_flags, _ = _DESC.unpack_from(self._desc_view, VRING_DESC_SIZE * nxt)
            else:
                return None
            if (out_flags != VRING_DESC_F_NEXT or in_flags != VRING_DESC_F_WRITE
                    or out_addr < base or out_addr + out_len > end or in_addr < base or in_addr + in_len > end
                    or out_len + in_len > self.max_chain_bytes):
                return None
            self.last_avail_idx = idx = (idx + 1) & 0xFFFF
            if self.event_idx:
                self._used16[2 + 4 * size] = idx
            self.popped += 1
        out_at, in_at = out_addr - base, in_addr - base
        return head, ram[out_at:out_at + out_len], ram[in_at:in_at + in_len]

    def push(self, chain: DescriptorChain, written: int) -> None:
        """Return `chain` to the driver, `written` bytes having been written into it."""
        if not 0 <= written <= chain.writable_len:
            raise ValueError(f"chain {chain.head}: written={written}, but only {chain.writable_len} bytes are writable")
        self.push_used(chain.head, written)

    def push_used(self, head: int, written: int) -> None:
        """Put (head, written) on the used ring: `push` for a chain taken by `pop_pair`, whose
        writable view bounds what the device could write."""
        if not 0 <= head < self.size:
            raise ValueError(f"chain head {head} is not a descriptor of this {self.size}-entry queue")
        with self._lock:
            if not self.enabled or self.broken:
                self.dropped += 1
                return
            try:
                slot = self.used_idx % self.size
                elem_at = 4 + VRING_USED_ELEM_SIZE * slot
                if self._used_view is not None:
                    _USED_ELEM.pack_into(self._used_view, elem_at, head, written)
                else:
                    try:
                        self.mem.write(self.used_addr + elem_at, _USED_ELEM.pack(head, written))
                    except GuestMemoryError as e:
                        raise VirtqueueError(str(e), E_RING_RANGE) from None
                # The element is stored before the index that publishes it (x86 keeps store order).
                self.used_idx = (self.used_idx + 1) & 0xFFFF
                self._store_used_u16(1, self.used_idx)
                self.pushed += 1
            except VirtqueueError as e:
                self.broken = e.reason
                raise

    def needs_interrupt(self) -> bool:
        """Whether the driver wants an interrupt for what was pushed since the last call
        (VRING_AVAIL_F_NO_INTERRUPT, or used_event with VIRTIO_RING_F_EVENT_IDX)."""
        with self._lock:
            if not self.enabled or self.broken:
                return False
            new, old = self.used_idx, self._signalled_used
            if new == old:
                return False
            self._signalled_used = new
            _full_barrier()  # our used-idx store must be visible before we read the driver's wish
            try:
                if self.event_idx:
                    return vring_need_event(self._avail_u16(2 + self.size), new, old)
                return not self._avail_u16(0) & VRING_AVAIL_F_NO_INTERRUPT
            except VirtqueueError as e:
                self.broken = e.reason
                raise

    def stats(self) -> dict:
        return {"size": self.size, "enabled": self.enabled, "broken": self.broken,
                "last-avail-idx": self.last_avail_idx, "used-idx": self.used_idx,
                "popped": self.popped, "pushed": self.pushed, "dropped": self.dropped}

    # --- internals ----------------------------------------------------------------------
    def _pending(self) -> int:
        avail_idx = self._avail_u16(1)
        pending = (avail_idx - self.last_avail_idx) & 0xFFFF
        if pending > self.size:
            raise VirtqueueError(f"avail idx {avail_idx} is {pending} ahead of {self.last_avail_idx}, "
                                 f"more than the queue size {self.size}", E_AVAIL_JUMP)
        return pending

    def _pop(self) -> DescriptorChain | None:
        avail_event = 2 + 4 * self.size  # the used ring's 16-bit word after its elements
        if not self._pending():
            if not self.event_idx:
                return None
            # Ask to be notified of the next buffer, then look again: the driver may have
            # added one after our first look but before it could see the new avail_event.
            self._store_used_u16(avail_event, self.last_avail_idx)
            _full_barrier()
            if not self._pending():
                return None
        slot = self.last_avail_idx % self.size
        head = self._avail_u16(2 + slot)
        chain = self._walk(head)
        self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
        if self.event_idx:
            self._store_used_u16(avail_event, self.last_avail_idx)
        self.popped += 1
        return chain

    def _walk(self, head: int) -> DescriptorChain:
        chain = DescriptorChain(head)
        table, table_len, in_indirect = self.desc_addr, self.size, False
        index, count, total = head, 0, 0
        while True:
            if index >= table_len:
                where = "indirect table" if in_indirect else "descriptor table"
                raise VirtqueueError(f"chain {head}: descriptor index {index} outside the "
                                     f"{table_len}-entry {where}", E_DESC_INDEX)
            count += 1
            if count > table_len:
                raise VirtqueueError(f"chain {head}: more than {table_len} descriptors (a loop)", E_LOOP)
            addr, length, flags, nxt = self._read_desc(table, index)
            if flags & VRING_DESC_F_INDIRECT:
                if in_indirect:
                    raise VirtqueueError(f"chain {head}: indirect descriptor inside an indirect table",
                                         E_NESTED_INDIRECT)
                if not self.indirect:
                    raise VirtqueueError(f"chain {head}: indirect descriptor, but "
                                         "VIRTIO_RING_F_INDIRECT_DESC was not negotiated",
                                         E_INDIRECT_NOT_NEGOTIATED)
                if flags & VRING_DESC_F_NEXT:
                    raise VirtqueueError(f"chain {head}: descriptor has both INDIRECT and NEXT", E_BAD_INDIRECT)
                entries = length // VRING_DESC_SIZE
                if length == 0 or length % VRING_DESC_SIZE or entries > VIRTQ_MAX_SIZE:
                    raise VirtqueueError(f"chain {head}: indirect table length {length:#x} is not a "
                                         f"multiple of {VRING_DESC_SIZE} in 16..{VIRTQ_MAX_SIZE * 16}",
                                         E_BAD_INDIRECT)
                if addr % VRING_DESC_ALIGN_SIZE:
                    raise VirtqueueError(f"chain {head}: indirect table at {addr:#x} is misaligned", E_BAD_INDIRECT)
                _segments(self.mem, addr, length)  # raises E_GPA; entries are read one by one
                table, table_len, in_indirect = addr, entries, True
                index, count = 0, 0
                continue
            total += length
            if total > self.max_chain_bytes:
                raise VirtqueueError(f"chain {head}: describes more than {self.max_chain_bytes} bytes", E_TOO_LARGE)
            _segments(self.mem, addr, length)  # raises E_GPA for an unbacked buffer
            if flags & VRING_DESC_F_WRITE:
                chain.writable.append((addr, length))
            elif chain.writable:
                raise VirtqueueError(f"chain {head}: device-readable buffer after a device-writable one",
                                     E_READ_AFTER_WRITE)
            else:
                chain.readable.append((addr, length))
            if not flags & VRING_DESC_F_NEXT:
                return chain
            index = nxt

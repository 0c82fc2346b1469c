"""Test doubles for the hv-balloon device: a VMBus channel, the host-memory backends, and a
model of the Linux guest driver (drivers/hv/hv_balloon.c) that speaks the DM protocol.

`LinuxDmGuest` does what the driver does, step for step where it matters to the host:
- the handshake: DM_VERSION_REQUEST with WIN10 first, then WIN8, then WIN7 (last attempt),
  then DM_CAPABILITIES_REPORT with balloon, hot_add and the memory-block alignment;
- balloon_up(): refuses to go below its floor, allocates 2 MiB units (512 pages, aligned)
  while it can and single pages after, answers in DM_BALLOON_RESPONSEs of at most 510 ranges
  (one 4 KiB buffer) with more_pages = 1 until the last;
- balloon_down(): frees the ranges of every DM_UNBALLOON_REQUEST and answers once, after the
  one with more_pages = 0; it checks that it only gets back pages it gave (the real driver
  would free pages it never owned);
- hot_add_req(): adds the range if it is aligned to its block size and answers page_count
  and result = 1 (or what the test told it to answer).
"""

from __future__ import annotations

import threading

from devices.hyperv.balloon_protocol import (
    DM_MAX_RANGES_PER_MESSAGE,
    DM_MESSAGE_MAX_SIZE,
    DYNMEM_PROTOCOL_VERSION_WIN7,
    DYNMEM_PROTOCOL_VERSION_WIN8,
    DYNMEM_PROTOCOL_VERSION_WIN10,
    BalloonRequest,
    BalloonResponse,
    CapabilitiesReport,
    CapabilitiesResponse,
    HotAddRequest,
    HotAddResponse,
    InfoMessage,
    PageRange,
    StatusReport,
    UnballoonRequest,
    UnballoonResponse,
    VersionRequest,
    VersionResponse,
    parse,
)
from devices.hyperv.page_ranges import PageRanges

PAGE = 4096
PAGES_IN_2M = 512


class FakeChannel:
    """Records what the device sends; `full` makes send() answer False (ring full)."""

    def __init__(self, relid: int = 7) -> None:
        self.relid = relid
        self.sent: list[tuple[bytes, int]] = []
        self.log: list = []  # every message ever sent, parsed
        self.full = False
        self.refused = 0
        self._lock = threading.Lock()

    def send(self, payload: bytes, trans_id: int = 0, completion_requested: bool = False) -> bool:
        assert len(payload) <= DM_MESSAGE_MAX_SIZE, "a host message larger than the guest's receive buffer"
        with self._lock:
            if self.full:
                self.refused += 1
                return False
            self.sent.append((bytes(payload), trans_id))
            self.log.append(parse(payload))
            return True

    def take(self) -> list:
        """The messages sent since the last take(), parsed."""
        with self._lock:
            sent, self.sent = self.sent, []
        return [parse(p) for p, _ in sent]


class FakeMemory:
    """BalloonMemory: records discards and reclaims as (gpa, size)."""

    def __init__(self) -> None:
        self.discards: list[tuple[int, int]] = []
        self.reclaims: list[tuple[int, int]] = []
        self.fail_discard = False

    def discard(self, gpa: int, size: int) -> None:
        if self.fail_discard:
            raise OSError(22, "Invalid argument")
        self.discards.append((gpa, size))

    def reclaim(self, gpa: int, size: int) -> None:
        self.reclaims.append((gpa, size))

    def discarded_pages(self) -> set[int]:
        return {p for gpa, size in self.discards for p in range(gpa // PAGE, (gpa + size) // PAGE)}


class FakeHotAdd:
    """HotAddMemory: records map() calls; `fail` makes the next map raise."""

    def __init__(self) -> None:
        self.maps: list[tuple[int, int]] = []
        self.unmaps = 0
        self.fail = False

    def map(self, gpa: int, size: int) -> None:
        if self.fail:
            self.fail = False
            raise OSError(28, "No space left on device")
        self.maps.append((gpa, size))

    def unmap_all(self) -> None:
        self.unmaps += 1
        self.maps.clear()


class LinuxDmGuest:
    """The guest side of the DM protocol, as Linux's hv_balloon driver behaves."""

    def __init__(self, device, channel: FakeChannel, ram: list[tuple[int, int]], *, floor_pages: int = 0,
                 balloon: bool = True, hot_add: bool = True, alignment: int = 7) -> None:
        self.device = device
        self.channel = channel
        self.free = PageRanges()  # pages the guest could give up
        for gpa, size in ram:
            self.free.add(gpa // PAGE, size // PAGE)
        self.floor_pages = floor_pages
        self.balloon_cap, self.hot_add_cap, self.alignment = balloon, hot_add, alignment
        self.ballooned = PageRanges()  # pages it gave the host (offline)
        self.added: list[PageRange] = []
        self.trans_id = 0
        self.version: int | None = None
        self.info: list[InfoMessage] = []
        self.responses: list[BalloonResponse] = []
        self.hot_add_answer: tuple[int, int] | None = None  # (page_count, result) to answer instead
        self.pending_unballoon = False
        self.unballoon_responses = 0

    # --- sending
    def _next(self) -> int:
        self.trans_id += 1
        return self.trans_id

    def send(self, msg) -> None:
        self.device.packet(self.channel, msg.pack(), 0)

    # --- handshake
    def connect(self, versions: tuple[int, ...] = (DYNMEM_PROTOCOL_VERSION_WIN10, DYNMEM_PROTOCOL_VERSION_WIN8,
                                                   DYNMEM_PROTOCOL_VERSION_WIN7)) -> bool:
        self.device.opened(self.channel)
        for i, version in enumerate(versions):
            self.send(VersionRequest(self._next(), version, i == len(versions) - 1))
            (resp,) = self.channel.take()
            assert isinstance(resp, VersionResponse) and resp.trans_id == self.trans_id
            if resp.is_accepted:
                self.version = version
                break
        else:
            return False
        self.send(CapabilitiesReport(self._next(), self.balloon_cap, self.hot_add_cap, self.alignment))
        msgs = self.channel.take()
        assert isinstance(msgs[0], CapabilitiesResponse) and msgs[0].is_accepted and msgs[0].trans_id == self.trans_id
        self.handle(msgs[1:])
        return True

    def status(self, avail: int, committed: int) -> None:
        self.send(StatusReport(self._next(), avail, committed))

    # --- the host's requests
    def run(self, limit: int = 10_000) -> int:
        """Answer what the host sent until it sends nothing more; returns messages handled."""
        handled = 0
        while self.channel.sent and handled < limit:
            msgs = self.channel.take()
            handled += len(msgs)
            self.handle(msgs)
        return handled

    def handle(self, msgs: list) -> None:
        for msg in msgs:
            if isinstance(msg, InfoMessage):
                self.info.append(msg)
            elif isinstance(msg, BalloonRequest):
                self.balloon_up(msg.num_pages)
            elif isinstance(msg, UnballoonRequest):
                self.balloon_down(msg)
            elif isinstance(msg, HotAddRequest):
                self.hot_add(msg)
            else:
                raise AssertionError(f"the guest did not expect {msg}")

    def _alloc(self, unit: int) -> int | None:
        if unit == 1:
            taken = self.free.take(1)
            return taken[0][0] if taken else None
        for start, count in reversed(list(self.free)):
            first = -(-start // unit) * unit
            if first + unit <= start + count:
                self.free.remove(first, unit)
                return first
        return None

    def balloon_up(self, num_pages: int) -> None:
        avail = self.free.pages
        if avail < num_pages or avail - num_pages < self.floor_pages:
            num_pages = avail - self.floor_pages if avail > self.floor_pages else 0
        alloc_unit = PAGES_IN_2M
        num_ballooned = 0
        while True:
            num_pages -= num_ballooned
            ranges: list[PageRange] = []
            for _ in range(num_pages // alloc_unit):
                if len(ranges) == DM_MAX_RANGES_PER_MESSAGE:
                    break
                pfn = self._alloc(alloc_unit)
                if pfn is None:
                    break
                ranges.append(PageRange(pfn, alloc_unit))
            num_ballooned = len(ranges) * alloc_unit
            if alloc_unit != 1 and num_ballooned == 0:
                alloc_unit = 1
                continue
            done = num_ballooned == 0 or num_ballooned == num_pages
            for r in ranges:
                self.ballooned.add(r.start, r.count)
            resp = BalloonResponse(self._next(), not done, tuple(ranges))
            self.responses.append(resp)
            before = len(self.channel.log)
            self.send(resp)
            if not done:
                assert len(self.channel.log) == before, "the host sent something before the last balloon response"
            if done:
                return

    def balloon_down(self, msg: UnballoonRequest) -> None:
        for r in msg.ranges:
            assert self.ballooned.covers(r.start, r.count), f"host returned pages the guest never gave: {r}"
            self.ballooned.remove(r.start, r.count)
            self.free.add(r.start, r.count)
        if msg.more_pages:
            self.pending_unballoon = True
            return
        self.pending_unballoon = False
        self.unballoon_responses += 1
        self.send(UnballoonResponse(self._next()))

    def hot_add(self, msg: HotAddRequest) -> None:
        align = (1 << self.alignment) * 256
        r = msg.range
        assert r.start % align == 0 and r.count % align == 0, f"hot-add {r} not aligned to {align} pages"
        assert msg.region is None or msg.region == r
        if self.hot_add_answer is not None:
            page_count, result = self.hot_add_answer
        else:
            page_count, result = r.count, 1
        if result and page_count:
            n = min(page_count, r.count)
            self.free.add(r.start, n)
            self.added.append(PageRange(r.start, n))
        self.send(HotAddResponse(self._next(), page_count, result))

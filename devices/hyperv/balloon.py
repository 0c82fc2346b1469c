"""The hv-balloon device: the host side of the Hyper-V Dynamic Memory protocol.

The guest's driver (Linux drivers/hv/hv_balloon.c) opens the VMBus channel and leads the
handshake; the host answers and then drives the guest towards a target size:

    guest: DM_VERSION_REQUEST (2.0 first, then 1.0, then 0.3 as its last attempt)
    host:  DM_VERSION_RESPONSE            accepted for WIN10 2.0, WIN8 1.0 and WIN7 0.3
    guest: DM_CAPABILITIES_REPORT         balloon, hot_add, hot_add_alignment (2**n MiB)
    host:  DM_CAPABILITIES_RESPONSE       always accepted; then DM_INFO_MESSAGE (>= 1.0) with
                                          the most pages the guest can ever have
    guest: DM_STATUS_REPORT               about once a second (after 45 s on Linux)
    host:  DM_BALLOON_REQUEST  -> guest: DM_BALLOON_RESPONSE ... (more_pages=1), last with 0
    host:  DM_UNBALLOON_REQUEST ... (more_pages=1), last with 0 -> guest: DM_UNBALLOON_RESPONSE
    host:  DM_MEM_HOT_ADD_REQUEST        -> guest: DM_MEM_HOT_ADD_RESPONSE

Size and target. The guest's size is boot RAM + hot-added - ballooned, the figure QMP
`query-balloon` reports as `actual`; `set_target` (QMP `balloon`) sets the size to reach.
Below it: DM_BALLOON_REQUESTs of at most BALLOON_REQUEST_MAX_PAGES, one at a time, the next
one only after the response with more_pages == 0. Above it: first unballoon (ranges taken
from the ballooned set), then hot-add from the hot-add region, in chunks aligned to what the
guest reported. One request is in flight at a time; a target changed meanwhile is taken up
when it completes. A balloon transaction in which the guest gives nothing means it is at its
floor: the device stops asking until the next `set_target`. A hot-add the guest answers with
fewer pages than asked (result 1) is permanent ("assume all further hot add requests will
fail"); one it fails (result 0) is transient: both stop hot-add, the next `set_target`
retries only the transient kind, a machine reset clears both.

Trust. Every range a guest returns is checked: it must lie in boot RAM or in the part of the
hot-add region already added, must not be ballooned already (a double free), and must come
while a balloon request is outstanding. A bad range is refused whole, counted by kind, and
never discarded. A malformed message (`balloon_protocol.DmProtocolError`) is refused and
counted by kind; a message in the wrong state is counted as unexpected. Nothing a guest
sends raises out of `packet`.

Host memory. Accepted ranges go into the ballooned `PageRanges` and are discarded through
`BalloonMemory.discard`; unballooned ranges leave the set and go through
`BalloonMemory.reclaim` before the request is sent. The hot-add region is mapped through
`HotAddMemory.map` just before each hot-add request, and dropped by `HotAddMemory.unmap_all`
at a machine reset. These hooks run with the device lock held (see `balloon_memory`).

Sending. `channel.send` is never called with the device lock held (the VMBus layer may hold
its own lock while it calls `packet`). Messages go through a small outbox flushed in order
after each `packet`, `set_target` and `poll`; when `send` returns False (ring full, channel
closing) the message stays at the head of the outbox and is retried on the next guest
packet or `poll()` call. Linux sends a status report every second, so the outbox drains by
itself once the driver runs; the machine should still call `poll()` from time to time (for
instance when the guest signals that it read from its inbound ring). The status listener is
also called without the lock.

Channel close and machine reset. `closed()` ends the protocol session: pending requests and
the outbox are dropped, the negotiated version and capabilities and the last status report
are forgotten, and the ballooned set is emptied (a new driver instance does not know those
pages; Linux keeps them offline and never returns them, so forgetting them is safe, while
handing them back to a new instance would free pages it never allocated). Hot-added memory
stays mapped and counted on `closed()`: a guest that merely unbinds the driver (or kexecs)
keeps using it, and removing its memslots would crash it. `reset()` (machine reset, reboot)
returns to boot size: both sets emptied, the hot-add slots dropped, the target forgotten.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import Counter, deque
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from devices.hyperv.balloon_memory import BalloonMemory, HotAddMemory
from devices.hyperv.balloon_protocol import (
    DM_MAX_RANGES_PER_MESSAGE,
    DYNMEM_MAJOR_VERSION,
    DYNMEM_MINOR_VERSION,
    DYNMEM_PROTOCOL_VERSION_WIN7,
    DYNMEM_PROTOCOL_VERSION_WIN8,
    DYNMEM_PROTOCOL_VERSION_WIN10,
    HV_HYP_PAGE_SIZE,
    PAGE_RANGE_MAX_COUNT,
    BalloonRequest,
    BalloonResponse,
    CapabilitiesReport,
    CapabilitiesResponse,
    DmProtocolError,
    HotAddRequest,
    HotAddResponse,
    InfoMessage,
    PageRange,
    StatusReport,
    UnballoonRequest,
    UnballoonResponse,
    VersionRequest,
    VersionResponse,
    message_name,
    parse,
)
from devices.hyperv.interfaces import VmbusChannel
from devices.hyperv.page_ranges import PageRanges
from devices.listeners import notify
from vmm.tracing import NULL_TRACER, AnyTracer

log = logging.getLogger("pyvmm.hv-balloon")

# The interface type GUID Linux matches (HV_DM_GUID, include/linux/hyperv.h). Kept as a
# uuid.UUID in its canonical text form; on the wire (VMBus offers) a GUID is a guid_t, whose
# first three fields are little endian: `HV_DM_GUID.bytes_le` ==
# dc 74 50 52 85 89 e2 46 80 57 a3 07 dc 18 a5 02. The VMBus layer does that serialisation.
HV_DM_GUID = uuid.UUID("525074dc-8985-46e2-8057-a307dc18a502")

SUPPORTED_VERSIONS = (DYNMEM_PROTOCOL_VERSION_WIN10, DYNMEM_PROTOCOL_VERSION_WIN8, DYNMEM_PROTOCOL_VERSION_WIN7)

PAGE = HV_HYP_PAGE_SIZE
PAGES_PER_MIB = (1 << 20) // PAGE
# Pages per DM_BALLOON_REQUEST. Linux takes any u32 (it answers in as many 4 KiB responses
# as it needs, 510 ranges each); Windows stops honouring requests above 585728 pages (QEMU's
# HV_BALLOON_HR_CHUNK_PAGES), so the device never asks for more at once.
BALLOON_REQUEST_MAX_PAGES = 585728
# Pages per DM_UNBALLOON_REQUEST message (2 GiB). Linux frees them page by page in its channel
# callback, so huge messages would stall it; a message also holds at most 510 ranges.
UNBALLOON_MAX_PAGES_PER_MESSAGE = (2 << 30) // PAGE
# Pages per DM_MEM_HOT_ADD_REQUEST (2 GiB, aligned down to the guest's alignment, or one
# alignment unit if that is larger). Linux adds them one memory block at a time.
HOT_ADD_MAX_PAGES_PER_REQUEST = (2 << 30) // PAGE

# protocol states
S_CLOSED = "closed"          # no channel
S_VERSION = "version"        # channel open, waiting for an acceptable DM_VERSION_REQUEST
S_CAPS = "caps"              # version accepted, waiting for DM_CAPABILITIES_REPORT
S_IDLE = "idle"              # ready; no request in flight
S_BALLOON = "balloon"        # DM_BALLOON_REQUEST sent, DM_BALLOON_RESPONSEs coming
S_UNBALLOON = "unballoon"    # DM_UNBALLOON_REQUESTs sent, waiting for DM_UNBALLOON_RESPONSE
S_HOT_ADD = "hot-add"        # DM_MEM_HOT_ADD_REQUEST sent, waiting for its response

# why hot-add stopped; the transient ones are retried on the next set_target
HOT_ADD_FAILED = "failed"          # result 0: the guest could not add memory now
HOT_ADD_MAP_FAILED = "map-failed"  # the host could not map the region
HOT_ADD_PARTIAL = "partial"        # fewer pages than asked: the guest hit its limit
HOT_ADD_REFUSED = "refused"        # result 1 with no pages: the guest will not hot-add
TRANSIENT_HOT_ADD_STOPS = (HOT_ADD_FAILED, HOT_ADD_MAP_FAILED)

StatusListener = Callable[[dict], None]


@dataclass
class _Timing:
    count: int = 0
    total_ns: int = 0
    max_ns: int = 0

    def add(self, ns: int) -> None:
        self.count += 1
        self.total_ns += ns
        self.max_ns = max(self.max_ns, ns)

    def as_dict(self) -> dict:
        return {"count": self.count,
                "mean": round(self.total_ns / self.count / 1000, 1) if self.count else 0.0,
                "max": round(self.max_ns / 1000, 1)}


@dataclass(frozen=True)
class _Outgoing:
    channel: VmbusChannel
    payload: bytes
    trans_id: int
    name: str
    facts: dict | None = None  # for the trace, only when tracing


def _message_facts(msg: Any) -> dict:
    """What a trace line says about a DM message besides its name: the transaction, pages
    and ranges moved, the protocol answers."""
    facts: dict[str, Any] = {"transaction": msg.trans_id}
    if isinstance(msg, BalloonRequest):
        facts["pages"] = msg.num_pages
    elif isinstance(msg, (BalloonResponse, UnballoonRequest)):
        facts["pages"] = sum(r.count for r in msg.ranges)
        facts["ranges"] = len(msg.ranges)
        facts["more_pages"] = bool(msg.more_pages)
    elif isinstance(msg, HotAddRequest):
        facts["pages"] = msg.range.count
        facts["gpa"] = msg.range.start * PAGE
    elif isinstance(msg, HotAddResponse):
        facts["pages"] = msg.page_count
        facts["result"] = msg.result
    elif isinstance(msg, VersionRequest):
        facts["version"] = f"{DYNMEM_MAJOR_VERSION(msg.version)}.{DYNMEM_MINOR_VERSION(msg.version)}"
    elif isinstance(msg, (VersionResponse, CapabilitiesResponse)):
        facts["accepted"] = bool(msg.is_accepted)
    elif isinstance(msg, CapabilitiesReport):
        facts.update(balloon=msg.balloon, hot_add=msg.hot_add, hot_add_alignment=msg.hot_add_alignment_bytes)
    elif isinstance(msg, StatusReport):
        facts.update(committed=msg.num_committed * PAGE, available=msg.num_avail * PAGE)
    return facts


def _ram_ranges(boot_ram: Iterable[Any] | Callable[[], Iterable[Any]]) -> list[tuple[int, int]]:
    """(gpa, size) pairs from 2-tuples or objects with .gpa and .size (vmm.memory.RamRange)."""
    if callable(boot_ram):
        boot_ram = boot_ram()
    out = []
    for r in boot_ram:
        gpa, size = (r.gpa, r.size) if hasattr(r, "gpa") else r
        out.append((int(gpa), int(size)))
    return sorted(out)


class HvBalloon:
    """A VmbusDevice: the Dynamic Memory VSP. Thread-safe; see the module docstring."""

    name = "hv-balloon"
    class_id = HV_DM_GUID
    tracer: AnyTracer = NULL_TRACER  # the machine sets its own

    def __init__(self, id: str, *, boot_ram: Iterable[Any] | Callable[[], Iterable[Any]], memory: BalloonMemory,
                 hot_add_gpa: int | None = None, hot_add_size: int = 0, hot_add: HotAddMemory | None = None,
                 memdev: str | None = None, instance_id: uuid.UUID | None = None,
                 status_listener: StatusListener | None = None, send_info: bool = True) -> None:
        self.id = id
        self.instance_id = instance_id if instance_id is not None else uuid.uuid5(HV_DM_GUID, f"pyvmm:{id}")
        self.status_listener = status_listener
        # Called with the new `actual` (bytes) whenever the guest's size changed (BALLOON_CHANGE).
        self.actual_listener: Callable[[int], None] | None = None
        self.send_info = send_info
        self._memory = memory
        self._hot_add = hot_add

        ram = _ram_ranges(boot_ram)
        if not ram:
            raise ValueError(f"hv-balloon {id}: no boot RAM")
        self._boot = PageRanges()
        for gpa, size in ram:
            if gpa < 0 or size <= 0 or gpa % PAGE or size % PAGE:
                raise ValueError(f"hv-balloon {id}: boot RAM range {gpa:#x}+{size:#x} is not page aligned")
            if (gpa + size) // PAGE > (1 << 40):
                raise ValueError(f"hv-balloon {id}: boot RAM beyond the 40-bit page numbers of the protocol")
            self._boot.add(gpa // PAGE, size // PAGE)  # raises on overlapping ranges
        self.boot_size = self._boot.pages * PAGE

        if hot_add_size:
            if hot_add_gpa is None or hot_add is None:
                raise ValueError(f"hv-balloon {id}: a hot-add region needs an address and a HotAddMemory")
            if hot_add_gpa < 0 or hot_add_gpa % PAGE or hot_add_size < 0 or hot_add_size % PAGE:
                raise ValueError(f"hv-balloon {id}: hot-add region {hot_add_gpa:#x}+{hot_add_size:#x} "
                                 f"is not page aligned")
            if (hot_add_gpa + hot_add_size) // PAGE > (1 << 40):
                raise ValueError(f"hv-balloon {id}: hot-add region ends beyond the 40-bit page numbers of the protocol")
            if self._boot.overlaps(hot_add_gpa // PAGE, hot_add_size // PAGE):
                raise ValueError(f"hv-balloon {id}: hot-add region {hot_add_gpa:#x}+{hot_add_size:#x} overlaps boot RAM")
        elif hot_add_size < 0:
            raise ValueError(f"hv-balloon {id}: negative hot-add region size")
        self.hot_add_gpa = hot_add_gpa if hot_add_size else None
        self.hot_add_size = hot_add_size
        self.memdev = (memdev if memdev is not None else f"/objects/{id}-memdev") if hot_add_size else None
        self._ha_start = (hot_add_gpa or 0) // PAGE
        self._ha_end = self._ha_start + hot_add_size // PAGE
        # Where a range may be split for discard/reclaim: each boot RAM range, the region.
        self._regions = [(gpa // PAGE, (gpa + size) // PAGE) for gpa, size in ram]
        if hot_add_size:
            self._regions = sorted(self._regions + [(self._ha_start, self._ha_end)])

        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._outbox: deque[_Outgoing] = deque()
        self._channel: VmbusChannel | None = None
        self._state = S_CLOSED
        self._version: int | None = None
        self._caps: CapabilitiesReport | None = None
        self._trans_id = 0
        self._target_pages: int | None = None

        self._ballooned = PageRanges()
        self._hot_added = PageRanges()
        self._present = PageRanges()  # boot RAM + hot-added: where a ballooned range may lie
        self._reset_present()
        self._ha_next = self._ha_start        # first page not yet offered for hot-add
        self._ha_mapped_end = self._ha_start  # pages below this are mapped
        self._ha_request: PageRange | None = None
        self._hot_add_stop: str | None = None
        self._balloon_asked = 0
        # Pages handed back in unballoon requests the guest has not confirmed yet: they count
        # as ballooned (not in `actual`) until its DM_UNBALLOON_RESPONSE.
        self._unballooning = 0
        self._balloon_got = 0
        self._balloon_floor = False
        self._status: dict | None = None

        self._received: Counter[str] = Counter()
        self._sent: Counter[str] = Counter()
        self._malformed: Counter[str] = Counter()
        self._unexpected: Counter[str] = Counter()
        self._bad_ranges: Counter[str] = Counter()
        self._counters: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._timing: dict[str, _Timing] = {}
        self._range_timing = _Timing()
        self._warned: set[str] = set()
        self._traced_state: tuple[int, int, int] | None = None

    # ------------------------------------------------------------------ VmbusDevice
    def opened(self, channel: VmbusChannel) -> None:
        with self._lock:
            if self._channel is not None:
                self._counters["reopened"] += 1
                self._end_session_locked()
            self._channel = channel
            self._state = S_VERSION

    def packet(self, channel: VmbusChannel, payload: bytes, trans_id: int) -> None:
        events: list[dict] = []
        with self._lock:
            before = self._current_pages()
            started = time.perf_counter_ns()
            try:
                name = self._packet_locked(channel, payload, events)
            except Exception:  # a device bug must not take the vCPU thread down
                self._errors["internal"] += 1
                log.exception("hv-balloon %s: internal error handling a guest packet", self.id)
                name = None
            if name is not None:
                self._timing.setdefault(name, _Timing()).add(time.perf_counter_ns() - started)
            after = self._current_pages()
            if self.tracer.enabled:
                self._trace_state_locked()
        self._flush()
        self._deliver(events)
        if after != before:
            self._actual_changed(after * PAGE)

    def closed(self) -> None:
        with self._lock:
            self._end_session_locked()
            if self.tracer.enabled:
                self._trace_state_locked()

    # ------------------------------------------------------------------ machine
    def reset(self) -> None:
        """Machine reset / reboot: the guest is back at its boot size."""
        with self._lock:
            self._end_session_locked()
            self._counters["resets"] += 1
            self._target_pages = None
            self._hot_added.clear()
            self._reset_present()
            self._ha_next = self._ha_mapped_end = self._ha_start
            self._hot_add_stop = None
            if self._hot_add is not None and self.hot_add_size:
                try:
                    self._hot_add.unmap_all()
                except Exception as e:
                    self._errors["unmap"] += 1
                    self._warn_once("unmap", f"dropping the hot-add slots failed: {e}")
            if self.tracer.enabled:
                self._trace_state_locked()

    def poll(self) -> None:
        """Retry messages the ring had no room for."""
        self._flush()

    def writable(self, channel: VmbusChannel) -> None:
        """VMBus: the guest made room in its inbound ring after a refused send."""
        self._flush()

    def _actual_changed(self, actual: int) -> None:
        if notify(self.actual_listener, [actual], log, f"hv-balloon {self.id}: size"):
            with self._lock:
                self._errors["listener"] += 1

    # ------------------------------------------------------------------ control plane
    def set_target(self, size_bytes: int) -> None:
        """The size the guest should have (QMP `balloon`): boot RAM + hot-added - ballooned.
        Rounded down to 4 KiB pages; also a "try again" after the guest hit its floor or a
        transient hot-add failure."""
        if not isinstance(size_bytes, int) or isinstance(size_bytes, bool) or size_bytes < PAGE:
            raise ValueError(f"hv-balloon {self.id}: target must be an integer of at least {PAGE} bytes, "
                             f"not {size_bytes!r}")
        with self._lock:
            before = self._current_pages()
            self._target_pages = size_bytes // PAGE
            self._balloon_floor = False
            if self._hot_add_stop in TRANSIENT_HOT_ADD_STOPS:
                self._hot_add_stop = None
            self._counters["targets-set"] += 1
            self._drive()
            after = self._current_pages()  # an unballoon hands pages back as it is sent
            if self.tracer.enabled:
                self._trace_state_locked()
        self._flush()
        if after != before:
            self._actual_changed(after * PAGE)

    @property
    def target(self) -> int:
        """The target in bytes (the boot size until one is set)."""
        with self._lock:
            return self.boot_size if self._target_pages is None else self._target_pages * PAGE

    @property
    def actual(self) -> int:
        with self._lock:
            return self._current_pages() * PAGE

    @property
    def state(self) -> str:
        return self._state

    def query(self) -> dict:
        """QMP query-balloon (BalloonInfo)."""
        return {"actual": self.actual}

    def info(self) -> dict:
        """QEMU's HvBalloonDeviceInfo for query-memory-devices (type "hv-balloon")."""
        out: dict[str, Any] = {"id": self.id}
        if self.hot_add_size:
            out["memaddr"] = self.hot_add_gpa
        out["max-size"] = self.hot_add_size
        if self.memdev is not None:
            out["memdev"] = self.memdev
        return out

    def status_report(self) -> dict | None:
        """The last DM_STATUS_REPORT as {"committed": bytes, "available": bytes}
        (query-hv-balloon-status-report), or None if none came since the channel opened."""
        with self._lock:
            return dict(self._status) if self._status is not None else None

    def ballooned_ranges(self) -> list[tuple[int, int]]:
        """(first page, count) of each ballooned run."""
        with self._lock:
            return list(self._ballooned)

    def hot_added_ranges(self) -> list[tuple[int, int]]:
        with self._lock:
            return list(self._hot_added)

    def stats(self) -> dict:
        with self._lock:
            caps = None
            if self._caps is not None:
                caps = {"balloon": self._caps.balloon, "hot-add": self._caps.hot_add,
                        "hot-add-alignment": self._caps.hot_add_alignment_bytes,
                        "max-page-number": self._caps.max_page_number}
            c = self._counters
            return {
                "state": self._state,
                "version": (f"{DYNMEM_MAJOR_VERSION(self._version)}.{DYNMEM_MINOR_VERSION(self._version)}"
                            if self._version is not None else None),
                "caps": caps,
                "boot-size": self.boot_size,
                "target": None if self._target_pages is None else self._target_pages * PAGE,
                "actual": self._current_pages() * PAGE,
                "messages-received": dict(self._received),
                "messages-sent": dict(self._sent),
                "malformed": dict(self._malformed),
                "unexpected": dict(self._unexpected),
                "bad-ranges": dict(self._bad_ranges),
                "pages": {"ballooned": self._ballooned.pages, "hot-added": self._hot_added.pages,
                          "ballooned-total": c["pages-ballooned"], "unballooned-total": c["pages-unballooned"],
                          "hot-added-total": c["pages-hot-added"], "balloon-excess": c["balloon-excess-pages"]},
                "ballooned-runs": len(self._ballooned),
                "balloon": {"requests": c["balloon-requests"], "shortfalls": c["balloon-shortfalls"],
                            "at-floor": self._balloon_floor},
                "unballoon": {"requests": c["unballoon-requests"], "messages": c["unballoon-messages"]},
                "hot-add": {"requests": c["hot-add-requests"], "stopped": self._hot_add_stop,
                            "failed": c["hot-add-failed"], "partial": c["hot-add-partial"],
                            "refused": c["hot-add-refused"], "excess": c["hot-add-excess"],
                            "mapped-bytes": (self._ha_mapped_end - self._ha_start) * PAGE},
                "host-errors": dict(self._errors),
                "versions-refused": c["versions-refused"],
                "reopened": c["reopened"], "resets": c["resets"],
                "outbox": len(self._outbox), "send-retries": c["send-retries"],
                "processing-time-us": {name: t.as_dict() for name, t in sorted(self._timing.items())},
                "range-time-us": self._range_timing.as_dict(),
            }

    # ------------------------------------------------------------------ guest messages
    def _packet_locked(self, channel: VmbusChannel, payload: bytes, events: list[dict]) -> str | None:
        if channel is not self._channel or self._state == S_CLOSED:
            self._unexpected["no-open-channel"] += 1
            self._warn_once("no-channel", "packet on a channel that is not open, ignored")
            return None
        try:
            msg = parse(payload)
        except DmProtocolError as e:
            self._malformed[e.kind] += 1
            self._warn_once(f"malformed-{e.kind}", f"malformed DM message refused ({e})")
            if self.tracer.enabled:
                self.tracer.emit("hv-balloon.message", dir="guest", type="malformed", kind=e.kind)
            return None
        name = message_name(msg.msg_type)
        self._received[name] += 1
        if self.tracer.enabled:
            self.tracer.emit("hv-balloon.message", dir="guest", type=name, **_message_facts(msg))
        handler = self._HANDLERS.get(type(msg))
        if handler is None:  # a host -> guest type, or DM_ERROR
            self._unexpected[name] += 1
            self._warn_once(f"type-{name}", f"guest sent {name}, which only a host sends; ignored")
            return name
        handler(self, msg, events)
        return name

    def _unexpected_msg(self, name: str) -> None:
        self._unexpected[name] += 1
        self._warn_once(f"unexpected-{name}", f"unexpected {name} in state {self._state}, ignored")

    def _on_version(self, msg: VersionRequest, events: list[dict]) -> None:
        if self._state != S_VERSION:
            self._unexpected_msg("DM_VERSION_REQUEST")
            return
        accepted = msg.version in SUPPORTED_VERSIONS
        self._queue(VersionResponse(msg.trans_id, accepted))
        if accepted:
            self._version = msg.version
            self._state = S_CAPS
            log.info("hv-balloon %s: Dynamic Memory protocol %d.%d", self.id, msg.major, msg.minor)
        else:
            self._counters["versions-refused"] += 1
            if msg.is_last_attempt:
                log.warning("hv-balloon %s: refused the guest's last protocol version %d.%d; "
                            "the driver gives up", self.id, msg.major, msg.minor)

    def _on_caps(self, msg: CapabilitiesReport, events: list[dict]) -> None:
        if self._state != S_CAPS:
            self._unexpected_msg("DM_CAPABILITIES_REPORT")
            return
        self._caps = msg
        self._queue(CapabilitiesResponse(msg.trans_id, True))
        if self.send_info and self._version is not None and self._version >= DYNMEM_PROTOCOL_VERSION_WIN8:
            self._queue(InfoMessage.max_page_count(self._next_trans_id(), self._max_pages()))
        self._state = S_IDLE
        if self.hot_add_size and msg.hot_add and self._hot_add_window()[1] == 0:
            self._warn_once("ha-align", f"the hot-add region {self.hot_add_gpa:#x}+{self.hot_add_size:#x} holds no "
                                        f"block aligned to the guest's {msg.hot_add_alignment_bytes >> 20} MiB")
        self._drive()

    def _on_status(self, msg: StatusReport, events: list[dict]) -> None:
        if self._state == S_VERSION:
            self._unexpected_msg("DM_STATUS_REPORT")
            return
        report = {"committed": msg.num_committed * PAGE, "available": msg.num_avail * PAGE}
        self._status = report
        if self.tracer.enabled:
            self.tracer.emit("hv-balloon.status", id=self.id, **report)
        if self.status_listener is not None:
            events.append(dict(report))

    def _on_balloon_response(self, msg: BalloonResponse, events: list[dict]) -> None:
        if self._state != S_BALLOON:
            self._unexpected_msg("DM_BALLOON_RESPONSE")
            if msg.ranges:
                self._bad_ranges["unrequested"] += len(msg.ranges)
            return
        for r in msg.ranges:
            self._take_range(r)
        if msg.more_pages:
            return
        asked, got = self._balloon_asked, self._balloon_got
        if got < asked:
            self._counters["balloon-shortfalls"] += 1
        if got > asked:
            self._counters["balloon-excess-pages"] += got - asked
        if got == 0:
            self._balloon_floor = True
            log.info("hv-balloon %s: the guest gave no pages; it is at its floor", self.id)
        self._state = S_IDLE
        self._drive()

    def _take_range(self, r: PageRange) -> None:
        started = time.perf_counter_ns()
        kind = self._range_refusal(r.start, r.count)
        if kind is not None:
            self._bad_ranges[kind] += 1
            self._warn_once(f"range-{kind}", f"refused ballooned range {r.start:#x}+{r.count:#x} ({kind})")
        else:
            self._ballooned.add(r.start, r.count)
            self._balloon_got += r.count
            self._counters["pages-ballooned"] += r.count
            for gpa, size in self._split(r.start, r.count):
                try:
                    self._memory.discard(gpa, size)
                except Exception as e:
                    self._errors["discard"] += 1
                    self._warn_once("discard", f"cannot discard ballooned memory (the host keeps it): {e}")
        self._range_timing.add(time.perf_counter_ns() - started)

    def _range_refusal(self, start: int, count: int) -> str | None:
        if count == 0:
            return "empty"
        if not self._present.covers(start, count):
            lo, hi = max(start, self._ha_start), min(start + count, self._ha_end)
            if lo < hi and not self._hot_added.covers(lo, hi - lo):
                return "not-hot-added"
            return "outside-ram"
        if self._ballooned.overlaps(start, count):
            return "double-free"
        return None

    def _on_unballoon_response(self, msg: UnballoonResponse, events: list[dict]) -> None:
        if self._state != S_UNBALLOON:
            self._unexpected_msg("DM_UNBALLOON_RESPONSE")
            return
        self._state = S_IDLE
        self._unballooning = 0
        self._drive()

    def _on_hot_add_response(self, msg: HotAddResponse, events: list[dict]) -> None:
        request = self._ha_request
        if self._state != S_HOT_ADD or request is None:
            self._unexpected_msg("DM_MEM_HOT_ADD_RESPONSE")
            return
        self._ha_request = None
        self._state = S_IDLE
        if not msg.result:
            # "treated as a transient failure": stop until the next set_target
            self._counters["hot-add-failed"] += 1
            self._hot_add_stop = HOT_ADD_FAILED
            self._warn_once("ha-failed", f"the guest failed to hot-add {request.count} pages at page {request.start:#x}")
            return
        count = msg.page_count
        if count > request.count:
            self._counters["hot-add-excess"] += 1
            self._warn_once("ha-excess", f"the guest claims {count} hot-added pages of {request.count} offered")
            count = request.count
        if count:
            self._hot_added.add(request.start, count)
            self._present.add(request.start, count)
            self._counters["pages-hot-added"] += count
        self._ha_next = request.start + count
        if count < request.count:
            # "the host should assume all further hot add requests will fail"
            self._hot_add_stop = HOT_ADD_PARTIAL if count else HOT_ADD_REFUSED
            self._counters["hot-add-partial" if count else "hot-add-refused"] += 1
            log.warning("hv-balloon %s: the guest hot-added %d of %d pages; no more hot-add until reset",
                        self.id, count, request.count)
            return
        self._drive()

    _HANDLERS: dict[type, Callable[[HvBalloon, Any, list[dict]], None]] = {
        VersionRequest: _on_version,
        CapabilitiesReport: _on_caps,
        StatusReport: _on_status,
        BalloonResponse: _on_balloon_response,
        UnballoonResponse: _on_unballoon_response,
        HotAddResponse: _on_hot_add_response,
    }

    # ------------------------------------------------------------------ towards the target
    def _drive(self) -> None:
        """Start the next request towards the target, if idle (lock held)."""
        if self._state != S_IDLE or self._channel is None or self._caps is None or self._target_pages is None:
            return
        current, target = self._current_pages(), self._target_pages
        if target < current:
            if not self._caps.balloon or self._balloon_floor:
                return
            n = min(current - target, BALLOON_REQUEST_MAX_PAGES)
            self._balloon_asked, self._balloon_got = n, 0
            self._queue(BalloonRequest(self._next_trans_id(), n))
            self._counters["balloon-requests"] += 1
            self._state = S_BALLOON
        elif target > current:
            if self._ballooned.pages:
                self._unballoon(min(target - current, self._ballooned.pages))
            else:
                self._start_hot_add(target - current)

    def _unballoon(self, pages: int) -> None:
        ranges = self._ballooned.take(pages, chunk=min(PAGE_RANGE_MAX_COUNT, UNBALLOON_MAX_PAGES_PER_MESSAGE))
        for start, count in ranges:
            self._counters["pages-unballooned"] += count
            for gpa, size in self._split(start, count):
                try:
                    self._memory.reclaim(gpa, size)
                except Exception as e:
                    self._errors["reclaim"] += 1
                    self._warn_once("reclaim", f"reclaim hook failed: {e}")
        messages: list[list[PageRange]] = [[]]
        in_message = 0
        for start, count in ranges:
            if len(messages[-1]) == DM_MAX_RANGES_PER_MESSAGE or in_message + count > UNBALLOON_MAX_PAGES_PER_MESSAGE:
                messages.append([])
                in_message = 0
            messages[-1].append(PageRange(start, count))
            in_message += count
        trans_id = self._next_trans_id()
        for i, group in enumerate(messages):
            self._queue(UnballoonRequest(trans_id, i < len(messages) - 1, tuple(group)))
        self._counters["unballoon-requests"] += 1
        self._counters["unballoon-messages"] += len(messages)
        self._unballooning = sum(count for _, count in ranges)
        self._state = S_UNBALLOON

    def _hot_add_window(self) -> tuple[int, int]:
        """(first page, pages) of the part of the region still offerable, aligned as the guest asked."""
        assert self._caps is not None
        align = (1 << self._caps.hot_add_alignment) * PAGES_PER_MIB
        start = -(-max(self._ha_next, self._ha_start) // align) * align
        end = self._ha_end // align * align
        return start, max(end - start, 0)

    def _start_hot_add(self, pages: int) -> None:
        caps = self._caps
        if (caps is None or not caps.hot_add or self._hot_add is None or not self.hot_add_size
                or self._hot_add_stop is not None):
            return
        align = (1 << caps.hot_add_alignment) * PAGES_PER_MIB
        chunk = align if align >= HOT_ADD_MAX_PAGES_PER_REQUEST else HOT_ADD_MAX_PAGES_PER_REQUEST // align * align
        start, available = self._hot_add_window()
        n = min(pages, available, chunk) // align * align
        if n <= 0:
            return
        low = max(start, self._ha_mapped_end)
        if low < start + n:
            try:
                self._hot_add.map(low * PAGE, (start + n - low) * PAGE)
            except Exception as e:
                self._errors["map"] += 1
                self._hot_add_stop = HOT_ADD_MAP_FAILED
                self._warn_once("map", f"cannot map the hot-add region, no hot-add: {e}")
                return
            self._ha_mapped_end = start + n
        request = PageRange(start, n)
        self._ha_request = request
        # The region is named as well (24-byte form) and equals the range: Linux then adds
        # exactly this range, which is aligned to its memory-block size.
        self._queue(HotAddRequest(self._next_trans_id(), request, request))
        self._counters["hot-add-requests"] += 1
        self._state = S_HOT_ADD

    # ------------------------------------------------------------------ tracing
    def trace_description(self) -> None:
        """The device and its starting sizes, once, when tracing starts."""
        if self.tracer.enabled:
            self.tracer.emit("hv-balloon.device", id=self.id, memdev_size=self.hot_add_size,
                             hot_add_addr=self.hot_add_gpa, boot_size=self.boot_size)
            with self._lock:
                self._trace_state_locked()

    def _trace_state_locked(self) -> None:
        """An `hv-balloon.state` line if target, ballooned or hot-added size changed."""
        target = self.boot_size if self._target_pages is None else self._target_pages * PAGE
        ballooned = (self._ballooned.pages + self._unballooning) * PAGE  # unconfirmed unballoons count
        hot_added = self._hot_added.pages * PAGE
        state = (target, ballooned, hot_added)
        if state != self._traced_state:
            self._traced_state = state
            self.tracer.emit("hv-balloon.state", id=self.id, target=target, ballooned=ballooned,
                             hot_added=hot_added, actual=self._current_pages() * PAGE)

    # ------------------------------------------------------------------ helpers (lock held)
    def _current_pages(self) -> int:
        return self._boot.pages + self._hot_added.pages - self._ballooned.pages - self._unballooning

    def _max_pages(self) -> int:
        return self._boot.pages + self.hot_add_size // PAGE

    def _reset_present(self) -> None:
        self._present.clear()
        for start, count in self._boot:
            self._present.add(start, count)

    def _split(self, start: int, count: int) -> list[tuple[int, int]]:
        """A validated range as (gpa, size) pieces, one per boot RAM range / the region."""
        out = []
        end = start + count
        for lo, hi in self._regions:
            a, b = max(lo, start), min(hi, end)
            if a < b:
                out.append((a * PAGE, (b - a) * PAGE))
        return out

    def _next_trans_id(self) -> int:
        self._trans_id = (self._trans_id + 1) & 0xFFFFFFFF
        return self._trans_id

    def _end_session_locked(self) -> None:
        """The channel is gone: forget everything the guest driver instance knew."""
        self._outbox.clear()
        self._channel = None
        self._state = S_CLOSED
        self._version = None
        self._caps = None
        self._status = None
        self._ha_request = None
        self._balloon_asked = self._balloon_got = 0
        self._balloon_floor = False
        self._ballooned.clear()
        self._unballooning = 0

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning("hv-balloon %s: %s", self.id, message)

    # ------------------------------------------------------------------ sending
    def _queue(self, msg: Any) -> None:
        assert self._channel is not None
        facts = _message_facts(msg) if self.tracer.enabled else None
        self._outbox.append(_Outgoing(self._channel, msg.pack(), msg.trans_id, message_name(msg.msg_type), facts))

    def _flush(self) -> None:
        """Send queued messages in order, without the device lock. Only one thread sends at
        a time; another that finds the send lock taken leaves its messages to that thread,
        which looks at the outbox again after letting go of the lock."""
        while True:
            if not self._send_lock.acquire(blocking=False):
                return
            stalled = False
            try:
                while True:
                    with self._lock:
                        if not self._outbox:
                            break
                        out = self._outbox[0]
                    try:
                        ok = out.channel.send(out.payload, out.trans_id)
                        failure = None
                    except Exception as e:  # the bus's bug: keep the message, report it
                        ok, failure = False, e
                    with self._lock:
                        if not ok:
                            self._counters["send-retries"] += 1
                            if failure is not None:
                                self._errors["send"] += 1
                                self._warn_once("send", f"channel.send raised, message kept for a retry: {failure!r}")
                            stalled = True
                            break
                        if self._outbox and self._outbox[0] is out:  # not dropped by closed()/reset()
                            self._outbox.popleft()
                            self._sent[out.name] += 1
                            if self.tracer.enabled:  # traced when it is in the ring, not when queued
                                self.tracer.emit("hv-balloon.message", dir="host", type=out.name, **(out.facts or {}))
            finally:
                self._send_lock.release()
            if stalled:
                return
            with self._lock:
                if not self._outbox:
                    return

    def _deliver(self, events: list[dict]) -> None:
        failed = notify(self.status_listener, events, log, f"hv-balloon {self.id}: status")
        if failed:
            with self._lock:
                self._errors["listener"] += failed

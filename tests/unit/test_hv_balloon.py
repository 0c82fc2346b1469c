"""The hv-balloon device against a model of the Linux driver (tests/hv_balloon_guest.py):
handshake, status reports, ballooning in chunks with more_pages, unballooning, hot-add with
the guest's alignment, refusals of bad ranges, ring-full retries, close and reset."""

from __future__ import annotations

import random
import threading
import time

import pytest

from devices.hyperv.balloon import (
    BALLOON_REQUEST_MAX_PAGES,
    HV_DM_GUID,
    UNBALLOON_MAX_PAGES_PER_MESSAGE,
    HvBalloon,
)
from devices.hyperv.balloon_protocol import (
    DYNMEM_PROTOCOL_VERSION_WIN7,
    DYNMEM_PROTOCOL_VERSION_WIN8,
    DYNMEM_PROTOCOL_VERSION_WIN10,
    INFO_TYPE_MAX_PAGE_CNT,
    BalloonRequest,
    BalloonResponse,
    HotAddRequest,
    HotAddResponse,
    PageRange,
    StatusReport,
    UnballoonRequest,
    UnballoonResponse,
    VersionRequest,
)
from tests.hv_balloon_guest import FakeChannel, FakeHotAdd, FakeMemory, LinuxDmGuest
from vmm.memory import ram_layout

MiB, GiB = 1 << 20, 1 << 30
PAGE = 4096


class Rig:
    def __init__(self, ram=((0, 64 * MiB),), hot_add_gpa=None, hot_add_size=0, connect=True, **guest_kw) -> None:
        self.ram = [tuple(r) for r in ram]
        self.memory = FakeMemory()
        self.hot_add = FakeHotAdd()
        self.channel = FakeChannel()
        self.events: list[dict] = []
        self.dev = HvBalloon("hvb0", boot_ram=self.ram, memory=self.memory, hot_add_gpa=hot_add_gpa,
                             hot_add_size=hot_add_size, hot_add=self.hot_add if hot_add_size else None,
                             status_listener=self.events.append)
        self.guest = LinuxDmGuest(self.dev, self.channel, self.ram, **guest_kw)
        if connect:
            assert self.guest.connect()

    def target(self, size: int) -> None:
        self.dev.set_target(size)
        self.guest.run()

    def ballooned_pages(self) -> set[int]:
        return {p for s, n in self.dev.ballooned_ranges() for p in range(s, s + n)}


def guest_pages(ranges) -> set[int]:
    return {p for s, n in ranges for p in range(s, s + n)}


# ---------------------------------------------------------------- identity and handshake
def test_class_id_is_hv_dm_guid_in_guid_t_order() -> None:
    assert HvBalloon.class_id == HV_DM_GUID
    # GUID_INIT(0x525074dc, 0x8985, 0x46e2, 0x80, 0x57, 0xa3, 0x07, 0xdc, 0x18, 0xa5, 0x02)
    assert HV_DM_GUID.bytes_le == bytes([0xdc, 0x74, 0x50, 0x52, 0x85, 0x89, 0xe2, 0x46,
                                         0x80, 0x57, 0xa3, 0x07, 0xdc, 0x18, 0xa5, 0x02])


def test_handshake_win10_records_capabilities_and_sends_max_page_count() -> None:
    rig = Rig(hot_add_gpa=128 * MiB, hot_add_size=1 * GiB, alignment=7)
    assert rig.guest.version == DYNMEM_PROTOCOL_VERSION_WIN10
    stats = rig.dev.stats()
    assert stats["state"] == "idle" and stats["version"] == "2.0"
    assert stats["caps"] == {"balloon": True, "hot-add": True, "hot-add-alignment": 128 * MiB,
                             "max-page-number": (1 << 64) - 1}
    (info,) = rig.guest.info
    assert info.items() == [(INFO_TYPE_MAX_PAGE_CNT, ((64 * MiB + 1 * GiB) // PAGE).to_bytes(8, "little"))]
    assert stats["messages-received"] == {"DM_VERSION_REQUEST": 1, "DM_CAPABILITIES_REPORT": 1}
    assert stats["messages-sent"] == {"DM_VERSION_RESPONSE": 1, "DM_CAPABILITIES_RESPONSE": 1, "DM_INFO_MESSAGE": 1}
    assert rig.channel.sent == []  # no target yet: nothing asked of the guest


@pytest.mark.parametrize("offered,accepted", [
    ((0x0003_0000, DYNMEM_PROTOCOL_VERSION_WIN8), DYNMEM_PROTOCOL_VERSION_WIN8),   # unknown newer one refused
    ((0x0001_0001, 0x0000_0002, DYNMEM_PROTOCOL_VERSION_WIN7), DYNMEM_PROTOCOL_VERSION_WIN7),
    ((DYNMEM_PROTOCOL_VERSION_WIN7,), DYNMEM_PROTOCOL_VERSION_WIN7),
])
def test_versions_linux_offers_are_accepted_others_refused(offered, accepted) -> None:
    rig = Rig(connect=False)
    assert rig.guest.connect(offered)
    assert rig.guest.version == accepted
    assert rig.dev.stats()["versions-refused"] == len(offered) - 1
    # DM_INFO_MESSAGE exists from 1.0 (WIN8) on
    assert len(rig.guest.info) == (0 if accepted == DYNMEM_PROTOCOL_VERSION_WIN7 else 1)


def test_no_acceptable_version_leaves_the_device_waiting() -> None:
    rig = Rig(connect=False)
    assert not rig.guest.connect((0x0004_0000,))
    assert rig.dev.state == "version"
    rig.dev.set_target(32 * MiB)
    assert rig.channel.sent == []


def test_messages_out_of_order_are_counted_not_answered() -> None:
    rig = Rig(connect=False)
    rig.dev.opened(rig.channel)
    rig.guest.status(1, 2)                                       # before the version
    rig.guest.send(BalloonResponse(1, False, (PageRange(0, 1),)))  # never requested
    rig.guest.send(BalloonRequest(1, 10))                         # a host -> guest type
    assert rig.channel.sent == []
    stats = rig.dev.stats()
    assert stats["unexpected"] == {"DM_STATUS_REPORT": 1, "DM_BALLOON_RESPONSE": 1, "DM_BALLOON_REQUEST": 1}
    assert stats["bad-ranges"] == {"unrequested": 1}
    assert rig.guest.connect()  # still negotiates afterwards
    rig.guest.send(VersionRequest(9, DYNMEM_PROTOCOL_VERSION_WIN10))  # a second negotiation
    assert rig.channel.sent == [] and rig.dev.stats()["unexpected"]["DM_VERSION_REQUEST"] == 1


# ---------------------------------------------------------------- status reports
def test_status_reports_reach_the_listener_in_bytes() -> None:
    rig = Rig()
    assert rig.dev.status_report() is None
    rig.guest.status(avail=1000, committed=2500)
    rig.guest.status(avail=900, committed=2600)
    assert rig.events == [{"committed": 2500 * PAGE, "available": 1000 * PAGE},
                          {"committed": 2600 * PAGE, "available": 900 * PAGE}]
    assert rig.dev.status_report() == {"committed": 2600 * PAGE, "available": 900 * PAGE}
    rig.dev.closed()
    assert rig.dev.status_report() is None  # stale after the channel closes


def test_a_failing_status_listener_is_contained() -> None:
    rig = Rig()

    def boom(event: dict) -> None:
        raise RuntimeError("listener bug")

    rig.dev.status_listener = boom
    rig.guest.status(1, 2)
    assert rig.dev.stats()["host-errors"] == {"listener": 1}
    assert rig.dev.status_report() == {"committed": 2 * PAGE, "available": PAGE}


# ---------------------------------------------------------------- balloon
def test_balloon_down_gives_discarded_ranges() -> None:
    rig = Rig()
    rig.target(40 * MiB)
    (req,) = [m for m in rig.channel.log if isinstance(m, BalloonRequest)]
    assert req.num_pages == 24 * MiB // PAGE
    assert rig.ballooned_pages() == guest_pages(rig.guest.ballooned)
    assert len(rig.ballooned_pages()) == 24 * MiB // PAGE
    assert rig.memory.discarded_pages() == rig.ballooned_pages()
    assert rig.dev.actual == 40 * MiB and rig.dev.query() == {"actual": 40 * MiB}
    assert rig.dev.stats()["pages"]["ballooned"] == 24 * MiB // PAGE


def test_balloon_is_chunked_and_waits_for_the_last_response() -> None:
    ram = [(r.gpa, r.size) for r in ram_layout(4 * GiB)]  # 3 GiB below the hole, 1 GiB above 4 GiB
    rig = Rig(ram=ram)
    rig.target(1 * GiB)
    requests = [m for m in rig.channel.log if isinstance(m, BalloonRequest)]
    assert [r.num_pages for r in requests] == [BALLOON_REQUEST_MAX_PAGES, 3 * GiB // PAGE - BALLOON_REQUEST_MAX_PAGES]
    # Linux answers with 4 KiB responses of at most 510 two-MiB ranges, more_pages until the last
    # (585728 pages = 1144 ranges: 510 + 510 + 124; then 200704 pages = 392 ranges)
    assert [(len(r.ranges), r.more_pages) for r in rig.guest.responses] == [(510, True), (510, True), (124, False),
                                                                           (392, False)]
    assert all(len(r.ranges) <= 510 for r in rig.guest.responses)
    assert rig.dev.actual == 1 * GiB
    assert rig.ballooned_pages() == guest_pages(rig.guest.ballooned)
    # nothing ballooned in the hole
    hole = range((3 * GiB) // PAGE, (4 * GiB) // PAGE)
    assert not any(p in rig.ballooned_pages() for p in (hole.start, hole.stop - 1))
    assert rig.dev.stats()["processing-time-us"]["DM_BALLOON_RESPONSE"]["count"] == 4


def test_balloon_stops_at_the_guests_floor_until_asked_again() -> None:
    rig = Rig(floor_pages=24 * MiB // PAGE)
    rig.target(16 * MiB)  # 48 MiB to give up; the guest keeps 24 MiB, so it gives 40 MiB
    requests = [m for m in rig.channel.log if isinstance(m, BalloonRequest)]
    assert [r.num_pages for r in requests] == [48 * MiB // PAGE, 8 * MiB // PAGE]
    assert rig.guest.responses[-1].ranges == ()  # the second one got nothing: at the floor
    assert rig.dev.actual == 24 * MiB
    assert rig.dev.stats()["balloon"] == {"requests": 2, "shortfalls": 2, "at-floor": True}
    rig.dev.poll()
    assert rig.channel.sent == []            # no third request by itself
    rig.guest.floor_pages = 8 * MiB // PAGE  # pressure went down
    rig.target(16 * MiB)                     # asking again retries
    assert rig.dev.actual == 16 * MiB and rig.dev.stats()["balloon"]["at-floor"] is False


def test_balloon_excess_pages_are_accepted_and_counted() -> None:
    rig = Rig()
    rig.dev.set_target(64 * MiB - 1 * PAGE)
    (req,) = rig.channel.take()
    assert req == BalloonRequest(req.trans_id, 1)
    rig.guest.send(BalloonResponse(50, False, (PageRange(100, 3),)))
    assert rig.dev.stats()["pages"]["balloon-excess"] == 2
    # the device corrects the overshoot at once: 2 of the 3 pages go back
    (unballoon,) = rig.channel.take()
    assert isinstance(unballoon, UnballoonRequest) and sum(r.count for r in unballoon.ranges) == 2
    assert rig.dev.actual == 64 * MiB - 3 * PAGE  # until the guest confirms the unballoon
    rig.guest.send(UnballoonResponse(unballoon.trans_id))
    assert rig.dev.actual == 64 * MiB - PAGE


def test_discard_failures_are_counted_and_the_pages_stay_ballooned() -> None:
    rig = Rig()
    rig.memory.fail_discard = True
    rig.target(60 * MiB)
    assert rig.dev.actual == 60 * MiB
    assert rig.dev.stats()["host-errors"] == {"discard": 2}  # two 2 MiB ranges


# ---------------------------------------------------------------- unballoon
def test_unballoon_gives_back_ballooned_ranges() -> None:
    rig = Rig()
    rig.target(32 * MiB)
    ballooned = rig.ballooned_pages()
    rig.target(48 * MiB)
    (req,) = [m for m in rig.channel.log if isinstance(m, UnballoonRequest)]
    assert not req.more_pages
    returned = guest_pages(req.ranges)
    assert len(returned) == 16 * MiB // PAGE and returned <= ballooned
    assert guest_pages((g // PAGE, s // PAGE) for g, s in rig.memory.reclaims) == returned
    assert rig.dev.actual == 48 * MiB and rig.guest.unballoon_responses == 1
    rig.target(64 * MiB)
    assert rig.dev.actual == 64 * MiB and rig.dev.ballooned_ranges() == [] and rig.guest.ballooned.pages == 0
    assert rig.channel.sent == []  # no region: nothing to hot-add beyond boot size


def test_unballoon_of_many_ranges_uses_several_messages() -> None:
    rig = Rig()
    rig.dev.set_target(64 * MiB - 600 * PAGE)
    rig.channel.take()
    pages = [(2 * i + 1) for i in range(600)]  # 600 separate single pages
    for p in pages:
        rig.guest.free.remove(p, 1)
        rig.guest.ballooned.add(p, 1)
    rig.guest.send(BalloonResponse(1, False, tuple(PageRange(p, 1) for p in pages)))
    assert rig.dev.stats()["ballooned-runs"] == 600
    rig.dev.set_target(64 * MiB)
    msgs = rig.channel.take()
    assert [type(m) for m in msgs] == [UnballoonRequest, UnballoonRequest]
    assert [len(m.ranges) for m in msgs] == [510, 90] and [m.more_pages for m in msgs] == [True, False]
    assert msgs[0].trans_id == msgs[1].trans_id
    rig.guest.handle(msgs)
    assert rig.guest.unballoon_responses == 1 and rig.dev.actual == 64 * MiB


def test_unballoon_messages_carry_at_most_2_gib() -> None:
    ram = [(r.gpa, r.size) for r in ram_layout(4 * GiB)]
    rig = Rig(ram=ram)
    rig.target(1 * GiB)
    rig.target(4 * GiB)
    msgs = [m for m in rig.channel.log if isinstance(m, UnballoonRequest)]
    sizes = [sum(r.count for r in m.ranges) for m in msgs]
    assert sum(sizes) == 3 * GiB // PAGE and max(sizes) <= UNBALLOON_MAX_PAGES_PER_MESSAGE
    assert [m.more_pages for m in msgs] == [True] * (len(msgs) - 1) + [False]
    assert rig.dev.actual == 4 * GiB


# ---------------------------------------------------------------- hot-add
def test_hot_add_in_aligned_chunks_within_the_region() -> None:
    # region 64 MiB aligned, guest blocks of 128 MiB: hot-add starts at the next 128 MiB boundary
    rig = Rig(hot_add_gpa=192 * MiB, hot_add_size=4 * GiB, alignment=7)
    rig.target(64 * MiB + 3 * GiB + 100 * MiB)
    reqs = [m for m in rig.channel.log if isinstance(m, HotAddRequest)]
    assert [(r.range.start * PAGE, r.range.count * PAGE) for r in reqs] == [(256 * MiB, 2 * GiB),
                                                                         (256 * MiB + 2 * GiB, 1 * GiB)]
    assert all(r.region == r.range for r in reqs)
    assert rig.hot_add.maps == [(256 * MiB, 2 * GiB), (256 * MiB + 2 * GiB, 1 * GiB)]
    assert rig.dev.actual == 64 * MiB + 3 * GiB  # the 100 MiB left is less than one block
    assert rig.dev.hot_added_ranges() == [(256 * MiB // PAGE, 3 * GiB // PAGE)]
    assert rig.dev.info() == {"id": "hvb0", "memaddr": 192 * MiB, "max-size": 4 * GiB, "memdev": "/objects/hvb0-memdev"}
    rig.target(64 * MiB + 8 * GiB)  # beyond the region: adds what is left (3.75 GiB aligned down)
    assert rig.dev.actual == 64 * MiB + (4 * GiB - 128 * MiB)
    assert rig.dev.stats()["pages"]["hot-added"] == (4 * GiB - 128 * MiB) // PAGE


def test_hot_added_memory_can_be_ballooned_and_given_back() -> None:
    rig = Rig(hot_add_gpa=128 * MiB, hot_add_size=1 * GiB, alignment=7)
    rig.target(64 * MiB + 256 * MiB)
    rig.guest.free = rig.guest.free.__class__()
    rig.guest.free.add(128 * MiB // PAGE, 256 * MiB // PAGE)  # the guest only gives hot-added pages
    rig.target(64 * MiB + 128 * MiB)
    assert all(s >= 128 * MiB // PAGE for s, _ in rig.dev.ballooned_ranges())
    assert rig.dev.actual == 192 * MiB and rig.dev.stats()["bad-ranges"] == {}
    rig.target(64 * MiB + 256 * MiB)  # unballoons first, no hot-add needed
    assert rig.dev.actual == 320 * MiB and len(rig.hot_add.maps) == 1


def test_unballoon_comes_before_hot_add() -> None:
    rig = Rig(hot_add_gpa=128 * MiB, hot_add_size=1 * GiB, alignment=7)
    rig.target(32 * MiB)
    rig.channel.log.clear()
    rig.target(64 * MiB + 256 * MiB)
    kinds = [type(m) for m in rig.channel.log]
    assert kinds == [UnballoonRequest, HotAddRequest]
    assert rig.dev.actual == 320 * MiB and rig.dev.ballooned_ranges() == []


def test_partial_hot_add_stops_hot_add_until_reset() -> None:
    rig = Rig(hot_add_gpa=128 * MiB, hot_add_size=2 * GiB, alignment=7)
    rig.guest.hot_add_answer = (128 * MiB // PAGE, 1)  # one block of the 1 GiB asked
    rig.target(64 * MiB + 1 * GiB)
    assert rig.dev.actual == 64 * MiB + 128 * MiB
    stats = rig.dev.stats()["hot-add"]
    assert stats["stopped"] == "partial" and stats["partial"] == 1
    rig.target(64 * MiB + 1 * GiB)  # asking again does not resume a permanent stop
    assert len([m for m in rig.channel.log if isinstance(m, HotAddRequest)]) == 1
    rig.dev.reset()
    assert rig.dev.actual == 64 * MiB and rig.hot_add.unmaps == 1
    rig.guest = LinuxDmGuest(rig.dev, rig.channel, rig.ram)
    assert rig.guest.connect()
    rig.target(64 * MiB + 256 * MiB)
    assert rig.dev.actual == 320 * MiB


def test_hot_add_refused_with_no_pages_is_permanent() -> None:
    rig = Rig(hot_add_gpa=128 * MiB, hot_add_size=1 * GiB, alignment=7)
    rig.guest.hot_add_answer = (0, 1)  # Linux: do_hot_add is off
    rig.target(64 * MiB + 256 * MiB)
    rig.target(64 * MiB + 256 * MiB)
    assert len([m for m in rig.channel.log if isinstance(m, HotAddRequest)]) == 1
    assert rig.dev.stats()["hot-add"]["stopped"] == "refused" and rig.dev.actual == 64 * MiB


def test_failed_hot_add_is_retried_on_the_next_target() -> None:
    rig = Rig(hot_add_gpa=128 * MiB, hot_add_size=1 * GiB, alignment=7)
    rig.guest.hot_add_answer = (0, 0)  # transient failure
    rig.target(64 * MiB + 256 * MiB)
    assert rig.dev.actual == 64 * MiB and rig.dev.stats()["hot-add"]["failed"] == 1
    rig.guest.hot_add_answer = None
    rig.target(64 * MiB + 256 * MiB)
    assert rig.dev.actual == 320 * MiB
    # the same range was offered again, and mapped only once
    assert rig.hot_add.maps == [(128 * MiB, 256 * MiB)]


def test_hot_add_response_claiming_too_much_is_clamped() -> None:
    rig = Rig(hot_add_gpa=128 * MiB, hot_add_size=1 * GiB, alignment=7)
    rig.dev.set_target(64 * MiB + 128 * MiB)
    (req,) = rig.channel.take()
    rig.guest.send(HotAddResponse(1, req.range.count * 4, 1))
    assert rig.dev.actual == 192 * MiB and rig.dev.stats()["hot-add"]["excess"] == 1


def test_hot_add_map_failure_sends_nothing_and_is_retried() -> None:
    rig = Rig(hot_add_gpa=128 * MiB, hot_add_size=1 * GiB, alignment=7)
    rig.hot_add.fail = True
    rig.target(64 * MiB + 128 * MiB)
    assert not any(isinstance(m, HotAddRequest) for m in rig.channel.log)
    assert rig.dev.stats()["host-errors"] == {"map": 1} and rig.dev.stats()["hot-add"]["stopped"] == "map-failed"
    rig.target(64 * MiB + 128 * MiB)
    assert rig.dev.actual == 192 * MiB


def test_region_without_an_aligned_block_is_never_offered() -> None:
    rig = Rig(hot_add_gpa=192 * MiB, hot_add_size=192 * MiB, alignment=8)  # 256 MiB blocks
    rig.target(1 * GiB)
    assert not any(isinstance(m, HotAddRequest) for m in rig.channel.log) and rig.hot_add.maps == []
    assert rig.dev.actual == 64 * MiB


def test_guest_without_hot_add_is_not_asked() -> None:
    rig = Rig(hot_add_gpa=128 * MiB, hot_add_size=1 * GiB, hot_add=False)
    rig.target(1 * GiB)
    assert not any(isinstance(m, HotAddRequest) for m in rig.channel.log)


# ---------------------------------------------------------------- refusals of ranges
def hole_rig() -> Rig:
    """Boot RAM with a hole ([0, 2 MiB) and [4, 6 MiB)), a 4 MiB region at 8 MiB with 1 MiB
    blocks, of which 1 MiB is hot-added."""
    rig = Rig(ram=((0, 2 * MiB), (4 * MiB, 2 * MiB)), hot_add_gpa=8 * MiB, hot_add_size=4 * MiB, alignment=0)
    rig.target(5 * MiB)
    assert rig.dev.hot_added_ranges() == [(8 * MiB // PAGE, 256)]
    return rig


def test_bad_ranges_are_refused_by_kind_and_never_discarded() -> None:
    rig = hole_rig()
    rig.dev.set_target(1 * MiB)
    (req,) = rig.channel.take()
    assert isinstance(req, BalloonRequest)
    p = lambda addr: addr // PAGE  # noqa: E731
    ranges = (
        PageRange(p(0), 16),                 # good: boot RAM
        PageRange(p(2 * MiB), 1),            # in the hole
        PageRange(p(2 * MiB) - 1, 2),        # boot RAM running into the hole
        PageRange(p(9 * MiB), 1),            # in the region, not hot-added
        PageRange(p(9 * MiB) - 1, 2),        # hot-added running into the part not added
        PageRange(p(8 * MiB), 8),            # good: hot-added
        PageRange(p(4 * MiB), 4),            # good: boot RAM above the hole
        PageRange(p(0) + 8, 16),             # overlaps the first: a double free
        PageRange(p(4 * MiB) + 3, 1),        # double free inside one range
        PageRange(p(5 * MiB), 0),            # empty
        PageRange((1 << 40) - 1, (1 << 24) - 1),  # far outside everything
    )
    rig.guest.send(BalloonResponse(1, False, ranges))
    stats = rig.dev.stats()
    assert stats["bad-ranges"] == {"outside-ram": 3, "not-hot-added": 2, "double-free": 2, "empty": 1}
    good = guest_pages([(0, 16), (p(8 * MiB), 8), (p(4 * MiB), 4)])
    assert rig.ballooned_pages() == good and rig.memory.discarded_pages() == good
    # the discards were split at region boundaries
    assert sorted(rig.memory.discards) == [(0, 16 * PAGE), (4 * MiB, 4 * PAGE), (8 * MiB, 8 * PAGE)]
    assert stats["range-time-us"]["count"] == len(ranges)


def test_responses_nobody_asked_for_are_refused() -> None:
    rig = hole_rig()
    rig.guest.send(BalloonResponse(1, False, (PageRange(0, 16), PageRange(32, 16))))
    rig.guest.send(UnballoonResponse(2))
    rig.guest.send(HotAddResponse(3, 256, 1))
    stats = rig.dev.stats()
    assert stats["unexpected"] == {"DM_BALLOON_RESPONSE": 1, "DM_UNBALLOON_RESPONSE": 1, "DM_MEM_HOT_ADD_RESPONSE": 1}
    assert stats["bad-ranges"] == {"unrequested": 2}
    assert rig.dev.ballooned_ranges() == [] and rig.dev.actual == 5 * MiB and rig.memory.discards == []


def test_malformed_packets_are_counted_by_kind() -> None:
    rig = Rig()
    for raw in (b"", b"\x07\x00", b"\x07\x00\x40\x00\x00\x00\x00\x00", b"\x63\x00\x08\x00\x00\x00\x00\x00",
                BalloonResponse(1, False, (PageRange(0, 1),)).pack()[:-8]):
        rig.dev.packet(rig.channel, raw, 0)
    assert rig.dev.stats()["malformed"] == {"short-header": 2, "bad-size": 2, "unknown-type": 1}
    assert rig.dev.stats()["host-errors"] == {}


def test_a_packet_on_another_channel_is_ignored() -> None:
    rig = Rig()
    rig.dev.packet(FakeChannel(relid=9), StatusReport(1, 2, 3).pack(), 0)
    assert rig.dev.stats()["unexpected"] == {"no-open-channel": 1} and rig.dev.status_report() is None


# ---------------------------------------------------------------- sending
def test_ring_full_keeps_messages_in_order_until_poll() -> None:
    rig = Rig()
    rig.dev.set_target(64 * MiB - 600 * PAGE)
    rig.channel.take()
    rig.guest.send(BalloonResponse(1, False, tuple(PageRange(2 * i + 1, 1) for i in range(600))))
    rig.channel.full = True
    rig.dev.set_target(64 * MiB)  # two unballoon messages, neither fits
    assert rig.channel.sent == [] and rig.dev.stats()["outbox"] == 2 and rig.dev.stats()["send-retries"] == 1
    rig.dev.poll()
    assert rig.dev.stats()["send-retries"] == 2
    rig.channel.full = False
    rig.dev.poll()
    msgs = rig.channel.take()
    assert [m.more_pages for m in msgs] == [True, False] and rig.dev.stats()["outbox"] == 0


def test_a_guest_packet_flushes_the_outbox() -> None:
    rig = Rig()
    rig.channel.full = True
    rig.dev.set_target(32 * MiB)
    rig.channel.full = False
    rig.guest.status(1, 2)  # the next packet from the guest retries the send
    assert isinstance(rig.channel.take()[0], BalloonRequest)


# ---------------------------------------------------------------- close and reset
def test_reset_returns_to_boot_size() -> None:
    rig = Rig(hot_add_gpa=128 * MiB, hot_add_size=1 * GiB, alignment=7)
    rig.target(64 * MiB + 256 * MiB)
    rig.target(200 * MiB)
    assert rig.dev.ballooned_ranges() and rig.dev.hot_added_ranges()
    rig.dev.set_target(100 * MiB)  # a request in flight
    rig.dev.reset()
    assert rig.dev.actual == 64 * MiB and rig.dev.target == 64 * MiB
    assert rig.dev.ballooned_ranges() == [] and rig.dev.hot_added_ranges() == []
    assert rig.hot_add.unmaps == 1 and rig.dev.state == "closed" and rig.dev.stats()["outbox"] == 0
    rig.guest.send(BalloonResponse(1, False, (PageRange(0, 512),)))  # the old driver, too late
    assert rig.dev.stats()["unexpected"] == {"no-open-channel": 1} and rig.dev.ballooned_ranges() == []
    rig.channel.take()
    guest = LinuxDmGuest(rig.dev, rig.channel, rig.ram)
    assert guest.connect()
    assert rig.channel.sent == []  # target forgotten: nothing to do
    rig.dev.set_target(64 * MiB + 128 * MiB)
    guest.run()
    assert rig.dev.hot_added_ranges() == [(128 * MiB // PAGE, 128 * MiB // PAGE)]  # from the region start again


def test_closed_cancels_pending_work_and_forgets_ballooned_pages() -> None:
    rig = Rig(hot_add_gpa=128 * MiB, hot_add_size=1 * GiB, alignment=7)
    rig.target(64 * MiB + 128 * MiB)
    rig.target(100 * MiB)
    rig.dev.set_target(64 * MiB)
    assert isinstance(rig.channel.take()[0], BalloonRequest)  # in flight
    rig.dev.closed()
    stats = rig.dev.stats()
    assert stats["state"] == "closed" and stats["outbox"] == 0 and stats["version"] is None
    assert rig.dev.ballooned_ranges() == []
    # hot-added memory stays: a guest that unbinds the driver keeps using it
    assert rig.dev.hot_added_ranges() == [(128 * MiB // PAGE, 128 * MiB // PAGE)] and rig.hot_add.unmaps == 0
    assert rig.dev.actual == 192 * MiB
    rig.guest.send(BalloonResponse(1, False, (PageRange(0, 512),)))
    assert rig.dev.ballooned_ranges() == []
    # a new driver instance: the target is still wanted
    guest = LinuxDmGuest(rig.dev, rig.channel, rig.ram + [(128 * MiB, 128 * MiB)])
    assert guest.connect()
    guest.run()
    assert rig.dev.actual == 64 * MiB


def test_reopen_without_close_starts_a_new_session() -> None:
    rig = Rig()
    rig.target(32 * MiB)
    other = FakeChannel(relid=8)
    rig.dev.opened(other)
    assert rig.dev.state == "version" and rig.dev.ballooned_ranges() == [] and rig.dev.stats()["reopened"] == 1


# ---------------------------------------------------------------- threads
def test_targets_from_another_thread_while_the_guest_answers() -> None:
    rig = Rig(hot_add_gpa=128 * MiB, hot_add_size=512 * MiB, alignment=7, floor_pages=0)
    rnd = random.Random(1)
    targets = [rnd.randrange(8, 64 + 512, 4) * MiB for _ in range(200)]
    done = threading.Event()

    def qmp() -> None:
        for t in targets:
            rig.dev.set_target(t)
            time.sleep(0.0005)
        done.set()

    thread = threading.Thread(target=qmp)
    thread.start()
    handled = 0
    while not done.is_set():
        handled += rig.guest.run()
    thread.join()
    rig.guest.run()
    assert handled > 20  # the two threads did interleave
    stats = rig.dev.stats()
    assert stats["state"] == "idle" and stats["outbox"] == 0 and stats["host-errors"] == {}
    assert stats["unexpected"] == {} and stats["bad-ranges"] == {}
    target, hot_added = targets[-1], stats["pages"]["hot-added"] * PAGE
    if target <= 64 * MiB + hot_added:
        assert rig.dev.actual == target
    else:  # hot-add stops short by less than one 128 MiB block
        assert target - 128 * MiB < rig.dev.actual <= target
    assert rig.ballooned_pages() == guest_pages(rig.guest.ballooned)
    assert guest_pages(rig.dev.hot_added_ranges()) == guest_pages(rig.guest.added)


def test_a_send_that_raises_keeps_the_message() -> None:
    rig = Rig()

    def broken(payload: bytes, trans_id: int = 0, completion_requested: bool = False) -> bool:
        raise RuntimeError("bus bug")

    good = rig.channel.send
    rig.channel.send = broken
    rig.dev.set_target(32 * MiB)  # does not raise into the control plane
    assert rig.dev.stats()["host-errors"] == {"send": 1} and rig.dev.stats()["outbox"] == 1
    rig.channel.send = good
    rig.dev.poll()
    assert isinstance(rig.channel.take()[0], BalloonRequest)


@pytest.mark.parametrize("kwargs", [
    {"boot_ram": []},
    {"boot_ram": [(0, 64 * MiB + 1)]},
    {"boot_ram": [(0, 64 * MiB), (32 * MiB, 64 * MiB)]},                       # overlapping
    {"boot_ram": [(0, 64 * MiB)], "hot_add_gpa": 32 * MiB, "hot_add_size": 64 * MiB, "hot_add": FakeHotAdd()},
    {"boot_ram": [(0, 64 * MiB)], "hot_add_gpa": 128 * MiB, "hot_add_size": 64 * MiB},  # no HotAddMemory
    {"boot_ram": [(0, 64 * MiB)], "hot_add_gpa": 128 * MiB + 1, "hot_add_size": 64 * MiB, "hot_add": FakeHotAdd()},
])
def test_bad_construction_is_refused(kwargs) -> None:
    with pytest.raises(ValueError):
        HvBalloon("bad", memory=FakeMemory(), **kwargs)


@pytest.mark.parametrize("target", [0, -1, 4095, 1.5, True, "1G"])
def test_bad_targets_are_refused(target) -> None:
    with pytest.raises(ValueError):
        Rig().dev.set_target(target)


def test_boot_ram_accepts_ram_layout_and_a_callable() -> None:
    dev = HvBalloon("a", boot_ram=ram_layout(4 * GiB), memory=FakeMemory())
    assert dev.boot_size == 4 * GiB and dev.query() == {"actual": 4 * GiB}
    dev = HvBalloon("b", boot_ram=lambda: [(0, 16 * MiB)], memory=FakeMemory())
    assert dev.boot_size == 16 * MiB and dev.info() == {"id": "b", "max-size": 0}


def test_actual_listener_sees_balloon_and_unballoon() -> None:
    """BALLOON_CHANGE material: every change of `actual`, from a guest answer or a request."""
    rig = Rig()
    seen: list[int] = []
    rig.dev.actual_listener = seen.append
    rig.target(48 * MiB)   # the guest answers the balloon request
    rig.dev.set_target(64 * MiB)
    # Unballooned pages count once the guest confirms them (DM_UNBALLOON_RESPONSE).
    assert seen == [48 * MiB] and rig.dev.actual == 48 * MiB
    rig.guest.run()
    assert seen == [48 * MiB, 64 * MiB] and rig.dev.actual == 64 * MiB

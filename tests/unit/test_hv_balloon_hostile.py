"""A hostile guest against the hv-balloon device, checked against a naive model.

The guest sends random balloon responses (ranges in the hole, in the part of the hot-add
region not added, overlapping what is ballooned, empty, far outside RAM, answers nobody asked
for), random hot-add and unballoon responses, messages out of order and junk, while targets,
closes and resets come in between. The model keeps the ballooned pages as a plain set and
applies the rules by hand; after every step the device must agree with it on the ballooned
and hot-added pages, the refusals by kind, the unexpected messages and the size, must have
discarded exactly the pages it accepted (all inside RAM), must never have more than one
request in flight, and must never raise.
"""

from __future__ import annotations

from collections import Counter

from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from devices.hyperv.balloon import HvBalloon
from devices.hyperv.balloon_protocol import (
    DYNMEM_PROTOCOL_VERSION_WIN10,
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
    parse,
)
from tests.hv_balloon_guest import FakeChannel, FakeHotAdd, FakeMemory

MiB = 1 << 20
PAGE = 4096
# boot RAM [0, 2 MiB) and [4, 6 MiB): pages 0..511 and 1024..1535, a hole between
RAM = [(0, 2 * MiB), (4 * MiB, 2 * MiB)]
BOOT = set(range(0, 512)) | set(range(1024, 1536))
# hot-add region [8, 12 MiB): pages 2048..3071, guest blocks of 1 MiB (256 pages)
REGION = range(2048, 3072)
ALIGN = 256


class Model:
    def __init__(self) -> None:
        self.ballooned: set[int] = set()
        self.hot_added: set[int] = set()
        self.bad: Counter[str] = Counter()
        self.unexpected: Counter[str] = Counter()
        self.balloon_outstanding = False
        self.unballoon_pending = False
        self.unballooning = 0  # pages handed back but not yet confirmed by the guest
        self.hot_add_pending: PageRange | None = None
        self.accepted_since_check: set[int] = set()

    @property
    def present(self) -> set[int]:
        return BOOT | self.hot_added

    def busy(self) -> bool:
        return self.balloon_outstanding or self.unballoon_pending or self.hot_add_pending is not None

    def end_session(self) -> None:
        self.ballooned.clear()
        self.balloon_outstanding = self.unballoon_pending = False
        self.unballooning = 0
        self.hot_add_pending = None

    def range_kind(self, start: int, count: int) -> str | None:
        if count == 0:
            return "empty"
        end = start + count
        # Nothing exists at or above the region's end, so only pages below it need a set.
        present = end <= REGION.stop and set(range(start, end)) <= self.present
        if not present:
            lo, hi = max(start, REGION.start), min(end, REGION.stop)
            if lo < hi and not all(p in self.hot_added for p in range(lo, hi)):
                return "not-hot-added"
            return "outside-ram"
        if any(p in self.ballooned for p in range(start, end)):
            return "double-free"
        return None


class Harness:
    def __init__(self) -> None:
        self.memory = FakeMemory()
        self.hot_add = FakeHotAdd()
        self.channel = FakeChannel()
        self.dev = HvBalloon("hostile", boot_ram=RAM, memory=self.memory, hot_add_gpa=8 * MiB,
                             hot_add_size=4 * MiB, hot_add=self.hot_add)
        self.model = Model()
        self.trans = 0
        self.discards_seen = 0
        self.connect()
        # start with 1 MiB hot-added, so ranges in the region can be good or bad
        self.step(("target", 1024 + 256))
        self.step(("hot-add-response", 256, 1))
        assert self.dev.hot_added_ranges() == [(REGION.start, 256)]

    def send(self, msg) -> None:
        self.trans += 1
        self.dev.packet(self.channel, msg.pack(), 0)

    def connect(self) -> None:
        self.dev.opened(self.channel)
        self.send(VersionRequest(1, DYNMEM_PROTOCOL_VERSION_WIN10))
        self.send(CapabilitiesReport(2, True, True, 0))
        msgs = self.channel.take()
        assert isinstance(msgs[0], VersionResponse) and msgs[0].is_accepted
        assert isinstance(msgs[1], CapabilitiesResponse) and isinstance(msgs[2], InfoMessage)
        self.observe(msgs[3:])

    def observe(self, msgs: list) -> None:
        """Check what the device asked of the guest and track what is in flight."""
        m = self.model
        for msg in msgs:
            if isinstance(msg, BalloonRequest):
                event("balloon request sent")
                assert not m.busy(), "a second request while one is in flight"
                assert msg.num_pages > 0
                m.balloon_outstanding = True
            elif isinstance(msg, UnballoonRequest):
                assert not (m.balloon_outstanding or m.unballoon_pending or m.hot_add_pending)
                for r in msg.ranges:
                    pages = set(range(r.start, r.start + r.count))
                    assert r.count > 0 and pages <= m.ballooned, "gave back pages that were not ballooned"
                    m.ballooned -= pages
                    m.unballooning += len(pages)
                event("unballoon sent")
                if not msg.more_pages:
                    m.unballoon_pending = True
            elif isinstance(msg, HotAddRequest):
                assert not m.busy()
                r = msg.range
                assert msg.region == r and r.start % ALIGN == 0 and r.count % ALIGN == 0 and r.count > 0
                assert r.start >= REGION.start and r.start + r.count <= REGION.stop
                assert not set(range(r.start, r.start + r.count)) & m.hot_added
                m.hot_add_pending = r
                event("hot-add sent")
            else:
                raise AssertionError(f"unexpected host message {msg}")

    def pump(self) -> None:
        self.observe(self.channel.take())

    # --- steps
    def step(self, step) -> None:
        kind = step[0]
        m = self.model
        if kind == "target":
            self.dev.set_target(step[1] * PAGE)
        elif kind == "balloon":
            _, more, ranges = step
            self.send(BalloonResponse(self.trans, more, tuple(PageRange(s, n) for s, n in ranges)))
            if not m.balloon_outstanding:
                m.unexpected["DM_BALLOON_RESPONSE"] += 1
                if ranges:
                    m.bad["unrequested"] += len(ranges)
            else:
                for s, n in ranges:
                    k = m.range_kind(s, n)
                    in_region = "in region" if REGION.start <= s < REGION.stop else "boot or outside"
                    event(f"range: {k or 'accepted'} ({in_region})")
                    if k:
                        m.bad[k] += 1
                    else:
                        m.ballooned |= set(range(s, s + n))
                        m.accepted_since_check |= set(range(s, s + n))
                if not more:
                    m.balloon_outstanding = False
        elif kind == "cycle":
            _, down, give, up = step
            for sub in (("target", down), ("good-balloon", give), ("target", up)):
                self.step(sub)
            return
        elif kind == "good-balloon":
            # a well-behaved answer: up to n pages nobody ballooned, as runs of at most 8
            free = sorted(m.present - m.ballooned)[:step[1]]
            ranges = []
            for p in free:
                if ranges and ranges[-1][0] + ranges[-1][1] == p and ranges[-1][1] < 8:
                    ranges[-1][1] += 1
                else:
                    ranges.append([p, 1])
            self.step(("balloon", False, [tuple(r) for r in ranges]))
            return
        elif kind == "unballoon-response":
            self.send(UnballoonResponse(self.trans))
            if m.unballoon_pending:
                m.unballoon_pending = False
                m.unballooning = 0
            else:
                m.unexpected["DM_UNBALLOON_RESPONSE"] += 1
        elif kind == "hot-add-response":
            _, page_count, result = step
            self.send(HotAddResponse(self.trans, page_count, result))
            r = m.hot_add_pending
            if r is None:
                m.unexpected["DM_MEM_HOT_ADD_RESPONSE"] += 1
            else:
                m.hot_add_pending = None
                if result:
                    m.hot_added |= set(range(r.start, r.start + min(page_count, r.count)))
                    event("hot-add answered with pages" if page_count else "hot-add refused")
                else:
                    event("hot-add failed")
        elif kind == "renegotiate":
            self.send(VersionRequest(self.trans, DYNMEM_PROTOCOL_VERSION_WIN10))
            self.send(CapabilitiesReport(self.trans, True, True, 0))
            m.unexpected["DM_VERSION_REQUEST"] += 1
            m.unexpected["DM_CAPABILITIES_REPORT"] += 1
        elif kind == "host-message":
            self.send(BalloonRequest(self.trans, 5))
            m.unexpected["DM_BALLOON_REQUEST"] += 1
        elif kind == "status":
            self.send(StatusReport(self.trans, step[1], step[2]))
        elif kind == "junk":
            try:
                parse(step[1])
            except DmProtocolError:
                self.dev.packet(self.channel, step[1], 0)
        elif kind == "close":
            self.dev.closed()
            m.end_session()
            self.channel.take()
            self.connect()
        elif kind == "reset":
            self.dev.reset()
            m.end_session()
            m.hot_added.clear()
            self.channel.take()
            self.connect()
        self.pump()
        self.check()

    def check(self) -> None:
        m, dev = self.model, self.dev
        ballooned = {p for s, n in dev.ballooned_ranges() for p in range(s, s + n)}
        hot_added = {p for s, n in dev.hot_added_ranges() for p in range(s, s + n)}
        assert ballooned == m.ballooned
        assert hot_added == m.hot_added
        stats = dev.stats()
        assert stats["bad-ranges"] == {k: v for k, v in m.bad.items() if v}
        assert stats["unexpected"] == {k: v for k, v in m.unexpected.items() if v}
        assert "internal" not in stats["host-errors"]
        assert dev.actual == (len(BOOT) + len(m.hot_added) - len(m.ballooned) - m.unballooning) * PAGE
        new = self.memory.discards[self.discards_seen:]
        self.discards_seen = len(self.memory.discards)
        discarded = [p for gpa, size in new for p in range(gpa // PAGE, (gpa + size) // PAGE)]
        assert len(discarded) == len(set(discarded)), "a page discarded twice in one step"
        assert set(discarded) == m.accepted_since_check and set(discarded) <= m.present
        for gpa, size in new:  # each discard stays inside one boot RAM range or the region
            lo, hi = gpa // PAGE, (gpa + size) // PAGE
            assert any(a <= lo and hi <= b for a, b in ((0, 512), (1024, 1536), (REGION.start, REGION.stop)))
        m.accepted_since_check = set()


page = st.one_of(st.integers(0, 3300), st.integers(0, (1 << 40) - 1), st.integers(0, 511), st.integers(1024, 1535),
                 st.integers(2048, 2600))
count = st.one_of(st.integers(0, 40), st.integers(0, 700), st.just((1 << 24) - 1))
target = st.tuples(st.just("target"), st.integers(1, 2600))
good_balloon = st.tuples(st.just("good-balloon"), st.integers(0, 300))
random_balloon = st.tuples(st.just("balloon"), st.booleans(), st.lists(st.tuples(page, count), max_size=8))
small_balloon = st.tuples(st.just("balloon"), st.booleans(),
                          st.lists(st.tuples(st.integers(0, 3300), st.integers(1, 64)), max_size=6))
unballoon_response = st.tuples(st.just("unballoon-response"))
hot_add_response = st.tuples(st.just("hot-add-response"), st.sampled_from([0, 1, 100, 256, 512, 5000, 2**32 - 1]),
                             st.sampled_from([0, 1, 1, 7]))
# down, let the guest give pages, back up: the path to an unballoon
cycle = st.tuples(st.just("cycle"), st.integers(1, 1500), st.integers(0, 300), st.integers(1, 2600))
rare = st.one_of(
    st.tuples(st.just("renegotiate")),
    st.tuples(st.just("host-message")),
    st.tuples(st.just("status"), st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
    st.tuples(st.just("junk"), st.binary(max_size=40)),
    st.tuples(st.just("close")),
    st.tuples(st.just("reset")),
)
steps = st.one_of(target, good_balloon, cycle, random_balloon, small_balloon, unballoon_response, hot_add_response, rare)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(steps, min_size=5, max_size=60))
def test_a_hostile_guest_never_breaks_the_books(script) -> None:
    h = Harness()
    for step in script:
        h.step(step)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["closed", "version", "caps", "idle", "balloon"]), st.lists(st.binary(max_size=64), max_size=20))
def test_random_packets_in_every_state_never_raise(state, packets) -> None:
    memory, channel = FakeMemory(), FakeChannel()
    dev = HvBalloon("fuzz", boot_ram=RAM, memory=memory, hot_add_gpa=8 * MiB, hot_add_size=4 * MiB, hot_add=FakeHotAdd())
    if state != "closed":
        dev.opened(channel)
    if state in ("caps", "idle", "balloon"):
        dev.packet(channel, VersionRequest(1, DYNMEM_PROTOCOL_VERSION_WIN10).pack(), 0)
    if state in ("idle", "balloon"):
        dev.packet(channel, CapabilitiesReport(2, True, True, 0).pack(), 0)
    if state == "balloon":
        dev.set_target(1 * MiB)
    assert dev.state == state
    before = dev.stats()
    for raw in packets:
        dev.packet(channel, raw, 0)
    after = dev.stats()
    handled = (sum(after["messages-received"].values()) - sum(before["messages-received"].values())
               + sum(after["malformed"].values()) - sum(before["malformed"].values())
               + after["unexpected"].get("no-open-channel", 0) - before["unexpected"].get("no-open-channel", 0))
    assert handled == len(packets)
    assert "internal" not in after["host-errors"]
    ballooned = {p for s, n in dev.ballooned_ranges() for p in range(s, s + n)}
    assert ballooned <= BOOT  # nothing hot-added here, so only boot RAM can be ballooned

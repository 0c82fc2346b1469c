"""What `pyvmm plot` draws, computed from a pyvmm trace (docs: the trace format, version 1).

This module reads a JSON Lines trace and replays it into plain data: step series over time
(requested and plugged size per virtio-mem device, hv-balloon target / ballooned / hot-added,
the number and size of mapped memslots) and, per virtio-mem device, a block map over time in
three states. It needs no plotting library, so it can be tested and reused on its own.

Block states follow the trace format's reconstruction rule: every block starts unplugged; an
acknowledged PLUG sets blocks, an acknowledged UNPLUG clears them, UNPLUG_ALL and a reset
clear all. An unplugged block is *protected* while a memslot covers it (the slot is mapped,
the block's pages are PROT_NONE), otherwise it has *no memslot*.

Block maps stay bounded however large the region and however long the trace:
- rows: blocks are grouped into at most `max_rows` rows of a power-of-two number of blocks
  (so rows line up with memslots); a row records which share of its blocks is plugged and
  which is protected (in 1/255ths, a share that is not zero is at least 1/255), and the
  picture blends the three state colours in those proportions;
- columns: one per change point, but changes closer together than 1/`max_columns` of the
  trace's duration collapse into the last of them (the state it reached, at its time).
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bitarray import bitarray

from pyvmm.trace_file import TraceError, read_trace

DEFAULT_MAX_ROWS = 2048
DEFAULT_MAX_COLUMNS = 4096

# A row's share of plugged and of protected blocks, each a byte: FULL is all of the row.
FULL = 255

# Block states, ordered so that a larger code wins a tie in `BlockMap.states_at`.
NO_MEMSLOT = 0
PROTECTED = 1
PLUGGED = 2
STATE_NAMES = {PLUGGED: "plugged", PROTECTED: "unplugged, memslot mapped (protected)",
               NO_MEMSLOT: "unplugged, no memslot"}


@dataclass
class Step:
    """A quantity over time: each value holds from its time until the next one."""

    times: list[float] = field(default_factory=list)
    values: list[int] = field(default_factory=list)

    def set(self, t: float, value: int) -> None:
        if self.values and self.values[-1] == value:
            return
        if self.times and self.times[-1] == t:
            # Two changes at one instant: only the outcome is visible.
            self.values[-1] = value
            if len(self.values) > 1 and self.values[-2] == value:
                self.times.pop()
                self.values.pop()
            return
        self.times.append(t)
        self.values.append(value)

    def value_at(self, t: float, default: int = 0) -> int:
        i = bisect_right(self.times, t)
        return self.values[i - 1] if i else default

    def peak(self) -> int:
        return max(self.values, default=0)

    def __bool__(self) -> bool:
        return bool(self.times)


@dataclass
class BlockMap:
    """One virtio-mem region's block states over time, downsampled to `rows` rows.

    Only the first `nb_blocks` blocks are mapped: the blocks above the highest one ever plugged
    or covered by a memslot (plus a margin) never leave the no-memslot state, and a 1 TiB region
    with 1 GiB in use would otherwise be one thin line.

    `columns[i]` holds from `times[i]` until `times[i + 1]`; before `times[0]` every block is
    unplugged with no memslot. A column has two bytes per row: the row's plugged share and
    its protected share, 0 to FULL; the rest of the row has no memslot.
    """

    addr: int
    block_size: int
    region_blocks: int
    nb_blocks: int       # blocks shown: the region up to a little above the highest one used
    blocks_per_row: int
    times: list[float] = field(default_factory=list)
    columns: list[bytes] = field(default_factory=list)

    @property
    def rows(self) -> int:
        return -(-self.nb_blocks // self.blocks_per_row)

    def row_gpa(self, row: int) -> int:
        """The guest-physical address where `row` starts."""
        return self.addr + row * self.blocks_per_row * self.block_size

    def column_at(self, t: float) -> bytes:
        i = bisect_right(self.times, t)
        return self.columns[i - 1] if i else bytes(2 * self.rows)

    def shares_at(self, t: float) -> list[tuple[float, float, float]]:
        """Per row, the (plugged, protected, no-memslot) shares of its blocks at time t."""
        column = self.column_at(t)
        return [(p / FULL, q / FULL, (FULL - p - q) / FULL) for p, q in zip(column[0::2], column[1::2])]

    def states_at(self, t: float) -> list[int]:
        """Per row, the state most of its blocks are in (exact when a row is one block);
        on a tie plugged wins over protected, protected over no memslot."""
        column = self.column_at(t)
        return [max((p, PLUGGED), (q, PROTECTED), (FULL - p - q, NO_MEMSLOT))[1]
                for p, q in zip(column[0::2], column[1::2])]

    def raster(self, t_end: float, bins: int) -> list[bytes]:
        """Columns on a uniform time grid: `bins` of them over [0, t_end], each the one in force
        at the end of its bin (for drawing as an image; states shorter than a bin may vanish)."""
        if bins <= 0:
            raise ValueError("bins must be positive")
        width = t_end / bins if t_end > 0 else 0.0
        return [self.column_at((i + 1) * width if i + 1 < bins else t_end) for i in range(bins)]


@dataclass
class VirtioMemTimeline:
    id: str
    addr: int
    region_size: int
    block_size: int
    slot_size: int
    requested: Step = field(default_factory=Step)
    plugged: Step = field(default_factory=Step)
    resets: list[float] = field(default_factory=list)
    # (time, request type, response) of every answer other than ACK
    refused: list[tuple[float, str, str]] = field(default_factory=list)
    # (time, gpa, kind) of every access to unplugged memory
    unplugged_accesses: list[tuple[float, int, str]] = field(default_factory=list)
    blocks: BlockMap | None = None


@dataclass
class HvBalloonTimeline:
    id: str
    memdev_size: int
    target: Step = field(default_factory=Step)
    ballooned: Step = field(default_factory=Step)
    hot_added: Step = field(default_factory=Step)
    committed: Step = field(default_factory=Step)


@dataclass
class MemslotTimeline:
    count: Step = field(default_factory=Step)
    total_size: Step = field(default_factory=Step)
    size_by_owner: dict[str, Step] = field(default_factory=dict)


@dataclass
class TraceData:
    """Everything `pyvmm plot` draws; times are seconds since the trace started."""

    duration: float
    started: str  # wall-clock start (trace-start's `wall`), "" if absent
    virtio_mem: dict[str, VirtioMemTimeline]
    hv_balloon: dict[str, HvBalloonTimeline]
    memslots: MemslotTimeline
    unknown_events: Counter = field(default_factory=Counter)
    truncated: bool = False  # the last line was cut off (the VMM was killed mid-write)

    def is_empty(self) -> bool:
        return not self.virtio_mem and not self.hv_balloon and not self.memslots.count


# ---------------------------------------------------------------------------- reading


def load_trace(path: str | Path, *, max_rows: int = DEFAULT_MAX_ROWS,
               max_columns: int = DEFAULT_MAX_COLUMNS) -> TraceData:
    """Read and replay a trace file; TraceError (one line) if it cannot be used."""
    events: list[dict] = []

    def keep(event: dict, number: int) -> None:
        event["_line"] = number  # for error messages during the replay
        events.append(event)
    truncated = read_trace(path, keep)
    try:
        data = replay(events, max_rows=max_rows, max_columns=max_columns)
    except TraceError as e:
        raise TraceError(f"{path}: {e}") from None
    data.truncated = truncated
    return data


def _int(ev: dict, name: str, *, minimum: int = 0) -> int:
    value = ev.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise TraceError(f"line {ev['_line']}: {ev['ev']} needs an integer '{name}' >= {minimum}")
    return value


def _str(ev: dict, name: str) -> str:
    value = ev.get(name)
    if not isinstance(value, str):
        raise TraceError(f"line {ev['_line']}: {ev['ev']} needs a string '{name}'")
    return value


# ---------------------------------------------------------------------------- replay


def _share(count: int, total: int) -> int:
    """count/total in 1/FULLs; a share that is not zero stays visible (at least 1)."""
    return max(1, round(FULL * count / total)) if count else 0


def _blocks_per_row(nb_blocks: int, max_rows: int) -> int:
    per_row = 1
    while -(-nb_blocks // per_row) > max_rows:
        per_row *= 2
    return per_row


class _BlockReplay:
    """One device's plugged and memslot-covered blocks, and its downsampled rows."""

    def __init__(self, dev: VirtioMemTimeline, shown: int, max_rows: int, column_width: float) -> None:
        nb = _shown_blocks(dev, shown)
        self.dev = dev
        self.plugged = bitarray(nb)
        self.plugged.setall(0)
        self.covered = bitarray(nb)  # blocks inside a registered memslot
        self.covered.setall(0)
        self.map = BlockMap(dev.addr, dev.block_size, dev.region_size // dev.block_size, nb,
                            _blocks_per_row(nb, max_rows))
        self.rows = bytearray(2 * self.map.rows)  # the current column
        self.column_width = column_width
        self._last_bucket = -1

    def block_range(self, gpa: int, size: int) -> tuple[int, int]:
        """Blocks [first, end) of the region that [gpa, gpa + size) touches, clipped."""
        bs = self.dev.block_size
        first = max(0, (gpa - self.dev.addr) // bs)
        end = min(len(self.plugged), -(-(gpa + size - self.dev.addr) // bs))
        return first, max(first, end)

    def set_plugged(self, first: int, end: int, value: bool) -> None:
        if first < end:
            self.plugged[first:end] = value
            self._refresh(first, end)

    def set_covered(self, first: int, end: int, value: bool) -> None:
        if first < end:
            self.covered[first:end] = value
            self._refresh(first, end)

    def _refresh(self, first: int, end: int) -> None:
        per_row = self.map.blocks_per_row
        nb = len(self.plugged)
        for row in range(first // per_row, (end - 1) // per_row + 1):
            lo, hi = row * per_row, min(nb, (row + 1) * per_row)
            plugged = self.plugged.count(1, lo, hi)
            if hi - lo == 1:
                protected = int(self.covered[lo] and not plugged)
            else:
                protected = (self.covered[lo:hi] & ~self.plugged[lo:hi]).count()
            p, q = _share(plugged, hi - lo), _share(protected, hi - lo)
            self.rows[2 * row] = p
            self.rows[2 * row + 1] = min(q, FULL - p)

    def record(self, t: float) -> None:
        """Snapshot the rows as the column for time t (replacing one in the same time bucket)."""
        m = self.map
        snapshot = bytes(self.rows)
        bucket = int(t / self.column_width) if self.column_width > 0 else 0
        if m.columns and bucket == self._last_bucket:
            m.times.pop()
            m.columns.pop()
        previous = m.columns[-1] if m.columns else bytes(len(snapshot))
        if snapshot != previous:
            m.times.append(t)
            m.columns.append(snapshot)
            self._last_bucket = bucket
        else:
            self._last_bucket = -1  # the last column (if any) belongs to an earlier bucket


def _shown_blocks(dev: VirtioMemTimeline, used_end: int) -> int:
    """Blocks to map: up to `used_end` (bytes into the region) plus an eighth, at least one
    more memslot, rounded up to a memslot; never past the region."""
    end = used_end + max(dev.slot_size, used_end // 8)
    end = -(-end // dev.slot_size) * dev.slot_size
    return max(1, min(dev.region_size, end) // dev.block_size)


def _used_extents(events: list[dict]) -> dict[str, int]:
    """Per virtio-mem device id: bytes into its region up to the end of the highest block that
    an acknowledged PLUG or a memslot ever touched (a quick pre-pass; fields checked later)."""
    regions: dict[str, tuple[int, int, int]] = {}  # id -> (addr, region size, block size)
    used: dict[str, int] = {}

    def touch(dev_id: str, gpa: Any, size: Any) -> None:
        if not isinstance(gpa, int) or not isinstance(size, int):
            return
        addr, region, _ = regions[dev_id]
        end = min(region, gpa + size - addr)
        if end > 0 and gpa < addr + region:
            used[dev_id] = max(used.get(dev_id, 0), end)

    for ev in events:
        kind = ev["ev"]
        if kind == "virtio-mem.device":
            fields = (ev.get("addr"), ev.get("region-size"), ev.get("block-size"))
            if all(isinstance(v, int) for v in fields):
                regions[ev.get("id")] = fields
        elif kind == "virtio-mem.response" and ev.get("type") == "plug" and ev.get("resp") == "ack":
            dev_id = ev.get("id")
            if dev_id in regions and isinstance(ev.get("nb-blocks"), int):
                touch(dev_id, ev.get("addr"), ev["nb-blocks"] * regions[dev_id][2])
        elif kind == "memslot.add":
            for dev_id in regions:
                touch(dev_id, ev.get("gpa"), ev.get("size"))
    return used


def replay(events: list[dict], *, max_rows: int = DEFAULT_MAX_ROWS,
           max_columns: int = DEFAULT_MAX_COLUMNS) -> TraceData:
    """Replay parsed events (from `read_events`) into timelines and block maps."""
    if max_rows < 1 or max_columns < 1:
        raise ValueError("max_rows and max_columns must be positive")
    t0 = events[0]["t"]
    duration = max(0.0, max(ev["t"] for ev in events) - t0)
    column_width = duration / max_columns
    used = _used_extents(events)
    vmem: dict[str, VirtioMemTimeline] = {}
    blocks: dict[str, _BlockReplay] = {}
    balloons: dict[str, HvBalloonTimeline] = {}
    slots = MemslotTimeline()
    active: dict[int, tuple[int, int, str]] = {}  # slot -> (gpa, size, owner)
    by_owner: Counter = Counter()                 # owner -> bytes mapped now
    unknown: Counter = Counter()

    def slots_changed(t: float, owner: str, delta: int) -> None:
        by_owner[owner] += delta
        slots.count.set(t, len(active))
        slots.total_size.set(t, sum(by_owner.values()))
        slots.size_by_owner.setdefault(owner, Step()).set(t, by_owner[owner])

    def cover(t: float, gpa: int, size: int, value: bool) -> None:
        for rep in blocks.values():
            first, end = rep.block_range(gpa, size)
            if first < end:
                rep.set_covered(first, end, value)
                rep.record(t)

    def device(ev: dict, key: str = "id") -> tuple[VirtioMemTimeline, _BlockReplay] | None:
        dev_id = ev.get(key)
        if dev_id not in vmem:
            unknown[f"{ev['ev']} (undeclared device)"] += 1
            return None
        return vmem[dev_id], blocks[dev_id]

    # Threads stamp events before they take the writer's lock, so neighbours may be a few
    # microseconds out of order in the file; the sort is stable for equal times.
    for ev in sorted(events[1:], key=lambda ev: ev["t"]):
        t = max(0.0, ev["t"] - t0)
        kind = ev["ev"]
        if kind == "virtio-mem.device":
            dev = VirtioMemTimeline(_str(ev, "id"), _int(ev, "addr"), _int(ev, "region-size", minimum=1),
                                    _int(ev, "block-size", minimum=1), _int(ev, "slot-size", minimum=1))
            if dev.region_size % dev.block_size:
                raise TraceError(f"line {ev['_line']}: region-size is not a multiple of block-size")
            dev.requested.set(t, _int(ev, "requested-size"))
            dev.plugged.set(t, 0)
            vmem[dev.id] = dev
            blocks[dev.id] = rep = _BlockReplay(dev, used.get(dev.id, 0), max_rows, column_width)
            dev.blocks = rep.map
            # Slots registered before the device line (unlikely) still cover its blocks.
            for gpa, size, _ in active.values():
                first, end = rep.block_range(gpa, size)
                rep.set_covered(first, end, True)
        elif kind == "virtio-mem.requested-size":
            found = device(ev)
            if found:
                found[0].requested.set(t, _int(ev, "size"))
        elif kind == "virtio-mem.size":
            found = device(ev)
            if found:
                found[0].plugged.set(t, _int(ev, "size"))
        elif kind == "virtio-mem.response":
            found = device(ev)
            if not found:
                continue
            dev, rep = found
            req, resp = _str(ev, "type"), _str(ev, "resp")
            if resp != "ack":
                dev.refused.append((t, req, resp))
            elif req in ("plug", "unplug"):
                first = (_int(ev, "addr") - dev.addr) // dev.block_size
                end = min(len(rep.plugged), first + _int(ev, "nb-blocks"))
                rep.set_plugged(max(0, first), end, req == "plug")
                rep.record(t)
            elif req == "unplug-all":
                rep.set_plugged(0, len(rep.plugged), False)
                rep.record(t)
        elif kind == "virtio-mem.reset":
            found = device(ev)
            if found:
                dev, rep = found
                dev.resets.append(t)
                rep.set_plugged(0, len(rep.plugged), False)
                rep.record(t)
        elif kind == "memslot.add":
            slot, gpa, size = _int(ev, "slot"), _int(ev, "gpa"), _int(ev, "size")
            owner = ev.get("owner") if isinstance(ev.get("owner"), str) else "?"
            if slot in active:  # re-added without a remove: the old extent is gone
                old_gpa, old_size, old_owner = active.pop(slot)
                cover(t, old_gpa, old_size, False)
                slots_changed(t, old_owner, -old_size)
            active[slot] = (gpa, size, owner)
            cover(t, gpa, size, True)
            slots_changed(t, owner, size)
        elif kind == "memslot.remove":
            slot = _int(ev, "slot")
            if slot not in active:
                unknown["memslot.remove (unknown slot)"] += 1
                continue
            gpa, size, owner = active.pop(slot)
            cover(t, gpa, size, False)
            slots_changed(t, owner, -size)
        elif kind == "unplugged-access":
            found = device(ev, "device")
            if found:
                found[0].unplugged_accesses.append((t, _int(ev, "gpa"), str(ev.get("kind", "?"))))
        elif kind == "hv-balloon.device":
            memdev = ev.get("memdev-size")
            balloon_id = _str(ev, "id")
            balloons[balloon_id] = HvBalloonTimeline(balloon_id, memdev if isinstance(memdev, int) else 0)
        elif kind == "hv-balloon.state":
            balloon = balloons.get(ev.get("id"))
            if balloon is None:
                unknown[f"{kind} (undeclared device)"] += 1
                continue
            balloon.target.set(t, _int(ev, "target"))
            balloon.ballooned.set(t, _int(ev, "ballooned"))
            balloon.hot_added.set(t, _int(ev, "hot-added"))
        elif kind == "hv-balloon.status":
            balloon = balloons.get(ev.get("id"))
            if balloon is not None:
                balloon.committed.set(t, _int(ev, "committed"))
        elif kind in _KNOWN_NOT_DRAWN:
            pass
        else:
            unknown[kind] += 1
    wall = events[0].get("wall")
    return TraceData(duration, wall if isinstance(wall, str) else "", vmem, balloons, slots, unknown)


# Events of format version 1 that the picture does not use.
_KNOWN_NOT_DRAWN = frozenset({"trace-start", "trace-end", "virtio-mem.request", "vmbus.message",
                              "hv-balloon.message", "qmp.command"})

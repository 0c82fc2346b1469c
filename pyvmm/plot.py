"""`pyvmm plot TRACE -o OUT.png|OUT.svg`: one figure of a pyvmm trace, drawn with matplotlib.

Panels, all on one time axis (seconds since the trace started):
- per virtio-mem device, requested against plugged size, then its block map over time
  (plugged / unplugged in a mapped memslot, i.e. protected / unplugged with no memslot);
- per hv-balloon device, its target, ballooned and hot-added sizes;
- the mapped KVM memslots: total size per owner, and their number.

The data comes from `pyvmm.plot_data`; this module only draws it. matplotlib is an optional
dependency (`pip install 'pyvmm[plot]'`) and is imported only when a plot is drawn, with the
Agg canvas, so no display is ever needed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from pyvmm.plot_data import (
    FULL,
    NO_MEMSLOT,
    PLUGGED,
    PROTECTED,
    STATE_NAMES,
    BlockMap,
    HvBalloonTimeline,
    MemslotTimeline,
    Step,
    TraceData,
    TraceError,
    VirtioMemTimeline,
    load_trace,
)

EXIT_USAGE = 2
FORMATS = {".png": "png", ".svg": "svg"}
INSTALL_HINT = "pyvmm plot needs matplotlib: pip install 'pyvmm[plot]' (or pip install matplotlib)"

MiB, GiB = 1 << 20, 1 << 30
# Panel heights in inches; the width is fixed so time axes line up and text stays legible.
FIG_WIDTH = 13.0
TIMELINE_HEIGHT = 2.4
BLOCK_MAP_HEIGHT = 3.8
DPI = 110
# Time columns of a block-map image: about one per pixel of the panel's width.
BLOCK_MAP_BINS = 1200
# Memslot boundaries are drawn on a block map only while they stay a few pixels apart.
MAX_SLOT_LINES = 64

STATE_COLOURS = {PLUGGED: "#2f9e44", PROTECTED: "#f59f00", NO_MEMSLOT: "#e9ecef"}
REQUESTED_COLOUR = "#1c7ed6"
PLUGGED_COLOUR = STATE_COLOURS[PLUGGED]
EVENT_COLOUR = "#e03131"
OWNER_COLOURS = {"ram": "#adb5bd", "virtio-mem": "#2f9e44", "hv-balloon": "#7048e8"}
OTHER_OWNER_COLOURS = ("#1098ad", "#f76707", "#d6336c", "#5c940d")


# ---------------------------------------------------------------------------- CLI


def add_parser(sub: Any) -> None:
    """Add `pyvmm plot` to the CLI's subcommands; `args.handler(args)` runs it."""
    p = sub.add_parser("plot", help="draw a trace (from `pyvmm run --trace`) as a PNG or SVG",
                       description="Draw a pyvmm trace: requested vs plugged size per virtio-mem device, "
                                   "hv-balloon sizes, mapped memslots, and each virtio-mem block map over time.")
    p.add_argument("trace", type=Path, metavar="FILE", help="a trace written by `pyvmm run --trace FILE`")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT",
                   help="the picture to write: OUT.png or OUT.svg")
    p.set_defaults(handler=main)


def main(args: argparse.Namespace) -> int:
    """Run `pyvmm plot`; a one-line error and status 2 for anything the user can fix."""
    try:
        plot_file(args.trace, args.output)
    except PlotError as e:
        print(f"pyvmm: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    return 0


class PlotError(Exception):
    """Why no picture was written; one line."""


def output_format(path: Path) -> str:
    fmt = FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise PlotError(f"cannot tell the picture format from {str(path)!r}: name it .png or .svg")
    return fmt


def plot_file(trace: Path, output: Path) -> TraceData:
    """Read `trace`, draw it into `output` (format from its suffix); PlotError if impossible."""
    fmt = output_format(output)
    if not output.parent.is_dir():  # before the drawing, which takes a second or two
        raise PlotError(f"cannot write {output}: no directory {output.parent}")
    try:
        import matplotlib  # noqa: F401  (only to fail early with the install hint)
    except ImportError:
        raise PlotError(INSTALL_HINT) from None
    try:
        data = load_trace(trace)
    except TraceError as e:
        raise PlotError(str(e)) from None
    if data.is_empty():
        raise PlotError(f"{trace}: the trace has nothing to plot (no virtio-mem or hv-balloon device, no memslot)")
    fig = render(data, title=f"pyvmm trace {trace.name}")
    try:
        fig.savefig(output, format=fmt, dpi=DPI)
    except OSError as e:
        raise PlotError(f"cannot write {output}: {e.strerror or e}") from None
    return data


# ---------------------------------------------------------------------------- drawing


def _size_unit(peak: int) -> tuple[int, str]:
    return (GiB, "GiB") if peak >= 2 * GiB else (MiB, "MiB")


def _size_axis(ax, peak: int, what: str = "size") -> int:
    """Label the y axis in MiB or GiB (whichever suits `peak`); returns the unit in bytes."""
    from matplotlib.ticker import FuncFormatter

    unit, name = _size_unit(peak)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / unit:g}"))
    # Power-of-two ticks (128 MiB, 256 MiB, ... 1 GiB), the sizes memory comes in.
    ax.yaxis.set_major_locator(_binary_locator(peak, MiB if unit == MiB else GiB // 4))
    ax.set_ylabel(f"{what} ({name})")
    ax.set_ylim(0, max(peak, 1) * 1.12)
    return unit


def _binary_locator(peak: int, quantum: int):
    """Ticks at a power-of-two multiple of `quantum`, four to eight of them up to `peak`."""
    from matplotlib.ticker import MultipleLocator

    step = quantum
    while peak / step > 8:
        step *= 2
    return MultipleLocator(step)


def _steps(ax, series: Step, t_end: float, **style) -> None:
    """Draw a step series held until t_end."""
    if not series:
        return
    ax.step(series.times + [t_end], series.values + series.values[-1:], where="post", **style)


def _fill_steps(ax, series: Step, t_end: float, **style) -> None:
    if series:
        ax.fill_between(series.times + [t_end], series.values + series.values[-1:], step="post",
                        linewidth=0, **style)


def _legend(ax, **kw) -> None:
    ax.legend(loc="upper left", bbox_to_anchor=(1.005, 1.0), fontsize=8.5, frameon=False,
              borderaxespad=0, **kw)


def _draw_virtio_mem_timeline(ax, dev: VirtioMemTimeline, t_end: float) -> None:
    peak = max(dev.requested.peak(), dev.plugged.peak())
    _size_axis(ax, peak)
    _fill_steps(ax, dev.plugged, t_end, color=PLUGGED_COLOUR, alpha=0.25)
    _steps(ax, dev.plugged, t_end, color=PLUGGED_COLOUR, linewidth=2, label="plugged size")
    _steps(ax, dev.requested, t_end, color=REQUESTED_COLOUR, linewidth=1.6, linestyle="--",
           label="requested size")
    for i, t in enumerate(dev.resets):
        ax.axvline(t, color=EVENT_COLOUR, linestyle=":", linewidth=1.4, label="machine reset" if i == 0 else None)
    if dev.refused:
        by_resp: dict[str, list[tuple[float, int]]] = {}
        for t, req, resp in dev.refused:
            by_resp.setdefault(f"{req} {resp.upper()}", []).append((t, dev.plugged.value_at(t)))
        for marker, (label, points) in zip("xD+*^v", sorted(by_resp.items())):
            ax.scatter([p[0] for p in points], [p[1] for p in points], marker=marker, color="black",
                       s=30, zorder=5, label=f"{label} ({len(points)})")
    if dev.unplugged_accesses:
        ax.scatter([a[0] for a in dev.unplugged_accesses], [0] * len(dev.unplugged_accesses),
                   marker="^", color=EVENT_COLOUR, s=40, zorder=6, clip_on=False,
                   label=f"access to unplugged memory ({len(dev.unplugged_accesses)})")
    ax.set_title(f"virtio-mem {dev.id}: requested vs plugged size "
                 f"(region {_fmt_bytes(dev.region_size)} at {dev.addr:#x})", loc="left", fontsize=10)
    _legend(ax)


def _fmt_bytes(n: int) -> str:
    for unit, name in ((1 << 40, "TiB"), (GiB, "GiB"), (MiB, "MiB"), (1 << 10, "KiB")):
        if n >= unit:
            return f"{n / unit:g} {name}"
    return f"{n} B"


def _block_map_image(blocks: BlockMap, t_end: float, bins: int):
    """An RGB image (rows x bins x 3, row 0 = lowest address): each cell blends the three
    state colours in the proportions of its blocks (pure colours when a row is one block)."""
    import numpy as np
    from matplotlib.colors import to_rgb

    columns = blocks.raster(t_end, bins)
    shares = np.frombuffer(b"".join(columns), dtype=np.uint8).reshape(bins, blocks.rows, 2)
    shares = shares.transpose(1, 0, 2).astype(np.float32) / FULL
    plugged, protected = shares[..., 0:1], shares[..., 1:2]
    rest = 1.0 - plugged - protected
    colour = {s: np.array(to_rgb(c), dtype=np.float32) for s, c in STATE_COLOURS.items()}
    image = plugged * colour[PLUGGED] + protected * colour[PROTECTED] + rest * colour[NO_MEMSLOT]
    return np.clip(image, 0.0, 1.0)


def _draw_block_map(ax, dev: VirtioMemTimeline, blocks: BlockMap, t_end: float) -> None:
    from matplotlib.patches import Patch
    from matplotlib.ticker import FuncFormatter, MultipleLocator

    bins = BLOCK_MAP_BINS
    lo = blocks.addr
    hi = blocks.addr + blocks.nb_blocks * blocks.block_size
    ax.imshow(_block_map_image(blocks, t_end, bins), aspect="auto", interpolation="nearest",
              origin="lower", extent=(0, t_end, lo, hi))
    shown = hi - lo
    slot_lines = shown // dev.slot_size <= MAX_SLOT_LINES
    if slot_lines:
        for k in range(1, -(-shown // dev.slot_size)):
            ax.axhline(lo + k * dev.slot_size, color="white", linewidth=0.6, alpha=0.9)
    step = dev.slot_size
    while shown / step > 8:
        step *= 2
    while shown / step < 3 and step > blocks.block_size:
        step //= 2
    ax.yaxis.set_major_locator(MultipleLocator(step))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{int(v):#x}"))
    ax.set_ylim(lo, hi)
    ax.set_ylabel("guest-physical address")
    ax.tick_params(axis="y", labelsize=8)
    ax.set_title(f"virtio-mem {dev.id}: block map ({_fmt_bytes(dev.block_size)} blocks, "
                 f"{_fmt_bytes(dev.slot_size)} memslots{', white lines' if slot_lines else ''})",
                 loc="left", fontsize=10)
    handles = [Patch(facecolor=STATE_COLOURS[s], edgecolor="#868e96", label=STATE_NAMES[s])
               for s in (PLUGGED, PROTECTED, NO_MEMSLOT)]
    _legend(ax, handles=handles)
    notes = []
    if blocks.nb_blocks < blocks.region_blocks:
        notes.append(f"Shows the lowest {_fmt_bytes(shown)} of the {_fmt_bytes(dev.region_size)} region: "
                     "nothing above was ever plugged or mapped.")
    if blocks.blocks_per_row > 1:
        notes.append(f"One row = {blocks.blocks_per_row} blocks ({_fmt_bytes(blocks.blocks_per_row * dev.block_size)}); "
                     "its colour mixes the three in proportion to its blocks.")
    if notes:
        import textwrap

        ax.text(1.005, 0.02, "\n".join(textwrap.fill(n, 44) for n in notes), transform=ax.transAxes,
                fontsize=8, va="bottom", ha="left", color="#495057")


def _draw_hv_balloon(ax, dev: HvBalloonTimeline, t_end: float) -> None:
    peak = max(dev.target.peak(), dev.ballooned.peak(), dev.hot_added.peak(), dev.committed.peak())
    _size_axis(ax, peak)
    _steps(ax, dev.target, t_end, color=REQUESTED_COLOUR, linestyle="--", linewidth=1.6,
           label="target (guest size asked for)")
    _fill_steps(ax, dev.hot_added, t_end, color=OWNER_COLOURS["hv-balloon"], alpha=0.25)
    _steps(ax, dev.hot_added, t_end, color=OWNER_COLOURS["hv-balloon"], linewidth=2, label="hot-added")
    _steps(ax, dev.ballooned, t_end, color="#f76707", linewidth=2, label="ballooned (taken from the guest)")
    _steps(ax, dev.committed, t_end, color="#495057", linewidth=1.2, linestyle=":",
           label="guest committed (status report)")
    memdev = f", hot-add memory {_fmt_bytes(dev.memdev_size)}" if dev.memdev_size else ""
    ax.set_title(f"hv-balloon {dev.id}{memdev}", loc="left", fontsize=10)
    _legend(ax)


def _owner_colour(owner: str, others: list[str]) -> str:
    kind = owner.split(":", 1)[0]
    if kind in OWNER_COLOURS:
        return OWNER_COLOURS[kind]
    if owner not in others:
        others.append(owner)
    return OTHER_OWNER_COLOURS[others.index(owner) % len(OTHER_OWNER_COLOURS)]


def _draw_memslots(ax, slots: MemslotTimeline, t_end: float) -> None:
    owners = sorted(slots.size_by_owner, key=lambda o: (o != "ram", o))
    times = sorted({t for s in slots.size_by_owner.values() for t in s.times})
    peak = slots.total_size.peak()
    _size_axis(ax, peak, "mapped")
    if times:
        xs = times + [t_end]
        layers = [[slots.size_by_owner[o].value_at(t) for t in times] for o in owners]
        layers = [layer + layer[-1:] for layer in layers]
        others: list[str] = []
        ax.stackplot(xs, *layers, step="post", labels=[f"{o} (size)" for o in owners],
                     colors=[_owner_colour(o, others) for o in owners], alpha=0.75, linewidth=0)
    count_ax = ax.twinx()
    _steps(count_ax, slots.count, t_end, color="black", linewidth=1.4, label="memslots (count, right axis)")
    count_ax.set_ylabel("memslots")
    count_ax.set_ylim(0, max(slots.count.peak(), 1) * 1.15 + 0.5)
    count_ax.yaxis.get_major_locator().set_params(integer=True)
    handles, labels = ax.get_legend_handles_labels()
    h2, l2 = count_ax.get_legend_handles_labels()
    ax.legend(handles + h2, labels + l2, loc="upper left", bbox_to_anchor=(1.06, 1.0), fontsize=8.5,
              frameon=False, borderaxespad=0)
    ax.set_title("mapped KVM memslots: size by owner (stacked), and how many", loc="left", fontsize=10)


def render(data: TraceData, *, title: str = "pyvmm trace") -> Any:
    """The whole figure (a matplotlib Figure on the Agg canvas, not shown anywhere)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels: list[tuple[float, Any]] = []
    # A trace of one instant still gets a visible (1 s) axis, its final state drawn across it.
    t_end = data.duration if data.duration > 0 else 1.0
    for dev in data.virtio_mem.values():
        panels.append((TIMELINE_HEIGHT, lambda ax, d=dev: _draw_virtio_mem_timeline(ax, d, t_end)))
        if dev.blocks is not None:
            panels.append((BLOCK_MAP_HEIGHT, lambda ax, d=dev: _draw_block_map(ax, d, d.blocks, t_end)))
    for balloon in data.hv_balloon.values():
        panels.append((TIMELINE_HEIGHT, lambda ax, b=balloon: _draw_hv_balloon(ax, b, t_end)))
    if data.memslots.count:
        panels.append((TIMELINE_HEIGHT, lambda ax: _draw_memslots(ax, data.memslots, t_end)))

    heights = [h for h, _ in panels]
    fig = Figure(figsize=(FIG_WIDTH, sum(heights) + 1.0), dpi=DPI)
    FigureCanvasAgg(fig)  # no pyplot, no display: the figure draws with Agg
    axes = fig.subplots(len(panels), 1, sharex=True, squeeze=False,
                        gridspec_kw={"height_ratios": heights, "hspace": 0.45})[:, 0]
    for ax, (_, draw) in zip(axes, panels):
        draw(ax)
        if not ax.images:  # grid lines over a block map would look like memslot boundaries
            ax.grid(True, axis="both", color="#dee2e6", linewidth=0.6)
            ax.set_axisbelow(True)
        ax.margins(x=0)
    axes[-1].set_xlim(0, t_end)
    axes[-1].set_xlabel("seconds since the trace started")
    for ax in axes:
        ax.tick_params(labelbottom=True)
    started = f", started {data.started}" if data.started else ""
    note = " (last line cut off)" if data.truncated else ""
    fig.suptitle(f"{title}: {data.duration:.1f} s{started}{note}", x=0.06, ha="left", fontsize=12)
    fig.subplots_adjust(left=0.105, right=0.74, top=1 - 0.85 / fig.get_figheight(),
                        bottom=0.55 / fig.get_figheight())
    return fig



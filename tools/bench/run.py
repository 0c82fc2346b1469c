"""`make bench`: run every benchmark, print the tables, and write docs/benchmarks.md.

Each table shows pyvmm and its peer measured in the same run, with the ratio. Hosts here
are shared and noisy (±20–30 %): compare ratios from one run, not absolute numbers across runs.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import boot  # noqa: E402
import exit_loop  # noqa: E402
import hv_balloon  # noqa: E402
import virtio_mem  # noqa: E402

from vmm.hostinfo import host_is_pvm  # noqa: E402

MANUAL_SECTION_MARK = "<!-- manual records below are kept across `make bench` runs -->"


def machine_note() -> str:
    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    kvm = "PVM (kvm_pvm: guest kernel code is interpreted)" if host_is_pvm() else "KVM (hardware virtualization)"
    return (f"{os.cpu_count()} CPUs ({cpu}), {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') >> 30} GiB, "
            f"host kernel {platform.release()}, {kvm}; load average at start {os.getloadavg()[0]:.2f}")


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def section_exit_loop(args) -> str:
    print("exit loop: pyvmm vs a C loop …", flush=True)
    el = exit_loop.run(repeat=max(args.repeat, 3))
    return ("## vCPU exit loop (µs per port-I/O exit, guest at CPL0)\n\n" + table(
        ["", "pyvmm (Python, cffi)", "C loop", "ratio"],
        [["median", f"{el['pyvmm_median']:.2f}", f"{el['c_median']:.2f}", f"{el['ratio']:.2f}×"],
         ["runs", ", ".join(f"{x:.2f}" for x in el["pyvmm"]), ", ".join(f"{x:.2f}" for x in el["c"]), ""]]) +
        f"\n\nSame guest code ({el['exits']} `out` instructions) and the same 64-bit boot state in both.")


def section_boot(args) -> str:
    print("boot: pyvmm vs QEMU (this takes minutes on a PVM host) …", flush=True)
    b = boot.run(args.repeat)
    rows = []
    for what in ("init", "exit"):
        p, q = b["pyvmm"][what], b["qemu"][what]
        rows.append([f"launch to {'/init' if what == 'init' else 'exit (init powers off)'}", f"{p:.1f} s", f"{q:.1f} s",
                     f"{p / q:.2f}×"])
    return ("## Boot, default guest kernel (median of %d)\n\n" % args.repeat + table(
        ["", "pyvmm", "QEMU microvm", "pyvmm / QEMU"], rows) +
        "\n\nQEMU: `-M microvm -bios qboot.rom -accel kvm -cpu host,-arch-capabilities -m 256M`, PVH entry of the "
        "same vmlinux, same initramfs, same command line plus `" + boot.QEMU_ONLY_PARAMS + "` (QEMU has no "
        "emulation assist). pyvmm: direct 64-bit ELF entry, no firmware.\n\nCommand line: `" + b["cmdline"] + "`")


def section_virtio_mem_startup(args) -> str:
    print("virtio-mem start-up cost …", flush=True)
    sc = virtio_mem.startup_cost(repeat=max(args.repeat, 3))
    base = sc["without"]
    rows = [[name, f"{r['seconds']:.2f} s", f"{r['rss'] / 2**20:.1f} MiB", str(r["memslots"]),
             f"{r['seconds'] / base['seconds']:.2f}×, {(r['rss'] - base['rss']) / 2**20:+.1f} MiB"]
            for name, r in sc.items()]
    return ("## virtio-mem start-up cost (stub guest to its first output, median)\n\n" + table(
        ["pyvmm", "launch to guest output", "VMM RSS", "KVM memslots", "against without"], rows) +
        "\n\nThe 1 TiB region is reserved address space only: no memslot until a block is plugged.")


def section_virtio_mem(args) -> str:
    print("virtio-mem plug/unplug: pyvmm vs QEMU virtio-mem-pci (minutes) …", flush=True)
    vm = virtio_mem.throughput()
    py, qe = vm["pyvmm"], vm["qemu"]
    size = f"{vm['size'] >> 20} MiB"
    rows = [[f"plug {size} (GiB/s)", f"{py['plug-gib-s']:.3f}", f"{qe['plug-gib-s']:.3f}",
             f"{py['plug-gib-s'] / qe['plug-gib-s']:.2f}×"],
            [f"unplug {size} (GiB/s)", f"{py['unplug-gib-s']:.3f}", f"{qe['unplug-gib-s']:.3f}",
             f"{py['unplug-gib-s'] / qe['unplug-gib-s']:.2f}×"]]
    rt, aa, rig, fl = py["request-time-us"], py["after-answer-us"], vm["rig-us"], vm["floor-us"]
    qe_us = sorted(qe["request-us"])
    qe_p50 = statistics.median(qe_us)
    rows.append(["host time per request, median (µs)", f"{rt['p50']:.1f}", f"{qe_p50:.1f}",
                 f"{rt['p50'] / qe_p50:.2f}×"])
    return ("## virtio-mem plug/unplug throughput (qom-set to size == requested-size)\n\n" + table(
        ["", "pyvmm (virtio-mmio)", "QEMU (virtio-mem-pci, q35)", "pyvmm / QEMU"], rows) +
        f"\n\nHost time per request: pyvmm from the notify handling to the used-ring entry (its "
        f"`request-time-us`): p99 {rt['p99']:.1f} µs, mean {rt['mean']:.1f} µs, max {rt['max']:.1f} µs over "
        f"{rt['count']} requests. QEMU from its `virtqueue_pop` to its `virtqueue_flush` trace point "
        f"(log backend, µs stamps): max {qe_us[-1]:.0f} µs over {len(qe_us)} requests. The same pyvmm code "
        f"with no guest (a driver model, {virtio_mem.RIG_REQUESTS} requests, the device woken through its "
        f"eventfd by pyvmm's event loop): median {rig['warm']:.1f} µs back to back, {rig['idle']:.1f} µs with "
        f"{virtio_mem.RIG_IDLE_S * 1000:.0f} ms of idle before each. On this host the first run of any code "
        "after a pause of a few ms pays a cold-cache penalty of several times its warm cost, and a guest's "
        "requests come seconds apart. The floor under that: one function that does only the ring and bitmap "
        "steps inline, woken and timed the same way (`tools/bench/handler_floor.py`, and its C twin), takes "
        f"{fl['python']['warm']:.1f} µs back to back and {fl['python']['idle']:.1f} µs after the same idle in "
        f"Python; {fl['c']['warm']:.2f} µs and {fl['c']['idle']:.2f} µs in C. "
        f"Memory protection, discards and memslot changes follow the answer: "
        f"{aa['mean']:.1f} µs mean over {aa['count']} batches. Memslots of "
        f"{py['slot-size'] >> 20} MiB: {py['slot-adds']} added, {py['slot-removes']} removed. Same guest kernel, "
        "initramfs and command line; both polled through qemu.qmp every 0.1 s. The guest's own onlining and "
        "offlining work dominates the throughput on a PVM host.")


def section_hv_balloon(args) -> str:
    print("hv-balloon: page-range metadata, then balloon/unballoon on the real guest (minutes) …", flush=True)
    rm = hv_balloon.range_metadata()
    hb = hv_balloon.throughput()
    resp = hb["per-message-us"].get("DM_BALLOON_RESPONSE", {"mean": float("nan"), "count": 0})
    rng = hb["per-range-us"]
    size = f"{hb['size'] >> 20} MiB"
    return ("## hv-balloon (Hyper-V Dynamic Memory) on the real guest\n\n" + table(
        ["", "pyvmm", "QEMU hv-balloon (reference, not this run)", "pyvmm / QEMU"],
        [[f"balloon {size} (GB/min)", f"{hb['balloon-gb-min']:.1f}", f"{hv_balloon.QEMU_REFERENCE_BALLOON_GB_MIN:.0f}",
          f"{hb['balloon-gb-min'] / hv_balloon.QEMU_REFERENCE_BALLOON_GB_MIN:.2f}×"],
         [f"unballoon {size} (GB/min)", f"{hb['unballoon-gb-min']:.1f}", "~200 GB in ~1 s", "—"]]) +
        f"\n\nFrom the QMP `balloon` command until `query-balloon` reports the target. QEMU's hv-balloon "
        "needs KVM's own Hyper-V support, which this host lacks, so it cannot run here: its column is the "
        "published figure with a Windows guest. Host processing per DM_BALLOON_RESPONSE: "
        f"{resp['mean']:.0f} µs mean over {resp['count']}; per guest range (checks, range-set update, "
        f"discard): {rng['mean']:.1f} µs mean, {rng['max']:.1f} µs max over {rng['count']} ranges.\n\n"
        f"Page-range set, synthetic: 1 TiB ballooned as {rm['runs']} runs of 2 MiB in random order "
        f"({rm['us-per-add']:.1f} µs per add): at most {rm['peak-ranges']} disjoint ranges on the way, "
        f"{rm['final-ranges']} at the end, holding {rm['final-bytes']} bytes beyond the empty set's "
        f"{rm['empty-bytes']} bytes.")


SECTIONS = {
    "exit-loop": section_exit_loop,
    "boot": section_boot,
    "virtio-mem-startup": section_virtio_mem_startup,
    "virtio-mem": section_virtio_mem,
    "hv-balloon": section_hv_balloon,
}


def merge(old: str, fresh: dict[str, str]) -> list[str]:
    """The sections of an earlier report, with those just measured replaced (by heading)."""
    body = old.split(MANUAL_SECTION_MARK)[0]
    parts = ["## " + part.strip() for part in body.split("\n## ")[1:]]
    by_heading = {part.splitlines()[0]: part for part in parts}
    for text in fresh.values():
        by_heading[text.splitlines()[0]] = text
    return list(by_heading.values())


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--output", type=Path, help="write the markdown report here")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--only", action="append", choices=sorted(SECTIONS),
                    help="run only these benchmarks; the other sections of --output are kept")
    args = ap.parse_args()

    fresh: dict[str, str] = {}
    for name, build in SECTIONS.items():
        if args.only and name not in args.only:
            continue
        fresh[name] = build(args)
        print(fresh[name], flush=True)
    old = args.output.read_text() if args.output and args.output.exists() else ""
    sections = merge(old, fresh) if args.only else list(fresh.values())
    redone = (f"Sections re-measured on {datetime.date.today().isoformat()} with `--only "
              f"{' '.join(fresh)}`; the others are from the earlier full run.\n\n") if args.only else ""
    report = ("# Benchmarks\n\nWritten by `make bench` on " + datetime.date.today().isoformat() + ".\n\n"
              "Machine: " + machine_note() + ".\n\n" + redone + "\n\n".join(sections) + "\n")
    if args.output:
        keep = ""
        if args.output.exists():
            old = args.output.read_text()
            if MANUAL_SECTION_MARK in old:
                keep = old[old.index(MANUAL_SECTION_MARK):]
        args.output.write_text(report + "\n" + (keep or MANUAL_SECTION_MARK + "\n"))
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

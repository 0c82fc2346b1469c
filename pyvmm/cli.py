"""The `pyvmm` command line: `pyvmm run`, `pyvmm version`, and in their own modules
`pyvmm check` (pyvmm/check/command.py), `pyvmm trace summary` (pyvmm/trace_summary.py) and
`pyvmm plot` (pyvmm/plot.py).

Every user error (a bad argument, a missing kernel, no /dev/kvm, too much memory) ends in
one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from pyvmm import trace_summary

EXIT_USAGE = 2

EXAMPLES = """\
examples:
  pyvmm run                                  boot the default guest (built by `make guest`)
  pyvmm run --memory 1G --cpus 2             more memory and a second vCPU
  pyvmm run --kernel ~/linux/vmlinux --append "loglevel=8"
                                             boot your own kernel with the default initramfs
  pyvmm run --initrd my.cpio                 the default kernel with another initramfs
  pyvmm run --serial1 unix:/tmp/agent.sock   the guest agent on ttyS1, served on a socket
  pyvmm run --qmp unix:/tmp/qmp.sock         QMP control socket (qemu.qmp, qmp-shell)
  pyvmm run --trace run.jsonl                record events (docs/trace-format.md), then
  pyvmm trace summary run.jsonl              counts and latencies

console keys: Ctrl-A X quits, Ctrl-A H lists the others.
"""


class UsageError(Exception):
    pass


def _size(text: str) -> int:
    from vmm.hostmem import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _unix_path(text: str) -> str:
    if not text.startswith("unix:") or len(text) <= 5:
        raise argparse.ArgumentTypeError(f"expected unix:PATH, got {text!r}")
    return text[5:]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2
        self.exit(EXIT_USAGE, f"pyvmm: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="pyvmm", description="A Python VMM on Linux KVM for memory hot(un)plug work.",
                epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    run = sub.add_parser("run", help="boot a guest", epilog=EXAMPLES,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    run.add_argument("--kernel", type=Path, help="ELF vmlinux or bzImage (default: the built default guest)")
    run.add_argument("--initrd", type=Path, help="initramfs (default: the default guest's, unless --kernel is given)")
    run.add_argument("--append", default="", help="add to pyvmm's default kernel command line")
    run.add_argument("--cmdline", help="replace the kernel command line whole")
    run.add_argument("--memory", "-m", type=_size, default=256 << 20, metavar="SIZE", help="guest RAM, e.g. 256M, 2G (default 256M)")
    run.add_argument("--cpus", type=int, default=1, metavar="N", help="vCPUs, 1 to 8 (default 1)")
    run.add_argument("--memory-backend", default="anon", choices=("anon", "memfd", "hugetlb"),
                     help="how guest RAM is backed (default anon)")
    run.add_argument("--mem-prealloc", action="store_true",
                     help="fault all guest RAM in at start and after each reset (as QEMU's -mem-prealloc)")
    run.add_argument("--cpu-features", metavar="SPEC",
                     help="CPUID policy: 'default', 'host', or e.g. 'default,+popcnt,-sse4_2'")
    run.add_argument("--serial1", type=_unix_path, metavar="unix:PATH", help="serve ttyS1 (the guest agent) on a unix socket")
    run.add_argument("--qmp", type=_unix_path, metavar="unix:PATH", help="serve QMP on a unix socket")
    run.add_argument("--virtio-mem", action="append", default=[], metavar="OPTS",
                     help="a virtio-mem device: id=vm0,size=8G[,requested-size=0][,block-size=2M][,node=0]"
                          "[,memslot-size=1G][,backend=anon|memfd|hugetlb][,prealloc=on] (repeatable)")
    run.add_argument("--hyperv", action="store_true",
                     help="present a Hyper-V partition (hypercalls, SynIC, crash MSRs) instead of KVM's "
                          "signature; the guest then runs on the TSC, not kvm-clock")
    run.add_argument("--hv-balloon", metavar="OPTS",
                     help="a Hyper-V Dynamic Memory balloon on VMBus (implies --hyperv): "
                          "id=hvb0[,memdev-size=4G][,status-report=on]")
    run.add_argument("--no-reboot", action="store_true", help="exit (status 0) when the guest reboots or resets")
    run.add_argument("--trace", type=Path, metavar="FILE",
                     help="write an event trace (JSON lines, docs/trace-format.md) to FILE")
    run.add_argument("--trace-exits", action="store_true", help="log every vCPU exit to stderr (slow)")
    run.add_argument("--system-map", type=Path, help="System.map for symbol names in reports")
    sub.add_parser("version", help="print the version")
    trace_summary.add_subcommand(sub)
    from pyvmm import plot
    from pyvmm.check.command import add_parser as add_check_parser

    plot.add_parser(sub)
    add_check_parser(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    if args.command == "version":
        from vmm.machine import VERSION

        print("pyvmm " + ".".join(map(str, VERSION)))
        return 0
    if getattr(args, "handler", None) is not None:  # subcommands that live in their own module
        return args.handler(args)
    try:
        return _run(args)
    except UsageError as e:
        print(f"pyvmm: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130


def _resolve_guest(args) -> tuple[Path, Path | None, Path | None]:
    """Kernel, initrd, System.map from the arguments and the default guest image."""
    import guest_images

    if args.kernel is not None:
        if not args.kernel.exists():
            raise UsageError(f"kernel file {args.kernel} does not exist")
        if not os.access(args.kernel, os.R_OK):
            raise UsageError(f"kernel file {args.kernel} is not readable")
        initrd = args.initrd
        system_map = args.system_map
        if system_map is None and (args.kernel.parent / "System.map").exists():
            system_map = args.kernel.parent / "System.map"
    else:
        img = guest_images.default_image()
        if not guest_images.is_built(img):
            raise UsageError("the default guest is not built yet: run `make guest` (or `make run`), "
                             "or pass --kernel")
        initrd = args.initrd if args.initrd is not None else img.initramfs
        system_map = args.system_map or img.system_map
        args.kernel = img.vmlinux
    if initrd is not None and not initrd.exists():
        raise UsageError(f"initrd {initrd} does not exist")
    return args.kernel, initrd, system_map


def _run(args) -> int:
    logging.basicConfig(level=logging.DEBUG if args.trace_exits else logging.WARNING,
                        format="pyvmm: %(levelname)s: %(message)s")
    if not 1 <= args.cpus <= 8:
        raise UsageError("--cpus must be between 1 and 8")
    from vmm.device_options import DeviceOptionError, parse_hv_balloon, parse_virtio_mem

    try:
        virtio_mem = [parse_virtio_mem(text) for text in args.virtio_mem]
        hv_balloon = parse_hv_balloon(args.hv_balloon) if args.hv_balloon else None
    except DeviceOptionError as e:
        raise UsageError(str(e)) from None
    guest = _resolve_guest(args)
    tracer = _open_tracer(args.trace)
    try:
        return _run_machine(args, guest, virtio_mem, hv_balloon, tracer)
    finally:
        tracer.close()  # after the machine and QMP are gone: trace-end is the last line


def _open_tracer(path: Path | None):
    from vmm.tracing import NULL_TRACER, Tracer

    if path is None:
        return NULL_TRACER
    try:
        return Tracer(path)
    except OSError as e:
        raise UsageError(f"cannot write the trace file {path}: {e.strerror or e}") from None


def _run_machine(args, guest: tuple[Path, Path | None, Path | None], virtio_mem: list, hv_balloon, tracer) -> int:
    from devices.console import HostTerminal
    from vmm.boot.kernel import KernelImageError
    from vmm.cpuid import CpuFeatureError
    from vmm.hostmem import HostMemoryError
    from vmm.kvm import KvmError, KvmUnavailable
    from vmm.machine import Machine, MachineConfig, MachineError

    kernel, initrd, system_map = guest
    terminal = HostTerminal(on_quit=lambda: machine_ref and machine_ref[0].quit())
    machine_ref: list = []
    cfg = MachineConfig(kernel=kernel, initrd=initrd, memory=args.memory, cpus=args.cpus,
                        backend=args.memory_backend, cpu_features=args.cpu_features, cmdline=args.cmdline,
                        append=args.append, serial1=args.serial1, no_reboot=args.no_reboot,
                        trace_exits=args.trace_exits,
                        system_map=system_map, console_output=terminal.write, virtio_mem=virtio_mem,
                        hyperv=args.hyperv or hv_balloon is not None, hv_balloon=hv_balloon,
                        mem_prealloc=args.mem_prealloc, tracer=tracer)
    try:
        machine = Machine(cfg)
    except (KvmUnavailable, KernelImageError, MachineError, HostMemoryError, CpuFeatureError) as e:
        raise UsageError(str(e)) from None
    except KvmError as e:
        raise UsageError(f"KVM refused the VM setup: {e}") from None
    machine_ref.append(machine)
    qmp = None
    if args.qmp:
        from pyvmm.qmp.server import QmpServer

        from pyvmm.qmp.balloon_commands import register_balloon_commands
        from pyvmm.qmp.cpu_commands import register_cpu_commands
        from pyvmm.qmp.memory_commands import register_memory_commands

        qmp = QmpServer(machine, args.qmp, tracer=tracer)
        register_memory_commands(qmp.commands, qmp.hmp, machine)
        register_cpu_commands(qmp.commands, qmp.hmp, machine)
        register_balloon_commands(qmp.commands, qmp.hmp, machine)
        qmp.start()
    try:
        with terminal:
            terminal.start(machine.serial0.feed)
            code = machine.run()
    finally:
        if qmp is not None:
            qmp.stop()
        machine.close()
    if code != 0 and machine.last_error:
        print(f"pyvmm: {machine.last_error}", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())

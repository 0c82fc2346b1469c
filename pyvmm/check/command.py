"""`pyvmm check virtio-mem|hv-balloon`: the subcommand's arguments and its entry point.

pyvmm/cli.py only calls `add_parser()` and hands the parsed arguments to `main()`.
Exit status: 0 when every step passed (or was skipped), 1 on any failure, 2 on a usage
error (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import signal
import sys
import textwrap
from pathlib import Path

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2
KITS = ("virtio-mem", "hv-balloon")
LIST_WIDTH = 92

EPILOG = """\
examples:
  pyvmm check virtio-mem --kernel ~/linux/vmlinux        every virtio-mem scenario on your kernel
  pyvmm check virtio-mem --list                          the scenarios and what each expects
  pyvmm check virtio-mem --scenarios unplug-all,reboot-mid-plug --junit out.xml
  pyvmm check hv-balloon --kernel bzImage --append loglevel=8
  pyvmm check virtio-mem --load my_scenarios.py          add your own scenarios (see README)

exit status: 0 all passed, 1 a step failed, 2 bad arguments.
"""


class UsageError(Exception):
    pass


def add_parser(sub) -> None:
    """Register `check` on the top-level subparsers (whose parser class gives usage errors
    one line and exit status 2)."""
    p = sub.add_parser("check", help="regression-test a guest kernel's virtio-mem or hv_balloon driver",
                       description="Boot a kernel once and run a kit of scenarios against its "
                                   "virtio-mem or hv_balloon driver.",
                       epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("kit", choices=KITS, help="which driver to test")
    p.add_argument("--kernel", type=Path, help="ELF vmlinux or bzImage (default: the default guest)")
    p.add_argument("--initrd", type=Path,
                   help="initramfs with the pyvmm agent (default: the default guest's)")
    p.add_argument("--append", default="", help="add to the kernel command line")
    p.add_argument("--system-map", type=Path, help="System.map for the static check (default: next to the kernel)")
    p.add_argument("--scenarios", metavar="A,B,...", help="run only these scenarios (in kit order)")
    p.add_argument("--list", action="store_true", help="list the scenarios and what each expects, then exit")
    p.add_argument("--junit", type=Path, metavar="FILE", help="write JUnit XML to FILE")
    p.add_argument("--load", action="append", default=[], metavar="FILE.py|MODULE",
                   help="import extra scenarios from a Python file or module (repeatable)")
    p.add_argument("--no-probe", action="store_true",
                   help="skip the static kernel check (e.g. drivers built as modules your initrd loads)")
    p.add_argument("--timeout-scale", type=float, default=1.0, metavar="F",
                   help="multiply every timeout by F on a slow host (default 1)")
    p.add_argument("--console-log", type=Path, metavar="FILE", help="keep the guest's console output in FILE")
    p.add_argument("-v", "--verbose", action="store_true", help="print each scenario's steps as they happen")
    p.set_defaults(handler=main)


def load_scenarios(spec: str) -> None:
    """Import a scenario file (path ending in .py) or module; its @scenario calls register."""
    if spec.endswith(".py"):
        path = Path(spec)
        if not path.is_file():
            raise UsageError(f"--load: no such file {spec}")
        module_spec = importlib.util.spec_from_file_location(f"pyvmm_check_user_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            raise UsageError(f"--load {spec}: {type(e).__name__}: {e}") from None
        return
    try:
        importlib.import_module(spec)
    except Exception as e:
        raise UsageError(f"--load {spec}: {type(e).__name__}: {e}") from None


def _resolve_files(args) -> tuple[Path | None, Path | None]:
    """The kernel (None: default guest) and an initramfs with the agent."""
    import guest_images

    if args.kernel is not None and not args.kernel.is_file():
        raise UsageError(f"kernel file {args.kernel} does not exist")
    if args.initrd is not None and not args.initrd.is_file():
        raise UsageError(f"initrd {args.initrd} does not exist")
    if args.system_map is not None and not args.system_map.is_file():
        raise UsageError(f"System.map {args.system_map} does not exist")
    img = guest_images.default_image()
    built = guest_images.is_built(img)
    initrd = args.initrd
    if initrd is None:
        if not built:
            raise UsageError("the default guest is not built (`make guest`), and the scenarios need an "
                             "initramfs with the pyvmm agent: pass --initrd")
        initrd = img.initramfs
    if args.kernel is None and not built:
        raise UsageError("the default guest is not built yet: run `make guest`, or pass --kernel")
    return args.kernel, initrd


def _list(kit, scenarios, out) -> None:
    out.write(f"{kit.name} scenarios ({kit.title}):\n")
    for sc in scenarios:
        out.write(f"  {sc.name}\n")
        out.write(textwrap.fill(sc.expects, width=LIST_WIDTH, initial_indent="      ",
                                subsequent_indent="      ") + "\n")


def main(args) -> int:
    """Run `pyvmm check` with parsed arguments; returns the exit status."""
    from pyvmm.check import junit
    from pyvmm.check.registry import REGISTRY, SelectionError
    from pyvmm.check.runner import KitRun, RunOptions

    try:
        if args.timeout_scale <= 0:
            raise UsageError("--timeout-scale must be positive")
        for spec in args.load:
            load_scenarios(spec)
        kit = REGISTRY.kit(args.kit)
        names = [n.strip() for n in args.scenarios.split(",") if n.strip()] if args.scenarios else None
        if args.scenarios is not None and not names:
            raise UsageError("--scenarios names no scenario")
        scenarios = REGISTRY.select(kit.name, names)
        if args.list:
            _list(kit, scenarios, sys.stdout)
            return EXIT_OK
        kernel, initrd = _resolve_files(args)
        if args.junit is not None and not args.junit.parent.is_dir():
            raise UsageError(f"--junit: directory {args.junit.parent} does not exist")
    except (UsageError, SelectionError) as e:
        print(f"pyvmm: error: {e}", file=sys.stderr)
        return EXIT_USAGE

    options = RunOptions(kernel=kernel, initrd=initrd, append=args.append, probe=not args.no_probe,
                         system_map=args.system_map, scale=args.timeout_scale, verbose=args.verbose,
                         console_log=args.console_log)
    run = KitRun(kit, scenarios, options, sys.stdout)
    previous = signal.signal(signal.SIGTERM, _terminate)
    try:
        run.run()
    except KeyboardInterrupt:
        print("pyvmm: check interrupted", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)
        if args.junit is not None:
            junit.write(args.junit, kit.name, run.results, run.seconds,
                        {"kernel": str(kernel or "default guest"), "append": args.append})
    return EXIT_FAILED if run.failed else EXIT_OK


def _terminate(signum, frame) -> None:
    # SIGTERM unwinds like Ctrl-C, so the VM is shut down and the table and JUnit are written.
    raise KeyboardInterrupt

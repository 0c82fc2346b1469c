"""Runs a kit: static kernel probe, one boot, the runtime driver check, then the selected
scenarios on that one guest, with a live progress line per step and a final table.

Steps before the scenarios ("kernel-probe", "boot", "driver-check") are reported like
scenarios, so a CI's JUnit view shows why nothing ran. A failed scenario is followed by the
kit's settle step (back to its baseline, bounded) so that the next one starts clean; once
the VM has exited every remaining scenario fails at once. Before each scenario the kit's
prepare step runs (virtio-mem: nothing plugged), counted in that scenario's time.
"""

from __future__ import annotations

import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pyvmm.check.kernel_probe import ProbeError, probe_kernel
from pyvmm.check.kit import Kit
from pyvmm.check.outcomes import FAIL, PASS, SKIP, CheckFailed, GuestGone, ScenarioSkipped
from pyvmm.check.registry import Scenario

TICK_S = 1.0
NAME_WIDTH = 26
MESSAGE_WIDTH = 100  # of a failure message in the final table; the full text is above it


@dataclass
class Result:
    name: str
    status: str = ""          # PASS, FAIL or SKIP
    seconds: float = 0.0
    message: str = ""
    expects: str = ""
    notes: list[str] = field(default_factory=list)


@dataclass
class RunOptions:
    kernel: Path | None = None        # None: the default guest
    initrd: Path | None = None
    append: str = ""
    probe: bool = True
    system_map: Path | None = None
    scale: float = 1.0                # stretches every timeout
    verbose: bool = False
    console_log: Path | None = None


class Progress:
    """One line per step: "name  running  12 s" ticking in place on a terminal, then the
    verdict. Without a terminal, a start line and a verdict line."""

    def __init__(self, out: IO[str], total: int) -> None:
        self.out = out
        self.total = total
        self.index = 0
        self.tty = bool(getattr(out, "isatty", lambda: False)())
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._ticker: threading.Thread | None = None
        self._current = ""
        self._t0 = 0.0

    def _label(self, name: str) -> str:
        return f"[{self.index:>2}/{self.total}] {name:<{NAME_WIDTH}}"

    def start(self, name: str) -> None:
        self.index += 1
        self._current, self._t0 = name, time.monotonic()
        with self._lock:
            if self.tty:
                self.out.write(f"\r{self._label(name)} running")
            else:
                self.out.write(f"{self._label(name)} running\n")
            self.out.flush()
        if self.tty:
            self._stop.clear()
            self._ticker = threading.Thread(target=self._tick, name="check-progress", daemon=True)
            self._ticker.start()

    def _tick(self) -> None:
        while not self._stop.wait(TICK_S):
            with self._lock:
                self.out.write(f"\r{self._label(self._current)} running {time.monotonic() - self._t0:6.0f} s")
                self.out.flush()

    def note(self, line: str) -> None:
        """A step note (verbose): printed on its own line, the progress line redrawn after it."""
        with self._lock:
            if self.tty:
                self.out.write("\r\033[K")
            self.out.write(f"      {line}\n")
            if self.tty:
                self.out.write(f"{self._label(self._current)} running")
            self.out.flush()

    def finish(self, result: Result) -> None:
        self._stop.set()
        if self._ticker is not None:
            self._ticker.join()
            self._ticker = None
        with self._lock:
            if self.tty:
                self.out.write("\r\033[K")
            self.out.write(f"{self._label(result.name)} {result.status:<7} {result.seconds:6.1f} s\n")
            if result.message and result.status != PASS:
                for line in result.message.splitlines():
                    self.out.write(f"      {line}\n")
            self.out.flush()


def format_table(kit: str, results: list[Result], seconds: float) -> str:
    """The final pass/fail table."""
    lines = [f"{'step':<{NAME_WIDTH}} {'result':<6} {'seconds':>8}  message",
             f"{'-' * NAME_WIDTH} {'-' * 6} {'-' * 8}  {'-' * 7}"]
    for r in results:
        message = r.message.splitlines()[0] if r.message else ""
        if len(message) > MESSAGE_WIDTH:
            message = message[:MESSAGE_WIDTH - 3] + "..."
        lines.append(f"{r.name:<{NAME_WIDTH}} {r.status:<6} {r.seconds:8.1f}  {message}".rstrip())
    counts = {s: sum(1 for r in results if r.status == s) for s in (PASS, FAIL, SKIP)}
    verdict = "FAILED" if counts[FAIL] else "PASSED"
    lines.append(f"pyvmm check {kit}: {verdict}: {counts[PASS]} passed, {counts[FAIL]} failed, "
                 f"{counts[SKIP]} skipped in {seconds:.0f} s")
    return "\n".join(lines)


def _describe_error(e: BaseException) -> str:
    if isinstance(e, CheckFailed):
        return str(e)
    # An agent, QMP or VM error: the type says which side broke. Anything else is a bug in
    # the scenario, so keep its location.
    text = f"{type(e).__name__}: {e}"
    if type(e).__module__.startswith(("pyvmm.agent", "pyvmm.qmp", "pyvmm.api")) or isinstance(e, (OSError, TimeoutError)):
        return text
    where = traceback.extract_tb(e.__traceback__)[-1]
    return f"{text} (at {Path(where.filename).name}:{where.lineno})"


class KitRun:
    """One run of a kit over a list of scenarios; `run()` returns every step's Result."""

    def __init__(self, kit: Kit, scenarios: list[Scenario], options: RunOptions, out: IO[str] = sys.stdout) -> None:
        self.kit = kit
        self.scenarios = scenarios
        self.options = options
        self.out = out
        self.results: list[Result] = []
        self.started = time.monotonic()
        self.seconds = 0.0
        self._vm: Any = None
        self.progress = Progress(out, total=len(scenarios) + 3)

    @property
    def failed(self) -> bool:
        return any(r.status == FAIL for r in self.results)

    def _step(self, name: str, expects: str, body, ctx: Any = None) -> Result:
        result = Result(name, expects=expects)
        self.progress.start(name)
        if ctx is not None:
            ctx.begin()
        t0 = time.monotonic()
        try:
            message = body()
            result.status, result.message = PASS, message or ""
        except ScenarioSkipped as e:
            result.status, result.message = SKIP, str(e)
        except KeyboardInterrupt:
            result.status, result.message = FAIL, "interrupted"
            result.seconds = time.monotonic() - t0
            self._record(result, ctx)
            raise
        except BaseException as e:  # every failure becomes a verdict, never a traceback
            result.status, result.message = FAIL, _describe_error(e)
        result.seconds = time.monotonic() - t0
        self._record(result, ctx)
        return result

    def _record(self, result: Result, ctx: Any) -> None:
        if ctx is not None:
            result.notes = list(ctx.notes)
        self.results.append(result)
        self.progress.finish(result)

    def _not_run(self, scenarios: list[Scenario], status: str, why: str) -> None:
        """Scenarios that cannot run: in the results and the table, without progress lines."""
        for sc in scenarios:
            self.results.append(Result(sc.name, status, 0.0, why, sc.expects))
        if scenarios:
            self.out.write(f"      {len(scenarios)} scenario{'s' if len(scenarios) > 1 else ''} {why}\n")

    def run(self) -> list[Result]:
        opts = self.options
        self.out.write(f"pyvmm check {self.kit.name}: {self.kit.title}\n")
        self.out.write(f"kernel: {opts.kernel or 'the default guest'}\n")
        if not self._probe():
            self._finish()
            return self.results
        vm = None
        try:
            boot = self._step("boot", "the kernel boots and the in-guest agent answers",
                              lambda: self._boot())
            vm = self._vm
            if boot.status != PASS:
                self._not_run(self.scenarios, SKIP, "not run: the guest did not boot")
                return self.results
            note = self.progress.note if opts.verbose else None
            ctx = self.kit.context(vm, opts.scale, note)
            check = self._step("driver-check", "the guest's driver is bound to the device", ctx.setup, ctx)
            if check.status != PASS:
                self._not_run(self.scenarios, SKIP, f"not run: {check.message.splitlines()[0]}")
                return self.results
            self._run_scenarios(ctx)
        finally:
            if vm is not None:
                vm.close()
            self._finish()
        return self.results

    def _probe(self) -> bool:
        opts = self.options
        if not opts.probe:
            self.progress.start("kernel-probe")
            self._record(Result("kernel-probe", SKIP, 0.0, "skipped (--no-probe)"), None)
            return True
        kernel = opts.kernel or _default_kernel()
        holder: dict[str, Any] = {}

        def body() -> str:
            try:
                report = probe_kernel(kernel, self.kit.requirements, opts.system_map)
            except ProbeError as e:
                raise CheckFailed(str(e)) from None
            holder["report"] = report
            if report.failures:
                raise CheckFailed(report.failure_text())
            return report.summary()
        result = self._step("kernel-probe", "the kernel has the options this kit needs", body)
        if result.status == PASS and result.message:
            self.out.write(f"      {result.message}\n")
        if result.status != PASS:
            self._not_run(self.scenarios, SKIP, "not run: the kernel lacks what the kit needs")
            return False
        return True

    def _boot(self) -> str:
        opts = self.options
        vm = self.kit.boot(opts.kernel, opts.initrd, opts.append, opts.scale, opts.console_log)
        self._vm = vm
        return ""

    def _run_scenarios(self, ctx: Any) -> None:
        for i, sc in enumerate(self.scenarios):
            result = self._step(sc.name, sc.expects, lambda sc=sc: (ctx.prepare(), sc(ctx))[1], ctx)
            if result.status != FAIL:
                continue
            if ctx.vm.returncode is not None or result.message.startswith("the VM exited"):
                gone = f"not run: the VM exited (status {ctx.vm.returncode})"
                self._not_run(self.scenarios[i + 1:], FAIL, gone)
                return
            if i + 1 < len(self.scenarios):
                self._settle(ctx)

    def _settle(self, ctx: Any) -> None:
        try:
            ctx.begin()
            ctx.settle()
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            if isinstance(e, GuestGone):
                return
            self.out.write(f"      (could not bring the device back to its baseline: {_describe_error(e)}; "
                           "the next scenarios may fail for it)\n")

    def _finish(self) -> None:
        self.seconds = time.monotonic() - self.started
        self.out.write("\n" + format_table(self.kit.name, self.results, self.seconds) + "\n")
        self.out.flush()


def _default_kernel() -> Path:
    import guest_images

    return guest_images.default_image().vmlinux

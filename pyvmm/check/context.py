"""The context a scenario gets: the booted VM, its agent and QMP, and checking helpers.

Each kit subclasses Context with its device's helpers (VirtioMemContext, HvBalloonContext).
The base class carries what every scenario needs:

    ctx.vm, ctx.agent, ctx.qmp        the pyvmm.VM, its in-guest agent, its QMP client
    ctx.log("...")                    a step note (shown with -v, kept in the JUnit output)
    ctx.expect(cond, "message")       CheckFailed("message") unless cond
    ctx.wait_until(pred, timeout, expected=..., seen=...)   bounded poll, never hangs
    ctx.timeout(seconds)              a host figure stretched by --timeout-scale
    ctx.memtotal(), ctx.vm_stats(), ctx.reboot()
    ctx.state                         a dict shared by the scenarios of one run
"""

from __future__ import annotations

import time
from typing import Any, Callable, TypeVar

from pyvmm.check import waits
from pyvmm.check.waits import mib
from pyvmm.check.outcomes import CheckFailed, GuestGone

T = TypeVar("T")
REBOOT_RESET_TIMEOUT_S = 60.0  # from the guest's `reboot -f` to the machine reset
KIB = 1024
# "MemTotal:  250180 kB" is the first line of /proc/meminfo.
MEMTOTAL_COMMAND = "read -r _pyvmm_key _pyvmm_kib _pyvmm_unit < /proc/meminfo && echo $_pyvmm_key $_pyvmm_kib"


class Context:
    """What a scenario is handed. Subclasses add a device's helpers, `setup()` (the runtime
    check after boot) and `settle()` (back to the baseline after a failed scenario)."""

    def __init__(self, vm: Any, scale: float = 1.0, note: Callable[[str], None] | None = None) -> None:
        self.vm = vm
        self.scale = scale
        self.state: dict[str, Any] = {}
        self.notes: list[str] = []
        self._note = note
        self._t0 = time.monotonic()

    # ------------------------------------------------------------------ access
    @property
    def agent(self):
        return self.vm.agent

    @property
    def qmp(self):
        return self.vm.qmp

    # ------------------------------------------------------------------ reporting
    def begin(self) -> None:
        """Start of a scenario: fresh step notes and clock."""
        self.notes = []
        self._t0 = time.monotonic()

    def log(self, message: str) -> None:
        line = f"[{time.monotonic() - self._t0:6.1f} s] {message}"
        self.notes.append(line)
        if self._note is not None:
            self._note(line)

    def expect(self, condition: object, message: str) -> None:
        if not condition:
            raise CheckFailed(message)

    # ------------------------------------------------------------------ waiting
    def timeout(self, seconds: float) -> float:
        return seconds * self.scale

    def wait_until(self, predicate: Callable[[], T], timeout: float, expected: str,
                   seen: Callable[[], str] | None = None, interval: float = waits.POLL_INTERVAL_S) -> T:
        """`timeout` is already in seconds for this host (use ctx.timeout() on host figures)."""
        return waits.wait_until(predicate, timeout, expected, seen, alive=lambda: self.vm.returncode,
                                interval=interval)

    def check_alive(self) -> None:
        code = self.vm.returncode
        if code is not None:
            raise GuestGone(f"the VM has exited (status {code}); console tail:\n{self.console_tail()}")

    def console_tail(self, chars: int = 1500) -> str:
        return self.vm.console_text[-chars:]

    # ------------------------------------------------------------------ guest facts
    def meminfo(self) -> dict[str, int]:
        return self.agent.meminfo()

    def memtotal(self) -> int:
        """MemTotal in bytes. The first line of /proc/meminfo is read by the agent shell's
        builtin `read` (no program is exec'd: a tenth of the cost of `meminfo` under PVM)."""
        status, out = self.agent.run(MEMTOTAL_COMMAND)
        fields = out.split()
        if status != 0 or len(fields) != 2 or fields[0] != "MemTotal:" or not fields[1].isdigit():
            raise CheckFailed(f"cannot read MemTotal from /proc/meminfo: status {status}, {out.strip()[:200]!r}")
        return int(fields[1]) * KIB

    # The kit's baseline MemTotal and its default wait for MemTotal to move (host figures).
    base_memtotal: int
    MEMTOTAL_WAIT_S: float = waits.PLUG_BASE_S

    def wait_memtotal(self, delta: int, timeout: float | None = None) -> int:
        """Wait until the guest's MemTotal is `base_memtotal` + `delta`; returns it."""
        want = self.base_memtotal + delta
        last: dict[str, int] = {}

        def reached() -> bool:
            last["v"] = self.memtotal()
            return last["v"] == want
        self.wait_until(reached, timeout or self.timeout(self.MEMTOTAL_WAIT_S),
                        f"MemTotal = boot MemTotal {delta:+d} bytes ({mib(abs(delta))})",
                        seen=lambda: f"MemTotal = boot MemTotal {last['v'] - self.base_memtotal:+d} bytes",
                        interval=1.0)
        self.log(f"MemTotal = boot {'+' if delta >= 0 else '-'} {mib(abs(delta))}")
        return want

    def vm_stats(self) -> dict:
        return self.qmp.execute("query-vm-stats")

    def memslots(self, owner_prefix: str) -> list[dict]:
        return [s for s in self.qmp.execute("query-memslots") if s["owner"].startswith(owner_prefix)]

    def reboot(self, timeout: float | None = None) -> None:
        """Reboot the guest from inside (the agent's `reboot -f`), wait for the machine reset
        and for the agent of the new boot."""
        resets = self.vm_stats().get("resets", 0)
        self.agent.reboot()
        self.wait_until(lambda: self.vm_stats().get("resets", 0) > resets,
                        self.timeout(REBOOT_RESET_TIMEOUT_S), "the machine to reset after the guest's reboot",
                        seen=lambda: f"{self.vm_stats().get('resets')} resets")
        self.wait_agent(timeout)

    def wait_agent(self, timeout: float | None = None) -> None:
        try:
            self.agent.wait_ready(timeout or self.timeout(waits.BOOT_TIMEOUT_S))
        except Exception as e:
            self.check_alive()
            raise CheckFailed(f"the guest agent did not come back after the reboot: {e}") from None

    # ------------------------------------------------------------------ kit hooks
    def setup(self) -> None:
        """Runtime check after boot (drivers bound) and the baseline measurements."""

    def prepare(self) -> None:
        """Before each scenario: bring the device to the state scenarios start from, if a
        kit wants that (a no-op when it is there already)."""

    def settle(self) -> None:
        """Bring the device back to its baseline after a failed scenario (bounded)."""

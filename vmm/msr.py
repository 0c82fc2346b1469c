"""MSRs answered in user space: who answers which MSR, and the KVM MSR filter that sends them here.

With `KVM_CAP_X86_USER_SPACE_MSR` a guest RDMSR/WRMSR that KVM refuses (an MSR the filter
denies, or one KVM does not know) exits to pyvmm. `MsrDispatch` hands it to the handler of
that MSR: a single-MSR pair of functions or a range handler (the Hyper-V partition). A handler
raises `MsrFault` to give the guest #GP, as hardware does for an MSR it lacks; an access nobody
claims is a #GP too, counted per MSR.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from typing import Callable, Protocol

log = logging.getLogger("pyvmm.msr")

_U64 = (1 << 64) - 1


class MsrFault(Exception):
    """The guest's MSR access raises #GP."""


class MsrRangeHandler(Protocol):
    def msr_read(self, vp: int, index: int) -> int: ...
    def msr_write(self, vp: int, index: int, value: int) -> None: ...


MsrReader = Callable[[int], int]            # (vp) -> value
MsrWriter = Callable[[int, int], None]      # (vp, value)


class MsrDispatch:
    """Routes user-space MSR exits. Safe to call from every vCPU thread."""

    def __init__(self) -> None:
        self.single: dict[int, tuple[MsrReader, MsrWriter]] = {}
        self._ranges: list[tuple[int, int, MsrRangeHandler]] = []
        self._lock = threading.Lock()
        self.unclaimed: Counter[int] = Counter()
        self.handler_errors = 0

    def add_range(self, first: int, last: int, handler: MsrRangeHandler) -> None:
        """Give MSRs first..last (inclusive) to `handler`; ranges must not overlap."""
        if first > last:
            raise ValueError(f"bad MSR range {first:#x}..{last:#x}")
        for lo, hi, _ in self._ranges:
            if lo <= last and first <= hi:
                raise ValueError(f"MSR range {first:#x}..{last:#x} overlaps {lo:#x}..{hi:#x}")
        self._ranges = self._ranges + [(first, last, handler)]

    def _range_handler(self, index: int) -> MsrRangeHandler | None:
        for lo, hi, handler in self._ranges:
            if lo <= index <= hi:
                return handler
        return None

    def read(self, vp: int, index: int) -> int:
        """The value for the guest's RDMSR; raises MsrFault for #GP."""
        single = self.single.get(index)
        if single is not None:
            return self._call(index, lambda: int(single[0](vp)) & _U64)
        handler = self._range_handler(index)
        if handler is None:
            self._unclaimed(index, "read")
        return self._call(index, lambda: int(handler.msr_read(vp, index)) & _U64)

    def write(self, vp: int, index: int, value: int) -> None:
        """Carry out the guest's WRMSR; raises MsrFault for #GP."""
        single = self.single.get(index)
        if single is not None:
            self._call(index, lambda: single[1](vp, value))
            return
        handler = self._range_handler(index)
        if handler is None:
            self._unclaimed(index, "write")
        self._call(index, lambda: handler.msr_write(vp, index, value))

    def _call(self, index: int, fn: Callable[[], int | None]):
        try:
            return fn()
        except MsrFault:
            raise
        except Exception:  # a handler bug must not kill the vCPU: the guest gets #GP
            with self._lock:
                self.handler_errors += 1
            log.exception("MSR %#x handler failed", index)
            raise MsrFault(f"MSR {index:#x} handler failed") from None

    def _unclaimed(self, index: int, kind: str) -> None:
        with self._lock:
            self.unclaimed[index] += 1
            first = self.unclaimed[index] == 1
        if first:
            log.info("guest %s of MSR %#x that nobody handles: #GP (logged once per MSR)", kind, index)
        raise MsrFault(f"MSR {index:#x} is not handled")

    def stats(self) -> dict:
        with self._lock:
            return {"unclaimed": {f"{i:#x}": n for i, n in sorted(self.unclaimed.items())},
                    "handler-errors": self.handler_errors}


def deny_filter_range(first: int, last: int, flags: int) -> tuple[int, int, int, bytes]:
    """One KVM_X86_SET_MSR_FILTER range that denies MSRs first..last for `flags` (READ/WRITE),
    so that every guest access to them exits to user space (a clear bitmap bit denies)."""
    count = last - first + 1
    if count <= 0:
        raise ValueError(f"bad MSR range {first:#x}..{last:#x}")
    return flags, first, count, bytes((count + 7) // 8)

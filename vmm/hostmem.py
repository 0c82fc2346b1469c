"""Host memory that backs guest RAM: anonymous private mappings, memfd (optionally hugetlb).

A `HostMapping` is one contiguous host virtual range. It knows how to give memory back to the
host (`discard`), how to fence it off (`protect`) and how to read and write it by offset.
Large mappings are MAP_NORESERVE, so reserving a 1 TiB virtio-mem region costs neither time
nor RSS until pages are touched.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from vmm import kvm_abi as abi
from vmm.kvm_abi import ffi, libc

PAGE_SIZE = 4096
HUGE_PAGE_SIZE = 2 << 20

BACKENDS = ("anon", "memfd", "hugetlb")

# memfd_create flags (linux/memfd.h)
MFD_CLOEXEC = 0x0001
MFD_HUGETLB = 0x0004
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02


class HostMemoryError(Exception):
    """The host could not provide or manage the requested memory (one-line message)."""


def parse_size(text: str) -> int:
    """'256M', '2G', '1T', '4096', '512K' -> bytes. Raises ValueError with a readable message."""
    m = re.fullmatch(r"\s*(\d+)\s*([KMGTkmgt]?)(i?[Bb])?\s*", str(text))
    if not m:
        raise ValueError(f"invalid size {text!r} (expected e.g. 256M, 2G)")
    shift = {"": 0, "k": 10, "m": 20, "g": 30, "t": 40}[m.group(2).lower()]
    return int(m.group(1)) << shift


def format_size(n: int) -> str:
    for unit, shift in (("T", 40), ("G", 30), ("M", 20), ("K", 10)):
        if n and n % (1 << shift) == 0:
            return f"{n >> shift}{unit}"
    return str(n)


def hugepages_available() -> int:
    """Free 2 MiB huge pages on the host (0 when hugetlbfs has none configured)."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return 0
    m = re.search(r"HugePages_Free:\s+(\d+)", text)
    return int(m.group(1)) if m else 0


class HostMapping:
    """One host virtual range backing guest memory."""

    def __init__(self, size: int, backend: str = "anon", name: str = "guest-ram") -> None:
        if backend not in BACKENDS:
            raise HostMemoryError(f"unknown memory backend {backend!r} (choose from {', '.join(BACKENDS)})")
        align = HUGE_PAGE_SIZE if backend == "hugetlb" else PAGE_SIZE
        if size <= 0 or size % align:
            raise HostMemoryError(f"memory size {size} must be a positive multiple of {align}")
        self.size = size
        self.backend = backend
        self.name = name
        self.fd: int | None = None
        flags = abi.MAP_NORESERVE
        if backend == "anon":
            flags |= abi.MAP_PRIVATE | abi.MAP_ANONYMOUS
            fd = -1
        else:
            mfd_flags = MFD_CLOEXEC | (MFD_HUGETLB if backend == "hugetlb" else 0)
            try:
                self.fd = os.memfd_create(f"pyvmm-{name}", mfd_flags)
                os.ftruncate(self.fd, size)
            except OSError as e:
                if self.fd is not None:
                    os.close(self.fd)
                raise HostMemoryError(f"cannot create {backend} backing of {format_size(size)}: {e.strerror}") from None
            flags |= abi.MAP_SHARED
            fd = self.fd
        ptr = libc.mmap(ffi.NULL, size, abi.PROT_READ | abi.PROT_WRITE, flags, fd, 0)
        addr = int(ffi.cast("uintptr_t", ptr))
        if addr == abi.MAP_FAILED:
            err = ffi.errno
            if self.fd is not None:
                os.close(self.fd)
            raise HostMemoryError(f"cannot map {format_size(size)} of guest memory: {os.strerror(err)}")
        self._ptr = ffi.cast("char *", ptr)
        self.addr = addr
        self.buf = ffi.buffer(self._ptr, size)
        if backend == "anon":
            # THP makes first touch and discard much cheaper; failure just means no THP.
            libc.madvise(self._ptr, size, abi.MADV_HUGEPAGE)

    # --- data access ---
    def read(self, offset: int, size: int) -> bytes:
        return self.buf[offset:offset + size]

    def write(self, offset: int, data: bytes) -> None:
        self.buf[offset:offset + len(data)] = data

    def view(self, offset: int, size: int) -> memoryview:
        return memoryview(self.buf)[offset:offset + size]

    def host_address(self, offset: int) -> int:
        return self.addr + offset

    # --- management ---
    def discard(self, offset: int, length: int) -> None:
        """Give the pages back to the host; the next guest access sees zeros."""
        self._check(offset, length)
        ptr = self._ptr + offset
        if self.backend == "anon":
            ret = libc.madvise(ptr, length, abi.MADV_DONTNEED)
        else:
            # MADV_DONTNEED only drops this process's page-table entries on a shared
            # mapping; the memfd keeps the pages. Punching a hole frees them.
            ret = libc.madvise(ptr, length, abi.MADV_REMOVE)
            if ret != 0:
                ret = libc.fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        if ret != 0:
            raise HostMemoryError(f"discarding {length} bytes at offset {offset:#x} failed: {os.strerror(ffi.errno)}")

    def protect(self, offset: int, length: int, accessible: bool) -> None:
        self._check(offset, length)
        prot = (abi.PROT_READ | abi.PROT_WRITE) if accessible else abi.PROT_NONE
        if libc.mprotect(self._ptr + offset, length, prot) != 0:
            raise HostMemoryError(f"mprotect failed: {os.strerror(ffi.errno)}")

    def populate(self, offset: int, length: int) -> None:
        """Prefault (prealloc=on). Falls back to touching pages if MADV_POPULATE_WRITE is missing."""
        self._check(offset, length)
        if libc.madvise(self._ptr + offset, length, abi.MADV_POPULATE_WRITE) != 0:
            for off in range(offset, offset + length, PAGE_SIZE):
                self._ptr[off] = self._ptr[off]

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size or offset % PAGE_SIZE or length % PAGE_SIZE:
            raise HostMemoryError(f"range {offset:#x}+{length:#x} is not page-aligned inside the {self.name} mapping")

    def close(self) -> None:
        if self._ptr is not None:
            del self.buf
            libc.munmap(self._ptr, self.size)
            self._ptr = None
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


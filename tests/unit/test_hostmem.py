"""Tests for host memory backing guest RAM: real mmap, discard, protect, cheap huge reservations."""

from __future__ import annotations

import faulthandler
import os
import signal
import time

import pytest

from vmm.hostmem import HostMapping, HostMemoryError, format_size, parse_size
from tests.procfs import maps_perms

KiB, MiB, GiB, TiB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
PAGE = 4096
BACKENDS = ["anon", "memfd"]


def rss_bytes() -> int:
    """Resident set size of this process (/proc/self/statm, second field, in pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")




def faults_in_child(m: HostMapping, offset: int, write: bool = False) -> bool:
    """Touch `offset` in a forked child: True if the child died of SIGSEGV."""
    pid = os.fork()
    if pid == 0:  # child: touch and report survival through the exit status
        faulthandler.disable()  # the expected SIGSEGV must not print a traceback dump
        try:
            if write:
                m.write(offset, b"\x01")
            else:
                m.read(offset, 1)
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGSEGV


@pytest.fixture(params=BACKENDS)
def mapping(request: pytest.FixtureRequest) -> HostMapping:
    m = HostMapping(4 * MiB, request.param, "test")
    yield m
    m.close()


def test_new_mapping_reads_zero(mapping: HostMapping) -> None:
    assert mapping.read(0, PAGE) == bytes(PAGE)
    assert mapping.read(mapping.size - 16, 16) == bytes(16)
    assert mapping.addr == mapping.host_address(0) and mapping.host_address(0x1000) == mapping.addr + 0x1000


def test_write_and_read_back(mapping: HostMapping) -> None:
    blob = os.urandom(3 * PAGE + 17)
    mapping.write(PAGE - 5, blob)
    assert mapping.read(PAGE - 5, len(blob)) == blob
    assert bytes(mapping.view(PAGE - 5, 4)) == blob[:4]
    mapping.view(0, 3)[:] = b"xyz"
    assert mapping.read(0, 3) == b"xyz"


def test_discard_reads_back_zero_and_spares_the_rest(mapping: HostMapping) -> None:
    mapping.write(0, b"\x11" * (4 * PAGE))
    mapping.discard(PAGE, 2 * PAGE)
    assert mapping.read(0, PAGE) == b"\x11" * PAGE
    assert mapping.read(PAGE, 2 * PAGE) == bytes(2 * PAGE)
    assert mapping.read(3 * PAGE, PAGE) == b"\x11" * PAGE


def test_discard_gives_memory_back(mapping: HostMapping) -> None:
    size = 2 * MiB
    mapping.write(0, b"\x5a" * size)
    before = rss_bytes()
    mapping.discard(0, size)
    freed = before - rss_bytes()
    # RSS counts shmem (memfd) pages too; a discard that only dropped PTEs of a shared
    # mapping would still free nothing on the host, so also read the data back as zero.
    assert freed >= size // 2, f"only {freed} bytes freed"
    assert mapping.read(0, size) == bytes(size)


def test_memfd_discard_frees_the_file_pages() -> None:
    """On a shared memfd, MADV_DONTNEED would free nothing: the hole must reach the file."""
    m = HostMapping(4 * MiB, "memfd", "test")
    try:
        m.write(0, b"\x77" * (4 * MiB))
        m.discard(0, 4 * MiB)
        st = os.fstat(m.fd)
        assert st.st_blocks * 512 < 1 * MiB, f"memfd still holds {st.st_blocks * 512} bytes"
        assert st.st_size == 4 * MiB  # the size is kept, only the pages go
    finally:
        m.close()


def test_protect_off_then_on(mapping: HostMapping) -> None:
    mapping.write(2 * PAGE, b"keep me")
    mapping.protect(2 * PAGE, PAGE, False)
    assert maps_perms(mapping.addr + 2 * PAGE).startswith("---")
    assert maps_perms(mapping.addr).startswith("rw"), "only the named range is fenced off"
    assert faults_in_child(mapping, 2 * PAGE)
    assert not faults_in_child(mapping, PAGE)
    mapping.protect(2 * PAGE, PAGE, True)
    assert maps_perms(mapping.addr + 2 * PAGE).startswith("rw")
    assert mapping.read(2 * PAGE, 7) == b"keep me"
    mapping.write(2 * PAGE, b"written")
    assert mapping.read(2 * PAGE, 7) == b"written"


@pytest.mark.parametrize("offset,length", [(1, PAGE), (0, PAGE + 1), (-PAGE, PAGE), (0, 8 * MiB),
                                           (4 * MiB - PAGE, 2 * PAGE), (0, -PAGE)])
def test_bad_ranges_are_refused(mapping: HostMapping, offset: int, length: int) -> None:
    with pytest.raises(HostMemoryError):
        mapping.discard(offset, length)
    with pytest.raises(HostMemoryError):
        mapping.protect(offset, length, False)


@pytest.mark.parametrize("size,backend", [(0, "anon"), (PAGE + 1, "anon"), (-PAGE, "memfd"), (PAGE, "shm"),
                                          (PAGE, "hugetlb")])
def test_bad_mappings_are_refused(size: int, backend: str) -> None:
    # hugetlb needs a multiple of 2 MiB, so a 4 KiB hugetlb request is refused before any mmap
    with pytest.raises(HostMemoryError) as info:
        HostMapping(size, backend)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_tib_noreserve_mapping_is_cheap(backend: str) -> None:
    rss0 = rss_bytes()
    t0 = time.monotonic()
    m = HostMapping(1 * TiB, backend, "huge")
    try:
        elapsed = time.monotonic() - t0
        assert elapsed < 1.0, f"mapping 1 TiB took {elapsed:.2f} s"
        assert rss_bytes() - rss0 < 16 * MiB
        # the far end works, and touching one page costs about one (huge) page
        m.write(1 * TiB - PAGE, b"end")
        m.write(512 * GiB, b"mid")
        assert m.read(1 * TiB - PAGE, 3) == b"end" and m.read(512 * GiB, 3) == b"mid"
        assert rss_bytes() - rss0 < 16 * MiB
        m.discard(1 * TiB - 2 * MiB, 2 * MiB)
        assert m.read(1 * TiB - PAGE, 3) == bytes(3)
    finally:
        m.close()


def test_populate_prefaults(mapping: HostMapping) -> None:
    before = rss_bytes()
    mapping.populate(0, 2 * MiB)
    assert rss_bytes() - before >= 2 * MiB - 64 * KiB
    assert mapping.read(0, 16) == bytes(16)


def test_close_releases_the_mapping_and_the_fd() -> None:
    m = HostMapping(2 * MiB, "memfd", "test")
    addr, fd = m.addr, m.fd
    m.close()
    with pytest.raises(OSError):
        os.fstat(fd)
    with pytest.raises(AssertionError):
        maps_perms(addr)
    m.close()  # idempotent


@pytest.mark.parametrize("text,value", [
    ("4096", 4096), ("0", 0), ("512K", 512 * KiB), ("512k", 512 * KiB), ("256M", 256 * MiB),
    ("2G", 2 * GiB), ("2g", 2 * GiB), ("1T", TiB), ("256MiB", 256 * MiB), ("256MB", 256 * MiB),
    ("2Gb", 2 * GiB), (" 1G ", GiB), ("1 G", GiB),
])
def test_parse_size_good(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", " ", "G", "12Q", "1.5G", "-1", "-1G", "0x100", "1GG", "1 2G", "abc",
                                  "1P", "1e9", "1Gi"])
def test_parse_size_bad(text: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(text)
    assert repr(text) in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("n", [PAGE, 3 * KiB, 256 * MiB, 3 * GiB, 2 * TiB, 12345])
def test_format_size_round_trips(n: int) -> None:
    assert parse_size(format_size(n)) == n

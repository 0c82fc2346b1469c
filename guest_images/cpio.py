"""Write an uncompressed cpio archive in the kernel's "newc" format.

Written in Python rather than with cpio(1) so that the archive needs no root
(device nodes, uid 0), is reproducible (fixed inode numbers and mtimes) and
holds exactly the entries listed. Format: Documentation/driver-api/early-userspace/
buffer-format.rst in the kernel tree ("070701" header, 13 hex fields).
"""

from __future__ import annotations

import stat
from dataclasses import dataclass
from typing import BinaryIO, Iterable

NEWC_MAGIC = b"070701"
TRAILER_NAME = "TRAILER!!!"
ALIGN = 4
HEADER_FIELDS = 13
FIELD_MAX = 0xFFFF_FFFF


@dataclass(frozen=True)
class Entry:
    """One archive member. `name` is relative ("bin/sh"), no leading slash."""

    name: str
    mode: int  # full st_mode: file type bits | permission bits
    data: bytes = b""  # file contents, or the target of a symlink
    rdev_major: int = 0
    rdev_minor: int = 0


def directory(name: str, perm: int = 0o755) -> Entry:
    return Entry(name, stat.S_IFDIR | perm)


def regular(name: str, data: bytes, perm: int = 0o644) -> Entry:
    return Entry(name, stat.S_IFREG | perm, data)


def symlink(name: str, target: str) -> Entry:
    return Entry(name, stat.S_IFLNK | 0o777, target.encode())


def char_device(name: str, major: int, minor: int, perm: int = 0o600) -> Entry:
    return Entry(name, stat.S_IFCHR | perm, rdev_major=major, rdev_minor=minor)


def _pad(length: int) -> bytes:
    return b"\0" * (-length % ALIGN)


def _member(ino: int, entry: Entry) -> bytes:
    name = entry.name.lstrip("/").encode() + b"\0"
    nlink = 2 if stat.S_ISDIR(entry.mode) else 1
    fields = (
        ino, entry.mode, 0, 0, nlink, 0, len(entry.data),
        0, 0, entry.rdev_major, entry.rdev_minor, len(name), 0,
    )
    assert len(fields) == HEADER_FIELDS
    if any(f < 0 or f > FIELD_MAX for f in fields):
        raise ValueError(f"cpio field out of range for {entry.name!r}")
    header = NEWC_MAGIC + b"".join(b"%08X" % f for f in fields)
    head = header + name
    return head + _pad(len(head)) + entry.data + _pad(len(entry.data))


def write_newc(out: BinaryIO, entries: Iterable[Entry]) -> int:
    """Write the archive (entries in the given order, parents first) and
    return its size in bytes."""
    size = 0
    seen: set[str] = set()
    ino = 0
    for ino, entry in enumerate(entries, start=1):
        if not entry.name or entry.name in seen:
            raise ValueError(f"bad or duplicate cpio member name {entry.name!r}")
        seen.add(entry.name)
        size += out.write(_member(ino, entry))
    size += out.write(_member(ino + 1, Entry(TRAILER_NAME, 0)))
    return size

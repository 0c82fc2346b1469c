"""Load an x86-64 Linux kernel into guest memory: an ELF `vmlinux` or a `bzImage`.

An ELF vmlinux is entered at its 64-bit `startup_64` (the ELF entry is a physical address),
so the guest never runs the decompressor; that matters where guest kernel code is
interpreted. A bzImage is loaded per the Linux x86 boot protocol and entered at its 64-bit
entry (load address + 0x200), which needs XLF_KERNEL_64.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from elftools.common.exceptions import ELFError
from elftools.elf.elffile import ELFFile

ELF_MAGIC = b"\x7fELF"
EM_X86_64 = 62
PT_LOAD = 1

# bzImage setup header (Documentation/arch/x86/boot.rst), offsets within the image.
SETUP_SECTS_OFFSET = 0x1F1
SETUP_HEADER_MAGIC_OFFSET = 0x202
SETUP_HEADER_MAGIC = b"HdrS"
BOOT_VERSION_OFFSET = 0x206
JUMP_OFFSET = 0x200  # the header ends at 0x202 + the byte at 0x201
XLOADFLAGS_OFFSET = 0x236
PREF_ADDRESS_OFFSET = 0x258
INIT_SIZE_OFFSET = 0x260
XLF_KERNEL_64 = 1 << 0
MIN_BOOT_VERSION_64BIT = 0x020C  # xloadflags appeared in 2.12
BZIMAGE_64BIT_ENTRY_OFFSET = 0x200
DEFAULT_BZIMAGE_LOAD_ADDR = 0x100000
SECTOR = 512


class KernelImageError(Exception):
    """The file is not a loadable x86-64 Linux kernel (one-line message)."""


@dataclass(frozen=True)
class LoadedKernel:
    kind: str            # "vmlinux" or "bzImage"
    entry: int           # 64-bit entry, guest-physical
    start: int           # lowest guest-physical byte used
    end: int             # first guest-physical byte past the kernel (incl. bss / init_size)
    setup_header: bytes | None  # the bzImage's header bytes, to copy into boot_params


Writer = Callable[[int, bytes], None]


def load_kernel(path: Path, write: Writer, ram_limit: int) -> LoadedKernel:
    """Load `path` through `write(gpa, data)`; everything must fit below `ram_limit`."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        raise KernelImageError(f"kernel file {path} does not exist") from None
    except IsADirectoryError:
        raise KernelImageError(f"kernel path {path} is a directory, not a kernel image") from None
    except OSError as e:
        raise KernelImageError(f"cannot read kernel file {path}: {e.strerror}") from None
    if data[:4] == ELF_MAGIC:
        return _load_elf(path, data, write, ram_limit)
    if data[SETUP_HEADER_MAGIC_OFFSET:SETUP_HEADER_MAGIC_OFFSET + 4] == SETUP_HEADER_MAGIC:
        return _load_bzimage(path, data, write, ram_limit)
    raise KernelImageError(f"{path} is not an x86-64 Linux kernel (neither an ELF vmlinux nor a bzImage)")


def _load_elf(path: Path, data: bytes, write: Writer, ram_limit: int) -> LoadedKernel:
    try:
        elf = ELFFile(io.BytesIO(data))
        if elf.elfclass != 64 or elf["e_machine"] != "EM_X86_64":
            raise KernelImageError(f"{path} is an ELF file but not an x86-64 kernel ({elf['e_machine']}, {elf.elfclass}-bit)")
        segments = [s for s in elf.iter_segments() if s["p_type"] == "PT_LOAD"]
        if not segments:
            raise KernelImageError(f"{path} has no loadable segments")
        start = min(s["p_paddr"] for s in segments)
        end = max(s["p_paddr"] + s["p_memsz"] for s in segments)
        if end > ram_limit:
            raise KernelImageError(f"{path} needs guest memory up to {end:#x}, but low RAM ends at {ram_limit:#x}")
        for seg in segments:
            paddr, filesz, memsz = seg["p_paddr"], seg["p_filesz"], seg["p_memsz"]
            if filesz > memsz:
                raise KernelImageError(f"{path} is a damaged ELF file: a segment's file size exceeds its memory size")
            if filesz:
                body = seg.data()
                if len(body) != filesz:
                    raise KernelImageError(f"{path} is truncated: a segment needs {filesz} bytes, the file has {len(body)}")
                write(paddr, body)
            if memsz > filesz:  # bss: zero it explicitly, RAM may hold a previous boot
                write(paddr + filesz, bytes(memsz - filesz))
        entry = elf["e_entry"]
    except (ELFError, OverflowError, ValueError) as e:
        raise KernelImageError(f"{path} is a damaged ELF file: {e}") from None
    if not start <= entry < end:
        raise KernelImageError(f"{path}: entry point {entry:#x} lies outside the loaded image; is this a vmlinux?")
    return LoadedKernel("vmlinux", entry, start, end, None)


def _load_bzimage(path: Path, data: bytes, write: Writer, ram_limit: int) -> LoadedKernel:
    if len(data) < 0x300:
        raise KernelImageError(f"{path} is truncated")
    version = struct.unpack_from("<H", data, BOOT_VERSION_OFFSET)[0]
    if version < MIN_BOOT_VERSION_64BIT:
        raise KernelImageError(f"{path}: boot protocol {version >> 8}.{version & 0xff} is too old for a 64-bit entry (need 2.12)")
    xloadflags = struct.unpack_from("<H", data, XLOADFLAGS_OFFSET)[0]
    if not xloadflags & XLF_KERNEL_64:
        raise KernelImageError(f"{path} is a bzImage without a 64-bit entry point (not an x86-64 kernel)")
    setup_sects = data[SETUP_SECTS_OFFSET] or 4
    pm_offset = (setup_sects + 1) * SECTOR
    payload = data[pm_offset:]
    if not payload:
        raise KernelImageError(f"{path} is truncated (no protected-mode kernel)")
    pref = struct.unpack_from("<Q", data, PREF_ADDRESS_OFFSET)[0]
    init_size = struct.unpack_from("<I", data, INIT_SIZE_OFFSET)[0]
    load = pref if pref and pref + max(init_size, len(payload)) <= ram_limit else DEFAULT_BZIMAGE_LOAD_ADDR
    end = load + max(init_size, len(payload))
    if end > ram_limit:
        raise KernelImageError(f"{path} needs {end - load} bytes from {load:#x}, more than low RAM holds")
    write(load, payload)
    header_end = SETUP_HEADER_MAGIC_OFFSET + data[JUMP_OFFSET + 1]
    return LoadedKernel("bzImage", load + BZIMAGE_64BIT_ENTRY_OFFSET, load, end,
                        data[SETUP_SECTS_OFFSET:header_end])

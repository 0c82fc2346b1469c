"""Software x86 page walk: translate a guest-linear address to a guest-physical one.

The emulation assist uses it to fetch instruction bytes and to reach memory operands
exactly as the CPU would: 4-level and 5-level (CR4.LA57) long-mode paging with 1 GiB and
2 MiB pages, PAE paging, 32-bit paging (4 MiB pages with CR4.PSE) and no paging at all.
It checks the present bit, reserved bits, and the access rights that decide whether the
CPU would raise #PF (user/supervisor, read/write with CR0.WP, NX, SMEP, SMAP), and it
builds the #PF error code so the caller can inject the fault.

Not modelled: protection keys (PKRU/PKS), and setting the Accessed/Dirty bits in the
paging entries (Linux maps its own memory with A and D already set).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

# Control-register and EFER bits (names as in the kernel's processor-flags.h / msr-index.h).
X86_CR0_WP = 1 << 16
X86_CR0_PG = 1 << 31
X86_CR4_PSE = 1 << 4
X86_CR4_PAE = 1 << 5
X86_CR4_LA57 = 1 << 12
X86_CR4_SMEP = 1 << 20
X86_CR4_SMAP = 1 << 21
EFER_LMA = 1 << 10
EFER_NX = 1 << 11

# Paging-entry bits (the kernel's _PAGE_BIT_*).
_PAGE_PRESENT = 1 << 0
_PAGE_RW = 1 << 1
_PAGE_USER = 1 << 2
_PAGE_PSE = 1 << 7
_PAGE_NX = 1 << 63

# #PF error-code bits (the kernel's enum x86_pf_error_code).
X86_PF_PROT = 1 << 0
X86_PF_WRITE = 1 << 1
X86_PF_USER = 1 << 2
X86_PF_RSVD = 1 << 3
X86_PF_INSTR = 1 << 4

PAGE_SIZE = 4096
DEFAULT_MAXPHYADDR = 52

# Names of the paging levels, indexed by level number (1 = the level that maps 4 KiB pages).
LEVEL_NAMES = {1: "PT", 2: "PD", 3: "PDPT", 4: "PML4", 5: "PML5"}


class GuestMemory(Protocol):
    """Guest-physical memory as the VMM sees it."""

    def read_phys(self, gpa: int, size: int) -> bytes:
        """Read guest RAM; raises if any byte is not RAM."""
        ...

    def write_phys(self, gpa: int, data: bytes) -> None:
        """Write guest RAM; raises if any byte is not RAM."""
        ...


class PagingState(Protocol):
    """The registers that define the current translation (CpuState satisfies it)."""

    cr0: int
    cr3: int
    cr4: int
    efer: int


class WalkError(Exception):
    """A linear address could not be translated or accessed."""


class PageFault(WalkError):
    """The CPU would raise #PF for this access.

    `level` is the paging level whose entry stopped the walk (see LEVEL_NAMES);
    `error_code` is what the CPU would push; `reason` is a short human explanation.
    """

    def __init__(self, gva: int, level: int, error_code: int, reason: str) -> None:
        self.gva = gva
        self.level = level
        self.error_code = error_code
        self.reason = reason
        super().__init__(
            f"#PF at {gva:#x}: {reason} at {LEVEL_NAMES.get(level, level)} level "
            f"(error code {error_code:#x})"
        )


class NonCanonicalAddress(WalkError):
    """The address is not canonical: the CPU raises #GP (or #SS), not #PF."""

    def __init__(self, gva: int) -> None:
        self.gva = gva
        super().__init__(f"linear address {gva:#x} is not canonical")


class PhysAccessError(WalkError):
    """A guest-physical address the walk or the access needs is not guest RAM."""

    def __init__(self, gpa: int, what: str, cause: BaseException | None = None) -> None:
        self.gpa = gpa
        self.what = what
        detail = f" ({cause})" if cause is not None else ""
        super().__init__(f"{what} at GPA {gpa:#x} is not guest RAM{detail}")


@dataclass(frozen=True)
class Translation:
    """Where one linear address lands, and the rights the walk accumulated."""

    gva: int
    gpa: int
    page_size: int  # size of the page that maps gva
    level: int  # level of the leaf entry
    writable: bool  # R/W set at every level
    user: bool  # U/S set at every level
    executable: bool  # no NX at any level

    @property
    def bytes_left_in_page(self) -> int:
        return self.page_size - (self.gva & (self.page_size - 1))


@dataclass(frozen=True)
class Access:
    """What kind of access is being made (decides the rights checked and the error code)."""

    write: bool = False
    user: bool = False  # made at CPL3
    fetch: bool = False
    ac: bool = False  # RFLAGS.AC: lets supervisor data accesses reach user pages under SMAP
    check_rights: bool = True  # False: only presence and reserved bits matter


SUPERVISOR_PEEK = Access(check_rights=False)


def read_phys_checked(mem: GuestMemory, gpa: int, size: int, what: str) -> bytes:
    """read_phys that turns any failure of the memory backend into PhysAccessError."""
    try:
        data = mem.read_phys(gpa, size)
    except Exception as exc:  # the backend's error type is its own business
        raise PhysAccessError(gpa, what, exc) from exc
    if len(data) != size:
        raise PhysAccessError(gpa, what, ValueError(f"short read {len(data)}/{size}"))
    return bytes(data)


def _entry(mem: GuestMemory, gpa: int, width: int, level: int) -> int:
    raw = read_phys_checked(mem, gpa, width, f"{LEVEL_NAMES[level]} entry")
    return int.from_bytes(raw, "little")


def _address_mask(maxphyaddr: int) -> int:
    """Bits 12..MAXPHYADDR-1 of a paging entry: the physical frame."""
    return ((1 << maxphyaddr) - 1) & ~(PAGE_SIZE - 1)


def _rsvd_bits_64(maxphyaddr: int, nx_enabled: bool) -> int:
    """Bits that must be zero in every 64-bit paging entry (PAE and long mode)."""
    high = ((1 << 52) - 1) & ~((1 << maxphyaddr) - 1)
    return high | (0 if nx_enabled else _PAGE_NX)


def is_canonical(gva: int, la57: bool) -> bool:
    bits = 57 if la57 else 48
    top = gva >> (bits - 1)
    return top == 0 or top == (1 << (65 - bits)) - 1


def translate(
    mem: GuestMemory,
    paging: PagingState,
    gva: int,
    access: Access = SUPERVISOR_PEEK,
    *,
    maxphyaddr: int = DEFAULT_MAXPHYADDR,
) -> Translation:
    """Walk the guest page tables for `gva`; raise PageFault as the CPU would.

    Raises NonCanonicalAddress for a non-canonical long-mode address and PhysAccessError
    when a paging structure lies outside guest RAM.
    """
    if not paging.cr0 & X86_CR0_PG:
        gva &= 0xFFFF_FFFF
        return Translation(gva, gva, PAGE_SIZE, 1, True, True, True)
    if paging.efer & EFER_LMA:
        tr = _walk_long(mem, paging, gva, access, maxphyaddr)
    elif paging.cr4 & X86_CR4_PAE:
        tr = _walk_pae(mem, paging, gva & 0xFFFF_FFFF, access, maxphyaddr)
    else:
        tr = _walk_32(mem, paging, gva & 0xFFFF_FFFF, access)
    if access.check_rights:
        _check_rights(paging, tr, access)
    return tr


def _base_error_code(paging: PagingState, access: Access) -> int:
    code = 0
    if access.write:
        code |= X86_PF_WRITE
    if access.user:
        code |= X86_PF_USER
    # The I/D bit is reported only when NX or SMEP could have been the reason.
    nx_possible = bool(paging.efer & EFER_NX) and bool(paging.cr4 & X86_CR4_PAE)
    if access.fetch and (nx_possible or paging.cr4 & X86_CR4_SMEP):
        code |= X86_PF_INSTR
    return code


def _not_present(paging: PagingState, gva: int, level: int, access: Access) -> PageFault:
    return PageFault(gva, level, _base_error_code(paging, access), "entry not present")


def _reserved(paging: PagingState, gva: int, level: int, access: Access) -> PageFault:
    code = _base_error_code(paging, access) | X86_PF_PROT | X86_PF_RSVD
    return PageFault(gva, level, code, "reserved bit set in entry")


def _walk_long(
    mem: GuestMemory, paging: PagingState, gva: int, access: Access, maxphyaddr: int
) -> Translation:
    la57 = bool(paging.cr4 & X86_CR4_LA57)
    gva &= (1 << 64) - 1
    if not is_canonical(gva, la57):
        raise NonCanonicalAddress(gva)
    nx_enabled = bool(paging.efer & EFER_NX)
    rsvd = _rsvd_bits_64(maxphyaddr, nx_enabled)
    frame_mask = _address_mask(maxphyaddr)
    table = paging.cr3 & frame_mask
    writable = user = executable = True
    for level in range(5 if la57 else 4, 0, -1):
        shift = 12 + 9 * (level - 1)
        index = (gva >> shift) & 0x1FF
        entry = _entry(mem, table + 8 * index, 8, level)
        if not entry & _PAGE_PRESENT:
            raise _not_present(paging, gva, level, access)
        if entry & rsvd or (level >= 4 and entry & _PAGE_PSE):
            raise _reserved(paging, gva, level, access)
        writable &= bool(entry & _PAGE_RW)
        user &= bool(entry & _PAGE_USER)
        executable &= not (nx_enabled and entry & _PAGE_NX)
        if level == 1 or (level in (2, 3) and entry & _PAGE_PSE):
            size = 1 << shift
            if level > 1:
                # Bit 12 is PAT for a large page; the bits between it and the frame are reserved.
                if entry & (size - 1) & ~((1 << 13) - 1):
                    raise _reserved(paging, gva, level, access)
                frame = entry & frame_mask & ~(size - 1)
            else:
                frame = entry & frame_mask
            gpa = frame | (gva & (size - 1))
            return Translation(gva, gpa, size, level, writable, user, executable)
        table = entry & frame_mask
    raise AssertionError("unreachable: level 1 always returns")


def _walk_pae(
    mem: GuestMemory, paging: PagingState, gva: int, access: Access, maxphyaddr: int
) -> Translation:
    nx_enabled = bool(paging.efer & EFER_NX)
    rsvd = _rsvd_bits_64(maxphyaddr, nx_enabled)
    frame_mask = _address_mask(maxphyaddr)
    # CR3 holds a 32-byte-aligned pointer to the four PDPTEs.
    pdpte = _entry(mem, (paging.cr3 & 0xFFFF_FFE0) + 8 * (gva >> 30), 8, 3)
    if not pdpte & _PAGE_PRESENT:
        raise _not_present(paging, gva, 3, access)
    # PDPTEs carry no R/W, U/S or NX: those bits are reserved here.
    if pdpte & (rsvd | _PAGE_NX | 0x1E6):
        raise _reserved(paging, gva, 3, access)
    writable = user = executable = True
    table = pdpte & frame_mask
    for level in (2, 1):
        shift = 12 + 9 * (level - 1)
        entry = _entry(mem, table + 8 * ((gva >> shift) & 0x1FF), 8, level)
        if not entry & _PAGE_PRESENT:
            raise _not_present(paging, gva, level, access)
        if entry & rsvd:
            raise _reserved(paging, gva, level, access)
        writable &= bool(entry & _PAGE_RW)
        user &= bool(entry & _PAGE_USER)
        executable &= not (nx_enabled and entry & _PAGE_NX)
        if level == 1 or entry & _PAGE_PSE:
            size = 1 << shift
            if level == 2 and entry & (size - 1) & ~((1 << 13) - 1):
                raise _reserved(paging, gva, level, access)
            frame = entry & frame_mask & ~(size - 1)
            return Translation(gva, frame | (gva & (size - 1)), size, level, writable, user, executable)
        table = entry & frame_mask
    raise AssertionError("unreachable: level 1 always returns")


def _walk_32(mem: GuestMemory, paging: PagingState, gva: int, access: Access) -> Translation:
    pde = _entry(mem, (paging.cr3 & 0xFFFF_F000) + 4 * (gva >> 22), 4, 2)
    if not pde & _PAGE_PRESENT:
        raise _not_present(paging, gva, 2, access)
    writable = bool(pde & _PAGE_RW)
    user = bool(pde & _PAGE_USER)
    if pde & _PAGE_PSE and paging.cr4 & X86_CR4_PSE:
        # PSE-36: PDE bits 13..20 supply physical-address bits 32..39.
        frame = (pde & 0xFFC0_0000) | (((pde >> 13) & 0xFF) << 32)
        return Translation(gva, frame | (gva & 0x3F_FFFF), 1 << 22, 2, writable, user, True)
    pte = _entry(mem, (pde & 0xFFFF_F000) + 4 * ((gva >> 12) & 0x3FF), 4, 1)
    if not pte & _PAGE_PRESENT:
        raise _not_present(paging, gva, 1, access)
    writable &= bool(pte & _PAGE_RW)
    user &= bool(pte & _PAGE_USER)
    gpa = (pte & 0xFFFF_F000) | (gva & 0xFFF)
    return Translation(gva, gpa, PAGE_SIZE, 1, writable, user, True)


def _check_rights(paging: PagingState, tr: Translation, access: Access) -> None:
    """Raise the protection #PF the CPU would raise for this access, if any."""
    why = None
    if access.user:
        if not tr.user:
            why = "user access to a supervisor page"
        elif access.write and not tr.writable:
            why = "write to a read-only page"
        elif access.fetch and not tr.executable:
            why = "fetch from a no-execute page"
    else:
        if access.fetch:
            if not tr.executable:
                why = "fetch from a no-execute page"
            elif tr.user and paging.cr4 & X86_CR4_SMEP:
                why = "supervisor fetch from a user page (SMEP)"
        else:
            if tr.user and paging.cr4 & X86_CR4_SMAP and not access.ac:
                why = "supervisor access to a user page (SMAP)"
            elif access.write and not tr.writable and paging.cr0 & X86_CR0_WP:
                why = "write to a read-only page (CR0.WP)"
    if why is not None:
        code = _base_error_code(paging, access) | X86_PF_PROT
        raise PageFault(tr.gva, tr.level, code, why)


def gva_to_gpa(mem: GuestMemory, paging: PagingState, gva: int, **kwargs: int) -> int:
    """The GPA that `gva` maps to (no access-rights checks)."""
    return translate(mem, paging, gva, SUPERVISOR_PEEK, **kwargs).gpa


def _wrap(paging: PagingState) -> int:
    """Linear addresses wrap at 4 GiB outside long mode."""
    return (1 << 64) - 1 if paging.efer & EFER_LMA else 0xFFFF_FFFF


def translate_range(
    mem: GuestMemory,
    paging: PagingState,
    gva: int,
    size: int,
    access: Access = SUPERVISOR_PEEK,
    *,
    maxphyaddr: int = DEFAULT_MAXPHYADDR,
) -> list[tuple[int, int]]:
    """Translate every page `gva .. gva+size-1` touches; return (gpa, length) chunks.

    All pages are translated before the caller touches memory, so an access that
    faults on its second page has no side effects, as on the CPU.
    """
    chunks: list[tuple[int, int]] = []
    wrap = _wrap(paging)
    if paging.efer & EFER_LMA and size > 0:
        # The canonical check covers the whole access and comes before any paging fault.
        la57 = bool(paging.cr4 & X86_CR4_LA57)
        for end in (gva & wrap, (gva + size - 1) & wrap):
            if not is_canonical(end, la57):
                raise NonCanonicalAddress(end)
    done = 0
    while done < size:
        tr = translate(mem, paging, (gva + done) & wrap, access, maxphyaddr=maxphyaddr)
        length = min(size - done, tr.bytes_left_in_page)
        chunks.append((tr.gpa, length))
        done += length
    return chunks


def read_virt(
    mem: GuestMemory,
    paging: PagingState,
    gva: int,
    size: int,
    access: Access = SUPERVISOR_PEEK,
    *,
    maxphyaddr: int = DEFAULT_MAXPHYADDR,
) -> bytes:
    """Read `size` bytes at a guest-linear address, crossing page boundaries."""
    chunks = translate_range(mem, paging, gva, size, access, maxphyaddr=maxphyaddr)
    return b"".join(read_phys_checked(mem, gpa, n, "data") for gpa, n in chunks)

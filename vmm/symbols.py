"""Guest kernel symbols from a System.map: turn a code address into "func+0xoff/0xsize".

Used by failure reports (emulation assist, crashes) to say where the guest was. Only
text symbols (types t, T, w, W) are named; the others only mark where the text symbol
before them ends. The file is parsed on the first lookup, not on load, because most
runs never need it.
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
from collections.abc import Iterable

log = logging.getLogger(__name__)

# nm symbol types that name code: local/global text and weak symbols.
TEXT_SYMBOL_TYPES = frozenset("tTwW")


class Symbols:
    """Sorted text symbols with address-to-name lookup."""

    def __init__(self, lines: Iterable[str] | None = None, *, path: str | None = None) -> None:
        self._path = path
        self._lines = lines
        self._addrs: list[int] = []
        self._names: list[str | None] = []
        self._loaded = False
        self._lock = threading.Lock()

    @classmethod
    def load(cls, system_map_path: str | os.PathLike[str]) -> Symbols:
        """Remember a System.map; it is parsed lazily. Raises FileNotFoundError now if absent."""
        path = os.fspath(system_map_path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"System.map not found: {path}")
        return cls(path=path)

    @classmethod
    def from_lines(cls, lines: Iterable[str]) -> Symbols:
        """Symbols from System.map-format lines ("<hex address> <type> <name>")."""
        return cls(lines=lines)

    def _ensure_loaded(self) -> None:
        if self._loaded:
            return
        with self._lock:
            if self._loaded:
                return
            entries: dict[int, tuple[bool, bool, str]] = {}
            try:
                if self._path is not None:
                    with open(self._path, encoding="utf-8", errors="replace") as f:
                        self._parse(f, entries)
                elif self._lines is not None:
                    self._parse(self._lines, entries)
            except OSError as exc:
                log.warning("cannot read System.map %s: %s; no symbols", self._path, exc)
            ordered = sorted(entries.items())
            self._addrs = [addr for addr, _ in ordered]
            # Non-text symbols are kept (as None) only to end the text symbol before them.
            self._names = [name if is_text else None for _, (is_text, _, name) in ordered]
            self._lines = None
            self._loaded = True

    @staticmethod
    def _parse(lines: Iterable[str], entries: dict[int, tuple[bool, bool, str]]) -> None:
        for line in lines:
            fields = line.split()
            if len(fields) < 3 or len(fields[1]) != 1:
                continue
            try:
                addr = int(fields[0], 16)
            except ValueError:
                continue
            rank = (fields[1] in TEXT_SYMBOL_TYPES, fields[1].isupper(), fields[2])
            # Several names can share an address: prefer text, then global, then the first seen.
            known = entries.get(addr)
            if known is None or rank[:2] > known[:2]:
                entries[addr] = rank

    def __len__(self) -> int:
        """The number of text symbols."""
        self._ensure_loaded()
        return sum(1 for name in self._names if name is not None)

    def lookup(self, addr: int) -> str | None:
        """Return "name+0xoff/0xsize" for the text symbol containing addr, or None.

        A symbol's size runs to the next symbol of any type, so an address in data or
        past the end of text gives None; past the last symbol only an exact match counts.
        """
        self._ensure_loaded()
        i = bisect.bisect_right(self._addrs, addr) - 1
        if i < 0 or self._names[i] is None:
            return None
        start = self._addrs[i]
        if i + 1 < len(self._addrs):
            size = self._addrs[i + 1] - start
        elif addr == start:
            size = 0
        else:
            return None
        return f"{self._names[i]}+{addr - start:#x}/{size:#x}"

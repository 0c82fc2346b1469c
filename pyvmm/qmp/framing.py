"""Split a QMP byte stream into JSON messages, as QEMU's JSON streamer does.

QMP is not line-framed: a command may span lines and several may share a
line.  The splitter tracks bracket depth and string state only; parsing is
left to `json`.  A lexical error (an ASCII control character outside
tab/CR/LF, or byte 0xfe/0xff) discards the partial message, is reported,
and resets the splitter - the recovery the QMP spec tells clients to use;
so does nesting deeper than allowed (which also keeps `json` clear of its
recursion limit).  A message longer than the cap raises `MessageTooLong`:
the server ends that connection rather than buffer without bound.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_OPENERS = b"{["
_CLOSERS = b"}]"
_QUOTE = ord('"')
_BACKSLASH = ord("\\")

# Bytes never valid in QMP input: C0 controls other than \t \n \r, and the
# two bytes that cannot occur in UTF-8.
_BAD = rb"\x00-\x08\x0b\x0c\x0e-\x1f\xfe\xff"
_IN_STRING_SPECIAL = re.compile(rb'["\\\x00-\x1f\xfe\xff]')
_NESTED_SPECIAL = re.compile(rb'[{}\[\]"' + _BAD + rb"]")
_TOP_LEVEL_SPACE = re.compile(rb"[ \t\r\n]*")
_BARE_TOKEN_END = re.compile(rb'[ \t\r\n{}\[\]"' + _BAD + rb"]")
_BAD_BYTE = re.compile(rb"[" + _BAD + rb"]")


class MessageTooLong(Exception):
    """The peer sent a message beyond the size limit."""


@dataclass(frozen=True)
class LexicalError:
    """A reportable framing error; the splitter has already reset."""

    desc: str


def _show_byte(byte: int) -> str:
    return chr(byte) if 0x20 <= byte < 0x7F else f"\\x{byte:02x}"


class JsonStreamSplitter:
    """Feed bytes, get complete top-level JSON texts (or LexicalErrors)."""

    def __init__(self, max_message: int, max_depth: int) -> None:
        self.max_message = max_message
        self.max_depth = max_depth
        self._reset()

    def _reset(self) -> None:
        self._buf = bytearray()
        self._depth = 0
        self._in_string = False
        self._escape = False
        self._bare = False  # inside a top-level scalar such as 42 or true

    @property
    def pending(self) -> int:
        """Bytes of an unfinished message held."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes | LexicalError]:
        out: list[bytes | LexicalError] = []
        pos = 0
        end = len(data)
        while pos < end:
            if self._in_string:
                pos = self._scan_string(data, pos, out)
            elif self._bare:
                pos = self._scan_bare(data, pos, out)
            elif self._depth == 0:
                pos = self._scan_top(data, pos, out)
            else:
                pos = self._scan_nested(data, pos, out)
            if len(self._buf) > self.max_message:
                raise MessageTooLong(f"message exceeds {self.max_message} bytes")
        return out

    def _emit(self, out: list[bytes | LexicalError]) -> None:
        out.append(bytes(self._buf))
        self._reset()

    def _error(self, out: list[bytes | LexicalError], desc: str) -> None:
        out.append(LexicalError(f"JSON parse error, {desc}"))
        self._reset()

    def _scan_string(self, data: bytes, pos: int, out: list) -> int:
        if self._escape:
            byte = data[pos]
            if byte < 0x20 or _BAD_BYTE.match(data, pos):
                self._error(out, f"stray '{_show_byte(byte)}'")
                return pos + 1
            self._buf.append(byte)
            self._escape = False
            return pos + 1
        match = _IN_STRING_SPECIAL.search(data, pos)
        if match is None:
            self._buf += data[pos:]
            return len(data)
        at = match.start()
        self._buf += data[pos:at]
        byte = data[at]
        if byte == _QUOTE:
            self._buf.append(byte)
            self._in_string = False
            if self._depth == 0:
                self._emit(out)
        elif byte == _BACKSLASH:
            self._buf.append(byte)
            self._escape = True
        else:
            self._error(out, f"stray '{_show_byte(byte)}'")
        return at + 1

    def _scan_bare(self, data: bytes, pos: int, out: list) -> int:
        match = _BARE_TOKEN_END.search(data, pos)
        if match is None:
            self._buf += data[pos:]
            return len(data)
        self._buf += data[pos : match.start()]
        self._emit(out)
        return match.start()  # the delimiter is looked at again at top level

    def _scan_top(self, data: bytes, pos: int, out: list) -> int:
        pos = _TOP_LEVEL_SPACE.match(data, pos).end()
        if pos >= len(data):
            return pos
        byte = data[pos]
        if _BAD_BYTE.match(data, pos):
            self._error(out, f"stray '{_show_byte(byte)}'")
        elif byte in _OPENERS:
            self._buf.append(byte)
            self._depth = 1
        elif byte == _QUOTE:
            self._buf.append(byte)
            self._in_string = True
        elif byte in _CLOSERS:
            self._buf.append(byte)
            self._emit(out)  # unbalanced: json reports it
        else:
            self._bare = True
            return pos
        return pos + 1

    def _scan_nested(self, data: bytes, pos: int, out: list) -> int:
        match = _NESTED_SPECIAL.search(data, pos)
        if match is None:
            self._buf += data[pos:]
            return len(data)
        at = match.start()
        self._buf += data[pos:at]
        byte = data[at]
        if byte in _OPENERS:
            if self._depth >= self.max_depth:
                self._error(out, "nesting too deep")
                return at + 1
            self._depth += 1
            self._buf.append(byte)
        elif byte in _CLOSERS:
            self._buf.append(byte)
            self._depth -= 1
            if self._depth == 0:
                self._emit(out)
        elif byte == _QUOTE:
            self._buf.append(byte)
            self._in_string = True
        else:
            self._error(out, f"stray '{_show_byte(byte)}'")
        return at + 1

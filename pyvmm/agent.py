"""Host side of the pyvmm guest agent (guest_images/initramfs/agent.sh).

The agent is a busybox sh script on the guest's second UART (ttyS1); the VMM
(or QEMU, `-serial unix:PATH,server=on`) exposes that UART as a unix socket.
The line protocol:

    agent -> host   @@PYVMM-AGENT READY <version> <uptime>
    host  -> agent  @@REQ <id> <verb> [<args>]
    agent -> host   @@BEGIN <id>
                    <output bytes>
                    \n@@END <id> <exit-status>

The agent always sends a newline before @@END, so the output is exactly the
lines between the markers joined by newlines. Anything outside a frame
(echo before the agent set the tty raw, frames of requests we gave up on) is
counted and ignored. Every wait has a deadline: a lost or garbled reply
raises AgentError with what was seen, never hangs.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections import deque
from pathlib import Path

PROTOCOL_VERSION = 1
READY_MARK = b"@@PYVMM-AGENT READY"
BEGIN_MARK = b"@@BEGIN "
END_MARK = b"@@END "
END_LINE = re.compile(rb"^@@END (\S+) (-?\d+)$")
MAX_LINE_BYTES = 1 << 20
MAX_OUTPUT_BYTES = 16 << 20
RECV_BYTES = 65536
CONTEXT_LINES = 8  # how much of what was seen goes into an AgentError
CONNECT_RETRY_S = 0.05
# wait_ready pings at once, then after 5, 15, 35, 75, 135, 195... s: every
# ping queued while the guest boots is answered later, one by one.
FIRST_PING_INTERVAL_S = 5.0
MAX_PING_INTERVAL_S = 60.0
# Guest kernel work is interpreted under PVM: even builtin-only verbs take
# a fraction of a second, a fork-and-exec one to two seconds.
DEFAULT_TIMEOUT_S = 30.0
FORKING_TIMEOUT_S = 90.0  # verbs that exec programs (dmesg | tail)
KIB = 1024


class AgentError(Exception):
    """The agent did not answer, or answered something unparseable."""


def encode_command(command: str) -> str:
    """Escape a shell command for one request line: the agent decodes it
    with printf %b, which turns back exactly these three escapes."""
    if "\0" in command:
        raise ValueError("a shell command cannot contain NUL")
    return command.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")


def _check_word(name: str, value: str) -> str:
    if not value or any(c.isspace() for c in value):
        raise ValueError(f"{name} must be a non-empty string without whitespace: {value!r}")
    return value


def parse_meminfo(text: str) -> dict[str, int]:
    """/proc/meminfo -> {key: bytes}; unitless counts (HugePages_*) stay counts."""
    out: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        fields = rest.split()
        if not sep or not fields or not fields[0].isdigit():
            continue
        value = int(fields[0])
        if len(fields) > 1 and fields[1] == "kB":
            value *= KIB
        out[key.strip()] = value
    return out


MEMBLOCK_ATTR = re.compile(r"^/sys/devices/system/memory/(?:memory(\d+)/)?(\w+): ?(.*)$")


def parse_memblocks(text: str) -> list[dict]:
    """Output of the `memblocks` verb ("PATH: value" lines for
    block_size_bytes and each memoryN's state and valid_zones) -> one dict
    per memory block, sorted by index."""
    block_size = None
    attrs: dict[int, dict[str, str]] = {}
    for line in text.splitlines():
        m = MEMBLOCK_ATTR.match(line)
        if m is None:
            continue
        index, attr, value = m[1], m[2], m[3].strip()
        if index is None and attr == "block_size_bytes":
            try:
                block_size = int(value, 16)
            except ValueError:
                raise AgentError(f"memblocks: bad block size {value!r}") from None
        elif index is not None and attr in ("state", "valid_zones"):
            attrs.setdefault(int(index), {})[attr] = value
    if not block_size:
        raise AgentError(f"memblocks: no block_size_bytes in {text[:200]!r}")
    out = []
    for index in sorted(attrs):
        state = attrs[index].get("state", "")
        zones = attrs[index].get("valid_zones", "").split()
        online = state == "online"
        out.append({
            "index": index,
            "online": online,
            "state": state,
            # an online block reports its zone; an offline one the zones it may go to
            "zone": zones[0] if online and zones else "",
            "valid_zones": zones,
            "phys_start": index * block_size,
            "size": block_size,
        })
    return out


def parse_devices(text: str) -> list[dict]:
    """Output of the `devices` verb -> [{"bus", "name", <key=value fields>}]."""
    out = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) < 2 or fields[0] not in ("virtio", "vmbus"):
            continue
        dev = {"bus": fields[0], "name": fields[1]}
        for kv in fields[2:]:
            key, sep, value = kv.partition("=")
            if sep:
                dev[key] = value
        if dev.get("driver") == "-":
            dev["driver"] = None
        out.append(dev)
    return out


class Agent:
    """A connection to the guest agent. Thread-safe: one request at a time."""

    def __init__(self, sock_path: str | Path, connect_timeout: float = 10.0) -> None:
        deadline = time.monotonic() + connect_timeout
        last: OSError | None = None
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(str(sock_path))
                break
            except OSError as e:  # not there yet: the VMM may still be starting
                sock.close()
                last = e
                if time.monotonic() >= deadline:
                    raise AgentError(f"cannot connect to agent socket {sock_path}: {last}") from None
                time.sleep(CONNECT_RETRY_S)
        self._init(sock)

    @classmethod
    def from_socket(cls, sock: socket.socket) -> "Agent":
        """Wrap an already connected stream socket (tests, socketpair)."""
        self = cls.__new__(cls)
        self._init(sock)
        return self

    def _init(self, sock: socket.socket) -> None:
        self._sock: socket.socket | None = sock
        self._buf = bytearray()
        self._next_id = 1
        self._lock = threading.Lock()
        self._seen: deque[bytes] = deque(maxlen=CONTEXT_LINES)
        self.ready_version: int | None = None
        self.ready_uptime: float | None = None
        self.last_output = ""
        # counters: lines outside our frames, agent (re)starts seen
        self.stats = {"ignored_lines": 0, "ready": 0}

    # ------------------------------------------------------------ transport

    def _context(self) -> str:
        seen = [line[:200].decode(errors="replace") for line in self._seen]
        partial = bytes(self._buf[:200]).decode(errors="replace")
        return f"last lines {seen!r}, unterminated {partial!r}"

    def _fill_until_line(self, until: float, waiting_for: str) -> bool:
        """Receive until a whole line is buffered (True) or `until` passes
        (False). A closed or failed connection raises AgentError."""
        if self._sock is None:
            raise AgentError("agent connection is closed")
        while b"\n" not in self._buf:
            if len(self._buf) > MAX_LINE_BYTES:
                raise AgentError(f"garbled reply: a line longer than {MAX_LINE_BYTES} bytes "
                                 f"while waiting for {waiting_for}")
            remaining = until - time.monotonic()
            if remaining <= 0:
                return False
            self._sock.settimeout(remaining)
            try:
                data = self._sock.recv(RECV_BYTES)
            except socket.timeout:
                return False
            except OSError as e:
                raise AgentError(f"agent connection failed ({e}) waiting for {waiting_for}") from None
            if not data:
                raise AgentError(f"agent connection closed while waiting for {waiting_for}; "
                                 f"{self._context()}")
            self._buf += data
        return True

    def _pop_line(self) -> bytes:
        nl = self._buf.index(b"\n")
        line = bytes(self._buf[:nl])
        del self._buf[:nl + 1]
        self._seen.append(line)
        return line

    def _readline(self, deadline: float, waiting_for: str) -> bytes:
        """The next line without its newline; AgentError at the deadline."""
        if not self._fill_until_line(deadline, waiting_for):
            raise AgentError(f"timed out waiting for {waiting_for}; {self._context()}")
        return self._pop_line()

    def _send(self, line: str) -> None:
        if self._sock is None:
            raise AgentError("agent connection is closed")
        data = line.encode()
        if b"\n" in data[:-1]:
            raise ValueError("a request must be one line")
        try:
            self._sock.settimeout(DEFAULT_TIMEOUT_S)
            self._sock.sendall(data)
        except OSError as e:
            raise AgentError(f"cannot send to agent: {e}") from None

    def _note_ready(self, line: bytes) -> None:
        fields = line[len(READY_MARK):].split()
        self.stats["ready"] += 1
        try:
            self.ready_version = int(fields[0])
            self.ready_uptime = float(fields[1]) if len(fields) > 1 else None
        except (IndexError, ValueError):
            self.ready_version = None

    def _request_line(self, verb: str, args: str) -> tuple[int, str]:
        rid = self._next_id
        self._next_id += 1
        return rid, f"@@REQ {rid} {verb}" + (f" {args}" if args else "") + "\n"

    def _await_frame(self, rid: int, deadline: float, what: str) -> tuple[int, bytes]:
        begin = BEGIN_MARK + str(rid).encode()
        while True:
            line = self._readline(deadline, f"the start of the reply to {what}").rstrip(b"\r")
            if line == begin:
                break
            if line.startswith(READY_MARK):
                self._note_ready(line)
            else:
                self.stats["ignored_lines"] += 1
        lines: list[bytes] = []
        size = 0
        while True:
            line = self._readline(deadline, f"the end of the reply to {what}")
            if line.startswith(END_MARK):
                m = END_LINE.match(line.rstrip(b"\r"))
                if m is None or m[1] != str(rid).encode():
                    raise AgentError(f"garbled reply to {what}: unexpected {line[:100]!r}")
                return int(m[2]), b"\n".join(lines)
            if line.startswith(READY_MARK) or line.startswith(BEGIN_MARK):
                raise AgentError(f"agent restarted or lost sync during {what}: {line[:100]!r}")
            size += len(line) + 1
            if size > MAX_OUTPUT_BYTES:
                raise AgentError(f"reply to {what} exceeds {MAX_OUTPUT_BYTES} bytes")
            lines.append(line)

    def request(self, verb: str, args: str = "", timeout: float = DEFAULT_TIMEOUT_S
                ) -> tuple[int, str]:
        """Send one request and return (exit status, output)."""
        _check_word("verb", verb)
        with self._lock:
            rid, line = self._request_line(verb, args)
            deadline = time.monotonic() + timeout
            self._send(line)
            status, out = self._await_frame(rid, deadline, f"{verb!r} (request {rid})")
        self.last_output = out.decode(errors="replace")
        return status, self.last_output

    def _checked(self, verb: str, args: str = "", timeout: float = DEFAULT_TIMEOUT_S) -> str:
        status, out = self.request(verb, args, timeout)
        if status != 0:
            raise AgentError(f"agent verb {verb!r} failed with status {status}: {out.strip()[:500]}")
        return out

    # ------------------------------------------------------------- the API

    def wait_ready(self, timeout: float, ping_interval: float = FIRST_PING_INTERVAL_S) -> None:
        """Wait until the agent answers. Returns on its READY line, or on the
        reply to a ping: READY is lost when the guest printed it before we
        connected, so a ping goes out at once and again with a doubling
        interval (sparingly: pings queued during boot are all answered
        later, and their frames are then skipped as noise)."""
        with self._lock:
            deadline = time.monotonic() + timeout
            pings: set[bytes] = set()
            next_ping = time.monotonic()
            interval = ping_interval
            while True:
                now = time.monotonic()
                if now >= deadline:
                    raise AgentError(f"agent not ready after {timeout} s; {self._context()}")
                if now >= next_ping:
                    rid, line = self._request_line("ping", "")
                    self._send(line)
                    pings.add(BEGIN_MARK + str(rid).encode())
                    next_ping = now + interval
                    interval = min(interval * 2, MAX_PING_INTERVAL_S)
                if not self._fill_until_line(min(deadline, next_ping), "the agent to start"):
                    continue
                line = self._pop_line().rstrip(b"\r")
                if line.startswith(READY_MARK):
                    self._note_ready(line)
                    return
                if line in pings:
                    return
                self.stats["ignored_lines"] += 1

    def ping(self, timeout: float = DEFAULT_TIMEOUT_S) -> float:
        """Round-trip time of a no-op request, in seconds."""
        t0 = time.monotonic()
        out = self._checked("ping", timeout=timeout)
        if out.strip() != "pong":
            raise AgentError(f"unexpected ping reply {out[:100]!r}")
        return time.monotonic() - t0

    def run(self, command: str, timeout: float = 60) -> tuple[int, str]:
        """Evaluate a shell command in the agent's shell (no extra fork for
        builtins); returns (exit status, stdout+stderr). Note that `cd` and
        variable assignments persist, and `exit` restarts the agent."""
        return self.request("run", encode_command(command), timeout)

    def meminfo(self, timeout: float = DEFAULT_TIMEOUT_S) -> dict[str, int]:
        info = parse_meminfo(self._checked("meminfo", timeout=timeout))
        if "MemTotal" not in info:
            raise AgentError(f"meminfo reply lacks MemTotal: {self.last_output[:200]!r}")
        return info

    def memory_blocks(self, timeout: float = DEFAULT_TIMEOUT_S) -> list[dict]:
        """[{"index", "online", "state", "zone", "valid_zones", "phys_start",
        "size"}] for /sys/devices/system/memory/memoryN, sorted by index."""
        return parse_memblocks(self._checked("memblocks", timeout=timeout))

    def devices(self, timeout: float = DEFAULT_TIMEOUT_S) -> list[dict]:
        """virtio devices ({"bus": "virtio", "name", "device", "vendor",
        "driver"}) and VMBus devices ({"bus": "vmbus", "name", "class_id",
        "device_id", "driver"}); driver is None when unbound."""
        return parse_devices(self._checked("devices", timeout=timeout))

    def dmesg(self, lines: int = 50, timeout: float = FORKING_TIMEOUT_S) -> str:
        if not isinstance(lines, int) or lines <= 0:
            raise ValueError(f"lines must be a positive int: {lines!r}")
        return self._checked("dmesg", str(lines), timeout)

    def uptime(self, timeout: float = DEFAULT_TIMEOUT_S) -> float:
        out = self._checked("uptime", timeout=timeout)
        try:
            return float(out.split()[0])
        except (IndexError, ValueError):
            raise AgentError(f"unparseable uptime {out[:100]!r}") from None

    def pattern_fill(self, path: str, size: int, seed: int, timeout: float = 600) -> None:
        """Write `size` bytes of the seeded pattern to `path` (on tmpfs)."""
        if size <= 0 or seed < 0:
            raise ValueError("size must be > 0 and seed >= 0")
        out = self._checked("pattern-fill", f"{_check_word('path', path)} {int(size)} {int(seed)}",
                            timeout)
        if out.split()[:2] != ["filled", str(size)]:
            raise AgentError(f"pattern-fill: unexpected reply {out[:200]!r}")

    def pattern_verify(self, path: str, seed: int, timeout: float = 600) -> bool:
        """True if the file still holds the pattern; False on a mismatch
        (details in `last_output`); AgentError if it cannot be read."""
        status, out = self.request("pattern-verify", f"{_check_word('path', path)} {int(seed)}",
                                   timeout)
        word = out.split()[:1]
        if status == 0 and word == ["ok"]:
            return True
        if status == 1 and word == ["mismatch"]:
            return False
        raise AgentError(f"pattern-verify failed (status {status}): {out.strip()[:200]}")

    def pattern_free(self, path: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self._checked("pattern-free", _check_word("path", path), timeout)

    def poweroff(self) -> None:
        """Ask the guest to power off; does not wait (the VM just ends)."""
        with self._lock:
            self._send(self._request_line("poweroff", "")[1])

    def reboot(self) -> None:
        with self._lock:
            self._send(self._request_line("reboot", "")[1])

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "Agent":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

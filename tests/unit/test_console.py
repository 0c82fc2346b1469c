"""Tests for devices.console: the terminal's escape keys and raw mode, and the unix socket port."""

from __future__ import annotations

import io
import os
import signal
import socket
import stat
import termios
import threading
import time
from pathlib import Path

import pytest

from devices import console
from devices.console import (
    ESCAPE_HELP_TEXT,
    EscapeCommand,
    EscapeFilter,
    HostTerminal,
    UnixSocketPort,
)

TIMEOUT = 5.0


class Collector:
    """A feed callback that lets a test wait for bytes."""

    def __init__(self) -> None:
        self.data = bytearray()
        self._cond = threading.Condition()

    def __call__(self, data: bytes) -> None:
        with self._cond:
            self.data += data
            self._cond.notify_all()

    def wait_for(self, expected: bytes, timeout: float = TIMEOUT) -> bytes:
        with self._cond:
            self._cond.wait_for(lambda: len(self.data) >= len(expected), timeout)
            return bytes(self.data)


def wait_until(predicate, timeout: float = TIMEOUT) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.005)
    return predicate()


# ---- escape keys ---------------------------------------------------------

def test_escape_filter_plain_bytes_pass() -> None:
    assert EscapeFilter().process(b"ls -l\r") == [b"ls -l\r"]


def test_escape_filter_commands_in_order() -> None:
    f = EscapeFilter()
    items = f.process(b"ab\x01hcd\x01xef")
    assert items == [b"ab", EscapeCommand.HELP, b"cd", EscapeCommand.QUIT, b"ef"]


def test_escape_filter_literal_ctrl_a_and_unknown_keys() -> None:
    f = EscapeFilter()
    assert f.process(b"\x01\x01") == [b"\x01"]
    assert f.process(b"\x01e") == [b"\x01e"], "unknown escape keys pass through with the Ctrl-A"
    assert f.process(b"\x01X") == [EscapeCommand.QUIT]


def test_escape_filter_split_across_reads() -> None:
    f = EscapeFilter()
    assert f.process(b"abc\x01") == [b"abc"]
    assert f.process(b"x") == [EscapeCommand.QUIT]
    assert f.process(b"\x01") == []
    assert f.process(b"\x01z") == [b"\x01z"]


# ---- HostTerminal with a pipe (tests, CI) ------------------------------------

def test_pipe_stdin_forwards_bytes_untouched_and_never_uses_termios(monkeypatch) -> None:
    def forbidden(*args):
        raise AssertionError("termios used on a non-tty")

    monkeypatch.setattr(termios, "tcgetattr", forbidden)
    monkeypatch.setattr(termios, "tcsetattr", forbidden)
    r, w = os.pipe()
    quits = []
    got = Collector()
    term = HostTerminal(lambda: quits.append(1), stdin=r, stdout=io.BytesIO())
    try:
        term.start(got)
        assert not term.is_raw
        payload = b"echo hi\n\x01x\x01\x01 done"
        os.write(w, payload)
        assert got.wait_for(payload) == payload
        os.close(w)
        w = -1
        assert wait_until(lambda: not term._thread.is_alive()), "EOF ends the reader"
        assert quits == []
    finally:
        term.close()
        os.close(r)
        if w >= 0:
            os.close(w)


def test_pipe_stdin_with_escapes_forced_on() -> None:
    r, w = os.pipe()
    quits = []
    got = Collector()
    out = io.BytesIO()
    term = HostTerminal(lambda: quits.append(1), stdin=r, stdout=out, escapes=True)
    try:
        term.start(got)
        os.write(w, b"a\x01\x01b\x01hc")
        assert got.wait_for(b"a\x01bc") == b"a\x01bc"
        assert ESCAPE_HELP_TEXT in out.getvalue()
        os.write(w, b"d\x01xAFTER")
        assert wait_until(lambda: quits == [1])
        assert got.wait_for(b"a\x01bcd", 0.2) == b"a\x01bcd", "input after quit is not forwarded"
    finally:
        term.close()
        os.close(r)
        os.close(w)


def test_output_is_flushed_per_write_and_failures_are_contained() -> None:
    class Writer(io.BytesIO):
        flushes = 0

        def flush(self) -> None:
            Writer.flushes += 1
            super().flush()

    out = Writer()
    term = HostTerminal(lambda: None, stdin=None, stdout=out)
    term.write(b"one")
    term.write(b"two")
    assert out.getvalue() == b"onetwo"
    assert Writer.flushes == 2

    class Broken:
        def write(self, data: bytes) -> int:
            raise BrokenPipeError("closed")

        def flush(self) -> None:
            pass

    term = HostTerminal(lambda: None, stdin=None, stdout=Broken())  # type: ignore[arg-type]
    term.write(b"x")
    term.write(b"y")
    assert term.output_errors == 1, "after the first failure output is switched off"


# ---- HostTerminal with a real tty (a pty) ---------------------------------------

@pytest.fixture
def pty_pair():
    master, slave = os.openpty()
    yield master, slave
    os.close(master)
    os.close(slave)


def _is_cooked(fd: int) -> bool:
    lflag = termios.tcgetattr(fd)[3]
    return bool(lflag & termios.ICANON and lflag & termios.ECHO and lflag & termios.ISIG)


def test_tty_raw_mode_escapes_and_restore(pty_pair) -> None:
    master, slave = pty_pair
    before = termios.tcgetattr(slave)
    assert _is_cooked(slave)
    quits = []
    got = Collector()
    out = io.BytesIO()
    with HostTerminal(lambda: quits.append(1), stdin=slave, stdout=out,
                      handle_signals=False) as term:
        term.start(got)
        assert term.is_raw
        iflag, oflag, _, lflag = termios.tcgetattr(slave)[:4]
        assert not lflag & (termios.ICANON | termios.ECHO | termios.ISIG)
        assert not iflag & (termios.ICRNL | termios.IXON)
        assert oflag & termios.OPOST, "output post-processing stays on"
        os.write(master, b"\x03\r\x01\x01")           # Ctrl-C goes to the guest, CR stays CR
        assert got.wait_for(b"\x03\r\x01") == b"\x03\r\x01"
        os.write(master, b"\x01h")
        assert wait_until(lambda: ESCAPE_HELP_TEXT in out.getvalue())
        os.write(master, b"\x01x")
        assert wait_until(lambda: quits == [1])
    assert not term.is_raw
    assert termios.tcgetattr(slave) == before
    assert bytes(got.data) == b"\x03\r\x01"


def test_tty_restored_when_the_body_raises(pty_pair) -> None:
    master, slave = pty_pair
    before = termios.tcgetattr(slave)
    with pytest.raises(RuntimeError):
        with HostTerminal(lambda: None, stdin=slave, stdout=io.BytesIO(),
                          handle_signals=False) as term:
            term.start(lambda data: None)
            assert not _is_cooked(slave)
            raise RuntimeError("boom")
    assert termios.tcgetattr(slave) == before


def test_tty_restored_by_atexit_hook(pty_pair, monkeypatch) -> None:
    master, slave = pty_pair
    before = termios.tcgetattr(slave)
    hooks = []
    monkeypatch.setattr(console.atexit, "register", hooks.append)
    monkeypatch.setattr(console.atexit, "unregister", lambda fn: None)
    term = HostTerminal(lambda: None, stdin=slave, stdout=io.BytesIO(), handle_signals=False)
    term.start(lambda data: None)
    try:
        assert len(hooks) == 1 and not _is_cooked(slave)
        hooks[0]()                                  # what the interpreter runs at exit
        assert termios.tcgetattr(slave) == before
    finally:
        term.close()


def test_tty_restored_on_sigterm_and_previous_handler_chained(pty_pair) -> None:
    master, slave = pty_pair
    before = termios.tcgetattr(slave)
    seen = []

    def previous(signum, frame) -> None:
        seen.append((signum, termios.tcgetattr(slave) == before))

    original = signal.signal(signal.SIGTERM, previous)
    try:
        term = HostTerminal(lambda: None, stdin=slave, stdout=io.BytesIO())
        term.start(lambda data: None)
        assert not _is_cooked(slave)
        os.kill(os.getpid(), signal.SIGTERM)
        assert wait_until(lambda: seen)
        assert seen == [(signal.SIGTERM, True)], "terminal restored before the old handler ran"
        term.close()
        assert signal.getsignal(signal.SIGTERM) is previous, "our handler is removed on close"
    finally:
        signal.signal(signal.SIGTERM, original)


# ---- UnixSocketPort ----------------------------------------------------------

def connect(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(TIMEOUT)
    sock.connect(path)
    return sock


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return bytes(buf)


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "agent.sock")


def test_socket_mode_and_late_client_gets_buffered_ready(sock_path: str) -> None:
    got = Collector()
    with UnixSocketPort(sock_path) as port:
        port.start(got)
        assert stat.S_ISSOCK(os.stat(sock_path).st_mode)
        assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o600
        port.write(b"READY\n")                  # the guest speaks before anyone listens
        time.sleep(0.05)
        client = connect(sock_path)
        assert recv_exactly(client, 6) == b"READY\n"
        client.sendall(b"ping\n")
        assert got.wait_for(b"ping\n") == b"ping\n"
        port.write(b"pong\n")
        assert recv_exactly(client, 5) == b"pong\n"
        client.close()
    assert not os.path.exists(sock_path), "close removes the socket file"


def test_disconnect_and_reconnect(sock_path: str) -> None:
    got = Collector()
    with UnixSocketPort(sock_path) as port:
        port.start(got)
        first = connect(sock_path)
        port.write(b"one")
        assert recv_exactly(first, 3) == b"one"
        first.close()
        assert wait_until(lambda: not port.connected)
        port.write(b"while away")                # kept for the next client
        second = connect(sock_path)
        assert recv_exactly(second, 10) == b"while away"
        second.sendall(b"back")
        assert got.wait_for(b"back") == b"back"
        assert port.connections == 2
        second.close()


def test_one_client_at_a_time(sock_path: str) -> None:
    with UnixSocketPort(sock_path) as port:
        port.start(lambda data: None)
        first = connect(sock_path)
        assert wait_until(lambda: port.connected)
        second = connect(sock_path)             # waits in the listen backlog
        port.write(b"A")
        assert recv_exactly(first, 1) == b"A"
        second.settimeout(0.2)
        with pytest.raises(socket.timeout):
            second.recv(1)
        first.close()
        assert wait_until(lambda: port.connections == 2)
        port.write(b"B")
        second.settimeout(TIMEOUT)
        assert recv_exactly(second, 1) == b"B"
        second.close()


def test_output_buffer_is_bounded_oldest_dropped(sock_path: str) -> None:
    with UnixSocketPort(sock_path, buffer_limit=8) as port:
        port.start(lambda data: None)
        port.write(b"0123456789")
        port.write(b"abcdefghij")
        assert port.dropped == 12
        client = connect(sock_path)
        assert recv_exactly(client, 8) == b"cdefghij"
        client.close()


def test_close_hands_over_pending_output_and_ends_the_client(sock_path: str) -> None:
    port = UnixSocketPort(sock_path)
    port.start(lambda data: None)
    client = connect(sock_path)
    assert wait_until(lambda: port.connected)
    port.write(b"bye")
    port.close()
    assert recv_exactly(client, 16) == b"bye", "the client sees the last bytes, then EOF"
    client.close()
    assert not os.path.exists(sock_path)
    port.close()                                # idempotent


def test_stale_socket_replaced_but_live_socket_and_files_refused(tmp_path: Path) -> None:
    stale = str(tmp_path / "stale.sock")
    leftover = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    leftover.bind(stale)
    leftover.close()                            # a socket file nobody listens on
    with UnixSocketPort(stale) as port:
        port.start(lambda data: None)
        client = connect(stale)
        port.write(b"ok")
        assert recv_exactly(client, 2) == b"ok"
        client.close()
        with pytest.raises(FileExistsError):
            UnixSocketPort(stale).start(lambda data: None)
    regular = tmp_path / "notes.txt"
    regular.write_text("keep me")
    with pytest.raises(FileExistsError):
        UnixSocketPort(str(regular)).start(lambda data: None)
    assert regular.read_text() == "keep me"


def test_path_too_long_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too long"):
        UnixSocketPort(str(tmp_path / ("x" * 120)))


def test_feed_failure_does_not_kill_the_port(sock_path: str) -> None:
    calls = []

    def feed(data: bytes) -> None:
        calls.append(data)
        raise RuntimeError("uart gone")

    with UnixSocketPort(sock_path) as port:
        port.start(feed)
        client = connect(sock_path)
        client.sendall(b"a")
        assert wait_until(lambda: calls == [b"a"])
        port.write(b"still here")
        assert recv_exactly(client, 10) == b"still here"
        client.close()

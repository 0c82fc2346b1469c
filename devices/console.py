"""Host ends of the UARTs: the user's terminal and a unix socket.

Both have the same shape: ``write(data)`` is the UART's output callback (called
on a vCPU thread, so it must be cheap and must not raise), and ``start(feed)``
begins forwarding host input to the UART's ``feed`` from a thread of its own.

``HostTerminal`` puts a tty stdin into raw mode and always puts it back (on
``close``, at interpreter exit, and on SIGTERM/SIGHUP). Keyboard escapes, all
after Ctrl-A: ``x`` quits, ``h`` prints help, Ctrl-A sends a literal Ctrl-A.
When stdin is not a tty it forwards bytes untouched and never calls termios.

``UnixSocketPort`` serves ``--serial1 unix:PATH``: one client at a time, mode
0600, and guest output produced while no client is connected is kept (bounded,
oldest dropped first) so a late client still sees the agent's READY line.
"""

from __future__ import annotations

import atexit
import enum
import logging
import os
import select
import selectors
import signal
import socket
import stat
import sys
import termios
import threading
from types import FrameType
from typing import BinaryIO, Callable, Union

log = logging.getLogger(__name__)

Feed = Callable[[bytes], None]

CTRL_A = 0x01
ESCAPE_QUIT = frozenset(b"xX")
ESCAPE_HELP = frozenset(b"hH?")
ESCAPE_HELP_TEXT = (
    b"\r\n"
    b"pyvmm console escapes (press Ctrl-A, then):\r\n"
    b"  x       quit pyvmm (stops the VM)\r\n"
    b"  h       this help\r\n"
    b"  Ctrl-A  send Ctrl-A to the guest\r\n"
)
_READ_CHUNK = 4096
# Signals after which the terminal must not be left raw. SIGINT and SIGQUIT
# cannot come from a raw tty, and SIGKILL cannot be caught.
_RESTORE_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class EscapeCommand(enum.Enum):
    QUIT = "quit"
    HELP = "help"


class EscapeFilter:
    """Splits a keystroke stream into guest bytes and escape commands.

    The state survives across calls, so Ctrl-A at the end of one read and the
    command key at the start of the next still form an escape. A key after
    Ctrl-A that is not a command is passed on together with the Ctrl-A (Ctrl-A
    is "start of line" in shells; swallowing it would surprise).
    """

    def __init__(self, escape: int = CTRL_A) -> None:
        self._escape = escape
        self._armed = False

    def process(self, data: bytes) -> list[Union[bytes, EscapeCommand]]:
        """Return, in order, runs of bytes for the guest and the commands between them."""
        out: list[Union[bytes, EscapeCommand]] = []
        run = bytearray()
        for key in data:
            if self._armed:
                self._armed = False
                if key == self._escape:
                    run.append(key)
                    continue
                if key in ESCAPE_QUIT or key in ESCAPE_HELP:
                    if run:
                        out.append(bytes(run))
                        run.clear()
                    out.append(EscapeCommand.QUIT if key in ESCAPE_QUIT else EscapeCommand.HELP)
                    continue
                run.append(self._escape)
                run.append(key)
            elif key == self._escape:
                self._armed = True
            else:
                run.append(key)
        if run:
            out.append(bytes(run))
        return out


def _raw_attributes(attrs: list) -> list:
    """Terminal attributes for a raw keyboard: no echo, no line editing, no signals.

    Output post-processing (OPOST) stays on: kernel printk and early guest
    output may send a bare LF, which should still start a new line.
    """
    iflag, oflag, cflag, lflag, ispeed, ospeed, cc = attrs
    iflag &= ~(termios.BRKINT | termios.ICRNL | termios.INLCR | termios.IGNCR
               | termios.INPCK | termios.ISTRIP | termios.IXON | termios.PARMRK)
    lflag &= ~(termios.ECHO | termios.ECHONL | termios.ICANON | termios.IEXTEN | termios.ISIG)
    cflag = (cflag & ~(termios.CSIZE | termios.PARENB)) | termios.CS8
    cc = list(cc)
    cc[termios.VMIN] = 1
    cc[termios.VTIME] = 0
    return [iflag, oflag, cflag, lflag, ispeed, ospeed, cc]


def _fileno(stream: Union[int, object, None]) -> int | None:
    if stream is None or isinstance(stream, int):
        return stream
    try:
        return stream.fileno()  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return None


class HostTerminal:
    """The user's terminal as the console UART's host end."""

    def __init__(
        self,
        on_quit: Callable[[], None],
        *,
        stdin: Union[int, BinaryIO, None] = None,
        stdout: BinaryIO | None = None,
        escapes: bool | None = None,
        handle_signals: bool = True,
    ) -> None:
        """``stdin``/``stdout`` default to the process's; ``escapes`` defaults to "stdin is a tty"."""
        self._on_quit = on_quit
        self._in_fd = _fileno(sys.stdin if stdin is None else stdin)
        self._is_tty = self._in_fd is not None and os.isatty(self._in_fd)
        self._escapes = self._is_tty if escapes is None else escapes
        self._filter = EscapeFilter()
        self._out = stdout if stdout is not None else getattr(sys.stdout, "buffer", None)
        self._out_lock = threading.Lock()
        self._handle_signals = handle_signals
        self._saved_attrs: list | None = None
        self._saved_handlers: dict[int, object] = {}
        self._feed: Feed | None = None
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._quit_called = False
        self.output_errors = 0
        self.input_bytes = 0

    @property
    def is_raw(self) -> bool:
        """True while the host tty is in raw mode."""
        return self._saved_attrs is not None

    # ---- output (vCPU thread) -------------------------------------------

    def write(self, data: bytes) -> None:
        """Guest output: written and flushed at once. A broken stdout is counted, not raised."""
        with self._out_lock:
            out = self._out
            if out is None:
                return
            try:
                out.write(data)
                out.flush()
            except (OSError, ValueError) as exc:
                # A closed pipe or file: stop writing, keep the VM running.
                self.output_errors += 1
                self._out = None
                log.warning("console output stopped: %s", exc)

    # ---- input ----------------------------------------------------------

    def start(self, feed: Feed) -> None:
        """Enter raw mode (tty only) and forward stdin to ``feed`` from a thread."""
        if self._thread is not None:
            raise RuntimeError("HostTerminal already started")
        self._feed = feed
        if self._in_fd is None:
            return
        if self._is_tty:
            self._enter_raw()
        self._wake_r, self._wake_w = os.pipe()
        self._thread = threading.Thread(target=self._read_loop, name="console-stdin", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop reading and restore the terminal. Idempotent."""
        thread, self._thread = self._thread, None
        if thread is not None:
            try:
                os.write(self._wake_w, b"\0")
            except OSError:
                pass
            if thread is not threading.current_thread():
                thread.join()
            os.close(self._wake_r)
            os.close(self._wake_w)
            self._wake_r = self._wake_w = -1
        self.restore_terminal()
        self._uninstall_signal_handlers()

    def __enter__(self) -> "HostTerminal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _read_loop(self) -> None:
        fd, wake = self._in_fd, self._wake_r
        assert fd is not None
        while True:
            try:
                ready, _, _ = select.select([fd, wake], [], [])
            except InterruptedError:
                continue
            except (OSError, ValueError) as exc:
                log.warning("console input stopped: %s", exc)
                return
            if wake in ready:
                return
            try:
                chunk = os.read(fd, _READ_CHUNK)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:      # e.g. EIO when the tty hangs up
                log.warning("console input stopped: %s", exc)
                return
            if not chunk:
                return                  # EOF: no more input, the VM keeps running
            self.input_bytes += len(chunk)
            if not self._handle_input(chunk):
                return

    def _handle_input(self, chunk: bytes) -> bool:
        """Forward one read; False once the user asked to quit."""
        items: list = self._filter.process(chunk) if self._escapes else [chunk]
        for item in items:
            if item is EscapeCommand.QUIT:
                self._quit()
                return False
            if item is EscapeCommand.HELP:
                self.write(ESCAPE_HELP_TEXT)
                continue
            try:
                self._feed(item)  # type: ignore[misc]
            except Exception:
                log.exception("console: feeding input to the UART failed")
        return True

    def _quit(self) -> None:
        if self._quit_called:
            return
        self._quit_called = True
        try:
            self._on_quit()
        except Exception:
            log.exception("console: quit callback failed")

    # ---- terminal mode --------------------------------------------------

    def _enter_raw(self) -> None:
        fd = self._in_fd
        assert fd is not None
        attrs = termios.tcgetattr(fd)
        termios.tcsetattr(fd, termios.TCSAFLUSH, _raw_attributes(attrs))
        self._saved_attrs = attrs
        atexit.register(self.restore_terminal)
        if self._handle_signals:
            self._install_signal_handlers()

    def restore_terminal(self) -> None:
        """Put the tty back as it was. Idempotent, and safe to call from a signal handler."""
        attrs, self._saved_attrs = self._saved_attrs, None
        if attrs is None:
            return
        atexit.unregister(self.restore_terminal)
        try:
            # TCSADRAIN: let queued guest output reach the screen first.
            termios.tcsetattr(self._in_fd, termios.TCSADRAIN, attrs)
        except (termios.error, OSError) as exc:
            log.warning("could not restore the terminal: %s", exc)

    def _install_signal_handlers(self) -> None:
        # Python only lets the main thread set handlers.
        if threading.current_thread() is not threading.main_thread():
            return
        for signum in _RESTORE_SIGNALS:
            previous = signal.getsignal(signum)
            if previous is signal.SIG_IGN or previous is None:
                continue                # an ignored signal cannot end us
            self._saved_handlers[signum] = previous
            signal.signal(signum, self._on_signal)

    def _uninstall_signal_handlers(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        handlers, self._saved_handlers = self._saved_handlers, {}
        for signum, previous in handlers.items():
            if signal.getsignal(signum) == self._on_signal:
                signal.signal(signum, previous)  # type: ignore[arg-type]

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.restore_terminal()
        previous = self._saved_handlers.get(signum, signal.SIG_DFL)
        if callable(previous):
            previous(signum, frame)
            return
        # The default action (terminate): re-deliver with the default handler
        # so the exit status still says "killed by signal".
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)


class UnixSocketPort:
    """A UART's host end served on a unix stream socket, one client at a time."""

    def __init__(self, path: Union[str, os.PathLike], *, buffer_limit: int = 64 * 1024) -> None:
        self.path = os.fspath(path)
        if len(os.fsencode(self.path)) >= 108:      # sizeof(sun_path) on Linux
            raise ValueError(f"unix socket path too long (max 107 bytes): {self.path!r}")
        if buffer_limit < 1:
            raise ValueError("buffer_limit must be positive")
        self._limit = buffer_limit
        self._lock = threading.Lock()
        self._pending = bytearray()     # guest output not yet sent to a client
        self._client: socket.socket | None = None
        self._listener: socket.socket | None = None
        self._inode: tuple[int, int] | None = None
        self._feed: Feed | None = None
        self._thread: threading.Thread | None = None
        self._wake_r = self._wake_w = -1
        self._closing = False
        self.dropped = 0                # output bytes lost to the buffer bound
        self.connections = 0            # clients accepted so far
        self.input_bytes = 0
        self.output_bytes = 0

    @property
    def connected(self) -> bool:
        return self._client is not None

    def __enter__(self) -> "UnixSocketPort":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- output (vCPU thread): never blocks on the client ----------------

    def write(self, data: bytes) -> None:
        """Guest output: queued for the client (or kept until one connects)."""
        with self._lock:
            pending = self._pending
            was_empty = not pending
            pending += data
            excess = len(pending) - self._limit
            if excess > 0:
                del pending[:excess]
                self.dropped += excess
            if was_empty and self._client is not None:
                self._wake()

    # ---- lifecycle --------------------------------------------------------

    def start(self, feed: Feed) -> None:
        """Create the socket (mode 0600) and serve it from a thread."""
        if self._thread is not None:
            raise RuntimeError("UnixSocketPort already started")
        self._feed = feed
        self._remove_stale_socket()
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Linux creates the socket file with the socket inode's mode, so
            # setting it before bind() leaves no window with a looser mode.
            os.fchmod(listener.fileno(), 0o600)
            listener.bind(self.path)
            os.chmod(self.path, 0o600)
            st = os.stat(self.path)
            self._inode = (st.st_dev, st.st_ino)
            listener.listen(1)
            listener.setblocking(False)
        except BaseException:
            listener.close()
            raise
        self._listener = listener
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._serve, name=f"unix-port:{self.path}",
                                        daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop serving, hand the client what output can be sent, remove the socket file."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._closing = True
        self._wake()
        thread.join()
        os.close(self._wake_r)
        os.close(self._wake_w)
        self._wake_r = self._wake_w = -1
        self._remove_own_socket()

    def _remove_stale_socket(self) -> None:
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{self.path} exists and is not a socket; not replacing it")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(self.path)
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(self.path)        # left behind by a process that is gone
            return
        finally:
            probe.close()
        raise FileExistsError(f"{self.path} is in use by another process")

    def _remove_own_socket(self) -> None:
        try:
            st = os.lstat(self.path)
            if (st.st_dev, st.st_ino) == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass                        # already awake, or closed

    # ---- the server thread ------------------------------------------------

    def _serve(self) -> None:
        sel = selectors.DefaultSelector()
        listener = self._listener
        assert listener is not None
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        sel.register(listener, selectors.EVENT_READ, "listen")
        try:
            while not self._closing:
                for key, mask in sel.select():
                    if key.data == "wake":
                        self._drain_wake()
                    elif key.data == "listen":
                        self._accept(sel, listener)
                    elif mask & selectors.EVENT_READ:
                        self._receive(sel, listener)
                client = self._client
                if client is not None and not self._closing:
                    self._send(sel, listener)
                    if self._client is not None:
                        want = selectors.EVENT_READ
                        if self._pending:
                            want |= selectors.EVENT_WRITE
                        sel.modify(client, want, "client")
        except Exception:
            log.exception("unix socket port %s: server thread failed", self.path)
        finally:
            if self._client is not None:
                self._send(sel, listener)   # a last non-blocking attempt
                self._drop_client(sel, None)
            sel.close()
            listener.close()
            self._listener = None

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 512):
                pass
        except BlockingIOError:
            pass

    def _accept(self, sel: selectors.BaseSelector, listener: socket.socket) -> None:
        try:
            client, _ = listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        client.setblocking(False)
        with self._lock:
            self._client = client
        self.connections += 1
        # Later clients wait in the listen backlog until this one leaves.
        sel.unregister(listener)
        sel.register(client, selectors.EVENT_READ, "client")

    def _receive(self, sel: selectors.BaseSelector, listener: socket.socket) -> None:
        client = self._client
        assert client is not None
        try:
            data = client.recv(_READ_CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._drop_client(sel, listener)
            return
        self.input_bytes += len(data)
        try:
            self._feed(data)  # type: ignore[misc]
        except Exception:
            log.exception("unix socket port %s: feeding input to the UART failed", self.path)

    def _send(self, sel: selectors.BaseSelector, listener: socket.socket | None) -> None:
        with self._lock:
            client = self._client
            if client is None or not self._pending:
                return
            # Under the lock: write() may trim the front of the buffer.
            try:
                sent = client.send(self._pending)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                sent = -1
            if sent > 0:
                del self._pending[:sent]
                self.output_bytes += sent
        if sent < 0:
            self._drop_client(sel, listener)

    def _drop_client(self, sel: selectors.BaseSelector, listener: socket.socket | None) -> None:
        with self._lock:
            client, self._client = self._client, None
        if client is None:
            return
        sel.unregister(client)
        try:
            client.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        client.close()
        if listener is not None:
            sel.register(listener, selectors.EVENT_READ, "listen")

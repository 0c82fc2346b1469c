"""The QMP server: a unix socket speaking QEMU's machine protocol.

One asyncio loop on its own thread accepts any number of clients, each with
its own capabilities-negotiation state.  Commands run one at a time on a
single worker thread (QEMU serialises them under its big lock too), so a
slow machine call never stalls the loop, event delivery or other clients'
reading.  Machine events arrive from any thread through `emit`, and go to
every client that has finished negotiation.  Whatever a client sends, the
worst it can do is get its own connection closed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import json
import logging
import math
import os
import socket
import stat
import threading
import time
from typing import Any, Callable, Iterable

from vmm.tracing import NULL_TRACER, AnyTracer

from .commands import (
    ERROR_COMMAND_NOT_FOUND,
    ERROR_GENERIC,
    CommandContext,
    CommandTable,
    QmpCommandError,
)
from .event_throttle import EventThrottle
from .framing import JsonStreamSplitter, LexicalError, MessageTooLong
from .hmp import HmpTable
from .machine_api import MachineControl
from .machine_commands import register_machine_commands, version_info

log = logging.getLogger("pyvmm.qmp.server")

MAX_MESSAGE_BYTES = 1 << 20  # one request; beyond it the connection is closed
MAX_JSON_DEPTH = 64  # far above any QMP command, well below json's recursion limit
# Events a client leaves unread: above the soft cap for longer than the
# grace time, or ever above the hard cap, and the client is dropped.  (A
# burst of events is queued within one loop pass, before any of it can be
# sent, so a fast reader may briefly exceed the soft cap.)
MAX_WRITE_BUFFER = 4 << 20
HARD_WRITE_BUFFER = 64 << 20
SLOW_READER_GRACE_S = 1.0
MAX_CONSECUTIVE_ERRORS = 100  # error replies in a row before we give up on a client
READ_CHUNK = 64 << 10
SOCKET_MODE = 0o600
LISTEN_BACKLOG = 16
START_TIMEOUT_S = 5.0
STOP_TIMEOUT_S = 5.0
FLUSH_TIMEOUT_S = 1.0
STALE_PROBE_TIMEOUT_S = 1.0
UNIX_PATH_MAX = 108  # sizeof(sockaddr_un.sun_path), NUL included

# QMP capabilities this server offers in its greeting (no "oob").
OFFERED_CAPABILITIES: tuple[str, ...] = ()
KNOWN_CAPABILITIES = ("oob",)

NEGOTIATION_DESC = "Expecting capabilities negotiation with 'qmp_capabilities'"
ALREADY_NEGOTIATED_DESC = "Capabilities negotiation is already complete, command ignored"

# Counter names reported by QmpServer.stats().
COUNTERS = (
    "connections",
    "disconnects",
    "dropped_too_long",
    "dropped_too_many_errors",
    "dropped_slow_reader",
    "commands",
    "command_errors",
    "handler_exceptions",
    "parse_errors",
    "events_sent",
    "events_rejected",
)


def encode_message(message: dict[str, Any]) -> bytes:
    """One QMP output line: ASCII JSON ended by CRLF, as the spec says."""
    return (json.dumps(message, ensure_ascii=True, allow_nan=False) + "\r\n").encode("ascii")


def error_reply(error_class: str, desc: str) -> dict[str, Any]:
    return {"error": {"class": error_class, "desc": desc}}


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN/Infinity; QMP's parser does not.
    raise ValueError(f"invalid keyword '{name}'")


def _parse_finite_float(text: str) -> float:
    # 1e999 would become inf, which no JSON reply could carry back.
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number '{text}' out of range")
    return value


class _Session:
    """One client connection."""

    def __init__(self, number: int, writer: asyncio.StreamWriter) -> None:
        self.number = number
        self.writer = writer
        self.negotiated = False
        # Set by qmp_capabilities on the worker; applied by the loop right
        # after the reply is queued so no event can overtake that reply.
        self.pending_command_mode = False
        self.consecutive_errors = 0
        self.slow_check_pending = False
        self.task: asyncio.Task | None = None

    def __repr__(self) -> str:
        return f"<qmp client {self.number}>"


class QmpServer:
    """QMP on a unix socket for one machine.

    ``server = QmpServer(machine, "/run/vm.qmp"); server.start()``; add
    device commands with ``server.commands.register(...)`` and
    ``server.hmp.register_info(...)`` (before or after start);
    ``server.stop()`` closes every connection and removes the socket.
    A server is started at most once.
    """

    def __init__(
        self,
        machine: MachineControl,
        path: str | os.PathLike[str],
        *,
        commands: CommandTable | None = None,
        hmp: HmpTable | None = None,
        tracer: AnyTracer = NULL_TRACER,
    ) -> None:
        self.machine = machine
        self.tracer = tracer
        self.path = os.fspath(path)
        self.commands = commands if commands is not None else CommandTable()
        self.hmp = hmp if hmp is not None else HmpTable()
        self._register_protocol_commands()
        register_machine_commands(self.commands, self.hmp, machine, self.stats)

        self._counters = dict.fromkeys(COUNTERS, 0)
        self._throttle: EventThrottle | None = None
        self._counter_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._started = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._start_error: BaseException | None = None
        self._listen_sock: socket.socket | None = None
        self._socket_identity: tuple[int, int] | None = None
        self._server: asyncio.base_events.Server | None = None
        self._sessions: set[_Session] = set()
        self._next_session = 0
        self._greeting = b""
        self._worker_local = threading.local()
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="qmp-worker",
            initializer=self._mark_worker,
        )

    # -- public API -------------------------------------------------------

    def start(self) -> None:
        """Bind the socket and serve on a new thread; errors raise here."""
        with self._state_lock:
            if self._started:
                raise RuntimeError("QmpServer.start() called twice")
            self._started = True
        self._greeting = encode_message(
            {"QMP": {"version": version_info(self.machine), "capabilities": list(OFFERED_CAPABILITIES)}}
        )
        self._listen_sock = self._bind()
        try:
            self._thread = threading.Thread(target=self._run, name="qmp-server", daemon=True)
            self._thread.start()
            if not self._ready.wait(START_TIMEOUT_S):
                raise TimeoutError("QMP server thread did not start")
            if self._start_error is not None:
                raise self._start_error
        except BaseException:
            self._listen_sock.close()
            self._remove_socket()
            raise
        self.machine.add_event_listener(self.emit)

    def stop(self) -> None:
        """Close all connections, remove the socket, end the thread.

        Safe from any thread, including a command handler (e.g. a machine's
        quit() that stops the server): there it only schedules the stop.
        """
        with self._state_lock:
            if not self._started or self._stopping:
                return
            self._stopping = True
        loop = self._loop
        if loop is None or loop.is_closed():
            self._remove_socket()
            return
        try:
            loop.call_soon_threadsafe(lambda: loop.create_task(self._shutdown()))
        except RuntimeError:  # loop already closed
            self._remove_socket()
            return
        current = threading.current_thread()
        if current is self._thread or getattr(self._worker_local, "is_worker", False):
            return  # joining ourselves would deadlock
        if self._thread is not None:
            self._thread.join(STOP_TIMEOUT_S)
            if self._thread.is_alive():
                log.error("QMP server thread did not stop within %.1f s", STOP_TIMEOUT_S)

    def emit(self, name: str, data: dict[str, Any] | None = None) -> None:
        """Broadcast event `name` to negotiated clients; any thread."""
        now = time.time()
        seconds = int(now)
        event: dict[str, Any] = {"event": name}
        if data is not None:
            event["data"] = data
        event["timestamp"] = {"seconds": seconds, "microseconds": int((now - seconds) * 1_000_000)}
        try:
            if not isinstance(name, str) or not (data is None or isinstance(data, dict)):
                raise TypeError("event name must be str and data a dict or None")
            payload = encode_message(event)
        except (TypeError, ValueError) as exc:
            self._count("events_rejected")
            log.error("dropping event %r: %s", name, exc)
            return
        loop = self._loop
        if loop is None or self._stopping:
            return
        try:
            loop.call_soon_threadsafe(self._throttle.offer, name, data, payload)
        except RuntimeError:
            pass  # loop closed while we were encoding: nobody to tell

    def stats(self) -> dict[str, int]:
        """Server counters (connections, errors, drops, events...)."""
        with self._counter_lock:
            counters = dict(self._counters)
        counters["clients"] = len(self._sessions)
        counters["events_delayed"] = self._throttle.delayed if self._throttle else 0
        return counters

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> "QmpServer":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- protocol commands --------------------------------------------------

    def _register_protocol_commands(self) -> None:
        def qmp_capabilities(args: dict[str, Any], ctx: CommandContext) -> None:
            session: _Session = ctx.session
            if session.negotiated:
                raise QmpCommandError(ALREADY_NEGOTIATED_DESC, ERROR_COMMAND_NOT_FOUND)
            for index, capability in enumerate(args.get("enable", [])):
                if capability not in KNOWN_CAPABILITIES:
                    raise QmpCommandError(
                        f"Parameter 'enable[{index}]' does not accept value '{capability}'"
                    )
                if capability not in OFFERED_CAPABILITIES:
                    raise QmpCommandError(f"Capability {capability} not available")
            session.pending_command_mode = True

        def query_commands(args: dict[str, Any]) -> list[dict[str, str]]:
            return [{"name": name} for name in self.commands.names()]

        self.commands.register(
            "qmp_capabilities",
            qmp_capabilities,
            {"*enable": "[str]"},
            takes_context=True,
            negotiation=True,
            help="Enable QMP capabilities and leave negotiation mode",
        )
        self.commands.register("query-commands", query_commands, help="List the QMP commands")

    # -- thread and socket --------------------------------------------------

    def _mark_worker(self) -> None:
        self._worker_local.is_worker = True

    def _bind(self) -> socket.socket:
        if len(os.fsencode(self.path)) >= UNIX_PATH_MAX:
            raise ValueError(f"QMP socket path longer than {UNIX_PATH_MAX - 1} bytes: {self.path}")
        self._clear_stale_socket()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # Linux creates the socket file with the socket inode's mode
            # (masked by umask), so it is never wider than 0600 - no window
            # for another user and no process-wide umask change.
            os.fchmod(sock.fileno(), SOCKET_MODE)
            sock.bind(self.path)
            st = os.stat(self.path)
            self._socket_identity = (st.st_dev, st.st_ino)
            if stat.S_IMODE(st.st_mode) & ~SOCKET_MODE:
                raise PermissionError(
                    errno.EPERM,
                    f"socket created with mode {stat.S_IMODE(st.st_mode):o}, not {SOCKET_MODE:o}",
                    self.path,
                )
            sock.listen(LISTEN_BACKLOG)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            self._remove_socket()
            raise
        return sock

    def _clear_stale_socket(self) -> None:
        """Remove a socket file left by a dead server; refuse anything else."""
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(errno.EEXIST, "exists and is not a socket", self.path)
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(STALE_PROBE_TIMEOUT_S)  # a full backlog would block connect()
        try:
            probe.connect(self.path)
        except TimeoutError:
            pass  # somebody is listening, just busy
        except ConnectionRefusedError:
            os.unlink(self.path)  # nobody listens: stale
            return
        finally:
            probe.close()
        raise OSError(errno.EADDRINUSE, "another server is listening on", self.path)

    def _remove_socket(self) -> None:
        """Unlink the socket file if it is still the one we created."""
        if self._socket_identity is None:
            return
        try:
            st = os.stat(self.path)
            if (st.st_dev, st.st_ino) == self._socket_identity:
                os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("could not remove %s: %s", self.path, exc)
        self._socket_identity = None

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            self._server = loop.run_until_complete(
                asyncio.start_unix_server(self._serve_client, sock=self._listen_sock)
            )
        except BaseException as exc:
            self._start_error = exc
            loop.close()
            self._ready.set()
            return
        self._throttle = EventThrottle(send=self._broadcast, schedule=loop.call_later)
        self._loop = loop
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            self._loop = None
            loop.close()

    async def _shutdown(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            if self._server is not None:
                self._server.close()
            sessions = list(self._sessions)
            for session in sessions:
                session.writer.close()  # flushes what is queued (a final SHUTDOWN event) first
            flushes = [loop.create_task(self._wait_closed(s.writer)) for s in sessions]
            if flushes:
                await asyncio.wait(flushes, timeout=FLUSH_TIMEOUT_S)
            tasks = [s.task for s in sessions if s.task is not None]
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=FLUSH_TIMEOUT_S)
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._remove_socket()
        finally:
            loop.stop()

    @staticmethod
    async def _wait_closed(writer: asyncio.StreamWriter) -> None:
        try:
            await writer.wait_closed()
        except (OSError, asyncio.CancelledError):
            pass

    # -- per-client work ----------------------------------------------------

    def _count(self, name: str, amount: int = 1) -> None:
        with self._counter_lock:
            self._counters[name] += amount

    async def _serve_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._next_session += 1
        session = _Session(self._next_session, writer)
        session.task = asyncio.current_task()
        self._sessions.add(session)
        self._count("connections")
        log.debug("%r connected", session)
        splitter = JsonStreamSplitter(MAX_MESSAGE_BYTES, MAX_JSON_DEPTH)
        try:
            writer.write(self._greeting)
            await writer.drain()
            while True:
                chunk = await reader.read(READ_CHUNK)
                if not chunk:
                    break
                try:
                    items = splitter.feed(chunk)
                except MessageTooLong as exc:
                    self._count("dropped_too_long")
                    log.warning("%r dropped: %s", session, exc)
                    break
                if not await self._handle_items(session, items):
                    break
        except (ConnectionError, OSError):
            pass  # the peer went away; nothing to answer
        except asyncio.CancelledError:
            pass  # server shutdown
        except Exception:
            log.exception("%r: unexpected server error; closing this connection", session)
        finally:
            self._sessions.discard(session)
            self._count("disconnects")
            writer.close()
            log.debug("%r closed", session)

    async def _handle_items(self, session: _Session, items: Iterable[bytes | LexicalError]) -> bool:
        """Answer each request in order; False when the client must go."""
        loop = asyncio.get_running_loop()
        for item in items:
            reply, actions = await self._handle_request(session, item, loop)
            session.writer.write(reply)
            if session.pending_command_mode:
                session.pending_command_mode = False
                session.negotiated = True
            await session.writer.drain()
            for action in actions:
                await loop.run_in_executor(self._executor, self._run_action, action)
            if session.consecutive_errors >= MAX_CONSECUTIVE_ERRORS:
                self._count("dropped_too_many_errors")
                log.warning("%r dropped after %d errors in a row", session, session.consecutive_errors)
                return False
        return True

    async def _handle_request(
        self, session: _Session, item: bytes | LexicalError, loop: asyncio.AbstractEventLoop
    ) -> tuple[bytes, list[Callable[[], None]]]:
        """Reply bytes for one request, plus actions to run after sending."""
        started = time.perf_counter_ns()
        request, parse_error = self._parse(item)
        if parse_error is not None:
            self._count("parse_errors")
            session.consecutive_errors += 1
            return encode_message(error_reply(ERROR_GENERIC, parse_error)), []

        has_id = isinstance(request, dict) and "id" in request
        request_id = request.get("id") if has_id else None
        failure = self._check_request(session, request)
        if failure is not None:
            reply = error_reply(*failure)
            actions: list[Callable[[], None]] = []
        else:
            command = self.commands.get(request["execute"])
            ctx = CommandContext(session, self.commands)
            reply = await loop.run_in_executor(
                self._executor, self._invoke, command, request.get("arguments", {}), ctx
            )
            actions = ctx.take_after_reply() if "return" in reply else []
        if "error" in reply:
            session.consecutive_errors += 1
            self._count("command_errors")
        else:
            session.consecutive_errors = 0
        if has_id:
            reply["id"] = request_id
        if self.tracer.enabled and isinstance(request, dict) and isinstance(request.get("execute"), str):
            # Arguments stay out of the trace: they may be large.
            result = reply["error"]["class"] if "error" in reply else "ok"
            self.tracer.emit("qmp.command", command=request["execute"], result=result,
                             us=round((time.perf_counter_ns() - started) / 1000, 1))
        return encode_message(reply), actions

    @staticmethod
    def _parse(item: bytes | LexicalError) -> tuple[Any, str | None]:
        if isinstance(item, LexicalError):
            return None, item.desc
        try:
            text = item.decode("utf-8")
        except UnicodeDecodeError:
            return None, "JSON parse error, invalid UTF-8 sequence"
        try:
            return json.loads(text, parse_constant=_reject_constant, parse_float=_parse_finite_float), None
        except json.JSONDecodeError as exc:
            reason = exc.msg[:1].lower() + exc.msg[1:]
            return None, f"JSON parse error, {reason}"
        except (ValueError, RecursionError) as exc:
            return None, f"JSON parse error, {exc}"

    def _check_request(self, session: _Session, request: Any) -> tuple[str, str] | None:
        """QEMU's request checks, in its order; (class, desc) on failure."""
        if not isinstance(request, dict):
            return ERROR_GENERIC, "QMP input must be a JSON object"
        for key, value in request.items():
            if key == "execute":
                if not isinstance(value, str):
                    return ERROR_GENERIC, "QMP input member 'execute' must be a string"
            elif key == "arguments":
                if not isinstance(value, dict):
                    return ERROR_GENERIC, "QMP input member 'arguments' must be an object"
            elif key != "id":
                return ERROR_GENERIC, f"QMP input member '{key}' is unexpected"
        if "execute" not in request:
            return ERROR_GENERIC, "QMP input lacks member 'execute'"
        name = request["execute"]
        command = self.commands.get(name)
        if not session.negotiated:
            if command is None or not command.negotiation:
                return ERROR_COMMAND_NOT_FOUND, NEGOTIATION_DESC
        elif command is None:
            return ERROR_COMMAND_NOT_FOUND, f"The command {name} has not been found"
        return None

    def _invoke(self, command: Any, arguments: dict[str, Any], ctx: CommandContext) -> dict[str, Any]:
        """Run a handler on the worker; every failure becomes an error reply."""
        self._count("commands")
        try:
            result = command.run(arguments, ctx)
            if result is None:
                result = {}
            json.dumps(result, allow_nan=False)  # fail here, not half-way through a write
            return {"return": result}
        except QmpCommandError as exc:
            return error_reply(exc.qmp_error_class, exc.desc)
        except Exception as exc:
            self._count("handler_exceptions")
            log.warning("QMP command %s failed", command.name, exc_info=True)
            error_class = getattr(exc, "qmp_error_class", ERROR_GENERIC)
            if not isinstance(error_class, str):
                error_class = ERROR_GENERIC
            return error_reply(error_class, str(exc) or f"{command.name}: {type(exc).__name__}")

    def _run_action(self, action: Callable[[], None]) -> None:
        try:
            action()
        except Exception:
            log.exception("QMP post-reply action failed")

    def _broadcast(self, payload: bytes) -> None:
        sent = 0
        for session in list(self._sessions):
            if not session.negotiated:
                continue
            transport = session.writer.transport
            if transport.is_closing():
                continue
            backlog = transport.get_write_buffer_size() + len(payload)
            if backlog > HARD_WRITE_BUFFER:
                self._drop_slow_reader(session)
                continue
            session.writer.write(payload)
            sent += 1
            if backlog > MAX_WRITE_BUFFER and not session.slow_check_pending:
                session.slow_check_pending = True
                asyncio.get_running_loop().call_later(
                    SLOW_READER_GRACE_S, self._check_slow_reader, session
                )
        if sent:
            self._count("events_sent", sent)

    def _check_slow_reader(self, session: _Session) -> None:
        session.slow_check_pending = False
        transport = session.writer.transport
        if not transport.is_closing() and transport.get_write_buffer_size() > MAX_WRITE_BUFFER:
            self._drop_slow_reader(session)

    def _drop_slow_reader(self, session: _Session) -> None:
        self._count("dropped_slow_reader")
        log.warning("%r dropped: %d bytes unread", session, session.writer.transport.get_write_buffer_size())
        session.writer.transport.abort()

"""The QMP server driven by the official qemu.qmp client, raw sockets and
pyvmm's own sync client, against a fake MachineControl."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import socket
import stat
import tempfile
import threading
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qemu.qmp import ExecuteError, QMPClient

from pyvmm.qmp import CommandTable, HmpTable, MachineControl, QmpClient, QmpError, QmpServer
from pyvmm.qmp.client import QmpConnectionError
from pyvmm.qmp.server import MAX_CONSECUTIVE_ERRORS, MAX_MESSAGE_BYTES

TIMEOUT = 10.0
FAKE_VERSION = (1, 2, 3)


class FakeMachine:
    """Records calls and raises the events a real machine would."""

    def __init__(self) -> None:
        self.state = "running"
        self.calls: list[str] = []
        self.listeners: list = []
        self.quit_hook = None
        self.stats_value = {"exits": {"io": 3, "mmio": 7}, "vcpu_run_ns": 1234}

    def _emit(self, name: str, data: dict | None = None) -> None:
        for listener in list(self.listeners):
            listener(name, data)

    def status(self) -> str:
        return self.state

    def pause(self) -> None:
        self.calls.append("pause")
        self.state = "paused"
        self._emit("STOP")

    def resume(self) -> None:
        self.calls.append("resume")
        self.state = "running"
        self._emit("RESUME")

    def powerdown(self) -> None:
        self.calls.append("powerdown")
        self._emit("POWERDOWN")

    def reset(self) -> None:
        self.calls.append("reset")
        self._emit("RESET", {"guest": False, "reason": "host-qmp-system-reset"})

    def quit(self) -> None:
        self.calls.append("quit")
        self._emit("SHUTDOWN", {"guest": False, "reason": "host-qmp-quit"})
        if self.quit_hook is not None:
            self.quit_hook()

    def stats(self) -> dict:
        return self.stats_value

    def version(self) -> tuple[int, int, int]:
        return FAKE_VERSION

    def add_event_listener(self, cb) -> None:
        self.listeners.append(cb)


@pytest.fixture
def sock_dir():
    # Short path: sun_path holds only 107 bytes, pytest's tmp_path can be longer.
    path = tempfile.mkdtemp(prefix="qmp", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def machine() -> FakeMachine:
    return FakeMachine()


@pytest.fixture
def server(machine, sock_dir):
    srv = QmpServer(machine, os.path.join(sock_dir, "qmp.sock"))
    srv.start()
    yield srv
    srv.stop()


def run(coro):
    """asyncio.run with an overall timeout so a hang fails instead of blocking."""

    async def bounded():
        return await asyncio.wait_for(coro, TIMEOUT)

    return asyncio.run(bounded())


async def connect(path: str) -> QMPClient:
    client = QMPClient("test")
    await client.connect(path)
    return client


async def next_event(client: QMPClient) -> dict:
    return await asyncio.wait_for(client.events.get(), TIMEOUT)


class RawClient:
    """A line-oriented raw socket, for what qemu.qmp will not send."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(TIMEOUT)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")
        self.greeting = json.loads(self.file.readline())

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def recv(self) -> dict:
        line = self.file.readline()
        assert line, "server closed the connection"
        assert line.endswith(b"\r\n")
        return json.loads(line)

    def request(self, data: bytes) -> dict:
        self.send(data)
        return self.recv()

    def negotiate(self) -> None:
        assert self.request(b'{"execute": "qmp_capabilities"}\n') == {"return": {}}

    def at_eof(self) -> bool:
        try:
            return self.file.readline() == b""
        except ConnectionResetError:  # closed with our unread input pending
            return True

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def assert_serves(path: str) -> None:
    """A fresh qemu.qmp client can negotiate and run a command."""

    async def check():
        client = await connect(path)
        status = await client.execute("query-status")
        await client.disconnect()
        return status

    assert run(check())["status"] in ("running", "paused")


# -- protocol basics with qemu.qmp -------------------------------------------


def test_greeting_and_negotiation(server):
    async def scenario():
        client = await connect(server.path)
        greeting = client.greeting
        version = await client.execute("query-version")
        await client.disconnect()
        return greeting, version

    greeting, version = run(scenario())
    expected = {"qemu": {"major": 1, "minor": 2, "micro": 3}, "package": ""}
    assert greeting.QMP.version == expected
    assert list(greeting.QMP.capabilities) == []
    assert version == expected


def test_query_status_follows_machine(server, machine):
    async def scenario():
        client = await connect(server.path)
        running = await client.execute("query-status")
        machine.state = "guest-panicked"
        panicked = await client.execute("query-status")
        await client.disconnect()
        return running, panicked

    running, panicked = run(scenario())
    assert running == {"status": "running", "running": True, "singlestep": False}
    assert panicked == {"status": "guest-panicked", "running": False, "singlestep": False}


def test_stop_and_cont_raise_events(server, machine):
    async def scenario():
        client = await connect(server.path)
        assert await client.execute("stop") == {}
        stop_event = await next_event(client)
        status = await client.execute("query-status")
        assert await client.execute("stop") == {}  # already paused: no-op, as QEMU
        assert await client.execute("cont") == {}
        resume_event = await next_event(client)
        await client.disconnect()
        return stop_event, status, resume_event

    stop_event, status, resume_event = run(scenario())
    assert stop_event["event"] == "STOP"
    assert set(stop_event["timestamp"]) == {"seconds", "microseconds"}
    assert abs(stop_event["timestamp"]["seconds"] - time.time()) < 60
    assert status["status"] == "paused" and status["running"] is False
    assert resume_event["event"] == "RESUME"
    assert machine.calls == ["pause", "resume"]


def test_cont_refused_until_reset(server, machine):
    machine.state = "shutdown"

    async def scenario():
        client = await connect(server.path)
        with pytest.raises(ExecuteError) as info:
            await client.execute("cont")
        await client.disconnect()
        return info.value.error.error

    error = run(scenario())
    assert error.class_ == "GenericError"
    assert error.desc == "Resetting the Virtual Machine is required"
    assert "resume" not in machine.calls


def test_system_reset_and_powerdown(server, machine):
    async def scenario():
        client = await connect(server.path)
        assert await client.execute("system_reset") == {}
        reset = await next_event(client)
        assert await client.execute("system_powerdown") == {}
        powerdown = await next_event(client)
        await client.disconnect()
        return reset, powerdown

    reset, powerdown = run(scenario())
    assert reset["event"] == "RESET"
    assert reset["data"] == {"guest": False, "reason": "host-qmp-system-reset"}
    assert powerdown["event"] == "POWERDOWN" and "data" not in powerdown
    assert machine.calls == ["reset", "powerdown"]


def test_quit_replies_before_machine_quits(server, machine):
    """machine.quit() blocks until the client holds the reply: if the server
    ran it before sending the reply, the wait would time out."""
    reply_seen = threading.Event()
    released: list[bool] = []
    machine.quit_hook = lambda: released.append(reply_seen.wait(TIMEOUT / 2))

    async def scenario():
        client = await connect(server.path)
        assert await client.execute("quit") == {}
        reply_seen.set()
        event = await next_event(client)
        await client.disconnect()
        return event

    event = run(scenario())
    assert event["event"] == "SHUTDOWN" and event["data"]["reason"] == "host-qmp-quit"
    deadline = time.monotonic() + TIMEOUT
    while not released and time.monotonic() < deadline:
        time.sleep(0.01)
    assert machine.calls == ["quit"]
    assert released == [True]


def test_negotiation_reply_never_overtaken_by_events(server, machine):
    """Events raised while clients negotiate must not arrive before the
    qmp_capabilities reply (qemu.qmp treats that as a failed negotiation)."""
    done = threading.Event()

    def storm() -> None:
        while not done.is_set():
            machine._emit("TICK", None)
            time.sleep(0.0002)

    thread = threading.Thread(target=storm)
    thread.start()

    async def scenario():
        for _ in range(30):
            client = await connect(server.path)
            await client.execute("query-status")
            await client.disconnect()

    try:
        run(scenario())
    finally:
        done.set()
        thread.join()
    assert server.stats()["events_sent"] > 0


def test_quit_that_stops_the_server(machine, sock_dir):
    """A machine whose quit() stops the server from the handler thread: the
    client still gets the reply and SHUTDOWN, then the socket goes away."""
    srv = QmpServer(machine, os.path.join(sock_dir, "q.sock"))
    srv.start()
    machine.quit_hook = srv.stop
    raw = RawClient(srv.path)
    raw.negotiate()
    assert raw.request(b'{"execute": "quit", "id": 1}\n') == {"return": {}, "id": 1}
    assert raw.recv()["event"] == "SHUTDOWN"
    assert raw.at_eof()
    raw.close()
    deadline = time.monotonic() + TIMEOUT
    while srv.running and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not srv.running
    assert not os.path.exists(srv.path)
    srv.stop()  # idempotent


def test_query_commands_lists_every_registered_command(server):
    server.commands.register("x-device-query", lambda args: {"size": args.get("size", 0)}, {"*size": "uint64"})

    async def scenario():
        client = await connect(server.path)
        listed = await client.execute("query-commands")
        device = await client.execute("x-device-query", {"size": 4096})
        await client.disconnect()
        return listed, device

    listed, device = run(scenario())
    names = [entry["name"] for entry in listed]
    assert sorted(names) == sorted(server.commands.names())
    for name in ("qmp_capabilities", "query-commands", "query-status", "query-version", "stop",
                 "cont", "system_powerdown", "system_reset", "quit", "query-vm-stats",
                 "human-monitor-command", "x-device-query"):
        assert name in names
    assert device == {"size": 4096}


def test_query_vm_stats(server, machine):
    async def scenario():
        client = await connect(server.path)
        stats = await client.execute("query-vm-stats")
        await client.disconnect()
        return stats

    stats = run(scenario())
    assert stats["exits"] == {"io": 3, "mmio": 7}
    assert stats["vcpu_run_ns"] == 1234
    assert stats["qmp"]["connections"] == 1


# -- human monitor --------------------------------------------------------------


def hmp(server, *lines: str) -> list[str]:
    async def scenario():
        client = await connect(server.path)
        out = [await client.execute("human-monitor-command", {"command-line": line}) for line in lines]
        await client.disconnect()
        return out

    return run(scenario())


def test_hmp_info_status_version_stats(server, machine):
    running, version, stats = hmp(server, "info status", "info version", "info stats")
    assert running == "VM status: running\r\n"
    assert version == "1.2.3\r\n"
    assert stats.startswith("exits:\r\n  io: 3\r\n  mmio: 7\r\nvcpu_run_ns: 1234\r\n")
    machine.state = "paused"
    assert hmp(server, "info status") == ["VM status: paused\r\n"]
    machine.state = "shutdown"
    assert hmp(server, "info status") == ["VM status: paused (shutdown)\r\n"]


def test_hmp_errors_are_text(server):
    unknown_info, unknown, extra, blank, listing = hmp(
        server, "info foo", "frobnicate now", "info status please", "   ", "info"
    )
    assert unknown_info == "unknown command: 'info foo'\r\n"
    assert unknown == "unknown command: 'frobnicate'\r\n"
    assert extra == ('status: extraneous characters at the end of line\r\n'
                     'Try "help info status" for more information\r\n')
    assert blank == ""
    assert "info status -- " in listing and "info version -- " in listing


def test_hmp_run_control_and_failing_handler(server, machine):
    server.hmp.register_info("broken", lambda: 1 / 0, "always fails")
    stop, broken, after = hmp(server, "stop", "info broken", "info status")
    assert stop == "" and machine.calls == ["pause"]
    assert broken == "Error: division by zero\r\n"
    assert after == "VM status: paused\r\n"


def test_device_registers_command_and_info(server):
    """What a device module does with the table objects it is handed."""

    class MemoryDevice:
        def __init__(self) -> None:
            self.requested = 0

        def register_qmp(self, commands, hmp_table) -> None:
            commands.register("x-mem-resize", self.resize, {"requested-size": "size"})
            hmp_table.register_info("memory-devices", self.info, "show memory devices")

        def resize(self, args):
            if args["requested-size"] % 4096:
                raise ValueError("requested-size must be a multiple of 4096")
            self.requested = args["requested-size"]

        def info(self) -> str:
            return f"Memory device [virtio-mem]: \"vm0\"\n  requested-size: {self.requested}\n"

    device = MemoryDevice()
    device.register_qmp(server.commands, server.hmp)
    with pytest.raises(ValueError):
        server.commands.register("x-mem-resize", device.resize)
    with pytest.raises(ValueError):
        server.hmp.register_info("memory-devices", device.info)
    with pytest.raises(ValueError):
        server.commands.register("x-bad", device.resize, {"a": "no-such-type"})

    async def scenario():
        client = await connect(server.path)
        ok = await client.execute("x-mem-resize", {"requested-size": 1 << 20})
        with pytest.raises(ExecuteError) as info:
            await client.execute("x-mem-resize", {"requested-size": 5})
        with pytest.raises(ExecuteError) as negative:
            await client.execute("x-mem-resize", {"requested-size": -1})
        text = await client.execute("human-monitor-command", {"command-line": "info memory-devices"})
        await client.disconnect()
        return ok, info.value.error.error, negative.value.error.error, text

    ok, error, negative, text = run(scenario())
    assert ok == {}
    assert (error.class_, error.desc) == ("GenericError", "requested-size must be a multiple of 4096")
    assert negative.desc == "Invalid parameter type for 'requested-size', expected: size"
    assert text == "Memory device [virtio-mem]: \"vm0\"\r\n  requested-size: 1048576\r\n"


# -- error replies ---------------------------------------------------------------


def test_bad_json_gets_parse_error(server):
    raw = RawClient(server.path)
    assert raw.greeting["QMP"]["capabilities"] == []
    assert raw.request(b'{ "execute": }\n') == {
        "error": {"class": "GenericError", "desc": "JSON parse error, expecting value"}
    }
    reply = raw.request(b'{"execute": "qmp_capabilities", "id": NaN}\n')
    assert reply["error"]["class"] == "GenericError" and "id" not in reply
    assert raw.request(b"\x01")["error"]["desc"].startswith("JSON parse error, stray")
    raw.negotiate()  # the connection still works after errors
    raw.close()


@pytest.mark.parametrize(
    "request_line, desc",
    [
        (b"[1, 2]", "QMP input must be a JSON object"),
        (b'{"arguments": {}}', "QMP input lacks member 'execute'"),
        (b'{"execute": 7}', "QMP input member 'execute' must be a string"),
        (b'{"execute": "stop", "arguments": []}', "QMP input member 'arguments' must be an object"),
        (b'{"execute": "stop", "bogus": 1}', "QMP input member 'bogus' is unexpected"),
        (b'{"exec-oob": "stop"}', "QMP input member 'exec-oob' is unexpected"),
    ],
)
def test_malformed_requests(server, request_line, desc):
    raw = RawClient(server.path)
    raw.negotiate()
    assert raw.request(request_line + b"\n") == {"error": {"class": "GenericError", "desc": desc}}
    raw.close()


def test_argument_errors(server):
    async def scenario():
        client = await connect(server.path)
        errors = []
        for command, arguments in [
            ("no-such-command", None),
            ("human-monitor-command", {"command-line": 5}),
            ("human-monitor-command", {}),
            ("stop", {"force": True}),
            ("human-monitor-command", {"command-line": "info status", "cpu-index": "zero"}),
            ("qmp_capabilities", {"enable": ["oob"]}),
            ("qmp_capabilities", None),
        ]:
            with pytest.raises(ExecuteError) as info:
                await client.execute(command, arguments)
            errors.append((info.value.error_class, info.value.error.error.desc))
        await client.disconnect()
        return errors

    assert run(scenario()) == [
        ("CommandNotFound", "The command no-such-command has not been found"),
        ("GenericError", "Invalid parameter type for 'command-line', expected: string"),
        ("GenericError", "Parameter 'command-line' is missing"),
        ("GenericError", "Parameter 'force' is unexpected"),
        ("GenericError", "Invalid parameter type for 'cpu-index', expected: integer"),
        ("CommandNotFound", "Capabilities negotiation is already complete, command ignored"),
        ("CommandNotFound", "Capabilities negotiation is already complete, command ignored"),
    ]


def test_commands_before_negotiation(server, machine):
    raw = RawClient(server.path)
    for command in (b"query-status", b"stop", b"no-such-command"):
        reply = raw.request(b'{"execute": "' + command + b'"}\n')
        assert reply == {"error": {"class": "CommandNotFound",
                                   "desc": "Expecting capabilities negotiation with 'qmp_capabilities'"}}
    assert machine.calls == []
    reply = raw.request(b'{"execute": "qmp_capabilities", "arguments": {"enable": ["oob"]}}\n')
    assert reply["error"] == {"class": "GenericError", "desc": "Capability oob not available"}
    raw.negotiate()
    assert raw.request(b'{"execute": "query-status"}\n')["return"]["status"] == "running"
    raw.close()


@pytest.mark.parametrize("request_id", [7, "seven", [1, {"a": None}], {"nested": [True, 1.5]}, None, -3])
def test_id_echoed_verbatim(server, request_id):
    raw = RawClient(server.path)
    encoded = json.dumps(request_id).encode()
    before = raw.request(b'{"execute": "query-status", "id": ' + encoded + b"}\n")
    assert before["id"] == request_id and before["error"]["class"] == "CommandNotFound"
    raw.negotiate()
    ok = raw.request(b'{"id": ' + encoded + b', "execute": "query-status"}\n')
    assert ok["id"] == request_id and ok["return"]["status"] == "running"
    bad = raw.request(b'{"id": ' + encoded + b', "execute": "nope"}\n')
    assert bad["id"] == request_id and bad["error"]["class"] == "CommandNotFound"
    raw.close()


def test_multiline_and_batched_requests(server):
    raw = RawClient(server.path)
    raw.send(b'{"execute":\r\n "qmp_capabilities"}{"execute": "query-status", "id": 1}{"execute"')
    assert raw.recv() == {"return": {}}
    assert raw.recv()["id"] == 1
    assert raw.request(b': "query-version", "id": 2}\n')["return"]["qemu"]["major"] == 1
    raw.close()


def test_raising_or_unserialisable_handler_is_an_error_reply(server):
    server.commands.register("x-raise", lambda args: {}["missing"])
    server.commands.register("x-unjsonable", lambda args: {"value": object()})

    async def scenario():
        client = await connect(server.path)
        errors = []
        for command in ("x-raise", "x-unjsonable"):
            with pytest.raises(ExecuteError) as info:
                await client.execute(command)
            errors.append(info.value.error_class)
        status = await client.execute("query-status")
        await client.disconnect()
        return errors, status

    errors, status = run(scenario())
    assert errors == ["GenericError", "GenericError"]
    assert status["running"] is True
    assert server.stats()["handler_exceptions"] == 2


# -- socket and connections -----------------------------------------------------


def test_socket_mode_is_0600_even_with_open_umask(machine, sock_dir):
    path = os.path.join(sock_dir, "open.sock")
    old = os.umask(0)
    try:
        srv = QmpServer(machine, path)
        srv.start()
    finally:
        os.umask(old)
    try:
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode)
        assert stat.S_IMODE(st.st_mode) == 0o600
    finally:
        srv.stop()
    assert not os.path.exists(path)


def test_stale_socket_replaced_but_live_one_and_files_refused(machine, sock_dir, server):
    stale = os.path.join(sock_dir, "stale.sock")
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(stale)
    dead.close()  # leaves the file with nobody listening
    srv = QmpServer(machine, stale)
    srv.start()
    assert_serves(stale)
    srv.stop()

    with pytest.raises(OSError) as info:
        QmpServer(machine, server.path).start()
    assert info.value.errno == errno.EADDRINUSE
    assert_serves(server.path)  # the live server was not disturbed

    regular = os.path.join(sock_dir, "file")
    open(regular, "w").close()
    with pytest.raises(FileExistsError):
        QmpServer(machine, regular).start()
    assert os.path.isfile(regular)


def test_two_clients_each_negotiate_and_get_events(server, machine):
    async def scenario():
        first = await connect(server.path)
        second = await connect(server.path)
        await first.execute("stop")
        events = [await next_event(first), await next_event(second)]
        status = await second.execute("query-status")
        await first.disconnect()
        assert (await second.execute("query-status"))["status"] == "paused"
        await second.disconnect()
        return events, status

    raw = RawClient(server.path)  # not negotiated: must not see the events
    events, status = run(scenario())
    assert [e["event"] for e in events] == ["STOP", "STOP"]
    assert status["status"] == "paused"
    assert raw.request(b'{"execute": "qmp_capabilities"}\n') == {"return": {}}
    raw.close()


def test_events_from_many_threads(server, machine):
    """vCPU threads raise events concurrently; every client gets all of them,
    each thread's in order."""
    threads_n, per_thread = 4, 50
    qmp = QmpClient(server.path)
    raw = RawClient(server.path)
    raw.negotiate()

    def vcpu(index: int) -> None:
        for seq in range(per_thread):
            machine._emit("TEST_EVENT", {"vcpu": index, "seq": seq})

    threads = [threading.Thread(target=vcpu, args=(i,)) for i in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    got = [qmp.wait_event("TEST_EVENT", TIMEOUT)["data"] for _ in range(threads_n * per_thread)]
    raw_got = [raw.recv()["data"] for _ in range(threads_n * per_thread)]
    for received in (got, raw_got):
        for index in range(threads_n):
            assert [e["seq"] for e in received if e["vcpu"] == index] == list(range(per_thread))
    qmp.close()
    raw.close()


def test_disconnect_mid_line(server):
    raw = RawClient(server.path)
    raw.negotiate()
    raw.send(b'{"execute": "query-st')
    raw.close()
    assert_serves(server.path)
    deadline = time.monotonic() + TIMEOUT
    while server.stats()["clients"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.stats()["clients"] == 0


def test_overlong_message_closes_only_that_connection(server):
    other = QmpClient(server.path)
    raw = RawClient(server.path)
    raw.negotiate()
    chunk = b'{"execute": "query-status", "arguments": {"pad": "' + b"x" * (64 << 10)
    try:
        raw.send(chunk)
        for _ in range(MAX_MESSAGE_BYTES // (64 << 10) + 2):
            raw.send(b"x" * (64 << 10))
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed while we were still sending: also fine
    assert raw.at_eof()
    raw.close()
    assert server.stats()["dropped_too_long"] == 1
    assert other.execute("query-status")["status"] == "running"
    other.close()


def test_garbage_forever_is_dropped(server):
    other = QmpClient(server.path)
    raw = RawClient(server.path)
    replies = 0
    try:
        for _ in range(MAX_CONSECUTIVE_ERRORS + 10):
            raw.send(b"garbage\n")
        while raw.file.readline():
            replies += 1
    except (BrokenPipeError, ConnectionResetError):
        pass
    raw.close()
    # Closing a unix socket with unread input makes the peer's next read fail with
    # ECONNRESET, which can discard replies already queued for it: count only what arrived.
    assert replies <= MAX_CONSECUTIVE_ERRORS
    assert server.stats()["dropped_too_many_errors"] == 1
    assert other.hmp("info status") == "VM status: running\r\n"
    other.close()


def test_client_that_never_reads_events_is_dropped(server, machine):
    lazy = RawClient(server.path)
    lazy.negotiate()
    reader = QmpClient(server.path)
    blob = "e" * (64 << 10)
    for _ in range(160):  # 10 MiB: more than the write cap plus socket buffers
        machine._emit("BIG", {"blob": blob})
        reader.events()  # keep the good client drained
    deadline = time.monotonic() + TIMEOUT
    while server.stats()["dropped_slow_reader"] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.stats()["dropped_slow_reader"] == 1
    assert reader.execute("query-status")["running"] is True
    reader.close()
    lazy.close()


def test_bad_event_is_rejected_not_sent(server, machine):
    raw = RawClient(server.path)
    raw.negotiate()
    machine._emit("BAD", {"value": object()})
    machine._emit("GOOD", None)
    assert raw.recv()["event"] == "GOOD"
    assert server.stats()["events_rejected"] == 1
    raw.close()


def test_path_too_long(machine):
    with pytest.raises(ValueError):
        QmpServer(machine, "/tmp/" + "x" * 120).start()


# -- fuzzing ----------------------------------------------------------------------

_COMMAND_NAMES = ["qmp_capabilities", "query-status", "query-version", "query-commands", "stop",
                  "cont", "system_reset", "system_powerdown", "query-vm-stats",
                  "human-monitor-command", "nope"]
_json_scalars = st.none() | st.booleans() | st.integers(-(2**70), 2**70) | \
    st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20)
_json_values = st.recursive(
    _json_scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)
_requests = st.dictionaries(
    st.sampled_from(["execute", "arguments", "id", "exec-oob"]) | st.text(max_size=8),
    st.sampled_from(_COMMAND_NAMES) | _json_values
    | st.fixed_dictionaries({"command-line": st.sampled_from(["info status", "info x", "stop"]) | _json_values}),
    max_size=4,
)


def _exchange(path: str, payload: bytes, negotiate: bool) -> list[dict]:
    """Send payload, half-close, and read every reply until the server closes."""
    raw = RawClient(path)
    try:
        if negotiate:
            raw.negotiate()
        try:
            raw.send(payload)
            raw.sock.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass
        replies = []
        while True:
            try:
                line = raw.file.readline()
            except ConnectionResetError:
                break
            if not line:
                break
            assert line.endswith(b"\r\n")
            message = json.loads(line)
            assert isinstance(message, dict)
            assert ("return" in message) + ("error" in message) + ("event" in message) == 1
            if "error" in message:
                assert set(message["error"]) == {"class", "desc"}
            replies.append(message)
        return replies
    finally:
        raw.close()


@pytest.fixture(scope="module")
def fuzz_server():
    path = tempfile.mkdtemp(prefix="qmpfz", dir="/tmp")
    srv = QmpServer(FakeMachine(), os.path.join(path, "fuzz.sock"))
    srv.start()
    yield srv
    srv.stop()
    shutil.rmtree(path, ignore_errors=True)


_FUZZ_SETTINGS = settings(max_examples=120, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture])


@_FUZZ_SETTINGS
@given(payload=st.binary(max_size=512), negotiate=st.booleans())
def test_fuzz_random_bytes(fuzz_server, payload, negotiate):
    _exchange(fuzz_server.path, payload, negotiate)
    assert fuzz_server.running


@_FUZZ_SETTINGS
@given(requests=st.lists(_requests, min_size=1, max_size=5), negotiate=st.booleans())
def test_fuzz_random_json_objects(fuzz_server, requests, negotiate):
    payload = b"".join(json.dumps(r).encode() + b"\n" for r in requests)
    replies = [m for m in _exchange(fuzz_server.path, payload, negotiate) if "event" not in m]
    assert len(replies) == len(requests)  # every object gets exactly one answer
    for request, reply in zip(requests, replies):
        if "id" in request:
            assert reply.get("id", "absent") == request["id"]
        else:
            assert "id" not in reply


def test_fresh_client_after_fuzzing(fuzz_server):
    # Runs after the fuzz tests in file order; also stands on its own.
    _exchange(fuzz_server.path, b"\xff{[\"\x00garbage" * 100, True)
    assert_serves(fuzz_server.path)


# -- pyvmm's own sync client ----------------------------------------------------------


def test_sync_client_execute_error_hmp_and_events(server, machine):
    with QmpClient(server.path) as qmp:
        assert qmp.greeting["QMP"]["version"]["qemu"]["minor"] == 2
        assert qmp.execute("query-status")["status"] == "running"
        with pytest.raises(QmpError) as info:
            qmp.execute("nope")
        assert info.value.error_class == "CommandNotFound"
        assert info.value.desc == "The command nope has not been found"
        with pytest.raises(QmpError) as info:
            qmp.execute("human-monitor-command", {})
        assert info.value.desc == "Parameter 'command-line' is missing"
        assert qmp.hmp("info version") == "1.2.3\r\n"
        qmp.execute("stop")
        qmp.execute("system_reset")
        assert qmp.wait_event("RESET", TIMEOUT)["data"]["guest"] is False
        assert [e["event"] for e in qmp.events()] == ["STOP"]
        assert qmp.events() == []
        with pytest.raises(TimeoutError):
            qmp.wait_event("NEVER", 0.05)


def test_sync_client_threads_share_a_connection(server):
    with QmpClient(server.path) as qmp:
        results: list[str] = []
        lock = threading.Lock()

        def worker() -> None:
            for _ in range(20):
                status = qmp.execute("query-status")["status"]
                with lock:
                    results.append(status)

        threads = [threading.Thread(target=worker) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert results == ["running"] * 80


def test_sync_client_sees_server_go_away(machine, sock_dir):
    srv = QmpServer(machine, os.path.join(sock_dir, "gone.sock"))
    srv.start()
    qmp = QmpClient(srv.path)
    srv.stop()
    with pytest.raises(QmpConnectionError):
        qmp.wait_event("ANY", TIMEOUT)
    with pytest.raises(QmpConnectionError):
        qmp.execute("query-status")
    assert qmp.closed
    qmp.close()


def test_sync_client_without_negotiation(server):
    with QmpClient(server.path, negotiate=False) as qmp:
        with pytest.raises(QmpError) as info:
            qmp.execute("query-status")
        assert info.value.error_class == "CommandNotFound"
        assert qmp.execute("qmp_capabilities") == {}


def test_fake_machine_satisfies_protocol(machine):
    assert isinstance(machine, MachineControl)


def test_tables_standalone():
    table = CommandTable()
    table.register("echo", lambda args: args, {"text": "str", "*times": "int", "*tags": "[str]"})
    command = table.get("echo")
    assert command.run({"text": "hi", "tags": ["a"]}, None) == {"text": "hi", "tags": ["a"]}
    with pytest.raises(Exception, match=r"'tags\[1\]', expected: string"):
        command.run({"text": "hi", "tags": ["a", 2]}, None)
    with pytest.raises(Exception, match="expected: integer"):
        command.run({"text": "hi", "times": True}, None)
    with pytest.raises(Exception, match="expected: integer"):
        command.run({"text": "hi", "times": 1 << 63}, None)
    table.unregister("echo")
    assert "echo" not in table
    monitor = HmpTable()
    monitor.register_info("thing", lambda: "a\nb\n", "a thing")
    assert monitor.execute("info thing") == "a\r\nb\r\n"
    assert monitor.execute("help info") == "info thing -- a thing\r\n"


@settings(max_examples=80, deadline=None)
@given(values=st.lists(_json_values, min_size=1, max_size=4), cut=st.integers(1, 7))
def test_splitter_is_independent_of_chunking(values, cut):
    """Messages come out the same whether bytes arrive at once or in pieces."""
    from pyvmm.qmp.framing import JsonStreamSplitter

    stream = b" \r\n".join(json.dumps(v).encode() for v in values) + b"\n"
    whole = JsonStreamSplitter(MAX_MESSAGE_BYTES, 64).feed(stream)
    pieces = JsonStreamSplitter(MAX_MESSAGE_BYTES, 64)
    chunked = []
    for start in range(0, len(stream), cut):
        chunked += pieces.feed(stream[start:start + cut])
    assert whole == chunked
    assert [json.loads(m) for m in whole] == values


def test_splitter_resets_on_control_character():
    from pyvmm.qmp.framing import JsonStreamSplitter, LexicalError

    splitter = JsonStreamSplitter(MAX_MESSAGE_BYTES, 4)
    out = splitter.feed(b'{"execute": "sto\x00{"a": [[[[[1]]]]]}{"ok": 1}')
    assert isinstance(out[0], LexicalError) and "stray" in out[0].desc
    assert isinstance(out[1], LexicalError) and "nesting" in out[1].desc
    assert out[-1] == b'{"ok": 1}'

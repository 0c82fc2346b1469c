"""QMP on a running pyvmm, driven by the reference client qemu.qmp, and fuzzed.

A stub kernel that prints a line and then spins keeps the VM running for as long as the
tests need, at no boot cost; the real-guest modules cover reset and power-down end to end.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import stat
import sys

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from qemu.qmp import ExecuteError, QMPClient

import pyvmm
from tests.qemu_qmp import qmp_session
from tests.stubkernel import JMP_SELF, LOAD_ADDR, print_code, write_stub

pytestmark = pytest.mark.skipif(not os.access("/dev/kvm", os.R_OK | os.W_OK),
                                reason="/dev/kvm is missing or not accessible to this user")


@pytest.fixture(scope="module")
def vm(tmp_path_factory):
    kernel = write_stub(tmp_path_factory.mktemp("stub") / "spin.elf", print_code(b"up\n") + JMP_SELF)
    with pyvmm.VM(memory="64M", kernel=kernel, agent=False) as vm:
        vm.wait_console("up", timeout=30)
        yield vm


def test_qemu_qmp_greeting_status_and_stop_cont(vm: pyvmm.VM) -> None:
    async def body(client: QMPClient):
        assert client.greeting is not None
        assert "qemu" in client.greeting.QMP.version
        status = await client.execute("query-status")
        assert status["status"] == "running" and status["running"] is True
        with client.listener() as listener:
            await client.execute("stop")
            event = await asyncio.wait_for(listener.get(), 10)
            assert event["event"] == "STOP"
            assert (await client.execute("query-status"))["status"] == "paused"
            await client.execute("cont")
            event = await asyncio.wait_for(listener.get(), 10)
            assert event["event"] == "RESUME"
        assert (await client.execute("query-status"))["status"] == "running"
        version = await client.execute("query-version")
        assert set(version["qemu"]) == {"major", "minor", "micro"}
        names = {c["name"] for c in await client.execute("query-commands")}
        assert {"query-status", "stop", "cont", "system_reset", "system_powerdown", "quit"} <= names
    qmp_session(vm, body)


def test_cpu_state_shows_where_the_guest_spins(vm: pyvmm.VM) -> None:
    spin_at = LOAD_ADDR + len(print_code(b"up\n"))  # the stub's `jmp $`

    async def body(client: QMPClient):
        cpus = await client.execute("query-cpus-fast")
        text = await client.execute("human-monitor-command", {"command-line": "info registers"})
        status = await client.execute("query-status")
        return cpus, text, status
    cpus, text, status = qmp_session(vm, body)
    assert [c["cpu-index"] for c in cpus] == [0]
    assert os.path.isdir(f"/proc/{vm.pid}/task/{cpus[0]['thread-id']}")  # the vCPU thread
    assert f"RIP={spin_at:016x}" in text and "CPL 0" in text
    assert status["status"] == "running"  # held only for the read, no STOP


def test_qemu_qmp_error_replies(vm: pyvmm.VM) -> None:
    async def body(client: QMPClient):
        with pytest.raises(ExecuteError) as unknown:
            await client.execute("no-such-command")
        assert unknown.value.error_class == "CommandNotFound"
        with pytest.raises(ExecuteError) as bad_arg:
            await client.execute("query-status", {"bogus": 1})
        assert bad_arg.value.error_class == "GenericError"
        with pytest.raises(ExecuteError):
            await client.execute("human-monitor-command", {"command-line": 42})
        text = await client.execute("human-monitor-command", {"command-line": "info status"})
        assert text.startswith("VM status: running")
    qmp_session(vm, body)


def test_bad_json_gets_an_error_reply(vm: pyvmm.VM) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(10)
        s.connect(str(vm.qmp_path))
        f = s.makefile("rwb")
        json.loads(f.readline())  # greeting
        f.write(b'{"execute": "qmp_capabilities"}\n{"execute": ]}\n')
        f.flush()
        assert "return" in json.loads(f.readline())
        reply = json.loads(f.readline())
        assert reply["error"]["class"] == "GenericError"


def test_socket_is_private(vm: pyvmm.VM) -> None:
    mode = stat.S_IMODE(os.stat(vm.qmp_path).st_mode)
    assert mode == 0o600


def _poke(path: str, payload: bytes) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(path)
        s.recv(4096)  # greeting
        try:
            s.sendall(payload)
            s.shutdown(socket.SHUT_WR)
            while s.recv(65536):
                pass
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            pass  # closing on garbage is an allowed answer


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.one_of(
    st.binary(max_size=512),
    json_values.map(lambda v: json.dumps(v).encode() + b"\n"),
    st.dictionaries(st.sampled_from(["execute", "arguments", "id", "exec-oob", "control"]), json_values,
                    max_size=4).map(lambda d: json.dumps(d).encode() + b"\n"),
))
def test_fuzzed_input_never_takes_pyvmm_down(vm: pyvmm.VM, payload: bytes) -> None:
    _poke(str(vm.qmp_path), payload)
    assert vm.returncode is None


def test_next_client_still_works_after_fuzzing(vm: pyvmm.VM) -> None:
    async def body(client: QMPClient):
        return await client.execute("query-status")
    assert qmp_session(vm, body)["status"] in ("running", "paused")
    assert vm.returncode is None


def test_quit_ends_pyvmm_with_status_zero(vm: pyvmm.VM) -> None:
    async def body(client: QMPClient):
        with client.listener() as listener:
            await client.execute("quit")
            event = await asyncio.wait_for(listener.get(), 10)
            assert event["event"] == "SHUTDOWN"
    try:
        qmp_session(vm, body)
    except Exception as e:  # the server may close before the client's own disconnect
        print(f"disconnect after quit: {e!r}", file=sys.stderr)
    assert vm.wait_exit(20) == 0

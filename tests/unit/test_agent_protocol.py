"""pyvmm.agent against fake peers over a socketpair, and against the real
agent.sh run by busybox on this host (when busybox is installed)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from pyvmm.agent import (
    Agent, AgentError, encode_command, parse_devices, parse_memblocks, parse_meminfo,
)

GUEST_IMAGES = Path(__file__).resolve().parents[2] / "guest_images"
AGENT_SH = GUEST_IMAGES / "initramfs" / "agent.sh"
MEMTOOL_C = GUEST_IMAGES / "memtool.c"
MEMTOOL_CFLAGS = ["-static", "-nostdlib", "-O2", "-fno-stack-protector", "-fno-builtin", "-s"]
BUSYBOX = shutil.which("busybox")


class FakePeer:
    """The guest side: reads request lines, answers with a scripted reply.
    `answer(verb, rid, args)` returns the bytes to send (or None: stay mute)."""

    def __init__(self, answer, chunk: int | None = None, delay: float = 0.0) -> None:
        self.host, self.guest = socket.socketpair()
        self.answer = answer
        self.chunk = chunk
        self.delay = delay
        self.requests: list[str] = []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def send(self, data: bytes) -> None:
        if self.chunk is None:
            self.guest.sendall(data)
            return
        for i in range(0, len(data), self.chunk):  # split across many reads
            self.guest.sendall(data[i:i + self.chunk])
            time.sleep(self.delay)

    def _serve(self) -> None:
        buf = b""
        while True:
            try:
                data = self.guest.recv(4096)
            except OSError:
                return
            if not data:
                return
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                text = line.decode()
                self.requests.append(text)
                _req, rid, rest = text.split(" ", 2)
                verb, _, args = rest.partition(" ")
                reply = self.answer(verb, rid, args)
                if reply is not None:
                    self.send(reply)

    def close(self) -> None:
        self.guest.close()
        self.host.close()


def frame(rid: str, output: bytes, status: int = 0) -> bytes:
    return b"@@BEGIN " + rid.encode() + b"\n" + output + b"\n@@END " + rid.encode() + b" %d\n" % status


@pytest.fixture
def make_agent():
    peers = []

    def make(answer, **kw):
        peer = FakePeer(answer, **kw)
        peers.append(peer)
        return Agent.from_socket(peer.host), peer

    yield make
    for p in peers:
        p.close()


@pytest.mark.parametrize("output", [b"", b"x", b"a\nb", b"a\nb\n", b"\n", b"\n\n", b"@@ not a marker\n"])
def test_run_output_is_returned_exactly(make_agent, output):
    agent, _ = make_agent(lambda verb, rid, args: frame(rid, output, 3))
    status, out = agent.run("whatever", timeout=5)
    assert (status, out) == (3, output.decode())


def test_garbage_before_the_frame_is_ignored_and_counted(make_agent):
    noise = b"@@REQ 1 run echo\r\n\x00\xffjunk\n@@BEGIN 999\nold output\n@@END 999 0\n"
    agent, _ = make_agent(lambda verb, rid, args: noise + frame(rid, b"hello\n"))
    assert agent.run("echo hello", timeout=5) == (0, "hello\n")
    assert agent.stats["ignored_lines"] == 5


def test_reply_split_across_many_reads(make_agent):
    agent, _ = make_agent(lambda verb, rid, args: frame(rid, b"line one\nline two\n", 0),
                          chunk=3, delay=0.001)
    assert agent.run("x", timeout=5) == (0, "line one\nline two\n")


def test_timeout_raises_with_context(make_agent):
    agent, _ = make_agent(lambda verb, rid, args: b"@@BEGIN " + rid.encode() + b"\npartial")
    t0 = time.monotonic()
    with pytest.raises(AgentError, match="timed out.*partial"):
        agent.run("sleep 100", timeout=0.3)
    assert time.monotonic() - t0 < 2


def test_silent_peer_times_out(make_agent):
    agent, _ = make_agent(lambda verb, rid, args: None)
    with pytest.raises(AgentError, match="timed out"):
        agent.uptime(timeout=0.2)


def test_late_reply_of_a_timed_out_request_is_skipped(make_agent):
    pending: list[bytes] = []

    def answer(verb, rid, args):
        if args == "slow":  # answered only together with the next request
            pending.append(frame(rid, b"late\n"))
            return None
        return pending.pop() + frame(rid, b"fresh\n") if pending else frame(rid, b"fresh\n")

    agent, _ = make_agent(answer)
    with pytest.raises(AgentError):
        agent.run("slow", timeout=0.2)
    assert agent.run("fast", timeout=5) == (0, "fresh\n")


@pytest.mark.parametrize("bad_end", [b"@@END 77 0\n", b"@@END %s zero\n", b"@@END %s\n"])
def test_garbled_end_raises(make_agent, bad_end):
    def answer(verb, rid, args):
        end = bad_end % rid.encode() if b"%s" in bad_end else bad_end
        return b"@@BEGIN " + rid.encode() + b"\nout\n" + end

    agent, _ = make_agent(answer)
    with pytest.raises(AgentError, match="garbled"):
        agent.run("x", timeout=2)


def test_agent_restart_inside_a_frame_raises(make_agent):
    agent, _ = make_agent(lambda verb, rid, args:
                          b"@@BEGIN " + rid.encode() + b"\nout\n@@PYVMM-AGENT READY 1 3.0\n")
    with pytest.raises(AgentError, match="restarted"):
        agent.run("x", timeout=2)


def test_closed_connection_raises(make_agent):
    def answer(verb, rid, args):
        peer.guest.shutdown(socket.SHUT_WR)
        return None

    agent, peer = make_agent(answer)
    with pytest.raises(AgentError, match="closed"):
        agent.ping(timeout=2)


def test_overlong_line_raises(make_agent):
    agent, _ = make_agent(lambda verb, rid, args: b"@@BEGIN " + rid.encode() + b"\n"
                          + b"x" * (1 << 20) + b"y" * 100)
    with pytest.raises(AgentError, match="longer than"):
        agent.run("x", timeout=5)


def test_wait_ready_on_ready_line(make_agent):
    agent, peer = make_agent(lambda verb, rid, args: None)
    peer.guest.sendall(b"boot noise\n@@PYVMM-AGENT READY 1 19.53\n")
    agent.wait_ready(timeout=2)
    assert (agent.ready_version, agent.ready_uptime) == (1, 19.53)


def test_wait_ready_by_ping_when_ready_was_missed(make_agent):
    agent, peer = make_agent(lambda verb, rid, args: frame(rid, b"pong\n") if verb == "ping" else None)
    agent.wait_ready(timeout=2)
    assert peer.requests and peer.requests[0].split()[2] == "ping"
    # the rest of the ping frame is skipped before the next reply
    assert agent.ping(timeout=2) >= 0


def test_wait_ready_times_out(make_agent):
    agent, peer = make_agent(lambda verb, rid, args: None)
    with pytest.raises(AgentError, match="not ready"):
        agent.wait_ready(timeout=0.3, ping_interval=0.1)
    assert len(peer.requests) >= 2  # it kept pinging


def test_request_lines_and_argument_checks(make_agent):
    agent, peer = make_agent(lambda verb, rid, args: frame(rid, b"filled 4096\n"))
    agent.pattern_fill("/tmp/p", 4096, 7, timeout=2)
    assert peer.requests[-1].split(" ", 2)[2] == "pattern-fill /tmp/p 4096 7"
    with pytest.raises(ValueError):
        agent.pattern_fill("/tmp/with space", 4096, 7)
    with pytest.raises(ValueError):
        agent.run("a\0b")
    with pytest.raises(ValueError):
        agent.dmesg(0)


def test_pattern_verify_statuses(make_agent):
    replies = iter([(b"ok 4096\n", 0), (b"mismatch 12 expected 0x01 got 0x00\n", 1),
                    (b"error: open /x: errno 2\n", 2)])

    def answer(verb, rid, args):
        out, st = next(replies)
        return frame(rid, out, st)

    agent, _ = make_agent(answer)
    assert agent.pattern_verify("/tmp/p", 1, timeout=2) is True
    assert agent.pattern_verify("/tmp/p", 1, timeout=2) is False
    assert "mismatch 12" in agent.last_output
    with pytest.raises(AgentError, match="errno 2"):
        agent.pattern_verify("/x", 1, timeout=2)


def test_failed_verb_raises(make_agent):
    agent, _ = make_agent(lambda verb, rid, args: frame(rid, b"unknown verb: meminfo\n", 127))
    with pytest.raises(AgentError, match="127"):
        agent.meminfo(timeout=2)


def test_parse_meminfo():
    info = parse_meminfo("MemTotal:         243420 kB\nMemFree:   1 kB\nHugePages_Total:       0\n"
                         "garbage line\nBad: x kB\n")
    assert info == {"MemTotal": 243420 * 1024, "MemFree": 1024, "HugePages_Total": 0}


def test_parse_memblocks():
    m = "/sys/devices/system/memory"
    text = (f"{m}/block_size_bytes: 8000000\n{m}/memory0/state: online\n"
            f"{m}/memory10/state: offline\n{m}/memory1/state: online\n"
            f"{m}/memory0/valid_zones: none\n{m}/memory10/valid_zones: DMA32 Normal Movable\n"
            f"{m}/memory1/valid_zones: Movable\nerror: read {m}/memory2/state: errno 2\n")
    blocks = parse_memblocks(text)
    assert [b["index"] for b in blocks] == [0, 1, 10]
    assert blocks[1] == {"index": 1, "online": True, "state": "online", "zone": "Movable",
                         "valid_zones": ["Movable"], "phys_start": 0x8000000, "size": 0x8000000}
    assert blocks[2]["zone"] == "" and blocks[2]["valid_zones"] == ["DMA32", "Normal", "Movable"]
    with pytest.raises(AgentError):
        parse_memblocks(f"{m}/memory0/state: online\n")


def test_parse_devices():
    text = ("virtio virtio0 device=0x0018 vendor=0x554d4551 driver=virtio_mem\n"
            "vmbus 525074dc-8985-46e2-8057-a307dc18a502 class_id={525074dc} device_id={1} driver=-\n"
            "noise\n")
    devs = parse_devices(text)
    assert devs[0] == {"bus": "virtio", "name": "virtio0", "device": "0x0018",
                       "vendor": "0x554d4551", "driver": "virtio_mem"}
    assert devs[1]["bus"] == "vmbus" and devs[1]["driver"] is None
    assert len(devs) == 2


@pytest.mark.skipif(BUSYBOX is None, reason="needs busybox")
@pytest.mark.parametrize("command", ["plain", "a\\b", "two\nlines", "\\n literal", "cr\rx",
                                     "\\\\\\", "tab\there", "\\c stop?", "\\0101 octal"])
def test_encode_command_survives_printf_b(command):
    # The agent decodes with busybox printf %b: check the real thing.
    out = subprocess.run([BUSYBOX, "sh", "-c", 'printf %b "$1"', "sh", encode_command(command)],
                         stdout=subprocess.PIPE, check=True).stdout
    assert out.decode() == command


# ----------------------------------------------- the real agent.sh on this host


@pytest.fixture
def host_agent(tmp_path):
    """agent.sh under busybox sh, its stdin/stdout a socketpair. Never send
    it poweroff or reboot: it would act on the host."""
    if BUSYBOX is None:
        pytest.skip("needs busybox")
    shell = tmp_path / "sh"
    shell.write_text(f"#!/bin/sh\nexec {BUSYBOX} sh \"$@\"\n")
    shell.chmod(0o755)
    host, guest = socket.socketpair()
    memtool = tmp_path / "memtool"
    if shutil.which("gcc") is None:
        pytest.skip("needs gcc for memtool")
    subprocess.run(["gcc", *MEMTOOL_CFLAGS, "-o", str(memtool), str(MEMTOOL_C)], check=True)
    env = {**os.environ, "AGENT_SHELL": str(shell), "RUN_SCRIPT": str(tmp_path / "run"),
           "MEMTOOL": str(memtool)}
    proc = subprocess.Popen([str(shell), str(AGENT_SH)], stdin=guest, stdout=guest,
                            stderr=subprocess.DEVNULL, env=env, cwd=tmp_path)
    guest.close()
    agent = Agent.from_socket(host)
    try:
        agent.wait_ready(timeout=10)
        yield agent
    finally:
        agent.close()
        proc.kill()
        proc.wait()


def test_host_agent_run_and_builtins(host_agent):
    assert host_agent.ready_version == 1
    assert host_agent.run("echo hello $((6*7))", timeout=10) == (0, "hello 42\n")
    assert host_agent.run("printf abc", timeout=10) == (0, "abc")
    assert host_agent.run("x='a\\b'\nprintf '%s|' \"$x\" two", timeout=10) == (0, "a\\b|two|")
    assert host_agent.run("echo err >&2; false", timeout=10) == (1, "err\n")
    assert host_agent.ping(timeout=10) >= 0
    assert host_agent.uptime(timeout=10) > 0
    assert host_agent.meminfo(timeout=10)["MemTotal"] > 0
    status, out = host_agent.request("bogus", timeout=10)
    assert status == 127 and "unknown verb" in out


def test_host_agent_survives_exit_and_syntax_errors(host_agent):
    assert host_agent.run("echo bye; exit 3", timeout=10) == (3, "bye\n")
    status, out = host_agent.run("echo 'unterminated", timeout=10)
    assert status == 2 and "unterminated" in out
    assert host_agent.run("echo back", timeout=10) == (0, "back\n")
    assert host_agent.stats["ready"] >= 3  # the first start and two restarts


@pytest.mark.skipif(not Path("/sys/devices/system/memory/block_size_bytes").exists(),
                    reason="no memory-block sysfs on this host")
def test_host_agent_memblocks(host_agent):
    # both paths: builtin reads (few blocks) and memtool (many)
    blocks = host_agent.memory_blocks(timeout=20)
    assert blocks and all(b["size"] == blocks[0]["size"] > 0 for b in blocks)
    host_agent.run("MEMBLOCKS_BUILTIN_MAX=0", timeout=10)
    assert host_agent.memory_blocks(timeout=20) == blocks
    host_agent.run("MEMBLOCKS_BUILTIN_MAX=100000", timeout=10)
    assert host_agent.memory_blocks(timeout=20) == blocks


def test_host_agent_pattern_and_klog(host_agent, tmp_path):
    path = str(tmp_path / "pattern")
    host_agent.pattern_fill(path, 100_003, 77, timeout=20)
    assert host_agent.pattern_verify(path, 77, timeout=20) is True
    assert host_agent.pattern_verify(path, 78, timeout=20) is False
    assert host_agent.last_output.startswith("mismatch 0 ")
    with open(path, "r+b") as f:  # corrupt one byte in the middle
        f.seek(54_321)
        byte = f.read(1)
        f.seek(54_321)
        f.write(bytes([byte[0] ^ 0x40]))
    assert host_agent.pattern_verify(path, 77, timeout=20) is False
    assert host_agent.last_output.split()[:2] == ["mismatch", "54321"]
    host_agent.pattern_free(path, timeout=20)
    assert not Path(path).exists()
    with pytest.raises(AgentError):
        host_agent.pattern_verify(path, 77, timeout=20)  # gone: an error, not a mismatch

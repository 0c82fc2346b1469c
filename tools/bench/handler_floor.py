"""The least a Python virtqueue request handler costs on this host, warm and after idle.

One function does, inline, what any virtio-mem request handler must: read the available
index and one chain of two direct descriptors, bounds-check them, decode the request, check
and flip its blocks in a bitarray, write the response and the used element, and publish the
used index. No device object, no validation beyond the bounds, no accounting, no host work
afterwards: a lower bound for pyvmm's `request-time-us`, to compare with it in the same run.

It is woken as pyvmm's device is: a handler thread waits in epoll on an eventfd, which the
driver (the main thread, standing in for a vCPU's ioeventfd) signals after filling the ring
and idling; the handler reads the eventfd, takes its lock, and times from there to the
used index, the same window as `request-time-us`. `handler_floor.c` is the same in C.
"""

from __future__ import annotations

import os
import select
import statistics
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from bitarray import bitarray

QUEUE_SIZE = 256
DESC = struct.Struct("<QIHH")
REQUEST = struct.Struct("<H6xQH6x")
RESPONSE = struct.Struct("<H6xH")
USED_ELEM = struct.Struct("<II")
F_NEXT, F_WRITE = 1, 2
DESC_AT, AVAIL_AT, USED_AT, BUFFERS_AT, RAM_SIZE = 0, 0x1000, 0x2000, 0x3000, 0x10000
BLOCKS, BLOCKS_PER_REQUEST = 1024, 64
PLUG, UNPLUG, ACK, ERROR = 0, 1, 0, 3


class _Ring:
    """A split ring in a bytearray, and the handler's state (its indices and block bitmap)."""

    def __init__(self) -> None:
        self.ram = bytearray(RAM_SIZE)
        self.view = memoryview(self.ram)
        self.avail16 = self.view[AVAIL_AT:USED_AT].cast("H")
        self.used16 = self.view[USED_AT:BUFFERS_AT].cast("H")
        self.lock = threading.Lock()
        self.bitmap = bitarray(BLOCKS)
        self.bitmap.setall(0)
        self.last_avail = self.used_idx = self.driver_idx = 0

    def offer(self, req_type: int, first_block: int) -> None:
        """The driver's side: one request and its response buffer, made available."""
        head = 2 * (self.driver_idx % (QUEUE_SIZE // 2))
        out_at, in_at = BUFFERS_AT + 64 * head, BUFFERS_AT + 64 * head + 32
        REQUEST.pack_into(self.ram, out_at, req_type, first_block, BLOCKS_PER_REQUEST)
        DESC.pack_into(self.ram, DESC_AT + 16 * head, out_at, REQUEST.size, F_NEXT, head + 1)
        DESC.pack_into(self.ram, DESC_AT + 16 * (head + 1), in_at, RESPONSE.size, F_WRITE, 0)
        self.avail16[2 + self.driver_idx % QUEUE_SIZE] = head
        self.driver_idx = (self.driver_idx + 1) & 0xFFFF
        self.avail16[1] = self.driver_idx

    def handle(self) -> tuple[int, int]:
        """Answer the next request in one frame: (response type or -1 if none was taken, ns)."""
        ram, size = self.ram, QUEUE_SIZE
        with self.lock:
            started = time.perf_counter_ns()
            idx = self.last_avail
            if not 0 < (self.avail16[1] - idx) & 0xFFFF <= size:
                return -1, 0
            head = self.avail16[2 + idx % size]
            out_addr, out_len, out_flags, nxt = DESC.unpack_from(ram, DESC_AT + 16 * head)
            if out_flags != F_NEXT or nxt >= size:
                return -1, 0
            in_addr, in_len, in_flags, _ = DESC.unpack_from(ram, DESC_AT + 16 * nxt)
            if (in_flags != F_WRITE or out_len < REQUEST.size or in_len < RESPONSE.size
                    or out_addr + out_len > RAM_SIZE or in_addr + in_len > RAM_SIZE):
                return -1, 0
            req_type, first, count = REQUEST.unpack_from(ram, out_addr)
            bitmap = self.bitmap
            wanted = 0 if req_type == PLUG else count
            if first + count <= BLOCKS and bitmap.count(1, first, first + count) == wanted:
                bitmap[first:first + count] = req_type == PLUG
                resp = ACK
            else:
                resp = ERROR
            RESPONSE.pack_into(ram, in_addr, resp, 0)
            self.last_avail = (idx + 1) & 0xFFFF
            USED_ELEM.pack_into(ram, USED_AT + 4 + 8 * (self.used_idx % size), head, RESPONSE.size)
            self.used_idx = (self.used_idx + 1) & 0xFFFF
            self.used16[1] = self.used_idx
            return resp, time.perf_counter_ns() - started


def _serve(ring: _Ring, kick: int, done: int, results: list[tuple[int, int]], requests: int) -> None:
    """The handler thread: wait for a kick, answer, report; `requests` times."""
    poller = select.epoll()
    poller.register(kick, select.EPOLLIN)
    try:
        while len(results) < requests:
            poller.poll()
            os.eventfd_read(kick)
            try:
                results.append(ring.handle())
            finally:  # the driver waits for this even if the handler failed
                os.eventfd_write(done, 1)
    finally:
        poller.close()


def handler_floor_us(idle_s: float, requests: int = 64) -> float:
    """Median µs of the inline handler over alternating PLUG/UNPLUG requests, `idle_s` apart."""
    ring, results = _Ring(), []
    kick, done = os.eventfd(0), os.eventfd(0)
    thread = threading.Thread(target=_serve, args=(ring, kick, done, results, requests), daemon=True)
    thread.start()
    try:
        for i in range(requests):
            ring.offer(PLUG if i % 2 == 0 else UNPLUG,
                       (i // 2) % (BLOCKS // BLOCKS_PER_REQUEST) * BLOCKS_PER_REQUEST)
            time.sleep(idle_s)
            os.eventfd_write(kick, 1)
            os.eventfd_read(done)
            if len(results) != i + 1:
                raise RuntimeError(f"the floor handler failed on request {i}")
            resp = results[i][0]
            if resp != ACK:
                raise RuntimeError(f"the floor handler answered {resp} to request {i}")
        thread.join()
    finally:
        os.close(kick)
        os.close(done)
    return statistics.median(ns for _, ns in results) / 1000


def c_handler_floor_us(idle_s: float, requests: int = 64) -> float:
    """The same for the C twin (`handler_floor.c`)."""
    with tempfile.TemporaryDirectory() as d:
        binary = Path(d) / "handler_floor"
        subprocess.run(["gcc", "-O2", "-o", str(binary), str(Path(__file__).with_suffix(".c")), "-lpthread"],
                       check=True)
        out = subprocess.run([str(binary), str(round(idle_s * 1e9)), str(requests)], check=True,
                             capture_output=True, text=True).stdout
    return int(out) / 1000


if __name__ == "__main__":
    for name, floor in (("Python", handler_floor_us), ("C", c_handler_floor_us)):
        print(name, {"warm": floor(0.0), "idle 20 ms": floor(0.02)})

"""Run a coroutine against a pyvmm VM's QMP socket with the reference client, qemu.qmp."""

from __future__ import annotations

import asyncio
from typing import Awaitable, Callable, TypeVar

from qemu.qmp import QMPClient

import pyvmm

T = TypeVar("T")


def qmp_session(vm: pyvmm.VM, body: Callable[[QMPClient], Awaitable[T]]) -> T:
    """Connect qemu.qmp to `vm`, run `body(client)`, and always disconnect."""
    async def main() -> T:
        client = QMPClient("test")
        await client.connect(str(vm.qmp_path))
        try:
            return await body(client)
        finally:
            await client.disconnect()
    return asyncio.run(main())


async def next_event(listener, name: str, timeout: float) -> dict:
    """The next event called `name` from a qemu.qmp listener; others are skipped."""
    async def wait() -> dict:
        while True:
            event = await listener.get()
            if event["event"] == name:
                return event
    return await asyncio.wait_for(wait(), timeout)

"""The partition's connection table: which handler answers HvPostMessage and HvSignalEvent for
a connection id. VMBus registers its ids here (`ConnectionRegistry` in interfaces.py); the
hypercall dispatcher looks them up.

Registrations belong to the device models, not to the guest, so a machine reset keeps them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from devices.hyperv.hv_abi import HV_EVENT_FLAGS_COUNT
from devices.hyperv.interfaces import EventHandler, MessageHandler

HV_CONNECTION_ID_MAX = 0xFFFFFFFF


@dataclass(frozen=True)
class EventPort:
    handler: EventHandler
    flag_count: int   # HvSignalEvent's flag number must be below this


def _check_id(connection_id: int) -> None:
    if not isinstance(connection_id, int) or not 0 <= connection_id <= HV_CONNECTION_ID_MAX:
        raise ValueError(f"connection id {connection_id!r} is not a 32-bit value")


class Connections:
    """A `ConnectionRegistry`; lookups take no lock (the tables are replaced, never mutated)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._messages: dict[int, MessageHandler] = {}
        self._events: dict[int, EventPort] = {}

    def register_message(self, connection_id: int, handler: MessageHandler) -> None:
        _check_id(connection_id)
        with self._lock:
            self._messages = {**self._messages, connection_id: handler}

    def unregister_message(self, connection_id: int) -> None:
        with self._lock:
            self._messages = {k: v for k, v in self._messages.items() if k != connection_id}

    def register_event(self, connection_id: int, handler: EventHandler,
                       flag_count: int = HV_EVENT_FLAGS_COUNT) -> None:
        """`flag_count`: how many event flags the port has (HvSignalEvent's flag number is
        relative to the port and must be below it); by default a whole SIEF area."""
        _check_id(connection_id)
        if not 1 <= flag_count <= HV_EVENT_FLAGS_COUNT:
            raise ValueError(f"flag_count {flag_count} is not in 1..{HV_EVENT_FLAGS_COUNT}")
        with self._lock:
            self._events = {**self._events, connection_id: EventPort(handler, flag_count)}

    def unregister_event(self, connection_id: int) -> None:
        with self._lock:
            self._events = {k: v for k, v in self._events.items() if k != connection_id}

    def message_handler(self, connection_id: int) -> MessageHandler | None:
        return self._messages.get(connection_id)

    def event_port(self, connection_id: int) -> EventPort | None:
        return self._events.get(connection_id)

    def stats(self) -> dict:
        return {"message-connections": sorted(self._messages), "event-connections": sorted(self._events)}

"""The host side of VMBus: the channel-management protocol a Linux hv_vmbus guest speaks, and
the data path of the channels it opens.

Message flow (drivers/hv/connection.c, channel_mgmt.c, channel.c), guest -> host on message
connection id 1 (or 4, and from 5.0 on the id VERSION_RESPONSE names: this host names 4):

    INITIATE_CONTACT   -> VERSION_RESPONSE (version_supported 0 makes the guest try the next)
    REQUESTOFFERS      -> OFFERCHANNEL per device, then ALLOFFERS_DELIVERED
    GPADL_HEADER/BODY  -> GPADL_CREATED (creation_status 0, or non-zero for bad input)
    OPENCHANNEL        -> OPENCHANNEL_RESULT (status 0, or non-zero), then device.opened()
    CLOSECHANNEL       -> (no answer) device.closed()
    GPADL_TEARDOWN     -> GPADL_TORNDOWN
    MODIFYCHANNEL      -> MODIFYCHANNEL_RESPONSE from 5.3 on
    UNLOAD             -> every channel closed, every GPADL dropped, UNLOAD_RESPONSE
    RELID_RELEASED, TL_CONNECT_REQUEST: counted and ignored (no rescinds, no hv_sock)

Host -> guest messages go to the VP and SINT the guest named in INITIATE_CONTACT (target_vcpu;
SINT 2, or msg_sint from 5.0 on) as SynIC message type 1. A new INITIATE_CONTACT while
connected (a kexec'd or kdump kernel) first unloads, as UNLOAD would.

Channels: device N (in add_device order) gets relid N and event connection id
VMBUS_CHANNEL_CONNECTION_ID_BASE + N, registered with the ConnectionRegistry when it is
offered and unregistered on unload/reset. The offer says is_dedicated_interrupt=1 and
monitor_allocated=0, so the guest signals the host with HvSignalEvent on that id and never
uses monitor pages; the host signals the guest by setting event flag `relid` of SINT 2 on the
channel's target_vp. A device may also have `chn_flags`, `mmio_megabytes` and `user_defined`
(<= 120 bytes) attributes for its offer, and a `writable(channel)` method, called when the
guest has made room after a `send()` that found the inbound ring full.

Hostile guests: every guest-supplied length, count, handle, index and address is checked.
Bad input is logged (the first few times per reason), counted in `stats()["errors"]` by
reason, and answered with a refusal (GPADL, open) or by closing the channel (ring trouble;
the device's closed() is called and the channel stays dead until the guest closes it).
Nothing raises out of the message and event handlers.

Threads and locking: one lock guards all bus state. Decisions are made under it; their effects
on the outside (SynIC messages and signals, registry calls, device callbacks) are queued and
run in order after the lock is released (devices.vmbus.deferred), so device callbacks never
run under the bus lock and may call `channel.send()`. Callbacks for one bus run one at a
time, in protocol order (opened, packets, closed), on whichever thread flushes the queue: a
vCPU thread after a hypercall, or the thread calling send()/reset()/add_device(). They must
not block for long.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections import Counter
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from devices.hyperv.interfaces import (
    HV_STATUS_INVALID_PARAMETER,
    HV_STATUS_SUCCESS,
    ConnectionRegistry,
    GuestMemoryAccess,
    SynicPort,
    VmbusDevice,
)
from devices.vmbus import messages as msgs
from devices.vmbus.channel import Channel, ChannelSetupError, make_rings
from devices.vmbus.constants import (
    CHANNELMSG_CLOSECHANNEL,
    CHANNELMSG_GPADL_BODY,
    CHANNELMSG_GPADL_HEADER,
    CHANNELMSG_GPADL_TEARDOWN,
    CHANNELMSG_INITIATE_CONTACT,
    CHANNELMSG_MODIFYCHANNEL,
    CHANNELMSG_NAMES,
    CHANNELMSG_OPENCHANNEL,
    CHANNELMSG_RELID_RELEASED,
    CHANNELMSG_REQUESTOFFERS,
    CHANNELMSG_TL_CONNECT_REQUEST,
    CHANNELMSG_UNLOAD,
    HV_MESSAGE_PAYLOAD_BYTE_COUNT,
    HV_SYNIC_SINT_COUNT,
    HVMSG_NONE,
    MAX_CHANNEL_RELIDS,
    MAX_USER_DEFINED_BYTES,
    VERSION_WIN10_V5_3,
    VM_PKT_DATA_INBAND,
    VMBUS_CHANNEL_CONNECTION_ID_BASE,
    VMBUS_CONNECT_CPU,
    VMBUS_HV_MESSAGE_TYPE,
    VMBUS_MESSAGE_CONNECTION_ID,
    VMBUS_MESSAGE_CONNECTION_ID_4,
    VMBUS_MESSAGE_SINT,
)
from devices.vmbus.deferred import DeferredCalls
from devices.vmbus.gpadl import Gpadl, GpadlBuilder, GpadlError, MAX_RANGE_BUFLEN
from devices.vmbus.messages import MessageError
from devices.vmbus.packets import encode_inband
from devices.vmbus.ring import RingError
from devices.vmbus.versions import (
    is_supported,
    modifychannel_needs_response,
    supports_modifychannel,
    uses_msg_conn_id,
    version_name,
)
from vmm.memory import GuestMemoryError
from vmm.tracing import NULL_TRACER, AnyTracer

log = logging.getLogger(__name__)

# Limits on what a guest may make the host hold (pyvmm's choices).
MAX_GPADLS = 512                        # complete and half-built together
MAX_GPADL_PAGES = MAX_RANGE_BUFLEN // 8  # per GPADL; range_buflen (u16) caps it anyway
MAX_GPADL_PAGES_TOTAL = 1 << 18         # 1 GiB of guest memory described at once
MAX_DRAIN_PASSES = 1024                 # ring passes per guest signal
LOG_FIRST_N = 20                        # warnings logged per error reason

# A refusal in GPADL_CREATED / OPENCHANNEL_RESULT / MODIFYCHANNEL_RESPONSE. Linux only tests
# for non-zero; Hyper-V sends NTSTATUS codes, so this is STATUS_UNSUCCESSFUL.
VMBUS_STATUS_FAILURE = 0xC0000001


@dataclass
class _Slot:
    """A device on the bus and its channel's state."""

    device: VmbusDevice
    relid: int
    connection_id: int
    offer: bytes                        # the OFFERCHANNEL message, built once
    offered: bool = False
    event_registered: bool = False
    channel: Channel | None = None
    failed: bool = False                # closed by the host on a guest error, until CLOSECHANNEL

    @property
    def state(self) -> str:
        if self.channel is not None:
            return "open"
        if self.failed:
            return "failed"
        return "offered" if self.offered else "not-offered"


class VmBus:
    """The VMBus host. Registers its message handlers (connection ids 1 and 4) on creation."""

    tracer: AnyTracer = NULL_TRACER  # the machine sets its own

    def __init__(self, synic: SynicPort, registry: ConnectionRegistry, memory: GuestMemoryAccess,
                 max_version: int = VERSION_WIN10_V5_3) -> None:
        self._synic = synic
        self._registry = registry
        self._mem = memory
        self._max_version = max_version     # like Linux's max_version: cap what is accepted
        self._lock = threading.RLock()
        self._deferred = DeferredCalls()
        self._slots: dict[int, _Slot] = {}
        self._gpadls: dict[int, Gpadl] = {}
        self._pending_gpadls: dict[int, GpadlBuilder] = {}
        self._gpadl_pages = 0
        self._counters: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._msgs_in: Counter[str] = Counter()
        self._msgs_out: Counter[str] = Counter()
        self._set_disconnected()
        self._handlers: dict[int, Callable[[bytes], None]] = {
            CHANNELMSG_INITIATE_CONTACT: self._initiate_contact,
            CHANNELMSG_REQUESTOFFERS: self._request_offers,
            CHANNELMSG_GPADL_HEADER: self._gpadl_header,
            CHANNELMSG_GPADL_BODY: self._gpadl_body,
            CHANNELMSG_GPADL_TEARDOWN: self._gpadl_teardown,
            CHANNELMSG_OPENCHANNEL: self._open_channel,
            CHANNELMSG_CLOSECHANNEL: self._close_channel_msg,
            CHANNELMSG_MODIFYCHANNEL: self._modify_channel,
            CHANNELMSG_UNLOAD: self._unload,
            CHANNELMSG_RELID_RELEASED: self._relid_released,
            CHANNELMSG_TL_CONNECT_REQUEST: self._tl_connect_request,
        }
        registry.register_message(VMBUS_MESSAGE_CONNECTION_ID, partial(self._on_message, VMBUS_MESSAGE_CONNECTION_ID))
        registry.register_message(VMBUS_MESSAGE_CONNECTION_ID_4, partial(self._on_message, VMBUS_MESSAGE_CONNECTION_ID_4))

    # ------------------------------------------------------------------ public API

    def add_device(self, dev: VmbusDevice) -> None:
        """Put a device on the bus (normally before the guest connects; a device added later
        is offered at once if the guest has already asked for offers)."""
        user_defined = bytes(getattr(dev, "user_defined", b""))
        if len(user_defined) > MAX_USER_DEFINED_BYTES:
            raise ValueError(f"{dev.name}: user_defined is {len(user_defined)} bytes, max {MAX_USER_DEFINED_BYTES}")
        if not isinstance(dev.class_id, uuid.UUID) or not isinstance(dev.instance_id, uuid.UUID):
            raise TypeError(f"{dev.name}: class_id and instance_id must be uuid.UUID")
        with self._lock:
            if any(s.device.instance_id == dev.instance_id for s in self._slots.values()):
                raise ValueError(f"{dev.name}: instance id {dev.instance_id} is already on the bus")
            relid = len(self._slots) + 1
            if relid >= MAX_CHANNEL_RELIDS:
                raise ValueError("VMBus is full")
            connection_id = VMBUS_CHANNEL_CONNECTION_ID_BASE + relid
            offer = msgs.offer_channel(
                if_type=dev.class_id, if_instance=dev.instance_id, child_relid=relid,
                connection_id=connection_id, chn_flags=int(getattr(dev, "chn_flags", 0)),
                mmio_megabytes=int(getattr(dev, "mmio_megabytes", 0)), user_defined=user_defined)
            slot = _Slot(dev, relid, connection_id, offer)
            self._slots[relid] = slot
            if self._version is not None and self._offers_requested:
                self._offer(slot)
        self._deferred.run()

    def reset(self) -> None:
        """Machine reset: close every channel (device.closed()), drop every GPADL, forget the
        connection, as UNLOAD does but without an answer."""
        with self._lock:
            self._counters["resets"] += 1
            self._disconnect()
        self._deferred.run()

    def stats(self) -> dict[str, Any]:
        with self._lock:
            out: dict[str, Any] = {
                "state": "connected" if self._version is not None else "disconnected",
                "version": version_name(self._version) if self._version is not None else None,
                "target_vcpu": self._target_vcpu if self._version is not None else None,
                "msg_conn_id": self._msg_conn_id,
                "interrupt_page": self._interrupt_page,
                "monitor_pages": list(self._monitor_pages),
                "devices": len(self._slots),
                "channels_open": sum(1 for s in self._slots.values() if s.channel is not None),
                "gpadls": len(self._gpadls),
                "gpadls_pending": len(self._pending_gpadls),
                "gpadl_pages": self._gpadl_pages,
                "messages_in_by_type": dict(self._msgs_in),
                "messages_out_by_type": dict(self._msgs_out),
                "errors": dict(self._errors),
                "errors_total": sum(self._errors.values()),
            }
            for key in ("messages_in", "messages_out", "post_failures", "contacts_refused",
                        "offers_sent", "gpadls_created", "gpadls_refused", "gpadls_torndown",
                        "opens", "opens_refused", "closes", "channels_failed", "unloads", "resets",
                        "reconnects", "guest_signals", "signals_on_closed_channel", "host_signals", "signal_failures", "packets_in",
                        "bytes_in", "packets_ignored", "packets_out", "bytes_out", "ring_full",
                        "device_errors"):
                out[key] = self._counters[key]
            return out

    def devices(self) -> list[dict[str, Any]]:
        """One entry per device, for a QMP query."""
        with self._lock:
            return [{
                "name": s.device.name,
                "relid": s.relid,
                "class_id": str(s.device.class_id),
                "instance_id": str(s.device.instance_id),
                "connection_id": s.connection_id,
                "state": s.state,
                "target_vp": s.channel.target_vp if s.channel is not None else None,
                "packets_in": s.channel.packets_in if s.channel is not None else 0,
                "packets_out": s.channel.packets_out if s.channel is not None else 0,
            } for s in self._slots.values()]

    # ------------------------------------------------------------------ connection state

    def _set_disconnected(self) -> None:
        self._version: int | None = None
        self._target_vcpu = VMBUS_CONNECT_CPU
        self._msg_sint = VMBUS_MESSAGE_SINT
        self._msg_conn_id: int | None = None
        self._interrupt_page = 0
        self._monitor_pages = (0, 0)
        self._offers_requested = False

    def _disconnect(self) -> None:
        for slot in self._slots.values():
            if slot.channel is not None:
                self._close_channel(slot)
            slot.failed = False
            slot.offered = False
            if slot.event_registered:
                slot.event_registered = False
                self._deferred.add(self._registry.unregister_event, slot.connection_id)
        self._gpadls.clear()
        self._pending_gpadls.clear()
        self._gpadl_pages = 0
        self._set_disconnected()

    # ------------------------------------------------------------------ outside effects (queued)

    def _problem(self, reason: str, detail: str = "") -> None:
        self._errors[reason] += 1
        n = self._errors[reason]
        if n <= LOG_FIRST_N:
            more = " (not logged again)" if n == LOG_FIRST_N else ""
            log.warning("vmbus: %s%s%s", reason, f": {detail}" if detail else "", more)

    def _post(self, payload: bytes, vp: int | None = None, sint: int | None = None) -> None:
        vp = self._target_vcpu if vp is None else vp
        sint = self._msg_sint if sint is None else sint
        self._deferred.add(self._do_post, vp, sint, payload)

    def _do_post(self, vp: int, sint: int, payload: bytes) -> None:
        ok = self._synic.post_message(vp, sint, VMBUS_HV_MESSAGE_TYPE, payload)
        name = CHANNELMSG_NAMES.get(msgs.message_type(payload), "?")
        if self.tracer.enabled:
            self._trace_message("host", name, payload, posted=ok)
        with self._lock:
            if ok:
                self._counters["messages_out"] += 1
                self._msgs_out[name] += 1
            else:
                self._counters["post_failures"] += 1
                self._problem("post-message-failed", f"{name} to vp {vp} sint {sint}")

    def _trace_message(self, direction: str, name: str, payload: bytes, posted: bool = True) -> None:
        fields: dict[str, Any] = {"dir": direction, "type": name}
        relid = msgs.channel_relid(payload)
        if relid is not None:
            fields["relid"] = relid
        if not posted:  # the SynIC refused it: the guest never saw this message
            fields["posted"] = False
        self.tracer.emit("vmbus.message", **fields)

    def _signal(self, channel: Channel) -> None:
        self._deferred.add(self._do_signal, channel.target_vp, channel.relid)

    def _do_signal(self, vp: int, relid: int) -> None:
        ok = self._synic.signal_event(vp, VMBUS_MESSAGE_SINT, relid)
        with self._lock:
            if ok:
                self._counters["host_signals"] += 1
            else:
                self._counters["signal_failures"] += 1
                self._problem("signal-event-failed", f"relid {relid} to vp {vp}")

    def _call_device(self, fn: Callable[..., Any], *args: Any) -> None:
        self._deferred.add(self._do_call_device, fn, args)

    def _do_call_device(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception:
            log.exception("vmbus: device callback %s failed", getattr(fn, "__qualname__", fn))
            with self._lock:
                self._counters["device_errors"] += 1

    # ------------------------------------------------------------------ messages

    def _on_message(self, connection_id: int, message_type: int, payload: bytes) -> int:
        try:
            with self._lock:
                status = self._handle_message(connection_id, message_type, bytes(payload))
        except Exception:           # a bug, not guest input: keep the bus alive
            log.exception("vmbus: message handler failed")
            with self._lock:
                self._problem("internal-error")
            status = HV_STATUS_SUCCESS
        self._deferred.run()
        return status

    def _handle_message(self, connection_id: int, message_type: int, payload: bytes) -> int:
        self._counters["messages_in"] += 1
        if message_type == HVMSG_NONE or message_type & 0x80000000:
            self._problem("bad-hv-message-type", f"{message_type:#x}")
            return HV_STATUS_INVALID_PARAMETER
        if len(payload) > HV_MESSAGE_PAYLOAD_BYTE_COUNT:
            self._problem("message-too-long", f"{len(payload)} bytes")
            return HV_STATUS_INVALID_PARAMETER
        try:
            msgtype = msgs.message_type(payload)
        except MessageError as e:
            self._problem(e.reason, str(e))
            return HV_STATUS_INVALID_PARAMETER
        name = CHANNELMSG_NAMES.get(msgtype, "unknown")
        self._msgs_in[name] += 1
        if self.tracer.enabled:
            self._trace_message("guest", name, payload)
        handler = self._handlers.get(msgtype)
        if handler is None:
            self._problem("unexpected-message", f"{name} ({msgtype})")
            return HV_STATUS_SUCCESS
        if self._version is None and msgtype not in (CHANNELMSG_INITIATE_CONTACT, CHANNELMSG_UNLOAD):
            self._problem("not-connected", name)
            return HV_STATUS_SUCCESS
        try:
            handler(payload)
        except (MessageError, GpadlError) as e:
            self._problem(e.reason, str(e))
        return HV_STATUS_SUCCESS

    def _initiate_contact(self, payload: bytes) -> None:
        m = msgs.parse_initiate_contact(payload)
        if self._version is not None:
            self._counters["reconnects"] += 1
            self._disconnect()
        accepted = is_supported(m.version) and m.version <= self._max_version
        sint = VMBUS_MESSAGE_SINT
        if accepted and uses_msg_conn_id(m.version):
            if m.msg_sint >= HV_SYNIC_SINT_COUNT:
                self._problem("contact-bad-sint", f"msg_sint {m.msg_sint}")
                accepted = False
            else:
                sint = m.msg_sint
        if not accepted:
            self._counters["contacts_refused"] += 1
            log.info("vmbus: guest asked for version %s, refused", version_name(m.version))
            self._post(msgs.version_response(False), vp=m.target_vcpu, sint=VMBUS_MESSAGE_SINT)
            return
        self._version = m.version
        self._target_vcpu = m.target_vcpu
        self._msg_sint = sint
        self._monitor_pages = (m.monitor_page1, m.monitor_page2)
        if uses_msg_conn_id(m.version):
            self._msg_conn_id = VMBUS_MESSAGE_CONNECTION_ID_4
            self._post(msgs.version_response(True, msg_conn_id=VMBUS_MESSAGE_CONNECTION_ID_4))
        else:
            self._interrupt_page = m.interrupt_page
            self._msg_conn_id = VMBUS_MESSAGE_CONNECTION_ID
            self._post(msgs.version_response(True))
        log.info("vmbus: guest connected, protocol %s, messages to vp %d sint %d",
                 version_name(m.version), m.target_vcpu, sint)

    def _request_offers(self, payload: bytes) -> None:
        if self._offers_requested:
            self._problem("duplicate-request-offers")
            return
        self._offers_requested = True
        for slot in self._slots.values():
            self._offer(slot)
        self._post(msgs.alloffers_delivered())

    def _offer(self, slot: _Slot) -> None:
        if not slot.event_registered:
            slot.event_registered = True
            self._deferred.add(self._registry.register_event, slot.connection_id,
                               partial(self._on_channel_event, slot.relid))
        slot.offered = True
        self._counters["offers_sent"] += 1
        self._post(slot.offer)

    def _offered_slot(self, relid: int) -> _Slot | None:
        slot = self._slots.get(relid)
        return slot if slot is not None and slot.offered else None

    # -- GPADLs

    def _refuse_gpadl(self, relid: int, handle: int, reason: str, detail: str = "") -> None:
        self._problem(reason, f"gpadl {handle:#x} relid {relid}" + (f": {detail}" if detail else ""))
        self._counters["gpadls_refused"] += 1
        self._post(msgs.gpadl_created(relid, handle, VMBUS_STATUS_FAILURE))

    def _gpadl_header(self, payload: bytes) -> None:
        h = msgs.parse_gpadl_header(payload)
        if self._offered_slot(h.child_relid) is None:
            return self._refuse_gpadl(h.child_relid, h.gpadl, "gpadl-unknown-relid")
        if h.gpadl in self._gpadls or h.gpadl in self._pending_gpadls:
            return self._refuse_gpadl(h.child_relid, h.gpadl, "gpadl-duplicate-handle")
        if len(self._gpadls) + len(self._pending_gpadls) >= MAX_GPADLS:
            return self._refuse_gpadl(h.child_relid, h.gpadl, "gpadl-limit", f"{MAX_GPADLS} gpadls")
        try:
            builder = GpadlBuilder(h.child_relid, h.gpadl, h.range_buflen, h.rangecount, h.range_data,
                                   MAX_GPADL_PAGES)
        except GpadlError as e:
            return self._refuse_gpadl(h.child_relid, h.gpadl, e.reason, str(e))
        if self._gpadl_pages + builder.page_count > MAX_GPADL_PAGES_TOTAL:
            return self._refuse_gpadl(h.child_relid, h.gpadl, "gpadl-memory-limit",
                                      f"{self._gpadl_pages} + {builder.page_count} pages")
        self._gpadl_pages += builder.page_count
        if builder.complete:
            self._finish_gpadl(builder)
        else:
            self._pending_gpadls[h.gpadl] = builder

    def _gpadl_body(self, payload: bytes) -> None:
        b = msgs.parse_gpadl_body(payload)      # msgnumber: Linux leaves it 0; order is arrival
        builder = self._pending_gpadls.get(b.gpadl)
        if builder is None:
            self._problem("gpadl-body-unknown-handle", f"gpadl {b.gpadl:#x}")
            return
        try:
            builder.add_body(b.pfn_data)
        except GpadlError as e:
            del self._pending_gpadls[b.gpadl]
            self._gpadl_pages -= builder.page_count
            return self._refuse_gpadl(builder.child_relid, builder.handle, e.reason, str(e))
        if builder.complete:
            del self._pending_gpadls[b.gpadl]
            self._finish_gpadl(builder)

    def _finish_gpadl(self, builder: GpadlBuilder) -> None:
        try:
            gpadl = builder.build()
        except GpadlError as e:
            self._gpadl_pages -= builder.page_count
            return self._refuse_gpadl(builder.child_relid, builder.handle, e.reason, str(e))
        self._gpadls[gpadl.handle] = gpadl
        self._counters["gpadls_created"] += 1
        self._post(msgs.gpadl_created(gpadl.child_relid, gpadl.handle, 0))

    def _gpadl_teardown(self, payload: bytes) -> None:
        relid, handle = msgs.parse_gpadl_teardown(payload)
        gpadl = self._gpadls.get(handle)
        pending = self._pending_gpadls.get(handle)
        if gpadl is not None and gpadl.child_relid == relid:
            if gpadl.in_use_by is not None:
                slot = self._slots[gpadl.in_use_by]
                self._fail_channel(slot, "gpadl-teardown-while-open", f"gpadl {handle:#x}")
            del self._gpadls[handle]
            self._gpadl_pages -= gpadl.page_count
            self._counters["gpadls_torndown"] += 1
        elif pending is not None and pending.child_relid == relid:
            del self._pending_gpadls[handle]
            self._gpadl_pages -= pending.page_count
            self._problem("gpadl-teardown-incomplete", f"gpadl {handle:#x}")
        else:
            # answer anyway, so a confused guest does not wait for ever
            self._problem("gpadl-teardown-unknown", f"gpadl {handle:#x} relid {relid}")
        self._post(msgs.gpadl_torndown(handle))

    # -- channels

    def _open_channel(self, payload: bytes) -> None:
        m = msgs.parse_open_channel(payload)

        def refuse(reason: str, detail: str = "") -> None:
            self._problem(reason, f"relid {m.child_relid}" + (f": {detail}" if detail else ""))
            self._counters["opens_refused"] += 1
            self._post(msgs.open_result(m.child_relid, m.openid, VMBUS_STATUS_FAILURE))

        slot = self._offered_slot(m.child_relid)
        if slot is None:
            return refuse("open-unknown-relid")
        if slot.channel is not None or slot.failed:
            return refuse("open-already-open")
        gpadl = self._gpadls.get(m.ringbuffer_gpadlhandle)
        if gpadl is None:
            return refuse("open-unknown-gpadl", f"gpadl {m.ringbuffer_gpadlhandle:#x}")
        if gpadl.child_relid != m.child_relid:
            return refuse("open-gpadl-of-other-channel", f"gpadl {gpadl.handle:#x}")
        if gpadl.in_use_by is not None:
            return refuse("open-gpadl-in-use", f"gpadl {gpadl.handle:#x}")
        try:
            reader, writer = make_rings(self._mem, gpadl, m.downstream_ringbuffer_pageoffset)
        except ChannelSetupError as e:
            return refuse(e.reason, str(e))
        channel = Channel(self, slot.relid, m.openid, m.target_vp, gpadl.handle, reader, writer)
        slot.channel = channel
        gpadl.in_use_by = slot.relid
        self._counters["opens"] += 1
        self._post(msgs.open_result(m.child_relid, m.openid, 0))
        self._call_device(slot.device.opened, channel)

    def _close_channel(self, slot: _Slot) -> None:
        """Close the open channel of `slot`; the device's closed() follows."""
        channel = slot.channel
        assert channel is not None
        channel.is_open = False
        slot.channel = None
        gpadl = self._gpadls.get(channel.gpadl_handle)
        if gpadl is not None and gpadl.in_use_by == slot.relid:
            gpadl.in_use_by = None
        self._counters["closes"] += 1
        self._call_device(slot.device.closed)

    def _fail_channel(self, slot: _Slot, reason: str, detail: str = "") -> None:
        """The guest broke the channel: close it on the host side until the guest closes it."""
        self._problem(reason, f"relid {slot.relid} closed" + (f": {detail}" if detail else ""))
        self._counters["channels_failed"] += 1
        if slot.channel is not None:
            self._close_channel(slot)
        slot.failed = True

    def _close_channel_msg(self, payload: bytes) -> None:
        relid = msgs.parse_close_channel(payload)
        slot = self._slots.get(relid)
        if slot is None:
            self._problem("close-unknown-relid", f"relid {relid}")
        elif slot.channel is not None:
            self._close_channel(slot)
        elif slot.failed:
            slot.failed = False
        else:
            self._problem("close-not-open", f"relid {relid}")

    def _modify_channel(self, payload: bytes) -> None:
        assert self._version is not None
        if not supports_modifychannel(self._version):
            self._problem("modifychannel-unsupported", version_name(self._version))
            return
        relid, target_vp = msgs.parse_modify_channel(payload)
        slot = self._offered_slot(relid)
        status = 0
        if slot is None:
            self._problem("modifychannel-unknown-relid", f"relid {relid}")
            status = VMBUS_STATUS_FAILURE
        elif slot.channel is not None:
            slot.channel.target_vp = target_vp
        if modifychannel_needs_response(self._version):
            self._post(msgs.modifychannel_response(relid, status))

    def _unload(self, payload: bytes) -> None:
        vp, sint = self._target_vcpu, self._msg_sint
        self._counters["unloads"] += 1
        self._disconnect()
        self._post(msgs.unload_response(), vp=vp, sint=sint)
        log.info("vmbus: guest unloaded the bus")

    def _relid_released(self, payload: bytes) -> None:
        msgs.parse_relid_released(payload)      # nothing is ever rescinded: nothing to do

    def _tl_connect_request(self, payload: bytes) -> None:
        self._problem("hv-sock-unsupported")

    # ------------------------------------------------------------------ data path

    def _on_channel_event(self, relid: int) -> int:
        """HvSignalEvent on a channel's connection id: drain the guest's outbound ring."""
        for attempt in range(MAX_DRAIN_PASSES):
            try:
                with self._lock:
                    if attempt == 0:
                        self._counters["guest_signals"] += 1
                    more = self._drain(relid)
            except Exception:       # a bug, not guest input: keep the bus alive
                log.exception("vmbus: event handler failed")
                with self._lock:
                    self._problem("internal-error")
                more = False
            self._deferred.run()
            if not more:
                break
        else:
            with self._lock:
                self._problem("drain-pass-limit", f"relid {relid}")
        return HV_STATUS_SUCCESS

    def _drain(self, relid: int) -> bool:
        slot = self._slots.get(relid)
        channel = slot.channel if slot is not None else None
        if slot is None or channel is None:
            self._counters["signals_on_closed_channel"] += 1
            return False
        result = channel.reader.drain()
        for packet in result.packets:
            if packet.type == VM_PKT_DATA_INBAND:
                self._counters["packets_in"] += 1
                self._counters["bytes_in"] += len(packet.payload)
                channel.packets_in += 1
                self._call_device(slot.device.packet, channel, packet.payload, packet.trans_id)
            else:
                self._counters["packets_ignored"] += 1
        if result.error is not None:
            self._fail_channel(slot, result.error.reason, str(result.error))
            return False
        if result.signal_guest:
            self._signal(channel)
        try:
            if channel.writer.room_for_pending():
                writable = getattr(slot.device, "writable", None)
                if writable is not None:
                    self._call_device(writable, channel)
        except RingError as e:
            self._fail_channel(slot, e.reason, str(e))
            return False
        except GuestMemoryError as e:
            self._fail_channel(slot, "ring-guest-memory", str(e))
            return False
        return result.more

    def channel_send(self, channel: Channel, payload: bytes, trans_id: int, completion_requested: bool) -> bool:
        """Channel.send()'s work (see there)."""
        packet = encode_inband(payload, trans_id, completion_requested)   # ValueError: caller's bug
        with self._lock:
            sent = False
            slot = self._slots.get(channel.relid)
            if channel.is_open and slot is not None and slot.channel is channel:
                try:
                    result = channel.writer.write(packet)
                except RingError as e:
                    self._fail_channel(slot, e.reason, str(e))
                except GuestMemoryError as e:
                    self._fail_channel(slot, "ring-guest-memory", str(e))
                else:
                    if not result.written:
                        self._counters["ring_full"] += 1
                    else:
                        sent = True
                        channel.packets_out += 1
                        self._counters["packets_out"] += 1
                        self._counters["bytes_out"] += len(payload)
                        if result.signal_guest:
                            self._signal(channel)
        self._deferred.run()
        return sent

"""VmBus against the Linux-guest client model: version negotiation, offers, GPADLs, open and
close, packets both ways, MODIFYCHANNEL, unload, reset, reconnects, threads."""

from __future__ import annotations

import struct
import threading
import uuid

import pytest

from devices.vmbus.constants import VMBUS_CHANNEL_CONNECTION_ID_BASE
from tests.vmbus_client import (
    CONN_ID_1,
    CONN_ID_4,
    HV_STATUS_SUCCESS,
    LINUX_VERSIONS,
    MSG_MODIFYCHANNEL,
    MSG_MODIFYCHANNEL_RESPONSE,
    MSG_REQUESTOFFERS,
    MSG_VERSION_RESPONSE,
    PAGE,
    V4_0,
    V4_1,
    V5_0,
    V5_2,
    V5_3,
    WIN7,
    WS2008,
    ProtocolError,
    RecordingDevice,
    Rig,
    VmbusClient,
    header,
    initiate_contact,
)


def two_device_rig(**kw) -> Rig:
    return Rig(devices=[RecordingDevice("balloon"), RecordingDevice("other", class_id=uuid.UUID(int=7))], **kw)


# --- version negotiation ------------------------------------------------------------------------

def test_newest_linux_version_is_taken_and_later_messages_use_conn_id_4():
    rig = Rig()
    assert rig.client.connect() == V5_3
    assert rig.client.tried == [V5_3]
    assert rig.client.msg_conn_id == CONN_ID_4
    stats = rig.bus.stats()
    assert (stats["state"], stats["version"], stats["msg_conn_id"]) == ("connected", "5.3", 4)
    rig.check()


def test_newest_first_fallback_until_the_host_accepts():
    rig = Rig(bus_kwargs={"max_version": V4_1})
    assert rig.client.connect() == V4_1
    assert rig.client.tried == [0x50003, 0x50002, 0x50001, 0x50000, V4_1]
    assert rig.client.msg_conn_id == CONN_ID_1          # before 5.0 everything goes to id 1
    assert rig.bus.stats()["contacts_refused"] == 4
    assert rig.client.request_offers()                  # and the bus answers there
    rig.check()


@pytest.mark.parametrize("version", LINUX_VERSIONS)
def test_each_linux_version_gets_a_working_channel(version):
    rig = Rig(devices=[RecordingDevice(echo=True)])
    assert rig.client.connect(versions=(version,)) == version
    ch = rig.client.open(rig.client.request_offers()[0])
    assert ch.send(b"ping")
    assert [p.payload for p in ch.recv()] == [b"\0\0\0\0gnip"]
    rig.check()


@pytest.mark.parametrize("version", [WIN7, WS2008, 0x60000, 0x30003, 0x50004])
def test_unsupported_versions_are_refused_and_the_guest_may_retry(version):
    rig = Rig()
    assert not rig.client.try_version(version)
    assert rig.bus.stats()["state"] == "disconnected"
    assert rig.client.try_version(V5_0)


def test_contact_records_target_vcpu_and_pages_before_v5():
    rig = Rig()
    rig.client.vp = 1
    assert rig.client.connect(versions=(V4_0,)) == V4_0
    stats = rig.bus.stats()
    assert stats["target_vcpu"] == 1
    assert stats["interrupt_page"] == 0x5000 and stats["monitor_pages"] == [0x6000, 0x7000]
    offers = rig.client.request_offers()      # answers go to VP 1 (client.expect checks)
    assert len(offers) == 1


def test_contact_from_v5_uses_msg_sint_and_bad_sint_is_refused():
    rig = Rig()
    rig.client.post(initiate_contact(V5_0, msg_sint=16), connection_id=CONN_ID_4)
    [reply] = rig.synic.take_messages()
    assert reply.msgtype == MSG_VERSION_RESPONSE and reply.payload[8] == 0
    assert rig.bus.stats()["errors"]["contact-bad-sint"] == 1
    rig.client.post(initiate_contact(V5_0, msg_sint=5), connection_id=CONN_ID_4)
    [reply] = rig.synic.take_messages()
    assert reply.payload[8] == 1 and reply.sint == 5
    rig.client.post(header(MSG_REQUESTOFFERS), connection_id=CONN_ID_4)
    assert {m.sint for m in rig.synic.take_messages()} == {5}


def test_messages_before_contact_are_ignored_and_counted():
    rig = Rig()
    assert rig.client.post(header(MSG_REQUESTOFFERS)) == HV_STATUS_SUCCESS
    assert rig.synic.take_messages() == []
    assert rig.bus.stats()["errors"]["not-connected"] == 1


def test_hypercall_level_errors():
    rig = Rig()
    assert rig.client.post(b"\x0e\0\0") != HV_STATUS_SUCCESS                 # shorter than the header
    assert rig.client.post(initiate_contact(V5_0), message_type=0) != HV_STATUS_SUCCESS
    assert rig.client.post(bytes(241)) != HV_STATUS_SUCCESS
    assert rig.synic.take_messages() == []
    assert rig.bus.stats()["state"] == "disconnected"


def test_unreachable_target_vcpu_is_counted_not_raised():
    rig = Rig()
    rig.client.vp = 7                       # the fake SynIC has VPs 0 and 1
    rig.client.post(initiate_contact(V5_3, target_vcpu=7), connection_id=CONN_ID_4)
    assert rig.synic.take_messages() == []
    assert rig.bus.stats()["post_failures"] == 1


# --- offers -------------------------------------------------------------------------------------

def test_offers_one_per_device_then_alloffers_delivered():
    rig = two_device_rig()
    rig.client.connect()
    offers = rig.client.request_offers()
    assert [o.child_relid for o in offers] == [1, 2]
    assert [o.if_type for o in offers] == [rig.devices[0].class_id, rig.devices[1].class_id]
    assert [o.if_instance for o in offers] == [rig.devices[0].instance_id, rig.devices[1].instance_id]
    assert all(o.monitor_allocated == 0 and o.is_dedicated_interrupt == 1 for o in offers)
    assert all(o.sub_channel_index == 0 for o in offers)
    conn_ids = [o.connection_id for o in offers]
    assert conn_ids == [VMBUS_CHANNEL_CONNECTION_ID_BASE + 1, VMBUS_CHANNEL_CONNECTION_ID_BASE + 2]
    assert set(rig.registry.events) == set(conn_ids)
    assert [d["state"] for d in rig.bus.devices()] == ["offered", "offered"]
    rig.check()


def test_offer_carries_the_devices_optional_attributes():
    dev = RecordingDevice()
    dev.chn_flags, dev.mmio_megabytes, dev.user_defined = 0x4, 32, b"hello"
    rig = Rig(devices=[dev])
    rig.client.connect()
    [offer] = rig.client.request_offers()
    assert (offer.chn_flags, offer.mmio_megabytes, offer.user_def[:6]) == (0x4, 32, b"hello\0")


def test_a_second_request_offers_is_ignored():
    rig = Rig()
    rig.client.connect()
    rig.client.request_offers()
    rig.client.post(header(MSG_REQUESTOFFERS))
    assert rig.synic.take_messages() == []
    assert rig.bus.stats()["errors"]["duplicate-request-offers"] == 1


def test_device_added_after_the_offers_is_offered_at_once():
    rig = Rig()
    rig.client.connect()
    rig.client.request_offers()
    late = RecordingDevice("late")
    rig.bus.add_device(late)
    [msg] = rig.synic.take_messages()
    assert msg.msgtype == 1 and struct.unpack_from("<I", msg.payload, 184)[0] == 2


def test_add_device_rejects_duplicates_and_bad_ids():
    rig = Rig()
    with pytest.raises(ValueError):
        rig.bus.add_device(RecordingDevice("dup", instance_id=rig.device.instance_id))
    bad = RecordingDevice("bad")
    bad.class_id = "not-a-uuid"
    with pytest.raises(TypeError):
        rig.bus.add_device(bad)
    big = RecordingDevice("big")
    big.user_defined = bytes(121)
    with pytest.raises(ValueError):
        rig.bus.add_device(big)


# --- GPADLs -------------------------------------------------------------------------------------

def test_gpadl_across_header_and_two_bodies_then_teardown():
    rig = Rig()
    rig.client.connect()
    rig.client.request_offers()
    pages = rig.alloc.alloc(60)              # 26 in the header, 28 in body 1, 6 in body 2
    handle, status = rig.client.create_gpadl(1, pages)
    assert status == 0
    assert rig.bus._gpadls[handle].ring_pages() == pages
    assert rig.bus.stats()["gpadls"] == 1 and rig.bus.stats()["gpadl_pages"] == 60
    rig.client.teardown_gpadl(1, handle)
    assert rig.bus.stats()["gpadls"] == 0 and rig.bus.stats()["gpadl_pages"] == 0
    rig.check()


def test_gpadl_refusals_are_answered_with_a_failure_status():
    rig = Rig()
    rig.client.connect()
    rig.client.request_offers()
    assert rig.client.create_gpadl(9, rig.alloc.alloc(2))[1] != 0          # unknown relid
    handle, status = rig.client.create_gpadl(1, rig.alloc.alloc(2))
    assert status == 0
    rig.client.next_gpadl = handle                                         # the same handle again
    assert rig.client.create_gpadl(1, rig.alloc.alloc(2))[1] != 0
    assert rig.client.create_gpadl(1, [1 << 41])[1] != 0                   # pfn beyond 52 bits
    errors = rig.bus.stats()["errors"]
    assert errors["gpadl-unknown-relid"] == errors["gpadl-duplicate-handle"] == errors["gpadl-bad-pfn"] == 1
    assert rig.bus.stats()["gpadls_refused"] == 3


def test_gpadl_limits(monkeypatch):
    import devices.vmbus.bus as busmod

    monkeypatch.setattr(busmod, "MAX_GPADLS", 2)
    monkeypatch.setattr(busmod, "MAX_GPADL_PAGES_TOTAL", 5)
    rig = Rig()
    rig.client.connect()
    rig.client.request_offers()
    assert rig.client.create_gpadl(1, rig.alloc.alloc(3))[1] == 0
    assert rig.client.create_gpadl(1, rig.alloc.alloc(3))[1] != 0          # 6 pages > 5
    assert rig.client.create_gpadl(1, rig.alloc.alloc(2))[1] == 0
    assert rig.client.create_gpadl(1, rig.alloc.alloc(1))[1] != 0          # third GPADL
    assert rig.bus.stats()["errors"].keys() >= {"gpadl-memory-limit", "gpadl-limit"}


def test_teardown_of_unknown_gpadl_is_still_answered():
    rig = Rig()
    rig.client.connect()
    rig.client.request_offers()
    rig.client.teardown_gpadl(1, 0x1234)
    assert rig.bus.stats()["errors"]["gpadl-teardown-unknown"] == 1


def test_gpadl_body_for_unknown_handle_is_dropped():
    rig = Rig()
    rig.client.connect()
    rig.client.request_offers()
    rig.client.post(header(9) + struct.pack("<IIQ", 0, 0x777, 5))
    assert rig.synic.take_messages() == []
    assert rig.bus.stats()["errors"]["gpadl-body-unknown-handle"] == 1


# --- open, packets, close ------------------------------------------------------------------------

def test_open_then_packets_both_ways():
    rig = Rig()
    ch = rig.open_first()
    dev = rig.device
    assert dev.opened_count == 1 and dev.channel.relid == ch.relid
    assert ch.send(b"from guest", trans_id=42)
    [(channel, payload, trans_id)] = dev.packets
    assert channel is dev.channel and payload == b"from guest\0\0\0\0\0\0" and trans_id == 42
    assert dev.channel.send(b"from host", trans_id=9, completion_requested=True)
    [pkt] = ch.recv()
    assert (pkt.type, pkt.flags, pkt.trans_id, pkt.payload) == (6, 1, 9, b"from host" + bytes(7))
    assert rig.synic.take_events() == [(0, 2, ch.relid)]
    stats = rig.bus.stats()
    assert (stats["packets_in"], stats["packets_out"], stats["channels_open"]) == (1, 1, 1)
    assert rig.bus.devices()[0]["state"] == "open"
    rig.check()


def test_host_signals_the_channels_target_vp_and_modifychannel_moves_it():
    rig = Rig()
    ch = rig.open_first(target_vp=1)
    assert rig.device.channel.send(b"a")
    assert rig.synic.take_events() == [(1, 2, ch.relid)]
    ch.recv()
    rig.client.post(header(MSG_MODIFYCHANNEL) + struct.pack("<II", ch.relid, 0))
    reply = rig.client.expect(MSG_MODIFYCHANNEL_RESPONSE)       # 5.3 answers
    assert struct.unpack_from("<II", reply, 8) == (ch.relid, 0)
    assert rig.device.channel.send(b"b")
    assert rig.synic.take_events() == [(0, 2, ch.relid)]


@pytest.mark.parametrize("version,answered,applied", [(V5_3, True, True), (V5_2, False, True), (V4_0, False, False)])
def test_modifychannel_by_version(version, answered, applied):
    rig = Rig()
    rig.client.connect(versions=(version,))
    ch = rig.client.open(rig.client.request_offers()[0])
    rig.client.post(header(MSG_MODIFYCHANNEL) + struct.pack("<II", ch.relid, 1))
    assert [m.msgtype for m in rig.synic.take_messages()] == ([MSG_MODIFYCHANNEL_RESPONSE] if answered else [])
    assert rig.bus.devices()[0]["target_vp"] == (1 if applied else 0)


def test_open_refusals():
    rig = Rig()
    rig.client.connect()
    [offer] = rig.client.request_offers()
    pages = rig.alloc.alloc(6)
    handle, _ = rig.client.create_gpadl(1, pages)
    odd, _ = rig.client.create_gpadl(1, rig.alloc.alloc(4), byte_count=4 * PAGE - 100)
    outside, _ = rig.client.create_gpadl(1, [100000, 100001, 100002, 100003])  # beyond 4 MiB
    assert rig.client.open_raw(1, 0xDEAD, 2) != 0                  # unknown GPADL
    assert rig.client.open_raw(5, handle, 2) != 0                  # unknown relid
    for offset in (0, 1, 5, 6, 7, 0xFFFFFFFF):                     # each ring needs >= 2 pages
        assert rig.client.open_raw(1, handle, offset) != 0
    assert rig.client.open_raw(1, odd, 2) != 0                     # not whole pages
    assert rig.client.open_raw(1, outside, 2) != 0                 # not guest memory
    assert rig.device.opened_count == 0
    errors = rig.bus.stats()["errors"]
    assert errors["open-bad-ring-offset"] == 6
    assert errors.keys() >= {"open-unknown-gpadl", "open-unknown-relid", "open-gpadl-not-page-aligned",
                             "open-ring-not-in-guest-memory"}
    assert rig.client.open_raw(1, handle, 3) == 0                  # and a good one still works
    assert rig.client.open_raw(1, handle, 3, openid=2) != 0        # ...once
    assert rig.bus.stats()["errors"]["open-already-open"] == 1


def test_gpadl_of_another_channel_cannot_be_opened():
    rig = two_device_rig()
    rig.client.connect()
    rig.client.request_offers()
    handle, _ = rig.client.create_gpadl(2, rig.alloc.alloc(4))
    assert rig.client.open_raw(1, handle, 2) != 0
    assert rig.bus.stats()["errors"]["open-gpadl-of-other-channel"] == 1


def test_close_then_reopen_gets_a_new_channel():
    rig = Rig()
    ch = rig.open_first()
    first = rig.device.channel
    ch.close()
    assert rig.device.closed_count == 1 and rig.device.events == ["opened", "closed"]
    assert not first.send(b"late")                      # the old channel object is dead
    assert rig.bus.devices()[0]["state"] == "offered"
    assert rig.bus.stats()["gpadls"] == 0
    ch2 = rig.client.open(ch.offer)
    assert rig.device.channel is not first and rig.device.opened_count == 2
    assert ch2.send(b"again") and rig.device.packets[-1][1] == b"again\0\0\0"
    rig.check()


def test_close_of_a_channel_that_is_not_open_is_counted():
    rig = Rig()
    rig.client.connect()
    rig.client.request_offers()
    rig.client.post(header(7) + struct.pack("<I", 1))
    rig.client.post(header(7) + struct.pack("<I", 99))
    assert rig.bus.stats()["errors"].keys() >= {"close-not-open", "close-unknown-relid"}
    assert rig.device.closed_count == 0


def test_teardown_of_a_gpadl_in_use_closes_the_channel_first():
    rig = Rig()
    ch = rig.open_first()
    rig.client.teardown_gpadl(ch.relid, ch.gpadl)
    assert rig.device.closed_count == 1
    assert rig.bus.stats()["errors"]["gpadl-teardown-while-open"] == 1
    assert rig.bus.devices()[0]["state"] == "failed"
    ch.close(teardown=False)                            # the guest acknowledges
    assert rig.bus.devices()[0]["state"] == "offered"
    assert rig.device.closed_count == 1


# --- unload, reset, reconnect -------------------------------------------------------------------

def test_unload_closes_everything_and_a_new_guest_starts_over():
    rig = two_device_rig()
    rig.client.connect()
    offers = rig.client.request_offers()
    rig.client.open(offers[0])
    rig.client.create_gpadl(2, rig.alloc.alloc(3))
    rig.client.unload()
    assert [d.closed_count for d in rig.devices] == [1, 0]
    stats = rig.bus.stats()
    assert (stats["state"], stats["gpadls"], stats["channels_open"], stats["unloads"]) == ("disconnected", 0, 0, 1)
    assert rig.registry.events == {}
    assert [d["state"] for d in rig.bus.devices()] == ["not-offered", "not-offered"]
    # kexec: a new kernel with fresh GPADL handles (the old ones must be gone)
    client = rig.new_client()
    client.connect()
    ch = client.open(client.request_offers()[0])
    assert ch.send(b"new kernel")
    assert rig.devices[0].packets[-1][1] == b"new kernel\0\0\0\0\0\0"
    rig.check()


def test_reset_is_unload_without_a_message():
    rig = Rig()
    ch = rig.open_first()
    rig.bus.reset()
    assert rig.synic.take_messages() == []
    assert rig.device.closed_count == 1 and rig.bus.stats()["resets"] == 1
    assert rig.registry.events == {}
    assert ch.kick() != HV_STATUS_SUCCESS              # the event connection is gone
    rig.client = rig.new_client()
    rig.open_first()
    assert rig.device.opened_count == 2
    rig.check()


def test_initiate_contact_while_connected_unloads_first():
    rig = Rig()
    rig.open_first()
    client = rig.new_client()                          # a kdump kernel, no UNLOAD before
    assert client.connect() == V5_3
    assert rig.device.closed_count == 1 and rig.bus.stats()["reconnects"] == 1
    client.open(client.request_offers()[0])
    assert rig.device.opened_count == 2
    rig.check()


def test_unload_when_not_connected_is_answered():
    rig = Rig()
    rig.client.unload()


def test_signal_on_a_closed_channel_is_harmless():
    rig = Rig()
    ch = rig.open_first()
    ch.close()
    assert ch.kick() == HV_STATUS_SUCCESS
    assert rig.bus.stats()["signals_on_closed_channel"] == 1


# --- devices and threads ------------------------------------------------------------------------

def test_device_may_send_from_its_packet_callback():
    rig = Rig(devices=[RecordingDevice(echo=True)])
    ch = rig.open_first()
    for i in range(5):
        assert ch.send(bytes([i]) * 8, trans_id=i)
    assert rig.device.echo_results == [True] * 5
    assert [(p.trans_id, p.payload) for p in ch.recv()] == [(i, bytes([i]) * 8) for i in range(5)]


def test_callbacks_are_not_run_under_the_bus_lock():
    seen = []

    class Probe(RecordingDevice):
        def packet(self, channel, payload, trans_id):
            locked = rig.bus._lock._is_owned()
            seen.append(locked)

    rig = Rig(devices=[Probe()])
    ch = rig.open_first()
    ch.send(b"x")
    assert seen == [False]


def test_a_raising_device_is_counted_and_the_bus_goes_on():
    class Bad(RecordingDevice):
        def packet(self, channel, payload, trans_id):
            raise RuntimeError("device bug")

    rig = Rig(devices=[Bad()])
    ch = rig.open_first()
    ch.send(b"1")
    ch.send(b"2")
    assert rig.bus.stats()["device_errors"] == 2
    assert rig.bus.stats()["packets_in"] == 2
    assert rig.device.channel.send(b"still fine")


def test_concurrent_sends_from_threads_are_delivered_whole_and_in_order():
    rig = Rig()
    ch = rig.open_first(recv_pages=3)
    channel = rig.device.channel
    n_threads, per_thread = 4, 200
    received = []
    done = threading.Event()

    def sender(t: int) -> None:
        i = 0
        while i < per_thread:
            if channel.send(struct.pack("<II", t, i) * (1 + i % 7), trans_id=t):
                i += 1

    def reader() -> None:
        while not done.is_set() or len(received) < n_threads * per_thread:
            received.extend(ch.recv())
            if len(received) >= n_threads * per_thread:
                break

    threads = [threading.Thread(target=sender, args=(t,)) for t in range(n_threads)]
    r = threading.Thread(target=reader)
    r.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    done.set()
    r.join(60)
    assert len(received) == n_threads * per_thread
    nexts = [0] * n_threads
    for p in received:
        t, i = struct.unpack_from("<II", p.payload)
        assert p.trans_id == t and i == nexts[t]
        assert p.payload == struct.pack("<II", t, i) * (1 + i % 7)
        nexts[t] += 1
    rig.check()


def test_stats_and_devices_are_plain_data():
    import json

    rig = two_device_rig()
    rig.open_first()
    json.dumps(rig.bus.stats())
    devs = rig.bus.devices()
    json.dumps(devs)
    assert [(d["name"], d["relid"], d["state"]) for d in devs] == [("balloon", 1, "open"), ("other", 2, "offered")]
    assert devs[0]["class_id"] == str(rig.devices[0].class_id)


def test_the_client_model_catches_a_host_that_answers_wrongly():
    """The client is strict: an answer on the wrong VP is a protocol error, not silently taken."""
    rig = Rig()
    client = VmbusClient(rig.mem, rig.synic, rig.registry, rig.alloc, vp=1)
    rig.client.connect()                     # the bus now talks to VP 0
    rig.client.request_offers()
    client.msg_conn_id = CONN_ID_4
    with pytest.raises(ProtocolError):
        client.create_gpadl(1, rig.alloc.alloc(2))

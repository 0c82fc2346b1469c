"""VMBus protocol constants, named as in Linux's include/linux/hyperv.h, drivers/hv/hyperv_vmbus.h
and include/asm-generic/hyperv-tlfs.h (values from linux-source-6.12). Names with no Linux
counterpart (pyvmm's own choices) are marked so.
"""

from __future__ import annotations

# --- pages and SynIC messages (hyperv-tlfs.h) --------------------------------------------------
HV_HYP_PAGE_SHIFT = 12
HV_HYP_PAGE_SIZE = 1 << HV_HYP_PAGE_SHIFT
HV_MESSAGE_PAYLOAD_BYTE_COUNT = 240
MAX_SIZE_CHANNEL_MESSAGE = HV_MESSAGE_PAYLOAD_BYTE_COUNT
HV_EVENT_FLAGS_COUNT = 256 * 8           # event flags per SINT in the SIEFP page
HV_SYNIC_SINT_COUNT = 16
HVMSG_NONE = 0                           # an empty SIMP slot: a message type must never be 0
HVMSG_TIMER_EXPIRED = 0x80000010         # types with bit 31 set belong to the hypervisor

# The SynIC message type VMBus uses in both directions: Linux posts with hv_post_message(conn_id,
# 1, ...) and its vmbus_on_msg_dpc accepts any type other than HVMSG_NONE (and the timer).
# (pyvmm name; QEMU calls it HV_MESSAGE_VMBUS.)
VMBUS_HV_MESSAGE_TYPE = 1

# --- connection ids and SINTs (hyperv_vmbus.h) ---------------------------------------------------
VMBUS_MESSAGE_CONNECTION_ID = 1
VMBUS_MESSAGE_CONNECTION_ID_4 = 4
VMBUS_MESSAGE_PORT_ID = 1
VMBUS_EVENT_CONNECTION_ID = 2
VMBUS_EVENT_PORT_ID = 2
VMBUS_MONITOR_CONNECTION_ID = 3
VMBUS_MONITOR_PORT_ID = 3
VMBUS_MESSAGE_SINT = 2
VMBUS_CONNECT_CPU = 0

# pyvmm: channel `relid` signals the host on event connection id BASE + relid (the id is ours to
# choose; the guest learns it from the offer's connection_id).
VMBUS_CHANNEL_CONNECTION_ID_BASE = 0x100

# --- protocol versions (hyperv.h), major << 16 | minor -------------------------------------------
VERSION_WS2008 = (0 << 16) | 13
VERSION_WIN7 = (1 << 16) | 1
VERSION_WIN8 = (2 << 16) | 4
VERSION_WIN8_1 = (3 << 16) | 0
VERSION_WIN10 = (4 << 16) | 0
VERSION_WIN10_V4_1 = (4 << 16) | 1
VERSION_WIN10_V5 = (5 << 16) | 0
VERSION_WIN10_V5_1 = (5 << 16) | 1
VERSION_WIN10_V5_2 = (5 << 16) | 2
VERSION_WIN10_V5_3 = (5 << 16) | 3

# --- channel message types (enum vmbus_channel_message_type) ------------------------------------
CHANNELMSG_INVALID = 0
CHANNELMSG_OFFERCHANNEL = 1
CHANNELMSG_RESCIND_CHANNELOFFER = 2
CHANNELMSG_REQUESTOFFERS = 3
CHANNELMSG_ALLOFFERS_DELIVERED = 4
CHANNELMSG_OPENCHANNEL = 5
CHANNELMSG_OPENCHANNEL_RESULT = 6
CHANNELMSG_CLOSECHANNEL = 7
CHANNELMSG_GPADL_HEADER = 8
CHANNELMSG_GPADL_BODY = 9
CHANNELMSG_GPADL_CREATED = 10
CHANNELMSG_GPADL_TEARDOWN = 11
CHANNELMSG_GPADL_TORNDOWN = 12
CHANNELMSG_RELID_RELEASED = 13
CHANNELMSG_INITIATE_CONTACT = 14
CHANNELMSG_VERSION_RESPONSE = 15
CHANNELMSG_UNLOAD = 16
CHANNELMSG_UNLOAD_RESPONSE = 17
CHANNELMSG_18 = 18
CHANNELMSG_19 = 19
CHANNELMSG_20 = 20
CHANNELMSG_TL_CONNECT_REQUEST = 21
CHANNELMSG_MODIFYCHANNEL = 22
CHANNELMSG_TL_CONNECT_RESULT = 23
CHANNELMSG_MODIFYCHANNEL_RESPONSE = 24
CHANNELMSG_COUNT = 25

CHANNELMSG_NAMES = {
    value: name[len("CHANNELMSG_"):].lower()
    for name, value in dict(globals()).items()
    if name.startswith("CHANNELMSG_") and name != "CHANNELMSG_COUNT" and isinstance(value, int)
}

# --- offers --------------------------------------------------------------------------------------
MAX_USER_DEFINED_BYTES = 120
MAX_PIPE_USER_DEFINED_BYTES = 116
VMBUS_CHANNEL_ENUMERATE_DEVICE_INTERFACE = 0x1
VMBUS_CHANNEL_SERVER_SUPPORTS_TRANSFER_PAGES = 0x2
VMBUS_CHANNEL_SERVER_SUPPORTS_GPADLS = 0x4
VMBUS_CHANNEL_NAMED_PIPE_MODE = 0x10
VMBUS_CHANNEL_LOOPBACK_OFFER = 0x100
VMBUS_CHANNEL_PARENT_OFFER = 0x200
VMBUS_CHANNEL_REQUEST_MONITORED_NOTIFICATION = 0x400
VMBUS_CHANNEL_TLNPI_PROVIDER_OFFER = 0x2000
INVALID_RELID = 0xFFFFFFFF
MAX_CHANNEL_RELIDS = HV_EVENT_FLAGS_COUNT   # relids are event-flag numbers: 1 .. 2047

# --- GPADLs --------------------------------------------------------------------------------------
GPADL_TYPE_RING_BUFFER = 1
GPADL_TYPE_SERVER_SAVE_AREA = 2
GPADL_TYPE_TRANSACTION = 8

# --- packets (enum vmbus_packet_type) ------------------------------------------------------------
VM_PKT_INVALID = 0x0
VM_PKT_SYNCH = 0x1
VM_PKT_ADD_XFER_PAGESET = 0x2
VM_PKT_RM_XFER_PAGESET = 0x3
VM_PKT_ESTABLISH_GPADL = 0x4
VM_PKT_TEARDOWN_GPADL = 0x5
VM_PKT_DATA_INBAND = 0x6
VM_PKT_DATA_USING_XFER_PAGES = 0x7
VM_PKT_DATA_USING_GPADL = 0x8
VM_PKT_DATA_USING_GPA_DIRECT = 0x9
VM_PKT_CANCEL_REQUEST = 0xA
VM_PKT_COMP = 0xB
VM_PKT_DATA_USING_ADDITIONAL_PKT = 0xC
VM_PKT_ADDITIONAL_DATA = 0xD
VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED = 1
VMBUS_PKT_TRAILER = 8                    # the u64 "previous indices" after every packet
VMBUS_DEFAULT_MAX_PKT_SIZE = 4096        # Linux's default inbound packet buffer

# --- struct hv_ring_buffer (the first page of each ring) ----------------------------------------
RING_WRITE_INDEX_OFFSET = 0              # pyvmm names for the field offsets
RING_READ_INDEX_OFFSET = 4
RING_INTERRUPT_MASK_OFFSET = 8
RING_PENDING_SEND_SZ_OFFSET = 12
RING_FEATURE_BITS_OFFSET = 64            # after u32 reserved1[12]
RING_FEAT_PENDING_SEND_SZ = 1            # feature_bits.feat_pending_send_sz (bit 0)
RING_HEADER_SIZE = HV_HYP_PAGE_SIZE      # data starts one page in

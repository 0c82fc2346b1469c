"""Device option strings (`--virtio-mem`, `--hv-balloon`): values, and one-line errors."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmm.device_options import (
    DeviceOptionError,
    HvBalloonOptions,
    VirtioMemOptions,
    parse_hv_balloon,
    parse_virtio_mem,
)

MiB, GiB = 1 << 20, 1 << 30


def test_virtio_mem_full_option_string() -> None:
    opts = parse_virtio_mem("id=vm0,size=8G,requested-size=512M,block-size=4M,node=1,memslot-size=1G,"
                            "backend=memfd,prealloc=on")
    assert opts == VirtioMemOptions(id="vm0", size=8 * GiB, requested_size=512 * MiB, block_size=4 * MiB,
                                    node=1, memslot_size=GiB, backend="memfd", prealloc=True)


def test_hv_balloon_defaults_and_values() -> None:
    assert parse_hv_balloon("id=hvb0") == HvBalloonOptions(id="hvb0", memdev_size=0, status_report=False)
    assert parse_hv_balloon("id=hvb0,memdev-size=4G,status-report=on") == \
        HvBalloonOptions(id="hvb0", memdev_size=4 * GiB, status_report=True)


@pytest.mark.parametrize("parse,text,words", [
    (parse_virtio_mem, "size=1G", "id= and size= are required"),
    (parse_virtio_mem, "id=a,size=1G,colour=red", "unknown key 'colour'"),
    (parse_virtio_mem, "id=a,size=lots", "size"),
    (parse_virtio_mem, "id=a,size=1G,backend=tape", "backend must be one of"),
    (parse_virtio_mem, "id=a,id=b,size=1G", "id given twice"),
    (parse_hv_balloon, "memdev-size=1G", "id= is required"),
    (parse_hv_balloon, "id=a,memdev-size=big", "memdev-size"),
    (parse_hv_balloon, "id=a,status-report=maybe", "status-report must be on or off"),
    (parse_hv_balloon, "id=a,novalue", "expected key=value"),
])
def test_bad_strings_name_the_problem(parse, text: str, words: str) -> None:
    with pytest.raises(DeviceOptionError) as err:
        parse(text)
    assert words in str(err.value) and "\n" not in str(err.value)


@given(st.text(alphabet="id=sizemvb0,GMK-12onfr", max_size=40))
def test_any_string_parses_or_gives_a_device_option_error(text: str) -> None:
    for parse in (parse_virtio_mem, parse_hv_balloon):
        try:
            parse(text)
        except DeviceOptionError:
            pass

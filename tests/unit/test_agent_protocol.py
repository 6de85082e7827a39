"""The agent frame/TLV codec, without an agent."""

from __future__ import annotations

import zlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from virtcontainers.agent.protocol import (
    HEADER_SIZE,
    MAGIC,
    MAX_PAYLOAD,
    SYNC_PREAMBLE,
    Fields,
    Frame,
    FrameDecoder,
    FrameType,
    Tag,
    encode_frame,
    tlv,
    tlv_decode,
    tlv_encode,
)
from virtcontainers.errors import AgentError


def test_header_layout_is_frozen() -> None:
    data = encode_frame(FrameType.PING, 0x01020304, b"xyz", 0x0506)
    assert len(data) == HEADER_SIZE + 3 == 27
    assert data[:4] == MAGIC == b"VCAG"
    assert data[4] == 1  # protocol major
    assert data[5] == FrameType.PING
    assert data[6:8] == b"\x05\x06"
    assert data[8:12] == b"\x01\x02\x03\x04"
    assert data[12:16] == (3).to_bytes(4, "big")
    assert data[16:20] == zlib.crc32(b"xyz").to_bytes(4, "big")
    assert data[20:24] == zlib.crc32(data[:20]).to_bytes(4, "big")
    assert data[24:] == b"xyz"


def test_payload_limit() -> None:
    encode_frame(FrameType.STDIN, 1, bytes(MAX_PAYLOAD))
    with pytest.raises(ValueError, match="exceeds"):
        encode_frame(FrameType.STDIN, 1, bytes(MAX_PAYLOAD + 1))


def test_decoder_byte_by_byte() -> None:
    frames = [
        encode_frame(FrameType.STDOUT, 7, b"hello"),
        encode_frame(FrameType.EXIT, 7, b""),
        encode_frame(FrameType.OK, 9, bytes(range(256)) * 10),
    ]
    dec = FrameDecoder()
    got: list[Frame] = []
    for byte in b"".join(frames):
        got += dec.feed(bytes([byte]))
    assert [(f.type, f.id, f.payload) for f in got] == [
        (FrameType.STDOUT, 7, b"hello"),
        (FrameType.EXIT, 7, b""),
        (FrameType.OK, 9, bytes(range(256)) * 10),
    ]
    assert dec.garbage == 0


def test_decoder_skips_corrupt_frames() -> None:
    good = encode_frame(FrameType.OK, 1, b"payload")
    bad_payload = bytearray(encode_frame(FrameType.OK, 2, b"payload"))
    bad_payload[-1] ^= 0xFF
    bad_header = bytearray(encode_frame(FrameType.OK, 3, b"payload"))
    bad_header[9] ^= 0xFF
    too_big = bytearray(encode_frame(FrameType.OK, 4, b""))
    too_big[12:16] = (MAX_PAYLOAD + 1).to_bytes(4, "big")
    too_big[20:24] = zlib.crc32(bytes(too_big[:20])).to_bytes(4, "big")
    dec = FrameDecoder()
    stream = b"junkVCA" + bad_payload + bad_header + too_big + SYNC_PREAMBLE + good
    assert [f.id for f in dec.feed(stream)] == [1]
    assert dec.garbage > 0


def test_truncated_frame_is_flushed_by_the_sync_preamble() -> None:
    stale = encode_frame(FrameType.OK, 5, b"x" * 1000)[:300]
    dec = FrameDecoder()
    assert dec.feed(stale) == []
    got = dec.feed(SYNC_PREAMBLE + encode_frame(FrameType.OK, 6, b"fresh"))
    assert [(f.id, f.payload) for f in got] == [(6, b"fresh")]


@settings(max_examples=200, deadline=None)
@given(
    junk=st.lists(st.binary(max_size=64), max_size=5),
    payloads=st.lists(st.binary(max_size=300), min_size=1, max_size=5),
    split=st.integers(min_value=1, max_value=97),
)
def test_decoder_resyncs_after_any_junk(
    junk: list[bytes], payloads: list[bytes], split: int
) -> None:
    frames = [encode_frame(FrameType.STDOUT, i + 1, p) for i, p in enumerate(payloads)]
    stream = b"".join(j + f for j, f in zip(junk + [b""] * len(frames), frames, strict=False))
    dec = FrameDecoder()
    got: list[Frame] = []
    for i in range(0, len(stream), split):
        got += dec.feed(stream[i : i + split])
    # junk may swallow at most the frame it overlaps only if it forged a valid header CRC
    assert [(f.id, f.payload) for f in got] == [(i + 1, p) for i, p in enumerate(payloads)]


def test_tlv_round_trip_and_fields() -> None:
    items = [
        tlv(Tag.ARG, "echo"),
        tlv(Tag.ARG, "hé"),
        tlv(Tag.UID, 1000, 4),
        tlv(Tag.OFFSET, 1 << 40, 8),
        tlv(Tag.TTY, 1, 1),
        tlv(Tag.DATA, b"\x00\xff"),
    ]
    payload = tlv_encode(items)
    assert tlv_decode(payload) == items
    fields = Fields(payload)
    assert fields.uint(Tag.UID) == 1000
    assert fields.uint(Tag.OFFSET) == 1 << 40
    assert fields.opt_uint(Tag.GID) is None
    assert fields.uint(Tag.GID, 5) == 5
    assert fields.raw(Tag.DATA) == b"\x00\xff"
    assert [v for t, v in fields.items if t == Tag.ARG] == [b"echo", "hé".encode()]
    with pytest.raises(AgentError, match="PID is missing"):
        fields.uint(Tag.PID)
    with pytest.raises(ValueError, match="width"):
        tlv(Tag.UID, 1)


@pytest.mark.parametrize(
    "payload",
    [b"\x00\x01\x00\x00", b"\x00\x01\x00\x00\x00\x09abc"],
    ids=["short-header", "overrun"],
)
def test_tlv_decode_rejects_malformed(payload: bytes) -> None:
    with pytest.raises(AgentError, match="malformed"):
        tlv_decode(payload)

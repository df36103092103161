"""iSCSI without sockets: PDU bytes (RFC 7143), login replays with CHAP (RFC 1994), SCSI
CDBs and replies (SPC-4, SBC-3), and ``iscsi://`` URL parsing.

The expected bytes are built here with :mod:`struct` from the RFC's PDU diagrams, not
with the encoders under test, so a shifted field shows up as a mismatch.
"""

from __future__ import annotations

import base64
import hashlib
import struct
from typing import Any, cast

import pytest
from hypothesis import given
from hypothesis import strategies as st

from trioconv import ImageError
from trioconv._open import redact_location
from trioconv.protocols.iscsi import ISCSIAddress, parse_iscsi_uri
from trioconv.protocols.iscsi import _client as client
from trioconv.protocols.iscsi import _login as login
from trioconv.protocols.iscsi import _pdu as pdu
from trioconv.protocols.iscsi import _scsi as scsi
from trioconv.protocols.iscsi._pdu import Opcode

ISID = bytes((0x80, 0x12, 0x34, 0x56, 0x78, 0x9A))  # random format (T=10b)
INITIATOR = "iqn.2024-01.io.trioconv:test"
TARGET = "iqn.2003-01.org.example:disk1"
LOGIN_ITT = 0x0A0B0C0D
MASK32 = 0xFFFFFFFF


def u32(*values: int) -> bytes:
    return struct.pack(f">{len(values)}I", *values)


def padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


def target_pdu(
    opcode: int,
    *,
    flags: int = 0x80,
    b2: int = 0,
    b3: int = 0,
    ahs_words: int = 0,
    data: bytes = b"",
    field8: bytes = bytes(8),
    itt: int = 1,
    ttt: int = MASK32,
    stat_sn: int = 0,
    exp_cmd_sn: int = 0,
    max_cmd_sn: int = 0,
    w36: int = 0,
    w40: int = 0,
    w44: int = 0,
) -> bytes:
    """A target PDU as the RFC 7143 diagrams lay it out (every response shares this shape)."""
    assert len(field8) == 8
    head = bytes((opcode, flags, b2, b3, ahs_words)) + len(data).to_bytes(3, "big") + field8
    head += u32(itt, ttt, stat_sn, exp_cmd_sn, max_cmd_sn, w36, w40, w44)
    assert len(head) == 48
    return head + bytes(4 * ahs_words) + padded(data)


def fixed_sense(key: int, asc: int, ascq: int, *, code: int = 0x70, byte2_high: int = 0) -> bytes:
    """SPC-4 fixed-format sense data, 18 bytes (additional sense length 10)."""
    sense = bytearray(18)
    sense[0] = code
    sense[2] = byte2_high | key
    sense[7] = 10
    sense[12] = asc
    sense[13] = ascq
    return bytes(sense)


def descriptor_sense(key: int, asc: int, ascq: int, *, code: int = 0x72) -> bytes:
    """SPC-4 descriptor-format sense data without descriptors (8 bytes)."""
    return bytes((code, key, asc, ascq, 0, 0, 0, 0))


# -- encoders: bytes at their RFC 7143 offsets ---------------------------------------------


def test_scsi_command_read_layout() -> None:
    cdb = scsi.cdb_read_16(0x0102030405060708, 128)
    head = pdu.encode_scsi_command(
        lun=5,
        itt=0x11223344,
        cdb=cdb,
        expected_length=65536,
        cmd_sn=0xFFFFFFFE,
        exp_stat_sn=0x77,
        read=True,
    )
    assert len(head) == pdu.BHS_SIZE
    assert head[0] == 0x01  # not immediate: a SCSI command takes a CmdSN slot
    assert head[1] == 0x80 | 0x40 | 0x01  # F, R, ATTR=Simple
    assert head[2:4] == bytes(2)
    assert head[4] == 0  # TotalAHSLength
    assert head[5:8] == bytes(3)  # no immediate data
    assert head[8:16] == bytes((0, 5)) + bytes(6)  # peripheral device addressing
    assert head[16:20] == u32(0x11223344)
    assert head[20:24] == u32(65536)  # Expected Data Transfer Length
    assert head[24:28] == u32(0xFFFFFFFE)  # CmdSN
    assert head[28:32] == u32(0x77)  # ExpStatSN
    assert head[32:48] == cdb


def test_scsi_command_write_with_immediate_data_and_unsolicited_follow_up() -> None:
    cdb = scsi.cdb_write_16(8, 16)
    head = pdu.encode_scsi_command(
        lun=300,
        itt=9,
        cdb=cdb,
        expected_length=8192,
        cmd_sn=1,
        exp_stat_sn=2,
        write=True,
        final=False,
        immediate_length=4096,
    )
    assert head[1] == 0x20 | 0x01  # W and Simple; F clear: unsolicited Data-Out follows
    assert int.from_bytes(head[5:8], "big") == 4096  # DataSegmentLength = immediate data
    assert head[8:10] == bytes((0x40 | (300 >> 8), 300 & 0xFF))  # flat space addressing
    assert head[20:24] == u32(8192)
    assert pdu.pdu_length(head) == 48 + 4096


def test_scsi_command_short_cdb_is_zero_filled_and_long_cdb_refused() -> None:
    head = pdu.encode_scsi_command(
        lun=0, itt=1, cdb=scsi.cdb_test_unit_ready(), expected_length=0, cmd_sn=0, exp_stat_sn=0
    )
    assert head[1] == 0x81  # neither R nor W for a command without data
    assert head[32:48] == bytes(16)
    with pytest.raises(ValueError, match="AHS"):
        pdu.encode_scsi_command(
            lun=0, itt=1, cdb=bytes(17), expected_length=0, cmd_sn=0, exp_stat_sn=0
        )


@pytest.mark.parametrize("final", [True, False])
def test_data_out_layout(final: bool) -> None:
    """The first Data-Out BHS of a sequence; F only when it is also the last."""
    heads = pdu.encode_data_out_sequence(
        lun=2,
        itt=0xCAFE,
        ttt=0x00ABCDEF,
        exp_stat_sn=0x99,
        offset=0x20000,
        length=1001 if final else 2002,
        segment=1001,
    )
    head = bytes(heads[:48])
    assert len(heads) == (48 if final else 96)
    assert head[0] == 0x05
    assert head[1] == (0x80 if final else 0x00)
    assert head[2:5] == bytes(3)
    assert int.from_bytes(head[5:8], "big") == 1001
    assert head[8:16] == bytes((0, 2)) + bytes(6)
    assert head[16:20] == u32(0xCAFE)
    assert head[20:24] == u32(0x00ABCDEF)  # Target Transfer Tag from the R2T
    assert head[24:28] == bytes(4)  # reserved
    assert head[28:32] == u32(0x99)  # ExpStatSN
    assert head[32:36] == bytes(4)  # reserved
    assert head[36:40] == u32(0)  # DataSN
    assert head[40:44] == u32(0x20000)  # Buffer Offset
    assert head[44:48] == bytes(4)  # reserved
    assert pdu.pdu_length(head) == 48 + 1001 + 3


@pytest.mark.parametrize(
    ("offset", "length", "segment"),
    [(0, 8192, 8192), (4096, 65536, 8192), (0, 1001, 512), (512, 262144, 262144), (0, 0, 8192)],
)
def test_data_out_sequence_numbers_and_offsets(offset: int, length: int, segment: int) -> None:
    """One BHS per segment: DataSN from 0, Buffer Offset stepping on by the segment,
    each segment's length, F on the last only."""
    heads = pdu.encode_data_out_sequence(
        lun=3, itt=7, ttt=0x1234, exp_stat_sn=42, offset=offset, length=length, segment=segment
    )
    end = offset + length
    starts = list(range(offset, end, segment))
    assert len(heads) == 48 * len(starts)
    for sn, pos in enumerate(starts):
        head = bytes(heads[sn * 48 : (sn + 1) * 48])
        assert head[0] == 0x05
        assert head[1] == (0x80 if pos + segment >= end else 0)
        assert int.from_bytes(head[5:8], "big") == min(segment, end - pos)
        assert head[16:24] == u32(7) + u32(0x1234)
        assert head[28:32] == u32(42)
        assert head[36:44] == u32(sn) + u32(pos)


def test_data_out_sequence_refuses_bad_segments() -> None:
    for segment, message in ((0, "empty"), (1 << 24, "too long")):
        with pytest.raises(ValueError, match=message):
            pdu.encode_data_out_sequence(
                lun=0, itt=1, ttt=2, exp_stat_sn=0, offset=0, length=4096, segment=segment
            )


@pytest.mark.parametrize(
    ("csg", "nsg", "transit", "flags"),
    [
        (0, 1, True, 0x81),  # T, CSG=Security, NSG=Operational
        (1, 3, True, 0x87),  # T, CSG=Operational, NSG=FullFeature
        (0, 3, True, 0x83),
        (0, 1, False, 0x00),  # without T the NSG field is reserved (0)
        (1, 3, False, 0x04),
    ],
)
def test_login_request_flags(csg: int, nsg: int, transit: bool, flags: int) -> None:
    request = pdu.encode_login(
        isid=ISID, tsih=0, itt=1, cid=0, cmd_sn=0, exp_stat_sn=0, csg=csg, nsg=nsg,
        transit=transit, text=b"",
    )  # fmt: skip
    assert request[1] == flags
    assert len(request) == 48


def test_login_request_layout_and_text_padding() -> None:
    text = b"AuthMethod=None\0"[:-3]  # 13 bytes: 3 bytes of padding
    request = pdu.encode_login(
        isid=ISID, tsih=0x1234, itt=0x0A0B0C0D, cid=0x0102, cmd_sn=7, exp_stat_sn=0x55,
        csg=1, nsg=3, transit=True, text=text,
    )  # fmt: skip
    assert request[0] == 0x43  # I bit + Login Request
    assert request[1] == 0x87
    assert request[2:4] == bytes(2)  # Version-max, Version-min = 0
    assert request[4] == 0
    assert int.from_bytes(request[5:8], "big") == 13
    assert request[8:14] == ISID
    assert request[14:16] == b"\x12\x34"  # TSIH
    assert request[16:20] == u32(0x0A0B0C0D)
    assert request[20:22] == b"\x01\x02"  # CID
    assert request[22:24] == bytes(2)
    assert request[24:28] == u32(7)
    assert request[28:32] == u32(0x55)
    assert request[32:48] == bytes(16)
    assert request[48:61] == text
    assert request[61:] == bytes(3)
    assert len(request) == pdu.pdu_length(request) == 64


def test_login_request_needs_a_six_byte_isid() -> None:
    with pytest.raises(ValueError, match="ISID"):
        pdu.encode_login(
            isid=bytes(5), tsih=0, itt=0, cid=0, cmd_sn=0, exp_stat_sn=0, csg=0, nsg=1,
            transit=True, text=b"",
        )  # fmt: skip


@pytest.mark.parametrize("reason", [0, 1, 2])
def test_logout_layout(reason: int) -> None:
    request = pdu.encode_logout(itt=0x42, cid=0x0304, cmd_sn=10, exp_stat_sn=11, reason=reason)
    assert len(request) == 48
    assert request[0] == 0x46  # I bit + Logout Request
    assert request[1] == 0x80 | reason  # the F-position bit is always 1, then the reason code
    assert request[4:16] == bytes(12)  # no AHS, no data, reserved LUN field
    assert request[16:20] == u32(0x42)
    assert request[20:22] == b"\x03\x04"
    assert request[22:24] == bytes(2)
    assert request[24:28] == u32(10)
    assert request[28:32] == u32(11)
    assert request[32:48] == bytes(16)


def test_nop_out_answering_a_target_ping_echoes_ttt_and_data() -> None:
    reply = pdu.encode_nop_out(
        lun=1, itt=pdu.RESERVED_TAG, ttt=0x5A5A0001, cmd_sn=20, exp_stat_sn=21, data=b"ping!"
    )
    assert reply[0] == 0x40  # I bit + NOP-Out
    assert reply[1] == 0x80
    assert int.from_bytes(reply[5:8], "big") == 5
    assert reply[8:16] == bytes((0, 1)) + bytes(6)
    assert reply[16:20] == b"\xff\xff\xff\xff"  # an answer, not a ping: ITT reserved
    assert reply[20:24] == u32(0x5A5A0001)  # the target's TTT copied
    assert reply[24:28] == u32(20)
    assert reply[28:32] == u32(21)
    assert reply[32:48] == bytes(16)
    assert reply[48:] == b"ping!" + bytes(3)
    assert len(reply) == pdu.pdu_length(reply)


def test_text_request_layout() -> None:
    request = pdu.encode_text(itt=3, cmd_sn=4, exp_stat_sn=5, text=b"SendTargets=All\0")
    assert request[0] == 0x04
    assert request[1] == 0x80
    assert int.from_bytes(request[5:8], "big") == 16
    assert request[16:20] == u32(3)
    assert request[20:24] == b"\xff\xff\xff\xff"  # TTT: a new text request
    assert request[24:32] == u32(4, 5)
    assert request[48:] == b"SendTargets=All\0"


# -- pdu_length ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ahs_words", "data_length", "total"),
    [(0, 0, 48), (0, 1, 52), (0, 4, 52), (2, 5, 48 + 8 + 8), (255, 0, 48 + 1020)],
)
def test_pdu_length_counts_ahs_and_padding(ahs_words: int, data_length: int, total: int) -> None:
    bhs = bytes((0x25, 0x80, 0, 0, ahs_words)) + data_length.to_bytes(3, "big") + bytes(40)
    assert pdu.pdu_length(bhs) == total
    assert pdu.pdu_length(memoryview(bytearray(bhs))) == total


def test_pdu_length_of_the_largest_segment() -> None:
    bhs = bytes(5) + b"\xff\xff\xff" + bytes(40)
    assert pdu.pdu_length(bhs) == 48 + (1 << 24) - 1 + 1


def test_pdu_length_needs_a_whole_bhs() -> None:
    with pytest.raises(ValueError, match="48"):
        pdu.pdu_length(bytes(47))


@given(st.integers(0, 1 << 20))
def test_pad_length(n: int) -> None:
    pad = pdu.pad_length(n)
    assert 0 <= pad < 4
    assert (n + pad) % 4 == 0


# -- LUN ------------------------------------------------------------------------------------


@given(st.integers(0, 16383))
def test_lun_round_trip(lun: int) -> None:
    field = pdu.encode_lun(lun)
    assert len(field) == 8
    assert field[2:] == bytes(6)
    # SAM: address method 00b (peripheral, bus 0) below 256, 01b (flat space) above.
    assert field[0] >> 6 == (0 if lun < 256 else 1)
    assert pdu.decode_lun(field) == lun


@pytest.mark.parametrize("lun", [-1, 16384, 1 << 20])
def test_lun_out_of_range(lun: int) -> None:
    with pytest.raises(ValueError, match="out of range"):
        pdu.encode_lun(lun)


# -- serial number arithmetic (RFC 1982, SERIAL_BITS = 32) ------------------------------------

serials = st.integers(0, MASK32)


def rfc1982_lt(i1: int, i2: int) -> bool:
    """RFC 1982 section 3.2, literally."""
    half = 1 << 31
    return (i1 < i2 and i2 - i1 < half) or (i1 > i2 and i1 - i2 > half)


@given(serials, serials)
def test_sn_lt_matches_rfc1982(a: int, b: int) -> None:
    assert pdu.sn_lt(a, b) == rfc1982_lt(a, b)
    assert pdu.sn_le(a, b) == (a == b or rfc1982_lt(a, b))


@given(serials, st.integers(1, (1 << 31) - 1))
def test_sn_adding_less_than_half_the_space_is_greater(a: int, n: int) -> None:
    b = (a + n) & MASK32
    assert pdu.sn_lt(a, b)
    assert pdu.sn_le(a, b)
    assert not pdu.sn_lt(b, a)
    assert not pdu.sn_le(b, a)


@given(serials)
def test_sn_irreflexive_and_half_way_undefined(a: int) -> None:
    assert not pdu.sn_lt(a, a)
    assert pdu.sn_le(a, a)
    other = (a + (1 << 31)) & MASK32
    # Exactly 2**31 apart the comparison is undefined (RFC 1982 3.2): neither is smaller.
    assert not pdu.sn_lt(a, other)
    assert not pdu.sn_lt(other, a)


@given(serials, serials)
def test_sn_lt_is_antisymmetric(a: int, b: int) -> None:
    assert not (pdu.sn_lt(a, b) and pdu.sn_lt(b, a))


def test_sn_wrap_around() -> None:
    assert pdu.sn_lt(MASK32, 0)
    assert not pdu.sn_lt(0, MASK32)
    assert pdu.sn_le(0xFFFFFFF0, 5)
    assert not pdu.sn_le(5, 0xFFFFFFF0)


# -- decode_bhs on target PDUs ----------------------------------------------------------------


def test_scsi_response_with_sense_in_its_data_segment() -> None:
    sense = fixed_sense(0x5, 0x21, 0x00)
    segment = len(sense).to_bytes(2, "big") + sense
    raw = target_pdu(
        0x21, flags=0x80 | 0x02, b2=0x00, b3=0x02, data=segment, itt=0x77,
        stat_sn=100, exp_cmd_sn=200, max_cmd_sn=231, w36=0, w40=0, w44=512,
    )  # fmt: skip
    header = pdu.decode_bhs(raw)
    assert header.opcode is Opcode.SCSI_RESPONSE
    assert header.final
    assert header.has_status
    assert header.status == scsi.SCSIStatus.CHECK_CONDITION
    assert header.b2 == 0  # iSCSI response: command completed at target
    assert header.residual == 512  # U bit: 512 bytes not transferred
    assert header.itt == 0x77
    assert (header.stat_sn, header.exp_cmd_sn, header.max_cmd_sn) == (100, 200, 231)
    assert header.data_length == 20
    assert pdu.pdu_length(raw) == len(raw) == 48 + 20
    data = raw[48 : 48 + header.data_length]
    assert scsi.sense_of_response(data) == scsi.Sense(0x5, 0x21, 0x00)


def test_data_in_with_status_and_residual() -> None:
    raw = target_pdu(
        0x25, flags=0x80 | 0x02 | 0x01, b3=0x00, data=b"abc", field8=bytes((0, 1)) + bytes(6),
        itt=0x10, ttt=MASK32, stat_sn=5, exp_cmd_sn=6, max_cmd_sn=37, w36=4, w40=8192, w44=1024,
    )  # fmt: skip
    header = pdu.decode_bhs(raw)
    assert header.opcode is Opcode.DATA_IN
    assert header.has_status
    assert header.status == scsi.SCSIStatus.GOOD
    assert header.word36 == 4  # DataSN
    assert header.word40 == 8192  # Buffer Offset
    assert header.residual == 1024
    assert header.data_length == 3
    assert pdu.decode_lun(header.field8) == 1
    assert pdu.pdu_length(raw) == 48 + 4


def test_data_in_without_status_bit() -> None:
    # Residual Count is only meaningful with the S bit; neither O nor U set here.
    header = pdu.decode_bhs(target_pdu(0x25, flags=0x00, data=bytes(8), w44=77))
    assert not header.has_status
    assert not header.final
    assert header.residual == 0


def test_data_in_overflow_residual() -> None:
    header = pdu.decode_bhs(target_pdu(0x25, flags=0x80 | 0x04 | 0x01, w44=4096))
    assert header.residual == 4096


def test_r2t_fields() -> None:
    raw = target_pdu(
        0x31, flags=0x80, itt=0x21, ttt=0x00C0FFEE, stat_sn=9, exp_cmd_sn=10, max_cmd_sn=41,
        w36=2, w40=65536, w44=262144,
    )  # fmt: skip
    header = pdu.decode_bhs(raw)
    assert header.opcode is Opcode.R2T
    assert not header.has_status
    assert header.ttt == 0x00C0FFEE
    assert header.word36 == 2  # R2TSN
    assert header.word40 == 65536  # Buffer Offset
    assert header.word44 == 262144  # Desired Data Transfer Length


def test_login_response_status_class_and_detail() -> None:
    raw = target_pdu(
        0x23, flags=0x80 | (1 << 2) | 3, b2=0x00, b3=0x00, field8=ISID + b"\x00\x2a",
        itt=LOGIN_ITT, ttt=0, stat_sn=1, exp_cmd_sn=2, max_cmd_sn=3, w36=0x0203 << 16,
    )  # fmt: skip
    header = pdu.decode_bhs(raw)
    assert header.opcode is Opcode.LOGIN_RESPONSE
    assert header.transit
    assert not header.more_text
    assert (header.csg, header.nsg) == (1, 3)
    assert header.field8[:6] == ISID
    assert header.tsih == 0x2A
    assert header.status_class == 2
    assert header.status_detail == 3


def test_login_response_continue_bit() -> None:
    header = pdu.decode_bhs(target_pdu(0x23, flags=0x40 | (1 << 2)))
    assert header.more_text
    assert not header.transit
    assert header.csg == 1


def test_reject_carries_reason_and_the_rejected_header() -> None:
    rejected = pdu.encode_nop_out(lun=0, itt=0x1234, ttt=MASK32, cmd_sn=1, exp_stat_sn=2)
    raw = target_pdu(0x3F, b2=0x04, data=rejected, itt=MASK32, stat_sn=7, w36=0)
    header = pdu.decode_bhs(raw)
    assert header.opcode is Opcode.REJECT
    assert header.b2 == 0x04  # protocol error
    assert header.itt == MASK32
    assert header.data_length == 48
    data = raw[48 : 48 + header.data_length]
    assert int.from_bytes(data[16:20], "big") == 0x1234  # the rejected PDU's ITT


def test_async_message_event() -> None:
    # AsyncEvent 1 (logout requested) in byte 36, AsyncVCode 0, Parameter3 = 2 (Time2Wait)
    raw = target_pdu(
        0x32, itt=MASK32, stat_sn=3, exp_cmd_sn=4, max_cmd_sn=5, w36=0x01000000, w40=0x00000002
    )
    header = pdu.decode_bhs(raw)
    assert header.opcode is Opcode.ASYNC_MESSAGE
    assert header.async_event == 1
    assert header.stat_sn == 3


def test_decode_bhs_counts_ahs_in_words_and_ignores_the_immediate_bit() -> None:
    raw = bytearray(target_pdu(0x21, ahs_words=3))
    raw[0] |= 0x40
    header = pdu.decode_bhs(memoryview(raw))
    assert header.opcode is Opcode.SCSI_RESPONSE
    assert header.ahs_length == 12
    assert pdu.pdu_length(raw) == 48 + 12


@pytest.mark.parametrize("opcode", [0x00, 0x01, 0x03, 0x05])
def test_decode_bhs_refuses_initiator_opcodes(opcode: int) -> None:
    with pytest.raises(pdu.ProtocolError, match="initiator opcode"):
        pdu.decode_bhs(target_pdu(opcode))


@pytest.mark.parametrize("opcode", [0x07, 0x27, 0x3E])
def test_decode_bhs_refuses_unknown_opcodes(opcode: int) -> None:
    with pytest.raises(pdu.ProtocolError, match=f"0x{opcode:02x}"):
        pdu.decode_bhs(target_pdu(opcode))


def test_decode_bhs_refuses_a_short_header() -> None:
    with pytest.raises(pdu.ProtocolError, match="short"):
        pdu.decode_bhs(bytes(47))


# -- text keys -------------------------------------------------------------------------------

key_names = st.text(
    st.sampled_from("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-+@_"),
    min_size=1,
    max_size=63,
)
key_values = st.text(st.characters(codec="utf-8", exclude_characters="\0"))


@given(st.dictionaries(key_names, key_values, max_size=12))
def test_text_round_trip(pairs: dict[str, str]) -> None:
    data = login.encode_text(pairs)
    assert data.count(b"\0") == len(pairs)
    assert login.decode_text(data) == pairs


def test_text_bytes_and_tolerance() -> None:
    assert login.encode_text({"A": "1", "B": "x=y"}) == b"A=1\0B=x=y\0"
    # Values may hold '=', empty values are values, padding NULs are skipped.
    assert login.decode_text(b"A=1\0B=x=y\0C=\0\0\0") == {"A": "1", "B": "x=y", "C": ""}
    assert login.decode_text(b"A=1\0A=2\0") == {"A": "2"}


@pytest.mark.parametrize("data", [b"novalue\0", b"A=1\0junk\0", b"A=1\0\xff\xfe=1\0", b"K=\xc3\0"])
def test_malformed_text_is_refused(data: bytes) -> None:
    with pytest.raises(login.LoginError):
        login.decode_text(data)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0x0102ff", b"\x01\x02\xff"),
        ("0X0102FF", b"\x01\x02\xff"),
        ("0xabc", b"\x0a\xbc"),  # odd number of digits: a leading 0 is implied
        ("0b" + base64.b64encode(b"\x00\x01challenge").decode(), b"\x00\x01challenge"),
        ("0B" + base64.b64encode(b"xyz").decode(), b"xyz"),
    ],
)
def test_binary_values(value: str, expected: bytes) -> None:
    assert login._decode_binary(value) == expected


@pytest.mark.parametrize("value", ["0xzz", "0b!!!!", "1234", "", "0b" + "QQ="])
def test_malformed_binary_values(value: str) -> None:
    with pytest.raises(login.LoginError, match="malformed binary"):
        login._decode_binary(value)


def test_chap_response_is_md5_of_id_secret_challenge() -> None:
    # RFC 1994 4.1: MD5 over Identifier || secret || Challenge Value.
    challenge = bytes(range(16))
    expected = hashlib.md5(b"\x07" + b"s3cret" + challenge, usedforsecurity=False).digest()
    assert login.chap_response(7, b"s3cret", challenge) == expected
    assert login.chap_response(8, b"s3cret", challenge) != expected


def test_new_isid_is_random_format() -> None:
    a, b = login.new_isid(), login.new_isid()
    assert len(a) == 6
    assert a[0] >> 6 == 0b10  # RFC 7143 11.12.5: T = 10b, random
    assert a != b


# -- login conversations replayed byte-exact ---------------------------------------------------


def login_request(
    flags: int, text: bytes, *, cmd_sn: int = 0, exp_stat_sn: int = 0, tsih: int = 0
) -> bytes:
    """The Login Request the initiator must send (RFC 7143 11.12), built from the diagram."""
    head = bytes((0x43, flags, 0x00, 0x00, 0)) + len(text).to_bytes(3, "big")
    head += ISID + tsih.to_bytes(2, "big") + u32(LOGIN_ITT)
    head += b"\x00\x00" + bytes(2) + u32(cmd_sn, exp_stat_sn) + bytes(16)
    return head + padded(text)


def login_response(
    flags: int,
    text: bytes = b"",
    *,
    stat_sn: int,
    exp_cmd_sn: int = 0,
    max_cmd_sn: int = 0,
    tsih: int = 0,
    status: tuple[int, int] = (0, 0),
) -> bytes:
    """A target's Login Response (RFC 7143 11.13)."""
    return target_pdu(
        0x23, flags=flags, b2=0x00, b3=0x00, data=text, field8=ISID + tsih.to_bytes(2, "big"),
        itt=LOGIN_ITT, ttt=0, stat_sn=stat_sn, exp_cmd_sn=exp_cmd_sn, max_cmd_sn=max_cmd_sn,
        w36=(status[0] << 24) | (status[1] << 16),
    )  # fmt: skip


def converse(state: login.Login, exchanges: list[tuple[bytes, bytes]]) -> None:
    """Check every request against the expected bytes and feed the target's answers."""
    request: bytes | None = state.start()
    for number, (expected, answer) in enumerate(exchanges):
        assert request is not None, f"the login ended before exchange {number}"
        assert request == expected, f"request {number} differs"
        header = pdu.decode_bhs(answer)
        assert pdu.pdu_length(answer) == len(answer)
        request = state.receive(header, answer[48 : 48 + header.data_length])
    assert request is None, "the initiator wants to keep talking"
    assert state.done


def first_text(auth: str) -> bytes:
    return (
        f"InitiatorName={INITIATOR}\0SessionType=Normal\0TargetName={TARGET}\0AuthMethod={auth}\0"
    ).encode()


#: The operational proposals, as RFC 7143 section 13 spells the keys.
OPERATIONAL_TEXT = (
    b"HeaderDigest=None\0DataDigest=None\0MaxConnections=1\0InitialR2T=No\0"
    b"ImmediateData=Yes\0MaxRecvDataSegmentLength=262144\0MaxBurstLength=16776192\0"
    b"FirstBurstLength=262144\0DefaultTime2Wait=2\0DefaultTime2Retain=0\0"
    b"MaxOutstandingR2T=1\0DataPDUInOrder=Yes\0DataSequenceInOrder=Yes\0ErrorRecoveryLevel=0\0"
)

#: A target that answers with its own (more conservative) values.
TARGET_ANSWER = (
    b"HeaderDigest=None\0DataDigest=None\0MaxConnections=1\0InitialR2T=Yes\0"
    b"ImmediateData=Yes\0MaxRecvDataSegmentLength=8192\0MaxBurstLength=262144\0"
    b"FirstBurstLength=65536\0DefaultTime2Wait=2\0DefaultTime2Retain=0\0"
    b"MaxOutstandingR2T=1\0DataPDUInOrder=Yes\0DataSequenceInOrder=Yes\0"
    b"ErrorRecoveryLevel=0\0TargetPortalGroupTag=1\0"
)

SEC_TO_OP = 0x80 | (0 << 2) | 1
OP_TO_FULL = 0x80 | (1 << 2) | 3
SEC_STAY = 0x00
OP_STAY = 1 << 2


def new_login(chap: tuple[str, str] | None = None) -> login.Login:
    return login.Login(INITIATOR, TARGET, ISID, chap=chap, itt=LOGIN_ITT)


def test_login_without_authentication() -> None:
    state = new_login()
    converse(
        state,
        [
            (
                login_request(SEC_TO_OP, first_text("None")),
                login_response(
                    SEC_TO_OP, b"AuthMethod=None\0TargetPortalGroupTag=1\0", stat_sn=0x100
                ),
            ),
            (
                login_request(OP_TO_FULL, OPERATIONAL_TEXT, exp_stat_sn=0x101),
                login_response(
                    OP_TO_FULL, TARGET_ANSWER, stat_sn=0x101, max_cmd_sn=31, tsih=0x0A0A
                ),
            ),
        ],
    )
    assert state.params == login.Params(
        max_send_segment=8192,  # the target's declared MaxRecvDataSegmentLength
        max_recv_segment=262144,  # ours
        max_burst=262144,  # min(16776192, 262144)
        first_burst=65536,  # min(262144, 65536)
        initial_r2t=True,  # No OR Yes
        immediate_data=True,  # Yes AND Yes
        max_outstanding_r2t=1,
        data_pdu_in_order=True,
        data_sequence_in_order=True,
        tsih=0x0A0A,
    )
    assert (state.cmd_sn, state.exp_stat_sn, state.max_cmd_sn) == (0, 0x102, 31)


def test_login_results_follow_the_rfc_combining_rules() -> None:
    # ImmediateData is AND: a target saying No wins; InitialR2T is OR: our No with the
    # target's No stays No; DataPDUInOrder OR: Yes wins. Numbers take the minimum.
    answer = (
        b"InitialR2T=No\0ImmediateData=No\0MaxBurstLength=1048576\0FirstBurstLength=524288\0"
        b"MaxRecvDataSegmentLength=65536\0DataPDUInOrder=No\0MaxOutstandingR2T=4\0"
        b"TargetAlias=disk one\0"
    )
    state = login_without_auth(answer)
    params = state.params
    assert params.max_send_segment == 65536
    assert params.max_burst == 1048576
    assert params.first_burst == 262144  # min(ours 262144, theirs 524288)
    assert not params.initial_r2t
    assert not params.immediate_data
    assert params.data_pdu_in_order  # OR with our Yes
    assert params.max_outstanding_r2t == 1  # min(1, 4)
    assert params.target_alias == "disk one"


def test_login_straight_to_full_feature_phase_keeps_the_defaults() -> None:
    state = new_login()
    converse(
        state,
        [
            (
                login_request(SEC_TO_OP, first_text("None")),
                login_response(0x80 | 3, b"AuthMethod=None\0", stat_sn=5, tsih=9),
            ),
        ],
    )
    assert state.params == login.Params(max_recv_segment=262144, tsih=9)


def chap_exchanges(
    challenge_text: str, challenge: bytes, *, ident: int = 0x2A
) -> list[tuple[bytes, bytes]]:
    answer = hashlib.md5(bytes((ident,)) + b"pa55word" + challenge, usedforsecurity=False)
    return [
        (
            login_request(SEC_STAY, first_text("CHAP,None")),
            login_response(SEC_STAY, b"AuthMethod=CHAP\0TargetPortalGroupTag=1\0", stat_sn=10),
        ),
        (
            login_request(SEC_STAY, b"CHAP_A=5\0", exp_stat_sn=11),
            login_response(
                SEC_STAY,
                f"CHAP_A=5\0CHAP_I={ident}\0CHAP_C={challenge_text}\0".encode(),
                stat_sn=11,
            ),
        ),
        (
            login_request(
                SEC_TO_OP,
                f"CHAP_N=alice\0CHAP_R=0x{answer.hexdigest()}\0".encode(),
                exp_stat_sn=12,
            ),
            login_response(SEC_TO_OP, stat_sn=12),
        ),
        (
            login_request(OP_TO_FULL, OPERATIONAL_TEXT, exp_stat_sn=13),
            login_response(OP_TO_FULL, TARGET_ANSWER, stat_sn=13, max_cmd_sn=64, tsih=0x77),
        ),
    ]


def test_login_with_chap_hex_challenge() -> None:
    challenge = bytes.fromhex("8f2b19c4d0e1aa5502fe6e61b7d3c4a9")
    state = new_login(("alice", "pa55word"))
    converse(state, chap_exchanges("0x" + challenge.hex(), challenge))
    assert state.params.tsih == 0x77
    assert state.max_cmd_sn == 64


def test_login_with_chap_base64_challenge() -> None:
    challenge = bytes(range(200, 232))
    state = new_login(("alice", "pa55word"))
    converse(state, chap_exchanges("0b" + base64.b64encode(challenge).decode(), challenge, ident=0))
    assert state.done


def test_chap_offered_but_target_wants_none() -> None:
    state = new_login(("alice", "pa55word"))
    converse(
        state,
        [
            (
                login_request(SEC_STAY, first_text("CHAP,None")),
                login_response(SEC_STAY, b"AuthMethod=None\0", stat_sn=1),
            ),
            (
                login_request(SEC_TO_OP, b"", exp_stat_sn=2),  # nothing more to say: move on
                login_response(SEC_TO_OP, stat_sn=2),
            ),
            (
                login_request(OP_TO_FULL, OPERATIONAL_TEXT, exp_stat_sn=3),
                login_response(OP_TO_FULL, TARGET_ANSWER, stat_sn=3, tsih=2),
            ),
        ],
    )


def test_continued_text_response_is_reassembled() -> None:
    # The target splits its operational answer inside a key; C=1 asks for an empty
    # Login Request (RFC 7143 6.2, the C bit), after which the rest arrives.
    cut = TARGET_ANSWER.index(b"=8192") + 3
    state = new_login()
    converse(
        state,
        [
            no_auth_step(),
            (
                login_request(OP_TO_FULL, OPERATIONAL_TEXT, exp_stat_sn=2),
                login_response(OP_STAY | 0x40, TARGET_ANSWER[:cut], stat_sn=2),
            ),
            (
                login_request(OP_STAY, b"", exp_stat_sn=3),  # empty, T=0, C=0
                login_response(OP_TO_FULL, TARGET_ANSWER[cut:], stat_sn=3, tsih=4),
            ),
        ],
    )
    assert state.params.max_send_segment == 8192
    assert state.params.first_burst == 65536


def test_operational_keys_the_target_offers_are_answered() -> None:
    offer = b"IFMarker=Yes\0X-com.example.Tuning=7\0HeaderDigest=None\0"
    answers = b"IFMarker=No\0X-com.example.Tuning=NotUnderstood\0"
    state = new_login()
    converse(
        state,
        [
            no_auth_step(),
            (
                login_request(OP_TO_FULL, OPERATIONAL_TEXT, exp_stat_sn=2),
                login_response(OP_STAY, offer, stat_sn=2),
            ),
            (
                login_request(OP_TO_FULL, answers, exp_stat_sn=3),
                login_response(OP_TO_FULL, TARGET_ANSWER, stat_sn=3, tsih=4),
            ),
        ],
    )


def feed(state: login.Login, answer: bytes) -> bytes | None:
    header = pdu.decode_bhs(answer)
    return state.receive(header, answer[48 : 48 + header.data_length])


def run_until_error(state: login.Login, answers: list[bytes]) -> login.LoginError:
    """Feed the answers; the last one (and only that one) must fail the login."""
    state.start()
    for answer in answers[:-1]:
        assert feed(state, answer) is not None
    with pytest.raises(login.LoginError) as info:
        feed(state, answers[-1])
    assert not state.done
    return info.value


def no_auth_step() -> tuple[bytes, bytes]:
    """The security stage without authentication: our request, the target's answer."""
    return (
        login_request(SEC_TO_OP, first_text("None")),
        login_response(SEC_TO_OP, b"AuthMethod=None\0", stat_sn=1),
    )


def login_without_auth(answer: bytes) -> login.Login:
    """A login without authentication whose target answers the operational stage so."""
    state = new_login()
    converse(
        state,
        [
            no_auth_step(),
            (
                login_request(OP_TO_FULL, OPERATIONAL_TEXT, exp_stat_sn=2),
                login_response(OP_TO_FULL, answer, stat_sn=2, tsih=1),
            ),
        ],
    )
    return state


def refused_operational_answer(answer: bytes) -> login.LoginError:
    """The error of a login without authentication that the operational ``answer`` ends."""
    return run_until_error(
        new_login(),
        [
            login_response(SEC_TO_OP, b"AuthMethod=None\0", stat_sn=1),
            login_response(OP_TO_FULL, answer, stat_sn=2, tsih=1),
        ],
    )


@pytest.mark.parametrize(
    ("status", "words"),
    [
        ((2, 1), "authentication failed"),
        ((2, 2), "not authorized"),
        ((2, 3), "target not found"),
        ((2, 0x7F), "initiator error"),  # unknown detail: the class's general text
        ((3, 1), "service is unavailable"),
        ((1, 1), "moved temporarily"),
        ((9, 9), "login refused"),
    ],
)
def test_login_status_is_reported_readably(status: tuple[int, int], words: str) -> None:
    error = run_until_error(new_login(), [login_response(0, stat_sn=0, status=status)])
    assert words in str(error)
    assert f"0x{status[0]:02x}{status[1]:02x}" in str(error)
    assert (error.status_class, error.status_detail) == status


def test_target_insisting_on_header_digest_is_refused() -> None:
    answer = TARGET_ANSWER.replace(b"HeaderDigest=None", b"HeaderDigest=CRC32C")
    error = refused_operational_answer(answer)
    assert "HeaderDigest=CRC32C" in str(error)


def test_target_insisting_on_error_recovery_is_refused() -> None:
    answer = TARGET_ANSWER.replace(b"ErrorRecoveryLevel=0", b"ErrorRecoveryLevel=2")
    error = refused_operational_answer(answer)
    assert "error recovery" in str(error)


def test_target_negotiating_tiny_segments_is_refused() -> None:
    answer = TARGET_ANSWER.replace(
        b"MaxRecvDataSegmentLength=8192", b"MaxRecvDataSegmentLength=256"
    )
    error = refused_operational_answer(answer)
    assert "512" in str(error)


def test_target_requiring_chap_without_credentials() -> None:
    error = run_until_error(
        new_login(), [login_response(SEC_STAY, b"AuthMethod=CHAP\0", stat_sn=1)]
    )
    assert "CHAP" in str(error)
    assert "user%password" in str(error)


def test_target_refusing_every_auth_method() -> None:
    error = run_until_error(
        new_login(("u", "p")), [login_response(SEC_STAY, b"AuthMethod=Reject\0", stat_sn=1)]
    )
    assert "refused every authentication method" in str(error)


@pytest.mark.parametrize(
    ("challenge", "words"),
    [
        (b"CHAP_A=7\0CHAP_I=1\0CHAP_C=0x00\0", "not MD5"),
        (b"CHAP_A=5\0CHAP_C=0x00\0", "lacks 'CHAP_I'"),
        (b"CHAP_A=5\0CHAP_I=1\0", "lacks 'CHAP_C'"),
        (b"CHAP_A=5\0CHAP_I=one\0CHAP_C=0x00\0", "malformed CHAP_I"),
        (b"CHAP_A=5\0CHAP_I=256\0CHAP_C=0x00\0", "malformed CHAP_I"),
        (b"CHAP_A=5\0CHAP_I=1\0CHAP_C=0xzz\0", "malformed binary"),
    ],
)
def test_bad_chap_challenges(challenge: bytes, words: str) -> None:
    error = run_until_error(
        new_login(("u", "p")),
        [
            login_response(SEC_STAY, b"AuthMethod=CHAP\0", stat_sn=1),
            login_response(SEC_STAY, challenge, stat_sn=2),
        ],
    )
    assert words in str(error)


def test_chap_response_not_accepted() -> None:
    error = run_until_error(
        new_login(("u", "p")),
        [
            login_response(SEC_STAY, b"AuthMethod=CHAP\0", stat_sn=1),
            login_response(SEC_STAY, b"CHAP_A=5\0CHAP_I=1\0CHAP_C=0x0102\0", stat_sn=2),
            login_response(SEC_STAY, stat_sn=3),  # no T bit after our CHAP_R
        ],
    )
    assert "did not accept the CHAP response" in str(error)


def test_response_for_the_wrong_stage_is_refused() -> None:
    error = run_until_error(new_login(), [login_response(OP_TO_FULL, stat_sn=1)])
    assert "stage 1 in stage 0" in str(error)


def test_non_numeric_negotiated_value_is_refused() -> None:
    answer = TARGET_ANSWER.replace(b"MaxBurstLength=262144", b"MaxBurstLength=lots")
    error = refused_operational_answer(answer)
    assert "MaxBurstLength=lots" in str(error)


def test_first_burst_length_irrelevant_is_accepted() -> None:
    answer = (
        b"HeaderDigest=None\0DataDigest=None\0InitialR2T=Yes\0ImmediateData=No\0"
        b"MaxRecvDataSegmentLength=8192\0MaxBurstLength=262144\0FirstBurstLength=Irrelevant\0"
    )
    state = login_without_auth(answer)
    # No unsolicited data at all is allowed, so FirstBurstLength does not matter.
    assert state.params.initial_r2t
    assert not state.params.immediate_data


# -- SCSI: sense data ------------------------------------------------------------------------


def test_fixed_sense() -> None:
    sense = scsi.decode_sense(fixed_sense(0x5, 0x21, 0x00))
    assert sense == scsi.Sense(0x5, 0x21, 0x00)
    assert sense.key_name == "illegal request"
    assert sense.text == "illegal request: logical block address out of range (asc 0x21/0x00)"


def test_fixed_sense_valid_bit_deferred_code_and_flag_bits() -> None:
    # VALID (0x80) with response code 0x71 (deferred); FILEMARK/EOM/ILI above the key.
    data = fixed_sense(0x3, 0x11, 0x00, code=0x80 | 0x71, byte2_high=0xE0)
    assert scsi.decode_sense(data) == scsi.Sense(0x3, 0x11, 0x00)


def test_descriptor_sense() -> None:
    sense = scsi.decode_sense(descriptor_sense(0x6, 0x29, 0x00))
    assert sense == scsi.Sense(0x6, 0x29, 0x00)
    assert sense.text == (
        "unit attention: power on, reset, or bus device reset occurred (asc 0x29/0x00)"
    )
    assert scsi.decode_sense(descriptor_sense(0x2, 0x04, 0x01, code=0x73)) == scsi.Sense(
        0x2, 0x04, 0x01
    )


def test_sense_text_fallbacks() -> None:
    # An unlisted ASCQ takes its ASC's general name; an unknown ASC only gives the codes.
    assert scsi.Sense(0x6, 0x29, 0x02).text.startswith("unit attention: power on, reset")
    assert scsi.Sense(0x3, 0x99, 0x01).text == "medium error (asc 0x99/0x01)"
    assert scsi.Sense(0xC, 0x00, 0x00).key_name == "sense key 0xc"


@pytest.mark.parametrize(
    "data", [b"", b"\x70", b"\x00\x00\x05", b"\x7f\x00\x05\x00", b"\x72\x05\x24"]
)
def test_no_sense(data: bytes) -> None:
    assert scsi.decode_sense(data) is None


def test_truncated_fixed_sense_has_no_asc() -> None:
    assert scsi.decode_sense(b"\x70\x00\x02") == scsi.Sense(0x2, 0, 0)


def test_sense_of_response_uses_its_length() -> None:
    sense = descriptor_sense(0x5, 0x24, 0x00)
    # The 2-byte SenseLength (RFC 7143 11.4.7) bounds the sense; response data may follow.
    segment = len(sense).to_bytes(2, "big") + sense + fixed_sense(0x3, 0x11, 0x00)
    assert scsi.sense_of_response(segment) == scsi.Sense(0x5, 0x24, 0x00)
    assert scsi.sense_of_response(b"\x00") is None
    assert scsi.sense_of_response(b"\x00\x00" + sense) is None


def test_command_error_text_and_unsupported() -> None:
    error = client.CommandError(2, scsi.Sense(0x5, 0x20, 0x00))
    assert str(error) == "illegal request: invalid command operation code (asc 0x20/0x00)"
    assert error.unsupported
    assert client.CommandError(2, scsi.Sense(0x5, 0x24, 0x00)).unsupported
    assert not client.CommandError(2, scsi.Sense(0x5, 0x21, 0x00)).unsupported
    assert not client.CommandError(2, scsi.Sense(0x6, 0x20, 0x00)).unsupported
    assert str(client.CommandError(0x08, None)) == "SCSI status busy"
    assert str(client.CommandError(0x55, None)) == "SCSI status 0x55"


# -- SCSI: READ CAPACITY (16), GET LBA STATUS, VPD pages ---------------------------------------


def capacity_data(last: int, block_size: int, byte13: int = 0, byte14: int = 0) -> bytes:
    """SBC-3 READ CAPACITY (16) parameter data (32 bytes)."""
    return struct.pack(">QIBBBB", last, block_size, 0, byte13, byte14, 0) + bytes(16)


def test_read_capacity_16_thin_lun() -> None:
    cap = scsi.decode_read_capacity_16(capacity_data((1 << 21) - 1, 512, 0x03, 0xC0))
    assert cap.blocks == 1 << 21
    assert cap.block_size == 512
    assert cap.size == 1 << 30
    assert cap.lbpme
    assert cap.lbprz
    assert cap.physical_exponent == 3  # 8 logical blocks per physical block


def test_read_capacity_16_bits_are_separate() -> None:
    cap = scsi.decode_read_capacity_16(capacity_data(99, 4096, 0, 0x80))
    assert (cap.lbpme, cap.lbprz, cap.size) == (True, False, 100 * 4096)
    # The LOWEST ALIGNED LBA bits (5-0 of byte 14) are neither LBPME nor LBPRZ.
    cap = scsi.decode_read_capacity_16(capacity_data(0, 512, 0xF0, 0x3F))
    assert (cap.lbpme, cap.lbprz, cap.physical_exponent) == (False, False, 0)


@pytest.mark.parametrize("block_size", [0, 256, 520, 2 << 20])
def test_read_capacity_16_refuses_odd_block_sizes(block_size: int) -> None:
    with pytest.raises(scsi.DecodeError, match=f"{block_size} bytes"):
        scsi.decode_read_capacity_16(capacity_data(10, block_size))


def test_read_capacity_16_limits() -> None:
    assert scsi.decode_read_capacity_16(capacity_data(0, 1 << 20)).block_size == 1 << 20
    with pytest.raises(scsi.DecodeError, match="too short"):
        scsi.decode_read_capacity_16(capacity_data(10, 512)[:15])


def lba_status(descriptors: list[tuple[int, int, int]], *, claimed: int | None = None) -> bytes:
    """SBC-3 GET LBA STATUS parameter data: PARAMETER DATA LENGTH is n - 3."""
    body = b"".join(struct.pack(">QIB3x", lba, n, code) for lba, n, code in descriptors)
    length = 4 + len(body) if claimed is None else claimed
    return struct.pack(">I4x", length) + body


def test_get_lba_status_descriptors() -> None:
    data = lba_status([(0, 100, 0), (100, 50, 1), (150, 10, 2), (160, 5, 0xF3)])
    assert scsi.decode_get_lba_status(data) == [
        scsi.LBAStatus(0, 100, scsi.Provision.MAPPED),
        scsi.LBAStatus(100, 50, scsi.Provision.DEALLOCATED),
        scsi.LBAStatus(150, 10, scsi.Provision.ANCHORED),
        scsi.LBAStatus(160, 5, scsi.Provision.MAPPED),  # 3 (SBC-4 "mapped or unknown")
    ]


def test_get_lba_status_honours_the_length_not_the_buffer() -> None:
    data = lba_status([(0, 8, 1), (8, 8, 0)])
    big = data + lba_status([(99, 1, 1)])[8:] + bytes(1000)  # the rest of the buffer
    assert len(scsi.decode_get_lba_status(big)) == 2
    # A reply cut short by the allocation length gives the whole descriptors that came.
    cut = lba_status([(0, 8, 1), (8, 8, 0), (16, 8, 1)])[: 8 + 16 + 10]
    assert scsi.decode_get_lba_status(cut) == [scsi.LBAStatus(0, 8, scsi.Provision.DEALLOCATED)]
    assert scsi.decode_get_lba_status(lba_status([])) == []
    with pytest.raises(scsi.DecodeError):
        scsi.decode_get_lba_status(bytes(7))


def block_limits_page(length: int = 64) -> bytes:
    """SBC-3 Block Limits VPD page (0xB0)."""
    page = bytearray(64)
    page[1] = 0xB0
    page[2:4] = (0x3C).to_bytes(2, "big")
    page[8:12] = u32(2048)  # MAXIMUM TRANSFER LENGTH
    page[12:16] = u32(256)  # OPTIMAL TRANSFER LENGTH
    page[16:20] = u32(0xDEAD)  # MAXIMUM PREFETCH LENGTH (not a field we read)
    page[20:24] = u32(0x400000)  # MAXIMUM UNMAP LBA COUNT
    page[24:28] = u32(64)  # MAXIMUM UNMAP BLOCK DESCRIPTOR COUNT
    page[28:32] = u32(8)  # OPTIMAL UNMAP GRANULARITY
    page[36:44] = struct.pack(">Q", 0x10000)  # MAXIMUM WRITE SAME LENGTH
    return bytes(page[:length])


def test_block_limits() -> None:
    assert scsi.decode_block_limits(block_limits_page()) == scsi.BlockLimits(
        max_transfer=2048,
        opt_transfer=256,
        max_unmap=0x400000,
        max_unmap_descriptors=64,
        max_write_same=0x10000,
    )


def test_block_limits_short_pages() -> None:
    # Older devices return shorter pages: only the fields present are read.
    assert scsi.decode_block_limits(block_limits_page(16)) == scsi.BlockLimits(2048, 256)
    assert scsi.decode_block_limits(block_limits_page(43)) == scsi.BlockLimits(
        2048, 256, 0x400000, 64, 0
    )
    with pytest.raises(scsi.DecodeError, match="0xB0"):
        scsi.decode_block_limits(block_limits_page(15))


@pytest.mark.parametrize(
    ("byte5", "expected"),
    [
        (0x80 | 0x04, scsi.Provisioning(unmap=True, lbprz=True)),  # LBPU, LBPRZ
        (0x40 | 0x02, scsi.Provisioning(write_same_16=True, anc_sup=True)),  # LBPWS, ANC_SUP
        (0x20 | 0x01, scsi.Provisioning()),  # LBPWS10 and DP are not WRITE SAME (16)
    ],
)
def test_provisioning_page(byte5: int, expected: scsi.Provisioning) -> None:
    page = bytes((0, 0xB2, 0, 4, 0, byte5, 0x02, 0))
    assert scsi.decode_provisioning(page) == expected


def test_provisioning_page_too_short() -> None:
    with pytest.raises(scsi.DecodeError, match="0xB2"):
        scsi.decode_provisioning(bytes((0, 0xB2, 0, 4, 0)))


def test_standard_inquiry() -> None:
    data = bytes((0x00, 0, 6, 2, 91, 0, 0, 0)) + b"LIO-ORG " + b"disk1           " + b"4.0 "
    inquiry = scsi.decode_inquiry(data)
    assert inquiry == scsi.Inquiry(0, scsi.TYPE_DISK, "LIO-ORG", "disk1")
    assert inquiry.connected
    absent = scsi.decode_inquiry(bytes((0x7F,)) + bytes(35))
    assert (absent.qualifier, absent.device_type, absent.connected) == (3, 0x1F, False)
    with pytest.raises(scsi.DecodeError):
        scsi.decode_inquiry(bytes(4))


def test_supported_vpd_pages() -> None:
    page = bytes((0, 0x00, 0, 3, 0x00, 0xB0, 0xB2)) + b"\x83\x86" + bytes(200)
    assert scsi.decode_supported_pages(page) == {0x00, 0xB0, 0xB2}
    with pytest.raises(scsi.DecodeError):
        scsi.decode_supported_pages(bytes(3))


# -- SCSI: CDBs --------------------------------------------------------------------------------


def test_cdbs_of_16_bytes() -> None:
    lba = 0x0102030405060708
    tail = bytes.fromhex("0102030405060708") + bytes.fromhex("11223344") + b"\x00\x00"
    assert scsi.cdb_read_16(lba, 0x11223344) == b"\x88\x00" + tail
    assert scsi.cdb_write_16(lba, 0x11223344) == b"\x8a\x00" + tail
    assert scsi.cdb_write_16(lba, 0x11223344, fua=True) == b"\x8a\x08" + tail  # FUA bit 3
    assert scsi.cdb_write_same_16(lba, 0x11223344, unmap=False) == b"\x93\x00" + tail
    assert scsi.cdb_write_same_16(lba, 0x11223344, unmap=True) == b"\x93\x08" + tail  # UNMAP
    assert scsi.cdb_synchronize_cache_16() == b"\x91" + bytes(15)
    # SERVICE ACTION IN (16): byte 1 service action, bytes 10-13 ALLOCATION LENGTH.
    assert scsi.cdb_read_capacity_16(32) == b"\x9e\x10" + bytes(8) + u32(32) + b"\x00\x00"
    assert scsi.cdb_get_lba_status(lba, 1032) == b"\x9e\x12" + tail[:8] + u32(1032) + bytes(2)
    for cdb in (scsi.cdb_read_16(0, 1), scsi.cdb_read_capacity_16(), scsi.cdb_get_lba_status(0, 8)):
        assert len(cdb) == 16


def test_short_cdbs() -> None:
    assert scsi.cdb_test_unit_ready() == bytes(6)
    assert scsi.cdb_inquiry(None, 96) == bytes((0x12, 0, 0, 0, 96, 0))
    assert scsi.cdb_inquiry(0xB0, 64) == bytes((0x12, 0x01, 0xB0, 0, 64, 0))  # EVPD
    assert scsi.cdb_inquiry(0x00) == bytes((0x12, 0x01, 0x00, 0, 255, 0))
    # UNMAP: bytes 2-5 reserved, 6 group, 7-8 PARAMETER LIST LENGTH, 9 control.
    assert scsi.cdb_unmap(0x0118) == bytes((0x42, 0, 0, 0, 0, 0, 0, 0x01, 0x18, 0))


def test_unmap_parameter_list() -> None:
    params = scsi.unmap_parameters([(0x10, 0x20), (0x0123456789, 8)])
    assert len(params) == 8 + 2 * 16
    assert params[0:2] == (40 - 2).to_bytes(2, "big")  # UNMAP DATA LENGTH (n - 1)
    assert params[2:4] == (32).to_bytes(2, "big")  # BLOCK DESCRIPTOR DATA LENGTH (n - 7)
    assert params[4:8] == bytes(4)
    assert params[8:16] == (0x10).to_bytes(8, "big")
    assert params[16:20] == u32(0x20)
    assert params[20:24] == bytes(4)
    assert params[24:32] == (0x0123456789).to_bytes(8, "big")
    assert params[32:36] == u32(8)
    assert params[36:40] == bytes(4)
    assert scsi.unmap_parameters([]) == b"\x00\x06\x00\x00" + bytes(4)


# -- Data-Out sequences (the splitting, without a socket) ----------------------------------------


class _NoSocket:
    socket = None


def test_data_out_sequence_for_an_r2t() -> None:
    conn = client.Connection(cast(Any, _NoSocket()), "test")
    conn.params = login.Params(max_send_segment=4096)
    conn.exp_stat_sn = 0x33
    data = memoryview(bytes(range(256)) * 48)  # 12288 bytes
    parts: list[Any] = []
    conn._data_out(parts, 0x44, 3, 0x0BEEF, data, 2048, 9000)
    heads = [bytes(p) for p in parts[0::2] if len(p) == 48]
    assert len(heads) == 3
    for number, head in enumerate(heads):
        assert head[0] == 0x05
        assert head[20:24] == u32(0x0BEEF)
        assert head[28:32] == u32(0x33)
        assert head[36:40] == u32(number)  # DataSN restarts for each R2T's sequence
    assert [int.from_bytes(h[40:44], "big") for h in heads] == [2048, 6144, 10240]
    assert [int.from_bytes(h[5:8], "big") for h in heads] == [4096, 4096, 808]
    assert [h[1] for h in heads] == [0, 0, 0x80]  # F only on the last
    sent = b"".join(bytes(p) for p in parts)
    assert len(sent) == 3 * 48 + 4096 + 4096 + 808  # 808 is a multiple of 4: no padding
    assert sent[48 : 48 + 4096] == bytes(data[2048:6144])


def test_sequence_numbers_from_target_responses() -> None:
    # RFC 7143 4.2.2.1 (command window) and 11.19 / 11.8 / 11.7 (which StatSNs count).
    conn = client.Connection(cast(Any, _NoSocket()), "test")
    conn.exp_stat_sn, conn.max_cmd_sn = 10, 20
    window = conn._window
    conn._note_sequence(pdu.decode_bhs(target_pdu(0x21, stat_sn=10, exp_cmd_sn=5, max_cmd_sn=40)))
    assert (conn.exp_stat_sn, conn.max_cmd_sn) == (11, 40)
    assert window.is_set()  # the window opened: waiting commands wake up
    # Data-In without S, and R2T, carry no status: StatSN is not used up.
    conn._note_sequence(pdu.decode_bhs(target_pdu(0x25, flags=0, stat_sn=50)))
    conn._note_sequence(pdu.decode_bhs(target_pdu(0x31, stat_sn=60)))
    assert conn.exp_stat_sn == 11
    conn._note_sequence(pdu.decode_bhs(target_pdu(0x25, flags=0x81, stat_sn=11)))
    assert conn.exp_stat_sn == 12
    # A target's ping (ITT reserved) carries the next StatSN without advancing it.
    conn._note_sequence(pdu.decode_bhs(target_pdu(0x20, itt=MASK32, ttt=7, stat_sn=12)))
    assert conn.exp_stat_sn == 12
    # MaxCmdSN < ExpCmdSN - 1 is a bogus window: ignored; a smaller MaxCmdSN never shrinks it.
    conn._note_sequence(pdu.decode_bhs(target_pdu(0x21, stat_sn=12, exp_cmd_sn=100, max_cmd_sn=50)))
    assert conn.max_cmd_sn == 40
    conn._note_sequence(pdu.decode_bhs(target_pdu(0x21, stat_sn=13, exp_cmd_sn=31, max_cmd_sn=30)))
    assert conn.max_cmd_sn == 40
    # Across the wrap of the 32-bit space.
    conn.max_cmd_sn = 0xFFFFFFF0
    conn._note_sequence(
        pdu.decode_bhs(target_pdu(0x21, stat_sn=MASK32, exp_cmd_sn=0xFFFFFFF8, max_cmd_sn=5))
    )
    assert (conn.exp_stat_sn, conn.max_cmd_sn) == (0, 5)


# -- iscsi:// URLs -------------------------------------------------------------------------------


def test_plain_url() -> None:
    address = parse_iscsi_uri("ISCSI://192.0.2.10/iqn.2003-01.org.example:disk1/1")
    assert address == ISCSIAddress(host="192.0.2.10", target=TARGET, lun=1)
    assert address.port == 3260
    assert address.user is None
    assert address.password is None
    assert address.initiator == client.DEFAULT_INITIATOR
    assert address.uri == "iscsi://192.0.2.10/iqn.2003-01.org.example:disk1/1"


def test_url_with_user_password_port_and_ipv6_host() -> None:
    address = parse_iscsi_uri(
        "iscsi://admin%s3cr%40t@[2001:db8::5]:3261/iqn.2003-01.org.example:disk1/16383"
        "?initiator-name=iqn.2024-01.org.example:me"
    )
    assert address.host == "2001:db8::5"
    assert address.port == 3261
    assert address.lun == 16383
    assert address.user == "admin"
    assert address.password == "s3cr%40t"  # as written, as libiscsi takes it
    assert address.initiator == "iqn.2024-01.org.example:me"
    assert address.uri == "iscsi://admin@[2001:db8::5]:3261/iqn.2003-01.org.example:disk1/16383"
    for text in (address.uri, repr(address), str(address)):
        assert "s3cr" not in text


def test_url_user_without_password_takes_the_libiscsi_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LIBISCSI_CHAP_PASSWORD", "from-env")
    address = parse_iscsi_uri(f"iscsi://bob@host/{TARGET}/0")
    assert (address.user, address.password) == ("bob", "from-env")
    assert "from-env" not in repr(address)
    monkeypatch.delenv("LIBISCSI_CHAP_PASSWORD")
    with pytest.raises(ImageError, match="no password"):
        parse_iscsi_uri(f"iscsi://bob@host/{TARGET}/0")


@pytest.mark.parametrize(
    ("url", "words"),
    [
        ("nbd://host/iqn/1", "not an iSCSI URL"),
        (f"iscsi:///{TARGET}/1", "missing host"),
        (f"iscsi://host/{TARGET}", "must be iscsi://host"),
        ("iscsi://host", "must be iscsi://host"),
        (f"iscsi://host/{TARGET}/1/2", "must be iscsi://host"),
        (f"iscsi://host/{TARGET}/one", "must be a number"),
        (f"iscsi://host/{TARGET}/16384", "out of range"),
        (f"iscsi://host/{TARGET}/-1", "out of range"),
        (f"iscsi://host:99999/{TARGET}/1", "invalid port"),
        (f"iscsi://host:port/{TARGET}/1", "invalid port"),
        (f"iscsi://%pw@host/{TARGET}/1", "empty user"),
        (f"iscsi://host/{TARGET}/1?timeout=5", "unknown URL parameter 'timeout'"),
        (f"iscsi://host/{TARGET}/1?initiator-name=", "unknown URL parameter"),
    ],
)
def test_bad_urls(url: str, words: str) -> None:
    with pytest.raises(ImageError, match=words):
        parse_iscsi_uri(url)


def test_password_stays_out_of_url_errors() -> None:
    with pytest.raises(ImageError) as info:
        parse_iscsi_uri("iscsi://admin%hunter2@host/iqn.2003-01.org.example:disk1")
    assert "hunter2" not in str(info.value)
    assert "admin%***" in str(info.value)
    with pytest.raises(ImageError) as info:
        parse_iscsi_uri("iscsi://admin:hunter2@host/iqn.2003-01.org.example:disk1")
    assert "hunter2" not in str(info.value)
    assert "admin:***" in str(info.value)


def test_url_password_after_a_colon_as_libiscsi_takes_it() -> None:
    """``user:password@`` works as ``user%password@`` (qemu-img logs in with either)."""
    address = parse_iscsi_uri(f"iscsi://alice:s3cret@127.0.0.1:3270/{TARGET}/1")
    assert (address.user, address.password, address.lun) == ("alice", "s3cret", 1)
    assert "s3cret" not in address.uri and "s3cret" not in repr(address)
    shown = redact_location(f"iscsi://alice:s3cret@127.0.0.1:3270/{TARGET}/1")
    assert shown == f"iscsi://alice@127.0.0.1:3270/{TARGET}/1"


# -- login redirection -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("192.0.2.7:3261,1", ("192.0.2.7", 3261)),
        ("192.0.2.7", ("192.0.2.7", 3260)),
        ("[2001:db8::1]:3262,2", ("2001:db8::1", 3262)),
        ("[2001:db8::1]", ("2001:db8::1", 3260)),
        ("array.example:3260", ("array.example", 3260)),
    ],
)
def test_parse_target_address(value: str, expected: tuple[str, int]) -> None:
    assert login.parse_target_address(value) == expected


@pytest.mark.parametrize("value", ["", ":3260", "host:port", "host:0", "host:70000", "[::1"])
def test_parse_target_address_refuses(value: str) -> None:
    with pytest.raises(login.LoginError, match="TargetAddress"):
        login.parse_target_address(value)


def test_redirect_carries_the_new_address() -> None:
    """Status class 1 (RFC 7143 11.13.5) with TargetAddress: where to log in instead."""
    state = new_login()
    state.start()
    answer = login_response(0x00, b"TargetAddress=192.0.2.9:3270,1\0", stat_sn=0, status=(1, 1))
    with pytest.raises(login.LoginError, match="moved temporarily") as info:
        state.receive(pdu.decode_bhs(answer), answer[pdu.BHS_SIZE :].rstrip(b"\0") + b"\0")
    assert info.value.status_class == 1
    assert info.value.redirect == ("192.0.2.9", 3270)


def test_redirect_without_address_is_an_error() -> None:
    state = new_login()
    state.start()
    answer = login_response(0x00, stat_sn=0, status=(1, 2))
    with pytest.raises(login.LoginError, match="did not say where") as info:
        state.receive(pdu.decode_bhs(answer), b"")
    assert info.value.redirect is None

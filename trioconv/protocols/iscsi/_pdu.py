"""iSCSI PDUs (RFC 7143) as plain data: encoders that return bytes, decoders that take them.

Every iSCSI PDU starts with a 48-byte *basic header segment* (BHS)::

    byte 0      I bit (0x40: immediate delivery) | opcode (6 bits)
    byte 1      F bit (0x80: final) and opcode-specific flags
    bytes 2-3   opcode-specific
    byte 4      TotalAHSLength, in 4-byte words (additional header segments)
    bytes 5-7   DataSegmentLength, in bytes (24 bits)
    bytes 8-15  LUN, or opcode-specific
    bytes 16-19 Initiator Task Tag (ITT): the initiator's name for the task
    bytes 20-47 opcode-specific

then the AHS, then the data segment padded to a multiple of 4. Header and data digests
are negotiated off (``None``), so nothing else follows. :func:`pdu_length` tells from a
BHS how many bytes the whole PDU takes, which is all a reader needs to frame the stream.

Nothing here does I/O: the initiator in ``_client`` builds requests with the ``encode_*``
functions and hands received headers to :func:`decode_bhs`.
"""

from __future__ import annotations

import enum
import struct

import attrs

__all__ = [
    "BHS_SIZE",
    "BHS",
    "MAX_SEGMENT",
    "Opcode",
    "ProtocolError",
    "decode_bhs",
    "encode_data_out_sequence",
    "encode_login",
    "encode_logout",
    "encode_nop_out",
    "encode_scsi_command",
    "encode_text",
    "pad_length",
    "pdu_length",
]

BHS_SIZE = 48
#: Task tag and target transfer tag value meaning "none".
RESERVED_TAG = 0xFFFFFFFF
#: The largest data segment a PDU can carry (a 24-bit length).
MAX_SEGMENT = (1 << 24) - 1


class ProtocolError(Exception):
    """The peer sent something that is not valid iSCSI."""


class Opcode(enum.IntEnum):
    """PDU opcodes: initiator requests (0x00-0x1f) and target responses (0x20-0x3f)."""

    NOP_OUT = 0x00
    SCSI_COMMAND = 0x01
    TASK_MGMT = 0x02
    LOGIN_REQUEST = 0x03
    TEXT_REQUEST = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQUEST = 0x06
    SNACK = 0x10
    NOP_IN = 0x20
    SCSI_RESPONSE = 0x21
    TASK_MGMT_RESPONSE = 0x22
    LOGIN_RESPONSE = 0x23
    TEXT_RESPONSE = 0x24
    DATA_IN = 0x25
    LOGOUT_RESPONSE = 0x26
    R2T = 0x31
    ASYNC_MESSAGE = 0x32
    REJECT = 0x3F


# Flags in byte 1.
FINAL = 0x80
READ = 0x40  # SCSI Command: data flows to the initiator
WRITE = 0x20  # SCSI Command: data flows to the target
ATTR_SIMPLE = 0x01
TRANSIT = 0x80  # Login: move to the next stage
CONTINUE = 0x40  # Login/Text: more text follows in the next PDU
ACK = 0x40  # Data-In: acknowledge wanted (error recovery only)
STATUS = 0x01  # Data-In: the PDU carries the command's status
OVERFLOW = 0x04
UNDERFLOW = 0x02

_IMMEDIATE = 0x40


def pad_length(n: int) -> int:
    """Bytes of padding after a data segment of ``n`` bytes."""
    return -n % 4


def pdu_length(bhs: bytes | bytearray | memoryview) -> int:
    """The whole PDU's length in bytes (BHS, AHS, padded data segment), from its BHS."""
    if len(bhs) < BHS_SIZE:
        raise ValueError("a basic header segment is 48 bytes")
    ahs = bhs[4] * 4
    data = int.from_bytes(bhs[5:8], "big")
    return BHS_SIZE + ahs + data + pad_length(data)


def encode_lun(lun: int) -> bytes:
    """An 8-byte LUN field: flat (peripheral) addressing below 256, flat space above."""
    if not 0 <= lun < 16384:
        raise ValueError(f"LUN {lun} out of range")
    if lun < 256:
        return bytes((0, lun)) + bytes(6)
    return bytes((0x40 | (lun >> 8), lun & 0xFF)) + bytes(6)


def decode_lun(field: bytes | bytearray | memoryview) -> int:
    """The LUN number of an 8-byte LUN field (the inverse of :func:`encode_lun`)."""
    return ((field[0] & 0x3F) << 8) | field[1]


def _header(
    opcode: Opcode,
    flags: int,
    data_length: int,
    *,
    immediate: bool = False,
    b2: int = 0,
    b3: int = 0,
    lun_or_isid: bytes = bytes(8),
    itt: int = RESERVED_TAG,
    tail: bytes = bytes(28),
) -> bytes:
    if data_length > MAX_SEGMENT:
        raise ValueError("data segment too long")
    first = opcode | (_IMMEDIATE if immediate else 0)
    head = struct.pack(">BBBBI", first, flags, b2, b3, data_length)  # byte 4 (AHS) = 0
    return head + lun_or_isid + itt.to_bytes(4, "big") + tail


def _segment(data: bytes) -> bytes:
    return data + bytes(pad_length(len(data)))


def encode_scsi_command(
    *,
    lun: int,
    itt: int,
    cdb: bytes,
    expected_length: int,
    cmd_sn: int,
    exp_stat_sn: int,
    read: bool = False,
    write: bool = False,
    final: bool = True,
    immediate_length: int = 0,
) -> bytes:
    """A SCSI Command BHS (the immediate data, ``immediate_length`` bytes, follows it).

    ``final`` is clear when unsolicited Data-Out PDUs follow (InitialR2T=No).
    """
    if len(cdb) > 16:
        raise ValueError("CDBs longer than 16 bytes need an AHS")
    flags = (FINAL if final else 0) | (READ if read else 0) | (WRITE if write else 0) | ATTR_SIMPLE
    tail = struct.pack(">III", expected_length, cmd_sn, exp_stat_sn) + cdb.ljust(16, b"\0")
    return _header(
        Opcode.SCSI_COMMAND,
        flags,
        immediate_length,
        lun_or_isid=encode_lun(lun),
        itt=itt,
        tail=tail,
    )


#: A SCSI Data-Out BHS: opcode, flags, DataSegmentLength (under TotalAHSLength 0), LUN,
#: ITT, TTT, ExpStatSN, DataSN, Buffer Offset; the rest reserved.
_DATA_OUT = struct.Struct(">BB2xI8sII4xI4xII4x")


def encode_data_out_sequence(
    *, lun: int, itt: int, ttt: int, exp_stat_sn: int, offset: int, length: int, segment: int
) -> bytearray:
    """The BHSs of the Data-Out PDUs that carry ``length`` bytes from ``offset``.

    One PDU per ``segment`` bytes (the last may be shorter), DataSN counting from 0, F
    set on the last: what answers one R2T, or the unsolicited data after a command. The
    headers come back together, :data:`BHS_SIZE` bytes each, for the caller to send
    each one before its data; one buffer and one ``pack_into`` per PDU, since a target
    that takes 8 KiB segments makes 128 of them per MiB.
    """
    if not 0 < segment <= MAX_SEGMENT:
        raise ValueError("data segment too long" if segment > 0 else "empty data segment")
    count = -(-length // segment) if length > 0 else 0
    out = bytearray(BHS_SIZE * count)
    lun_field, pack, end = encode_lun(lun), _DATA_OUT.pack_into, offset + length
    for data_sn in range(count):
        pos = offset + data_sn * segment
        n = min(segment, end - pos)
        flags = FINAL if pos + n >= end else 0
        pack(out, data_sn * BHS_SIZE, Opcode.DATA_OUT, flags, n, lun_field, itt, ttt,
             exp_stat_sn, data_sn, pos)  # fmt: skip
    return out


def encode_login(
    *,
    isid: bytes,
    tsih: int,
    itt: int,
    cid: int,
    cmd_sn: int,
    exp_stat_sn: int,
    csg: int,
    nsg: int,
    transit: bool,
    text: bytes,
) -> bytes:
    """A whole Login Request PDU carrying ``text`` (``key=value\\0`` pairs)."""
    if len(isid) != 6:
        raise ValueError("an ISID is 6 bytes")
    flags = (TRANSIT if transit else 0) | (csg << 2) | (nsg if transit else 0)
    tail = struct.pack(">HHII", cid, 0, cmd_sn, exp_stat_sn) + bytes(16)
    header = _header(
        Opcode.LOGIN_REQUEST,
        flags,
        len(text),
        immediate=True,
        lun_or_isid=isid + tsih.to_bytes(2, "big"),
        itt=itt,
        tail=tail,
    )
    return header + _segment(text)


def encode_text(*, itt: int, cmd_sn: int, exp_stat_sn: int, text: bytes) -> bytes:
    """A whole Text Request PDU (e.g. ``SendTargets=All``)."""
    tail = struct.pack(">III", RESERVED_TAG, cmd_sn, exp_stat_sn) + bytes(16)
    return _header(Opcode.TEXT_REQUEST, FINAL, len(text), itt=itt, tail=tail) + _segment(text)


def encode_logout(*, itt: int, cid: int, cmd_sn: int, exp_stat_sn: int, reason: int = 0) -> bytes:
    """A Logout Request PDU; reason 0 closes the session."""
    tail = struct.pack(">HHII", cid, 0, cmd_sn, exp_stat_sn) + bytes(16)
    return _header(Opcode.LOGOUT_REQUEST, FINAL | reason, 0, immediate=True, itt=itt, tail=tail)


def encode_nop_out(
    *, lun: int, itt: int, ttt: int, cmd_sn: int, exp_stat_sn: int, data: bytes = b""
) -> bytes:
    """A whole NOP-Out PDU: a ping (``itt`` set) or the answer to a target's ping (``ttt``)."""
    tail = struct.pack(">III", ttt, cmd_sn, exp_stat_sn) + bytes(16)
    header = _header(
        Opcode.NOP_OUT,
        FINAL,
        len(data),
        immediate=True,
        lun_or_isid=encode_lun(lun),
        itt=itt,
        tail=tail,
    )
    return header + _segment(data)


@attrs.frozen
class BHS:
    """A received basic header segment, decoded into the fields any response may use.

    Fields a given opcode does not have are 0. The sequence numbers (``stat_sn``,
    ``exp_cmd_sn``, ``max_cmd_sn``) sit at the same place in every target response.

    Attributes:
        flags: byte 1 (F, S, U, O bits; login's T, C, CSG, NSG).
        b2, b3: bytes 2 and 3 (SCSI response code and status; login's versions).
        ahs_length / data_length: lengths of the AHS and of the (unpadded) data segment.
        field8: bytes 8-15 (LUN; login's ISID and TSIH).
        itt / ttt: initiator and target transfer tags (bytes 16-19, 20-23).
        word36 / word40 / word44: bytes 36-47 (DataSN or R2TSN, buffer offset, residual
            count or desired length; login's status class and detail in byte 36, 37).
    """

    opcode: Opcode
    flags: int
    b2: int
    b3: int
    ahs_length: int
    data_length: int
    field8: bytes
    itt: int
    ttt: int
    stat_sn: int
    exp_cmd_sn: int
    max_cmd_sn: int
    word36: int
    word40: int
    word44: int

    @property
    def final(self) -> bool:
        return bool(self.flags & FINAL)

    @property
    def has_status(self) -> bool:
        """Data-In with the S bit, and every SCSI Response, carry the command's status."""
        return self.opcode is Opcode.SCSI_RESPONSE or bool(
            self.opcode is Opcode.DATA_IN and self.flags & STATUS
        )

    @property
    def status(self) -> int:
        """The SCSI status (byte 3) of a SCSI Response or a Data-In with status."""
        return self.b3

    @property
    def residual(self) -> int:
        """Bytes not transferred (U bit) or not asked for (O bit); 0 otherwise."""
        return self.word44 if self.flags & (UNDERFLOW | OVERFLOW) else 0

    # Login responses.
    @property
    def transit(self) -> bool:
        return bool(self.flags & TRANSIT)

    @property
    def more_text(self) -> bool:
        return bool(self.flags & CONTINUE)

    @property
    def csg(self) -> int:
        return (self.flags >> 2) & 3

    @property
    def nsg(self) -> int:
        return self.flags & 3

    @property
    def tsih(self) -> int:
        return int.from_bytes(self.field8[6:8], "big")

    @property
    def status_class(self) -> int:
        return self.word36 >> 24

    @property
    def status_detail(self) -> int:
        return (self.word36 >> 16) & 0xFF

    # Async messages.
    @property
    def async_event(self) -> int:
        return self.word36 >> 24


def decode_bhs(data: bytes | bytearray | memoryview) -> BHS:
    """Decode a target's 48-byte BHS.

    Raises:
        ProtocolError: the opcode is not one a target sends.
    """
    if len(data) < BHS_SIZE:
        raise ProtocolError("short basic header segment")
    first, flags, b2, b3, lengths = struct.unpack_from(">BBBBI", data, 0)
    code = first & 0x3F
    try:
        opcode = Opcode(code)
    except ValueError:
        raise ProtocolError(f"unknown PDU opcode 0x{code:02x}") from None
    if opcode < Opcode.NOP_IN:
        raise ProtocolError(f"the target sent an initiator opcode 0x{code:02x}")
    itt, ttt, stat_sn, exp_cmd_sn, max_cmd_sn, w36, w40, w44 = struct.unpack_from(">8I", data, 16)
    return BHS(
        opcode=opcode,
        flags=flags,
        b2=b2,
        b3=b3,
        ahs_length=(lengths >> 24) * 4,
        data_length=lengths & 0xFFFFFF,
        field8=bytes(data[8:16]),
        itt=itt,
        ttt=ttt,
        stat_sn=stat_sn,
        exp_cmd_sn=exp_cmd_sn,
        max_cmd_sn=max_cmd_sn,
        word36=w36,
        word40=w40,
        word44=w44,
    )


def sn_lt(a: int, b: int) -> bool:
    """``a < b`` in 32-bit serial number arithmetic (RFC 1982), as CmdSN windows use."""
    return a != b and ((b - a) & 0xFFFFFFFF) < 0x80000000


def sn_le(a: int, b: int) -> bool:
    """``a <= b`` in 32-bit serial number arithmetic."""
    return a == b or sn_lt(a, b)

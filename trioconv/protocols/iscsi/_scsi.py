"""The SCSI block commands (SBC-3, SPC-4) an initiator needs, as bytes in and records out.

A command is a *CDB* (command descriptor block, here 6 to 16 bytes) plus, for writes,
data; the device answers with a status byte, data for reads, and on CHECK CONDITION
*sense data* saying what went wrong (a sense key, and an additional sense code and
qualifier, ASC/ASCQ). Nothing here does I/O.

Commands used:

============================  ======  ======================================================
command                       opcode  purpose
============================  ======  ======================================================
TEST UNIT READY               0x00    is the LUN there and ready (clears unit attentions)
INQUIRY                       0x12    device type; VPD pages 0xB0 (block limits) and 0xB2
                                      (logical block provisioning: UNMAP, WRITE SAME)
MODE SENSE (6)                0x1A    write protection (WP), before a LUN is written
READ CAPACITY (16)            0x9E/10 size, block size, thin provisioning (LBPME/LBPRZ)
GET LBA STATUS                0x9E/12 which blocks are mapped: block status
READ (16) / WRITE (16)        88 / 8A data
WRITE SAME (16)               0x93    zeroes without sending them; with UNMAP, deallocates
UNMAP                         0x42    deallocates ranges (thin LUNs)
SYNCHRONIZE CACHE (16)        0x91    flush
============================  ======  ======================================================
"""

from __future__ import annotations

import enum
import struct

import attrs

__all__ = [
    "Capacity",
    "SCSIStatus",
    "Sense",
    "decode_sense",
]


class SCSIStatus(enum.IntEnum):
    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    ACA_ACTIVE = 0x30
    TASK_ABORTED = 0x40


class SenseKey(enum.IntEnum):
    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    BLANK_CHECK = 0x8
    VENDOR_SPECIFIC = 0x9
    COPY_ABORTED = 0xA
    ABORTED_COMMAND = 0xB
    VOLUME_OVERFLOW = 0xD
    MISCOMPARE = 0xE


#: Additional sense codes worth a readable name (SPC-4 annex D).
_ASC: dict[tuple[int, int], str] = {
    (0x04, 0x00): "logical unit not ready",
    (0x04, 0x01): "logical unit becoming ready",
    (0x04, 0x02): "logical unit not ready, initializing command required",
    (0x04, 0x03): "logical unit not ready, manual intervention required",
    (0x0C, 0x00): "write error",
    (0x11, 0x00): "unrecovered read error",
    (0x1A, 0x00): "parameter list length error",
    (0x20, 0x00): "invalid command operation code",
    (0x21, 0x00): "logical block address out of range",
    (0x24, 0x00): "invalid field in CDB",
    (0x25, 0x00): "logical unit not supported",
    (0x26, 0x00): "invalid field in parameter list",
    (0x27, 0x00): "write protected",
    (0x27, 0x07): "space allocation failed write protect",
    (0x28, 0x00): "not ready to ready change, medium may have changed",
    (0x29, 0x00): "power on, reset, or bus device reset occurred",
    (0x2A, 0x01): "mode parameters changed",
    (0x2A, 0x09): "capacity data has changed",
    (0x3A, 0x00): "medium not present",
    (0x3F, 0x0E): "reported LUNs data has changed",
    (0x44, 0x00): "internal target failure",
    (0x55, 0x03): "insufficient resources",
}

# Opcodes and service actions.
TEST_UNIT_READY = 0x00
INQUIRY = 0x12
MODE_SENSE_6 = 0x1A
READ_16 = 0x88
WRITE_16 = 0x8A
WRITE_SAME_16 = 0x93
UNMAP = 0x42
SYNCHRONIZE_CACHE_16 = 0x91
SERVICE_ACTION_IN_16 = 0x9E
SA_READ_CAPACITY_16 = 0x10
SA_GET_LBA_STATUS = 0x12

TYPE_DISK = 0x00
VPD_SUPPORTED_PAGES = 0x00
VPD_BLOCK_LIMITS = 0xB0
VPD_LOGICAL_BLOCK_PROVISIONING = 0xB2


@attrs.frozen
class Sense:
    """Decoded sense data."""

    key: int
    asc: int
    ascq: int

    @property
    def key_name(self) -> str:
        try:
            return SenseKey(self.key).name.replace("_", " ").lower()
        except ValueError:
            return f"sense key 0x{self.key:x}"

    @property
    def text(self) -> str:
        """E.g. ``illegal request: logical block address out of range (asc 0x21/0x00)``."""
        what = _ASC.get((self.asc, self.ascq)) or _ASC.get((self.asc, 0))
        code = f"asc 0x{self.asc:02x}/0x{self.ascq:02x}"
        return f"{self.key_name}: {what} ({code})" if what else f"{self.key_name} ({code})"


def decode_sense(data: bytes | bytearray | memoryview) -> Sense | None:
    """Decode fixed (0x70/0x71) or descriptor (0x72/0x73) sense data; None if absent."""
    if len(data) < 2:
        return None
    code = data[0] & 0x7F
    if code in (0x70, 0x71) and len(data) >= 3:
        asc = data[12] if len(data) > 12 else 0
        ascq = data[13] if len(data) > 13 else 0
        return Sense(data[2] & 0x0F, asc, ascq)
    if code in (0x72, 0x73) and len(data) >= 4:
        return Sense(data[1] & 0x0F, data[2], data[3])
    return None


def sense_of_response(segment: bytes | bytearray | memoryview) -> Sense | None:
    """The sense data in a SCSI Response's data segment (a 2-byte length comes first)."""
    if len(segment) < 2:
        return None
    length = int.from_bytes(segment[:2], "big")
    return decode_sense(segment[2 : 2 + length])


# -- CDBs ------------------------------------------------------------------------------------


def cdb_test_unit_ready() -> bytes:
    return bytes(6)


def cdb_inquiry(page: int | None = None, allocation: int = 255) -> bytes:
    """Standard INQUIRY, or the VPD ``page``."""
    if page is None:
        return struct.pack(">BBBHB", INQUIRY, 0, 0, allocation, 0)
    return struct.pack(">BBBHB", INQUIRY, 1, page, allocation, 0)


def cdb_mode_sense_6(allocation: int = 255) -> bytes:
    """MODE SENSE(6) of all pages' current values, without block descriptors: what
    matters here is the header's device-specific parameter (its WP bit)."""
    return struct.pack(">BBBBBB", MODE_SENSE_6, 0x08, 0x3F, 0, allocation, 0)


def write_protected(data: bytes | bytearray | memoryview) -> bool:
    """The WP bit of a MODE SENSE(6) reply's header (SBC-3: the medium is read-only).

    Raises:
        DecodeError: the reply is shorter than its header.
    """
    if len(data) < 4:
        raise DecodeError(f"MODE SENSE(6) data of {len(data)} bytes")
    return bool(data[2] & 0x80)


def cdb_read_capacity_16(allocation: int = 32) -> bytes:
    return struct.pack(">BBQIBB", SERVICE_ACTION_IN_16, SA_READ_CAPACITY_16, 0, allocation, 0, 0)


def cdb_get_lba_status(lba: int, allocation: int) -> bytes:
    return struct.pack(">BBQIBB", SERVICE_ACTION_IN_16, SA_GET_LBA_STATUS, lba, allocation, 0, 0)


def cdb_read_16(lba: int, blocks: int) -> bytes:
    return struct.pack(">BBQIBB", READ_16, 0, lba, blocks, 0, 0)


def cdb_write_16(lba: int, blocks: int, *, fua: bool = False) -> bytes:
    return struct.pack(">BBQIBB", WRITE_16, 0x08 if fua else 0, lba, blocks, 0, 0)


def cdb_write_same_16(lba: int, blocks: int, *, unmap: bool) -> bytes:
    """WRITE SAME (16): repeat one block over ``blocks``; with ``unmap`` the LUN may
    deallocate them instead (when its provisioning says unmapped blocks read as zero)."""
    return struct.pack(">BBQIBB", WRITE_SAME_16, 0x08 if unmap else 0, lba, blocks, 0, 0)


def cdb_unmap(parameter_length: int) -> bytes:
    return struct.pack(">BB4xBHB", UNMAP, 0, 0, parameter_length, 0)


def unmap_parameters(ranges: list[tuple[int, int]]) -> bytes:
    """The UNMAP parameter list: an 8-byte header, 16 bytes per ``(lba, blocks)``."""
    body = b"".join(struct.pack(">QI4x", lba, blocks) for lba, blocks in ranges)
    return struct.pack(">HH4x", len(body) + 6, len(body)) + body


def cdb_synchronize_cache_16(lba: int = 0, blocks: int = 0) -> bytes:
    return struct.pack(">BBQIBB", SYNCHRONIZE_CACHE_16, 0, lba, blocks, 0, 0)


# -- replies ---------------------------------------------------------------------------------


class DecodeError(Exception):
    """A device's reply is too short or inconsistent."""


@attrs.frozen
class Inquiry:
    """What standard INQUIRY data says: who the device is and whether it is there."""

    qualifier: int
    device_type: int
    vendor: str
    product: str

    @property
    def connected(self) -> bool:
        """Qualifier 0: a device is attached at this LUN (3: no LUN here at all)."""
        return self.qualifier == 0


def decode_inquiry(data: bytes | bytearray | memoryview) -> Inquiry:
    if len(data) < 5:
        raise DecodeError("INQUIRY data too short")
    vendor = bytes(data[8:16]).decode("ascii", "replace").strip()
    product = bytes(data[16:32]).decode("ascii", "replace").strip()
    return Inquiry(data[0] >> 5, data[0] & 0x1F, vendor, product)


def decode_supported_pages(data: bytes | bytearray | memoryview) -> set[int]:
    if len(data) < 4:
        raise DecodeError("VPD page 0x00 too short")
    length = int.from_bytes(data[2:4], "big")
    return set(bytes(data[4 : 4 + length]))


@attrs.frozen
class BlockLimits:
    """VPD page 0xB0, in logical blocks (0 = no limit reported)."""

    max_transfer: int = 0
    opt_transfer: int = 0
    max_unmap: int = 0
    max_unmap_descriptors: int = 0
    max_write_same: int = 0


def decode_block_limits(data: bytes | bytearray | memoryview) -> BlockLimits:
    if len(data) < 16:
        raise DecodeError("VPD page 0xB0 too short")
    max_transfer, opt_transfer = struct.unpack_from(">II", data, 8)
    max_unmap = max_desc = max_ws = 0
    if len(data) >= 28:
        max_unmap, max_desc = struct.unpack_from(">II", data, 20)
    if len(data) >= 44:
        (max_ws,) = struct.unpack_from(">Q", data, 36)
    return BlockLimits(max_transfer, opt_transfer, max_unmap, max_desc, max_ws)


@attrs.frozen
class Provisioning:
    """VPD page 0xB2: which deallocation commands the LUN takes."""

    unmap: bool = False
    write_same_16: bool = False
    lbprz: bool = False
    anc_sup: bool = False


def decode_provisioning(data: bytes | bytearray | memoryview) -> Provisioning:
    if len(data) < 6:
        raise DecodeError("VPD page 0xB2 too short")
    flags = data[5]
    return Provisioning(
        unmap=bool(flags & 0x80),
        write_same_16=bool(flags & 0x40),
        lbprz=bool(flags & 0x04),
        anc_sup=bool(flags & 0x02),
    )


@attrs.frozen
class Capacity:
    """READ CAPACITY (16): the LUN's geometry and provisioning.

    Attributes:
        blocks: number of logical blocks (last LBA + 1).
        block_size: bytes per logical block.
        lbpme: logical block provisioning management enabled (a thin LUN).
        lbprz: deallocated blocks read as zeroes.
    """

    blocks: int
    block_size: int
    lbpme: bool
    lbprz: bool
    physical_exponent: int = 0

    @property
    def size(self) -> int:
        return self.blocks * self.block_size


def decode_read_capacity_16(data: bytes | bytearray | memoryview) -> Capacity:
    if len(data) < 16:
        raise DecodeError("READ CAPACITY (16) data too short")
    last, block_size = struct.unpack_from(">QI", data, 0)
    if block_size == 0 or block_size % 512 or block_size > 1 << 20:
        raise DecodeError(f"the LUN reports a block size of {block_size} bytes")
    return Capacity(
        blocks=last + 1,
        block_size=block_size,
        lbpme=bool(data[14] & 0x80),
        lbprz=bool(data[14] & 0x40),
        physical_exponent=data[13] & 0x0F,
    )


class Provision(enum.IntEnum):
    MAPPED = 0
    DEALLOCATED = 1
    ANCHORED = 2


@attrs.frozen
class LBAStatus:
    lba: int
    blocks: int
    status: Provision


def decode_get_lba_status(data: bytes | bytearray | memoryview) -> list[LBAStatus]:
    """The descriptors of a GET LBA STATUS reply (8-byte header, 16 bytes each)."""
    if len(data) < 8:
        raise DecodeError("GET LBA STATUS data too short")
    length = min(int.from_bytes(data[0:4], "big") + 4, len(data))
    out: list[LBAStatus] = []
    for pos in range(8, length - 15, 16):
        lba, blocks = struct.unpack_from(">QI", data, pos)
        code = data[pos + 12] & 0x0F
        out.append(LBAStatus(lba, blocks, Provision(code) if code <= 2 else Provision.MAPPED))
    return out

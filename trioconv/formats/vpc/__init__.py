"""VHD, qemu's ``vpc`` format: fixed and dynamic disks, read and write.

:func:`open_vpc` is what the format registry calls; :func:`create_vpc` writes a new,
empty image exactly as ``qemu-img create -f vpc`` 7.2 does - the same layout, the same
CHS rounding of the size, the same ``subformat`` and ``force_size`` options. The
on-disk structures live in :mod:`._codec`, the driver in :mod:`._driver`.
"""

from __future__ import annotations

from collections.abc import Mapping

from ..._errors import ImageError, UsageError
from ..._qemuopts import parse_bool
from ...driver import Driver
from .._base import FormatInfo
from . import _codec as codec
from ._driver import DynamicVpcDriver, FixedVpcDriver, open_vpc

__all__ = [
    "FORMAT",
    "VPC_CREATE_OPTIONS",
    "DynamicVpcDriver",
    "FixedVpcDriver",
    "create_vpc",
    "open_vpc",
    "parse_bool",
    "probe_vpc",
]

#: ``-o`` options for creating a VHD, with qemu's help text.
VPC_CREATE_OPTIONS: dict[str, str] = {
    "size": "Virtual disk size",
    "subformat": "Type of virtual hard disk format. Supported formats are "
    "{dynamic (default) | fixed} ",  # (sic: qemu ends it with a space)
    "force_size": "Force disk size calculation to use the actual size specified, rather "
    "than using the nearest CHS-based calculation",
}


def probe_vpc(data: bytes, filename: str) -> int:
    """``conectix`` at offset 0: a dynamic or differencing disk's copy of its footer.

    A fixed disk has its footer only at the end, and is probed as raw, as qemu-img
    probes it: a guest writes the last sector of a raw disk, so a VHD footer there is no
    sign of a VHD (taken for one, the guest would choose how its disk is read next
    time). ``-f vpc`` opens a fixed disk.
    """
    return 100 if data[:8] == codec.FOOTER_COOKIE else 0


def _plan(size: int, options: Mapping[str, str]) -> tuple[str, bool, tuple[int, int, int], int]:
    """The subformat, ``force_size``, geometry and disk size of a new VHD.

    Raises:
        UsageError: a bad option value.
        ImageError: the size is over 2040 GiB.
    """
    subformat = options.get("subformat", "dynamic")
    if subformat not in ("dynamic", "fixed"):
        raise UsageError(f"Parameter 'subformat' does not accept value '{subformat}'")
    force = parse_bool("force_size", options.get("force_size", "off"))
    try:
        chs, total = codec.create_geometry(size, force)
    except codec.VpcFormatError as exc:
        raise ImageError(str(exc)) from None
    return subformat, force, chs, total


async def check_vpc_create(location: str, size: int, options: Mapping[str, str]) -> None:
    """What :func:`create_vpc` would refuse, checked before anything is written (the
    registry's ``check_create``)."""
    _plan(size, options)


async def create_vpc(transport: Driver, size: int, options: Mapping[str, str]) -> None:
    """Write an empty VHD of at least ``size`` bytes, as ``qemu-img create -f vpc`` does.

    Dynamic (the default): footer copy, dynamic header at 512, the BAT at 1536 (all
    entries absent, padded with 0xFF to a sector), footer. Fixed: a sparse data area and
    the footer after it. Without ``force_size`` the size grows to a CHS geometry.

    Raises:
        UsageError: a bad option value.
        ImageError: the size is over 2040 GiB.
    """
    subformat, force, chs, total = _plan(size, options)
    if subformat == "fixed":
        footer = codec.new_footer(total, chs, codec.DiskType.FIXED, force)
        await transport.pwrite(total, footer.encode())
        return
    footer = codec.new_footer(total, chs, codec.DiskType.DYNAMIC, force)
    bs = codec.DEFAULT_BLOCK_SIZE
    entries = -(-(total // codec.SECTOR) // (bs // codec.SECTOR))
    bat_bytes = -(-entries * 4 // codec.SECTOR) * codec.SECTOR
    header = codec.DynamicHeader(max_table_entries=entries, block_size=bs)
    raw = footer.encode()
    await transport.pwrite(0, raw)
    await transport.pwrite(codec.SECTOR, header.encode())
    if bat_bytes:
        await transport.pwrite(3 * codec.SECTOR, b"\xff" * bat_bytes)
    await transport.pwrite(3 * codec.SECTOR + bat_bytes, raw)


FORMAT = FormatInfo(
    "vpc",
    probe_vpc,
    open_vpc,
    create_vpc,
    VPC_CREATE_OPTIONS,
    can_compress=False,
    check_create=check_vpc_create,
)

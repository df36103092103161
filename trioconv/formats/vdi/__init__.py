"""VDI (VirtualBox disk image): dynamic and static images, read and write.

:func:`open_vdi` is what the format registry calls; :func:`create_vdi` writes a new,
empty image exactly as ``qemu-img create -f vdi`` 7.2 does (1 MiB blocks, the block
map right after the header, ``-o static=on`` for a preallocated image). The on-disk
structures live in :mod:`._codec`, the driver in :mod:`._driver`.
"""

from __future__ import annotations

from array import array
from collections.abc import Mapping

from ..._errors import ImageError
from ..._qemuopts import parse_bool
from ...driver import Driver
from .._base import FormatInfo
from . import _codec as codec
from ._driver import VdiDriver, open_vdi

__all__ = ["FORMAT", "VDI_CREATE_OPTIONS", "VdiDriver", "create_vdi", "open_vdi", "probe_vdi"]

#: ``-o`` options for creating a VDI, with qemu's help text.
VDI_CREATE_OPTIONS: dict[str, str] = {
    "size": "Virtual disk size",
    "static": "VDI static (pre-allocated) image",
}


def probe_vdi(header: bytes, filename: str) -> int:
    """The VDI signature at offset 0x40 in a whole 512-byte header (qemu's probe)."""
    if len(header) < codec.HEADER_SIZE:
        return 0
    return 100 if int.from_bytes(header[0x40:0x44], "little") == codec.SIGNATURE else 0


def _plan(size: int, options: Mapping[str, str]) -> tuple[bool, codec.Header]:
    """Whether a new VDI is static, and its header.

    Raises:
        UsageError: a bad ``static`` value.
        ImageError: the size is over qemu's maximum.
    """
    static = parse_bool("static", options.get("static", "off"))
    try:
        return static, codec.new_header(size, static)
    except codec.VdiFormatError as exc:
        raise ImageError(str(exc)) from None


async def check_vdi_create(location: str, size: int, options: Mapping[str, str]) -> None:
    """What :func:`create_vdi` would refuse, checked before anything is written (the
    registry's ``check_create``)."""
    _plan(size, options)


async def create_vdi(transport: Driver, size: int, options: Mapping[str, str]) -> None:
    """Write an empty VDI of ``size`` bytes (rounded up to sectors), as qemu does.

    Raises:
        UsageError: a bad ``static`` value.
        ImageError: the size is over qemu's maximum.
    """
    static, header = _plan(size, options)
    await transport.pwrite(0, header.encode())
    blocks = header.blocks_in_image
    chunk = 1024 * 1024  # entries written at a time: memory stays flat for any size
    for first in range(0, blocks, chunk):
        stop = min(blocks, first + chunk)
        if static:
            part = codec.encode_bmap(array("I", range(first, stop)))
        else:
            part = b"\xff" * ((stop - first) * 4)
        if stop == blocks:  # the last sector is padded with zeroes
            part += bytes(header.bmap_bytes - blocks * 4)
        await transport.pwrite(header.offset_bmap + first * 4, part)
    if static:
        # qemu truncates the file to its full length: a sparse file of zero blocks.
        end = header.offset_data + blocks * header.block_size
        if end > header.offset_data:
            await transport.pwrite(end - codec.SECTOR, bytes(codec.SECTOR))


FORMAT = FormatInfo(
    "vdi",
    probe_vdi,
    open_vdi,
    create_vdi,
    VDI_CREATE_OPTIONS,
    can_compress=False,
    check_create=check_vdi_create,
)

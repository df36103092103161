"""VMDK (VMware virtual disk), read and write, as qemu-img 7.2 makes and reads it.

Reading: monolithicSparse and streamOptimized (one hosted sparse extent, ``KDMV``,
plain or with deflated grains behind markers, the grain directory in place or in a
footer at the end), monolithicFlat, twoGbMaxExtentSparse/Flat and hand-written
descriptors with several extents (FLAT extents at sector offsets, VMFS, SPARSE, and
VMFSSPARSE, which qemu opens as SPARSE: the file's magic decides). Delta disks
(``parentFileNameHint``) read through their parent. The older ``COWD`` sparse files and
seSparse extents are refused by name.

Writing: ``-o subformat=`` monolithicSparse (the default), monolithicFlat,
twoGbMaxExtentSparse, twoGbMaxExtentFlat or streamOptimized, with qemu's
``adapter_type``, ``hwversion``, ``compat6``, ``zeroed_grain`` and ``toolsversion``
options and their defaults. :func:`create_vmdk` writes what qemu's ``vmdk_co_do_create``
writes: preallocated grain tables (so grains can be appended in any order), the
descriptor embedded in sector 1 or in its own file, extent files named
``NAME-flat.vmdk``, ``NAME-s001.vmdk``, ``NAME-f001.vmdk`` next to the descriptor.

The sans-I/O codec is :mod:`._codec`; the extents in :mod:`._extents`; the driver and
the opener in :mod:`._driver`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Mapping
from typing import TYPE_CHECKING

import attrs

from ..._errors import ImageError, UnsupportedError, UsageError
from ..._qemuopts import parse_bool
from ...driver import Driver
from ...protocols.file import create_file, open_file
from .._base import FormatInfo
from .._common import beside
from . import _codec as codec
from ._codec import SECTOR
from ._driver import VmdkDriver, VmdkInfo
from ._driver import open_vmdk as _open

if TYPE_CHECKING:
    from ..._open import OpenContext

__all__ = [
    "FORMAT",
    "VMDK_CREATE_OPTIONS",
    "VmdkDriver",
    "VmdkInfo",
    "VmdkOptions",
    "create_vmdk",
    "open_vmdk",
    "parse_create_options",
    "probe_vmdk",
]

SUBFORMATS = (
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
)
ADAPTER_TYPES = ("ide", "buslogic", "lsilogic", "legacyESX")
#: qemu's constant split size for twoGbMaxExtent* subformats.
SPLIT_SIZE = 0x80000000

#: ``-o`` options, with qemu-img's help text.
VMDK_CREATE_OPTIONS: dict[str, str] = {
    "adapter_type": (
        "Virtual adapter type, can be one of ide (default), lsilogic, buslogic or legacyESX"
    ),
    "backing_file": "File name of a base image",
    "backing_fmt": "Must be 'vmdk' if present",
    "compat6": "VMDK version 6 image",
    "hwversion": "VMDK hardware version",
    "size": "Virtual disk size",
    "subformat": (
        "VMDK flat extent format, can be one of {monolithicSparse (default) | "
        "monolithicFlat | twoGbMaxExtentSparse | twoGbMaxExtentFlat | streamOptimized} "
    ),
    "toolsversion": "VMware guest tools version",
    "zeroed_grain": "Enable efficient zero writes using the zeroed-grain GTE feature",
}


@attrs.frozen
class VmdkOptions:
    """Validated ``-o`` options, with qemu's defaults."""

    subformat: str = "monolithicSparse"
    adapter_type: str = "ide"
    hwversion: str = "4"
    toolsversion: str = "2147483647"
    zeroed_grain: bool = False

    @property
    def flat(self) -> bool:
        return self.subformat in ("monolithicFlat", "twoGbMaxExtentFlat")

    @property
    def split(self) -> bool:
        return self.subformat.startswith("twoGbMaxExtent")

    @property
    def compress(self) -> bool:
        return self.subformat == "streamOptimized"


def _bool(options: Mapping[str, str], key: str) -> bool:
    value = options.get(key)
    return value is not None and parse_bool(key, value)


def parse_create_options(options: Mapping[str, str]) -> VmdkOptions:
    """Check ``-o`` options as qemu's ``vmdk_co_create_opts`` does, with its messages.

    Raises:
        UsageError: a bad value or combination.
        UnsupportedError: a flat subformat with a backing file or zeroed grains.
    """
    backing_fmt = options.get("backing_fmt")
    if backing_fmt is not None and backing_fmt != "vmdk":
        raise UsageError("backing_file must be a vmdk image")
    compat6 = _bool(options, "compat6")
    zeroed_grain = _bool(options, "zeroed_grain")
    adapter = options.get("adapter_type", "ide")
    if adapter not in ADAPTER_TYPES:
        raise UsageError(f"invalid parameter value: {adapter}")
    subformat = options.get("subformat", "monolithicSparse")
    if subformat not in SUBFORMATS:
        raise UsageError(f"invalid parameter value: {subformat}")
    hwversion: str | None = options.get("hwversion")
    if hwversion == "undefined":
        hwversion = None
    if compat6:
        if hwversion is not None:
            raise UsageError("compat6 cannot be enabled with hwversion set")
        hwversion = "6"
    result = VmdkOptions(
        subformat=subformat,
        adapter_type=adapter,
        hwversion="4" if hwversion is None else hwversion,  # (an empty one is kept)
        toolsversion=options.get("toolsversion", "2147483647"),
        zeroed_grain=zeroed_grain,
    )
    if result.flat and options.get("backing_file"):
        raise UnsupportedError("Flat image can't have backing file")
    if result.flat and zeroed_grain:
        raise UnsupportedError("Flat image can't enable zeroed grain")
    return result


async def init_sparse_extent(
    drv: Driver, size: int, *, compress: bool, zeroed_grain: bool
) -> codec.SparseHeader:
    """Write a new, empty sparse extent of ``size`` bytes onto an empty writable driver.

    The layout is qemu's ``vmdk_init_extent``: header, (descriptor space), redundant GD
    and its GTs, GD and its GTs, all GTs empty; the file ends where grains will start.
    """
    header, gt_count, gd_sectors = codec.new_sparse_header(
        size, compress=compress, zeroed_grain=zeroed_grain
    )
    gt_sectors = header.num_gtes_per_gt * 4 // SECTOR
    # Extend the file to where grains start (a sparse hole, as qemu's truncate makes).
    await drv.pwrite(header.grain_offset * SECTOR - SECTOR, bytes(SECTOR))
    await drv.pwrite(0, header.encode())
    for gd_sector in (header.rgd_offset, header.gd_offset):
        first = gd_sector + gd_sectors
        entries = [first + i * gt_sectors for i in range(gt_count)]
        blob = codec.encode_table(entries).ljust(gd_sectors * SECTOR, b"\0")
        await drv.pwrite(gd_sector * SECTOR, blob)
    return header


def _decompose(path: str) -> tuple[str, str, str]:
    """qemu's ``filename_decompose``: folder, name before the last dot, the dot on."""
    folder, base = os.path.split(path)
    dot = base.rfind(".")
    if dot < 0:
        return folder, base, ""
    return folder, base[:dot], base[dot:]


async def check_vmdk_create(location: str, size: int, options: Mapping[str, str]) -> None:
    """What :func:`create_vmdk` would refuse about its options, checked before anything
    is written (the registry's ``check_create``): the option values and, for a delta
    disk, that its parent is a VMDK image.

    Raises:
        UsageError: bad options or a parent of another format.
        UnsupportedError: a flat subformat with a backing file or zeroed grains.
        ImageError: the parent cannot be opened.
    """
    parse_create_options(options)
    parent = options.get("backing_file") or None
    if parent is not None:
        await _parent_cid(location, parent)


async def create_vmdk(transport: Driver, size: int, options: Mapping[str, str]) -> None:
    """Write a new, empty VMDK image of ``size`` bytes (rounded up to 512).

    ``transport`` is the descriptor's (for monolithic sparse subformats, the whole
    image's). Multi-file subformats create their extent files next to it, which needs a
    local file.

    Raises:
        UsageError: bad options (qemu's messages).
        UnsupportedError: a multi-file subformat on a transport that is not a local file;
            a backing file.
        ImageError: an extent file cannot be created.
    """
    opts = parse_create_options(options)
    size = -(-size // SECTOR) * SECTOR
    lines: list[codec.ExtentLine] = []
    created: list[str] = []
    location = transport.location
    parent = options.get("backing_file") or None
    parent_cid = 0xFFFFFFFF
    if parent is not None:
        parent_cid = await _parent_cid(location, parent)
    try:
        if not opts.flat and not opts.split:
            await init_sparse_extent(
                transport, size, compress=opts.compress, zeroed_grain=opts.zeroed_grain
            )
            lines.append(
                codec.ExtentLine("RW", size // SECTOR, "SPARSE", os.path.basename(location))
            )
        else:
            if transport.name != "file" or not location:
                raise UnsupportedError(
                    f"vmdk subformat '{opts.subformat}' keeps its extents in separate files "
                    "and can only be created on a local file"
                )
            folder = os.path.dirname(location)
            for name, cur in _extent_files(location, size, opts):
                await _create_extent_file(os.path.join(folder, name), cur, opts, created)
                kind, offset = ("FLAT", 0) if opts.flat else ("SPARSE", None)
                lines.append(codec.ExtentLine("RW", cur // SECTOR, kind, name, offset))
        heads = 16 if opts.adapter_type == "ide" else 255
        desc = codec.Descriptor(
            version=1,
            cid=secrets.randbits(32),
            parent_cid=parent_cid,
            parent_hint=parent,
            create_type=opts.subformat,
            extents=tuple(lines),
            ddb=(
                ("ddb.virtualHWVersion", opts.hwversion),
                ("ddb.geometry.cylinders", str(size // (63 * heads * SECTOR))),
                ("ddb.geometry.heads", str(heads)),
                ("ddb.geometry.sectors", "63"),
                ("ddb.adapterType", opts.adapter_type),
                ("ddb.toolsVersion", opts.toolsversion),
            ),
        )
        text = codec.format_descriptor(desc).encode()
        if not opts.flat and not opts.split:
            if len(text) > 20 * SECTOR:
                raise UsageError("the VMDK descriptor does not fit in its 20 sectors")
            await transport.pwrite(SECTOR, text)
        else:
            await transport.pwrite(0, text)
    except BaseException:
        for path in created:
            with contextlib.suppress(OSError):
                os.unlink(path)
        raise


def _extent_files(location: str, size: int, opts: VmdkOptions) -> list[tuple[str, int]]:
    """The extent files of a new multi-file image: ``(name, bytes)`` each, named as
    qemu names them after the descriptor (``disk-flat.vmdk``, ``disk-s001.vmdk``, ...)."""
    _, prefix, postfix = _decompose(location)
    extent_size = SPLIT_SIZE if opts.split else size
    files: list[tuple[str, int]] = []
    done = 0
    while done < size:
        cur = min(size - done, extent_size)
        if opts.split:
            kind = "f" if opts.flat else "s"
            files.append((f"{prefix}-{kind}{len(files) + 1:03d}{postfix}", cur))
        else:
            files.append((f"{prefix}-flat{postfix}", cur))
        done += cur
    return files


def vmdk_side_files(path: str, size: int, options: Mapping[str, str]) -> list[str]:
    """The extent files creating a multi-file VMDK at ``path`` makes beside it (the
    registry's ``side_files``); none for the single-file subformats."""
    opts = parse_create_options(options)
    if not opts.flat and not opts.split:
        return []
    size = -(-size // SECTOR) * SECTOR
    folder = os.path.dirname(path)
    return [os.path.join(folder, name) for name, _ in _extent_files(path, size, opts)]


async def _parent_cid(location: str, parent: str) -> int:
    """The content ID of the parent a new delta disk names (``-o backing_file``, ``-B``),
    which must be a VMDK image; a relative name is found next to the new image."""
    from ..._open import open_image
    from ._driver import VmdkDriver

    try:
        async with open_image(beside(location, parent), force_share=True) as image:
            if not isinstance(image, VmdkDriver):
                raise UsageError(f"Invalid backing file format: {image.name}. Must be vmdk")
            return image.info.cid
    except ImageError as exc:
        raise ImageError(f"Could not open backing file '{parent}': {exc}") from None


async def _create_extent_file(path: str, size: int, opts: VmdkOptions, created: list[str]) -> None:
    if opts.flat:
        if await create_file(path, size):
            created.append(path)
        return
    if await create_file(path, 0):
        created.append(path)
    drv = await open_file(path, writable=True)
    try:
        await init_sparse_extent(drv, size, compress=False, zeroed_grain=opts.zeroed_grain)
        await drv.flush()
    finally:
        await drv.aclose()


async def open_vmdk(transport: Driver, ctx: OpenContext) -> Driver:
    """Open a VMDK image on top of ``transport``; see :func:`._driver.open_vmdk`."""
    return await _open(transport, ctx)


def probe_vmdk(header: bytes, filename: str) -> int:
    """qemu's probe: ``KDMV``/``COWD`` magic, or a descriptor's ``version=`` line."""
    return codec.probe(header, filename)


FORMAT = FormatInfo(
    "vmdk",
    probe_vmdk,
    open_vmdk,
    create=create_vmdk,
    create_options=VMDK_CREATE_OPTIONS,
    can_compress=True,
    check_create=check_vmdk_create,
    side_files=vmdk_side_files,
)

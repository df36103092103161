"""The VMDK driver: extents laid end to end, opened from a descriptor or a sparse file.

Opening follows qemu's ``vmdk_open``: a file that starts with ``KDMV`` is a monolithic
sparse extent (``monolithicSparse``, or ``streamOptimized`` when its grains are
compressed) whose descriptor is embedded; anything else is read as a descriptor file
whose extents are opened relative to the descriptor's folder, through the same kind of
transport (local files). The extra files are closed with the image.

Every request is cut at extent boundaries and handed to the extents
(:mod:`._extents`). ``block_status`` answers per extent: unallocated and zeroed grains
are ZERO, or with a parent image (``parentFileNameHint``, a VMware delta disk or
snapshot) HOLE for unallocated ones, which read as the parent; FLAT extents report their
file's holes as ZERO. A delta disk is written with copy on write from its parent (see
:mod:`._extents`).
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import os
import re
import secrets
from typing import TYPE_CHECKING

import attrs
import trio

from ..._errors import (
    BackingChainTooLong,
    ImageError,
    TrioconvError,
    TrioconvIOError,
    UnsupportedError,
)
from ...driver import Buffer, Caps, Driver, Extent, ExtentKind, Limits
from ...protocols.file import open_file
from .._common import backing_error, full_backing_name, read_or_zero, resolve_name
from . import _codec as codec
from ._codec import SECTOR, VmdkFormatError
from ._extents import FlatExtent, SparseExtent

if TYPE_CHECKING:
    from ..._open import OpenContext

__all__ = ["VmdkDriver", "open_vmdk"]

AnyExtent = FlatExtent | SparseExtent
_URI_RE = re.compile(r"^[a-z][a-z0-9+.-]*:", re.IGNORECASE)


@attrs.frozen
class VmdkInfo:
    """What ``qemu-img info`` shows under format-specific: create type, CIDs."""

    create_type: str
    cid: int
    parent_cid: int
    #: The extents were listed in a separate descriptor file (not monolithic).
    from_descriptor: bool = False


class VmdkDriver(Driver):
    """An open VMDK image. Made by :func:`open_vmdk`."""

    name = "vmdk"

    def __init__(self, extents: list[AnyExtent], info: VmdkInfo, *, writable: bool) -> None:
        self.extents = extents
        self.info = info
        self._starts = [e.start for e in extents]
        self._size = extents[-1].end if extents else 0
        self._writable = writable
        self._closed = False
        #: The parent image's name as the descriptor gives it (None: no parent).
        self.parent_hint: str | None = None
        #: Where the descriptor text is (its file, byte offset, the text as read), for
        #: the new content ID a writable image gets (:meth:`new_content_id`).
        self.descriptor: tuple[Driver, int, bytes] | None = None
        self._parent_checked = False
        self._cid_changed = False  # by the first write (see _written)

    def set_parent(self, hint: str, parent: Driver) -> None:
        """Let unallocated grains read as ``parent`` (opened from ``hint``)."""
        self.parent_hint = hint
        self.backing = parent
        for ext in self.extents:
            if isinstance(ext, SparseExtent):
                ext.read_parent = self._read_parent
                ext.check_parent = self._check_parent

    async def _read_parent(self, guest: int, view: memoryview) -> None:
        assert self.backing is not None
        await read_or_zero(self.backing, guest, view)

    async def _check_parent(self) -> None:
        """Refuse to show a parent that is not the image this delta disk was made on.

        A delta disk records its parent's content ID (``parentCID``); writing to the
        parent gives the parent a new one. Reading through to a parent whose ID no
        longer matches would mix the delta's old changes with the parent's new data, so
        qemu fails such reads ("Invalid argument"), and so does trioconv; a parent that
        is not a VMDK has no content ID and fails the same way. Checked once, at the
        first read that reaches the parent: a delta whose grains are all its own reads.
        """
        if self._parent_checked:
            return
        parent = self.backing
        cid = parent.info.cid if isinstance(parent, VmdkDriver) else None
        if cid != self.info.parent_cid:
            found = "is not a VMDK image" if cid is None else f"has content ID {cid:08x}"
            raise TrioconvIOError(
                f"{self.location}: its parent '{self.parent_hint}' has changed since the "
                f"delta disk was made (parentCID {self.info.parent_cid:08x}; the parent "
                f"{found}): Invalid argument",
                errno=errno.EINVAL,
            )
        self._parent_checked = True

    # -- contract ---------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self._size

    @property
    def limits(self) -> Limits:
        sparse = [e for e in self.extents if isinstance(e, SparseExtent)]
        grain = sparse[0].grain if sparse else 0
        align = 1
        if self._writable:
            # A stream extent takes whole grains best: the engine then cuts its jobs on
            # grain boundaries and no grain has to wait in memory for its other half.
            align = grain if any(e.compressed for e in sparse) else SECTOR
        return Limits(request_alignment=align, cluster_size=grain)

    @property
    def caps(self) -> Caps:
        zero_init = all(
            not isinstance(e, FlatExtent) or e.file.caps.zero_init for e in self.extents
        )
        return Caps(
            writable=self._writable,
            zeroes=self._writable,
            block_status=True,
            zero_init=zero_init,
            compress=self._writable,
        )

    def describe(self) -> dict[str, object]:
        """qemu-img info's vmdk keys: CIDs, create type and one entry per extent."""
        extents: list[dict[str, object]] = []
        for ext in self.extents:
            item: dict[str, object] = {}
            if ext.compressed:
                item["compressed"] = True
            item["virtual-size"] = ext.length
            item["filename"] = ext.file.location
            if isinstance(ext, SparseExtent):
                item["cluster-size"] = ext.grain
            # qemu names the extent type only for extents listed in a descriptor file.
            item["format"] = ext.kind if self.info.from_descriptor else ""
            extents.append(item)
        data: dict[str, object] = {
            "cid": self.info.cid,
            "parent-cid": self.info.parent_cid,
            "create-type": self.info.create_type,
            "extents": extents,
        }
        out: dict[str, object] = {"format-specific": {"type": "vmdk", "data": data}}
        kinds = {
            (isinstance(e, FlatExtent), e.compressed, getattr(e, "grain", 0)) for e in self.extents
        }
        if len(kinds) > 1:
            # Extents of different kinds have no one cluster size: qemu then has no
            # block-driver info, and shows neither a cluster size nor a dirty flag.
            out["cluster-size"] = out["dirty-flag"] = None
        if self.parent_hint is not None:
            # Shown whether or not the parent was opened (qemu-img info looks at the
            # image alone); a VMDK parent is always a VMDK image to QEMU.
            out["backing-filename"] = self.parent_hint
            full = full_backing_name(self.parent_hint, self.backing, self.location)
            if full is not None:
                out["full-backing-filename"] = full
            out["backing-filename-format"] = "vmdk" if self.backing is None else self.backing.name
        actual = self._allocated_bytes()
        if actual is not None:
            out["actual-size"] = actual
        return out

    def _allocated_bytes(self) -> int | None:
        """Disk space of the image file and of each extent's file, as qemu adds them up:
        an extent file is counted once per extent in it (two extents of one file, twice),
        the image's own file once."""
        paths = [self.location]
        paths += [ext.file.location for ext in self.extents if ext.file.location != self.location]
        total = 0
        for path in paths:
            local = _local(path)
            if local is None:
                return None
            try:
                total += os.stat(local).st_blocks * 512
            except OSError:
                return None
        return total

    def _pieces(self, offset: int, length: int) -> list[tuple[AnyExtent, int, int, int]]:
        """``(extent, extent_offset, length, buffer_offset)`` covering the request."""
        if offset < 0 or offset + length > self._size:
            raise TrioconvIOError(
                f"{self.location}: request of {length} bytes at {offset} is outside the "
                f"image ({self._size} bytes)",
                offset=offset,
            )
        out = []
        i = bisect.bisect_right(self._starts, offset) - 1
        pos = offset
        while pos < offset + length:
            ext = self.extents[i]
            n = min(ext.end, offset + length) - pos
            if n > 0:
                out.append((ext, pos - ext.start, n, pos - offset))
                pos += n
            i += 1
        return out

    async def preadinto(self, offset: int, buf: memoryview) -> None:
        buf = buf.cast("B") if buf.format != "B" else buf
        for ext, rel, n, at in self._pieces(offset, buf.nbytes):
            await ext.read(rel, buf[at : at + n])

    def _check_writable(self) -> None:
        if not self._writable:
            raise UnsupportedError(f"{self.location}: image is opened read-only")

    async def _written(self) -> None:
        """After the image's first write, a new content ID, as qemu gives it: a delta
        disk made on this one (which records this ID as its parentCID) can tell that
        its parent changed under it. A conversion refused before it writes (a ``-n``
        target too small) leaves the image as it was.

        Only the first write waits for it, after its own data: a write allocates its
        grains as it starts, so waiting before that would let later writes start
        ahead of it."""
        if self._cid_changed:
            return
        self._cid_changed = True
        await self.new_content_id()

    async def new_content_id(self) -> None:
        """Write a new random content ID into the descriptor. It has as many hex digits
        as the old, so the descriptor keeps its length and is patched in place."""
        if self.descriptor is None:
            return
        file, at, text = self.descriptor
        match = re.search(rb"^CID=([0-9a-fA-F]+)[ \t]*\r?$", text, re.MULTILINE)
        if match is None:
            return
        digits = len(match.group(1))
        low = 16 ** (digits - 1) if digits > 1 else 1
        cid = low + secrets.randbelow(16**digits - low)
        await file.pwrite(at + match.start(1), f"{cid:0{digits}x}".encode())
        self.info = attrs.evolve(self.info, cid=cid)

    async def pwrite(self, offset: int, data: Buffer) -> None:
        self._check_writable()
        view = memoryview(data).cast("B")
        for ext, rel, n, at in self._pieces(offset, view.nbytes):
            await ext.write(rel, view[at : at + n])
        await self._written()

    async def pwrite_zeroes(
        self, offset: int, length: int, *, may_unmap: bool = False, fast: bool = False
    ) -> None:
        self._check_writable()
        for ext, rel, n, _ in self._pieces(offset, length):
            await ext.write_zeroes(rel, n, may_unmap, fast)
        await self._written()

    async def compress(self, offset: int, data: memoryview) -> object:
        """Deflate whole grains for a stream extent; a plain copy for other sparse extents.

        qemu-img takes ``-c`` for every sparse VMDK subformat and writes uncompressed
        data to those that are not streamOptimized; so does trioconv. Flat extents have
        no grains, and qemu-img refuses them with "invalid cluster size".
        """
        pieces = self._pieces(offset, data.nbytes)
        if any(isinstance(ext, FlatExtent) for ext in self.extents):
            raise UnsupportedError(
                "invalid cluster size (compressed writes need a sparse VMDK subformat)"
            )
        if len(pieces) == 1 and isinstance(pieces[0][0], SparseExtent):
            ext = pieces[0][0]
            if ext.compressed:
                grains = ext.prepare(pieces[0][1], data)
                if grains is not None:
                    return await ext.compress(grains)
        return bytes(data)

    async def pwrite_compressed(self, offset: int, prepared: object) -> None:
        self._check_writable()
        if isinstance(prepared, bytes):
            await self.pwrite(offset, prepared)
            return
        assert isinstance(prepared, tuple)
        grains, records = prepared
        (ext, _, _, _), *_ = self._pieces(offset, 1)
        assert isinstance(ext, SparseExtent)
        await ext.write_compressed(grains, records)
        await self._written()

    async def layer_status(self, offset: int, length: int) -> Extent:
        if self._closed:  # (the grain tables in memory would still answer)
            raise TrioconvIOError(f"{self.location}: image is closed")
        (ext, rel, _, _), *_ = self._pieces(offset, 1)
        want = min(max(length, 1), ext.length - rel)
        got, kind = await ext.status(rel, want)
        n = max(1, min(got, ext.length - rel))
        parent = self.backing
        if kind is ExtentKind.HOLE:
            if parent is None or offset >= parent.size:
                kind = ExtentKind.ZERO  # nothing below shows through there
            else:
                n = min(n, parent.size - offset)
        return Extent(offset, n, kind)

    async def block_status(self, offset: int, length: int) -> Extent:
        ext = await self.layer_status(offset, length)
        if ext.kind is not ExtentKind.HOLE or self.backing is None:
            return ext
        below = await self.backing.block_status(offset, ext.length)
        kind = ExtentKind.DATA if below.kind is ExtentKind.DATA else ExtentKind.ZERO
        return Extent(offset, min(ext.length, below.length), kind)

    async def flush(self) -> None:
        if not self._writable:
            return
        for ext in self.extents:
            await ext.flush()

    async def aclose(self) -> None:
        """Write back metadata (best effort, shielded) and drop caches; files close with
        the opener's exit stack."""
        if self._closed:
            return
        self._closed = True
        if self._writable:
            with trio.CancelScope(shield=True), contextlib.suppress(TrioconvError):
                await self.flush()


# -- opening ----------------------------------------------------------------------------


def _local(location: str) -> str | None:
    if location.startswith("file:"):
        return location[5:]
    if _URI_RE.match(location) and not os.path.exists(location):
        return None
    return location


async def _open_extent_file(ctx: OpenContext, name: str, writable: bool, where: str) -> Driver:
    if os.path.isabs(name):
        path = name
    else:
        here = _local(ctx.location)
        if here is None:
            raise ImageError(
                f"{where}: Cannot use relative paths with VMDK descriptor file "
                f"'{ctx.location}': extent '{name}'"
            )
        path = os.path.join(os.path.dirname(here), name)
    try:
        drv = await open_file(
            path, writable=writable, cache=ctx.cache, force_share=ctx.force_share and not writable
        )
    except TrioconvError as exc:
        raise ImageError(f"{where}: Could not open extent file '{path}': {exc}") from None
    ctx.stack.push_async_callback(drv.aclose)
    return drv


async def _read_header(file: Driver, name: str) -> tuple[codec.SparseHeader, bool]:
    """The extent's header, and whether it came from a footer (GD at the end)."""
    size = file.size
    head = await file.pread(0, min(size, SECTOR))
    header = codec.parse_header(head)
    footer = header.gd_offset == codec.GD_AT_END
    if footer:
        if size < 3 * SECTOR + SECTOR:
            raise VmdkFormatError("Invalid footer: the file is too short", size)
        at = size // SECTOR * SECTOR - 3 * SECTOR
        header = codec.parse_footer(await file.pread(at, 3 * SECTOR), at)
    return header, footer


async def _open_sparse(
    file: Driver, start: int, name: str, writable: bool, header: tuple[codec.SparseHeader, bool]
) -> SparseExtent:
    layout = codec.sparse_layout(header[0], file.size, writable=writable)
    if writable and header[1]:
        raise UnsupportedError(
            f"{name}: a streamOptimized extent with its grain directory at the end can only be read"
        )
    gd_bytes = layout.gd_entries * 4
    gd = codec.decode_table(await file.pread(layout.gd_offset, gd_bytes))
    rgd = None
    if writable and layout.rgd_offset:
        rgd = codec.decode_table(await file.pread(layout.rgd_offset, gd_bytes))
    ext = SparseExtent(file, start, layout, gd, rgd, writable=writable, name=name)
    if writable:
        await ext.load_all_tables()
    return ext


async def _with_parent(
    driver: VmdkDriver, desc: codec.Descriptor | None, ctx: OpenContext, where: str
) -> VmdkDriver:
    """Open the parent image a delta disk names, if any (its format is probed, as
    qemu does: a VMDK descriptor does not say it)."""
    if desc is None or desc.parent_hint is None:
        return driver
    if ctx.no_backing:
        driver.parent_hint = desc.parent_hint  # named, not opened
        return driver
    path = resolve_name(ctx, desc.parent_hint, "backing file")
    try:
        parent = await ctx.open_backing(path, None)
    except BackingChainTooLong:
        raise
    except TrioconvError as exc:
        raise backing_error(where, exc) from None
    driver.set_parent(desc.parent_hint, parent)
    return driver


async def open_vmdk(transport: Driver, ctx: OpenContext) -> VmdkDriver:
    """Open a VMDK image: a sparse file or a descriptor and its extent files.

    Raises:
        ImageError: not a VMDK image trioconv can read, or an extent or the parent
            image cannot be opened.
        UnsupportedError: VMFS sparse or seSparse extents.
    """
    where = f"Could not open '{ctx.location}'"
    writable = transport.caps.writable
    try:
        driver = await _open(transport, ctx, where, writable)
    except VmdkFormatError as exc:
        raise ImageError(f"{where}: {exc}") from None
    except TrioconvIOError as exc:
        raise ImageError(f"{where}: {exc}") from None
    driver.location = ctx.location
    ctx.stack.push_async_callback(driver.aclose)
    return driver


def _embedded_descriptor(raw: bytes) -> codec.Descriptor | None:
    text = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    try:
        return codec.parse_descriptor(text)
    except VmdkFormatError:
        return None


async def _open(transport: Driver, ctx: OpenContext, where: str, writable: bool) -> VmdkDriver:
    size = transport.size
    if size < 4:
        raise ImageError(f"{where}: File is too small, not a valid image")
    magic = await transport.pread(0, 4)
    if magic == codec.VMDK3_MAGIC:
        raise UnsupportedError(f"{where}: VMDK3 ('COWD') sparse extents are not supported")
    if magic == codec.MAGIC:
        found = await _read_header(transport, ctx.location)
        header = found[0]
        if header.capacity == 0 and header.desc_offset:
            if header.desc_offset * SECTOR >= size:
                raise ImageError(
                    f"{where}: the descriptor offset {header.desc_offset * SECTOR} is past "
                    f"the end of the file ({size} bytes)"
                )
            raw = await transport.pread(
                header.desc_offset * SECTOR, min(size, codec.MAX_DESCRIPTOR)
            )
            return await _open_descriptor(
                raw, transport, ctx, where, writable, at=header.desc_offset * SECTOR
            )
        ext = await _open_sparse(transport, 0, ctx.location, writable, found)
        desc = None
        if header.desc_offset and header.desc_size and header.desc_offset * SECTOR < size:
            # (One past the end of the file is ignored, as qemu does: it reads zeroes.)
            n = min(header.desc_size * SECTOR, codec.MAX_DESCRIPTOR)
            raw_desc = await transport.pread(header.desc_offset * SECTOR, n)
            desc = _embedded_descriptor(raw_desc)
        create_type = "streamOptimized" if ext.compressed else "monolithicSparse"
        info = VmdkInfo(
            create_type,
            desc.cid if desc else 0,
            desc.parent_cid if desc else 0xFFFFFFFF,
        )
        driver = VmdkDriver([ext], info, writable=writable)
        if desc is not None:
            driver.descriptor = (transport, header.desc_offset * SECTOR, raw_desc)
        return await _with_parent(driver, desc, ctx, where)
    raw = await transport.pread(0, min(size, codec.MAX_DESCRIPTOR))
    return await _open_descriptor(raw, transport, ctx, where, writable)


async def _open_descriptor(
    raw: bytes, transport: Driver, ctx: OpenContext, where: str, writable: bool, at: int = 0
) -> VmdkDriver:
    text = raw.split(b"\0", 1)[0].decode("utf-8", "replace")
    try:
        desc = codec.parse_descriptor(text)
    except VmdkFormatError as exc:
        raise ImageError(f"{where}: {exc}") from None
    if desc.create_type not in codec.DESCRIPTOR_CREATE_TYPES:
        raise ImageError(f"{where}: Unsupported image type '{desc.create_type}'")
    extents: list[AnyExtent] = []
    start = 0
    for line in desc.extents:
        if line.kind in ("FLAT", "VMFS"):
            file = await _open_extent_file(ctx, line.filename, writable, where)
            length = line.sectors * SECTOR
            offset = (line.offset or 0) * SECTOR
            extents.append(FlatExtent(file, start, length, offset, line.kind))
        elif line.kind in ("SPARSE", "VMFSSPARSE"):
            # As in qemu, both kinds are opened alike: the file's magic tells a hosted
            # sparse file (read) from the older COWD format (refused).
            file = await _open_extent_file(ctx, line.filename, writable, where)
            if file.size < 4:
                raise ImageError(f"{where}: extent '{line.filename}': File is too small")
            magic = await file.pread(0, 4)
            if magic == codec.VMDK3_MAGIC:
                raise UnsupportedError(
                    f"{where}: extent '{line.filename}': VMDK3 ('COWD') sparse extents are "
                    "not supported"
                )
            if magic != codec.MAGIC:
                raise ImageError(f"{where}: extent '{line.filename}': Image not in VMDK format")
            try:
                header = await _read_header(file, line.filename)
                ext = await _open_sparse(file, start, line.filename, writable, header)
            except VmdkFormatError as exc:
                raise ImageError(f"{where}: extent '{line.filename}': {exc}") from None
            ext.kind = line.kind  # what info lists, as the descriptor names it
            extents.append(ext)
        elif line.kind == "SESPARSE":
            raise UnsupportedError(f"{where}: {line.kind} extents are not supported")
        else:
            raise ImageError(f"{where}: Unsupported extent type '{line.kind}'")
        start = extents[-1].end
    if not extents:
        raise ImageError(f"{where}: the VMDK descriptor lists no usable (RW) extent")
    info = VmdkInfo(desc.create_type, desc.cid, desc.parent_cid, from_descriptor=True)
    driver = VmdkDriver(extents, info, writable=writable)
    driver.descriptor = (transport, at, raw)
    return await _with_parent(driver, desc, ctx, where)

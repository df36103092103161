"""The VDI driver: dynamic and static images, read and write, over a child driver.

Opening reads and checks the header, then the whole block map, which stays in memory
(4 bytes a MiB of virtual disk; refused beyond :data:`MAX_BMAP_BYTES` and whenever it
would reach past the end of the file). New blocks are appended after the last one, as
qemu does; :meth:`flush` writes the changed block-map sectors and the header (its
``blocks_allocated``), and makes sure the file reaches the end of the last block.
"""

from __future__ import annotations

from array import array
from typing import TYPE_CHECKING

import attrs

from ..._errors import ImageError, TrioconvIOError
from ...driver import Driver
from .._blocktable import BlockTableDriver
from . import _codec as codec

if TYPE_CHECKING:
    from ..._open import OpenContext

__all__ = ["MAX_BMAP_BYTES", "VdiDriver", "open_vdi"]

#: Largest block map accepted: 128 MiB (32 TiB of virtual disk).
MAX_BMAP_BYTES = 128 * 1024 * 1024


class VdiDriver(BlockTableDriver):
    """A VDI image. Made by :func:`open_vdi`."""

    name = "vdi"

    def __init__(
        self, child: Driver, header: codec.Header, bmap: array[int], writable: bool
    ) -> None:
        static = header.image_type == codec.ImageType.STATIC
        super().__init__(
            child,
            size=header.disk_size,
            block_size=header.block_size,
            writable=writable,
            zero_init=child.caps.zero_init if static else True,
        )
        self.header = header
        self.preallocated = static
        self._bmap = bmap
        allocated = [e for e in set(bmap) if e < codec.DISCARDED]
        #: The next file block to hand out: past every block in use.
        self._next = max([header.blocks_allocated, *(e + 1 for e in allocated)])
        self._dirty_sectors: set[int] = set()

    def _lookup(self, index: int) -> int:
        entry = self._bmap[index]
        if entry >= codec.DISCARDED:
            return -1
        return self.header.offset_data + entry * self.block_size

    def _allocate(self, index: int) -> tuple[int, list[tuple[int, bytes]]]:
        entry = self._next
        if entry >= codec.DISCARDED:
            raise TrioconvIOError(f"{self.location}: VDI image has no free block numbers")
        self._next += 1
        self._bmap[index] = entry
        self.header = attrs.evolve(self.header, blocks_allocated=self.header.blocks_allocated + 1)
        self._dirty_sectors.add(index * 4 // codec.SECTOR)
        return self.header.offset_data + entry * self.block_size, []

    async def _write_metadata(self) -> None:
        if not self._dirty_sectors:
            return
        per_sector = codec.SECTOR // 4
        sectors = sorted(self._dirty_sectors)
        self._dirty_sectors.clear()
        i = 0
        while i < len(sectors):
            j = i
            while j + 1 < len(sectors) and sectors[j + 1] == sectors[j] + 1:
                j += 1
            first = sectors[i] * per_sector
            stop = min(len(self._bmap), (sectors[j] + 1) * per_sector)
            raw = codec.encode_bmap(self._bmap, first, stop)
            await self._child_write(self.header.offset_bmap + first * 4, raw)
            i = j + 1
        await self._child_write(0, self.header.encode())
        # qemu writes whole blocks; a file that stops inside the last block is padded.
        end = self.header.offset_data + self._next * self.block_size
        if self._written_end < end:
            start = max(self._written_end, end - codec.SECTOR)
            await self._child_zero(start, end - start)


def _error(location: str, exc: codec.VdiFormatError) -> ImageError:
    where = f" (offset {exc.offset:#x})" if exc.offset is not None else ""
    return ImageError(f"Could not open '{location}': {exc}{where}")


async def open_vdi(transport: Driver, ctx: OpenContext) -> Driver:
    """Open a VDI image on ``transport``.

    Raises:
        ImageError: not a VDI image qemu would read, or one with hostile metadata.
    """
    loc = ctx.location
    file_size = transport.size
    if file_size < codec.HEADER_SIZE:
        raise ImageError(f"Could not open '{loc}': file too small for a VDI image")
    try:
        header = codec.parse_header(await transport.pread(0, codec.HEADER_SIZE), file_size)
    except codec.VdiFormatError as exc:
        raise _error(loc, exc) from None
    bmap_bytes = header.blocks_in_image * 4
    if bmap_bytes > MAX_BMAP_BYTES:
        raise ImageError(
            f"Could not open '{loc}': VDI block map of {bmap_bytes} bytes is over the "
            f"{MAX_BMAP_BYTES}-byte limit"
        )
    bmap = array("I")
    chunk = 4 * 1024 * 1024
    for pos in range(0, bmap_bytes, chunk):
        n = min(chunk, bmap_bytes - pos)
        bmap.extend(codec.decode_bmap(await transport.pread(header.offset_bmap + pos, n)))
    return VdiDriver(transport, header, bmap, transport.caps.writable)

"""The raw format: the virtual disk is the bytes of the transport, one to one.

The driver forwards every request to its child unchanged; it exists so that every stack
has a format on top of a transport, as QEMU has, and so later formats have a model.

One thing it adds: as in QEMU, whose sizes count 512-byte sectors, a raw image is as
large as its transport rounded up to 512 bytes, and the bytes past the transport's end
read as zeroes. A 1000-byte file is a 1024-byte disk: it converts to 1024 bytes, and a
second source concatenated after it starts at byte 1024.
"""

from __future__ import annotations

import errno
from collections.abc import Sequence

from .._errors import TrioconvIOError
from ..driver import Buffer, Caps, Driver, Extent, ExtentKind, Limits
from ._common import ZEROS, check_range, fill_zero

__all__ = ["RAW_CREATE_OPTIONS", "RawDriver", "probe_raw"]

SECTOR = 512

#: ``-o`` options a raw target accepts, with their help text.
RAW_CREATE_OPTIONS: dict[str, str] = {
    "preallocation": "Preallocation mode (allowed values: off, falloc, full)",
    "size": "Virtual disk size",
}


def probe_raw(header: bytes, filename: str) -> int:
    """Raw matches anything, with the lowest score."""
    return 1


class RawDriver(Driver):
    """Raw format over a child driver, optionally a window of it.

    Args:
        offset: the child's byte that is the image's byte 0 (QEMU's raw ``offset``).
        size: the image's size (a multiple of 512); None: the rest of the child,
            rounded up to whole sectors.
    """

    name = "raw"

    def __init__(self, child: Driver, *, offset: int = 0, size: int | None = None) -> None:
        self.child = child
        self.location = child.location
        self.offset = offset
        self._size = size

    @property
    def size(self) -> int:
        if self._size is not None:
            return self._size
        return -(-(self.child.size - self.offset) // SECTOR) * SECTOR

    @property
    def _end(self) -> int:
        """Where the child's bytes end, in the image's offsets (a window's end at most)."""
        end = self.child.size - self.offset
        return end if self._size is None else min(end, self._size)

    def _check_write(self, what: str, offset: int, length: int) -> None:
        """Writes stay inside the image: a window of fixed ``size`` is all there is, and
        a file is not grown past the size it was opened with."""
        if self._size is not None and offset >= 0 and offset + length > self._size:
            raise TrioconvIOError(
                f"{self.location}: write of {length} bytes at {offset} goes past the end of "
                f"the raw window ({self._size} bytes)",
                offset=offset,
                errno=errno.ENOSPC,
            )
        check_range(self.location, self.size, what, offset, length)

    @property
    def limits(self) -> Limits:
        return self.child.limits

    @property
    def caps(self) -> Caps:
        return self.child.caps

    async def preadinto(self, offset: int, buf: memoryview) -> None:
        # Past the transport's end: the zeroes up to the next sector; past a window's
        # end, zeroes too (never the bytes that follow it in the file).
        buf = buf.cast("B") if buf.format != "B" else buf
        check_range(self.location, self.size, "read", offset, buf.nbytes)
        n = max(0, min(buf.nbytes, self._end - offset))
        if n:
            await self.child.preadinto(offset + self.offset, buf[:n])
        if n < buf.nbytes:
            fill_zero(buf[n:])

    async def preadinto_many(self, requests: Sequence[tuple[int, memoryview]]) -> None:
        end = self._end
        if all(offset + buf.nbytes <= end for offset, buf in requests):
            shift = self.offset
            await self.child.preadinto_many([(off + shift, buf) for off, buf in requests])
            return
        for offset, buf in requests:
            await self.preadinto(offset, buf)

    async def pwrite(self, offset: int, data: Buffer) -> None:
        end = self._end
        view = memoryview(data).cast("B")
        self._check_write("write", offset, view.nbytes)
        if end < offset + view.nbytes and ZEROS.startswith(view[max(0, end - offset) :]):
            # Zeroes into the sector's tail past the transport's end: they read so
            # already, and an export or a LUN could not take them.
            view = view[: max(0, end - offset)]
            if not view.nbytes:
                return
        await self.child.pwrite(offset + self.offset, view)

    async def pwrite_zeroes(
        self, offset: int, length: int, *, may_unmap: bool = False, fast: bool = False
    ) -> None:
        self._check_write("write zeroes", offset, length)
        length = min(length, max(0, self._end - offset))  # (see pwrite)
        if length:
            await self.child.pwrite_zeroes(
                offset + self.offset, length, may_unmap=may_unmap, fast=fast
            )

    async def block_status(self, offset: int, length: int) -> Extent:
        check_range(self.location, self.size, "block status", offset, 1)
        end = self._end
        if offset >= end:
            return Extent(offset, min(length, self.size - offset), ExtentKind.ZERO)
        ext = await self.child.block_status(offset + self.offset, min(length, end - offset))
        if not self.offset:
            return ext
        return Extent(ext.offset - self.offset, ext.length, ext.kind)

    async def flush(self) -> None:
        await self.child.flush()

    async def aclose(self) -> None:
        await self.child.aclose()

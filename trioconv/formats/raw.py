"""The raw format: the virtual disk is the bytes of the transport, one to one.

The driver forwards every request to its child unchanged; it exists so that every stack
has a format on top of a transport, as QEMU has, and so later formats have a model.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..driver import Buffer, Caps, Driver, Extent, Limits

__all__ = ["RAW_CREATE_OPTIONS", "RawDriver", "probe_raw"]

#: ``-o`` options a raw target accepts, with their help text.
RAW_CREATE_OPTIONS: dict[str, str] = {
    "preallocation": "Preallocation mode (allowed values: off, falloc, full)",
    "size": "Virtual disk size",
}


def probe_raw(header: bytes, filename: str) -> int:
    """Raw matches anything, with the lowest score."""
    return 1


class RawDriver(Driver):
    """Raw format over a child driver."""

    name = "raw"

    def __init__(self, child: Driver) -> None:
        self.child = child
        self.location = child.location

    @property
    def size(self) -> int:
        return self.child.size

    @property
    def limits(self) -> Limits:
        return self.child.limits

    @property
    def caps(self) -> Caps:
        return self.child.caps

    async def preadinto(self, offset: int, buf: memoryview) -> None:
        await self.child.preadinto(offset, buf)

    async def preadinto_many(self, requests: Sequence[tuple[int, memoryview]]) -> None:
        await self.child.preadinto_many(requests)

    async def pwrite(self, offset: int, data: Buffer) -> None:
        await self.child.pwrite(offset, data)

    async def pwrite_zeroes(
        self, offset: int, length: int, *, may_unmap: bool = False, fast: bool = False
    ) -> None:
        await self.child.pwrite_zeroes(offset, length, may_unmap=may_unmap, fast=fast)

    async def block_status(self, offset: int, length: int) -> Extent:
        return await self.child.block_status(offset, length)

    async def flush(self) -> None:
        await self.child.flush()

    async def aclose(self) -> None:
        await self.child.aclose()

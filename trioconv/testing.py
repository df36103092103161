"""Reusable checks for driver authors, in the spirit of ``trio.testing``.

:func:`check_driver` exercises the whole driver contract on a writable driver; every
format and transport in trioconv passes it, and a new one should too::

    async def test_my_driver(tmp_path):
        async with await open_my_driver(tmp_path / "img", size=4 << 20) as drv:
            await trioconv.testing.check_driver(drv)
"""

from __future__ import annotations

import os

import trio

from ._errors import ZeroesNotSupported
from .driver import Driver, ExtentKind

__all__ = ["check_block_status_tiles", "check_driver"]


async def check_block_status_tiles(driver: Driver) -> list[tuple[int, int, ExtentKind]]:
    """Walk ``block_status`` over the whole image; check the extents tile it exactly."""
    out = []
    pos = 0
    while pos < driver.size:
        ext = await driver.block_status(pos, driver.size - pos)
        assert ext.offset == pos, f"block status at {pos} answered for {ext.offset}"
        assert ext.length > 0, f"empty extent at {pos}"
        length = min(ext.length, driver.size - pos)
        out.append((pos, length, ext.kind))
        pos += length
    return out


async def check_driver(driver: Driver) -> None:
    """Check the contract on ``driver``, which must be writable and at least 1 MiB.

    Its content is overwritten. Raises AssertionError naming the first broken promise.
    """
    size = driver.size
    align = driver.limits.request_alignment
    assert size >= 1 << 20, "check_driver needs an image of at least 1 MiB"
    assert driver.caps.writable, "check_driver needs a writable driver"
    assert align >= 1 and driver.limits.max_transfer >= align

    # Whole-buffer writes and reads, aligned and not, are exact and never short.
    chunk = os.urandom(64 * 1024)
    for offset in (0, align * 3, size - len(chunk)):
        await driver.pwrite(offset, chunk)
        assert await driver.pread(offset, len(chunk)) == chunk, f"read-back at {offset}"
        buf = bytearray(len(chunk))
        await driver.preadinto(offset, memoryview(buf))
        assert bytes(buf) == chunk
    odd = os.urandom(1000)
    await driver.pwrite(12345, odd)
    assert await driver.pread(12345, 1000) == odd, "unaligned read-back"

    # Write zeroes: works, or says it is unsupported and changes nothing.
    await driver.pwrite(0, b"\xff" * 65536)
    try:
        await driver.pwrite_zeroes(4096, 8192, may_unmap=True)
    except ZeroesNotSupported:
        assert await driver.pread(4096, 8192) == b"\xff" * 8192
    else:
        assert await driver.pread(0, 65536) == b"\xff" * 4096 + bytes(8192) + b"\xff" * 53248

    # Block status tiles the image; DATA where we wrote.
    tiles = await check_block_status_tiles(driver)
    assert any(kind is ExtentKind.DATA and off <= size - 1 < off + n for off, n, kind in tiles)

    # Many concurrent writers on disjoint ranges, then every range reads back.
    blocks = {i * 65536: os.urandom(65536) for i in range(min(16, size // 65536))}

    async def write(offset: int, data: bytes) -> None:
        await driver.pwrite(offset, data)

    async with trio.open_nursery() as nursery:
        for offset, data in blocks.items():
            nursery.start_soon(write, offset, data)
    for offset, data in blocks.items():
        assert await driver.pread(offset, len(data)) == data, f"concurrent write at {offset}"

    # Cancelling a request leaves the driver usable.
    with trio.CancelScope() as scope:
        scope.cancel()
        await driver.pread(0, 4096)
    assert await driver.pread(0, 65536) == blocks[0]

    await driver.flush()

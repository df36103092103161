"""Every driver passes the one conformance suite."""

from __future__ import annotations

from pathlib import Path

import pytest

import trioconv
from trioconv.protocols.file import create_file, open_file
from trioconv.testing import check_block_status_tiles, check_driver

SIZE = 4 * 1024 * 1024


async def test_memory_driver() -> None:
    await check_driver(trioconv.MemoryDriver(SIZE))


async def test_memory_driver_without_zeroes() -> None:
    await check_driver(trioconv.MemoryDriver(SIZE, zeroes=False, block_status=False))


@pytest.mark.parametrize("cache", ["writeback", "unsafe", "none", "directsync", "writethrough"])
async def test_file_driver(tmp_path: Path, cache: str) -> None:
    path = tmp_path / "disk.img"
    await create_file(path, SIZE)
    async with await open_file(path, writable=True, cache=trioconv.CacheMode(cache)) as drv:
        await check_driver(drv)


async def test_raw_over_file(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    await trioconv.create_image(path, "raw", SIZE)
    async with trioconv.open_image(path, "raw", writable=True) as drv:
        assert drv.name == "raw"
        await check_driver(drv)


async def test_file_block_status_follows_holes(tmp_path: Path) -> None:
    path = tmp_path / "sparse.img"
    await create_file(path, SIZE)
    async with await open_file(path, writable=True) as drv:
        await drv.pwrite(1 << 20, b"x" * 65536)
        tiles = await check_block_status_tiles(drv)
    kinds = [(off, n, kind) for off, n, kind in tiles]
    assert kinds[0] == (0, 1 << 20, trioconv.ExtentKind.ZERO)
    assert kinds[1][0] == 1 << 20 and kinds[1][2] is trioconv.ExtentKind.DATA
    assert kinds[-1][2] is trioconv.ExtentKind.ZERO


async def test_unaligned_tail_with_o_direct(tmp_path: Path) -> None:
    path = tmp_path / "odd.img"
    size = SIZE + 512
    await create_file(path, size)
    async with await open_file(path, writable=True, cache=trioconv.CacheMode.NONE) as drv:
        assert drv.limits.request_alignment == 4096
        await drv.pwrite(size - 512, b"t" * 512)
        assert await drv.pread(size - 1024, 1024) == bytes(512) + b"t" * 512
    assert path.stat().st_size == size


async def test_sources_are_opened_read_only(tmp_path: Path) -> None:
    path = tmp_path / "ro.img"
    await create_file(path, SIZE)
    async with trioconv.open_image(path, "raw") as drv:
        assert not drv.caps.writable
        with pytest.raises(trioconv.TrioconvError):
            await drv.pwrite(0, b"x")


async def test_odirect_refusal_is_one_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    real_open = os.open

    def refusing_open(path: str, flags: int, *args: int) -> int:
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_open(path, flags, *args)

    path = tmp_path / "d.img"
    await create_file(path, SIZE)
    monkeypatch.setattr(os, "open", refusing_open)
    with pytest.raises(trioconv.ImageError, match="does not support O_DIRECT"):
        await open_file(path, cache=trioconv.CacheMode.NONE)


async def test_probe_refuses_known_unsupported_formats(tmp_path: Path) -> None:
    path = tmp_path / "fake.img"
    path.write_bytes(b"WithouFreSpacExt" + bytes(4080))
    with pytest.raises(trioconv.ImageError, match="'parallels' is not supported"):
        async with trioconv.open_image(path):
            pass


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vmdk", "vpc", "vdi", "vhdx"])
async def test_requests_outside_the_image_are_errors(tmp_path: Path, fmt: str) -> None:
    """A read or a block status query outside the image is a TrioconvError, never a
    made-up answer or an AssertionError."""
    path = tmp_path / f"disk.{fmt}"
    await trioconv.create_image(path, fmt, SIZE)
    async with trioconv.open_image(path, fmt) as drv:
        size = drv.size
        for offset, length in ((-1, 10), (size - 5, 10), (size + 10, 100)):
            with pytest.raises(trioconv.TrioconvError):
                await drv.pread(offset, length)
        for offset in (-1, size, size + 10):
            with pytest.raises(trioconv.TrioconvError):
                await drv.block_status(offset, 100)


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vmdk", "vpc", "vdi", "vhdx"])
async def test_writes_outside_the_image_are_errors(tmp_path: Path, fmt: str) -> None:
    """A write outside the image is refused, and the file does not grow: the size is
    fixed once the image is open (a raw file too)."""
    path = tmp_path / f"disk.{fmt}"
    await trioconv.create_image(path, fmt, SIZE)
    length = path.stat().st_size
    async with trioconv.open_image(path, fmt, writable=True) as drv:
        size = drv.size
        for offset, n in ((-1, 10), (size - 1, 2), (size, 1), (size + 4096, 10)):
            with pytest.raises(trioconv.TrioconvIOError, match="outside the image"):
                await drv.pwrite(offset, b"x" * n)
            with pytest.raises(trioconv.TrioconvIOError, match="outside the image"):
                await drv.pwrite_zeroes(offset, n)
        assert drv.size == size
    assert path.stat().st_size == length


async def test_a_closed_file_says_so(tmp_path: Path) -> None:
    path = tmp_path / "disk.img"
    await create_file(path, SIZE)
    drv = await open_file(path, writable=True)
    await drv.aclose()
    for request in (drv.flush(), drv.pread(0, 10), drv.pwrite(0, b"x")):
        with pytest.raises(trioconv.TrioconvIOError, match="image is closed"):
            await request


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vmdk", "vpc", "vdi", "vhdx"])
async def test_a_closed_image_says_so(tmp_path: Path, fmt: str) -> None:
    """After close, reads and block status queries fail; none is answered from memory."""
    path = tmp_path / f"disk.{fmt}"
    await trioconv.create_image(path, fmt, SIZE)
    async with trioconv.open_image(path, fmt, writable=True) as drv:
        await drv.pwrite(0, b"x" * 65536)
    for request in (drv.block_status(0, 512), drv.pread(0, 512)):
        with pytest.raises(trioconv.TrioconvIOError, match="closed"):
            await request

"""Local storage that misbehaves: a full file system, a read-only one, one that fails
reads, one that refuses ``O_DIRECT``, a disk with 4096-byte sectors, a device in use,
and files changed by someone else while they are copied.

The storage is real: small file systems (tmpfs, ramfs, ext4 on a loop device) mounted
for one test and unmounted after it, even when it fails; so these tests need root and
``losetup``, like ``tests/test_blockdev.py``. Every failure must be one line on stderr
and exit status 1; a target trioconv created is removed again, one it was given (``-n``)
keeps its size; nothing is written where the conversion is refused.

Read errors come without device-mapper: ext4 is mounted read-only from a loop device
that is then made smaller than the file system (``losetup -c``). The blocks of a file
that lie past the new end of the device fail with ``EIO``, like a disk's bad sectors,
while the file system, which only reads, stays usable and unmounts cleanly.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from trioconv import TrioconvIOError
from trioconv.protocols.file import open_file

from ._faults import one_line_error
from .conftest import IN_CI, ImageMaker, assert_identical, require_tool, run, trioconv_cli

MiB = 1 << 20


def _need_root() -> str:
    """``losetup``, when this process may attach loop devices and mount; else skip
    (fail under CI=true), as ``tests/test_blockdev.py`` does."""
    losetup = require_tool("losetup")
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("CI=true but not root: loop devices cannot be attached")
        pytest.skip("attaching a loop device needs root")
    return losetup


@contextlib.contextmanager
def _loop(backing: Path, *options: str) -> Iterator[Path]:
    """``backing`` attached to a free loop device; detached afterwards."""
    losetup = _need_root()
    dev = run(losetup, *options, "-f", "--show", backing).stdout.strip()
    try:
        yield Path(dev)
    finally:
        subprocess.run([losetup, "-d", dev], check=False)


@contextlib.contextmanager
def _mount(source: str | Path, where: Path, *options: str) -> Iterator[Path]:
    """``mount [OPTIONS] SOURCE WHERE``; unmounted afterwards (lazily if still busy)."""
    _need_root()
    where.mkdir(exist_ok=True)
    run("mount", *options, source, where)
    try:
        yield where
    finally:
        if subprocess.run(["umount", where], check=False).returncode:
            subprocess.run(["umount", "-l", where], check=False)


@contextlib.contextmanager
def _ext4(tmp_path: Path, size: int, *options: str) -> Iterator[tuple[Path, Path]]:
    """A fresh ext4 of ``size`` bytes on a loop device, mounted: (mount point, device)."""
    backing = tmp_path / "ext4.img"
    with backing.open("wb") as f:
        f.truncate(size)
    run(require_tool("mkfs.ext4"), "-q", "-b", "4096", backing)
    with _loop(backing) as dev, _mount(dev, tmp_path / "mnt", *options) as where:
        yield where, dev


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs."""
    with _mount("tmpfs", tmp_path / "tmpfs", "-t", "tmpfs", "-o", "size=4M") as where:
        yield where


@pytest.fixture
def random_src(tmp_path: Path) -> Path:
    """8 MiB of random bytes: every byte must be stored, nothing compresses away."""
    src = tmp_path / "random.raw"
    src.write_bytes(os.urandom(8 * MiB))
    return src


def _no_traceback(result: subprocess.CompletedProcess[str]) -> str:
    line = one_line_error(result)
    assert "Traceback" not in result.stderr
    return line


# -- a file system that fills up -------------------------------------------------------


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vmdk"])
@pytest.mark.parametrize("engine", [[], ["-W", "-m", "16"]], ids=["in-order", "W-m16"])
def test_full_tmpfs_is_one_line_and_the_new_target_goes(
    tmpfs: Path, random_src: Path, fmt: str, engine: list[str]
) -> None:
    """8 MiB into 4 MiB: ``No space left on device`` once, exit 1, no file left."""
    target = tmpfs / f"out.{fmt}"
    line = _no_traceback(trioconv_cli("convert", *engine, "-O", fmt, random_src, target))
    assert "No space left on device" in line
    assert list(tmpfs.iterdir()) == []


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
def test_full_tmpfs_keeps_a_given_target(tmpfs: Path, random_src: Path, fmt: str) -> None:
    """``-n``: the target was there before, so it stays; a raw one keeps its size (a
    format's file grows as clusters are allocated, as with qemu-img)."""
    target = tmpfs / f"given.{fmt}"
    run("qemu-img", "create", "-q", "-f", fmt, target, "8M")
    size = target.stat().st_size
    args: list[str | Path] = ["convert", "-n", "-W", "-m", "16", "-O", fmt, random_src, target]
    assert "No space left on device" in _no_traceback(trioconv_cli(*args))
    assert target.exists()
    if fmt == "raw":
        assert target.stat().st_size == size


def test_full_ext4(tmp_path: Path, random_src: Path, make_image: ImageMaker) -> None:
    """On ext4 a large write's blocks are allocated ahead (``fallocate``): that running
    out of room is the same one line; and ``-S 0`` allocates every block of the copy."""
    with _ext4(tmp_path, 12 * MiB) as (where, _):  # 7.2 MiB free
        sparse = make_image("sparse.raw", "4M", "write -P 0xab 1M 64k")
        full = where / "full.raw"
        result = trioconv_cli("convert", "-S", "0", "-O", "raw", sparse, full)
        assert result.returncode == 0, result.stderr
        assert full.stat().st_blocks * 512 >= 4 * MiB
        assert_identical(sparse, full)
        full.unlink()
        # ext4 reuses a removed file's blocks once its journal commits: syncfs (this
        # file system only; a global sync would wait for every other one too).
        run("sync", "-f", where)
        for fmt, cache in [("raw", "unsafe"), ("qcow2", "unsafe"), ("raw", "none")]:
            target = where / f"out.{fmt}"
            args: list[str | Path] = ["convert", "-t", cache, "-O", fmt, random_src, target]
            assert "No space left on device" in _no_traceback(trioconv_cli(*args))
            assert not target.exists()


# -- a read-only file system, and one without O_DIRECT ---------------------------------


def test_read_only_file_system_is_refused_before_anything(tmp_path: Path, random_src: Path) -> None:
    with _ext4(tmp_path, 8 * MiB) as (where, _):
        given = where / "given.raw"
        given.write_bytes(b"\x5a" * MiB)
        run("mount", "-o", "remount,ro", where)
        new: list[str | Path] = ["-O", "qcow2", random_src, where / "new.qcow2"]
        for args in (new, ["-n", random_src, given]):
            assert "Read-only file system" in _no_traceback(trioconv_cli("convert", *args))
        assert sorted(p.name for p in where.iterdir()) == ["given.raw", "lost+found"]
        assert given.read_bytes() == b"\x5a" * MiB


def test_file_system_without_o_direct(tmp_path: Path, random_src: Path) -> None:
    """ramfs has no direct I/O (tmpfs has had it since Linux 6.6): ``-t none`` and
    ``-T none`` say so in one line, and the target made for it is gone again."""
    with _mount("ramfs", tmp_path / "ramfs", "-t", "ramfs") as where:
        line = _no_traceback(trioconv_cli("convert", "-t", "none", random_src, where / "o.raw"))
        assert "O_DIRECT" in line
        assert list(where.iterdir()) == []
        src = where / "src.raw"
        src.write_bytes(b"\x11" * MiB)
        line = _no_traceback(trioconv_cli("convert", "-T", "none", src, tmp_path / "o.raw"))
        assert "O_DIRECT" in line
        assert not (tmp_path / "o.raw").exists()


# -- devices ---------------------------------------------------------------------------


@pytest.fixture
def disk_4k(tmp_path: Path) -> Iterator[Path]:
    """A 12 MiB loop device with 4096-byte logical sectors, full of 0xee."""
    backing = tmp_path / "disk4k.img"
    backing.write_bytes(b"\xee" * 12 * MiB)
    with _loop(backing, "--sector-size", "4096") as dev:
        yield dev


@pytest.mark.parametrize("size", [5001 * 1024, 5_000_001], ids=["512-multiple", "odd"])
def test_direct_io_on_4k_sectors(
    disk_4k: Path, tmp_path: Path, make_image: ImageMaker, size: int
) -> None:
    """``-t none`` writes whole 4096-byte sectors into a 4096-byte-sector disk, also for
    a size that is not a multiple of them: the source's bytes, then zeroes to its size
    rounded up to 512 bytes (the disk qemu sees in the file), then the old bytes."""
    src = tmp_path / "src.raw"
    src.write_bytes(os.urandom(size))
    result = trioconv_cli("convert", "-n", "-t", "none", "-T", "none", "-O", "raw", src, disk_4k)
    assert result.returncode == 0, result.stderr
    disk = disk_4k.read_bytes()
    padded = -(-size // 512) * 512
    assert disk[:size] == src.read_bytes()
    assert disk[size:padded] == bytes(padded - size)
    assert disk[padded:] == b"\xee" * (12 * MiB - padded)
    back = tmp_path / "back.raw"
    result = trioconv_cli("convert", "-t", "none", "-T", "none", "-f", "raw", disk_4k, back)
    assert result.returncode == 0, result.stderr
    assert back.read_bytes() == disk
    result = trioconv_cli("convert", "-t", "none", "-f", "raw", "-O", "qcow2", src, disk_4k)
    assert result.returncode == 0, result.stderr
    run("qemu-img", "check", "-f", "qcow2", disk_4k)
    assert_identical(src, disk_4k, "raw", "qcow2")


def test_device_smaller_than_the_source_is_not_touched(disk_4k: Path, random_src: Path) -> None:
    big = random_src.with_name("big.raw")
    big.write_bytes(random_src.read_bytes() * 2)
    for args in (["-n"], ["-t", "none"], ["-n", "-O", "qcow2"]):
        _no_traceback(trioconv_cli("convert", *args, "-f", "raw", big, disk_4k))
        assert disk_4k.read_bytes() == b"\xee" * 12 * MiB


def test_mounted_device_is_not_written(tmp_path: Path, random_src: Path) -> None:
    """A device with a mounted file system is refused for writing (qemu-img 7.2 writes
    over it): the kernel's exclusive open, ``O_EXCL``, fails while it is mounted."""
    with _ext4(tmp_path, 16 * MiB) as (where, dev):
        (where / "kept").write_bytes(b"kept")
        before = dev.read_bytes()
        line = _no_traceback(trioconv_cli("convert", "-n", "-f", "raw", random_src, dev))
        assert "in use" in line
        assert dev.read_bytes() == before
        assert (where / "kept").read_bytes() == b"kept"


def test_device_backing_a_loop_device_is_not_written(tmp_path: Path, random_src: Path) -> None:
    """A device that another loop device is attached to (and whatever is mounted from
    that one) is refused for writing too: a loop device does not claim its backing
    device, so the exclusive open alone would not see it."""
    backing = tmp_path / "under.img"
    backing.write_bytes(b"\x5a" * (16 * MiB))
    with _loop(backing) as under, _loop(under) as over:
        before = under.read_bytes()
        line = _no_traceback(trioconv_cli("convert", "-n", "-f", "raw", random_src, under))
        assert f"it backs loop device {over}" in line
        assert under.read_bytes() == before
        # Without the loop on top, the same device is written.
        subprocess.run([_need_root(), "-d", over], check=True)
        result = trioconv_cli("convert", "-n", "-f", "raw", random_src, under)
        assert result.returncode == 0, result.stderr
        assert under.read_bytes()[: 8 * MiB] == random_src.read_bytes()


# -- a source that cannot be read ------------------------------------------------------


@pytest.fixture
def failing_src(tmp_path: Path) -> Iterator[tuple[Path, bytes]]:
    """A 4 MiB file on a read-only ext4 whose last 2 MiB fail with EIO, and what it
    held; the readable first half is still there."""
    backing = tmp_path / "eio.img"
    with backing.open("wb") as f:
        f.truncate(16 * MiB)
    run(require_tool("mkfs.ext4"), "-q", "-b", "4096", backing)
    data = os.urandom(4 * MiB)
    with _loop(backing) as dev, _mount(dev, tmp_path / "mnt") as where:
        (where / "filler").write_bytes(bytes(6 * MiB))
        src = where / "src.raw"
        src.write_bytes(data)
        run("mount", "-o", "remount,ro", where)
        extents = run("filefrag", "-v", src).stdout.splitlines()
        first = int(next(x for x in extents if x.strip().startswith("0:")).split()[3].strip("."))
        # The device now ends half-way through the file's (single) extent.
        os.truncate(backing, (first + 512) * 4096)
        run(_need_root(), "-c", dev)
        fd = os.open(src, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        yield src, data


def test_read_error_is_one_line_and_salvage_goes_past_it(
    failing_src: tuple[Path, bytes], tmp_path: Path
) -> None:
    src, data = failing_src
    out = tmp_path / "out.raw"
    line = _no_traceback(trioconv_cli("convert", "-f", "raw", src, out))
    assert "Input/output error" in line and f"at byte {2 * MiB}" in line
    assert not out.exists()
    result = trioconv_cli("convert", "--salvage", "-f", "raw", src, out)
    assert result.returncode == 0, result.stderr[-500:]
    assert "salvaged as zeroes" in result.stderr
    assert out.read_bytes() == data[: 2 * MiB] + bytes(2 * MiB)
    theirs = tmp_path / "theirs.raw"
    run("qemu-img", "convert", "--salvage", "-f", "raw", "-O", "raw", src, theirs)
    assert out.read_bytes() == theirs.read_bytes()


# -- files changed by someone else -----------------------------------------------------


async def test_source_that_shrinks_is_an_error(tmp_path: Path) -> None:
    """A file truncated by another process while it is copied: reading (or mapping) what
    it held is an error, not zeroes (qemu-img 7.2 copies zeroes and exits 0). Past the
    size it had when opened, the end still reads as zeroes (a raw image's last sector)."""
    path = tmp_path / "shrinking.raw"
    path.write_bytes(b"\xab" * (4 * MiB + 100))
    async with await open_file(path) as drv:
        tail = memoryview(bytearray(512))
        await drv.preadinto(4 * MiB, tail)
        assert bytes(tail) == b"\xab" * 100 + bytes(412)
        os.truncate(path, MiB)
        buf = memoryview(bytearray(MiB))
        await drv.preadinto(0, buf)  # what is still there reads as before
        assert bytes(buf) == b"\xab" * MiB
        with pytest.raises(TrioconvIOError, match="shrank to 1048576 bytes") as info:
            await drv.preadinto(MiB + 4096, buf)
        assert info.value.offset == MiB + 4096
        with pytest.raises(TrioconvIOError, match="shrank"):
            await drv.block_status(2 * MiB, MiB)


async def test_target_removed_while_written_is_an_error(tmp_path: Path) -> None:
    """The target's directory removed mid-copy (``rm -rf``): the image is lost with it,
    so the final flush says so instead of a success (qemu-img 7.2 exits 0)."""
    folder = tmp_path / "folder"
    folder.mkdir()
    path = folder / "out.raw"
    path.write_bytes(bytes(MiB))
    async with await open_file(path, writable=True) as drv:
        await drv.pwrite(0, b"\x01" * 4096)
        await drv.flush()
        path.unlink()
        folder.rmdir()
        await drv.pwrite(4096, b"\x02" * 4096)
        with pytest.raises(TrioconvIOError, match="was removed"):
            await drv.flush()

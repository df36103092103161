"""Writes cancelled half-way never leave an image QEMU cannot read.

A format writer gives a write its new clusters (grains, blocks) in its tables before the
bytes go out. When the write is cancelled - the conversion was cancelled, Ctrl-C, a
task group ended - the tables must not go to disk pointing at clusters that were never
written: past the end of the file QEMU calls the image corrupt or truncated. So a
qcow2 keeps the tables it had, and the block formats make the file reach their last
block. Checked with ``qemu-img check`` and by reading the image with ``qemu-img``,
after cancelling eight concurrent writes at each of the first Trio steps, and after
cancelling ``-n`` conversions into an existing qcow2 at random moments. Leaked
clusters are allowed there, as after a crash of QEMU: refcounts go to disk before the
tables that use them, so an interruption can only leave clusters counted and unused
(``qemu-img check`` exit status 3, "no harm to data"), never the other way round.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import trio
import trio.lowlevel

import trioconv

from .conftest import create_filled, require_tool, run

MiB = 1024 * 1024


async def _cancel_writes(path: Path, fmt: str, steps: int) -> None:
    await trioconv.create_image(path, fmt, 16 * MiB)
    async with (
        trioconv.open_image(path, fmt, writable=True) as image,
        trio.open_nursery() as nursery,
    ):
        for i in range(8):
            nursery.start_soon(image.pwrite, i * MiB, b"\x5a" * MiB)
        for _ in range(steps):
            await trio.lowlevel.checkpoint()
        nursery.cancel_scope.cancel()


def _readable(path: Path, fmt: str, out: Path, *, leaks: bool = False) -> None:
    result = run("qemu-img", "convert", "-f", fmt, "-O", "raw", path, out, check=False)
    assert result.returncode == 0, result.stderr
    if fmt != "vpc":  # (qemu-img cannot check vpc)
        check = run("qemu-img", "check", "-f", fmt, path, check=False)
        assert check.returncode in ((0, 3) if leaks else (0,)), check.stdout + check.stderr


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vhdx", "vdi", "vpc"])
async def test_cancelled_writes_leave_a_readable_image(tmp_path: Path, fmt: str) -> None:
    require_tool("qemu-img")
    for steps in range(10):
        path = tmp_path / f"s{steps}.{fmt}"
        await _cancel_writes(path, fmt, steps)
        _readable(path, fmt, tmp_path / "out.raw")


async def test_cancelled_conversions_into_an_existing_qcow2(tmp_path: Path) -> None:
    """As a program cancels ``convert -n`` at any moment (the command line on Ctrl-C)."""
    require_tool("qemu-img")
    src = create_filled(
        tmp_path / "src.qcow2", "qcow2", "16M", "write -P 1 0 6M", "write -P 2 9M 3M"
    )
    target = tmp_path / "target.qcow2"
    options = trioconv.ConvertOptions(no_create=True, target_format="qcow2")
    rng = random.Random(1)
    cancelled = 0
    for _ in range(12):
        create_filled(target, "qcow2", "16M", "write -P 9 0 16M")
        with trio.move_on_after(rng.uniform(0, 0.03)) as scope:
            await trioconv.convert([src], target, options)
        cancelled += scope.cancelled_caught
        _readable(target, "qcow2", tmp_path / "out.raw", leaks=True)
    assert cancelled  # (some finish first on a fast machine; most must not)


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vhdx", "vdi", "vpc"])
async def test_a_driver_stays_usable_after_cancelled_writes(tmp_path: Path, fmt: str) -> None:
    """Cancelling writes leaves the open image usable, as the driver contract says: the
    program may write on and flush, and the image it closes is sound and holds those
    writes (a qcow2 write that had its clusters finishes before it ends, so its
    tables never point at clusters that were not written)."""
    require_tool("qemu-img")
    for steps in range(0, 10, 3):
        path = tmp_path / f"s{steps}.{fmt}"
        await trioconv.create_image(path, fmt, 16 * MiB)
        async with trioconv.open_image(path, fmt, writable=True) as image:
            async with trio.open_nursery() as nursery:
                for i in range(8):
                    nursery.start_soon(image.pwrite, i * MiB, b"\x5a" * MiB)
                for _ in range(steps):
                    await trio.lowlevel.checkpoint()
                nursery.cancel_scope.cancel()
            await image.pwrite(12 * MiB, b"\x77" * MiB)
            await image.flush()
            assert await image.pread(12 * MiB, MiB) == b"\x77" * MiB
        out = tmp_path / "out.raw"
        _readable(path, fmt, out)
        assert out.read_bytes()[12 * MiB : 13 * MiB] == b"\x77" * MiB


async def test_a_qcow2_target_of_a_failed_conversion_stays_usable(tmp_path: Path) -> None:
    """A program's own qcow2 target, when the conversion into it fails (its writes in
    flight are cancelled): the program may write on, flush and close it, and the image
    is sound."""
    require_tool("qemu-img")
    path = tmp_path / "owned.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", path, "16M")
    source = trioconv.MemoryDriver(data=b"\x01" * 16 * MiB)
    source.fail_read_at = 8 * MiB
    async with trioconv.open_image(path, writable=True) as image:
        with pytest.raises(trioconv.ConvertError, match="Input/output error"):
            await trioconv.convert(source, image)
        await image.pwrite(0, b"\x77" * 512)
        await image.flush()
    out = tmp_path / "out.raw"
    _readable(path, "qcow2", out)
    assert out.read_bytes()[:512] == b"\x77" * 512


async def test_a_qcow2_write_that_fails_halfway_stops_the_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A qcow2 write whose bytes could not be written leaves tables that point at
    nothing: the writer then refuses further writes and flushes in one clear line
    rather than store them, and the image closes with the tables it had on disk."""
    from trioconv.protocols.file import FileDriver

    require_tool("qemu-img")
    path = tmp_path / "t.qcow2"
    await trioconv.create_image(path, "qcow2", 16 * MiB)
    real = FileDriver.pwrite

    async def failing(self: FileDriver, offset: int, data: object) -> None:
        if memoryview(data).nbytes == MiB:  # type: ignore[arg-type]
            raise trioconv.TrioconvIOError("disk on fire", offset=offset)
        await real(self, offset, data)  # type: ignore[arg-type]

    async with trioconv.open_image(path, "qcow2", writable=True) as image:
        await image.pwrite(0, b"\x11" * 4096)
        monkeypatch.setattr(FileDriver, "pwrite", failing)
        with pytest.raises(trioconv.TrioconvIOError, match="disk on fire"):
            await image.pwrite(MiB, b"\x22" * MiB)
        monkeypatch.setattr(FileDriver, "pwrite", real)
        for call in (image.pwrite(0, b"\x33" * 512), image.flush()):
            with pytest.raises(trioconv.TrioconvIOError, match="earlier write failed halfway"):
                await call
    _readable(path, "qcow2", tmp_path / "out.raw")


async def test_a_qcow2_write_step_may_take_longer_the_more_it_sends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step of a qcow2 write is bounded in time (a server that stopped answering must
    not hold a cancellation forever), but the bound grows with the bytes the step sends:
    large writes to slow storage that is still taking them do not fail."""
    from trioconv.formats.qcow2 import _writer
    from trioconv.protocols.file import FileDriver

    require_tool("qemu-img")
    monkeypatch.setattr(_writer, "FINISH_TIMEOUT", 0.5)
    monkeypatch.setattr(_writer, "FINISH_BYTES_PER_SECOND", MiB)  # 1 MiB: one more second
    path = tmp_path / "t.qcow2"
    await trioconv.create_image(path, "qcow2", 16 * MiB)
    real = FileDriver.pwrite

    async def slow(self: FileDriver, offset: int, data: object) -> None:
        await trio.sleep(1.0)  # longer than the fixed part of the bound
        await real(self, offset, data)  # type: ignore[arg-type]

    async with trioconv.open_image(path, "qcow2", writable=True) as image:
        monkeypatch.setattr(FileDriver, "pwrite", slow)
        await image.pwrite(0, b"\x44" * MiB)  # 1.0 s of a 1.5 s bound
        monkeypatch.setattr(FileDriver, "pwrite", real)
        await image.flush()  # (a writer that fails later stores no tables after this)
        monkeypatch.setattr(FileDriver, "pwrite", slow)
        with pytest.raises(trioconv.TrioconvIOError, match=r"a write did not finish within 0\.5"):
            await image.pwrite(2 * MiB, b"\x55" * 4096)  # 1.0 s of about 0.5 s
        monkeypatch.setattr(FileDriver, "pwrite", real)
    out = tmp_path / "out.raw"
    _readable(path, "qcow2", out)
    assert out.read_bytes()[:MiB] == b"\x44" * MiB

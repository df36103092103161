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

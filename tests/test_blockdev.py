"""Block devices: a loop device stands in for a real disk (needs root and losetup)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import trioconv

from .conftest import IN_CI, ImageMaker, require_tool, trioconv_cli


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Path]:
    """An 8 MiB loop device backed by a file full of 0xee; detached afterwards."""
    losetup = require_tool("losetup")
    if os.geteuid() != 0:
        if IN_CI:
            pytest.fail("CI=true but not root: loop devices cannot be attached")
        pytest.skip("attaching a loop device needs root")
    backing = tmp_path / "backing.img"
    backing.write_bytes(b"\xee" * 8 * 2**20)
    dev = subprocess.run(
        [losetup, "-f", "--show", str(backing)], capture_output=True, text=True, check=True
    ).stdout.strip()
    try:
        yield Path(dev)
    finally:
        subprocess.run([losetup, "-d", dev], check=False)


def test_convert_onto_and_from_a_block_device(
    loop_device: Path, make_image: ImageMaker, tmp_path: Path
) -> None:
    src = make_image("src.img", "6M", "write -P 0xab 0 1M", "write -P 0x11 3M 2M")
    result = trioconv_cli("convert", "-n", "-O", "raw", src, loop_device)
    assert result.returncode == 0, result.stderr
    head = loop_device.read_bytes()[: 6 * 2**20]
    assert head == src.read_bytes()  # zero runs were really zeroed on the device
    back = tmp_path / "back.img"
    result = trioconv_cli("convert", "-f", "raw", "-T", "none", str(loop_device), back)
    assert result.returncode == 0, result.stderr
    assert back.stat().st_size == 8 * 2**20
    assert back.read_bytes()[: 6 * 2**20] == src.read_bytes()


async def test_block_device_driver(loop_device: Path) -> None:
    from trioconv.protocols.file import open_file
    from trioconv.testing import check_driver

    async with await open_file(loop_device, writable=True, cache=trioconv.CacheMode.NONE) as drv:
        assert drv.is_block_device
        assert drv.size == 8 * 2**20
        assert drv.limits.request_alignment in (512, 4096)
        await check_driver(drv)


def test_smaller_block_device_is_refused(loop_device: Path, make_image: ImageMaker) -> None:
    src = make_image("big.img", "16M")
    result = trioconv_cli("convert", "-n", src, loop_device)
    assert result.returncode == 1
    assert "smaller" in result.stderr


def test_host_device_names_the_device_protocol(
    loop_device: Path, make_image: ImageMaker, tmp_path: Path
) -> None:
    """``-O host_device`` / ``-f host_device``, as older scripts write them, work on a
    device and are refused on a regular file, as with qemu-img."""
    src = make_image("src.img", "4M", "write -P 0x5a 0 1M")
    result = trioconv_cli("convert", "-n", "-O", "host_device", src, loop_device)
    assert result.returncode == 0, result.stderr
    assert loop_device.read_bytes()[: 4 * 2**20] == src.read_bytes()
    back = tmp_path / "back.img"
    result = trioconv_cli("convert", "-f", "host_device", loop_device, back)
    assert result.returncode == 0, result.stderr
    assert back.read_bytes()[: 4 * 2**20] == src.read_bytes()
    plain = tmp_path / "plain.img"
    plain.write_bytes(bytes(4 * 2**20))
    refused = trioconv_cli("convert", "-n", "-O", "host_device", src, plain)
    assert refused.returncode == 1 and "character or block device" in refused.stderr
    assert refused.stderr.count("\n") == 1
    assert plain.read_bytes() == bytes(4 * 2**20)


def test_qcow2_on_a_device_leaves_no_old_bytes_in_its_tables(
    loop_device: Path, make_image: ImageMaker
) -> None:
    """qcow2 written onto a device that held other bytes (a reused LV or LUN): the L1
    table is written out to its whole sector, zeroes after its entries, as qemu-img
    writes it, so nothing of the old contents shows in the image's metadata."""
    src = make_image("src.img", "4M", "write -P 0xaa 0 1M")
    result = trioconv_cli("convert", "-t", "none", "-f", "raw", "-O", "qcow2", src, loop_device)
    assert result.returncode == 0, result.stderr
    head = loop_device.read_bytes()[: 2**20]
    l1 = int.from_bytes(head[40:48], "big")
    entries = int.from_bytes(head[36:40], "big")
    assert l1 and entries == 1
    assert head[l1 + 8 * entries : l1 + 512] == bytes(512 - 8 * entries)
    check = subprocess.run(["qemu-img", "check", loop_device], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    compare = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", src, loop_device],
        capture_output=True,
        text=True,
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr


def test_qcow2_preallocated_on_a_device_reads_as_its_source(
    loop_device: Path, make_image: ImageMaker
) -> None:
    """``-o preallocation=metadata`` maps every cluster onto the device, whose old bytes
    are still there: the image does not read as zeroes, so the source's zeroes are
    written (qemu-img asks the device, as here), and the copy compares identical."""
    src = make_image("src.img", "4M", "write -P 0xaa 0 4k", "write -P 0xbb 100k 4k")
    args: list[str | Path] = ["convert", "-O", "qcow2", "-o", "preallocation=metadata"]
    args += [src, loop_device]
    result = trioconv_cli(*args)
    assert result.returncode == 0, result.stderr
    compare = subprocess.run(
        ["qemu-img", "compare", "-f", "raw", "-F", "qcow2", src, loop_device],
        capture_output=True,
        text=True,
    )
    assert compare.returncode == 0, compare.stdout + compare.stderr

"""Writing into qcow2 images with internal snapshots (``convert -n`` into such an image).

Clusters the active layer shares with a snapshot (refcount above 1, no COPIED flag) are
copied on write, as qemu does. qemu-img is the oracle: afterwards ``qemu-img check``
finds no errors (including its COPIED flag checks) and no leaks, every snapshot reads
byte for byte as before (``qemu-img convert -l snapshot.name=X``), and the active layer
equals the source (``qemu-img compare``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

import trioconv
from trioconv.formats.qcow2 import Qcow2Writer
from trioconv.formats.qcow2._codec import COPIED, OFFSET_MASK, ZERO_FLAG

from ._qcow2 import assert_check_clean
from .conftest import assert_identical, require_tool, run, trioconv_cli

KiB = 1024
MiB = 1024 * KiB
SIZE = 4 * MiB

#: The target's history: (qemu-io commands, then a snapshot of this name or None).
HISTORY: tuple[tuple[tuple[str, ...], str | None], ...] = (
    (
        (
            "write -P 0x11 0 1M",
            "write -P 0x12 2M 100k",
            "write -c -P 0x13 1536k 128k",
            "write -P 0x14 3M 256k",
            "write -z 3M 64k",
        ),
        "s1",
    ),
    (("write -P 0x21 512k 1M", "write -z 2M 8k", "write -P 0x22 3968k 128k"), "s2"),
    (("write -P 0x31 100k 7k", "write -P 0x32 3200k 5k"), None),
)

#: The source: unaligned data over shared, unshared and unallocated clusters; zeroes
#: (which -n writes: the target is not zero-initialised) over the rest.
SOURCE = (
    "write -P 0x55 1000 5000",
    "write -P 0x66 1500k 300k",
    "write -P 0x77 3M 10k",
    "write -P 0x78 3260k 1k",
    "write -P 0x79 4032k 64k",
)


def qcow2_target(
    path: Path,
    *,
    cluster_size: str = "64k",
    compat: str = "1.1",
    extended_l2: bool = False,
    backing: Path | None = None,
) -> list[str]:
    """Make ``path`` with qemu-img/qemu-io as :data:`HISTORY` says; the snapshot names."""
    opts = f"cluster_size={cluster_size},compat={compat}"
    if extended_l2:
        opts += ",extended_l2=on"
    args: list[str | os.PathLike[str]] = ["qemu-img", "create", "-q", "-f", "qcow2", "-o", opts]
    if backing is not None:
        args += ["-b", backing, "-F", "raw"]
    run(*args, path, str(SIZE))
    names: list[str] = []
    for commands, snapshot in HISTORY:
        qemu_io: list[str | os.PathLike[str]] = ["qemu-io", "-f", "qcow2"]
        for command in commands:
            qemu_io += ["-c", command]
        run(*qemu_io, path)
        if snapshot is not None:
            run("qemu-img", "snapshot", "-c", snapshot, path)
            names.append(snapshot)
    return names


def raw_image(path: Path, *commands: str) -> Path:
    run("qemu-img", "create", "-q", "-f", "raw", path, str(SIZE))
    qemu_io: list[str | os.PathLike[str]] = ["qemu-io", "-f", "raw"]
    for command in commands:
        qemu_io += ["-c", command]
    if commands:
        run(*qemu_io, path)
    return path


def snapshot_bytes(path: Path, name: str, out: Path) -> bytes:
    run("qemu-img", "convert", "-f", "qcow2", "-l", f"snapshot.name={name}", "-O", "raw", path, out)
    data = out.read_bytes()
    out.unlink()
    return data


def convert_into(
    tmp_path: Path, target: Path, source: Path, flags: list[str], names: list[str]
) -> None:
    """``trioconv convert -n``; then the oracle checks."""
    before = {name: snapshot_bytes(target, name, tmp_path / "snap.raw") for name in names}
    result = trioconv_cli("convert", "-n", *flags, "-f", "raw", "-O", "qcow2", source, target)
    assert result.returncode == 0, result.stderr
    assert_check_clean(target)
    assert_identical(source, target, "raw", "qcow2")
    for name in names:
        assert snapshot_bytes(target, name, tmp_path / "snap.raw") == before[name], name
    listed = run("qemu-img", "snapshot", "-l", target).stdout
    assert all(name in listed for name in names)


def convert_source_into(tmp_path: Path, flags: list[str], **target: Any) -> None:
    """:func:`convert_into` a target made by :func:`qcow2_target` (``target``: its
    options) the raw :data:`SOURCE`."""
    path = tmp_path / "t.qcow2"
    names = qcow2_target(path, **target)
    convert_into(tmp_path, path, raw_image(tmp_path / "src.raw", *SOURCE), flags, names)


@pytest.fixture
def tools() -> None:
    require_tool("qemu-img")
    require_tool("qemu-io")


FLAGS = [pytest.param([], id="default"), pytest.param(["-W"], id="W"), ["-m", "1"]]


@pytest.mark.usefixtures("tools")
@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("compat", ["1.1", "0.10"])
@pytest.mark.parametrize("cluster_size", ["4k", "64k"])
def test_convert_into_image_with_snapshots(
    tmp_path: Path, cluster_size: str, compat: str, flags: list[str]
) -> None:
    convert_source_into(tmp_path, flags, cluster_size=cluster_size, compat=compat)


@pytest.mark.usefixtures("tools")
@pytest.mark.parametrize("flags", FLAGS)
@pytest.mark.parametrize("cluster_size", ["16k", "64k"])
def test_convert_into_extended_l2_image_with_snapshots(
    tmp_path: Path, cluster_size: str, flags: list[str]
) -> None:
    convert_source_into(tmp_path, flags, cluster_size=cluster_size, extended_l2=True)


@pytest.mark.usefixtures("tools")
@pytest.mark.parametrize(
    ("compat", "extended_l2"), [("1.1", False), ("0.10", False), ("1.1", True)]
)
def test_convert_into_image_with_snapshots_and_backing(
    tmp_path: Path, compat: str, extended_l2: bool
) -> None:
    """No pre-zeroing with a backing image: partly written shared clusters are copied."""
    base = raw_image(tmp_path / "base.raw", "write -P 0xb0 0 4M")
    convert_source_into(tmp_path, ["-W"], compat=compat, extended_l2=extended_l2, backing=base)


@pytest.mark.usefixtures("tools")
@pytest.mark.parametrize(
    "variant", ["compat=1.1", "compat=0.10", "extended_l2=on", "compat=1.1 (twice)"]
)
def test_convert_zeroes_and_full_data_into_image_with_snapshots(
    tmp_path: Path, variant: str
) -> None:
    """An all-zero source (only zero runs) and a source with data everywhere."""
    compat = "0.10" if "0.10" in variant else "1.1"
    target = tmp_path / "t.qcow2"
    names = qcow2_target(target, compat=compat, extended_l2="extended" in variant)
    zeroes = raw_image(tmp_path / "zero.raw")
    convert_into(tmp_path, target, zeroes, [], names)
    full = raw_image(tmp_path / "full.raw", "write -P 0x99 0 4M", "write -P 0x9a 777 3333")
    convert_into(tmp_path, target, full, ["-W"], names)
    if "twice" in variant:
        # Nothing the active layer maps is shared any more.
        convert_into(tmp_path, target, raw_image(tmp_path / "s.raw", *SOURCE), [], names)


@pytest.mark.usefixtures("tools")
def test_snapshot_of_a_converted_image_then_convert_again(tmp_path: Path) -> None:
    """A snapshot taken after a trioconv write, and more writes on top of it."""
    target = tmp_path / "t.qcow2"
    names = qcow2_target(target, cluster_size="4k")
    convert_into(tmp_path, target, raw_image(tmp_path / "a.raw", *SOURCE), [], names)
    run("qemu-img", "snapshot", "-c", "s3", target)
    names.append("s3")
    other = raw_image(tmp_path / "b.raw", "write -P 0x42 4000 1M", "write -P 0x43 3M 333")
    convert_into(tmp_path, target, other, ["-W", "-m", "16"], names)


# -- the bookkeeping, step by step -----------------------------------------------------


async def test_copy_on_write_refcounts(tmp_path: Path) -> None:
    require_tool("qemu-img")
    require_tool("qemu-io")
    path = tmp_path / "t.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", path, "1M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 192k", path)
    run("qemu-img", "snapshot", "-c", "s1", path)
    cs = 64 * KiB
    async with trioconv.open_image(path, "qcow2", writable=True) as drv:
        assert isinstance(drv, Qcow2Writer)
        l1 = drv._l1[0]
        old_l2 = l1 & OFFSET_MASK
        assert not l1 & COPIED
        assert await drv._refcount(old_l2 // cs) == 2
        t = await drv._get_l2(0, create=False)
        assert t is not None
        old = list(t.table[:3])
        for entry in old:
            assert not entry & COPIED
            assert await drv._refcount((entry & OFFSET_MASK) // cs) == 2

        # A partial write: the L2 table and the data cluster are copied.
        await drv.pwrite(100, b"x" * 10)
        assert drv._l1[0] & COPIED
        new_l2 = drv._l1[0] & OFFSET_MASK
        assert new_l2 != old_l2 and t.host == new_l2
        assert await drv._refcount(old_l2 // cs) == 1
        assert await drv._refcount(new_l2 // cs) == 1
        first = t.table[0]
        assert first & COPIED and first & OFFSET_MASK != old[0] & OFFSET_MASK
        assert await drv._refcount((first & OFFSET_MASK) // cs) == 1
        assert await drv._refcount((old[0] & OFFSET_MASK) // cs) == 1
        assert list(t.table[1:3]) == old[1:3]  # still shared, untouched
        assert await drv.pread(0, cs) == b"\1" * 100 + b"x" * 10 + b"\1" * (cs - 110)

        # Written again: in place now.
        await drv.pwrite(200, b"y")
        assert t.table[0] == first

        # Zeroes over a shared cluster: the zero flag, the cluster and its count kept.
        await drv.pwrite_zeroes(cs, cs)
        assert t.table[1] == old[1] | ZERO_FLAG
        assert await drv._refcount((old[1] & OFFSET_MASK) // cs) == 2
        # ... and unmapped: the active layer's reference goes.
        await drv.pwrite_zeroes(2 * cs, cs, may_unmap=True)
        assert t.table[2] == 0
        assert await drv._refcount((old[2] & OFFSET_MASK) // cs) == 1
        assert await drv.pread(cs, 2 * cs) == bytes(2 * cs)
    assert_check_clean(path)
    assert snapshot_bytes(path, "s1", tmp_path / "s.raw") == b"\1" * 192 * KiB + bytes(832 * KiB)


async def test_version2_zeroes_copy_shared_clusters(tmp_path: Path) -> None:
    """Version 2 has no zero flag: zero bytes go to a copy, never the shared cluster."""
    require_tool("qemu-img")
    require_tool("qemu-io")
    path = tmp_path / "t.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat=0.10", path, "1M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 64k", path)
    run("qemu-img", "snapshot", "-c", "s1", path)
    async with trioconv.open_image(path, "qcow2", writable=True) as drv:
        assert isinstance(drv, Qcow2Writer)
        t = await drv._get_l2(0, create=False)
        assert t is not None
        old = t.table[0]
        await drv.pwrite_zeroes(0, 64 * KiB)
        assert t.table[0] & COPIED and t.table[0] & OFFSET_MASK != old & OFFSET_MASK
        assert await drv.pread(0, 64 * KiB) == bytes(64 * KiB)
    assert_check_clean(path)
    assert snapshot_bytes(path, "s1", tmp_path / "s.raw") == b"\1" * 64 * KiB + bytes(960 * KiB)


async def test_writing_into_a_snapshot_is_refused(tmp_path: Path) -> None:
    require_tool("qemu-img")
    path = tmp_path / "t.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", path, "1M")
    run("qemu-img", "snapshot", "-c", "s1", path)
    before = path.read_bytes()
    with pytest.raises(trioconv.UnsupportedError, match="cannot be written"):
        async with trioconv.open_image(path, "qcow2", writable=True, snapshot="s1"):
            pass  # pragma: no cover
    assert path.read_bytes() == before


async def test_extended_l2_copy_keeps_what_subclusters_read_as(tmp_path: Path) -> None:
    """A shared cluster with extended L2 entries, copied on a partial write: allocated
    subclusters keep their bytes, zero and unallocated ones read as zeroes."""
    require_tool("qemu-img")
    require_tool("qemu-io")
    path = tmp_path / "t.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", path, "1M")
    commands = ("write -P 1 0 64k", "write -z 8k 4k", "write -P 2 64k 2k")
    run("qemu-io", "-f", "qcow2", *[arg for c in commands for arg in ("-c", c)], path)
    run("qemu-img", "snapshot", "-c", "s1", path)
    snapshot = snapshot_bytes(path, "s1", tmp_path / "s.raw")
    cs = 64 * KiB
    expected = bytearray(snapshot)
    async with trioconv.open_image(path, "qcow2", writable=True) as drv:
        assert isinstance(drv, Qcow2Writer)
        t = await drv._get_l2(0, create=False)
        assert t is not None
        old = list(t.table[:4])
        await drv.pwrite(100, b"x")
        await drv.pwrite(cs + 5000, b"y")
        expected[100] = ord("x")
        expected[cs + 5000] = ord("y")
        for k in (0, 2):
            assert t.table[k] & COPIED and t.table[k] & OFFSET_MASK != old[k] & OFFSET_MASK
            assert await drv._refcount((old[k] & OFFSET_MASK) // cs) == 1
        assert await drv.pread(0, 2 * cs) == expected[: 2 * cs]
    assert_check_clean(path)
    assert snapshot_bytes(path, "s1", tmp_path / "s.raw") == snapshot
    out = tmp_path / "active.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", path, out)
    assert out.read_bytes() == expected

"""The qcow2 writer takes freed clusters again, as qemu does.

``convert -n`` into an existing qcow2 first makes the whole target read as zeroes
(freeing its clusters, as qemu-img does), then writes the data. Clusters freed that way
(or by zeroing, or by overwriting compressed or copied-on-write clusters) are handed
out again from the lowest one on, so converting into the same target again and again
does not make it grow. A reused cluster still holds its old bytes: the parts of it a
write does not cover must be written with zeroes, and a cluster must not be handed out
again while a read or write that started before it was freed may still touch it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import trioconv
from trioconv.formats.qcow2 import Qcow2Writer
from trioconv.formats.qcow2._codec import OFFSET_MASK

from ._qcow2 import assert_check_clean
from .conftest import (
    assert_identical,
    create_filled,
    make_raw,
    qemu_map,
    require_tool,
    run,
    trioconv_cli,
)

KiB = 1024
MiB = 1024 * KiB

# Data at offsets that are not cluster-aligned, so reused clusters are written in part.
SOURCE = (
    "write -P 1 4k 8k",
    "write -P 2 100k 300k",
    "write -P 3 1000k 1M",
    "write -P 4 3M 5k",
    "write -P 5 5M 1M",
    "write -P 6 7M 1M",
)


def _full_target(path: Path, options: str = "", **backing: str) -> Path:
    """A qcow2 with every cluster allocated and holding 0x09 bytes."""
    return create_filled(path, "qcow2", "8M", "write -P 9 0 8M", options=options, **backing)


@pytest.mark.parametrize(
    "options", ["", "extended_l2=on", "cluster_size=4096", "compat=0.10", "refcount_bits=1"]
)
@pytest.mark.parametrize("flags", [["-m", "8"], ["-m", "8", "-W"], ["-m", "1"], ["-c"]])
def test_convert_n_reuses_clusters_like_qemu(
    tmp_path: Path, options: str, flags: list[str]
) -> None:
    require_tool("qemu-img")
    src = make_raw(tmp_path / "src.raw", "8M", *SOURCE)
    ours = _full_target(tmp_path / "ours.qcow2", options)
    theirs = _full_target(tmp_path / "theirs.qcow2", options)
    size_before = ours.stat().st_size
    result = trioconv_cli("convert", "-n", "-f", "raw", "-O", "qcow2", *flags, src, ours)
    assert result.returncode == 0, result.stderr
    if "-c" not in flags:  # qemu-img 7.2 fails there ("Input/output error")
        run("qemu-img", "convert", "-n", "-f", "raw", "-O", "qcow2", *flags, src, theirs)
    assert_identical(src, ours, "raw", "qcow2")  # no 0x09 left around partial writes
    assert_check_clean(ours)
    assert ours.stat().st_size == size_before  # nothing taken past the old end
    assert ours.stat().st_size <= theirs.stat().st_size
    for extent in qemu_map(ours, "qcow2"):
        if "offset" in extent:  # (compressed clusters have none)
            assert extent["offset"] + extent["length"] <= size_before


@pytest.mark.parametrize("flags", [[], ["-W"], ["-c"]])
def test_freed_clusters_are_discarded(tmp_path: Path, flags: list[str]) -> None:
    """``-n`` into a full qcow2 frees its old clusters and punches them out of the file,
    as qemu-img passes the discard down: their old bytes do not stay behind,
    unreferenced, and the file's disk usage comes down to what the new data needs."""
    require_tool("qemu-img")
    src = make_raw(tmp_path / "src.raw", "8M", "write -P 1 1M 512k")
    target = _full_target(tmp_path / "t.qcow2")
    assert target.stat().st_blocks * 512 >= 8 * MiB
    result = trioconv_cli("convert", "-n", "-f", "raw", "-O", "qcow2", *flags, src, target)
    assert result.returncode == 0, result.stderr
    assert_identical(src, target, "raw", "qcow2")
    assert_check_clean(target)
    assert b"\x09" * 4096 not in target.read_bytes()  # the old data is gone
    assert target.stat().st_blocks * 512 <= 2 * MiB


def test_repeated_backups_keep_their_size(tmp_path: Path) -> None:
    """A nightly ``convert -n`` into the same qcow2 does not grow it night after night."""
    require_tool("qemu-img")
    target = create_filled(tmp_path / "backup.qcow2", "qcow2", "8M")
    sizes = []
    for night in range(3):
        src = make_raw(
            tmp_path / f"night{night}.raw",
            "8M",
            f"write -P {night + 1} {night * 512}k 2M",
            f"write -P {night + 7} 5M 1536k",
        )
        result = trioconv_cli("convert", "-n", "-f", "raw", "-O", "qcow2", src, target)
        assert result.returncode == 0, result.stderr
        assert_identical(src, target, "raw", "qcow2")
        assert_check_clean(target)
        sizes.append(target.stat().st_size)
    assert sizes[1] == sizes[0] and sizes[2] == sizes[0], sizes


@pytest.mark.parametrize("kind", ["overlay", "compressed overlay", "extended_l2 overlay"])
def test_convert_n_into_overlay(tmp_path: Path, kind: str) -> None:
    """Into an overlay, zero runs become zero clusters (freeing what they mapped) while
    data is written: freed clusters come back only once nothing in flight needs them -
    partial writes over compressed clusters read those first."""
    require_tool("qemu-img")
    base = make_raw(tmp_path / "base.raw", "8M", "write -P 7 0 8M")
    src = make_raw(tmp_path / "src.raw", "8M", *SOURCE)
    target = tmp_path / "t.qcow2"
    if kind == "compressed overlay":
        other = make_raw(tmp_path / "other.raw", "8M", "write -P 8 0 8M")
        run("qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-B", base, "-F", "raw",
            other, target)  # fmt: skip
    else:
        options = "extended_l2=on" if kind.startswith("extended") else ""
        _full_target(target, options, backing=str(base), backing_fmt="raw")
    for flags in (["-m", "16", "-W"], ["-m", "1"]):
        result = trioconv_cli("convert", "-n", "-f", "raw", "-O", "qcow2", *flags, src, target)
        assert result.returncode == 0, result.stderr
        assert_identical(src, target, "raw", "qcow2")
        assert_check_clean(target)
    assert target.stat().st_size <= 9 * MiB


async def _host(drv: Qcow2Writer, guest: int) -> int:
    entry = await drv._entry(guest)
    return entry & OFFSET_MASK


async def test_freed_cluster_waits_for_operations_in_flight(tmp_path: Path) -> None:
    """A cluster freed while a read or write is in flight is not handed out again until
    that operation is done (it may still read or write the old bytes there)."""
    require_tool("qemu-img")
    cs = 64 * KiB
    path = create_filled(tmp_path / "t.qcow2", "qcow2", "4M", "write -P 1 0 64k")
    async with trioconv.open_image(path, "qcow2", writable=True) as drv:
        assert isinstance(drv, Qcow2Writer)
        freed = await _host(drv, 0)
        assert freed
        with drv._op():  # e.g. a read of cluster 0 that has not finished
            await drv.pwrite_zeroes(0, cs, may_unmap=True)
            assert await _host(drv, 0) == 0
            await drv.pwrite(5 * cs, b"\2" * cs)
            assert await _host(drv, 5 * cs) not in (0, freed)
        await drv.pwrite(6 * cs, b"\3" * cs)
        assert await _host(drv, 6 * cs) == freed  # taken again, lowest first
        # Taken again in part: the rest reads as zeroes, not the old 0x01 bytes.
        await drv.pwrite_zeroes(6 * cs, cs, may_unmap=True)
        await drv.pwrite(7 * cs + 100, b"\4" * 10)
        assert await _host(drv, 7 * cs) == freed
        assert await drv.pread(7 * cs, cs) == bytes(100) + b"\4" * 10 + bytes(cs - 110)
    assert_check_clean(path)

"""Reading qcow2: images made by qemu-img and qemu-io, converted by trioconv, checked by qemu.

Every real image is converted to raw and ``qemu-img compare`` must find the two
identical; block status must tile the image and agree with ``qemu-img map``. Broken
images are made by patching the bytes of real ones, and each must be refused with a
message that names what is wrong. The pure codec gets property tests of its own.
"""

from __future__ import annotations

import itertools
import os
import struct
import sys
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

import trioconv
from trioconv import ConvertError, ExtentKind, ImageError
from trioconv.formats.qcow2 import Qcow2Driver
from trioconv.formats.qcow2 import _codec as codec
from trioconv.testing import check_block_status_tiles

from .conftest import (
    assert_identical,
    create_filled,
    make_raw,
    qemu_io_run,
    qemu_map,
    require_tool,
    run,
    trioconv_cli,
)
from .nbd_servers import QemuNbdLauncher

MiB = 1024 * 1024


# -- making images ---------------------------------------------------------------------


def make_qcow2(
    path: Path,
    size: str,
    *commands: str,
    options: str = "",
    backing: str | None = None,
    backing_fmt: str | None = None,
) -> Path:
    """``qemu-img create -f qcow2 [-o options] [-b ... -F ...]``, then ``qemu-io`` commands."""
    return create_filled(
        path, "qcow2", size, *commands, options=options, backing=backing, backing_fmt=backing_fmt
    )


def qemu_io_raw(path: Path, *commands: str) -> None:
    qemu_io_run(path, "raw", *commands)


MIXED = (
    "write -P 0xab 0 300k",
    "write -z 400k 200k",
    "write -P 0x11 1M 1M",
    "discard 1280k 64k",
    "write -P 0x22 2500k 4k",
    "write -P 0x33 3M 1536",  # small and unaligned
    "write -P 0 3500k 128k",  # allocated zeroes
    "write -P 0x44 4032k 64k",  # up to the end
)


def _ranges(entries: list[dict[str, Any]], key: str) -> list[tuple[int, int]]:
    return [(int(e["start"]), int(e["start"]) + int(e["length"])) for e in entries if e[key]]


def _inside(start: int, end: int, ranges: list[tuple[int, int]]) -> bool:
    """``[start, end)`` is covered by the union of ``ranges`` (sorted, non-overlapping)."""
    pos = start
    for lo, hi in ranges:
        if lo <= pos < hi:
            pos = hi
        if pos >= end:
            return True
    return pos >= end


async def status_tiles(path: Path) -> list[tuple[int, int, ExtentKind]]:
    async with trioconv.open_image(path) as img:
        assert img.name == "qcow2"
        return await check_block_status_tiles(img)


async def check_status_agrees(path: Path) -> list[tuple[int, int, ExtentKind]]:
    """Our block status tiles the image and agrees with ``qemu-img map``."""
    tiles = await status_tiles(path)
    entries = qemu_map(path, "qcow2")
    qemu_data = _ranges(entries, "data")
    qemu_zero = _ranges(entries, "zero")
    ours_data = [(o, o + n) for o, n, k in tiles if k is ExtentKind.DATA]
    for lo, hi in qemu_data:
        assert _inside(lo, hi, ours_data), f"qemu says data at {lo}..{hi}; we say {tiles}"
    for o, n, kind in tiles:
        if kind is not ExtentKind.DATA:
            assert _inside(o, o + n, qemu_zero), f"we say {kind} at {o}+{n}; qemu: {entries}"
    return tiles


async def convert_and_compare(src: Path, tmp_path: Path, name: str = "out.raw") -> Path:
    out = tmp_path / name
    await trioconv.convert([src], out)
    assert_identical(src, out, "qcow2", "raw")
    return out


# -- real images -----------------------------------------------------------------------

VARIANTS = {
    "v2-64k": "compat=0.10",
    "v2-512": "compat=0.10,cluster_size=512",
    "v3-512": "compat=1.1,cluster_size=512",
    "v3-4k": "compat=1.1,cluster_size=4k",
    "v3-64k": "compat=1.1",
    "v3-2M": "compat=1.1,cluster_size=2M",
    "refcount1": "refcount_bits=1",
    "refcount64": "refcount_bits=64",
    "lazy-refcounts": "lazy_refcounts=on",
    "extended-l2": "extended_l2=on",
    "extended-l2-2M": "extended_l2=on,cluster_size=2M",
    "prealloc-metadata": "preallocation=metadata",
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
async def test_convert_variants(tmp_path: Path, variant: str) -> None:
    src = make_qcow2(tmp_path / "src.qcow2", "8M", *MIXED, options=VARIANTS[variant])
    out = await convert_and_compare(src, tmp_path)
    tiles = await check_status_agrees(src)
    assert tiles[0][2] is ExtentKind.DATA
    assert_sparse_copy(src, out)


def assert_sparse_copy(src: Path, out: Path) -> None:
    """Sparse in, sparse out: the raw copy has holes wherever the qcow2 reads as zeroes."""
    holes = [
        (int(e["start"]), int(e["start"]) + int(e["length"]))
        for e in qemu_map(out)
        if not e["data"]
    ]
    zeroes = _ranges(qemu_map(src, "qcow2"), "zero")
    assert zeroes, "the source has no zero ranges to check"
    for lo, hi in zeroes:
        lo, hi = -(-lo // 4096) * 4096, hi // 4096 * 4096
        if lo < hi:
            assert _inside(lo, hi, holes), f"{lo}..{hi} is not a hole in {holes}"


async def test_unaligned_reads_match(tmp_path: Path) -> None:
    src = make_qcow2(tmp_path / "src.qcow2", "4M", *MIXED, options="cluster_size=4k")
    out = await convert_and_compare(src, tmp_path)
    expected = out.read_bytes()
    async with trioconv.open_image(src) as img:
        for offset, length in [(1, 511), (4095, 2), (300 * 1024 - 7, 200 * 1024), (0, 4 * MiB)]:
            assert await img.pread(offset, length) == expected[offset : offset + length]
        with pytest.raises(trioconv.TrioconvIOError, match="outside the image"):
            await img.pread(4 * MiB - 1, 2)


async def test_zero_clusters_plain_and_preallocated(tmp_path: Path) -> None:
    src = make_qcow2(
        tmp_path / "z.qcow2",
        "2M",
        "write -P 0x5a 0 2M",
        "write -z 256k 256k",  # keeps the host clusters: preallocated zero
        "write -z -u 1M 128k",  # may unmap: plain zero
        options="compat=1.1",
    )
    await convert_and_compare(src, tmp_path)
    tiles = await check_status_agrees(src)
    assert (256 * 1024, 256 * 1024, ExtentKind.ZERO) in tiles
    assert (MiB, 128 * 1024, ExtentKind.ZERO) in tiles


async def test_block_status_merges_and_aligns(tmp_path: Path) -> None:
    src = make_qcow2(tmp_path / "m.qcow2", "1000k", "write -P 1 0 130k", "write -z 512k 64k")
    tiles = await status_tiles(src)
    assert tiles == [
        (0, 192 * 1024, ExtentKind.DATA),  # 130k rounds up to whole 64k clusters
        (192 * 1024, (1000 - 192) * 1024, ExtentKind.ZERO),
    ]
    async with trioconv.open_image(src) as img:
        ext = await img.block_status(100, 1)  # an unaligned start still ends on a cluster
        assert (ext.offset, ext.end, ext.kind) == (100, 64 * 1024, ExtentKind.DATA)
        ext = await img.block_status(100, 150 * 1024)
        assert (ext.offset, ext.end, ext.kind) == (100, 128 * 1024, ExtentKind.DATA)
        ext = await img.block_status(1000 * 1024 - 1, 1)  # the last byte
        assert (ext.offset, ext.length, ext.kind) == (1000 * 1024 - 1, 1, ExtentKind.ZERO)


@pytest.mark.parametrize("cluster", ["512", "4k", "64k", "2M"])
async def test_compressed_zlib(tmp_path: Path, cluster: str) -> None:
    raw = tmp_path / "plain.raw"
    run(require_tool("qemu-img"), "create", "-q", "-f", "raw", raw, "5M")
    qemu_io_raw(
        raw,
        "write -P 0x61 0 1M",
        "write -P 0x62 1536k 100k",
        "write -P 0 3M 64k",
        "write -P 0x63 4M 1000k",
    )
    with raw.open("r+b") as f:  # incompressible data too
        f.seek(2 * MiB)
        f.write(os.urandom(300 * 1024))
    src = tmp_path / "c.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", f"cluster_size={cluster}", raw, src)
    await convert_and_compare(src, tmp_path)
    await check_status_agrees(src)
    expected = raw.read_bytes()
    async with trioconv.open_image(src) as img:
        for offset, length in [(10, 1000), (MiB - 3, 7), (2 * MiB + 777, 200 * 1024)]:
            assert await img.pread(offset, length) == expected[offset : offset + length]


async def test_compressed_zstd(tmp_path: Path) -> None:
    raw = tmp_path / "plain.raw"
    run(require_tool("qemu-img"), "create", "-q", "-f", "raw", raw, "2M")
    qemu_io_raw(raw, "write -P 0x71 0 1M", "write -P 0x72 1536k 4k")
    src = tmp_path / "z.qcow2"
    run("qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", raw, src)
    await convert_and_compare(src, tmp_path)
    await check_status_agrees(src)


async def test_extended_l2_subclusters_over_backing(tmp_path: Path) -> None:
    base = make_qcow2(tmp_path / "base.qcow2", "2M", "write -P 0xbb 0 2M")
    top = make_qcow2(
        tmp_path / "top.qcow2",
        "2M",
        "write -P 0x01 2k 2k",  # one subcluster
        "write -P 0x02 9k 5k",  # unaligned, spans subclusters
        "write -z 64k 8k",
        "write -P 0x03 130k 60k",
        "write -z 200k 2k",
        "discard 132k 4k",
        options="extended_l2=on,cluster_size=64k",
        backing="base.qcow2",
        backing_fmt="qcow2",
    )
    await convert_and_compare(top, tmp_path)
    await check_status_agrees(top)
    del base


async def test_backing_chain_depth_three(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    chain = tmp_path / "chain"
    (chain / "deeper").mkdir(parents=True)
    make_qcow2(chain / "deeper" / "base.qcow2", "3M", "write -P 0xb0 0 3M")
    make_qcow2(
        chain / "mid.qcow2",
        "4M",
        "write -P 0xb1 1M 512k",
        "write -z 2M 256k",
        backing="deeper/base.qcow2",
        backing_fmt="qcow2",
        options="cluster_size=4k",
    )
    top = make_qcow2(
        chain / "top.qcow2",
        "6M",  # bigger than its backing images: the rest reads as zeroes
        "write -P 0xb2 0 64k",
        "write -P 0xb3 5M 64k",
        backing="mid.qcow2",
        backing_fmt="qcow2",
    )
    await convert_and_compare(top, tmp_path)
    tiles = await check_status_agrees(top)
    assert tiles[-1][2] is not ExtentKind.DATA
    assert any(k is ExtentKind.HOLE for _, _, k in tiles)
    # Relative names resolve against the image's folder, not the working directory.
    monkeypatch.chdir(tmp_path)
    async with trioconv.open_image("chain/top.qcow2") as img:
        assert await img.pread(MiB, 4) == b"\xb1" * 4
        assert await img.pread(2 * MiB + 300 * 1024, 4) == b"\xb0" * 4
        assert await img.pread(3 * MiB + 1, 4) == bytes(4)


def test_backing_status_is_as_fine_as_the_backing_file(tmp_path: Path) -> None:
    """Under a 2 MiB-cluster overlay that holds nothing, a sparse base's 4 KiB of data
    is 4 KiB of data, not a whole cluster: with ``-S 1M`` trioconv writes no more than
    qemu-img (it wrote a whole MiB)."""
    qemu_img = require_tool("qemu-img")
    base = tmp_path / "base.raw"
    run(qemu_img, "create", "-q", "-f", "raw", base, "8M")
    run(require_tool("qemu-io"), "-f", "raw", "-c", "write -P 1 1M 4k", base)
    top = make_qcow2(
        tmp_path / "top.qcow2",
        "8M",
        backing="base.raw",
        backing_fmt="raw",
        options="cluster_size=2M",
    )
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    result = trioconv_cli("convert", "-O", "raw", "-S", "1M", top, ours)
    assert result.returncode == 0, result.stderr
    run(qemu_img, "convert", "-O", "raw", "-S", "1M", top, theirs)
    assert_identical(ours, theirs)
    assert ours.stat().st_blocks <= theirs.stat().st_blocks


async def test_raw_backing_with_format_works(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x77" * MiB)
    top = make_qcow2(
        tmp_path / "top.qcow2", "2M", "write -P 1 0 4k", backing="base.raw", backing_fmt="raw"
    )
    await convert_and_compare(top, tmp_path)
    await check_status_agrees(top)


def _patch(path: Path, offset: int, fmt: str, *values: int) -> None:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, offset, *values)
    path.write_bytes(bytes(data))


def _field(path: Path, offset: int, fmt: str) -> int:
    value: int = struct.unpack_from(fmt, path.read_bytes(), offset)[0]
    return value


async def test_raw_backing_reached_by_probing_is_refused(tmp_path: Path) -> None:
    base = tmp_path / "base.raw"
    base.write_bytes(b"\x77" * MiB)
    top = make_qcow2(tmp_path / "top.qcow2", "1M", backing="base.raw", backing_fmt="raw")
    data = top.read_bytes()
    at = data.index(struct.pack(">I", codec.Extension.BACKING_FORMAT), 104)
    _patch(top, at, ">I", 0x12345678)  # an unknown extension now: skipped
    message = "backing file format not specified; probing a raw backing file is refused"
    with pytest.raises(ImageError, match=message):
        async with trioconv.open_image(top):
            pass
    result = trioconv_cli("convert", "-O", "raw", top, tmp_path / "out.raw")
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and message in result.stderr


def deep_chain(tmp_path: Path, length: int) -> Path:
    """A chain of ``length`` qcow2 images; the bottom one holds 0x42 in its first 4 KiB."""
    run("qemu-img", "create", "-q", "-f", "qcow2", tmp_path / "b0.qcow2", "1M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x42 0 4k", tmp_path / "b0.qcow2")
    for k in range(1, length):
        image = tmp_path / f"b{k}.qcow2"
        run(
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-u",
            "-b",
            f"b{k - 1}.qcow2",
            "-F",
            "qcow2",
            image,
            "1M",
        )
    return tmp_path / f"b{length - 1}.qcow2"


def test_deep_backing_chain(tmp_path: Path) -> None:
    """120 images deep (qemu-img opens it): each image opens the next in a nested call,
    and the command line has room for it."""
    top = deep_chain(tmp_path, 120)
    result = trioconv_cli("info", "--backing-chain", top)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("image: ") == 120
    out = tmp_path / "out.raw"
    result = trioconv_cli("convert", "-O", "raw", top, out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes()[:4096] == b"\x42" * 4096


async def test_deep_backing_chain_in_a_program(tmp_path: Path) -> None:
    """With Python's default recursion limit a program opens chains of about 80
    images; a deeper one is one clear error, not a RecursionError."""
    top = deep_chain(tmp_path, 120)
    old = sys.getrecursionlimit()
    sys.setrecursionlimit(1000)
    try:
        with pytest.raises(ImageError, match="too deep for Python's recursion limit") as caught:
            async with trioconv.open_image(top):
                pass
        # Said once, for the top image: not wrapped by every image above the limit.
        assert str(caught.value).startswith(f"Could not open '{top}': its backing chain")
    finally:
        sys.setrecursionlimit(old)


async def test_backing_loop_is_refused(tmp_path: Path) -> None:
    a = make_qcow2(tmp_path / "a.qcow2", "1M")
    b = make_qcow2(tmp_path / "b.qcow2", "1M", backing="a.qcow2", backing_fmt="qcow2")
    run("qemu-img", "rebase", "-u", "-b", "b.qcow2", "-F", "qcow2", a)
    with trio.fail_after(20):
        for start in (a, b):
            with pytest.raises(ImageError, match="infinite loop"):
                async with trioconv.open_image(start):
                    pass
    # A loop through a differently spelled name is caught too.
    run("qemu-img", "rebase", "-u", "-b", "./a.qcow2", "-F", "qcow2", a)
    with pytest.raises(ImageError, match="infinite loop"):
        async with trioconv.open_image(a):
            pass
    result = trioconv_cli("convert", "-O", "raw", a, tmp_path / "out.raw", timeout=30)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "infinite loop" in result.stderr


async def test_internal_snapshots_are_ignored(tmp_path: Path) -> None:
    src = make_qcow2(tmp_path / "s.qcow2", "1M", "write -P 0x10 0 1M")
    run("qemu-img", "snapshot", "-c", "before", src)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x20 0 512k", "-c", "discard 768k 64k", src)
    out = await convert_and_compare(src, tmp_path)
    data = out.read_bytes()
    assert data[:4] == b"\x20" * 4 and data[600 * 1024] == 0x10
    assert data[800 * 1024] == 0


@pytest.mark.parametrize(("bit", "name"), [(0, "dirty"), (1, "corrupt")])
async def test_dirty_and_corrupt_images_read(tmp_path: Path, bit: int, name: str) -> None:
    src = make_qcow2(tmp_path / f"{name}.qcow2", "1M", "write -P 0x3c 0 100k")
    _patch(src, 72, ">Q", _field(src, 72, ">Q") | 1 << bit)
    await convert_and_compare(src, tmp_path)


@pytest.mark.parametrize("raw_flag", ["on", "off"])
async def test_external_data_file(
    tmp_path: Path, raw_flag: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # qemu-img takes the data file name relative to its cwd
    src = make_qcow2(
        tmp_path / "d.qcow2",
        "2M",
        "write -P 0x44 0 64k",
        "write -P 0x45 1M 100k",
        options=f"data_file=d.data,data_file_raw={raw_flag}",
    )
    assert (tmp_path / "d.data").exists()
    await convert_and_compare(src, tmp_path)
    await status_tiles(src)


async def test_a_missing_data_file_fails_only_reads_when_opened_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opened alone (``backing=False``, as ``info`` opens an image) a qcow2 image whose
    external data file is gone still opens: its tables and block status read, and only
    reading guest data fails, with the reason. Opened for reading, it is refused."""
    monkeypatch.chdir(tmp_path)
    src = make_qcow2(tmp_path / "d.qcow2", "2M", "write -P 0x44 0 64k", options="data_file=d.data")
    (tmp_path / "d.data").unlink()
    with pytest.raises(ImageError, match=r"cannot open its external data file: .*d\.data"):
        async with trioconv.open_image(src):
            pass
    async with trioconv.open_image(src, backing=False) as image:
        assert image.describe()["format-specific"] == {
            "type": "qcow2",
            "data": {
                "compat": "1.1",
                "compression-type": "zlib",
                "lazy-refcounts": False,
                "refcount-bits": 16,
                "data-file": "d.data",
                "data-file-raw": False,
                "corrupt": False,
                "extended-l2": False,
            },
        }
        extent = await image.block_status(0, 2 * MiB)
        assert (extent.offset, extent.length, extent.kind) == (0, 64 * 1024, ExtentKind.DATA)
        with pytest.raises(trioconv.TrioconvIOError, match="No such file"):
            await image.pread(0, 4096)


# -- broken images ---------------------------------------------------------------------


def _l1_entry_at(path: Path) -> int:
    return _field(path, 40, ">Q")


BROKEN: dict[str, tuple[str, str]] = {
    "l1-misaligned": ("open", "Invalid L1 table offset 0x30200: not aligned"),
    "l1-beyond-eof": ("open", "L1 table at offset 0x4000000000 .* beyond the end of the file"),
    "l2-beyond-eof": ("read", "L2 table offset 0x4000000000 in L1 entry 0 lies beyond the end"),
    "l2-misaligned": ("read", "L2 table offset 0x50200 in L1 entry 0 is not aligned"),
    "cluster-bits-30": ("open", r"Unsupported cluster size: 2\^30"),
    "unknown-incompatible": ("open", r"Unsupported qcow2 incompatible feature\(s\): bit 10"),
    "huge-l1": ("open", "Active L1 table too large: 16777216 entries"),
    "l1-too-small": ("open", "L1 table is too small"),
    "version-4": ("open", "Unsupported qcow2 version 4"),
    "encrypted": ("open", "encrypted qcow2 images are not supported"),
    # A preallocated zero cluster's offset must be aligned too (qemu-img refuses it).
    "zero-misaligned": ("read", "cluster offset 0x12200 in L2 entry 0x8000000000012201 is not"),
}


def _l2_entry_at(path: Path, index: int) -> int:
    """Where L2 entry ``index`` of the first L2 table is in the file."""
    l2 = _field(path, _l1_entry_at(path), ">Q") & codec.OFFSET_MASK
    return l2 + 8 * index


def _break(path: Path, how: str) -> None:
    if how == "l1-misaligned":
        _patch(path, 40, ">Q", 0x30200)
    elif how == "l1-beyond-eof":
        _patch(path, 40, ">Q", 0x40_0000_0000)
    elif how == "l2-beyond-eof":
        _patch(path, _l1_entry_at(path), ">Q", 1 << 63 | 0x40_0000_0000)
    elif how == "l2-misaligned":
        _patch(path, _l1_entry_at(path), ">Q", 1 << 63 | 0x50200)
    elif how == "cluster-bits-30":
        _patch(path, 20, ">I", 30)
    elif how == "unknown-incompatible":
        _patch(path, 72, ">Q", 1 << 10)
    elif how == "huge-l1":
        _patch(path, 36, ">I", 1 << 24)
    elif how == "l1-too-small":
        _patch(path, 24, ">Q", 1 << 40)
    elif how == "version-4":
        _patch(path, 4, ">I", 4)
    elif how == "encrypted":
        _patch(path, 32, ">I", 1)
    elif how == "zero-misaligned":
        _patch(path, _l2_entry_at(path, 4), ">Q", 1 << 63 | 0x12200 | 1)


@pytest.mark.parametrize("how", sorted(BROKEN))
async def test_broken_images_are_refused(tmp_path: Path, how: str) -> None:
    when, message = BROKEN[how]
    src = make_qcow2(tmp_path / "bad.qcow2", "1M", "write -P 0x12 0 64k")
    _break(src, how)
    target = tmp_path / "out.raw"
    error = ImageError if when == "open" else ConvertError
    with pytest.raises(error, match=message):
        await trioconv.convert([src], target)
    assert not target.exists()
    result = trioconv_cli("convert", "-O", "raw", src, target)
    assert result.returncode == 1, result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("trioconv: ")


def test_salvage_copies_around_a_corrupt_table_entry(tmp_path: Path) -> None:
    """``--salvage`` gets past an L2 entry that cannot be decoded, as qemu-img does: the
    block status of that cluster cannot be read, so it is copied as data, its read
    fails too and it becomes zeroes; every other cluster is copied."""
    qemu_img = require_tool("qemu-img")
    src = make_qcow2(tmp_path / "bad.qcow2", "1M", "write -P 0x12 0 1M")
    _patch(src, _l2_entry_at(src, 4), ">Q", 1 << 63 | 0x12200)  # misaligned data cluster
    plain = trioconv_cli("convert", "-O", "raw", src, tmp_path / "plain.raw")
    assert plain.returncode == 1 and "not aligned" in plain.stderr
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    result = trioconv_cli("convert", "--salvage", "-O", "raw", src, ours)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "error while reading block status at offset 262144" in result.stderr
    assert "(salvaged as zeroes)" in result.stderr
    run(qemu_img, "convert", "--salvage", "-O", "raw", src, theirs)
    assert_identical(ours, theirs)
    cluster = 64 * 1024
    data = ours.read_bytes()
    assert data[4 * cluster : 5 * cluster] == bytes(cluster)
    assert data[: 4 * cluster] == b"\x12" * (4 * cluster)
    assert data[5 * cluster :] == b"\x12" * (MiB - 5 * cluster)


async def test_compressed_garbage_is_refused(tmp_path: Path) -> None:
    raw = tmp_path / "plain.raw"
    raw.write_bytes(b"\x61" * 65536)
    src = tmp_path / "c.qcow2"
    run(require_tool("qemu-img"), "convert", "-c", "-O", "qcow2", raw, src)
    async with trioconv.open_image(src) as img:
        assert isinstance(img, Qcow2Driver)
        table = await img._l2_table(0)
        assert table is not None
        host = codec.decode_l2_entry(table[0][0], img.layout).host_offset
    _patch(src, host, ">Q", 0xFFFF_FFFF_FFFF_FFFF)
    with pytest.raises(ConvertError, match="could not be decompressed"):
        await trioconv.convert([src], tmp_path / "out.raw")


# -- the pure codec --------------------------------------------------------------------


#: The header encoder the writer uses; the reader's parser must be its inverse.
encode_header = codec.encode_header


@st.composite
def headers(draw: st.DrawFn) -> codec.Header:
    version = draw(st.sampled_from([2, 3]))
    cluster_bits = draw(st.integers(9, 21))
    cs = 1 << cluster_bits
    extended = version == 3 and cluster_bits >= 14 and draw(st.booleans())
    per_l1 = cs // (16 if extended else 8) * cs
    size = draw(st.integers(0, min(1 << 50, codec.MAX_L1_BYTES // 8 * per_l1)))
    needed = -(-size // per_l1)
    l1_size = draw(st.integers(needed, min(codec.MAX_L1_BYTES // 8, needed + 100)))
    aligned = st.integers(0, 1 << 30).map(lambda n: n * cs)
    fields: dict[str, Any] = {}
    if version == 3:
        zstd = draw(st.booleans())
        incompat = draw(st.sampled_from([0, 1, 2, 3]))
        incompat |= (codec.Incompatible.COMPRESSION_TYPE if zstd else 0) | (
            codec.Incompatible.EXTENDED_L2 if extended else 0
        )
        fields = {
            "incompatible_features": int(incompat),
            "compatible_features": draw(st.integers(0, 2**64 - 1)),
            "autoclear_features": draw(st.sampled_from([0, 1])),
            "refcount_order": draw(st.integers(0, 6)),
            "header_length": 112 if zstd else draw(st.sampled_from([104, 112])),
            "compression_type": int(zstd),
        }
    return codec.Header(
        version=version,
        backing_file_offset=draw(st.sampled_from([0, 512])),
        backing_file_size=draw(st.integers(0, 1023)),
        cluster_bits=cluster_bits,
        size=size,
        crypt_method=0,
        l1_size=l1_size,
        l1_table_offset=draw(aligned),
        refcount_table_offset=draw(aligned),
        refcount_table_clusters=draw(st.integers(0, (8 << 20) // cs)),
        nb_snapshots=draw(st.integers(0, 100)),
        snapshots_offset=draw(aligned),
        **fields,
    )


@given(headers())
def test_header_round_trip(header: codec.Header) -> None:
    assert codec.parse_header(encode_header(header)) == header


@given(headers(), st.integers(0, 111), st.integers(0, 255))
def test_header_bit_flips_fail_cleanly(header: codec.Header, at: int, value: int) -> None:
    data = bytearray(encode_header(header).ljust(112, b"\0"))
    data[at] = value
    try:
        codec.parse_header(data)
    except codec.Qcow2FormatError as exc:
        message = str(exc)
        assert message


def test_extensions_parse() -> None:
    h = codec.Header(3, 0x200, 8, 16, 1 << 20, 0, 1, 0x30000, 0x10000, 1, 0, 0, header_length=104)

    def ext(kind: int, body: bytes) -> bytes:
        return struct.pack(">II", kind, len(body)) + body + bytes(-len(body) % 8)

    names = bytes([0, 0]) + b"dirty".ljust(46, b"\0") + bytes([0, 9]) + b"future".ljust(46, b"\0")
    cluster = encode_header(h) + ext(codec.Extension.BACKING_FORMAT, b"qcow2")
    cluster += ext(0x1234, b"whatever") + ext(codec.Extension.FEATURE_NAMES, names)
    cluster += ext(codec.Extension.BITMAPS, bytes(24)) + ext(0, b"")
    cluster = cluster.ljust(0x200, b"\0") + b"base.img"
    info = codec.parse_image(cluster.ljust(1 << 16, b"\0"), 1 << 20)
    assert info.backing_file == "base.img" and info.backing_format == "qcow2"
    assert info.has_bitmaps and info.unknown_extensions == (0x1234,)
    assert info.feature_names == {(0, 0): "dirty", (0, 9): "future"}
    bad = attrs.evolve(h, incompatible_features=1 << 9)
    cluster = encode_header(bad) + ext(codec.Extension.FEATURE_NAMES, names)
    with pytest.raises(codec.Qcow2FormatError, match=r"bit 9 \(future\)"):
        codec.parse_image(cluster.ljust(1 << 16, b"\0"), 1 << 20)
    cluster = encode_header(h) + struct.pack(">II", 0x99, 1 << 20)
    with pytest.raises(codec.Qcow2FormatError, match="runs past the end of the header"):
        codec.parse_image(cluster.ljust(1 << 16, b"\0"), 1 << 20)
    # Names are C strings, as QEMU reads them: they end at a NUL, and empty is none.
    for fmt_body, name, fmt, backing in (
        (b"raw\0\0", b"base\0img", "raw", "base"),
        (b"\0\0\0", b"\0" * 8, None, None),
    ):
        cluster = encode_header(h) + ext(codec.Extension.BACKING_FORMAT, fmt_body) + ext(0, b"")
        cluster = cluster.ljust(0x200, b"\0") + name
        info = codec.parse_image(cluster.ljust(1 << 16, b"\0"), 1 << 20)
        assert (info.backing_format, info.backing_file) == (fmt, backing)


def test_backing_file_name_ends_at_a_nul(tmp_path: Path) -> None:
    """A backing file name whose stored size runs past a NUL (a header some tool wrote
    carelessly) names the file before the NUL, as qemu-img reads it."""
    base = make_raw(tmp_path / "base.raw", "4M", "write -P 5 0 1M")
    top = make_qcow2(tmp_path / "top.qcow2", "4M", backing="base.raw", backing_fmt="raw")
    _patch(top, 16, ">I", 16)  # backing_file_size: 8 -> 16, the name then NUL padding
    out = tmp_path / "out.raw"
    ok = trioconv_cli("convert", "-O", "raw", top, out)
    assert ok.returncode == 0, ok.stderr
    assert_identical(base, out)


LAYOUTS = st.builds(
    codec.Layout,
    cluster_bits=st.integers(9, 21),
    extended_l2=st.just(False),
    version=st.sampled_from([2, 3]),
    data_file=st.booleans(),
)


@given(LAYOUTS, st.integers(0, 2**64 - 1))
def test_l2_entry_decodes_or_fails_cleanly(layout: codec.Layout, entry: int) -> None:
    try:
        decoded = codec.decode_l2_entry(entry, layout)
    except codec.Qcow2FormatError:
        return
    if decoded.kind is codec.ClusterKind.NORMAL:
        assert decoded.host_offset % layout.cluster_size == 0
        assert decoded.host_offset == entry & codec.OFFSET_MASK
    elif decoded.kind is codec.ClusterKind.COMPRESSED:
        assert entry & codec.COMPRESSED
        assert 0 < decoded.compressed_size <= layout.cluster_size * 2
    elif decoded.kind is codec.ClusterKind.ZERO:
        assert entry & 1 and layout.version == 3
        assert decoded.host_offset % layout.cluster_size == 0  # preallocated: aligned too
    else:
        assert entry & codec.OFFSET_MASK == 0


@given(LAYOUTS, st.integers(0, 2**56 - 1), st.integers(0, 2**13 - 1))
def test_compressed_entry_fields(layout: codec.Layout, offset: int, sectors: int) -> None:
    shift = layout.compressed_offset_bits
    offset &= (1 << shift) - 1
    sectors &= (1 << (layout.cluster_bits - 8)) - 1
    entry = codec.COMPRESSED | sectors << shift | offset
    decoded = codec.decode_l2_entry(entry, layout)
    assert decoded == codec.L2Entry(
        codec.ClusterKind.COMPRESSED, offset, (sectors + 1) * 512 - offset % 512
    )


@given(
    st.lists(
        st.one_of(
            st.just(0),
            st.just(1),
            st.integers(1, 1000).map(lambda c: c << 16),
            st.integers(1, 1000).map(lambda c: c << 16 | 1),
            st.integers(1 << 20, 1 << 30).map(lambda o: codec.COMPRESSED | o),
        ),
        min_size=8,
        max_size=8,
    ),
    st.integers(0, 8 * 65536 - 1),
    st.integers(1, 8 * 65536),
)
def test_map_l2_tiles_the_range(entries: list[int], start: int, length: int) -> None:
    layout = codec.Layout(cluster_bits=16)
    entries += [0] * (layout.l2_entries - len(entries))
    raw = struct.pack(f">{len(entries)}Q", *entries)
    table = codec.decode_table(raw)
    assert list(table) == entries
    end = min(start + length, 8 * 65536)
    segs = codec.map_l2(table, raw, layout, 0, start, end)
    pos = start
    for seg in segs:
        assert seg.offset == pos and seg.length > 0
        pos = seg.end
    assert pos == end
    for a, b in itertools.pairwise(segs):
        if a.kind is b.kind and a.kind is not codec.ClusterKind.COMPRESSED:
            assert a.kind is codec.ClusterKind.NORMAL
            assert a.host_offset + a.length != b.host_offset


def test_extended_l2_bitmaps() -> None:
    layout = codec.Layout(cluster_bits=16, extended_l2=True)
    sc = layout.subcluster_size
    alloc, zero = 0b0101, 0b1010 << 4
    entries = [0x30000, zero << 32 | alloc, 0, 1 << 32]
    raw = struct.pack(f">{len(entries)}Q", *entries).ljust(65536, b"\0")
    segs = codec.map_l2(codec.decode_table(raw), raw, layout, 0, 0, 2 * 65536)
    kinds = [(s.offset // sc, s.length // sc, s.kind.value) for s in segs]
    assert kinds == [
        (0, 1, "normal"),
        (1, 1, "unallocated"),
        (2, 1, "normal"),
        (3, 2, "unallocated"),
        (5, 1, "zero"),
        (6, 1, "unallocated"),
        (7, 1, "zero"),
        (8, 24, "unallocated"),
        (32, 1, "zero"),
        (33, 31, "unallocated"),
    ]
    assert segs[2].host_offset == 0x30000 + 2 * sc
    both = struct.pack(">QQ", 0x30000, 1 << 32 | 1).ljust(65536, b"\0")
    with pytest.raises(codec.Qcow2FormatError, match="both allocated and zero"):
        codec.map_l2(codec.decode_table(both), both, layout, 0, 0, 65536)


def test_byte_order_is_big_endian() -> None:
    assert list(codec.decode_table(struct.pack(">2Q", 1, 2**63))) == [1, 2**63]
    assert sys.byteorder in ("little", "big")


async def test_qcow2_over_nbd(tmp_path: Path, qemu_nbd_server: QemuNbdLauncher) -> None:
    src = make_qcow2(tmp_path / "n.qcow2", "8M", *MIXED, options="cluster_size=4k")
    server = qemu_nbd_server(src, fmt="raw", readonly=True)  # the qcow2 file's own bytes
    out = tmp_path / "out.raw"
    await trioconv.convert([server.uri], out)
    assert_identical(src, out, "qcow2", "raw")
    async with trioconv.open_image(server.uri) as img:
        assert img.name == "qcow2" and img.size == 8 * MiB
        await check_block_status_tiles(img)


async def test_missing_backing_file_is_named(tmp_path: Path) -> None:
    make_qcow2(tmp_path / "base.qcow2", "1M")
    top = make_qcow2(tmp_path / "top.qcow2", "1M", backing="base.qcow2", backing_fmt="qcow2")
    (tmp_path / "base.qcow2").unlink()
    message = f"Could not open 'file:{top}': Could not open backing file: .*base.qcow2'"
    with pytest.raises(ImageError, match=message):
        async with trioconv.open_image(f"file:{top}"):
            pass


async def test_l2_cache_stays_bounded(tmp_path: Path) -> None:
    # 512-byte clusters: each L2 table maps only 32 KiB, so 4 MiB needs 128 tables.
    src = make_qcow2(tmp_path / "s.qcow2", "4M", "write -P 9 0 4M", options="cluster_size=512")
    async with trioconv.open_image(src) as img:
        assert isinstance(img, Qcow2Driver)
        assert await img.pread(0, 4 * MiB) == b"\x09" * 4 * MiB
        assert 0 < len(img._cache) <= 32
        await img.aclose()
        await img.aclose()  # idempotent

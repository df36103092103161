"""Reading QED: images made by qemu-img and qemu-io, converted by trioconv, checked by qemu.

Every image - plain, with zero clusters, with raw and qcow2 backing files, in several
cluster and table sizes - is converted to raw and ``qemu-img compare`` must find the two
identical. Block status must tile the image. Broken headers are refused by name, and
writing QED is refused.
"""

from __future__ import annotations

import os
import struct
from pathlib import Path

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

import trioconv
from trioconv import ExtentKind
from trioconv.formats import qed
from trioconv.testing import check_block_status_tiles

from .conftest import assert_identical, require_tool, run, trioconv_cli

MiB = 1024 * 1024


def make_qed(
    path: Path,
    size: str,
    *commands: str,
    options: str = "",
    backing: str | None = None,
    backing_fmt: str | None = None,
) -> Path:
    args: list[str | os.PathLike[str]] = [require_tool("qemu-img"), "create", "-q", "-f", "qed"]
    if options:
        args += ["-o", options]
    if backing is not None:
        args += ["-b", backing]
    if backing_fmt is not None:
        args += ["-F", backing_fmt]
    run(*args, path, size)
    if commands:
        io: list[str | os.PathLike[str]] = [require_tool("qemu-io"), "-f", "qed"]
        for c in commands:
            io += ["-c", c]
        run(*io, path)
    return path


def make_raw(path: Path, size: str, *commands: str) -> Path:
    run(require_tool("qemu-img"), "create", "-q", "-f", "raw", path, size)
    io: list[str | os.PathLike[str]] = [require_tool("qemu-io"), "-f", "raw"]
    for c in commands:
        io += ["-c", c]
    if commands:
        run(*io, path)
    return path


MIXED = (
    "write -P 0xab 0 300k",
    "write -z 400k 200k",
    "write -P 0x11 1M 1M",
    "write -P 0x22 2500k 4k",
    "write -P 0x33 3M 1536",
    "write -z 3200k 64k",
    "write -P 0x44 4032k 64k",
)


def convert_and_compare(img: Path, tmp_path: Path) -> None:
    out = tmp_path / f"{img.stem}.raw"
    result = trioconv_cli("convert", "-O", "raw", img, out)
    assert result.returncode == 0, result.stderr
    assert_identical(img, out, "qed", "raw")


@pytest.mark.parametrize(
    "options", ["", "cluster_size=4k", "cluster_size=1M,table_size=2", "table_size=16"]
)
async def test_plain_images(tmp_path: Path, options: str) -> None:
    img = make_qed(tmp_path / "a.qed", "4M", *MIXED, options=options)
    convert_and_compare(img, tmp_path)
    async with trioconv.open_image(img) as drv:
        assert drv.name == "qed"
        tiles = await check_block_status_tiles(drv)
    kinds = {k for _, _, k in tiles}
    assert ExtentKind.DATA in kinds
    assert ExtentKind.HOLE not in kinds  # no backing file: unallocated reads as ZERO
    data = [(o, o + n) for o, n, k in tiles if k is ExtentKind.DATA]
    for start in (0, 1 * MiB, 2500 * 1024, 3 * MiB, 4032 * 1024):
        assert any(lo <= start < hi for lo, hi in data), (start, tiles)


async def test_zero_clusters_are_zero(tmp_path: Path) -> None:
    img = make_qed(
        tmp_path / "z.qed", "2M", "write -P 1 0 64k", "write -z 64k 128k", "write -P 1 192k 1M"
    )
    raw = img.read_bytes()
    h = qed.decode_header(raw[:64])
    (l2_offset,) = struct.unpack_from("<Q", raw, h.l1_table_offset)
    l2 = struct.unpack_from("<4Q", raw, l2_offset)
    assert l2[1:3] == (qed.ZERO_CLUSTER, qed.ZERO_CLUSTER)  # qemu really made zero clusters
    async with trioconv.open_image(img) as drv:
        ext = await drv.block_status(64 * 1024, 128 * 1024)
        assert (ext.kind, ext.length) == (ExtentKind.ZERO, 128 * 1024)
        assert await drv.pread(64 * 1024, 128 * 1024) == bytes(128 * 1024)
        assert await drv.pread(0, 4) == b"\x01" * 4
    convert_and_compare(img, tmp_path)


@pytest.mark.parametrize("backing_fmt", ["raw", "qcow2"])
async def test_backing_file(tmp_path: Path, backing_fmt: str) -> None:
    base = make_raw(tmp_path / "base.raw", "6M", "write -P 0x11 0 3M", "write -P 0x12 5M 1M")
    if backing_fmt == "qcow2":
        q = tmp_path / "base.qcow2"
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", base, q)
        base = q
    # A relative name: resolved against the image's folder, not the working directory.
    img = make_qed(
        tmp_path / "top.qed",
        "8M",
        "write -P 0x22 1M 100k",
        "write -z 2M 64k",
        "write -P 0x33 7M 4k",
        backing=base.name,
        backing_fmt=backing_fmt,
    )
    header = qed.decode_header(img.read_bytes()[:64])
    assert header.features & qed.F_BACKING_FILE
    assert bool(header.features & qed.F_BACKING_FORMAT_NO_PROBE) == (backing_fmt == "raw")
    convert_and_compare(img, tmp_path)
    async with trioconv.open_image(img) as drv:
        tiles = await check_block_status_tiles(drv)
        assert await drv.pread(0, 2) == b"\x11\x11"
        assert await drv.pread(2 * MiB, 2) == b"\x00\x00"
        assert await drv.pread(5 * MiB, 2) == b"\x12\x12"
        assert await drv.pread(6 * MiB + 4, 2) == b"\x00\x00"  # past the backing file
    kind_at = {o: k for o, n, k in tiles}
    assert any(k is ExtentKind.HOLE for k in kind_at.values())
    for off, n, kind in tiles:
        if off <= 0 < off + n:
            assert kind is ExtentKind.DATA
        if off <= 2 * MiB < off + n:
            assert kind is ExtentKind.ZERO


async def test_backing_missing(tmp_path: Path) -> None:
    base = make_raw(tmp_path / "base.raw", "1M")
    img = make_qed(tmp_path / "top.qed", "1M", backing=base.name, backing_fmt="raw")
    base.unlink()
    result = trioconv_cli("convert", "-O", "raw", img, tmp_path / "o.raw")
    assert result.returncode == 1
    assert "backing file" in result.stderr


async def test_backing_loop_refused(tmp_path: Path) -> None:
    img = make_qed(tmp_path / "a.qed", "1M")
    h = qed.decode_header(img.read_bytes()[:64])
    name = b"a.qed"
    looped = attrs.evolve(
        h,
        features=h.features | qed.F_BACKING_FILE,
        backing_filename_offset=qed.HEADER.size,
        backing_filename_size=len(name),
    )
    with img.open("r+b") as f:
        f.write(qed.encode_header(looped) + name)
    result = trioconv_cli("convert", "-O", "raw", img, tmp_path / "o.raw")
    assert result.returncode == 1
    assert "infinite loop" in result.stderr


def test_writing_qed_refused(tmp_path: Path) -> None:
    src = tmp_path / "s.raw"
    src.write_bytes(bytes(MiB))
    result = trioconv_cli("convert", "-O", "qed", src, tmp_path / "o.qed")
    assert result.returncode == 1
    assert "Format 'qed' is not supported for writing yet" in result.stderr


# -- broken images ---------------------------------------------------------------------


def rewrite_header(path: Path, **changes: int) -> None:
    h = qed.decode_header(path.read_bytes()[:64])
    raw = qed.HEADER.pack(
        qed.MAGIC,
        *[changes.get(f.name, getattr(h, f.name)) for f in attrs.fields(qed.QedHeader)],
    )
    with path.open("r+b") as f:
        f.write(raw)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"features": 0x100}, "Unsupported QED features: 100"),
        ({"cluster_size": 3000}, "invalid cluster size"),
        ({"cluster_size": 1 << 30}, "invalid cluster size"),
        ({"table_size": 3}, "invalid table size"),
        ({"image_size": 1000}, "invalid image size"),
        ({"image_size": 1 << 60}, "invalid image size"),
        ({"l1_table_offset": 1 << 40}, "invalid L1 table offset"),
        ({"l1_table_offset": 12345}, "invalid L1 table offset"),
        ({"header_size": 0}, "invalid header size"),
        (
            {"features": qed.F_BACKING_FILE, "backing_filename_offset": 1 << 20},
            "backing file name",
        ),
    ],
)
async def test_bad_headers(tmp_path: Path, changes: dict[str, int], message: str) -> None:
    img = make_qed(tmp_path / "a.qed", "4M", "write -P 1 0 64k")
    rewrite_header(img, **changes)
    result = trioconv_cli("convert", "-f", "qed", "-O", "raw", img, tmp_path / "o.raw")
    assert result.returncode == 1
    assert message in result.stderr, result.stderr


async def test_not_qed(tmp_path: Path) -> None:
    path = tmp_path / "x.raw"
    path.write_bytes(bytes(MiB))
    result = trioconv_cli("convert", "-f", "qed", "-O", "raw", path, tmp_path / "o.raw")
    assert result.returncode == 1
    assert "Image not in QED format" in result.stderr


async def test_l2_entry_beyond_eof(tmp_path: Path) -> None:
    img = make_qed(tmp_path / "a.qed", "4M", "write -P 1 0 64k")
    raw = img.read_bytes()
    h = qed.decode_header(raw[:64])
    (l2_offset,) = struct.unpack_from("<Q", raw, h.l1_table_offset)
    with img.open("r+b") as f:
        f.seek(l2_offset)
        f.write(struct.pack("<Q", 1 << 40))
    result = trioconv_cli("convert", "-O", "raw", img, tmp_path / "o.raw")
    assert result.returncode == 1
    assert "invalid cluster offset" in result.stderr


async def test_need_check_flag_is_fine_when_reading(tmp_path: Path) -> None:
    img = make_qed(tmp_path / "a.qed", "1M", "write -P 9 0 64k")
    rewrite_header(img, features=qed.F_NEED_CHECK)
    convert_and_compare(img, tmp_path)


# -- codec -----------------------------------------------------------------------------


@given(
    st.integers(12, 26),
    st.sampled_from([1, 2, 4, 8, 16]),
    st.integers(1, 4),
    st.sampled_from([0, qed.F_BACKING_FILE, qed.F_NEED_CHECK, 7]),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**40),
    st.integers(0, 100),
)
def test_header_round_trip(
    cluster_bits: int,
    table_size: int,
    header_size: int,
    features: int,
    compat: int,
    autoclear: int,
    sectors: int,
    name_len: int,
) -> None:
    cs = 1 << cluster_bits
    h = qed.QedHeader(
        cluster_size=cs,
        table_size=table_size,
        header_size=header_size,
        features=features,
        compat_features=compat,
        autoclear_features=autoclear,
        l1_table_offset=cs * header_size,
        image_size=0,
        backing_filename_offset=qed.HEADER.size,
        backing_filename_size=name_len,
    )
    h = attrs.evolve(h, image_size=min(sectors * 512, h.max_image_size // 512 * 512))
    try:
        decoded = qed.decode_header(qed.encode_header(h))
    except trioconv.UnsupportedError:
        assert h.table_bytes > qed.MAX_TABLE_BYTES
        return
    assert decoded == h

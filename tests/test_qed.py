"""Reading QED: images made by qemu-img and qemu-io, converted by trioconv, checked by qemu.

Every image - plain, with zero clusters, with raw and qcow2 backing files, in several
cluster and table sizes - is converted to raw and ``qemu-img compare`` must find the two
identical. Block status must tile the image. Broken headers are refused by name, and
writing QED is refused.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

import trioconv
from trioconv import ExtentKind
from trioconv.formats import qed
from trioconv.testing import check_block_status_tiles

from .conftest import (
    assert_identical,
    create_filled,
    make_raw,
    run,
    trioconv_cli,
)

MiB = 1024 * 1024


def make_qed(
    path: Path,
    size: str,
    *commands: str,
    options: str = "",
    backing: str | None = None,
    backing_fmt: str | None = None,
) -> Path:
    return create_filled(
        path, "qed", size, *commands, options=options, backing=backing, backing_fmt=backing_fmt
    )


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


# -- the top layer alone: convert -B ---------------------------------------------------

KiB = 1024

#: A qed overlay (64 KiB clusters) on a base of 5600 KiB (not a whole number of
#: clusters) with data in [0, 3M) and [5M, 5600K): data over the base's data, over its
#: zeroes and past its end (partial writes copy whole clusters), zero clusters over
#: data, over zeroes and past the end, and unallocated runs inside the base, straddling
#: its end and past it.
OVERLAY = (
    "write -P 0x22 1M 100k",
    "write -z 2M 64k",
    "write -P 0x33 3584k 4k",
    "write -z 4M 128k",
    "write -P 0x44 5M 64k",
    "write -z 6M 64k",
    "write -P 0x55 7M 4k",
)


def make_overlay(folder: Path, base_fmt: str = "raw", options: str = "") -> Path:
    base = make_raw(folder / "base.raw", "5600k", "write -P 0x11 0 3M", "write -P 0x12 5M 480k")
    if base_fmt == "qcow2":
        q = folder / "base.qcow2"
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", base, q)
        base = q
    return make_qed(
        folder / "top.qed",
        "8M",
        *OVERLAY,
        options=options,
        backing=base.name,
        backing_fmt=base_fmt,
    )


def qemu_map(path: Path, fmt: str) -> list[dict[str, object]]:
    out: list[dict[str, object]] = json.loads(
        run("qemu-img", "map", "--output=json", "-f", fmt, path).stdout
    )
    return out


async def layer_tiles(drv: trioconv.Driver) -> list[tuple[int, int, ExtentKind]]:
    out = []
    pos = 0
    while pos < drv.size:
        ext = await drv.layer_status(pos, drv.size - pos)
        assert ext.offset == pos and ext.length > 0, (pos, ext)
        out.append((ext.offset, ext.length, ext.kind))
        pos = ext.end
    assert pos == drv.size
    return out


async def test_layer_status(tmp_path: Path) -> None:
    img = make_overlay(tmp_path)
    async with trioconv.open_image(img) as drv:
        tiles = await layer_tiles(drv)
        # Asked from inside a run, for less than the run: the answer starts there.
        ext = await drv.layer_status(100 * KiB, 10)
        assert (ext.offset, ext.kind) == (100 * KiB, ExtentKind.HOLE)
        assert ext.length >= 10
        # block_status, for the whole chain, calls the base's data DATA.
        assert (await drv.block_status(0, MiB)).kind is ExtentKind.DATA
        assert drv.backing is not None
    hole, data, zero = ExtentKind.HOLE, ExtentKind.DATA, ExtentKind.ZERO
    assert tiles == [
        (0, 1024 * KiB, hole),
        (1024 * KiB, 128 * KiB, data),  # 100k written: two whole clusters
        (1152 * KiB, 896 * KiB, hole),
        (2048 * KiB, 64 * KiB, zero),  # a zero cluster over the base's data
        (2112 * KiB, 1472 * KiB, hole),  # the base's zeroes are the base's too
        (3584 * KiB, 64 * KiB, data),
        (3648 * KiB, 448 * KiB, hole),
        (4096 * KiB, 128 * KiB, zero),  # zero clusters over the base's zeroes
        (4224 * KiB, 896 * KiB, hole),
        (5120 * KiB, 64 * KiB, data),
        (5184 * KiB, 416 * KiB, hole),  # up to the base's end, inside a cluster
        (5600 * KiB, 1568 * KiB, zero),  # past it: unallocated and a zero cluster
        (7168 * KiB, 64 * KiB, data),
        (7232 * KiB, 960 * KiB, zero),
    ]


async def test_layer_status_without_backing(tmp_path: Path) -> None:
    img = make_qed(tmp_path / "a.qed", "4M", *MIXED)
    async with trioconv.open_image(img) as drv:
        tiles = await layer_tiles(drv)
        assert tiles == await check_block_status_tiles(drv)
    assert ExtentKind.HOLE not in {k for _, _, k in tiles}


@pytest.mark.parametrize(
    ("qed_options", "extra"),
    [
        pytest.param("", [], id="default"),
        pytest.param("", ["-o", "compat=0.10"], id="compat-0.10"),
        pytest.param("", ["-S", "0"], id="S0"),
        pytest.param("", ["-o", "cluster_size=4k"], id="target-4k"),
        pytest.param("", ["-o", "cluster_size=2M"], id="target-2M"),
        pytest.param("", ["-m", "1"], id="m1"),
        pytest.param("cluster_size=4k", [], id="qed-4k"),
        # 1 MiB clusters: the top layer holds big runs of data with zeroes inside, so
        # one copy job makes several writes; in-order mode keeps them all ahead of the
        # next job's, so host offsets match qemu-img's at -m 8 too.
        pytest.param("cluster_size=1M,table_size=2", [], id="qed-1M"),
        pytest.param("cluster_size=1M,table_size=2", ["-m", "16"], id="qed-1M-m16"),
    ],
)
@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_convert_overlay_like_qemu(
    tmp_path: Path, base_fmt: str, qed_options: str, extra: list[str]
) -> None:
    """``convert -B`` of a qed overlay: what the top layer does not hold stays with the
    backing file, exactly as qemu-img leaves it (same map, same host offsets)."""
    img = make_overlay(tmp_path, base_fmt, qed_options)
    base = f"base.{base_fmt}"
    args = ["-O", "qcow2", *extra, "-B", base, "-F", base_fmt]
    theirs, ours = tmp_path / "theirs.qcow2", tmp_path / "ours.qcow2"
    run("qemu-img", "convert", *args, img, theirs)
    result = trioconv_cli("convert", *args, img, ours)
    assert result.returncode == 0, result.stderr
    assert_identical(img, ours, "qed", "qcow2")
    check = run("qemu-img", "check", "--output=json", "-f", "qcow2", ours, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert qemu_map(ours, "qcow2") == qemu_map(theirs, "qcow2")
    info = json.loads(run("qemu-img", "info", "--output=json", ours).stdout)
    assert (info["backing-filename"], info["backing-filename-format"]) == (base, base_fmt)
    if extra != ["-o", "cluster_size=2M"] and qed_options != "cluster_size=1M,table_size=2":
        # The base shows through where the overlay holds nothing.
        assert any(e["depth"] == 1 and e["data"] for e in qemu_map(ours, "qcow2"))


def test_convert_overlay_onto_other_base(tmp_path: Path) -> None:
    """A target backing file shorter than the source's: past its end the top layer's
    zeroes are left alone too, as qemu-img does."""
    img = make_overlay(tmp_path)
    short = make_raw(tmp_path / "short.raw", "3M", "write -P 0x11 0 3M")
    args = ["-O", "qcow2", "-B", short.name, "-F", "raw"]
    theirs, ours = tmp_path / "theirs.qcow2", tmp_path / "ours.qcow2"
    run("qemu-img", "convert", *args, img, theirs)
    result = trioconv_cli("convert", *args, img, ours)
    assert result.returncode == 0, result.stderr
    assert qemu_map(ours, "qcow2") == qemu_map(theirs, "qcow2")
    assert ours.read_bytes() == theirs.read_bytes()


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


def test_writing_is_refused_the_same_way_with_and_without_n(tmp_path: Path) -> None:
    src = make_raw(tmp_path / "src.img", "1M")
    target = tmp_path / "t.qed"
    run("qemu-img", "create", "-q", "-f", "qed", target, "1M")
    before = target.read_bytes()
    runs: list[list[str | Path]] = [
        ["-n", "-O", "qed", src, target],
        ["-O", "qed", src, tmp_path / "new.qed"],
    ]
    for args in runs:
        result = trioconv_cli("convert", *args)
        assert result.returncode == 1
        assert result.stderr == "trioconv: Format 'qed' is not supported for writing yet\n"
    assert target.read_bytes() == before
    assert not (tmp_path / "new.qed").exists()


def test_many_runs_convert_in_linear_time(tmp_path: Path, qemu_img: str) -> None:
    """Block status looks at a few runs at a time: an image of thousands of runs (here
    256 L1 entries sharing one fragmented L2 table, which qemu-img reads) converts in
    seconds, not minutes, and as qemu-img converts it."""
    img = make_qed(
        tmp_path / "frag.qed",
        "2M",
        "write -P 0x11 0 64k",
        "write -P 0x22 1M 100k",
        "write -P 0x44 300k 3k",
        options="cluster_size=4096,table_size=2",
    )
    raw = bytearray(img.read_bytes())
    cluster, tables = struct.unpack_from("<II", raw, 4)
    l1 = struct.unpack_from("<Q", raw, 40)[0]
    entry = raw[l1 : l1 + 8]
    raw[l1 : l1 + 8 * 256] = entry * 256
    struct.pack_into("<Q", raw, 48, 256 * (cluster * tables // 8) * cluster)  # image size
    img.write_bytes(raw)
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    result = trioconv_cli("convert", "-O", "raw", img, ours)  # (took minutes before)
    assert result.returncode == 0, result.stderr
    run(qemu_img, "convert", "-f", "qed", "-O", "raw", img, theirs)
    assert_identical(ours, theirs)

    # In-process: a walk of block status looks at a few runs per extent, not at every
    # run to the end of its window.
    looked = 0
    runs = qed.QedDriver._runs

    async def counting(self: qed.QedDriver, *args: Any, **kwargs: Any) -> Any:
        nonlocal looked
        found = await runs(self, *args, **kwargs)
        looked += len(found)
        return found

    async def walk() -> int:
        async with trioconv.open_image(img, "qed") as drv:
            return len(await check_block_status_tiles(drv))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(qed.QedDriver, "_runs", counting)
        extents = trio.run(walk)
    assert looked <= 20 * extents

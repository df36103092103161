"""VMDK: images made by qemu-img/qemu-io read by trioconv, images made by trioconv read by qemu.

Reading: every subformat qemu-img creates, filled with qemu-io, and streamOptimized
images converted by qemu-img, are converted to raw and ``qemu-img compare`` must find
them identical; block status must tile the image and cover what ``qemu-img map`` calls
data. Hand-written descriptors (several extents, flat extents at offsets) and a
VMware-style stream (grain directory and footer at the end) are read against qemu.

Writing: every output subformat, in order, with ``-W`` and with ``-c``, must be
identical to its source and pass ``qemu-img check``; the defaults and options must give
what ``qemu-img convert -O vmdk`` gives (``qemu-img info``, the descriptor's disk
database). Broken images are made by patching real ones; each must be refused with a
message that names what is wrong. The codecs get property tests.
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import sys
import zlib
from pathlib import Path
from typing import Any

import attrs
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

import trioconv
from trioconv import ExtentKind, ImageError, UnsupportedError, UsageError
from trioconv._open import OpenContext
from trioconv.formats.vmdk import VmdkDriver, create_vmdk, parse_create_options
from trioconv.formats.vmdk import _codec as codec
from trioconv.protocols.memory import MemoryDriver
from trioconv.testing import check_block_status_tiles

from .conftest import (
    assert_identical,
    create_filled,
    make_raw,
    qemu_map,
    require_tool,
    run,
    trioconv_cli,
)
from .nbd_servers import QemuNbdLauncher

MiB = 1024 * 1024
SUBFORMATS = [
    "monolithicSparse",
    "monolithicFlat",
    "twoGbMaxExtentSparse",
    "twoGbMaxExtentFlat",
    "streamOptimized",
]

MIXED = (
    "write -P 0xab 0 300k",
    "write -P 0x11 1M 1M",
    "write -P 0x22 2500k 4k",
    "write -P 0x33 3M 1536",  # small and unaligned
    "write -P 0 3500k 128k",  # allocated zeroes
    "write -P 0x44 4032k 64k",  # up to the end
)


# -- helpers ----------------------------------------------------------------------------


def make_vmdk(path: Path, size: str, *commands: str, options: str = "") -> Path:
    """``qemu-img create -f vmdk [-o options]``, then ``qemu-io`` commands.

    streamOptimized images cannot be written by qemu-io; they are converted from a
    monolithicSparse image filled the same way.
    """
    qemu_img = require_tool("qemu-img")
    if "subformat=streamOptimized" in options:
        staging = path.with_name(path.stem + "-staging.vmdk")
        make_vmdk(staging, size, *commands)
        run(qemu_img, "convert", "-f", "vmdk", "-O", "vmdk", "-o", options, staging, path)
        staging.unlink()
        return path
    return create_filled(path, "vmdk", size, *commands, options=options)


def qemu_info(path: Path) -> dict[str, Any]:
    out = run(require_tool("qemu-img"), "info", "--output=json", "-f", "vmdk", path).stdout
    return dict(json.loads(out))


def qemu_check(path: Path) -> None:
    result = run(require_tool("qemu-img"), "check", "-f", "vmdk", path, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No errors were found" in result.stdout


async def to_raw(src: Path, dst: Path, **opts: Any) -> None:
    await trioconv.convert([src], dst, trioconv.ConvertOptions(target_format="raw", **opts))


async def status_tiles(path: Path) -> list[tuple[int, int, ExtentKind]]:
    async with trioconv.open_image(path) as img:
        assert img.name == "vmdk"
        return await check_block_status_tiles(img)


def _inside(start: int, end: int, ranges: list[tuple[int, int]]) -> bool:
    pos = start
    for lo, hi in ranges:
        if lo <= pos < hi:
            pos = hi
        if pos >= end:
            return True
    return pos >= end


def patch(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


async def open_error(path: Path) -> str:
    with pytest.raises(trioconv.TrioconvError) as info:
        async with trioconv.open_image(path) as img:
            await img.pread(0, img.size)
    return str(info.value)


# -- reading what qemu made -------------------------------------------------------------


@pytest.mark.parametrize("subformat", SUBFORMATS)
async def test_read_subformats(tmp_path: Path, subformat: str) -> None:
    src = make_vmdk(tmp_path / "src.vmdk", "4M", *MIXED, options=f"subformat={subformat}")
    dst = tmp_path / "dst.raw"
    await to_raw(src, dst)
    assert dst.stat().st_size == 4 * MiB
    assert_identical(src, dst, "vmdk", "raw")
    tiles = await status_tiles(src)
    content = dst.read_bytes()
    for offset, n, kind in tiles:
        if kind is not ExtentKind.DATA:
            assert content[offset : offset + n] == bytes(n), f"ZERO at {offset}+{n} is not"
    if "Flat" not in subformat:  # qemu maps flat extents as data throughout
        ours = [(o, o + n) for o, n, k in tiles if k is ExtentKind.DATA]
        for e in qemu_map(src, "vmdk"):
            if e["data"]:
                lo, hi = int(e["start"]), int(e["start"]) + int(e["length"])
                assert _inside(lo, hi, ours), f"qemu says data at {lo}..{hi}; we say {tiles}"
    if subformat in ("monolithicSparse", "streamOptimized", "twoGbMaxExtentSparse"):
        # Unallocated grains are ZERO, never DATA.
        assert any(k is ExtentKind.ZERO for _, _, k in tiles)


@pytest.mark.parametrize("subformat", ["twoGbMaxExtentSparse", "twoGbMaxExtentFlat"])
async def test_read_across_extent_boundaries(tmp_path: Path, subformat: str) -> None:
    src = make_vmdk(
        tmp_path / "big.vmdk",
        "5G",
        "write -P 0x51 2047M 2M",  # straddles the first 2 GiB boundary
        "write -P 0x52 4095M 1M",
        "write -P 0x53 5119M 1M",
        options=f"subformat={subformat}",
    )
    async with trioconv.open_image(src) as img:
        assert isinstance(img, VmdkDriver)
        assert len(img.extents) == 3
        got = await img.pread(2047 * MiB, 2 * MiB)
        assert got == b"\x51" * (2 * MiB)
        assert await img.pread(5119 * MiB, MiB) == b"\x53" * MiB
        assert await img.pread(3 * 1024 * MiB, 4096) == bytes(4096)
        tiles = await check_block_status_tiles(img)
    data = sum(n for _, n, k in tiles if k is ExtentKind.DATA)
    assert 4 * MiB <= data <= 8 * MiB


async def test_read_zeroed_grains(tmp_path: Path) -> None:
    src = make_vmdk(
        tmp_path / "z.vmdk",
        "4M",
        "write -P 0x77 0 1M",
        "write -z 256k 256k",  # whole grains: zeroed-grain entries
        options="zeroed_grain=on",
    )
    dst = tmp_path / "z.raw"
    await to_raw(src, dst)
    assert_identical(src, dst, "vmdk", "raw")
    tiles = await status_tiles(src)
    assert (256 * 1024, 256 * 1024, ExtentKind.ZERO) in tiles


async def test_read_cli_and_info(tmp_path: Path) -> None:
    src = make_vmdk(tmp_path / "c.vmdk", "2M", "write -P 0x5a 0 64k")
    result = trioconv_cli("convert", "-O", "raw", src, tmp_path / "c.raw")
    assert result.returncode == 0, result.stderr
    assert_identical(src, tmp_path / "c.raw", "vmdk", "raw")
    async with trioconv.open_image(src) as img:
        assert isinstance(img, VmdkDriver)
        assert img.info.create_type == "monolithicSparse"
        assert img.info.parent_cid == 0xFFFFFFFF
        assert img.info.cid == qemu_info(src)["format-specific"]["data"]["cid"]


def _basenames(value: Any) -> Any:
    """Filenames reduced to their last component, everywhere in an info dict."""
    if isinstance(value, dict):
        return {
            k: os.path.basename(v) if k == "filename" else _basenames(v) for k, v in value.items()
        }
    if isinstance(value, list):
        return [_basenames(v) for v in value]
    return value


@pytest.mark.parametrize("subformat", SUBFORMATS)
def test_info_matches_qemu(tmp_path: Path, subformat: str) -> None:
    src = make_vmdk(tmp_path / "i.vmdk", "3G", "write -P 1 0 64k", options=f"subformat={subformat}")
    ours = trioconv_cli("info", "--output", "json", src)
    assert ours.returncode == 0, ours.stderr
    assert _basenames(json.loads(ours.stdout)) == _basenames(qemu_info(src))


async def test_hand_written_descriptor(tmp_path: Path) -> None:
    """FLAT at an offset, SPARSE, VMFS, and a non-RW extent that qemu skips."""
    flat = tmp_path / "flat.bin"
    flat.write_bytes(os.urandom(300 * 512))
    sparse = make_vmdk(tmp_path / "sparse.vmdk", "1M", "write -P 0x61 64k 100k")
    vmfs = tmp_path / "vmfs.bin"
    vmfs.write_bytes(b"\x62" * (50 * 512))
    desc = tmp_path / "multi.vmdk"
    desc.write_text(
        "# Disk DescriptorFile\n"
        "version=1\n"
        "CID=12345678\n"
        "parentCID=ffffffff\n"
        'createType="monolithicFlat"\n'
        "\n"
        "# Extent description\n"
        'RW 200 FLAT "flat.bin" 100\n'
        'RDONLY 10 FLAT "flat.bin" 0\n'
        f'RW 2048 SPARSE "{sparse.name}"\n'
        'RW 64 VMFS "vmfs.bin"\n'  # 14 sectors past the file's end: zeroes
        "\n"
        'ddb.adapterType = "ide"\n'
    )
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    await to_raw(desc, ours)
    run(require_tool("qemu-img"), "convert", "-f", "vmdk", "-O", "raw", desc, theirs)
    assert ours.read_bytes() == theirs.read_bytes()
    assert ours.stat().st_size == (200 + 2048 + 64) * 512
    assert ours.read_bytes()[: 200 * 512] == flat.read_bytes()[100 * 512 : 300 * 512]
    async with trioconv.open_image(desc) as img:
        assert isinstance(img, VmdkDriver)
        assert img.info.cid == 0x12345678
        assert [e.kind for e in img.extents] == ["FLAT", "SPARSE", "VMFS"]
        await check_block_status_tiles(img)
    # info as qemu-img gives it: extents of different kinds have no one cluster size
    # (and then no dirty flag either), and a file is counted once per extent in it.
    for output in ("json", "human"):
        mine = trioconv_cli("info", "--output", output, desc)
        assert mine.stdout == run("qemu-img", "info", "--output", output, desc).stdout
    assert "cluster-size" not in json.loads(trioconv_cli("info", "--output=json", desc).stdout)


def _vmware_stream(grains: dict[int, bytes], capacity: int) -> bytes:
    """A streamOptimized file as VMware writes it: GTs, GD and footer at the end."""
    grain = 64 * 1024
    header = codec.SparseHeader(
        version=3,
        flags=codec.FLAG_NL_DETECT | codec.FLAG_COMPRESS | codec.FLAG_MARKER,
        capacity=capacity // 512,
        granularity=128,
        desc_offset=1,
        desc_size=20,
        num_gtes_per_gt=512,
        rgd_offset=0,
        gd_offset=codec.GD_AT_END,
        grain_offset=128,
        compress_algorithm=codec.COMPRESSION_DEFLATE,
    )
    desc = codec.format_descriptor(
        codec.Descriptor(
            cid=0xABC,
            create_type="streamOptimized",
            extents=(codec.ExtentLine("RW", capacity // 512, "SPARSE", "x.vmdk"),),
        )
    ).encode()
    out = bytearray(header.encode() + desc.ljust(20 * 512, b"\0"))
    out += bytes(128 * 512 - len(out))
    gt_count = -(-capacity // (grain * 512))
    gts = [[0] * 512 for _ in range(gt_count)]
    for index in sorted(grains):
        gts[index // 512][index % 512] = len(out) // 512
        record = codec.grain_marker(index * 128, zlib.compress(grains[index]))
        out += record + bytes(-len(record) % 512)
    gd = []
    for table in gts:
        out += struct.pack("<QII", 4, 0, codec.MARKER_GT) + bytes(496)
        gd.append(len(out) // 512)
        out += codec.encode_table(table)
    out += struct.pack("<QII", 1, 0, codec.MARKER_GD) + bytes(496)
    gd_sector = len(out) // 512
    out += codec.encode_table(gd).ljust(512, b"\0")
    footer = attrs.evolve(header, gd_offset=gd_sector)
    out += struct.pack("<QII", 1, 0, codec.MARKER_FOOTER) + bytes(496)
    out += footer.encode()
    out += struct.pack("<QII", 0, 0, codec.MARKER_EOS) + bytes(496)
    return bytes(out)


async def test_read_stream_with_footer(tmp_path: Path) -> None:
    grains = {0: os.urandom(65536), 5: b"\x42" * 65536, 600: os.urandom(65536)}
    src = tmp_path / "vmware.vmdk"
    src.write_bytes(_vmware_stream(grains, 64 * MiB))
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    await to_raw(src, ours)
    run(require_tool("qemu-img"), "convert", "-f", "vmdk", "-O", "raw", src, theirs)
    assert ours.read_bytes() == theirs.read_bytes()
    tiles = await status_tiles(src)
    assert sum(n for _, n, k in tiles if k is ExtentKind.DATA) == 3 * 65536
    # A stream with its GD at the end can only be read.
    with pytest.raises(UnsupportedError, match="only be read"):
        async with trioconv.open_image(src, writable=True):
            pass


# -- writing, checked by qemu -----------------------------------------------------------


@pytest.mark.parametrize("mode", ["in-order", "-W", "-c", "-S512"])
@pytest.mark.parametrize("subformat", SUBFORMATS)
async def test_write_subformats(tmp_path: Path, subformat: str, mode: str) -> None:
    src = make_raw(tmp_path / "src.raw", "4M", *MIXED, "write -P 0x99 1000 2000")
    dst = tmp_path / "dst.vmdk"
    opts: dict[str, Any] = {"target_format": "vmdk", "target_options": {"subformat": subformat}}
    if mode == "-W":
        opts.update(oob_writes=True, parallel=16, buffer_size=128 * 1024)
    elif mode == "-c":
        opts.update(compress=True)
    elif mode == "-S512":
        opts.update(sparse_size=512, buffer_size=256 * 1024)
    if mode == "-c" and "Flat" in subformat:
        # qemu-img refuses -c for flat subformats the same way: they have no grains.
        with pytest.raises(trioconv.ConvertError, match="invalid cluster size"):
            await trioconv.convert([src], dst, trioconv.ConvertOptions(**opts))
        return
    await trioconv.convert([src], dst, trioconv.ConvertOptions(**opts))
    assert_identical(src, dst, "raw", "vmdk")
    qemu_check(dst)
    info = qemu_info(dst)
    assert info["format-specific"]["data"]["create-type"] == subformat
    if subformat == "streamOptimized" and mode != "-W":
        # Grains follow each other in the file in guest order: written as a stream.
        raw = dst.read_bytes()
        header = codec.parse_header(raw[:512])
        gd = codec.decode_table(raw[header.gd_offset * 512 :][:4])
        gt = codec.decode_table(raw[gd[0] * 512 :][: 512 * 4])
        used = [sector for sector in gt if sector]
        assert used == sorted(used) and len(used) > 10


async def test_write_split_extents(tmp_path: Path) -> None:
    """A 5 GiB sparse source becomes three extents; qemu reads them as one disk."""
    src = make_raw(
        tmp_path / "src.raw", "5G", "write -P 1 2047M 2M", "write -P 2 5119M 1M", "write -P 3 0 1k"
    )
    for subformat in ("twoGbMaxExtentSparse", "twoGbMaxExtentFlat"):
        dst = tmp_path / f"{subformat}.vmdk"
        await trioconv.convert(
            [src],
            dst,
            trioconv.ConvertOptions(target_format="vmdk", target_options={"subformat": subformat}),
        )
        assert_identical(src, dst, "raw", "vmdk")
        qemu_check(dst)
        letter = "f" if "Flat" in subformat else "s"
        assert sorted(p.name for p in tmp_path.glob(f"{subformat}-{letter}*.vmdk")) == [
            f"{subformat}-{letter}00{i}.vmdk" for i in (1, 2, 3)
        ]


def _comparable_info(path: Path) -> dict[str, Any]:
    info = qemu_info(path)
    info.pop("filename")
    info.pop("actual-size", None)
    data = info["format-specific"]["data"]
    data.pop("cid")
    data.pop("parent-cid")
    for extent in data["extents"]:
        extent.pop("filename")
    return info


def _ddb(path: Path) -> list[str]:
    text = path.read_bytes()
    if text[:4] == codec.MAGIC:
        text = text[512 : 21 * 512]
    lines = text.split(b"\0", 1)[0].decode().splitlines()
    return [line for line in lines if line.startswith(("ddb.", "version", "parentCID", "create"))]


@pytest.mark.parametrize(
    "options",
    [
        "",
        "subformat=streamOptimized",
        "subformat=monolithicFlat",
        "subformat=twoGbMaxExtentSparse",
        "subformat=twoGbMaxExtentFlat",
        "adapter_type=lsilogic",
        "adapter_type=legacyESX,hwversion=7,toolsversion=10286",
        "compat6=on",
        "hwversion=",
        "zeroed_grain=on",
        "subformat=streamOptimized,zeroed_grain=on,adapter_type=buslogic",
    ],
)
async def test_defaults_match_qemu(tmp_path: Path, options: str) -> None:
    src = make_raw(tmp_path / "src.raw", "3000k", "write -P 0x21 0 100k", "write -P 3 2M 64k")
    (tmp_path / "q").mkdir()
    (tmp_path / "t").mkdir()
    theirs, ours = tmp_path / "q" / "img.vmdk", tmp_path / "t" / "img.vmdk"
    args: list[str | os.PathLike[str]] = [require_tool("qemu-img"), "convert", "-O", "vmdk"]
    cli: list[str | os.PathLike[str]] = ["convert", "-O", "vmdk"]
    if options:
        args += ["-o", options]
        cli += ["-o", options]
    run(*args, src, theirs)
    result = trioconv_cli(*cli, src, ours)
    assert result.returncode == 0, result.stderr
    assert _comparable_info(ours) == _comparable_info(theirs)
    assert _ddb(ours) == _ddb(theirs)
    assert sorted(p.name for p in ours.parent.iterdir()) == sorted(
        p.name for p in theirs.parent.iterdir()
    )
    assert_identical(src, ours, "raw", "vmdk")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"subformat": "foo"}, "invalid parameter value: foo"),
        ({"adapter_type": "scsi"}, "invalid parameter value: scsi"),
        ({"compat6": "on", "hwversion": "7"}, "compat6 cannot be enabled with hwversion set"),
        ({"compat6": "maybe"}, "Parameter 'compat6' expects 'on' or 'off'"),
        ({"zeroed_grain": "x"}, "Parameter 'zeroed_grain' expects 'on' or 'off'"),
        ({"backing_fmt": "raw"}, "backing_file must be a vmdk image"),
    ],
)
def test_option_errors(options: dict[str, str], message: str) -> None:
    with pytest.raises(UsageError) as info:
        parse_create_options(options)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"subformat": "monolithicFlat", "zeroed_grain": "on"}, "Flat image can't enable zeroed"),
        ({"subformat": "monolithicFlat", "backing_file": "b.vmdk"}, "Flat image can't have"),
    ],
)
def test_option_refusals(options: dict[str, str], message: str) -> None:
    with pytest.raises(UnsupportedError, match=message):
        parse_create_options(options)


def test_option_defaults() -> None:
    opts = parse_create_options({"hwversion": "undefined", "compat6": "off"})
    assert (opts.subformat, opts.adapter_type, opts.hwversion, opts.toolsversion) == (
        "monolithicSparse",
        "ide",
        "4",
        "2147483647",
    )
    assert parse_create_options({"compat6": "on"}).hwversion == "6"


@pytest.mark.parametrize("subformat", ["monolithicFlat", "twoGbMaxExtentSparse"])
async def test_multi_file_needs_a_local_file(subformat: str) -> None:
    with pytest.raises(UnsupportedError, match="local file"):
        await create_vmdk(MemoryDriver(0), 4 * MiB, {"subformat": subformat})


async def test_cli_refuses_bad_option(tmp_path: Path) -> None:
    src = make_raw(tmp_path / "s.raw", "1M")
    result = trioconv_cli("convert", "-O", "vmdk", "-o", "subformat=bogus", src, tmp_path / "o")
    assert result.returncode == 1
    assert "invalid parameter value: bogus" in result.stderr


# -- the driver under concurrent writers --------------------------------------------------


class GrowingMemory(trioconv.Driver):
    """An in-memory file that grows when written past its end, as a local file does."""

    name = "file"

    def __init__(self, location: str) -> None:
        self.data = bytearray()
        self.location = location

    @property
    def size(self) -> int:
        return len(self.data)

    @property
    def caps(self) -> trioconv.Caps:
        return trioconv.Caps(writable=True, zero_init=True)

    async def preadinto(self, offset: int, buf: memoryview) -> None:
        await trio.lowlevel.checkpoint()
        got = self.data[offset : offset + buf.nbytes]
        buf[: len(got)] = got
        buf[len(got) :] = bytes(buf.nbytes - len(got))

    async def pwrite(self, offset: int, data: Any) -> None:
        view = bytes(memoryview(data).cast("B"))
        await trio.lowlevel.checkpoint()  # let other writers run in between
        if offset > len(self.data):
            self.data += bytes(offset - len(self.data))
        self.data[offset : offset + len(view)] = view

    async def aclose(self) -> None:
        pass


async def _memory_image(subformat: str, size: int) -> tuple[GrowingMemory, VmdkDriver, Any]:
    from trioconv.formats.vmdk import open_vmdk

    mem = GrowingMemory("mem.vmdk")
    await create_vmdk(mem, size, {"subformat": subformat})
    stack = contextlib.AsyncExitStack()
    ctx = OpenContext("mem.vmdk", (), stack)
    drv = await open_vmdk(mem, ctx)
    assert isinstance(drv, VmdkDriver)
    return mem, drv, stack


@pytest.mark.parametrize("subformat", ["monolithicSparse", "streamOptimized"])
async def test_concurrent_unaligned_writes(tmp_path: Path, subformat: str) -> None:
    """Many tasks write overlapping-free, unaligned pieces into the same new grains."""
    size = 2 * MiB
    expect = bytearray(size)
    pieces = []
    pos = 0
    rng = __import__("random").Random(7)
    while pos < size:
        n = min(rng.choice([512, 1000, 4096, 70000, 131072]), size - pos)
        if rng.random() < 0.7:
            data = rng.randbytes(n)
            pieces.append((pos, data))
            expect[pos : pos + n] = data
        pos += n
    rng.shuffle(pieces)
    mem, drv, stack = await _memory_image(subformat, size)
    async with stack:
        async with trio.open_nursery() as nursery:
            for offset, data in pieces:
                nursery.start_soon(drv.pwrite, offset, data)
        await drv.flush()
        if subformat == "monolithicSparse":
            assert await drv.pread(0, size) == bytes(expect)
    path = tmp_path / "img.vmdk"
    path.write_bytes(bytes(mem.data))
    raw = tmp_path / "expect.raw"
    raw.write_bytes(bytes(expect))
    assert_identical(raw, path, "raw", "vmdk")
    qemu_check(path)


async def test_check_driver_contract(tmp_path: Path) -> None:
    path = tmp_path / "c.vmdk"
    await trioconv.create_image(path, "vmdk", 4 * MiB, {"zeroed_grain": "on"})
    async with trioconv.open_image(path, writable=True) as img:
        await trioconv.testing.check_driver(img)
        await img.flush()
    qemu_check(path)


async def test_stream_refuses_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "s.vmdk"
    await trioconv.create_image(path, "vmdk", 1 * MiB, {"subformat": "streamOptimized"})
    async with trioconv.open_image(path, writable=True) as img:
        await img.pwrite(0, b"\x01" * 65536)
        with pytest.raises(UnsupportedError, match="Could not write to allocated cluster"):
            await img.pwrite(0, b"\x02" * 65536)


async def test_write_into_existing_image(tmp_path: Path) -> None:
    """``-n``: a qemu-made image is opened writable, partly overwritten, and qemu agrees."""
    dst = make_vmdk(tmp_path / "n.vmdk", "4M", "write -P 0x10 0 1M")
    src = make_raw(tmp_path / "n.raw", "4M", "write -P 0x20 512k 1M", "write -P 0x30 3M 4k")
    await trioconv.convert(
        [src], dst, trioconv.ConvertOptions(target_format="vmdk", no_create=True)
    )
    assert_identical(src, dst, "raw", "vmdk")
    qemu_check(dst)


@pytest.mark.parametrize("subformat", ["monolithicSparse", "streamOptimized"])
async def test_read_over_nbd(
    tmp_path: Path, qemu_nbd_server: QemuNbdLauncher, subformat: str
) -> None:
    src = make_vmdk(tmp_path / "n.vmdk", "4M", *MIXED, options=f"subformat={subformat}")
    server = qemu_nbd_server(src, fmt="raw", readonly=True)  # the vmdk file's own bytes
    out = tmp_path / "out.raw"
    await trioconv.convert([server.uri], out)
    assert_identical(src, out, "vmdk", "raw")
    async with trioconv.open_image(server.uri) as img:
        assert img.name == "vmdk" and img.size == 4 * MiB
        await check_block_status_tiles(img)


async def test_descriptor_over_nbd_is_refused(
    tmp_path: Path, qemu_nbd_server: QemuNbdLauncher
) -> None:
    desc = make_vmdk(tmp_path / "d.vmdk", "1M", options="subformat=monolithicFlat")
    server = qemu_nbd_server(desc, fmt="raw", readonly=True)
    result = trioconv_cli("convert", "-f", "vmdk", "-O", "raw", server.uri, tmp_path / "o.raw")
    assert result.returncode == 1
    assert "Cannot use relative paths with VMDK descriptor file" in result.stderr


async def test_new_grains_need_growable_storage() -> None:
    """Over storage of fixed size (NBD, a block device) appending grains is refused."""
    from trioconv.formats.vmdk import open_vmdk

    mem = MemoryDriver(128 * 1024, location="fixed.vmdk")
    await create_vmdk(mem, 4 * MiB, {})
    async with contextlib.AsyncExitStack() as stack:
        drv = await open_vmdk(mem, OpenContext("fixed.vmdk", (), stack))
        with pytest.raises(UnsupportedError, match="cannot grow"):
            await drv.pwrite(0, b"x" * 512)


async def test_stream_partial_grains_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from trioconv.formats.vmdk import _extents

    monkeypatch.setattr(_extents, "MAX_PARTIAL_BYTES", 3 * 65536)
    _, drv, stack = await _memory_image("streamOptimized", 4 * MiB)
    async with stack:
        for grain in range(3):
            await drv.pwrite(grain * 65536, b"\x01" * 512)
        with pytest.raises(UnsupportedError, match="whole grains"):
            await drv.pwrite(3 * 65536, b"\x01" * 512)
        # Completing a grain frees its place.
        await drv.pwrite(512, b"\x01" * (65536 - 512))
        await drv.pwrite(3 * 65536, b"\x01" * 512)


# -- broken images ----------------------------------------------------------------------


@pytest.fixture
def sparse(tmp_path: Path) -> Path:
    return make_vmdk(tmp_path / "broken.vmdk", "4M", "write -P 0x11 0 1M")


@pytest.mark.parametrize(
    ("offset", "data", "message"),
    [
        (4, struct.pack("<I", 4), "Unsupported VMDK version 4"),
        (0x38, struct.pack("<Q", 1 << 40), "grain directory at offset"),
        (0x30, struct.pack("<Q", 1 << 40), "redundant grain directory"),
        (0x14, struct.pack("<Q", 0x400000), "Invalid granularity"),
        (0x14, struct.pack("<Q", 0), "L1 entry size is invalid"),
        (0x2C, struct.pack("<I", 1024), "L2 table size too big"),
        (0x40, struct.pack("<Q", 1 << 30), "File truncated"),
        (0x0C, struct.pack("<Q", 1 << 62), "L1 size too big"),
    ],
)
async def test_corrupt_headers(sparse: Path, offset: int, data: bytes, message: str) -> None:
    patch(sparse, offset, data)
    error = await open_error(sparse)
    assert message in error
    assert str(sparse) in error


async def test_grain_table_entry_beyond_eof(sparse: Path) -> None:
    header = codec.parse_header(sparse.read_bytes()[:512])
    gd = codec.decode_table(sparse.read_bytes()[header.gd_offset * 512 :][:4])
    patch(sparse, gd[0] * 512, struct.pack("<I", 1 << 30))  # the first grain's entry
    error = await open_error(sparse)
    assert "beyond the end of the file" in error


async def test_broken_compressed_grain(tmp_path: Path) -> None:
    src = make_vmdk(
        tmp_path / "s.vmdk", "1M", "write -P 1 0 64k", options="subformat=streamOptimized"
    )
    header = codec.parse_header(src.read_bytes()[:512])
    patch(src, header.grain_offset * 512 + 12, b"garbage!" * 8)
    error = await open_error(src)
    assert "could not be decompressed" in error


async def test_grain_size_too_small_for_its_grains(tmp_path: Path) -> None:
    """A stream whose grains inflate to more than the header's grain size is refused,
    as qemu refuses it, not cut short into wrong data."""
    src = make_vmdk(
        tmp_path / "s.vmdk",
        "4M",
        "write -P 0x11 0 64k",
        "write -P 0x22 1M 64k",
        options="subformat=streamOptimized",
    )
    patch(src, 20, struct.pack("<Q", 8))  # grain size: 8 sectors instead of 128
    assert "could not be decompressed" in await open_error(src)
    assert run("qemu-img", "convert", "-O", "raw", src, tmp_path / "q.raw", check=False).returncode


async def test_descriptor_past_the_end_is_ignored(tmp_path: Path) -> None:
    """An embedded descriptor whose offset lies past the end of the file reads as none,
    as with qemu (no traceback for an offset no file can have)."""
    src = make_vmdk(tmp_path / "m.vmdk", "4M", "write -P 5 0 64k")
    patch(src, 28, struct.pack("<Q", 1 << 55))
    dst = tmp_path / "out.raw"
    await to_raw(src, dst)
    assert_identical(src, dst, "vmdk", "raw")


async def test_extents_larger_than_any_file_are_refused(tmp_path: Path) -> None:
    desc = make_vmdk(tmp_path / "d.vmdk", "4M", options="subformat=monolithicFlat")
    desc.write_text(desc.read_text().replace("RW 8192 FLAT", "RW 18014398509481984 FLAT"))
    assert "the image is too large" in await open_error(desc)
    result = trioconv_cli("convert", "-f", "vmdk", "-O", "raw", desc, tmp_path / "t.raw")
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
    assert not (tmp_path / "t.raw").exists()


# -- delta disks (parentFileNameHint) ----------------------------------------------------


def _delta_chain(tmp_path: Path) -> Path:
    """base (8M) <- mid (8M) <- top (12M, larger than its parent), each written by qemu-io."""
    qemu_img = require_tool("qemu-img")
    base = make_vmdk(tmp_path / "base.vmdk", "8M", "write -P 1 0 4M", "write -P 4 7M 1M")
    mid = tmp_path / "mid.vmdk"
    run(qemu_img, "create", "-q", "-f", "vmdk", "-b", base.name, "-F", "vmdk", mid)
    run("qemu-io", "-f", "vmdk", "-c", "write -P 2 1M 64k", "-c", "write -z 2M 64k", mid)
    top = tmp_path / "top.vmdk"
    run(qemu_img, "create", "-q", "-f", "vmdk", "-b", mid.name, "-F", "vmdk", top, "12M")
    run("qemu-io", "-f", "vmdk", "-c", "write -P 3 3M 1536", "-c", "write -P 5 9M 1M", top)
    return top


async def test_delta_disks_read_through_their_parents(tmp_path: Path) -> None:
    top = _delta_chain(tmp_path)
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    await to_raw(top, ours)
    run("qemu-img", "convert", "-f", "vmdk", "-O", "raw", top, theirs)
    assert ours.read_bytes() == theirs.read_bytes()
    assert_identical(top, ours, "vmdk", "raw")
    # info (and its chain) as qemu-img shows it, byte for byte
    for args in ([], ["--backing-chain"]):
        mine = trioconv_cli("info", "--output", "json", *args, top)
        qemu = run("qemu-img", "info", "--output", "json", *args, top)
        assert mine.stdout == qemu.stdout


async def test_delta_disk_to_an_overlay_keeps_the_parent_out(tmp_path: Path) -> None:
    """``-B`` onto the same parent: only what the delta disk holds is copied."""
    top = _delta_chain(tmp_path)
    mid = tmp_path / "mid.vmdk"
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    args = ["-f", "vmdk", "-O", "qcow2", "-B", mid.name, "-F", "vmdk"]
    result = trioconv_cli("convert", *args, top, ours)
    assert result.returncode == 0, result.stderr
    run("qemu-img", "convert", *args, top, theirs)
    assert_identical(top, ours, "vmdk", "qcow2")
    data = [(e["start"], e["length"]) for e in qemu_map(ours, "qcow2") if e["depth"] == 0]
    assert data == [(e["start"], e["length"]) for e in qemu_map(theirs, "qcow2") if e["depth"] == 0]


def test_n_into_a_delta_disk_copies_on_write_from_its_parent(tmp_path: Path) -> None:
    """Writing into a delta disk: a grain written in part gets its parent's bytes
    around the new ones (copy on write, as qemu does), zeroes are written as zeroes
    (an unwritten grain would show the parent)."""
    top = _delta_chain(tmp_path)
    copy = tmp_path / "top-qemu.vmdk"
    copy.write_bytes(top.read_bytes())
    src = make_raw(
        tmp_path / "src.raw", "12M", "write -P 7 100k 5000", "write -P 8 4M 1M", "write -z 0 64k"
    )
    # -n writes the whole source: what is zero in it becomes zero in the delta disk.
    result = trioconv_cli("convert", "-n", "-f", "raw", "-O", "vmdk", src, top)
    assert result.returncode == 0, result.stderr
    assert_identical(src, top, "raw", "vmdk")
    run("qemu-img", "check", "-q", top)


def test_a_delta_disk_whose_parent_changed_is_not_read_through(tmp_path: Path) -> None:
    """Writing to a parent gives it a new content ID; a delta disk made on it before
    (its parentCID the old ID) no longer reads through to it - qemu-img fails such a
    read too, and a conversion that would mix old and new data fails in one line.
    A delta disk that holds every grain itself still reads."""
    base = make_vmdk(tmp_path / "base.vmdk", "1M", "write -P 0x11 0 1M")
    child, whole = tmp_path / "child.vmdk", tmp_path / "whole.vmdk"
    for delta in (child, whole):
        run("qemu-img", "create", "-q", "-f", "vmdk", "-b", base.name, "-F", "vmdk", delta, "1M")
    run("qemu-io", "-f", "vmdk", "-c", "write -P 0x44 0 1M", whole)
    ok = tmp_path / "ok.raw"
    assert trioconv_cli("convert", "-O", "raw", child, ok).returncode == 0
    run("qemu-io", "-f", "vmdk", "-c", "write -P 0x33 0 4k", base)
    out = tmp_path / "out.raw"
    for argv in (["qemu-img"], [sys.executable, "-m", "trioconv"]):
        out.unlink(missing_ok=True)  # (qemu-img leaves its target behind)
        result = run(*argv, "convert", "-O", "raw", child, out, check=False)
        assert result.returncode == 1, (argv, result.stderr)
        assert "Invalid argument" in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "changed since the delta disk was made" in lines[0], lines
    assert not out.exists()
    assert trioconv_cli("convert", "-O", "raw", whole, out).returncode == 0
    assert out.read_bytes() == b"\x44" * MiB


@pytest.mark.parametrize("fmt", ["vmdk", "qcow2"])
def test_an_empty_backing_name_with_a_format_is_refused(tmp_path: Path, fmt: str) -> None:
    """``-B '' -F FMT``: a backing file given, and no image has that name (qemu-img 7.2
    crashes on it): one line, no target."""
    src = make_raw(tmp_path / "src.raw", "1M", "write -P 1 0 64k")
    out = tmp_path / f"out.{fmt}"
    result = trioconv_cli("convert", "-O", fmt, "-B", "", "-F", fmt, src, out)
    assert result.returncode == 1
    assert result.stderr == "trioconv: Could not open backing file '': No such file or directory\n"
    assert not out.exists()


def test_a_refused_n_leaves_the_vmdk_target_and_its_content_id_alone(tmp_path: Path) -> None:
    """The content ID changes at the first write, as in qemu: a ``-n`` conversion
    refused before it writes leaves the image byte for byte as it was (and delta disks
    made on it still read); one that writes gives it a new ID, so they no longer do."""
    base = make_vmdk(tmp_path / "base.vmdk", "1M", "write -P 0x11 0 1M")
    child = tmp_path / "child.vmdk"
    run("qemu-img", "create", "-q", "-f", "vmdk", "-b", base.name, "-F", "vmdk", child, "1M")
    before = base.read_bytes()
    big = make_raw(tmp_path / "big.raw", "2M", "write -P 0x22 0 2M")
    result = trioconv_cli("convert", "-n", "-O", "vmdk", big, base)
    assert result.returncode == 1 and "smaller" in result.stderr
    assert base.read_bytes() == before
    out = tmp_path / "out.raw"
    run("qemu-img", "convert", "-O", "raw", child, out)  # still reads through
    small = make_raw(tmp_path / "small.raw", "1M", "write -P 0x22 0 1M")
    result = trioconv_cli("convert", "-n", "-O", "vmdk", small, base)
    assert result.returncode == 0, result.stderr
    assert_identical(small, base, "raw", "vmdk")
    old = qemu_info(child)["format-specific"]["data"]["parent-cid"]
    assert qemu_info(base)["format-specific"]["data"]["cid"] != old
    result = run("qemu-img", "convert", "-O", "raw", child, out, check=False)
    assert result.returncode == 1 and "Invalid argument" in result.stderr


@pytest.mark.parametrize(
    "options",
    ["", "subformat=twoGbMaxExtentSparse", "zeroed_grain=on", "subformat=streamOptimized"],
)
def test_b_makes_a_delta_disk_as_qemu_img_does(tmp_path: Path, options: str) -> None:
    """``-O vmdk -B base.vmdk -F vmdk``: a delta disk naming its parent (CID and hint)
    that holds only what the source's top layer holds, grains written in part
    completed from the parent - the layout qemu-img gives it."""
    base = make_vmdk(tmp_path / "base.vmdk", "4M", "write -P 1 0 2M", "write -P 9 3M 512k")
    src = tmp_path / "src.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "vmdk", src)
    run(
        "qemu-io",
        "-f",
        "qcow2",
        "-c",
        "write -P 2 512k 100k",
        "-c",
        "write -z 1536k 64k",
        "-c",
        "write -P 3 3M 4k",
        src,
    )
    args = ["-O", "vmdk", "-B", base.name, "-F", "vmdk"]
    if options:
        args += ["-o", options]
    if "streamOptimized" in options:
        args.append("-c")
    ours, theirs = tmp_path / "ours.vmdk", tmp_path / "theirs.vmdk"
    result = trioconv_cli("convert", *args, src, ours)
    assert result.returncode == 0, result.stderr
    run("qemu-img", "convert", *args, src, theirs)
    assert_identical(src, ours, "qcow2", "vmdk")
    run("qemu-img", "check", "-q", ours)
    info = json.loads(trioconv_cli("info", "--output", "json", ours).stdout)
    base_cid = json.loads(run("qemu-img", "info", "--output=json", base).stdout)["format-specific"][
        "data"
    ]["cid"]
    assert info["backing-filename"] == base.name
    assert info["format-specific"]["data"]["parent-cid"] == base_cid

    def layout(path: Path) -> list[tuple[int, int, bool]]:
        return [
            (e["start"], e["length"], e["data"]) for e in qemu_map(path, "vmdk") if e["depth"] == 0
        ]

    assert layout(ours) == layout(theirs)


@pytest.mark.parametrize("cluster", ["512", "4k", "64k,extended_l2=on"])
def test_b_completes_grains_written_in_part_from_the_parent(tmp_path: Path, cluster: str) -> None:
    """A source whose top layer holds pieces smaller than a 64 KiB grain (small
    clusters, subclusters): the delta disk's grain gets the new bytes and, around them,
    its parent's - not zeroes."""
    base = make_vmdk(tmp_path / "base.vmdk", "1M", "write -P 0x77 0 1M")
    src = tmp_path / "src.qcow2"
    opts = f"cluster_size={cluster}"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, "-b", base.name, "-F", "vmdk", src)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 30720 4096", "-c", "write -z 512k 4k", src)
    ours = tmp_path / "ours.vmdk"
    args: list[str | Path] = ["-O", "vmdk", "-B", base.name, "-F", "vmdk", src, ours]
    result = trioconv_cli("convert", *args)
    assert result.returncode == 0, result.stderr
    assert_identical(src, ours, "qcow2", "vmdk")
    run("qemu-img", "check", "-q", ours)


def zeroed_delta(path: Path, base: Path) -> None:
    """A new delta disk on ``base`` with zeroed-grain entries enabled, made by qemu-img."""
    opts = ["-o", "zeroed_grain=on", "-b", base.name, "-F", "vmdk"]
    run("qemu-img", "create", "-q", "-f", "vmdk", *opts, path)


def test_zeroed_grains_of_a_delta_disk_stay_zero(tmp_path: Path) -> None:
    """A zeroed grain reads as zeroes, not as the parent: a write into part of one
    completes it with zeroes (and a fresh delta disk is not pre-zeroed, as qemu-img
    does not, so its untouched grains keep showing the parent)."""
    base = make_vmdk(tmp_path / "base.vmdk", "1M", "write -P 1 0 1M")
    src = tmp_path / "src.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "vmdk", src)
    run("qemu-io", "-f", "qcow2", "-c", "write -z 0 64k", "-c", "write -P 2 4096 4096", src)
    delta = tmp_path / "delta.vmdk"
    zeroed_delta(delta, base)
    run("qemu-io", "-f", "vmdk", "-c", "write -z 0 64k", delta)
    result = trioconv_cli("convert", "-n", "-O", "vmdk", src, delta)
    assert result.returncode == 0, result.stderr
    assert_identical(src, delta, "qcow2", "vmdk")
    # A fresh zeroed_grain delta disk and a source of zeroes with a few bytes of data.
    fresh = tmp_path / "fresh.vmdk"
    zeroed_delta(fresh, base)
    zeros = make_raw(tmp_path / "zeros.raw", "1M", "write -P 7 200000 1000")
    result = trioconv_cli("convert", "-n", "-f", "raw", "-O", "vmdk", zeros, fresh)
    assert result.returncode == 0, result.stderr
    assert_identical(zeros, fresh, "raw", "vmdk")


def test_delta_descriptor_is_qemus(tmp_path: Path) -> None:
    base = make_vmdk(tmp_path / "base.vmdk", "1M", "write -P 1 0 64k")
    src = make_raw(tmp_path / "src.raw", "1M", "write -P 2 0 64k")
    texts = []
    for name, tool in (("ours.vmdk", "trioconv"), ("theirs.vmdk", "qemu-img")):
        args: list[str | Path] = [
            "convert",
            "-f",
            "raw",
            "-O",
            "vmdk",
            "-B",
            base.name,
            "-F",
            "vmdk",
            src,
            tmp_path / name,
        ]
        if tool == "trioconv":
            assert trioconv_cli(*args).returncode == 0
        else:
            run("qemu-img", *args)
        data = (tmp_path / name).read_bytes()
        start = data.index(b"# Disk DescriptorFile")
        text = data[start : data.index(b"\0", start)].decode()
        texts.append([line for line in text.splitlines() if not line.startswith(("CID=", "RW "))])
    assert texts[0] == texts[1]


def test_delta_disk_grains_are_laid_out_in_guest_order(tmp_path: Path) -> None:
    """A source whose top layer is mostly written zeroes (2 MiB qcow2 clusters): the
    zero runs are written as zeroes into the delta disk, every grain in guest order as
    qemu-img lays them out (a zero run split into grains must not let the next request
    take grains in between)."""
    size = "2936320"  # not a whole number of grains
    base = make_vmdk(
        tmp_path / "base.vmdk", size, "write -P 0xd9 720896 65536", "write -P 0xd7 1235880 3929"
    )
    src = tmp_path / "src.qcow2"
    run(
        "qemu-img",
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "cluster_size=2M",
        "-b",
        base.name,
        "-F",
        "vmdk",
        src,
        size,
    )
    writes = [
        "write -P 0xda 472267 114953",
        "write -P 0x11 2305620 56306",
        "write -P 0x12 2678669 82251",
        "write -z 2493952 166400",
        "write -P 0x13 524288 131072",
        "write -P 0x86 740352 77312",
        "write -P 0x48 1556480 120832",
    ]
    run("qemu-io", "-f", "qcow2", *[x for w in writes for x in ("-c", w)], src)
    args = ["-f", "qcow2", "-O", "vmdk", "-B", base.name, "-F", "vmdk"]
    ours, theirs = tmp_path / "ours.vmdk", tmp_path / "theirs.vmdk"
    result = trioconv_cli("convert", *args, src, ours)
    assert result.returncode == 0, result.stderr
    run("qemu-img", "convert", *args, src, theirs)
    assert_identical(src, ours, "qcow2", "vmdk")

    def layout(path: Path) -> list[tuple[int, int, int]]:
        return [
            (e["start"], e["length"], e["offset"])
            for e in qemu_map(path, "vmdk")
            if e["depth"] == 0
        ]

    assert layout(ours) == layout(theirs)


def test_b_refuses_a_parent_that_is_not_vmdk(tmp_path: Path) -> None:
    base = tmp_path / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "4M")
    src = make_raw(tmp_path / "src.raw", "4M", "write -P 7 0 1M")
    for fmt in ("qcow2", "vmdk"):
        result = trioconv_cli(
            "convert", "-O", "vmdk", "-B", base.name, "-F", fmt, src, tmp_path / "o.vmdk"
        )
        assert result.returncode == 1 and len(result.stderr.splitlines()) == 1, result.stderr
        assert "vmdk" in result.stderr
        assert not (tmp_path / "o.vmdk").exists()


async def test_missing_parent_of_a_delta_disk(tmp_path: Path) -> None:
    top = _delta_chain(tmp_path)
    (tmp_path / "mid.vmdk").unlink()
    assert "Could not open backing file" in await open_error(top)


async def test_bad_footer(tmp_path: Path) -> None:
    src = tmp_path / "f.vmdk"
    src.write_bytes(_vmware_stream({0: b"\x01" * 65536}, 1 * MiB))
    patch(src, src.stat().st_size - 512 + 12, struct.pack("<I", 7))
    assert "Invalid footer" in await open_error(src)


def _descriptor(tmp_path: Path, create_type: str, *lines: str) -> Path:
    (tmp_path / "data.bin").write_bytes(bytes(1024 * 512))
    desc = tmp_path / "d.vmdk"
    desc.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=1\nparentCID=ffffffff\n"
        f'createType="{create_type}"\n\n' + "".join(line + "\n" for line in lines)
    )
    return desc


@pytest.mark.parametrize(
    ("create_type", "lines", "error", "message"),
    [
        ("monolithicFlat", ['RW 1024 ZZZFLAT "data.bin"'], ImageError, "extent type 'ZZZFLAT'"),
        ("monolithicFlat", ['RW 1024 FLAT "data.bin"'], ImageError, "Invalid extent line"),
        ("fancyType", ['RW 1024 FLAT "data.bin" 0'], ImageError, "Unsupported image type"),
        ("monolithicFlat", ['RW 1024 FLAT "missing.bin" 0'], ImageError, "missing.bin"),
        ("monolithicFlat", ['RW 1024 SPARSE "data.bin"'], ImageError, "not in VMDK format"),
        ("seSparse", ['RW 1024 SESPARSE "data.bin"'], UnsupportedError, "SESPARSE"),
        (
            "monolithicFlat",
            ['parentFileNameHint="base.vmdk"', 'RW 1024 FLAT "data.bin" 0'],
            ImageError,
            "Could not open backing file: .*base.vmdk",  # (there is none)
        ),
    ],
)
async def test_bad_descriptors(
    tmp_path: Path, create_type: str, lines: list[str], error: type[Exception], message: str
) -> None:
    desc = _descriptor(tmp_path, create_type, *lines)
    with pytest.raises(error, match=message):
        async with trioconv.open_image(desc, "vmdk"):
            pass


async def test_qemu_agrees_on_refusals(tmp_path: Path) -> None:
    """qemu refuses the same broken descriptor (an unknown createType)."""
    desc = _descriptor(tmp_path, "fancyType", 'RW 1024 FLAT "data.bin" 0')
    result = run(require_tool("qemu-img"), "info", "-f", "vmdk", desc, check=False)
    assert result.returncode != 0
    assert "Unsupported image type 'fancyType'" in result.stderr
    assert "Unsupported image type 'fancyType'" in await open_error(desc)


async def test_tiny_file(tmp_path: Path) -> None:
    path = tmp_path / "t.vmdk"
    path.write_bytes(b"KD")
    with pytest.raises(ImageError, match="too small"):
        async with trioconv.open_image(path, "vmdk"):
            pass


# -- codecs -----------------------------------------------------------------------------

u32 = st.integers(0, 2**32 - 1)
u64 = st.integers(0, 2**64 - 1)


@given(
    st.builds(
        codec.SparseHeader,
        version=u32,
        flags=u32,
        capacity=u64,
        granularity=u64,
        desc_offset=u64,
        desc_size=u64,
        num_gtes_per_gt=u32,
        rgd_offset=u64,
        gd_offset=u64,
        grain_offset=u64,
        compress_algorithm=st.integers(0, 0xFFFF),
        filler=st.binary(min_size=1, max_size=1),
        check_bytes=st.binary(min_size=4, max_size=4),
    )
)
def test_header_round_trip(header: codec.SparseHeader) -> None:
    raw = header.encode()
    assert len(raw) == 512
    assert codec.parse_header(raw) == header
    assert codec.probe(raw) == 100


@given(st.integers(1, 2**41).map(lambda n: n * 512), st.booleans(), st.booleans())
def test_new_header_is_valid(size: int, compress: bool, zeroed: bool) -> None:
    header, gt_count, gd_sectors = codec.new_sparse_header(
        size, compress=compress, zeroed_grain=zeroed
    )
    file_size = header.grain_offset * 512
    layout = codec.sparse_layout(header, file_size, writable=True)
    assert layout.capacity == size
    assert layout.gd_entries == gt_count
    assert gd_sectors * 512 >= gt_count * 4
    assert layout.compressed is compress and layout.zero_grain is zeroed


#: Text a descriptor value may hold: no quote, no line break, no surrogates.
_CHARS = st.characters(min_codepoint=0x20, max_codepoint=0x2FF, blacklist_characters='"')
_name = st.text(
    _CHARS,
    min_size=1,
    max_size=40,
).filter(lambda s: s.strip() == s and s != "")
_extent = st.one_of(
    st.builds(
        codec.ExtentLine,
        st.just("RW"),
        st.integers(1, 2**40),
        st.just("FLAT"),
        _name,
        st.integers(0, 2**40),
    ),
    st.builds(
        codec.ExtentLine,
        st.just("RW"),
        st.integers(1, 2**40),
        st.sampled_from(["SPARSE", "VMFSSPARSE", "SESPARSE"]),
        _name,
        st.none(),
    ),
)
_value = st.text(_CHARS, max_size=20).filter(lambda s: s.strip() == s)


@given(
    st.builds(
        codec.Descriptor,
        version=st.integers(1, 3),
        cid=u32,
        parent_cid=u32,
        create_type=st.sampled_from(codec.DESCRIPTOR_CREATE_TYPES),
        extents=st.lists(_extent, max_size=5).map(tuple),
        ddb=st.lists(
            st.tuples(st.from_regex(r"ddb\.[A-Za-z][A-Za-z0-9.]{0,15}", fullmatch=True), _value),
            max_size=6,
        ).map(tuple),
        parent_hint=st.one_of(st.none(), _name),
    )
)
def test_descriptor_round_trip(desc: codec.Descriptor) -> None:
    text = codec.format_descriptor(desc)
    assert codec.parse_descriptor(text) == desc
    assert codec.probe(text.encode()) == 100


@given(st.text(max_size=400))
def test_descriptor_parser_never_crashes(text: str) -> None:
    try:
        desc = codec.parse_descriptor(text)
    except codec.VmdkFormatError:
        return
    assert all(e.sectors > 0 and e.access == "RW" for e in desc.extents)


@given(st.binary(min_size=80, max_size=512), st.integers(0, 2**45))
def test_header_checks_bound_memory(tail: bytes, file_size: int) -> None:
    """Whatever a header says, an accepted layout keeps its GD inside the file."""
    header = codec.parse_header(codec.MAGIC + tail[4:])
    try:
        layout = codec.sparse_layout(header, file_size)
    except codec.VmdkFormatError:
        return
    assert layout.gd_offset + layout.gd_entries * 4 <= file_size
    assert layout.gd_entries <= codec.MAX_GD_ENTRIES
    assert 0 < layout.grain_size <= codec.MAX_GRAIN_SECTORS * 512


async def test_block_status_of_a_big_empty_image(tmp_path: Path) -> None:
    """Unallocated grains are skipped in runs: a 1 TiB image is walked in moments."""
    src = make_vmdk(tmp_path / "huge.vmdk", "1T", "write -P 1 500G 64k")
    with trio.fail_after(30):
        tiles = await status_tiles(src)
    data = [(o, n) for o, n, k in tiles if k is ExtentKind.DATA]
    assert data == [(500 * 1024 * MiB, 65536)]


@pytest.mark.parametrize(
    ("text", "score"),
    [
        (b"# Disk DescriptorFile\nversion=1\n", 100),
        (b"# c\r\n   \r\nversion=3\r\n", 100),
        (b"\nversion=1\n", 0),
        (b"version=4\n", 0),
        (b"version=1", 0),
        (b"KDMV\x01\0\0\0", 100),
        (b"COWD", 100),
        (b"hello", 0),
    ],
)
def test_probe(text: bytes, score: int) -> None:
    assert codec.probe(text) == score


async def test_partial_new_grains_are_one_write_and_match_qemu(tmp_path: Path) -> None:
    # A write that starts and ends inside new grains of a local file is one file write:
    # the rest of those grains lies past the file's old end and reads as zeroes already.
    path = tmp_path / "img.vmdk"
    run(require_tool("qemu-img"), "create", "-q", "-f", "vmdk", path, "4M")
    data = b"\x5a" * (200 * 1024)
    grain = 64 * 1024
    first_grain = -(-path.stat().st_size // grain) * grain
    async with trioconv.open_image(path, "vmdk", writable=True) as img:
        assert isinstance(img, VmdkDriver)
        file = img.extents[0].file
        calls: list[tuple[int, int]] = []
        write = file.pwrite

        async def counting(offset: int, buf: Any) -> None:
            calls.append((offset, memoryview(buf).nbytes))
            await write(offset, buf)

        file.pwrite = counting  # type: ignore[method-assign, assignment]
        await img.pwrite(4096, data)  # grains 0..3, the first and last in part
        calls = [c for c in calls if c[0] >= first_grain]  # (not the new content ID)
        assert len(calls) == 1, calls
        await img.flush()
    assert path.stat().st_size == first_grain + 4 * grain  # the last grain is whole
    qemu_check(path)
    raw = make_raw(tmp_path / "expected.raw", "4M", f"write -P 0x5a 4096 {len(data)}")
    assert_identical(raw, path, "raw", "vmdk")
    # Converted, the file is the same as qemu-img's (the last grain reaches its end).
    src = make_raw(tmp_path / "src.raw", "4M", *MIXED, "write -P 0x77 3900k 1000")
    ours, theirs = tmp_path / "ours.vmdk", tmp_path / "theirs.vmdk"
    await trioconv.convert([src], ours, trioconv.ConvertOptions(target_format="vmdk"))
    run(require_tool("qemu-img"), "convert", "-f", "raw", "-O", "vmdk", src, theirs)
    assert ours.stat().st_size == theirs.stat().st_size
    assert_identical(src, ours, "raw", "vmdk")
    qemu_check(ours)
    a, b = ours.read_bytes(), theirs.read_bytes()
    assert a[65536:] == b[65536:]  # all but the header and descriptor (CID, UUIDs)


@pytest.mark.parametrize(
    "subformat", ["monolithicSparse", "twoGbMaxExtentSparse", "monolithicFlat"]
)
def test_n_gives_the_image_a_new_content_id(tmp_path: Path, subformat: str) -> None:
    """Writing into an existing VMDK changes its CID before the first write, as qemu
    does, so a delta disk made on it can tell that its parent changed."""
    target = tmp_path / "t.vmdk"
    run("qemu-img", "create", "-q", "-f", "vmdk", "-o", f"subformat={subformat}", target, "1M")

    def cid() -> int:
        shown = json.loads(run("qemu-img", "info", "--output=json", target).stdout)
        return int(shown["format-specific"]["data"]["cid"])

    before = cid()
    src = make_raw(tmp_path / "src.raw", "1M", "write -P 3 0 64k")
    result = trioconv_cli("convert", "-n", "-f", "raw", "-O", "vmdk", src, target)
    assert result.returncode == 0, result.stderr
    assert cid() != before
    assert_identical(src, target, "raw", "vmdk")
    if subformat != "monolithicFlat":
        run("qemu-img", "check", "-q", target)


def test_a_stream_ends_with_an_end_of_stream_marker(tmp_path: Path) -> None:
    """A streamOptimized file is a run of grain markers after the header that ends with
    the end-of-stream marker, a sector of zeroes (VMDK 5.0), which is what VMware's
    importers read up to; the file ends right after it."""
    src = tmp_path / "src.raw"
    with src.open("wb") as f:
        f.truncate(8 * MiB)
        for at, byte in ((1 * MiB, 0x33), (5 * MiB, 0x44), (8 * MiB - 4096, 0x55)):
            f.seek(at)
            f.write(bytes([byte]) * 65536 if at + 65536 <= 8 * MiB else bytes([byte]) * 4096)
    out = tmp_path / "s.vmdk"
    result = trioconv_cli("convert", "-O", "vmdk", "-o", "subformat=streamOptimized", src, out)
    assert result.returncode == 0, result.stderr
    data = out.read_bytes()
    overhead = struct.unpack_from("<Q", data, 0x40)[0] * 512  # header: overHead, in sectors
    pos, grains = overhead, []
    while True:
        lba, size = struct.unpack_from("<QI", data, pos)
        if size == 0:
            break  # a marker: here only the end-of-stream one may come
        grains.append(lba)
        pos += -(-(12 + size) // 512) * 512
    assert data[pos:] == bytes(512)  # the end-of-stream marker ends the file
    assert grains == sorted(grains) and len(grains) == 3
    run("qemu-img", "check", "-f", "vmdk", out)
    run("qemu-img", "compare", "-f", "raw", "-F", "vmdk", src, out)

"""VHD (``vpc``): images made by qemu-img read back, images we write read by qemu.

Every image is compared with ``qemu-img compare``; created images must match what
``qemu-img create``/``convert -O vpc`` make (virtual size after CHS rounding, layout);
block status must tile the image and agree with ``qemu-img map``. Broken and hostile
images are made by patching real ones and must be refused with a message that names the
problem. The codec gets property tests of its own.
"""

from __future__ import annotations

import itertools
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
from trioconv import ExtentKind, ImageError, UnsupportedError
from trioconv._open import probe_format
from trioconv.formats.vpc import _codec as codec
from trioconv.formats.vpc._driver import DynamicVpcDriver, FixedVpcDriver
from trioconv.testing import check_block_status_tiles, check_driver

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

MiB = 1024 * 1024

MIXED = (
    "write -P 0xab 0 300k",
    "write -P 0x11 3M 1M",  # straddles the 2 MiB block boundary
    "write -P 0x22 5000k 4k",
    "write -P 0x33 7M 1536",  # small and unaligned
    "write -P 0 9M 64k",  # allocated zeroes
)


def make_vpc(path: Path, size: str, *commands: str, options: str = "") -> Path:
    return create_filled(path, "vpc", size, *commands, options=options)


def info(path: Path, fmt: str = "vpc") -> dict[str, Any]:
    out = run("qemu-img", "info", "--output", "json", "-f", fmt, path).stdout
    return dict(json.loads(out))


def img_size(path: Path, fmt: str = "vpc") -> int:
    return int(info(path, fmt)["virtual-size"])


def cli_ok(*args: str | Path) -> None:
    result = trioconv_cli(*args)
    assert result.returncode == 0, result.stderr


def cli_error(*args: str | Path) -> str:
    result = trioconv_cli(*args)
    assert result.returncode == 1, (result.stdout, result.stderr)
    return result.stderr


def _ranges(entries: list[dict[str, Any]], key: str) -> list[tuple[int, int]]:
    return [(int(e["start"]), int(e["start"]) + int(e["length"])) for e in entries if e[key]]


def _inside(start: int, end: int, ranges: list[tuple[int, int]]) -> bool:
    pos = start
    for lo, hi in ranges:
        if lo <= pos < hi:
            pos = hi
        if pos >= end:
            return True
    return pos >= end


async def check_status_agrees(path: Path) -> list[tuple[int, int, ExtentKind]]:
    """Our block status tiles the image; where qemu says data, so do we."""
    async with trioconv.open_image(path, "vpc") as img:
        tiles = await check_block_status_tiles(img)
    qemu_data = _ranges(qemu_map(path, "vpc"), "data")
    ours = [(o, o + n) for o, n, k in tiles if k is ExtentKind.DATA]
    for lo, hi in qemu_data:
        # A block qemu calls data may be a hole in the file underneath: we say ZERO.
        async with trioconv.open_image(path, "vpc") as img:
            data = await img.pread(lo, hi - lo)
        if data.count(0) != len(data):
            assert _inside(lo, hi, ours) or any(a < hi and lo < b for a, b in ours)
    return tiles


# -- writing: raw -> vpc ----------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    ["", "subformat=dynamic", "subformat=fixed", "force_size=on", "subformat=fixed,force_size=on"],
)
def test_convert_raw_to_vpc_matches_qemu(tmp_path: Path, options: str) -> None:
    src = make_raw(tmp_path / "src.raw", "10M", *MIXED)
    ours, theirs = tmp_path / "ours.vhd", tmp_path / "qemu.vhd"
    extra = ["-o", options] if options else []
    cli_ok("convert", "-O", "vpc", *extra, src, ours)
    run("qemu-img", "convert", "-O", "vpc", *extra, src, theirs)
    a, b = info(ours), info(theirs)
    assert a["virtual-size"] == b["virtual-size"]
    assert a["format"] == b["format"] == "vpc"
    assert a.get("cluster-size") == b.get("cluster-size")
    assert ours.stat().st_size == theirs.stat().st_size
    assert_identical(ours, src, "vpc", "raw")
    # The same layout byte for byte, but for the UUID and the checksums (and the time).
    a_raw, b_raw = ours.read_bytes(), theirs.read_bytes()
    diff = [i for i, (x, y) in enumerate(zip(a_raw, b_raw, strict=True)) if x != y]
    footer_fields = set(range(24, 28)) | set(range(64, 84))
    tail = ours.stat().st_size - 512
    assert all(i in footer_fields or i - tail in footer_fields for i in diff), diff[:20]


def test_vpc_layout_is_sequential_with_many_writers(tmp_path: Path) -> None:
    src = make_raw(tmp_path / "src.raw", "40M", "write -P 0x5a 0 40M")
    out = tmp_path / "out.vhd"
    cli_ok("convert", "-m", "16", "-O", "vpc", src, out)
    assert_identical(out, src, "vpc", "raw")
    mapped = [int(e["offset"]) for e in qemu_map(out, "vpc") if e["data"]]
    assert mapped == sorted(mapped)


def test_vpc_out_of_order_writes(tmp_path: Path) -> None:
    src = make_raw(tmp_path / "src.raw", "24M", "write -P 0x5a 0 7M", "write -P 0x6b 13M 9M")
    out = tmp_path / "out.vhd"
    cli_ok("convert", "-W", "-m", "16", "-O", "vpc", src, out)
    assert_identical(out, src, "vpc", "raw")


def test_qcow2_to_vpc_and_back(tmp_path: Path) -> None:
    src = tmp_path / "src.qcow2"
    run(require_tool("qemu-img"), "create", "-q", "-f", "qcow2", src, "10M")
    qemu_io_run(src, "qcow2", *MIXED)
    out = tmp_path / "out.vhd"
    cli_ok("convert", "-O", "vpc", src, out)
    assert_identical(out, src, "vpc", "qcow2")
    back = tmp_path / "back.raw"
    cli_ok("convert", out, back)
    assert_identical(back, src, "raw", "qcow2")


def test_compression_is_refused(tmp_path: Path) -> None:
    src = make_raw(tmp_path / "src.raw", "1M")
    message = cli_error("convert", "-c", "-O", "vpc", src, tmp_path / "out.vhd")
    assert "ompress" in message


@pytest.mark.parametrize("size", ["1M", "10M", "4000000", "127G", "130G", "1T", "2040G"])
@pytest.mark.parametrize("force", ["off", "on"])
async def test_create_sizes_match_qemu(tmp_path: Path, size: str, force: str) -> None:
    ours, theirs = tmp_path / "ours.vhd", tmp_path / "qemu.vhd"
    opts = {"force_size": force}
    await trioconv.create_image(ours, "vpc", trioconv.parse_size(size), opts)
    run("qemu-img", "create", "-q", "-f", "vpc", "-o", f"force_size={force}", theirs, size)
    assert info(ours)["virtual-size"] == info(theirs)["virtual-size"]
    assert ours.stat().st_size == theirs.stat().st_size


async def test_create_too_big_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="2040 GiB"):
        await trioconv.create_image(tmp_path / "x.vhd", "vpc", 2041 * 1024**3)


def test_bad_subformat_is_refused(tmp_path: Path) -> None:
    src = make_raw(tmp_path / "src.raw", "1M")
    message = cli_error("convert", "-O", "vpc", "-o", "subformat=weird", src, tmp_path / "o")
    assert "subformat" in message


# -- reading: qemu-made vpc -> raw ------------------------------------------------------


@pytest.mark.parametrize("options", ["", "subformat=fixed", "force_size=on"])
def test_qemu_made_images_convert_to_raw(tmp_path: Path, options: str) -> None:
    src = make_vpc(tmp_path / "src.vhd", "10M", *MIXED, options=options)
    out = tmp_path / "out.raw"
    # A dynamic disk is probed; a fixed one is named (probed, it is raw, as below).
    fmt = ["-f", "vpc"] if "fixed" in options else []
    cli_ok("convert", *fmt, "-O", "raw", src, out)
    assert_identical(src, out, "vpc", "raw")
    assert out.stat().st_size == info(src)["virtual-size"]


def test_a_fixed_disk_is_probed_as_raw_as_qemu_img_probes_it(tmp_path: Path) -> None:
    """A fixed VHD has its footer only in its last sector, which a raw disk's guest
    writes at will: probed, it is raw, as qemu-img takes it (the same format and size
    in ``info``, the footer copied as data), so a guest cannot make its raw disk read as
    a VHD by writing a footer there."""
    src = make_vpc(tmp_path / "src.vhd", "10M", *MIXED, options="subformat=fixed")
    result = trioconv_cli("info", "--output=json", src)
    assert result.returncode == 0, result.stderr
    ours = json.loads(result.stdout)
    theirs = json.loads(run("qemu-img", "info", "--output=json", src).stdout)
    assert ours["format"] == theirs["format"] == "raw"
    assert ours["virtual-size"] == theirs["virtual-size"] == src.stat().st_size
    out = tmp_path / "out.raw"
    cli_ok("convert", "-O", "raw", src, out)
    assert out.read_bytes() == src.read_bytes()


async def test_block_status_and_reads(tmp_path: Path) -> None:
    src = make_vpc(tmp_path / "src.vhd", "10M", *MIXED)
    tiles = await check_status_agrees(src)
    # Every block is allocated, but the file has holes inside them: those read as zero.
    kinds = {o: k for o, n, k in tiles}
    assert kinds[0] is ExtentKind.DATA
    assert any(k is ExtentKind.ZERO and o <= 8 * MiB + MiB // 2 < o + n for o, n, k in tiles)
    assert tiles[-1] == (10 * MiB, img_size(src) - 10 * MiB, ExtentKind.ZERO)
    out = tmp_path / "out.raw"
    run("qemu-img", "convert", "-f", "vpc", "-O", "raw", src, out)
    expected = out.read_bytes()
    async with trioconv.open_image(src) as img:
        assert isinstance(img, DynamicVpcDriver)
        assert img.limits.cluster_size == 2 * MiB
        for offset, length in [(1, 511), (2 * MiB - 7, 20), (0, img.size), (7 * MiB + 3, 1533)]:
            assert await img.pread(offset, length) == expected[offset : offset + length]
        with pytest.raises(trioconv.TrioconvIOError, match="outside the image"):
            await img.pread(img.size - 1, 2)


async def test_fixed_block_status_follows_the_file(tmp_path: Path) -> None:
    src = make_vpc(tmp_path / "f.vhd", "8M", "write -P 1 1M 1M", options="subformat=fixed")
    async with trioconv.open_image(src, "vpc") as img:
        assert isinstance(img, FixedVpcDriver)
        tiles = await check_block_status_tiles(img)
    assert (MiB, MiB, ExtentKind.DATA) in tiles
    assert (2 * MiB, 6 * MiB, ExtentKind.ZERO) in tiles


def test_probe() -> None:
    """``conectix`` at the start is a VHD; a footer at the end only (a fixed disk, or a
    raw disk whose guest wrote one there) is raw, as qemu-img probes it."""
    footer = codec.Footer(disk_type=codec.DiskType.FIXED, current_size=MiB).encode()
    assert probe_format(footer + bytes(3584), "x") == "vpc"
    assert probe_format(bytes(4096), "x", footer) == "raw"
    assert probe_format(bytes(4096), "x", bytes(512)) == "raw"


# -- writing through the driver ---------------------------------------------------------


@pytest.mark.parametrize("subformat", ["dynamic", "fixed"])
async def test_driver_contract(tmp_path: Path, subformat: str) -> None:
    path = tmp_path / "c.vhd"
    await trioconv.create_image(path, "vpc", 6 * MiB, {"subformat": subformat})
    async with trioconv.open_image(path, "vpc", writable=True) as img:
        await check_driver(img)
        await img.flush()
        content = await img.pread(0, img.size)
    out = tmp_path / "c.raw"
    run("qemu-img", "convert", "-f", "vpc", "-O", "raw", path, out)
    assert out.read_bytes() == content


async def test_zeroes_in_allocated_and_absent_blocks(tmp_path: Path) -> None:
    path = make_vpc(tmp_path / "z.vhd", "8M", "write -P 0x77 0 3M")
    async with trioconv.open_image(path, "vpc", writable=True) as img:
        before = tmp_path.joinpath("z.vhd").stat().st_size
        await img.pwrite_zeroes(MiB, 5 * MiB, may_unmap=True)  # half data, half absent
        with pytest.raises(trioconv.ZeroesNotSupported):
            await img.pwrite_zeroes(0, MiB, fast=True, may_unmap=False)
        await img.flush()
    assert path.stat().st_size == before  # nothing allocated for zeroes
    out = tmp_path / "z.raw"
    run("qemu-img", "convert", "-f", "vpc", "-O", "raw", path, out)
    data = out.read_bytes()
    assert data[:MiB] == b"\x77" * MiB and data[MiB:].count(0) == len(data) - MiB


async def test_partial_bitmaps(tmp_path: Path) -> None:
    """Sectors whose bitmap bit is clear read as zeroes; writing one sets its bit."""
    path = make_vpc(tmp_path / "b.vhd", "4M", "write -P 0x99 0 2M")
    raw = bytearray(path.read_bytes())
    bat_entry = int.from_bytes(raw[1536:1540], "big")
    bitmap_at = bat_entry * 512
    raw[bitmap_at] = 0b0111_1111  # sector 0 absent
    raw[bitmap_at + 1] = 0b1111_0000  # sectors 12..15 absent
    path.write_bytes(bytes(raw))
    async with trioconv.open_image(path, "vpc", writable=True) as img:
        data = await img.pread(0, 16 * 512)
        assert data[:512] == bytes(512)
        assert data[512 : 12 * 512] == b"\x99" * 11 * 512
        assert data[12 * 512 :] == bytes(4 * 512)
        tiles = await check_block_status_tiles(img)
        assert tiles[0] == (0, 512, ExtentKind.ZERO)
        assert tiles[1] == (512, 11 * 512, ExtentKind.DATA)
        await img.pwrite(12 * 512 + 100, b"\x42" * 10)  # inside an absent sector
        got = await img.pread(12 * 512, 512)
        assert got == bytes(100) + b"\x42" * 10 + bytes(402)
        await img.flush()
    async with trioconv.open_image(path, "vpc") as img:
        assert await img.pread(12 * 512, 512) == got
        assert await img.pread(13 * 512, 512) == bytes(512)
    assert path.read_bytes()[bitmap_at + 1] == 0b1111_1000


def _small_block_vhd(path: Path, size: int, block_size: int) -> Path:
    """A dynamic VHD with blocks under 4 KiB, which qemu-img cannot make but reads
    and writes: footer, dynamic header, an empty BAT, footer."""
    footer = bytearray(512)
    footer[0:8] = b"conectix"
    struct.pack_into(">IIQ", footer, 8, 2, 0x10000, 512)
    footer[28:32] = b"qem2"
    struct.pack_into(">I4sQQHBBI", footer, 32, 0x50003, b"Wi2k", size, size, 65535, 16, 255, 3)
    footer[64:68] = codec.checksum(bytes(footer), 64).to_bytes(4, "big")
    entries = size // block_size
    header = bytearray(1024)
    header[0:8] = b"cxsparse"
    struct.pack_into(">QQIII", header, 8, 2**64 - 1, 1536, 0x10000, entries, block_size)
    header[36:40] = codec.checksum(bytes(header), 36).to_bytes(4, "big")
    bat = b"\xff" * (-(-entries * 4 // 512) * 512)
    path.write_bytes(bytes(footer) + bytes(header) + bat + bytes(footer))
    return path


@pytest.mark.parametrize("block_size", [512, 2048])
def test_blocks_under_4k_have_no_bitmap(tmp_path: Path, block_size: int) -> None:
    """qemu's sector bitmap size rounds down to nothing for blocks under 4 KiB: the data
    starts where the bitmap would, and every sector of a block is present. (trioconv
    divided by that size and failed with a traceback.)"""
    image = _small_block_vhd(tmp_path / "small.vhd", MiB, block_size)
    run("qemu-io", "-f", "vpc", "-c", "write -P 7 1000 3000", "-c", "write -P 8 700k 5k", image)
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    cli_ok("convert", "-f", "vpc", "-O", "raw", image, ours)
    run("qemu-img", "convert", "-f", "vpc", "-O", "raw", image, theirs)
    assert ours.read_bytes() == theirs.read_bytes()
    assert ours.read_bytes()[1000:4000] == b"\x07" * 3000
    # Written by trioconv (-n), read back by qemu-img.
    src = make_raw(tmp_path / "src.raw", "1M", "write -P 9 512 600k", "write -P 3 900k 1k")
    cli_ok("convert", "-n", "-f", "raw", "-O", "vpc", src, image)
    assert_identical(src, image, "raw", "vpc")


def test_the_error_that_ended_a_conversion_is_the_one_shown(tmp_path: Path) -> None:
    """A disk that fills up (here: the process's file size limit) fails the copy; closing
    the VHD then fails to write its footer too, but the error shown - and raised to a
    program - is the first one, not the footer's, and the new target is removed."""
    import resource
    import signal
    import subprocess
    import sys

    src = make_raw(tmp_path / "src.raw", "8M", "write -P 1 0 8M")
    out = tmp_path / "out.vhd"

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (MiB, MiB))

    result = subprocess.run(
        [sys.executable, "-m", "trioconv", "convert", "-O", "vpc", str(src), str(out)],
        capture_output=True,
        text=True,
        preexec_fn=limit,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and "File too large" in lines[0], result.stderr
    at = int(lines[0].split(" at byte ")[1].split(":")[0])
    assert at < 2 * MiB  # a data block's write, not the footer's at the image's end
    assert not out.exists()


# -- corrupt and hostile images ---------------------------------------------------------


def _patch(path: Path, offset: int, data: bytes, fix: str | None = None) -> None:
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    if fix == "footer":
        raw[64:68] = codec.checksum(bytes(raw[:512]), 64).to_bytes(4, "big")
    elif fix == "header":
        raw[512 + 36 : 512 + 40] = codec.checksum(bytes(raw[512:1536]), 36).to_bytes(4, "big")
    path.write_bytes(bytes(raw))


BROKEN: dict[str, tuple[int, bytes, str | None, str]] = {
    "footer-checksum": (40, b"\x01", None, "footer checksum"),
    "header-checksum": (512 + 40, b"\x01", None, "dynamic header checksum"),
    "header-magic": (512, b"cxsparsX", "none", "dynamic header magic"),
    "block-size": (512 + 32, (3 * 512).to_bytes(4, "big"), "header", "block size"),
    "header-offset": (16, (1 << 40).to_bytes(8, "big"), "footer", "beyond the end"),
    "bat-huge": (512 + 28, (0x7FFF_FFFF).to_bytes(4, "big"), "header", "block table"),
    "bat-offset": (512 + 16, (1 << 40).to_bytes(8, "big"), "header", "beyond the end"),
    "bat-small": (512 + 28, (1).to_bytes(4, "big"), "header", "too small"),
    "block-past-eof": (1536, (0x1000_0000).to_bytes(4, "big"), None, "truncated"),
    "differencing": (60, (4).to_bytes(4, "big"), "footer", "differencing"),
    "disk-type": (60, (9).to_bytes(4, "big"), "footer", "disk type"),
    "too-big": (56, (65535 * 16).to_bytes(3, "big"), "footer", "2040 GiB"),
}


@pytest.mark.parametrize("how", sorted(BROKEN))
def test_broken_images_are_refused(tmp_path: Path, how: str) -> None:
    path = make_vpc(tmp_path / "bad.vhd", "10M", "write -P 1 0 1M")
    offset, data, fix, words = BROKEN[how]
    if how == "header-magic":
        raw = bytearray(path.read_bytes())
        raw[512:520] = data
        raw[512 + 36 : 512 + 40] = codec.checksum(bytes(raw[512:1536]), 36).to_bytes(4, "big")
        path.write_bytes(bytes(raw))
    elif how == "too-big":
        # qem2 sizes by bytes: claim 4 TiB.
        _patch(path, 28, b"qem2", None)
        _patch(path, 48, (4 << 40).to_bytes(8, "big"), "footer")
    else:
        _patch(path, offset, data, fix)
    message = cli_error("convert", "-f", "vpc", path, tmp_path / "out.raw")
    assert words in message, message
    assert not (tmp_path / "out.raw").exists()


def test_truncated_fixed_footer_is_refused(tmp_path: Path) -> None:
    path = make_vpc(tmp_path / "f.vhd", "4M", options="subformat=fixed")
    raw = path.read_bytes()
    path.write_bytes(raw[:-472] + b"\x01" + raw[-471:])  # a footer byte changes
    message = cli_error("convert", "-f", "vpc", path, tmp_path / "out.raw")
    assert "checksum" in message


async def test_hostile_bat_uses_bounded_memory(tmp_path: Path) -> None:
    """A header that claims a 16 GiB BAT in a small file is refused before any read."""
    path = make_vpc(tmp_path / "h.vhd", "10M")
    _patch(path, 512 + 28, (0xFFFF_FFFF).to_bytes(4, "big"), "header")
    _patch(path, 512 + 32, (512).to_bytes(4, "big"), "header")
    with pytest.raises(ImageError, match="block table"):
        async with trioconv.open_image(path, "vpc"):
            pass


async def test_differencing_is_unsupported(tmp_path: Path) -> None:
    path = make_vpc(tmp_path / "d.vhd", "4M")
    _patch(path, 60, (4).to_bytes(4, "big"), "footer")
    with pytest.raises(UnsupportedError):
        async with trioconv.open_image(path, "vpc"):
            pass


# -- the codec --------------------------------------------------------------------------

u8, u16, u32, u64 = (st.integers(0, 2**b - 1) for b in (8, 16, 32, 64))


@st.composite
def footers(draw: st.DrawFn) -> codec.Footer:
    return codec.Footer(
        features=draw(u32),
        version=draw(u32),
        data_offset=draw(u64),
        timestamp=draw(u32),
        creator_app=draw(st.binary(min_size=4, max_size=4)),
        creator_version_major=draw(u16),
        creator_version_minor=draw(u16),
        creator_os=draw(st.binary(min_size=4, max_size=4)),
        original_size=draw(u64),
        current_size=draw(u64),
        cylinders=draw(u16),
        heads=draw(u8),
        sectors_per_track=draw(u8),
        disk_type=draw(u32),
        uuid=draw(st.binary(min_size=16, max_size=16)),
        saved_state=draw(u8),
    )


@given(footers())
def test_footer_round_trip(footer: codec.Footer) -> None:
    raw = footer.encode()
    assert len(raw) == 512
    parsed = codec.parse_footer(raw)
    assert attrs.evolve(parsed, checksum=0) == footer
    assert sum(raw[:64]) + sum(raw[68:]) + parsed.checksum == 0xFFFF_FFFF or (
        (~(sum(raw) - sum(raw[64:68]))) & 0xFFFF_FFFF == parsed.checksum
    )


@given(footers(), st.integers(0, 511), st.integers(1, 255))
def test_footer_corruption_is_detected(footer: codec.Footer, at: int, delta: int) -> None:
    raw = bytearray(footer.encode())
    raw[at] = (raw[at] + delta) % 256
    try:
        codec.parse_footer(bytes(raw))
    except codec.VpcFormatError:
        return
    raise AssertionError("a changed byte went unnoticed")


@given(
    u64,
    u64,
    u32,
    u32,
    st.integers(9, 31).map(lambda b: 1 << b),
    st.binary(min_size=512, max_size=512),
    st.binary(min_size=192, max_size=192),
)
def test_dynamic_header_round_trip(
    data_offset: int, table: int, version: int, entries: int, bs: int, name: bytes, loc: bytes
) -> None:
    header = codec.DynamicHeader(
        data_offset=data_offset,
        table_offset=table,
        version=version,
        max_table_entries=entries,
        block_size=bs,
        parent_name=name,
        parent_locators=loc,
    )
    raw = header.encode()
    assert len(raw) == 1024
    assert attrs.evolve(codec.parse_dynamic_header(raw, 512), checksum=0) == header


@given(st.binary(min_size=1, max_size=64), st.data())
def test_sector_runs_match_the_bits(bitmap: bytes, data: st.DataObject) -> None:
    nbits = len(bitmap) * 8
    first = data.draw(st.integers(0, nbits - 1))
    last = data.draw(st.integers(first, nbits))
    bits = [bool(bitmap[i // 8] & (0x80 >> (i % 8))) for i in range(nbits)]
    runs = codec.sector_runs(bitmap, first, last)
    pos = first
    for a, b, present in runs:
        assert a == pos and b > a
        assert all(bits[i] is present for i in range(a, b))
        pos = b
    assert pos == last
    assert all(x[2] != y[2] for x, y in itertools.pairwise(runs))
    if last > first:
        assert codec.first_sector_run(bitmap, first, last) == runs[0]
        full = codec.set_sector_bits(bitmap, first, last)
        assert codec.sector_runs(full, first, last) == [(first, last, True)]


@given(st.integers(1, 2040 * 1024**3 // 512))
def test_create_geometry_never_truncates(sectors: int) -> None:
    (c, h, s), size = codec.create_geometry(sectors * 512, False)
    assert size >= sectors * 512
    footer = codec.new_footer(size, (c, h, s), codec.DiskType.DYNAMIC, False)
    assert codec.virtual_size(footer) == size


def test_bat_codec_is_big_endian() -> None:
    table = codec.decode_bat(struct.pack(">3I", 1, 0xFFFFFFFF, 0x01020304))
    assert list(table) == [1, 0xFFFFFFFF, 0x01020304]
    assert codec.encode_bat(table) == struct.pack(">3I", 1, 0xFFFFFFFF, 0x01020304)


async def test_concurrent_writers_to_one_block(tmp_path: Path) -> None:
    path = tmp_path / "cc.vhd"
    await trioconv.create_image(path, "vpc", 8 * MiB)
    pieces = {i * 65536: bytes([i + 1]) * 65536 for i in range(64)}
    async with trioconv.open_image(path, "vpc", writable=True) as img:
        async with trio.open_nursery() as nursery:
            for off, data in pieces.items():
                nursery.start_soon(img.pwrite, off, data)
        await img.flush()
    out = tmp_path / "cc.raw"
    run("qemu-img", "convert", "-f", "vpc", "-O", "raw", path, out)
    got = out.read_bytes()
    for off, data in pieces.items():
        assert got[off : off + len(data)] == data
    assert len(qemu_map(path, "vpc")) >= 1
    # Footer copy, header, one BAT sector, two blocks (bitmap + data), the footer.
    assert path.stat().st_size == 512 + 1024 + 512 + 2 * (512 + 2 * MiB) + 512


async def test_block_edges_beside_bitmaps_are_zero(tmp_path: Path) -> None:
    # The zeroes at the start and end of a block share a file page with a sector bitmap,
    # so the file calls them data; read with the bitmaps, they are ZERO, not a few KiB
    # of "data" for a copy to read and write.
    written = [(MiB, MiB + MiB // 2), (3 * MiB, 5 * MiB), (7 * MiB, 8 * MiB)]
    src = make_raw(
        tmp_path / "src.raw",
        "10M",
        *(f"write -P 0x{k + 0x41:x} {lo} {hi - lo}" for k, (lo, hi) in enumerate(written)),
    )
    vhd = tmp_path / "src.vhd"
    run("qemu-img", "convert", "-f", "raw", "-O", "vpc", src, vhd)
    tiles = await check_status_agrees(vhd)
    data = [(o, o + n) for o, n, k in tiles if k is ExtentKind.DATA]
    assert data
    for lo, hi in data:
        assert any(a < hi and lo < b for a, b in written), (lo, hi, data)
    out = tmp_path / "out.raw"
    cli_ok("convert", "-f", "vpc", "-O", "raw", vhd, out)
    assert_identical(src, out)
    # Opened for writing, nothing is assumed about bytes a write may change.
    async with trioconv.open_image(vhd, "vpc", writable=True) as img:
        assert isinstance(img, DynamicVpcDriver)
        assert img._zones is None
        await img.pwrite(0, b"\x77" * 512)
        ext = await img.block_status(0, img.size)
        assert (ext.offset, ext.kind) == (0, ExtentKind.DATA)
    assert (await _read(vhd, 0, 512)) == b"\x77" * 512


async def _read(path: Path, offset: int, length: int) -> bytes:
    async with trioconv.open_image(path, "vpc") as img:
        return await img.pread(offset, length)


def test_alternating_sector_bitmaps(
    tmp_path: Path, qemu_img: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bitmap of alternating bits (4096 runs a block) costs linear time: block status
    walks it run by run without listing every run each time (it never lists them)."""
    image = tmp_path / "alt.vhd"
    run(qemu_img, "create", "-q", "-f", "vpc", image, "8M")
    run("qemu-io", "-f", "vpc", "-c", "write -P 0x11 0 8M", image)
    raw = bytearray(image.read_bytes())
    header = codec.parse_dynamic_header(bytes(raw[512:1536]), 512)
    bat = raw[header.table_offset : header.table_offset + 4 * header.max_table_entries]
    for i in range(0, len(bat), 4):
        sector = int.from_bytes(bat[i : i + 4], "big")
        if sector != 0xFFFFFFFF:
            raw[sector * 512 : sector * 512 + 512] = b"\x55" * 512
    image.write_bytes(raw)
    out = tmp_path / "out.raw"
    result = trioconv_cli("convert", "-O", "raw", image, out)  # (took minutes before)
    assert result.returncode == 0, result.stderr
    data = out.read_bytes()
    assert data[:512] == bytes(512) and data[512:1024] == b"\x11" * 512  # bit 0 clear, 1 set

    # In-process: block status over the whole image never lists a block's runs.
    def listing(*args: object) -> None:
        raise AssertionError("block status listed every run of a bitmap")

    monkeypatch.setattr(codec, "sector_runs", listing)

    async def walk() -> int:
        async with trioconv.open_image(image, "vpc") as drv:
            return len(await check_block_status_tiles(drv))

    assert trio.run(walk) >= 8 * MiB // 512  # one extent per sector: they alternate

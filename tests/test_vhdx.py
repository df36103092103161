"""VHDX: images made by qemu-img read back exactly; images trioconv writes pass qemu.

Reading: qemu-img creates dynamic and fixed images with several block and log sizes,
qemu-io fills them, trioconv converts them to raw and ``qemu-img compare`` must find the
two identical. Writing: every variant is produced from a raw and from a qcow2 source and
must pass ``qemu-img check`` and ``qemu-img compare``; with default options the layout
is qemu's own. Broken images are made by patching real ones; the codecs get property
tests.
"""

from __future__ import annotations

import json
import os
import struct
import uuid
from pathlib import Path

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

import trioconv
from trioconv import ExtentKind, ImageError
from trioconv.formats.vhdx import VhdxDriver
from trioconv.formats.vhdx import _codec as codec
from trioconv.formats.vhdx._driver import plan_options
from trioconv.testing import check_block_status_tiles, check_driver

from .conftest import assert_identical, require_tool, run, trioconv_cli

MiB = 1024 * 1024

FILL = (
    "write -P 0xab 0 300k",
    "write -P 0x11 1M 1M",
    "write -P 0x22 2500k 4k",
    "write -P 0x33 9M 1536",
    "write -z 10M 1M",
    "write -P 0x44 19M 1M",
)


def qemu_vhdx(path: Path, size: str, *commands: str, options: str = "") -> Path:
    args: list[str | os.PathLike[str]] = [require_tool("qemu-img"), "create", "-q", "-f", "vhdx"]
    if options:
        args += ["-o", options]
    run(*args, path, size)
    if commands:
        io: list[str | os.PathLike[str]] = [require_tool("qemu-io"), "-f", "vhdx"]
        for c in commands:
            io += ["-c", c]
        run(*io, path)
    return path


def raw_source(tmp_path: Path, name: str = "src.raw") -> Path:
    path = tmp_path / name
    run(require_tool("qemu-img"), "create", "-q", "-f", "raw", path, "20M")
    io: list[str | os.PathLike[str]] = [require_tool("qemu-io"), "-f", "raw"]
    for c in FILL:
        io += ["-c", c]
    run(*io, path)
    return path


def qemu_check(path: Path) -> None:
    result = run("qemu-img", "check", "-f", "vhdx", path, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No errors were found" in result.stdout


def info(path: Path) -> dict[str, object]:
    return dict(json.loads(run("qemu-img", "info", "--output=json", path).stdout))


# -- reading ---------------------------------------------------------------------------

READ_VARIANTS = [
    "",
    "subformat=fixed",
    "block_size=1M",
    "block_size=32M,log_size=4M",
    "block_state_zero=off",
    "subformat=fixed,block_state_zero=off,block_size=2M",
    "log_size=2M,block_size=4M",
]


@pytest.mark.parametrize("options", READ_VARIANTS)
async def test_read_qemu_images(tmp_path: Path, options: str) -> None:
    img = qemu_vhdx(tmp_path / "a.vhdx", "20M", *FILL, options=options)
    out = tmp_path / "out.raw"
    result = trioconv_cli("convert", "-O", "raw", img, out)
    assert result.returncode == 0, result.stderr
    assert_identical(img, out, "vhdx", "raw")
    async with trioconv.open_image(img) as drv:
        assert isinstance(drv, VhdxDriver)
        assert drv.size == 20 * MiB
        tiles = await check_block_status_tiles(drv)
    # Every written byte is inside a DATA extent.
    data = [(o, o + n) for o, n, k in tiles if k is ExtentKind.DATA]
    for start in (0, 1 * MiB, 2500 * 1024, 9 * MiB, 19 * MiB):
        assert any(lo <= start < hi for lo, hi in data), (start, tiles)


async def test_read_empty_and_odd_sizes(tmp_path: Path) -> None:
    for size in ("0", "1M", "8M", "7777k"):
        img = qemu_vhdx(tmp_path / f"e{size}.vhdx", size)
        out = tmp_path / f"e{size}.raw"
        result = trioconv_cli("convert", "-O", "raw", img, out)
        assert result.returncode == 0, result.stderr
        assert_identical(img, out, "vhdx", "raw")


async def test_read_empty_is_all_zero_status(tmp_path: Path) -> None:
    img = qemu_vhdx(tmp_path / "z.vhdx", "64M")
    async with trioconv.open_image(img) as drv:
        tiles = await check_block_status_tiles(drv)
    assert all(k is ExtentKind.ZERO for _, _, k in tiles)


# -- writing ---------------------------------------------------------------------------

WRITE_VARIANTS = [
    [],
    ["-o", "subformat=fixed"],
    ["-o", "subformat=dynamic,block_size=1M"],
    ["-o", "block_size=64M,log_size=3M"],
    ["-o", "block_state_zero=off"],
    ["-o", "subformat=fixed,block_state_zero=off,block_size=4M"],
]


@pytest.mark.parametrize("opts", WRITE_VARIANTS, ids=lambda o: ",".join(o[1:]) or "default")
@pytest.mark.parametrize("source_fmt", ["raw", "qcow2"])
async def test_write_variants(tmp_path: Path, opts: list[str], source_fmt: str) -> None:
    src = raw_source(tmp_path)
    if source_fmt == "qcow2":
        q = tmp_path / "src.qcow2"
        run("qemu-img", "convert", "-f", "raw", "-O", "qcow2", src, q)
        src = q
    out = tmp_path / "out.vhdx"
    result = trioconv_cli("convert", "-O", "vhdx", *opts, src, out)
    assert result.returncode == 0, result.stderr
    qemu_check(out)
    assert_identical(src, out, source_fmt, "vhdx")
    # And it reads back through trioconv too.
    back = tmp_path / "back.raw"
    assert trioconv_cli("convert", "-O", "raw", out, back).returncode == 0
    assert_identical(src, back, source_fmt, "raw")


@pytest.mark.parametrize("options", ["", "subformat=fixed", "block_size=2M,log_size=2M"])
async def test_layout_matches_qemu(tmp_path: Path, options: str) -> None:
    """Same options, same source: qemu's file and ours agree on everything but GUIDs."""
    src = raw_source(tmp_path)
    ours, theirs = tmp_path / "ours.vhdx", tmp_path / "theirs.vhdx"
    extra = ["-o", options] if options else []
    assert trioconv_cli("convert", "-O", "vhdx", *extra, src, ours).returncode == 0
    run("qemu-img", "convert", "-O", "vhdx", *extra, src, theirs)
    a, b = info(ours), info(theirs)
    for key in ("virtual-size", "format", "cluster-size"):
        assert a[key] == b[key], key
    assert ours.stat().st_size == theirs.stat().st_size
    da, db = ours.read_bytes(), theirs.read_bytes()
    assert (
        da[codec.REGION1_OFFSET : codec.REGION2_OFFSET + 65536]
        == (db[codec.REGION1_OFFSET : codec.REGION2_OFFSET + 65536])
    )
    regions = codec.decode_region_table(da[codec.REGION1_OFFSET :])
    for r in regions:
        if r.guid == codec.BAT_GUID:
            assert da[r.file_offset : r.end] == db[r.file_offset : r.end]
    assert_identical(ours, theirs, "vhdx", "vhdx")


@pytest.mark.parametrize("options", ["subformat=fixed,block_state_zero=off", "subformat=fixed"])
def test_a_fixed_image_ends_where_its_payload_does(tmp_path: Path, options: str) -> None:
    """A fixed image of a size that is not a whole MiB: every block is there from the
    start, so writing allocates nothing and the file keeps qemu-img's length."""
    src = tmp_path / "odd.raw"
    src.write_bytes(os.urandom(1_000_000))
    ours, theirs = tmp_path / "ours.vhdx", tmp_path / "theirs.vhdx"
    result = trioconv_cli("convert", "-O", "vhdx", "-o", options, src, ours)
    assert result.returncode == 0, result.stderr
    run("qemu-img", "convert", "-O", "vhdx", "-o", options, src, theirs)
    assert ours.stat().st_size == theirs.stat().st_size
    qemu_check(ours)
    assert_identical(src, ours, "raw", "vhdx")


async def test_create_defaults_match_qemu_create(tmp_path: Path) -> None:
    for size in ("1M", "2G", "200G"):
        ours, theirs = tmp_path / "o.vhdx", tmp_path / "t.vhdx"
        await trioconv_create(ours, _bytes(size))
        run("qemu-img", "create", "-q", "-f", "vhdx", theirs, size)
        a, b = info(ours), info(theirs)
        assert (a["virtual-size"], a["cluster-size"]) == (b["virtual-size"], b["cluster-size"])
        assert ours.stat().st_size == theirs.stat().st_size
        qemu_check(ours)
        ours.unlink()
        theirs.unlink()


def _bytes(size: str) -> int:
    units = {"M": MiB, "G": 1024 * MiB}
    return int(size[:-1]) * units[size[-1]]


async def trioconv_create(path: Path, size: int, options: dict[str, str] | None = None) -> None:
    from trioconv._open import create_image

    await create_image(path, "vhdx", size, options or {})


def test_block_size_defaults() -> None:
    GiB = 1024 * MiB
    assert plan_options(1 * GiB, {})["block_size"] == 8 * MiB
    assert plan_options(1 * GiB + 512, {})["block_size"] == 16 * MiB
    assert plan_options(101 * GiB, {})["block_size"] == 32 * MiB
    assert plan_options(33 * 1024 * GiB, {})["block_size"] == 64 * MiB
    assert plan_options(1000, {"block_size": "0"})["size"] == 1024
    assert plan_options(1000, {"block_size": "1"})["block_size"] == MiB
    assert plan_options(1000, {"block_size": "1G"})["block_size"] == 256 * MiB
    assert plan_options(1000, {"log_size": "1k"})["log_size"] == MiB


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"block_size": "3M"}, "power of two"),
        ({"log_size": "0"}, "Log size"),
        ({"subformat": "diff"}, "subformat"),
        ({"block_state_zero": "maybe"}, "block_state_zero"),
    ],
)
def test_bad_options(options: dict[str, str], message: str) -> None:
    with pytest.raises(trioconv.UsageError, match=message):
        plan_options(MiB, options)


async def test_driver_contract(tmp_path: Path) -> None:
    path = tmp_path / "c.vhdx"
    await trioconv_create(path, 8 * MiB, {"block_size": "1M"})
    async with trioconv.open_image(path, "vhdx", writable=True) as drv:
        await check_driver(drv)
        await drv.flush()
    qemu_check(path)


async def test_unaligned_size_rounds_up(tmp_path: Path) -> None:
    src = tmp_path / "odd.raw"
    src.write_bytes(os.urandom(1000))
    out = tmp_path / "odd.vhdx"
    result = trioconv_cli("convert", "-O", "vhdx", src, out)
    assert result.returncode == 0, result.stderr
    assert info(out)["virtual-size"] == 1024
    qemu_check(out)
    async with trioconv.open_image(out) as drv:
        assert (await drv.pread(0, 1024))[:1000] == src.read_bytes()


# -- broken images ---------------------------------------------------------------------


def patch(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def reseal_header(path: Path, offset: int, log_guid: bytes) -> None:
    raw = path.read_bytes()[offset : offset + codec.HEADER_SIZE]
    h = codec.decode_header(raw)
    assert h is not None
    patch(path, offset, codec.encode_header(attrs.evolve(h, log_guid=log_guid)))


async def open_error(path: Path) -> str:
    with pytest.raises(trioconv.TrioconvError) as exc:
        async with trioconv.open_image(path, "vhdx"):
            pass
    return str(exc.value)


async def test_one_bad_header_is_tolerated(tmp_path: Path) -> None:
    img = qemu_vhdx(tmp_path / "a.vhdx", "4M", "write -P 0x5a 0 1M")
    patch(img, codec.HEADER2_OFFSET + 40, b"\xff")  # header 2: checksum now wrong
    async with trioconv.open_image(img) as drv:
        assert await drv.pread(0, 4) == b"\x5a" * 4


async def test_bad_checksums(tmp_path: Path) -> None:
    img = qemu_vhdx(tmp_path / "a.vhdx", "4M")
    patch(img, codec.HEADER1_OFFSET + 40, b"\xff")
    patch(img, codec.HEADER2_OFFSET + 40, b"\xff")
    assert "No valid VHDX header found" in await open_error(img)
    img2 = qemu_vhdx(tmp_path / "b.vhdx", "4M")
    patch(img2, codec.REGION1_OFFSET + 100, b"\x01")
    assert "region table" in await open_error(img2)
    assert "bad checksum" in await open_error(img2)


async def test_region_beyond_eof(tmp_path: Path) -> None:
    img = qemu_vhdx(tmp_path / "a.vhdx", "4M")
    raw = img.read_bytes()
    regions = codec.decode_region_table(raw[codec.REGION1_OFFSET :])
    moved = [attrs.evolve(r, file_offset=r.file_offset + 1024 * MiB) for r in regions]
    patch(img, codec.REGION1_OFFSET, codec.encode_region_table(moved))
    message = await open_error(img)
    assert "beyond the end of the file" in message


async def test_overlapping_regions(tmp_path: Path) -> None:
    img = qemu_vhdx(tmp_path / "a.vhdx", "4M")
    regions = codec.decode_region_table(img.read_bytes()[codec.REGION1_OFFSET :])
    moved = [attrs.evolve(regions[0], file_offset=codec.HEADER_SECTION_END), regions[1]]
    patch(img, codec.REGION1_OFFSET, codec.encode_region_table(moved))
    assert "overlaps" in await open_error(img)


def metadata_item_offset(path: Path, guid: bytes) -> int:
    raw = path.read_bytes()
    regions = codec.decode_region_table(raw[codec.REGION1_OFFSET :])
    meta = next(r for r in regions if r.guid == codec.METADATA_GUID)
    entries = codec.decode_metadata_table(raw[meta.file_offset :], meta.file_offset)
    return meta.file_offset + entries[guid].offset


@pytest.mark.parametrize("block_size", [0, 3 * MiB, 512 * MiB, 0xFFFFFFFF])
async def test_absurd_block_size(tmp_path: Path, block_size: int) -> None:
    img = qemu_vhdx(tmp_path / "a.vhdx", "4M")
    patch(img, metadata_item_offset(img, codec.FILE_PARAMETERS_GUID), struct.pack("<I", block_size))
    assert "invalid block size" in await open_error(img)


async def test_absurd_virtual_size_and_sector_size(tmp_path: Path) -> None:
    img = qemu_vhdx(tmp_path / "a.vhdx", "4M")
    at = metadata_item_offset(img, codec.VIRTUAL_DISK_SIZE_GUID)
    patch(img, at, struct.pack("<Q", 1 << 62))
    assert "virtual disk size" in await open_error(img)
    img2 = qemu_vhdx(tmp_path / "b.vhdx", "4M")
    patch(img2, metadata_item_offset(img2, codec.LOGICAL_SECTOR_GUID), struct.pack("<I", 1000))
    assert "logical sector size" in await open_error(img2)


async def test_differencing_refused(tmp_path: Path) -> None:
    img = qemu_vhdx(tmp_path / "a.vhdx", "4M")
    at = metadata_item_offset(img, codec.FILE_PARAMETERS_GUID)
    patch(img, at + 4, struct.pack("<I", codec.PARAM_HAS_PARENT))
    assert "differencing" in await open_error(img)


async def test_bat_entry_beyond_eof(tmp_path: Path) -> None:
    img = qemu_vhdx(tmp_path / "a.vhdx", "16M", "write -P 1 0 64k")
    regions = codec.decode_region_table(img.read_bytes()[codec.REGION1_OFFSET :])
    bat = next(r for r in regions if r.guid == codec.BAT_GUID)
    entry = codec.encode_bat_entry(codec.BlockState.FULLY_PRESENT, 4096 * MiB)
    patch(img, bat.file_offset + 8, struct.pack("<Q", entry))
    out = tmp_path / "o.raw"
    result = trioconv_cli("convert", "-O", "raw", img, out)
    assert result.returncode == 1
    assert "beyond the end of the file" in result.stderr
    # Pointing into the metadata is refused too.
    entry = codec.encode_bat_entry(codec.BlockState.FULLY_PRESENT, bat.file_offset)
    patch(img, bat.file_offset + 8, struct.pack("<Q", entry))
    result = trioconv_cli("convert", "-O", "raw", img, out)
    assert result.returncode == 1
    assert "inside the metadata" in result.stderr


def make_log_entry(log_guid: bytes, sequence: int = 1) -> bytes:
    """A one-sector log entry with no descriptors, with a valid checksum."""
    buf = bytearray(codec.LOG_SECTOR)
    struct.pack_into(
        "<4sIIIQII16sQQ", buf, 0, b"loge", 0, codec.LOG_SECTOR, 0, sequence, 0, 0,
        log_guid, 8 * MiB, 8 * MiB,
    )  # fmt: skip
    struct.pack_into("<I", buf, 4, codec.crc32c(buf))
    return bytes(buf)


def dirty_qemu_image(tmp_path: Path, name: str, *writes: str) -> Path:
    """A VHDX that qemu left with a log to replay: its writes to the BAT fail (blkdebug),
    so the BAT updates stay in the log, and ``abort`` ends qemu-io before it cleans up."""
    img = qemu_vhdx(tmp_path / name, "64M")
    regions = codec.decode_region_table(img.read_bytes()[codec.REGION1_OFFSET :])
    bat = next(r for r in regions if r.guid == codec.BAT_GUID)
    conf = tmp_path / "blkdebug.conf"
    conf.write_text(
        f'[inject-error]\nevent = "pwritev"\nsector = "{bat.file_offset // 512}"\nerrno = "5"\n'
    )
    args: list[str | os.PathLike[str]] = [require_tool("qemu-io"), "--image-opts"]
    for w in writes:
        args += ["-c", w]
    args += ["-c", "abort"]
    opts = f"driver=vhdx,file.driver=blkdebug,file.config={conf},file.image.filename={img}"
    run(*args, opts, check=False)
    header = codec.decode_header(img.read_bytes()[codec.HEADER1_OFFSET :][: codec.HEADER_SIZE])
    assert header is not None and header.log_guid != codec.ZERO_GUID, "qemu left no dirty log"
    return img


def qemu_replayed_raw(img: Path, tmp_path: Path) -> Path:
    """What qemu makes of a dirty image: replay on a copy (check -r all), convert."""
    copy = tmp_path / ("qemu-" + img.name)
    copy.write_bytes(img.read_bytes())
    run("qemu-img", "check", "-r", "all", "-f", "vhdx", copy, check=False)
    out = tmp_path / ("qemu-" + img.name + ".raw")
    run("qemu-img", "convert", "-f", "vhdx", "-O", "raw", copy, out)
    return out


async def test_dirty_log_is_replayed_in_memory(tmp_path: Path) -> None:
    img = dirty_qemu_image(tmp_path, "d.vhdx", "write -P 0x5a 0 1M", "write -P 0x6b 9M 64k")
    before = img.read_bytes()
    # qemu refuses it read-only; trioconv replays the log in memory.
    assert "needs to be replayed" in run("qemu-img", "info", img, check=False).stderr
    out = tmp_path / "ours.raw"
    result = trioconv_cli("convert", "-O", "raw", img, out)
    assert result.returncode == 0, result.stderr
    assert_identical(out, qemu_replayed_raw(img, tmp_path))
    assert out.read_bytes()[:2] == b"\x5a\x5a"
    assert img.read_bytes() == before  # a source is never written


async def test_dirty_log_is_replayed_into_a_writable_image(tmp_path: Path) -> None:
    img = dirty_qemu_image(tmp_path, "w.vhdx", "write -P 0x5a 0 1M")
    expected = qemu_replayed_raw(img, tmp_path)
    async with trioconv.open_image(img, "vhdx", writable=True) as drv:
        assert await drv.pread(0, 2) == b"\x5a\x5a"
    for at in (codec.HEADER1_OFFSET, codec.HEADER2_OFFSET):
        h = codec.decode_header(img.read_bytes()[at : at + codec.HEADER_SIZE])
        assert h is not None and h.log_guid == codec.ZERO_GUID
    qemu_check(img)  # qemu now opens it read-only: nothing left to replay
    assert_identical(img, expected, "vhdx", "raw")


def _bat_page(img: Path) -> tuple[int, bytes]:
    regions = codec.decode_region_table(img.read_bytes()[codec.REGION1_OFFSET :])
    bat = next(r for r in regions if r.guid == codec.BAT_GUID)
    return bat.file_offset, img.read_bytes()[bat.file_offset : bat.file_offset + codec.LOG_SECTOR]


def write_log(img: Path, entries: list[bytes]) -> None:
    """Put entries at the start of the log and name their GUID in both headers."""
    guid = codec.decode_log_entry_header(entries[0])
    assert guid is not None
    pos = codec.HEADER_SECTION_END
    for e in entries:
        patch(img, pos, e)
        pos += len(e)
    for offset in (codec.HEADER1_OFFSET, codec.HEADER2_OFFSET):
        reseal_header(img, offset, log_guid=guid.log_guid)


def two_entry_log(img: Path) -> list[bytes]:
    """Entry 1 moves block 0 to data written at the file's end; entry 2 zeroes the
    first 4 KiB of that data area's page in the BAT region... and re-points block 1."""
    bat_at, page = _bat_page(img)
    end = img.stat().st_size
    data_at = -(-end // MiB) * MiB
    patch(img, data_at, b"\x3c" * (8 * MiB))  # block 0's new data (8 MiB blocks)
    guid = uuid.uuid4().bytes_le
    new = bytearray(page)
    struct.pack_into("<Q", new, 0, codec.encode_bat_entry(codec.BlockState.FULLY_PRESENT, data_at))
    e1 = codec.encode_log_entry(
        guid, 5, 0, [codec.LogWrite(bat_at, codec.LOG_SECTOR, bytes(new))], data_at, data_at
    )
    zero = codec.LogWrite(data_at, codec.LOG_SECTOR)  # first 4 KiB of block 0 -> zeroes
    e2 = codec.encode_log_entry(guid, 6, 0, [zero], data_at + 8 * MiB, data_at + 8 * MiB)
    return [e1, e2]


async def test_data_and_zero_descriptors_match_qemu(tmp_path: Path) -> None:
    img = qemu_vhdx(tmp_path / "s.vhdx", "16M")
    write_log(img, two_entry_log(img))
    out = tmp_path / "ours.raw"
    result = trioconv_cli("convert", "-O", "raw", img, out)
    assert result.returncode == 0, result.stderr
    data = out.read_bytes()
    assert data[:4096] == bytes(4096) and data[4096 : 8 * MiB] == b"\x3c" * (8 * MiB - 4096)
    assert_identical(out, qemu_replayed_raw(img, tmp_path))


async def test_damaged_log_sequence_is_refused(tmp_path: Path) -> None:
    img = qemu_vhdx(tmp_path / "c.vhdx", "16M")
    e1, e2 = two_entry_log(img)
    broken = bytearray(e1)
    broken[200] ^= 1  # entry 1's checksum no longer matches; entry 2 still needs it
    write_log(img, [bytes(broken), e2])
    message = await open_error(img)
    assert "log" in message and "bad checksum" in message and "damaged" in message
    result = trioconv_cli("convert", "-O", "raw", img, tmp_path / "o.raw")
    assert result.returncode == 1
    assert "bad checksum" in result.stderr


async def test_truncated_dirty_image_is_refused(tmp_path: Path) -> None:
    img = qemu_vhdx(tmp_path / "t.vhdx", "16M")
    e1, e2 = two_entry_log(img)
    write_log(img, [e1, e2])
    with img.open("r+b") as f:
        f.truncate(img.stat().st_size - 4 * MiB)
    assert "truncated" in await open_error(img)


async def test_log_guid_without_valid_entries_opens(tmp_path: Path) -> None:
    img = qemu_vhdx(tmp_path / "a.vhdx", "4M", "write -P 7 0 4k")
    guid = uuid.uuid4().bytes_le
    entry = bytearray(make_log_entry(guid))
    entry[100] ^= 1  # checksum no longer matches
    patch(img, codec.HEADER_SECTION_END, bytes(entry))
    for offset in (codec.HEADER1_OFFSET, codec.HEADER2_OFFSET):
        reseal_header(img, offset, log_guid=guid)
    async with trioconv.open_image(img) as drv:
        assert await drv.pread(0, 2) == b"\x07\x07"


async def test_not_vhdx(tmp_path: Path) -> None:
    path = tmp_path / "x.raw"
    path.write_bytes(bytes(2 * MiB))
    assert "vhdxfile" in await open_error(path)
    small = tmp_path / "s.raw"
    small.write_bytes(b"vhdxfile" + bytes(100))
    assert "shorter than" in await open_error(small)


async def test_probe(tmp_path: Path) -> None:
    img = qemu_vhdx(tmp_path / "a.vhdx", "4M")
    async with trioconv.open_image(img) as drv:
        assert drv.name == "vhdx"


async def test_read_only_source_not_writable(tmp_path: Path) -> None:
    img = qemu_vhdx(tmp_path / "a.vhdx", "4M")
    async with trioconv.open_image(img) as drv:
        assert not drv.caps.writable
        with pytest.raises(trioconv.UnsupportedError):
            await drv.pwrite(0, b"x")


def test_error_type_is_image_error() -> None:
    assert issubclass(ImageError, trioconv.TrioconvError)


# -- codecs ----------------------------------------------------------------------------

guids = st.binary(min_size=16, max_size=16)
u64 = st.integers(0, 2**64 - 1)
u32 = st.integers(0, 2**32 - 1)
u16 = st.integers(0, 2**16 - 1)


@given(
    st.lists(
        st.tuples(
            st.integers(0, 2**40), st.one_of(st.none(), st.binary(min_size=4096, max_size=4096))
        ),
        max_size=5,
    ),
    st.integers(1, 2**64 - 1),
    guids,
)
def test_log_entry_round_trip(items: list[tuple[int, bytes | None]], seq: int, guid: bytes) -> None:
    writes = [codec.LogWrite(pages * 4096, 4096, data) for pages, data in items]
    raw = codec.encode_log_entry(guid, seq, 0, writes, MiB, MiB)
    entry = codec.decode_log_entry(raw, guid, 64 * MiB, 0)
    assert list(entry.writes) == writes
    assert entry.header.sequence_number == seq
    with pytest.raises(codec.VhdxFormatError, match="bad checksum"):
        codec.decode_log_entry(raw[:-1] + bytes([raw[-1] ^ 1]), guid, 64 * MiB, 0)


def test_crc32c_known_values() -> None:
    assert codec.crc32c(b"123456789") == 0xE3069283
    assert codec.crc32c(b"") == 0
    assert codec.crc32c(bytes(32)) == 0x8A9136AA


@given(st.binary(max_size=300), st.binary(max_size=300))
def test_crc32c_chains(a: bytes, b: bytes) -> None:
    assert codec.crc32c(b, codec.crc32c(a)) == codec.crc32c(a + b)


def _bitwise_crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


@given(st.binary(max_size=100))
def test_crc32c_matches_bitwise(data: bytes) -> None:
    assert codec.crc32c(data) == _bitwise_crc32c(data)


@given(u64, guids, guids, guids, u16, u32, u64)
def test_header_round_trip(
    seq: int, fwg: bytes, dwg: bytes, lg: bytes, lv: int, ll: int, lo: int
) -> None:
    h = codec.Header(seq, fwg, dwg, lg, lv, 1, ll, lo)
    raw = codec.encode_header(h)
    assert len(raw) == codec.HEADER_SIZE
    assert codec.decode_header(raw) == h
    broken = bytearray(raw)
    broken[200] ^= 0x40
    assert codec.decode_header(bytes(broken)) is None


@given(st.lists(st.tuples(guids, u64, u32, st.booleans()), max_size=40))
def test_region_table_round_trip(entries: list[tuple[bytes, int, int, bool]]) -> None:
    regions = [codec.RegionEntry(*e) for e in entries]
    raw = codec.encode_region_table(regions)
    assert codec.decode_region_table(raw) == regions


@given(
    st.integers(0, 8),
    st.sampled_from([512, 4096]),
    st.sampled_from([512, 4096]),
    st.integers(0, 2**26),
    st.booleans(),
    guids,
)
def test_metadata_round_trip(
    bits: int, logical: int, physical: int, sectors: int, fixed: bool, page83: bytes
) -> None:
    meta = codec.Metadata(
        codec.FileParameters(MiB << bits, leave_blocks_allocated=fixed),
        sectors * logical,
        logical,
        physical,
        page83,
    )
    table, items = codec.encode_metadata(meta)
    region = codec.RegionEntry(codec.METADATA_GUID, 3 * MiB, MiB)
    entries = codec.decode_metadata_table(table, region.file_offset)
    lo, hi = codec.item_span(entries, region)
    assert hi - lo == len(items)
    assert codec.decode_metadata_items(entries, items, lo, region) == meta


@given(
    st.lists(st.tuples(st.sampled_from(list(codec.BlockState)), st.integers(0, 2**43)), max_size=64)
)
def test_bat_round_trip(entries: list[tuple[codec.BlockState, int]]) -> None:
    values = [codec.encode_bat_entry(s, mb * MiB) for s, mb in entries]
    table = codec.decode_bat(struct.pack(f"<{len(values)}Q", *values))
    assert [(codec.entry_state(e), codec.entry_offset(e)) for e in table] == [
        (int(s), mb * MiB) for s, mb in entries
    ]
    assert codec.encode_bat(table) == struct.pack(f"<{len(values)}Q", *values)


@given(
    st.integers(0, 2**46),
    st.sampled_from([MiB << i for i in range(9)]),
    st.sampled_from([512, 4096]),
)
def test_bat_interleaving(size: int, block_size: int, sector: int) -> None:
    """Sector bitmap entries come after every chunk_ratio payload entries."""
    ratio = codec.chunk_ratio(block_size, sector)
    count = codec.total_bat_entries(size, block_size, ratio)
    blocks = -(-size // block_size)
    if blocks:
        assert codec.bat_index(blocks - 1, ratio) == count - 1
        indexes = {codec.bat_index(b, ratio) for b in range(min(blocks, 3 * ratio + 2))}
        assert all((i + 1) % (ratio + 1) for i in indexes)
    else:
        assert count == 0

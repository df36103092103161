"""Persistent dirty bitmaps in qcow2: ``--bitmaps``, ``-n`` into images that have some, info.

Source images get their bitmaps from ``qemu-img bitmap`` and their dirty bits from
``qemu-io`` writes (qemu keeps enabled bitmaps up to date). Every result is checked by
qemu: ``qemu-img check`` (no leaks, no errors), ``qemu-img info`` (names, flags,
granularity) and the bits themselves as ``qemu-nbd`` exports them
(``qemu:dirty-bitmap:NAME``, read with ``nbdinfo --map``).
"""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path

import pytest

import trioconv
from trioconv.formats.qcow2 import _bitmaps as bm

from .conftest import assert_identical, qemu_io_run, require_tool, run, trioconv_cli
from .nbd_servers import QemuNbdLauncher

MiB = 1024 * 1024
BITMAPS_EXT = 0x23852875


# -- helpers ---------------------------------------------------------------------------------


def qcow2(path: Path, size: str, *bitmaps: tuple[str, int, bool], opts: str = "") -> Path:
    """A new qcow2 image with bitmaps ``(name, granularity, enabled)``."""
    run("qemu-img", "create", "-q", "-f", "qcow2", *(["-o", opts] if opts else []), path, size)
    for name, granularity, enabled in bitmaps:
        run("qemu-img", "bitmap", "--add", "-g", str(granularity), path, name)
        if not enabled:
            run("qemu-img", "bitmap", "--disable", path, name)
    return path


def info_bitmaps(path: Path) -> list[dict[str, object]]:
    shown = json.loads(run("qemu-img", "info", "-U", "--output=json", path).stdout)
    found: list[dict[str, object]] = shown["format-specific"]["data"].get("bitmaps", [])
    return found


def dirty_map(server: QemuNbdLauncher, image: Path, name: str) -> list[tuple[int, int]]:
    """The dirty ranges of bitmap ``name`` as qemu exports them over NBD."""
    nbdinfo = require_tool("nbdinfo")
    srv = server(image, "qcow2", readonly=True, options=["-B", name])
    try:
        out = run(nbdinfo, "--json", f"--map=qemu:dirty-bitmap:{name}", srv.uri).stdout
    finally:
        srv.stop()
    return [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] & 1]


def check_clean(path: Path) -> None:
    result = run("qemu-img", "check", path, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "No errors were found" in result.stdout and "leaked" not in result.stdout


def directory_offset(path: Path) -> int:
    """Where the bitmap directory is, read from the header extension (independently)."""
    data = path.read_bytes()[:65536]
    pos = struct.unpack_from(">I", data, 100)[0]  # header_length
    while True:
        kind, length = struct.unpack_from(">II", data, pos)
        assert kind, "no bitmaps extension"
        if kind == BITMAPS_EXT:
            return int(struct.unpack_from(">Q", data, pos + 8 + 16)[0])
        pos += 8 + (length + 7) // 8 * 8


def one_error(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """24 MiB qcow2: 'track' (64 KiB, enabled), 'fine' (512 B, enabled), 'frozen'
    (128 KiB, disabled after the first writes), with data written around them."""
    path = qcow2(tmp_path / "src.qcow2", "24M", ("track", 65536, True), ("fine", 512, True))
    qemu_io_run(path, "qcow2", "write -P 1 1M 64k", "write -P 2 5M 300k")
    run("qemu-img", "bitmap", "--add", "-g", "131072", path, "frozen")
    qemu_io_run(path, "qcow2", "write -P 3 9M 4k", "write -P 4 23M 1536")
    run("qemu-img", "bitmap", "--disable", path, "frozen")
    qemu_io_run(path, "qcow2", "write -P 5 12M 1M")
    return path


# -- the codec -------------------------------------------------------------------------------


def test_directory_round_trip() -> None:
    entries = [
        bm.DirectoryEntry(0x30000, 1, bm.AUTO, 1, 16, "a"),
        bm.DirectoryEntry(0x40000, 3, 0, 1, 9, "name-of-eleven", b"xy"),
    ]
    raw = bm.encode_directory(entries)
    assert len(raw) % 8 == 0 and len(raw) == 24 + 8 + 24 + 16
    assert bm.decode_directory(raw, 2) == entries
    body = bm.encode_extension(2, len(raw), 0x50000)
    assert bm.decode_extension(body) == (2, len(raw), 0x50000)


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (bm.encode_directory([bm.DirectoryEntry(0, 0, 1 << 5, 1, 16, "a")]), "reserved flags"),
        (bm.encode_directory([bm.DirectoryEntry(0, 0, 0, 1, 16, "a")] * 2), "used twice"),
        (bm.encode_directory([bm.DirectoryEntry(0, 0, 0, 1, 16, "a")])[:-1], "past the"),
    ],
    ids=["flags", "twice", "short"],
)
def test_directory_refusals(raw: bytes, needle: str) -> None:
    count = 2 if needle == "used twice" else 1
    with pytest.raises(bm.BitmapError, match=needle):
        bm.decode_directory(raw, count)


def test_table_entries() -> None:
    assert bm.decode_table_entry(0, 65536) == (0, False)
    assert bm.decode_table_entry(1, 65536) == (0, True)
    assert bm.decode_table_entry(0x70000, 65536) == (0x70000, False)
    for bad in (0x70001, 1 << 60, 0x70000 | 2, 0x1200):
        with pytest.raises(bm.BitmapError):
            bm.decode_table_entry(bad, 65536)


def test_mark_sets_whole_granules_and_never_the_tail() -> None:
    size = 10 * 65536 + 1  # 11 bits: the last byte has 5 unused bits
    b = bm.Bitmap("x", 16, True, bm.bit_count(size, 16), bytearray(bm.data_size(size, 16)))
    b.mark(65535, 2)  # touches granules 0 and 1
    assert b.data == bytearray([0b11, 0])
    b.mark(3 * 65536, 5 * 65536)
    assert b.data == bytearray([0b1111_1011, 0])
    b.mark(0, 1 << 40)
    assert b.data == bytearray([0xFF, 0b111])


# -- trioconv info -----------------------------------------------------------------------------


def test_info_shows_bitmaps_as_qemu(source: Path) -> None:
    shown = trioconv_cli("info", "--output", "json", source)
    assert shown.returncode == 0, shown.stderr
    ours = json.loads(shown.stdout)["format-specific"]["data"]["bitmaps"]
    assert ours == info_bitmaps(source)
    human = trioconv_cli("info", source).stdout
    expected = run("qemu-img", "info", source).stdout
    assert (
        human.split("Format specific information:")[1]
        == expected.split("Format specific information:")[1].split("Child node")[0]
    )


# -- --bitmaps ---------------------------------------------------------------------------------


@pytest.mark.parametrize("cluster", [None, "4k", "2M"])
def test_bitmaps_are_copied(
    source: Path, tmp_path: Path, qemu_nbd_server: QemuNbdLauncher, cluster: str | None
) -> None:
    out = tmp_path / "out.qcow2"
    opts = ["-o", f"cluster_size={cluster}"] if cluster else []
    result = trioconv_cli("convert", "--bitmaps", "-O", "qcow2", *opts, source, out)
    assert result.returncode == 0, result.stderr
    check_clean(out)
    assert_identical(source, out, "qcow2", "qcow2")
    assert info_bitmaps(out) == info_bitmaps(source)
    for name in ("track", "fine", "frozen"):
        expected = dirty_map(qemu_nbd_server, source, name)
        assert expected, name  # the source really has dirty bits
        assert dirty_map(qemu_nbd_server, out, name) == expected, name


def test_no_create_keeps_target_bitmaps_up_to_date(
    tmp_path: Path, qemu_nbd_server: QemuNbdLauncher
) -> None:
    """Writing into an image with bitmaps: enabled ones get the written ranges, disabled
    ones stay as they were, and nothing leaks (a writer that dropped them would leak)."""
    src = tmp_path / "src.raw"
    run("qemu-img", "create", "-q", "-f", "raw", src, "16M")
    qemu_io_run(src, "raw", "write -P 7 1M 64k", "write -P 8 5M 300k")
    target = qcow2(tmp_path / "t.qcow2", "16M", ("track", 65536, True), ("frozen", 65536, False))
    result = trioconv_cli("convert", "-n", "--target-is-zero", "-O", "qcow2", src, target)
    assert result.returncode == 0, result.stderr
    check_clean(target)
    assert_identical(src, target, "raw", "qcow2")
    assert info_bitmaps(target) == [
        {"flags": ["auto"], "name": "track", "granularity": 65536},
        {"flags": [], "name": "frozen", "granularity": 65536},
    ]
    assert dirty_map(qemu_nbd_server, target, "track") == [
        (MiB, 64 * 1024),
        (5 * MiB, 320 * 1024),  # 300 KiB rounded up to whole 64 KiB granules
    ]
    assert dirty_map(qemu_nbd_server, target, "frozen") == []


def test_bitmaps_into_existing_image(
    source: Path, tmp_path: Path, qemu_nbd_server: QemuNbdLauncher
) -> None:
    target = qcow2(tmp_path / "t.qcow2", "24M", ("mine", 65536, False))
    result = trioconv_cli("convert", "-n", "--bitmaps", "-O", "qcow2", source, target)
    assert result.returncode == 0, result.stderr
    check_clean(target)
    names = [b["name"] for b in info_bitmaps(target)]
    assert names == ["mine", "track", "fine", "frozen"]
    assert dirty_map(qemu_nbd_server, target, "fine") == dirty_map(qemu_nbd_server, source, "fine")
    assert dirty_map(qemu_nbd_server, target, "mine") == []

    # Again: every name exists now. Refused before anything is written.
    before = target.read_bytes()
    line = one_error(trioconv_cli("convert", "-n", "--bitmaps", "-O", "qcow2", source, target))
    assert "Bitmap 'track' already exists" in line
    assert target.read_bytes() == before


def test_inconsistent_bitmap(source: Path, tmp_path: Path) -> None:
    """A bitmap marked in_use (its writer died) is refused, or skipped when asked."""
    at = directory_offset(source)
    with source.open("r+b") as f:  # the first entry's flags: set in_use
        f.seek(at + 12)
        flags = struct.unpack(">I", f.read(4))[0]
        f.seek(at + 12)
        f.write(struct.pack(">I", flags | bm.IN_USE))
    assert info_bitmaps(source)[0]["flags"] == ["in-use", "auto"]
    out = tmp_path / "out.qcow2"
    line = one_error(trioconv_cli("convert", "--bitmaps", "-O", "qcow2", source, out))
    assert "Cannot copy inconsistent bitmap 'track'" in line and "--skip-broken-bitmaps" in line
    assert not out.exists()
    skip = ["--bitmaps", "--skip-broken-bitmaps"]
    result = trioconv_cli("convert", *skip, "-O", "qcow2", source, out)
    assert result.returncode == 0, result.stderr
    assert [b["name"] for b in info_bitmaps(out)] == ["fine", "frozen"]
    check_clean(out)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["-O", "raw"], "Format driver 'raw' does not support bitmaps"),
        (["-O", "vmdk"], "Format driver 'vmdk' does not support bitmaps"),
        (["-O", "qcow2", "-o", "compat=0.10"], "Cannot store dirty bitmaps in qcow2 v2 files"),
        (["-O", "qcow2", "{src}"], "Copying bitmaps only possible with single source"),
        (["-O", "qcow2", "--skip-broken-bitmaps", "--no-bitmaps"], ""),
    ],
    ids=["raw", "vmdk", "v2", "two-sources", "skip-without-bitmaps"],
)
def test_bitmaps_refused(source: Path, tmp_path: Path, args: list[str], needle: str) -> None:
    out = tmp_path / "out.img"
    if "--no-bitmaps" in args:
        args = [a for a in args if a != "--no-bitmaps"]
        line = one_error(trioconv_cli("convert", *args, source, out))
        assert "--skip-broken-bitmaps requires --bitmaps" in line
    else:
        args = [a.replace("{src}", str(source)) for a in args]
        line = one_error(trioconv_cli("convert", "--bitmaps", *args, source, out))
        assert needle in line
    assert not out.exists()


def test_bitmaps_from_a_raw_source(tmp_path: Path) -> None:
    """A source format without persistent bitmaps is refused before the target is
    created, with qemu-img's message."""
    src = tmp_path / "src.raw"
    run("qemu-img", "create", "-q", "-f", "raw", src, "4M")
    out = tmp_path / "out.qcow2"
    # The source is asked first, also when the target format cannot store them either.
    for target in (["-O", "qcow2"], ["-O", "raw"], []):
        line = one_error(trioconv_cli("convert", "--bitmaps", *target, src, out))
        assert line == "trioconv: Source lacks bitmap support"
        assert not out.exists()
        theirs = run("qemu-img", "convert", "--bitmaps", *target, src, out, check=False)
        assert theirs.returncode == 1 and "Source lacks bitmap support" in theirs.stderr
        out.unlink(missing_ok=True)


def test_corrupt_bitmap_directory(source: Path) -> None:
    at = directory_offset(source)
    with source.open("r+b") as f:  # the first entry's table size: one entry too many
        f.seek(at + 8)
        size = struct.unpack(">I", f.read(4))[0]
        f.seek(at + 8)
        f.write(struct.pack(">I", size + 1))
    line = one_error(trioconv_cli("info", source))
    assert "corrupt bitmaps" in line and "'track'" in line


@pytest.mark.parametrize("damage", ["padding", "name-not-utf8", "table-past-eof"])
def test_a_damaged_bitmap_directory_qemu_reads_is_read(
    source: Path, tmp_path: Path, damage: str
) -> None:
    """Damage qemu-img reads past - the padding after an entry, a name that is not
    UTF-8, a bitmap table past the end of the file - does not keep the image's data
    from being converted, nor ``info`` from showing it; only copying bitmaps that
    cannot be read (``--bitmaps``) fails, in one line."""
    at = directory_offset(source)
    with source.open("r+b") as f:
        if damage == "padding":  # the first entry: 24 bytes, then "track", then padding
            f.seek(at + 24 + 5)
            f.write(b"\x01")
        elif damage == "name-not-utf8":
            f.seek(at + 24)
            f.write(b"\xff")
        else:
            f.seek(at)
            f.write(struct.pack(">Q", 1 << 40))
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", source, theirs)
    result = trioconv_cli("convert", "-f", "qcow2", "-O", "raw", source, ours)
    assert result.returncode == 0, result.stderr
    assert ours.read_bytes() == theirs.read_bytes()
    info = trioconv_cli("info", "--output=json", source)  # (JSON: names escaped)
    assert info.returncode == 0, info.stderr
    shown = json.loads(info.stdout)["format-specific"]["data"]["bitmaps"]
    assert len(shown) == 3
    copied = trioconv_cli("convert", "--bitmaps", "-O", "qcow2", source, tmp_path / "b.qcow2")
    if damage == "table-past-eof":
        line = one_error(copied)
        assert "lies past the end of the file" in line
        assert not (tmp_path / "b.qcow2").exists()
    else:
        assert copied.returncode == 0, copied.stderr
        # (Bytes: qemu-img prints the name as it is.)
        check = subprocess.run(["qemu-img", "check", tmp_path / "b.qcow2"], capture_output=True)
        assert check.returncode == 0, check.stdout + check.stderr


async def test_an_interrupted_writer_leaves_bitmaps_in_use_not_leaked(tmp_path: Path) -> None:
    """Bitmaps are marked in use on disk before the first write reaches the image, as
    qemu marks them: a writer killed before it stores them leaves them listed as
    inconsistent, their clusters still counted (``qemu-img check`` finds no leak)."""
    target = qcow2(tmp_path / "t.qcow2", "8M", ("b0", 65536, True))
    run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", target)
    crashed = tmp_path / "crashed.qcow2"
    async with trioconv.open_image(target, "qcow2", writable=True) as image:
        await image.pwrite(2 * MiB, b"\x02" * 65536)
        # What a kill -9 here would leave on disk: the file as it is now.
        crashed.write_bytes(target.read_bytes())
    check = run("qemu-img", "check", "--output=json", crashed, check=False)
    assert check.returncode == 0, check.stdout + check.stderr
    assert not json.loads(check.stdout).get("leaks")
    assert info_bitmaps(crashed)[0]["flags"] == ["in-use", "auto"]
    # The writer that did finish stored them consistent again, the write marked.
    run("qemu-img", "check", "-q", target)
    assert info_bitmaps(target)[0]["flags"] == ["auto"]

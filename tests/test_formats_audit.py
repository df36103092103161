"""Differential checks of the vmdk, vpc, vhdx, vdi and qed drivers against qemu-img.

Each test makes an image with ``qemu-img``/``qemu-io``, damages or bends it the way
images are damaged in the field, and asks the same question of qemu-img and of
trioconv: is it read, and if so as which bytes? Where qemu-img reads an image, trioconv
must read the same bytes; where qemu-img refuses one, trioconv must refuse it too, with
one line on stderr and exit status 1.

Two rules of qemu's that these tests pin down:

* qemu's block layer measures a file in whole 512-byte sectors (``bdrv_getlength``
  rounds the length up), and the format drivers test their offsets against that
  rounded length. A file whose last sector is cut short - a copy that stopped a few
  bytes early - still has every cluster the image maps, and the missing tail reads as
  zeroes.
* qemu's QED driver refuses a table size of one cluster (its test of a table's extent,
  ``qed_check_table_offset``, takes a table whose first and last clusters coincide as
  an overflow), so such an image never opens there.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path

import pytest

from .conftest import create_filled, require_tool, run, trioconv_cli

MiB = 1024 * 1024


def qemu_raw(image: Path, fmt: str, out: Path) -> Path:
    """``qemu-img convert -f FMT -O raw``: the bytes qemu reads."""
    run(require_tool("qemu-img"), "convert", "-f", fmt, "-O", "raw", image, out)
    return out


def trioconv_raw(image: Path, fmt: str, out: Path) -> Path:
    """``trioconv convert -f FMT -O raw``, which must succeed."""
    proc = trioconv_cli("convert", "-f", fmt, "-O", "raw", image, out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return out


def refused(image: Path, fmt: str, out: Path) -> str:
    """The one stderr line of a trioconv conversion that must fail with status 1;
    no target is left behind."""
    proc = trioconv_cli("convert", "-f", fmt, "-O", "raw", image, out)
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    return lines[0]


# Each format with options that put its last allocated cluster at the very end of the
# file, so that cutting the file short cuts into guest data.
CUT_SHORT = [
    pytest.param("qed", "cluster_size=65536", id="qed"),
    pytest.param("vhdx", "block_size=1M", id="vhdx"),
    pytest.param("vmdk", "", id="vmdk"),
    pytest.param("vdi", "", id="vdi"),
]


@pytest.mark.parametrize("cut", [1, 100, 511])
@pytest.mark.parametrize(("fmt", "options"), CUT_SHORT)
def test_a_file_cut_short_inside_its_last_sector_reads_as_qemu_reads_it(
    tmp_path: Path, fmt: str, options: str, cut: int
) -> None:
    """An image whose file lost the last ``cut`` bytes (fewer than a sector) is read
    as qemu reads it: every cluster is still inside the file's sector-rounded length,
    and the lost bytes read as zeroes."""
    image = create_filled(
        tmp_path / f"img.{fmt}",
        fmt,
        "3M",
        "write -P 0x11 0 64k",
        "write -P 0x22 1M 512",
        f"write -P 0x33 {3 * MiB - 64 * 1024} 64k",
        options=options,
    )
    size = image.stat().st_size
    os.truncate(image, size - cut)
    expected = qemu_raw(image, fmt, tmp_path / "qemu.raw")
    got = trioconv_raw(image, fmt, tmp_path / "trioconv.raw")
    assert got.read_bytes() == expected.read_bytes()
    # The cut really reached guest data: the last bytes qemu reads are the zeroes
    # that stand for the lost tail, just after the pattern.
    tail = expected.read_bytes()[-cut - 1 :]
    assert tail[0] == 0x33
    assert tail[1:] == bytes(cut)


@pytest.mark.parametrize(("fmt", "options"), CUT_SHORT)
def test_a_file_cut_by_a_whole_sector_is_refused_or_read_as_qemu_does(
    tmp_path: Path, fmt: str, options: str
) -> None:
    """Cutting a whole sector from the end: where qemu-img refuses the image (its last
    cluster now ends past the file), trioconv refuses it with one line; where qemu-img
    reads it, trioconv reads the same bytes."""
    image = create_filled(
        tmp_path / f"img.{fmt}",
        fmt,
        "3M",
        f"write -P 0x33 {3 * MiB - 64 * 1024} 64k",
        options=options,
    )
    os.truncate(image, image.stat().st_size - 512)
    proc = run(
        require_tool("qemu-img"),
        "convert",
        "-f",
        fmt,
        "-O",
        "raw",
        image,
        tmp_path / "qemu.raw",
        check=False,
    )
    if proc.returncode == 0:
        got = trioconv_raw(image, fmt, tmp_path / "trioconv.raw")
        assert got.read_bytes() == (tmp_path / "qemu.raw").read_bytes()
    else:
        refused(image, fmt, tmp_path / "trioconv.raw")


def test_qed_with_a_table_of_one_cluster_is_refused_as_qemu_refuses_it(
    tmp_path: Path,
) -> None:
    """``qemu-img create -o table_size=1`` makes a QED image that qemu then cannot
    open ("QED table offset is invalid"); trioconv refuses it the same way rather than
    read an image qemu never would."""
    image = create_filled(
        tmp_path / "one.qed", "qed", "8M", options="cluster_size=4096,table_size=1"
    )
    assert struct.unpack_from("<I", image.read_bytes(), 8)[0] == 1  # table_size
    proc = run(
        require_tool("qemu-img"),
        "convert",
        "-f",
        "qed",
        "-O",
        "raw",
        image,
        tmp_path / "qemu.raw",
        check=False,
    )
    assert proc.returncode == 1
    assert "QED table offset is invalid" in proc.stderr
    line = refused(image, "qed", tmp_path / "trioconv.raw")
    assert "table offset is invalid" in line.lower() or "invalid l1 table offset" in line.lower()


def test_qed_with_two_table_clusters_still_reads(tmp_path: Path) -> None:
    """The smallest table qemu accepts, two clusters, reads as qemu reads it."""
    image = create_filled(
        tmp_path / "two.qed",
        "qed",
        "8M",
        "write -P 0x5a 4k 4k",
        "write -z 1M 8k",
        "write -P 0x6b 7M 12k",
        options="cluster_size=4096,table_size=2",
    )
    expected = qemu_raw(image, "qed", tmp_path / "qemu.raw")
    got = trioconv_raw(image, "qed", tmp_path / "trioconv.raw")
    assert got.read_bytes() == expected.read_bytes()


def _patch(path: Path, offset: int, data: bytes) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(data)


def test_qed_with_an_empty_backing_name_has_no_backing_file(tmp_path: Path) -> None:
    """A QED header that sets the backing-file feature but gives a name of no bytes:
    qemu reads the name as an empty string, which names no backing file, and opens
    the image on its own (unallocated clusters read as zeroes)."""
    base = create_filled(tmp_path / "base.raw", "raw", "3M", "write -P 0x44 0 3M")
    image = create_filled(
        tmp_path / "over.qed",
        "qed",
        "3M",
        "write -P 0x55 1M 64k",
        backing=base.name,
        backing_fmt="raw",
    )
    _patch(image, 0x3C, struct.pack("<I", 0))  # backing_filename_size
    expected = qemu_raw(image, "qed", tmp_path / "qemu.raw")
    data = expected.read_bytes()
    assert data[1 * MiB : 1 * MiB + 64 * 1024] == b"\x55" * 64 * 1024
    assert data[:MiB] == bytes(MiB)  # no backing file: zeroes, not 0x44
    got = trioconv_raw(image, "qed", tmp_path / "trioconv.raw")
    assert got.read_bytes() == data
    info = trioconv_cli("info", "--output=json", image)
    assert info.returncode == 0, info.stderr
    assert "backing-filename" not in info.stdout


def test_qed_backing_name_ends_at_its_first_nul(tmp_path: Path) -> None:
    """qemu reads the stored backing name as a C string: bytes after a NUL are not
    part of it. A name stored as ``base.raw\\0YZ`` names ``base.raw``."""
    base = create_filled(tmp_path / "base.raw", "raw", "3M", "write -P 0x44 0 3M")
    run(
        require_tool("qemu-img"),
        "create",
        "-q",
        "-f",
        "qed",
        "-u",
        "-b",
        "base.rawXYZ",
        "-F",
        "raw",
        tmp_path / "over.qed",
        "3M",
    )
    image = tmp_path / "over.qed"
    raw = image.read_bytes()
    at = raw.index(b"base.rawXYZ") + len(b"base.raw")
    _patch(image, at, b"\0")
    assert base.exists()
    expected = qemu_raw(image, "qed", tmp_path / "qemu.raw")
    assert expected.read_bytes() == b"\x44" * 3 * MiB  # read through base.raw
    got = trioconv_raw(image, "qed", tmp_path / "trioconv.raw")
    assert got.read_bytes() == expected.read_bytes()


def test_vmdk_vmfssparse_extent_holding_a_hosted_sparse_file_reads_as_qemu(
    tmp_path: Path,
) -> None:
    """qemu opens a ``VMFSSPARSE`` extent exactly as a ``SPARSE`` one: the file's magic
    decides (a hosted ``KDMV`` sparse file is read; ``COWD`` is the older format).
    A descriptor naming a ``KDMV`` file as ``VMFSSPARSE`` reads the same bytes, and
    ``info`` lists the extent under the kind the descriptor gives."""
    sparse = create_filled(
        tmp_path / "grains.vmdk",
        "vmdk",
        "2M",
        "write -P 0x61 0 512k",
        "write -z 1M 64k",
        "write -P 0x62 1536k 4k",
    )
    descriptor = tmp_path / "vs.vmdk"
    descriptor.write_text(
        "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\n"
        'createType="vmfsSparse"\n# Extent description\n'
        f'RW 4096 VMFSSPARSE "{sparse.name}"\n'
    )
    expected = qemu_raw(descriptor, "vmdk", tmp_path / "qemu.raw")
    assert expected.read_bytes()[:4] == b"aaaa"
    got = trioconv_raw(descriptor, "vmdk", tmp_path / "trioconv.raw")
    assert got.read_bytes() == expected.read_bytes()
    info = trioconv_cli("info", "--output=json", descriptor)
    assert info.returncode == 0, info.stderr
    extents = json.loads(info.stdout)["format-specific"]["data"]["extents"]
    assert [e["format"] for e in extents] == ["VMFSSPARSE"]


@pytest.mark.parametrize("value", ["Fixed", "weird"])
def test_vpc_bad_subformat_is_refused_in_qemus_words(tmp_path: Path, value: str) -> None:
    """An unknown ``-o subformat=`` for vpc gets qemu-img's sentence, and no target."""
    src = create_filled(tmp_path / "src.raw", "raw", "1M")
    qemu = run(
        require_tool("qemu-img"),
        "convert",
        "-O",
        "vpc",
        "-o",
        f"subformat={value}",
        src,
        tmp_path / "q.vhd",
        check=False,
    )
    expected = f"Parameter 'subformat' does not accept value '{value}'"
    assert qemu.returncode == 1 and expected in qemu.stderr
    proc = trioconv_cli("convert", "-O", "vpc", "-o", f"subformat={value}", src, tmp_path / "t.vhd")
    assert proc.returncode == 1
    assert proc.stderr == f"trioconv: {expected}\n"
    assert not (tmp_path / "t.vhd").exists()


def test_a_file_that_is_no_vhd_is_refused_naming_the_footer_offset_once(
    tmp_path: Path,
) -> None:
    """``-f vpc`` on a file with no footer: qemu-img says "invalid VPC image"; trioconv
    says where it looked for the footer, once."""
    not_vhd = tmp_path / "data.bin"
    not_vhd.write_bytes(bytes(range(256)) * 4000)
    proc = run(
        require_tool("qemu-img"),
        "convert",
        "-f",
        "vpc",
        "-O",
        "raw",
        not_vhd,
        tmp_path / "q.raw",
        check=False,
    )
    assert proc.returncode == 1 and "invalid VPC image" in proc.stderr
    line = refused(not_vhd, "vpc", tmp_path / "t.raw")
    footer_at = str(256 * 4000 - 512)
    assert "invalid VHD image" in line
    assert line.count(footer_at) == 1, line


# -- damaged tables: read as qemu reads them, or refused in one line ----------------------

_WRITES = (
    "write -P 0x11 0 64k",
    "write -P 0x22 1M 512",
    "write -z 2M 64k",
    "write -P 0x44 2500k 7k",
)


def _u32(raw: bytes, at: int, endian: str = "<") -> int:
    return int(struct.unpack_from(endian + "I", raw, at)[0])


def _vmdk_damage(raw: bytes) -> list[tuple[str, int, bytes]]:
    gd = _u32(raw, 0x38) * 512
    gt = _u32(raw, gd) * 512
    return [
        ("grain past the end", gt, struct.pack("<I", 0x7FFFFFFF)),
        ("grain in the descriptor", gt, struct.pack("<I", 1)),
        ("grain table past the end", gd, struct.pack("<I", 0x7FFFFFF0)),
        ("grain directory at 0", 0x38, struct.pack("<Q", 0)),
        ("no grain size", 0x14, struct.pack("<Q", 0)),
    ]


def _vpc_damage(raw: bytes) -> list[tuple[str, int, bytes]]:
    bat = int(struct.unpack_from(">Q", raw, 512 + 16)[0])
    return [
        ("block past the end", bat, struct.pack(">I", 0x7FFFFFFF)),
        ("block dropped", bat, struct.pack(">I", 0xFFFFFFFF)),
        # (An entry pointing into other metadata is read through the sector bitmap it
        # then finds there, where qemu-img ignores bitmaps: a documented difference.)
    ]


def _vdi_damage(raw: bytes) -> list[tuple[str, int, bytes]]:
    bmap = _u32(raw, 0x154)
    return [
        ("block past the allocated ones", bmap, struct.pack("<I", 0x7FFF)),
        ("block marked zero", bmap + 4, struct.pack("<I", 0xFFFFFFFE)),
        ("two blocks share one", bmap + 8, struct.pack("<I", 0)),
        ("blocks allocated overstated", 0x184, struct.pack("<I", 1000)),
    ]


def _qed_damage(raw: bytes) -> list[tuple[str, int, bytes]]:
    l1 = int(struct.unpack_from("<Q", raw, 0x28)[0])
    l2 = int(struct.unpack_from("<Q", raw, l1)[0])
    return [
        ("L2 table misaligned", l1, struct.pack("<Q", l2 + 1)),
        ("cluster past the end", l2, struct.pack("<Q", 1 << 40)),
        ("cluster in the header", l2 + 8 * 16, struct.pack("<Q", 0)),
        ("cluster is the L1 table", l2 + 8 * 16, struct.pack("<Q", l1)),
    ]


def _vhdx_damage(raw: bytes) -> list[tuple[str, int, bytes]]:
    bat = 2 * MiB  # where qemu-img puts the BAT of a small image (checked below)
    assert int(struct.unpack_from("<Q", raw, bat)[0]) & 7 == 6
    return [
        ("block in the header section", bat, struct.pack("<Q", 6)),
        ("block past the end", bat + 8, struct.pack("<Q", (1 << 30) | 6)),
        ("block state undefined", bat + 16, struct.pack("<Q", 1)),
        ("block partially present", bat + 16, struct.pack("<Q", (10 << 20) | 7)),
        ("unknown block state", bat + 16, struct.pack("<Q", (10 << 20) | 4)),
    ]


DAMAGE = {
    "vmdk": ("", _vmdk_damage),
    "vpc": ("", _vpc_damage),
    "vdi": ("", _vdi_damage),
    "qed": ("cluster_size=65536", _qed_damage),
    "vhdx": ("block_size=1M", _vhdx_damage),
}


@pytest.mark.parametrize("fmt", list(DAMAGE))
def test_damaged_tables_read_as_qemu_reads_them_or_are_refused(tmp_path: Path, fmt: str) -> None:
    """Table entries pointing past the end of the file, into the metadata, at each
    other, or holding states no writer uses: for each, trioconv either reads exactly the
    bytes qemu-img reads, or refuses the image with one line and status 1 (never a
    traceback, never a hang). Where qemu-img refuses, trioconv refuses too."""
    options, damage = DAMAGE[fmt]
    pristine = create_filled(tmp_path / f"pristine.{fmt}", fmt, "3M", *_WRITES, options=options)
    raw = pristine.read_bytes()
    qemu_img = require_tool("qemu-img")
    outcomes = []
    for what, at, data in damage(raw):
        image = tmp_path / f"damaged.{fmt}"
        image.write_bytes(raw[:at] + data + raw[at + len(data) :])
        q_out, t_out = tmp_path / "q.raw", tmp_path / "t.raw"
        for out in (q_out, t_out):
            out.unlink(missing_ok=True)
        q = run(qemu_img, "convert", "-f", fmt, "-O", "raw", image, q_out, check=False)
        t = trioconv_cli("convert", "-f", fmt, "-O", "raw", image, t_out, timeout=30)
        assert t.returncode in (0, 1), (what, t.stderr)
        assert "Traceback" not in t.stderr, what
        if t.returncode == 1:
            assert len(t.stderr.splitlines()) == 1, (what, t.stderr)
            assert not t_out.exists(), what
        elif q.returncode == 0:
            assert t_out.read_bytes() == q_out.read_bytes(), what
        else:
            pytest.fail(f"{what}: qemu-img refuses ({q.stderr.strip()}), trioconv reads it")
        outcomes.append((what, q.returncode, t.returncode))
    # Every damage was looked at, and the pristine image still reads as qemu reads it.
    assert len(outcomes) == len(damage(raw))
    expected = qemu_raw(pristine, fmt, tmp_path / "qp.raw").read_bytes()
    assert trioconv_raw(pristine, fmt, tmp_path / "tp.raw").read_bytes() == expected


@pytest.mark.parametrize(
    "options", ["", "block_size=1M", "subformat=fixed", "block_state_zero=off"]
)
def test_an_empty_vhdx_is_laid_out_as_qemu_lays_it_out(tmp_path: Path, options: str) -> None:
    """A VHDX of 0 bytes: qemu counts its BAT entries in 32-bit arithmetic, where the
    sector bitmap entries of no payload block, ``(0 - 1) >> chunk_ratio_bits``, wrap
    around to millions; it sizes the BAT region so, and refuses to open an image whose
    BAT region is smaller. trioconv's empty image has qemu's layout, and qemu opens it."""
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"")
    opts = ["-o", options] if options else []
    qemu_img = require_tool("qemu-img")
    run(qemu_img, "convert", "-O", "vhdx", *opts, empty, tmp_path / "q.vhdx")
    proc = trioconv_cli("convert", "-O", "vhdx", *opts, empty, tmp_path / "t.vhdx")
    assert proc.returncode == 0, proc.stderr
    info = json.loads(run(qemu_img, "info", "--output=json", tmp_path / "t.vhdx").stdout)
    assert info["virtual-size"] == 0
    run(qemu_img, "check", tmp_path / "t.vhdx")
    assert (tmp_path / "t.vhdx").stat().st_size == (tmp_path / "q.vhdx").stat().st_size
    # And trioconv reads both back as an empty disk.
    for name in ("q.vhdx", "t.vhdx"):
        out = trioconv_raw(tmp_path / name, "vhdx", tmp_path / f"{name}.raw")
        assert out.stat().st_size == 0

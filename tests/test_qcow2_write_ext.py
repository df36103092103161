"""Writing qcow2 with extended L2 entries (``-o extended_l2=on``) and external data files
(``-o data_file=PATH``, ``data_file_raw=on``).

qemu-img 7.2 is the oracle: the same source converted by qemu-img and by trioconv must
give the same ``qemu-img map`` and, where the host layout is deterministic (no ``-W``),
the same bytes; every image must pass ``qemu-img check`` and compare identical.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

import trioconv
from trioconv._open import create_image
from trioconv.formats.qcow2 import Qcow2Writer
from trioconv.testing import check_driver

from ._qcow2 import (
    RAW_COMMANDS,
    assert_check_clean,
    assert_create_refused,
    assert_refused_like_qemu,
    qemu_info,
)
from .conftest import ImageMaker, assert_identical, qemu_map, require_tool, run, trioconv_cli

MiB = 1024 * 1024


def l2_entries(path: Path) -> list[tuple[int, int, int]]:
    """Every non-empty L2 entry: (guest cluster index, entry, subcluster bitmap)."""
    data = path.read_bytes()
    cluster_bits = struct.unpack_from(">I", data, 20)[0]
    cs = 1 << cluster_bits
    extended = bool(struct.unpack_from(">Q", data, 72)[0] & 16)
    l1_size = struct.unpack_from(">I", data, 36)[0]
    l1_offset = struct.unpack_from(">Q", data, 40)[0]
    size = 16 if extended else 8
    per_table = cs // size
    out = []
    for j in range(l1_size):
        l2 = struct.unpack_from(">Q", data, l1_offset + 8 * j)[0] & 0x00FF_FFFF_FFFF_FE00
        if not l2:
            continue
        for i in range(per_table):
            entry = struct.unpack_from(">Q", data, l2 + size * i)[0]
            bitmap = struct.unpack_from(">Q", data, l2 + size * i + 8)[0] if extended else 0
            if entry or bitmap:
                out.append((j * per_table + i, entry, bitmap))
    return out


def ours(*args: str | Path) -> None:
    result = trioconv_cli("convert", *args)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def raw_source(make_image: ImageMaker) -> Path:
    return make_image("src.img", "8M", *RAW_COMMANDS)


# -- extended L2 ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags",
    [
        [],
        ["-m", "1"],
        ["-W"],
        ["-S", "0"],
        ["-o", "cluster_size=16k"],
        ["-o", "cluster_size=2M"],
        ["-o", "preallocation=metadata"],
        ["-c"],
    ],
    ids=lambda f: " ".join(f) or "default",
)
def test_convert_extended_l2_like_qemu(tmp_path: Path, raw_source: Path, flags: list[str]) -> None:
    theirs, out = tmp_path / "theirs.qcow2", tmp_path / "ours.qcow2"
    args = ["-O", "qcow2", "-o", "extended_l2=on", *flags]
    run("qemu-img", "convert", *args, raw_source, theirs)
    ours(*args, raw_source, out)
    assert_identical(raw_source, out, "raw", "qcow2")
    assert_check_clean(out)
    assert qemu_info(out)["format-specific"] == qemu_info(theirs)["format-specific"]
    assert qemu_info(out)["format-specific"]["data"]["extended-l2"] is True
    if "-W" in flags:
        drop = ("offset",)
        strip = [{k: v for k, v in e.items() if k not in drop} for e in qemu_map(out, "qcow2")]
        assert strip == [
            {k: v for k, v in e.items() if k not in drop} for e in qemu_map(theirs, "qcow2")
        ]
    elif "-c" in flags:
        # Compressed streams differ in size (zlib builds); the subcluster bits must not.
        assert [(i, b) for i, _, b in l2_entries(out)] == [(i, b) for i, _, b in l2_entries(theirs)]
    else:
        assert out.read_bytes() == theirs.read_bytes()


def test_zero_runs_inside_data_clusters_stay_unallocated(tmp_path: Path, raw_source: Path) -> None:
    # qemu-img convert skips zero runs of a new image: the subclusters under them stay
    # unallocated (neither allocated nor zero bits), not written as zero bytes.
    out = tmp_path / "ours.qcow2"
    ours("-O", "qcow2", "-o", "extended_l2=on", raw_source, out)
    entries = {i: b for i, _, b in l2_entries(out)}
    assert entries[4] == 0x3FFFFF  # 256k..300k of data: 22 subclusters of 2 KiB
    assert entries[39] == 0xC  # 4 KiB at 2500k: subclusters 2 and 3
    assert 54 not in entries  # 3500k..3628k of zero bytes: nothing allocated


def test_overlay_with_extended_l2_like_qemu(tmp_path: Path) -> None:
    require_tool("qemu-io")
    base = tmp_path / "base.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "4M")
    run("qemu-io", "-c", "write -P 0x11 0 2M", base)
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top, "4M")
    commands = ["write -P 0x22 512k 256k", "write -z 1M 128k", "write -P 0x44 1600k 4k"]
    commands += ["write -z 3M 128k", "write -P 0x33 3584k 64k"]
    run("qemu-io", *[x for c in commands for x in ("-c", c)], top)
    for extra in ([], ["-o", "preallocation=metadata"]):
        theirs, out = tmp_path / "theirs.qcow2", tmp_path / "ours.qcow2"
        args = ["-B", base.name, "-F", "qcow2", "-O", "qcow2", "-o", "extended_l2=on", *extra]
        run("qemu-img", "convert", *args, top, theirs)
        ours(*args, top, out)
        assert_identical(top, out, "qcow2", "qcow2")
        assert_check_clean(out)
        assert out.read_bytes() == theirs.read_bytes()
        theirs.unlink()
        out.unlink()


@pytest.mark.parametrize(
    "options",
    [
        {"extended_l2": "on"},
        {"extended_l2": "on", "cluster_size": "16k"},
        {"extended_l2": "on", "preallocation": "metadata"},
        {"extended_l2": "on", "preallocation": "falloc"},
        {"extended_l2": "on", "preallocation": "full", "cluster_size": "32k"},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
async def test_create_extended_l2_is_byte_identical(
    tmp_path: Path, options: dict[str, str]
) -> None:
    require_tool("qemu-img")
    out, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    await create_image(out, "qcow2", 5 * MiB + 512, options)
    opt = ",".join(f"{k}={v}" for k, v in options.items())
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opt, theirs, str(5 * MiB + 512))
    assert_check_clean(out)
    assert_identical(out, theirs, "qcow2", "qcow2")
    if options.get("preallocation") in ("falloc", "full"):
        # qemu grows these by truncating, which moves its refcount table: the same
        # clusters and file size, another layout.
        assert out.stat().st_size == theirs.stat().st_size
        drop = ("offset",)
        strip = [{k: v for k, v in e.items() if k not in drop} for e in qemu_map(out, "qcow2")]
        assert strip == [
            {k: v for k, v in e.items() if k not in drop} for e in qemu_map(theirs, "qcow2")
        ]
    else:
        assert out.read_bytes() == theirs.read_bytes()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"extended_l2": "on", "cluster_size": "8k"},
            "Extended L2 entries are only supported with cluster sizes of at least 16384",
        ),
        (
            {"extended_l2": "on", "compat": "0.10"},
            "Extended L2 entries are only supported with compatibility level 1.1",
        ),
        ({"extended_l2": "maybe"}, "Parameter 'extended_l2' expects 'on' or 'off'"),
    ],
)
async def test_extended_l2_refused_like_qemu(
    tmp_path: Path, options: dict[str, str], message: str
) -> None:
    await assert_refused_like_qemu(tmp_path / "bad.qcow2", options, message)


async def test_check_driver_extended_l2(tmp_path: Path) -> None:
    path = tmp_path / "d.qcow2"
    await create_image(path, "qcow2", 5 * MiB + 1234, {"extended_l2": "on", "cluster_size": "16k"})
    async with trioconv.open_image(path, "qcow2", writable=True) as drv:
        assert isinstance(drv, Qcow2Writer)
        await check_driver(drv)
    assert_check_clean(path)


#: qemu-io commands, and the same done through the driver: data, zeroes over nothing,
#: zeroes over data with and without unmap, zeroes in part of a data subcluster.
DRIVER_OPS = (
    ("write", 0, 1024, 1, False),
    ("zero", 64 * 1024, 64 * 1024, 0, False),
    ("write", 200 * 1024, 64 * 1024, 2, False),
    ("zero", 200 * 1024, 64 * 1024, 0, False),
    ("write", 320 * 1024, 64 * 1024, 3, False),
    ("zero", 320 * 1024, 64 * 1024, 0, True),
    ("write", 448 * 1024, 10 * 1024, 4, False),
    ("zero", 450 * 1024, 2 * 1024, 0, False),
    ("zero", 452 * 1024, 1024, 0, False),
    ("write", 453 * 1024 + 100, 3000, 5, False),
    ("write", 512 * 1024 + 700, 100, 6, False),
)


async def test_writes_and_zeroes_set_bits_like_qemu(tmp_path: Path) -> None:
    require_tool("qemu-io")
    theirs, out = tmp_path / "theirs.qcow2", tmp_path / "ours.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", theirs, "1M")
    commands = []
    for op, off, n, pattern, unmap in DRIVER_OPS:
        if op == "write":
            commands.append(f"write -P {pattern} {off} {n}")
        else:
            commands.append(f"write -z {'-u ' if unmap else ''}{off} {n}")
    run("qemu-io", "-f", "qcow2", *[x for c in commands for x in ("-c", c)], theirs)
    await create_image(out, "qcow2", MiB, {"extended_l2": "on"})
    async with trioconv.open_image(out, "qcow2", writable=True) as drv:
        for op, off, n, pattern, unmap in DRIVER_OPS:
            if op == "write":
                await drv.pwrite(off, bytes([pattern]) * n)
            else:
                await drv.pwrite_zeroes(off, n, may_unmap=unmap)
    assert_check_clean(out)
    assert_identical(theirs, out, "qcow2", "qcow2")
    # qemu reuses freed clusters and we do not: compare the bitmaps, not the offsets.
    assert [(i, b) for i, _, b in l2_entries(out)] == [(i, b) for i, _, b in l2_entries(theirs)]


def test_convert_into_existing_extended_l2(tmp_path: Path, raw_source: Path) -> None:
    require_tool("qemu-io")
    target = tmp_path / "existing.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", target, "8M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x99 0 8M", "-c", "write -z 1M 5k", target)
    ours("-n", "-O", "qcow2", raw_source, target)
    assert_identical(raw_source, target, "raw", "qcow2")
    assert_check_clean(target)


async def test_partial_subcluster_writes_over_backing(tmp_path: Path) -> None:
    """A write into part of a subcluster keeps the backing image's bytes around it."""
    require_tool("qemu-io")
    base = tmp_path / "base.raw"
    run("qemu-img", "create", "-q", "-f", "raw", base, "1M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x11 0 1M", base)
    top = tmp_path / "top.qcow2"
    await create_image(
        top,
        "qcow2",
        MiB,
        {"extended_l2": "on", "backing_file": base.name, "backing_fmt": "raw"},
    )
    async with trioconv.open_image(top, "qcow2", writable=True) as drv:
        await drv.pwrite(3000, b"\x22" * 100)
        await drv.pwrite(70000, b"\x33" * 5000)
        await drv.pwrite_zeroes(140000, 300)
    expected = tmp_path / "expected.raw"
    run("qemu-img", "create", "-q", "-f", "raw", expected, "1M")
    cmds = ["write -P 0x11 0 1M", "write -P 0x22 3000 100", "write -P 0x33 70000 5000"]
    cmds.append("write -z 140000 300")
    run("qemu-io", "-f", "raw", *[x for c in cmds for x in ("-c", c)], expected)
    assert_identical(expected, top, "raw", "qcow2")
    assert_check_clean(top)


# -- external data files -------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        "data_file=d.raw",
        "data_file=d.raw,data_file_raw=on",
        "data_file=d.raw,extended_l2=on",
        "data_file=d.raw,data_file_raw=on,extended_l2=on",
        "data_file=d.raw,preallocation=metadata",
        "data_file=d.raw,preallocation=falloc",
        "data_file=d.raw,preallocation=full",
    ],
)
def test_convert_data_file_like_qemu(
    tmp_path: Path, raw_source: Path, options: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A relative data file name is from the working directory (when creating and
    # when opening), in qemu-img and trioconv alike: each runs in its image's folder.
    q, w = tmp_path / "q", tmp_path / "w"
    q.mkdir()
    w.mkdir()
    args = ["-O", "qcow2", "-o", options]
    monkeypatch.chdir(q)
    run("qemu-img", "convert", *args, raw_source, "t.qcow2")
    their_data = qemu_info(q / "t.qcow2")["format-specific"]["data"]
    monkeypatch.chdir(w)
    ours(*args, raw_source, w / "t.qcow2")
    assert_identical(raw_source, w / "t.qcow2", "raw", "qcow2")
    assert_check_clean(w / "t.qcow2")
    data = qemu_info(w / "t.qcow2")["format-specific"]["data"]
    assert data == their_data
    assert data["data-file"] == "d.raw"
    assert data["data-file-raw"] is ("data_file_raw=on" in options)
    assert (w / "t.qcow2").read_bytes() == (q / "t.qcow2").read_bytes()
    assert (w / "d.raw").read_bytes() == (q / "d.raw").read_bytes()
    assert qemu_map(w / "d.raw") == qemu_map(q / "d.raw")
    if "data_file_raw=on" in options:
        assert_identical(raw_source, w / "d.raw")


def test_data_file_raw_stays_raw_through_zeroes(
    tmp_path: Path, raw_source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_tool("qemu-io")
    monkeypatch.chdir(tmp_path)  # where qemu-img looks for the relative data file
    target = tmp_path / "t.qcow2"
    ours("-O", "qcow2", "-o", "data_file=t.data,data_file_raw=on", raw_source, target)
    # Overwrite with a source that has zeroes where the old one had data.
    other = tmp_path / "other.img"
    run("qemu-img", "create", "-q", "-f", "raw", other, "8M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 4M 1M", other)
    ours("-n", "-O", "qcow2", other, target)
    assert_identical(other, target, "raw", "qcow2")
    assert_identical(other, tmp_path / "t.data")
    assert_check_clean(target)
    assert qemu_info(target)["format-specific"]["data"]["data-file-raw"] is True


def test_convert_into_existing_data_file_image(
    tmp_path: Path, raw_source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_tool("qemu-io")
    monkeypatch.chdir(tmp_path)  # where qemu-img looks for the relative data file
    target = tmp_path / "t.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=t.data", target, "8M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x99 0 8M", target)
    ours("-n", "-O", "qcow2", raw_source, target)
    assert_identical(raw_source, target, "raw", "qcow2")
    assert_check_clean(target)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"data_file": "d.raw", "compat": "0.10"},
            "External data files are only supported with compatibility level 1.1",
        ),
        ({"data_file_raw": "on"}, "data-file-raw requires data-file"),
        (
            {
                "data_file": "d.raw",
                "data_file_raw": "on",
                "backing_file": "b.img",
                "backing_fmt": "raw",
            },
            "Backing file and data-file-raw cannot be used at the same time",
        ),
    ],
)
async def test_data_file_refused_like_qemu(
    tmp_path: Path, options: dict[str, str], message: str
) -> None:
    opt = await assert_create_refused(tmp_path / "bad.qcow2", options, message)
    assert not (tmp_path / "d.raw").exists()
    qemu = run(
        "sh",
        "-c",
        f"cd '{tmp_path}' && qemu-img create -u -q -f qcow2 -o {opt} bad.qcow2 1M",
        check=False,
    )
    assert qemu.returncode != 0 and message in qemu.stderr


def test_compression_refused_with_data_file(tmp_path: Path, raw_source: Path) -> None:
    result = trioconv_cli(
        "convert", "-c", "-O", "qcow2", "-o", "data_file=t.data", raw_source, tmp_path / "t.qcow2"
    )
    assert result.returncode == 1
    assert not (tmp_path / "t.qcow2").exists()
    assert not (tmp_path / "t.data").exists()  # beside it, with its stem: removed too


def test_failed_conversion_removes_a_data_file_of_any_name(
    tmp_path: Path, raw_source: Path
) -> None:
    """The data file the conversion created goes with the target; one that was there
    before stays."""
    (tmp_path / "sub").mkdir()
    target = tmp_path / "t.qcow2"
    result = trioconv_cli(
        "convert",
        *("-c", "-O", "qcow2", "-o", "data_file=sub/other.raw", raw_source, target),
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert "compression" in result.stderr.lower(), result.stderr
    assert not target.exists()
    assert not (tmp_path / "sub" / "other.raw").exists()

    kept = tmp_path / "sub" / "kept.raw"
    kept.write_bytes(b"precious")
    result = trioconv_cli(
        "convert",
        *("-c", "-O", "qcow2", "-o", "data_file=sub/kept.raw", raw_source, target),
        cwd=tmp_path,
    )
    assert result.returncode == 1
    assert not target.exists()
    assert kept.exists()  # (made anew, as qemu-img makes it, but not removed)


def test_a_relative_data_file_is_named_from_the_working_directory(
    tmp_path: Path, raw_source: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As in qemu-img, ``-o data_file=NAME`` is a name from the working directory, not
    from the image's folder, when the image is made and when it is opened: each tool
    reads the other's image of an image in another folder."""
    sub = tmp_path / "sub"
    sub.mkdir()
    monkeypatch.chdir(tmp_path)
    args = ["-O", "qcow2"]
    ours(*args, "-o", "data_file=t.data", raw_source, "sub/t.qcow2")
    run("qemu-img", "convert", *args, "-o", "data_file=q.data", raw_source, "sub/q.qcow2")
    assert (tmp_path / "t.data").exists() and not (sub / "t.data").exists()
    for image in ("sub/t.qcow2", "sub/q.qcow2"):
        assert_identical(raw_source, tmp_path / image, "raw", "qcow2")  # qemu-img reads
        ours("-O", "raw", image, "out.raw")
        assert_identical(raw_source, tmp_path / "out.raw")
    # A name with a folder in it is from here too.
    ours(*args, "-o", "data_file=sub/x.data", raw_source, "sub/x.qcow2")
    assert (sub / "x.data").exists()
    assert_identical(raw_source, sub / "x.qcow2", "raw", "qcow2")
    assert_check_clean(sub / "x.qcow2")
    # From another folder the bare name is not found, by either tool.
    monkeypatch.chdir(sub)
    result = trioconv_cli("convert", "-O", "raw", "t.qcow2", tmp_path / "no.raw", cwd=sub)
    assert result.returncode == 1 and "t.data" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    result = run("qemu-img", "convert", "-O", "raw", "t.qcow2", tmp_path / "no.raw", check=False)
    assert result.returncode == 1


# -- internal snapshots --------------------------------------------------------------------


def test_writing_into_image_with_snapshots_copies_on_write(
    tmp_path: Path, raw_source: Path
) -> None:
    """Shared clusters are copied on write (more in test_qcow2_snapshot_write.py)."""
    require_tool("qemu-io")
    target = tmp_path / "s.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", target, "8M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 7 0 1M", target)
    run("qemu-img", "snapshot", "-c", "snap1", target)
    snap = tmp_path / "snap.raw"
    run("qemu-img", "convert", "-l", "snapshot.name=snap1", "-O", "raw", target, snap)
    before = snap.read_bytes()
    result = trioconv_cli("convert", "-n", "-O", "qcow2", raw_source, target)
    assert result.returncode == 0, result.stderr
    assert_check_clean(target)
    assert_identical(raw_source, target, "raw", "qcow2")
    run("qemu-img", "convert", "-l", "snapshot.name=snap1", "-O", "raw", target, snap)
    assert snap.read_bytes() == before

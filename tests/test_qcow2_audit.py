"""qcow2 against qemu-img, case by case: the same conversion done by both must agree.

Each differential case makes its input with qemu-img and qemu-io, converts it with
trioconv and with qemu-img, and asks qemu for the verdict: ``qemu-img compare`` on the
guest bytes, ``qemu-img check`` on trioconv's image and ``qemu-img map`` on where the
data is allocated. Broken images are real ones with a few bytes patched; each must be
refused in one line (exit 1, no traceback) - and an image opened for writing must be
refused *before* trioconv writes anything over its metadata.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import pytest

from ._qcow2 import assert_check_clean
from .conftest import assert_identical, create_filled, make_raw, require_tool, run, trioconv_cli

#: A raw source: data, a hole, written zeroes, small unaligned pieces, data at the very
#: end of a size that is no multiple of any cluster size.
SOURCE = (
    "write -P 0xab 0 300k",
    "write -z 400k 200k",
    "write -P 0x11 1M 1M",
    "write -P 0x22 2500k 4k",
    "write -P 0x33 3M 1536",
    "write -P 0x44 4990k 10k",
)


def _allocation(path: Path) -> list[tuple[int, int, bool, bool]]:
    """``qemu-img map`` as (start, length, data, zero) runs, merged. How the host file
    stores the zeroes inside a data cluster (written, or left a hole) does not matter:
    only whether the guest range is data or reads as zeroes without any."""
    out: list[tuple[int, int, bool, bool]] = []
    raw = run("qemu-img", "map", "--output=json", "-f", "qcow2", path).stdout
    for e in json.loads(raw):
        data, zero = bool(e["data"]), bool(e["zero"]) and not e["data"]
        if out and out[-1][2:] == (data, zero) and out[-1][0] + out[-1][1] == e["start"]:
            out[-1] = (out[-1][0], out[-1][1] + e["length"], data, zero)
        else:
            out.append((e["start"], e["length"], data, zero))
    return out


def _both(src: Path, tmp: Path, *args: str, fmt: str = "raw") -> tuple[Path, Path]:
    """Convert ``src`` to qcow2 with qemu-img and with trioconv (same arguments); both
    must succeed, and the images must read the same and be allocated the same."""
    qemu_img = require_tool("qemu-img")
    theirs, ours = tmp / "theirs.qcow2", tmp / "ours.qcow2"
    run(qemu_img, "convert", "-f", fmt, "-O", "qcow2", *args, src, theirs)
    result = trioconv_cli("convert", "-f", fmt, "-O", "qcow2", *args, src, ours)
    assert result.returncode == 0, result.stderr
    assert_identical(theirs, ours, "qcow2", "qcow2")
    assert_check_clean(ours)
    assert _allocation(ours) == _allocation(theirs)
    return theirs, ours


@pytest.mark.parametrize(
    "args",
    [
        ["-o", "compat=0.10,cluster_size=512"],
        ["-o", "cluster_size=2M,preallocation=full"],
        ["-o", "cluster_size=512,preallocation=metadata,refcount_bits=1"],
        ["-o", "extended_l2=on,cluster_size=2M,preallocation=falloc"],
        # Compressed streams share host clusters, one reference each: with 1- and 2-bit
        # refcounts a cluster is full after one or three streams, and the next starts
        # a new one - as in qemu, byte for byte.
        ["-c", "-o", "refcount_bits=1,cluster_size=512"],
        ["-c", "-o", "refcount_bits=2,cluster_size=4k,compression_type=zstd"],
        ["-c", "-o", "compat=0.10,cluster_size=2M"],
    ],
    ids=lambda args: " ".join(args),
)
def test_converted_like_qemu(tmp_path: Path, args: list[str]) -> None:
    """Options at the edges and in combination, on a size that is no multiple of the
    cluster size: the image trioconv makes reads and is allocated as qemu-img's, and
    its file is as long."""
    src = make_raw(tmp_path / "src.raw", "5000k", *SOURCE)
    theirs, ours = _both(src, tmp_path, *args)
    assert ours.stat().st_size == theirs.stat().st_size


@pytest.mark.parametrize("base", ["b0", "b1"])
def test_three_deep_chain_with_B_like_qemu(tmp_path: Path, base: str) -> None:
    """A chain of three layers with three cluster sizes (4 KiB, 64 KiB, 2 MiB with
    subclusters), the top one larger than those below: ``-B`` to the middle or the
    bottom layer keeps exactly what differs from it, as qemu-img keeps it."""
    b0 = create_filled(
        tmp_path / "b0.qcow2",
        "qcow2",
        "3M",
        "write -P 1 0 1M",
        "write -P 9 2900k 100k",
        options="cluster_size=4k",
    )
    b1 = tmp_path / "b1.qcow2"
    create_filled(
        b1,
        "qcow2",
        "3M",
        "write -P 2 512k 512k",
        "write -z 100k 8k",
        backing=str(b0),
        backing_fmt="qcow2",
    )
    top = tmp_path / "top.qcow2"
    create_filled(
        top,
        "qcow2",
        "4M",
        "write -P 3 600k 4k",
        "write -z 0 32k",
        "write -P 4 3M 100k",
        options="cluster_size=2M,extended_l2=on",
        backing=str(b1),
        backing_fmt="qcow2",
    )
    backing = str(tmp_path / f"{base}.qcow2")
    theirs, ours = _both(top, tmp_path, "-B", backing, "-F", "qcow2", fmt="qcow2")
    for image in (theirs, ours):
        info = json.loads(run("qemu-img", "info", "--output=json", image).stdout)
        assert info["backing-filename"] == backing
    assert ours.stat().st_size == theirs.stat().st_size


@pytest.mark.parametrize(("text", "bits"), [("010", 8), ("0x20", 32), ("+16", 16), (" 4", 4)])
def test_refcount_bits_is_read_as_qemu_reads_numbers(tmp_path: Path, text: str, bits: int) -> None:
    """qemu reads ``refcount_bits`` as a C number: octal with a leading 0, hex with 0x."""
    src = make_raw(tmp_path / "src.raw", "1M", "write -P 1 0 64k")
    theirs, ours = _both(src, tmp_path, "-o", f"refcount_bits={text}")
    for image in (theirs, ours):
        info = json.loads(run("qemu-img", "info", "--output=json", image).stdout)
        assert info["format-specific"]["data"]["refcount-bits"] == bits


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("16x", "Parameter 'refcount_bits' expects a number"),
        ("", "Parameter 'refcount_bits' expects a number"),
        ("99999999999999999999", "Value '99999999999999999999' is too large for parameter"),
        ("-1", "Refcount width must be a power of two and may not exceed 64 bits"),
    ],
)
def test_refcount_bits_refused_like_qemu(tmp_path: Path, text: str, message: str) -> None:
    src = make_raw(tmp_path / "src.raw", "1M")
    option = f"refcount_bits={text}"
    qemu = run("qemu-img", "convert", "-O", "qcow2", "-o", option, src, tmp_path / "q", check=False)
    assert qemu.returncode == 1 and message in qemu.stderr
    ours = tmp_path / "ours.qcow2"
    result = trioconv_cli("convert", "-O", "qcow2", "-o", option, src, ours)
    assert result.returncode == 1
    assert result.stderr == f"trioconv: {message}" + result.stderr.split(message, 1)[1]
    assert result.stderr.count("\n") == 1
    assert not ours.exists()


# -- broken images -----------------------------------------------------------------------

CLUSTER = 65536


def _image(path: Path) -> dict[str, int]:
    """A 4 MiB qcow2 image (64 KiB clusters) with data, a compressed cluster and more
    data; returns where its tables are."""
    create_filled(
        path,
        "qcow2",
        "4M",
        "write -P 1 0 1M",
        "write -c -P 2 2M 64k",
        "write -P 3 3M 64k",
    )
    head = path.read_bytes()[:72]
    l1 = struct.unpack_from(">Q", head, 40)[0]
    table = path.read_bytes()
    l2 = struct.unpack_from(">Q", table, l1)[0] & 0x00FF_FFFF_FFFF_FE00
    return {"l1": l1, "reftable": struct.unpack_from(">Q", head, 48)[0], "l2": l2}


def _patch(path: Path, offset: int, fmt: str, value: int) -> None:
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(struct.pack(fmt, value))


def _refused(result: Any, message: str) -> None:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("trioconv: ")
    assert message in result.stderr, result.stderr


def test_refcount_table_of_size_zero_is_refused(tmp_path: Path) -> None:
    """qemu opens no image without a refcount table, not even to read it."""
    src = tmp_path / "src.qcow2"
    _image(src)
    _patch(src, 56, ">I", 0)
    message = "Image does not contain a reference count table"
    qemu = run("qemu-img", "convert", "-O", "raw", src, tmp_path / "q.raw", check=False)
    assert qemu.returncode == 1 and message in qemu.stderr
    target = tmp_path / "out.raw"
    _refused(trioconv_cli("convert", "-O", "raw", src, target), message)
    assert not target.exists()


def test_data_cluster_past_the_end_of_the_file_is_refused(tmp_path: Path) -> None:
    """An L2 entry that maps a data cluster wholly past the end of the image file (a
    truncated copy, say) is not read as zeroes: the data is gone, and saying so beats a
    silently zeroed disk."""
    src = tmp_path / "src.qcow2"
    where = _image(src)
    _patch(src, where["l2"] + 8, ">Q", 1 << 63 | 0x1000_0000)
    target = tmp_path / "out.raw"
    result = trioconv_cli("convert", "-O", "raw", src, target)
    _refused(result, "data cluster at host offset 0x10000000 lies past the end of the file")
    assert not target.exists()


def test_data_cluster_partly_past_the_end_reads_zeroes_there(tmp_path: Path) -> None:
    """A raw external data file ends where the guest does, which may be inside its last
    cluster: the rest of that cluster reads as zeroes, as in qemu."""
    src = tmp_path / "src.qcow2"
    data = tmp_path / "src.data"
    create_filled(
        src, "qcow2", "1000k", "write -P 7 0 1000k", options=f"data_file={data},data_file_raw=on"
    )
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    run("qemu-img", "convert", "-O", "raw", src, theirs)
    assert trioconv_cli("convert", "-O", "raw", src, ours).returncode == 0
    assert ours.read_bytes() == theirs.read_bytes() == b"\x07" * 1000 * 1024


def _n_into(tmp_path: Path, target: Path) -> Any:
    src = make_raw(tmp_path / "new.raw", "4M", "write -P 0x5a 0 4M")
    return trioconv_cli("convert", "-n", "-O", "qcow2", src, target)


@pytest.mark.parametrize(
    ("how", "message"),
    [
        ("data-over-l1", "would free the image's metadata there"),
        ("l1-is-reftable", "overlaps"),
        ("reftable-is-l1", "overlaps"),
        ("reftable-empty", "Image does not contain a reference count table"),
        ("reftable-past-eof", "refcount table at 0x10000000"),
        ("double-reference", "refcount of host cluster 5 would drop below zero"),
        ("compressed-past-eof", "would drop below zero"),
    ],
)
def test_writing_into_broken_metadata_is_refused_untouched(
    tmp_path: Path, how: str, message: str
) -> None:
    """``-n`` into an image whose tables overlap (a data cluster over the L1 table, the
    L1 table on the refcount table), whose refcounts are missing, or whose refcounts
    do not add up: qemu marks such an image corrupt when a write would land on its
    metadata; trioconv refuses it in one line, before writing anything when the tables
    themselves overlap, and never stores the tables it found broken."""
    target = tmp_path / "target.qcow2"
    where = _image(target)
    if how == "data-over-l1":
        _patch(target, where["l2"], ">Q", 1 << 63 | where["l1"])
    elif how == "l1-is-reftable":
        _patch(target, 40, ">Q", where["reftable"])
    elif how == "reftable-is-l1":
        _patch(target, 48, ">Q", where["l1"])
    elif how == "double-reference":  # two L2 entries map the same data cluster
        _patch(target, where["l2"] + 8, ">Q", 1 << 63 | where["l2"] + CLUSTER + 0x200)
    elif how == "compressed-past-eof":
        _patch(target, where["l2"] + 8 * 32, ">Q", 1 << 62 | 0x1000_0000)
    elif how == "reftable-empty":
        _patch(target, 56, ">I", 0)
    else:
        _patch(target, 48, ">Q", 0x1000_0000)
    before = target.read_bytes()
    _refused(_n_into(tmp_path, target), message)
    if how in ("data-over-l1", "double-reference", "compressed-past-eof"):
        # Refused when a write or free reaches the broken entry: guest data may have
        # gone to other clusters, but the tables found broken are not stored - header,
        # refcounts, L1 and L2 are as they were.
        metadata = where["l2"] + CLUSTER
        assert target.read_bytes()[:metadata] == before[:metadata]
    else:
        assert target.read_bytes() == before  # refused when opened


async def test_freed_clusters_are_discarded_in_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``-n`` into an image with every cluster mapped (``preallocation=metadata``, 512 B
    clusters) frees them all as the zeroes of the source are written: the holes go to
    the file a run of clusters at a time, not one call per cluster (on a 2 GiB image
    that was four million calls, and a write that gave up after a minute)."""
    from trioconv import ConvertOptions, convert
    from trioconv.formats.qcow2 import _writer

    target = create_filled(
        tmp_path / "t.qcow2", "qcow2", "16M", options="cluster_size=512,preallocation=metadata"
    )
    src = make_raw(tmp_path / "src.raw", "16M", "write -P 1 0 64k", "write -P 2 15M 64k")
    calls = 0
    real = _writer._GrowingFile.pwrite_zeroes

    async def counting(self: Any, offset: int, length: int, **kw: bool) -> None:
        nonlocal calls
        calls += 1
        await real(self, offset, length, **kw)

    monkeypatch.setattr(_writer._GrowingFile, "pwrite_zeroes", counting)
    await convert([src], target, ConvertOptions(target_format="qcow2", no_create=True))
    # qemu lays out each L2 table before the 64 data clusters it maps, so a run of
    # freed clusters is at most 64 long: about one call per table, not one per cluster.
    assert calls <= 16 * 1024 * 1024 // 512 // 64 + 16, calls
    assert_identical(src, target, "raw", "qcow2")
    assert_check_clean(target)


async def test_a_write_onto_metadata_is_refused(tmp_path: Path) -> None:
    """A write into a data cluster that an L2 entry places on the L1 table fails before
    a byte is written, and the writer stores no tables when it is closed."""
    from trioconv import TrioconvIOError, open_image

    path = tmp_path / "t.qcow2"
    where = _image(path)
    _patch(path, where["l2"], ">Q", 1 << 63 | where["l1"])
    before = path.read_bytes()
    async with open_image(path, writable=True) as img:
        with pytest.raises(TrioconvIOError, match="would overwrite the image's metadata"):
            await img.pwrite(0, b"x" * 4096)
        with pytest.raises(TrioconvIOError, match="takes no more writes"):
            await img.pwrite(CLUSTER, b"x" * 4096)
    assert path.read_bytes() == before

"""Writing qcow2: new images, conversions into qcow2 (plain and compressed), ``-n`` targets.

qemu-img is the oracle throughout: every image trioconv writes must pass
``qemu-img check`` with no errors and no leaks, read back identical with
``qemu-img compare``, and look like what ``qemu-img create``/``convert`` make
(``qemu-img info``'s format-specific fields, holes left unallocated, sizes).
"""

from __future__ import annotations

import ctypes
import os
import random
import sys
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import pytest
import trio

import trioconv
from trioconv import ExtentKind, UsageError, ZeroesNotSupported
from trioconv._open import create_image
from trioconv.formats.qcow2 import Qcow2Writer, create_qcow2
from trioconv.formats.qcow2 import _codec as codec
from trioconv.formats.qcow2 import _compress as compress
from trioconv.protocols.file import create_file, open_file
from trioconv.testing import check_block_status_tiles, check_driver

from ._qcow2 import (
    RAW_COMMANDS,
    assert_check_clean,
    assert_refused_like_qemu,
    qemu_info,
)
from .conftest import ImageMaker, assert_identical, qemu_map, require_tool, run, trioconv_cli

MiB = 1024 * 1024
GiB = 1024 * MiB

INFO_FIELDS = ("compat", "compression-type", "lazy-refcounts", "refcount-bits", "corrupt")


def info_summary(path: Path) -> dict[str, Any]:
    info = qemu_info(path)
    data = info["format-specific"]["data"]
    out = {key: data.get(key) for key in (*INFO_FIELDS, "extended-l2")}
    out["virtual-size"] = info["virtual-size"]
    out["cluster-size"] = info["cluster-size"]
    out["dirty-flag"] = info["dirty-flag"]
    return out


def allocated(path: Path, fmt: str = "qcow2") -> list[tuple[int, int]]:
    """Guest ranges qemu-img map calls present (allocated in the image)."""
    out: list[tuple[int, int]] = []
    for e in qemu_map(path, fmt):
        if e["present"]:
            start, end = int(e["start"]), int(e["start"]) + int(e["length"])
            if out and out[-1][1] == start:
                out[-1] = (out[-1][0], end)
            else:
                out.append((start, end))
    return out


def qemu_convert(src: Path, out: Path, *args: str) -> Path:
    run("qemu-img", "convert", *args, "-O", "qcow2", src, out)
    return out


def ours_convert(*args: str | os.PathLike[str]) -> None:
    result = trioconv_cli("convert", *args)
    assert result.returncode == 0, result.stderr


async def create_direct(path: Path, size: int, options: dict[str, str]) -> None:
    """Create through the format's own ``create`` (the registry refuses some options)."""
    await create_file(path, 0)
    transport = await open_file(path, writable=True)
    try:
        await create_qcow2(transport, size, options)
    finally:
        await transport.aclose()


# -- creating --------------------------------------------------------------------------

CREATE_VARIANTS = {
    "default": {},
    "v2": {"compat": "0.10"},
    "512": {"cluster_size": "512"},
    "2M": {"cluster_size": "2M"},
    "refcount1": {"refcount_bits": "1"},
    "refcount8-4k": {"refcount_bits": "8", "cluster_size": "4k"},
    "refcount64": {"refcount_bits": "64"},
    "lazy": {"lazy_refcounts": "on"},
    "zstd": {"compression_type": "zstd"},
    "v3-name": {"compat": "v3"},
    "prealloc-metadata": {"preallocation": "metadata"},
    "prealloc-falloc": {"preallocation": "falloc"},
    "prealloc-full": {"preallocation": "full", "cluster_size": "4k"},
}


@pytest.mark.parametrize("size", [0, 1, 3 * MiB + 7, GiB])
async def test_create_default_is_byte_identical(tmp_path: Path, size: int) -> None:
    require_tool("qemu-img")
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    await create_image(ours, "qcow2", size)
    run("qemu-img", "create", "-q", "-f", "qcow2", theirs, str(size))
    assert ours.read_bytes() == theirs.read_bytes()
    assert_check_clean(ours)


@pytest.mark.parametrize("variant", sorted(CREATE_VARIANTS))
async def test_create_matches_qemu_info(tmp_path: Path, variant: str) -> None:
    require_tool("qemu-img")
    options = CREATE_VARIANTS[variant]
    size = 100 * MiB + 512
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    await create_direct(ours, size, options)
    opt = ",".join(f"{k}={v}" for k, v in options.items())
    run("qemu-img", "create", "-q", "-f", "qcow2", *(["-o", opt] if opt else []), theirs, str(size))
    assert info_summary(ours) == info_summary(theirs)
    assert_check_clean(ours)
    assert_identical(ours, theirs, "qcow2", "qcow2")
    if options.get("preallocation", "off") == "off":
        assert allocated(ours) == []
    else:
        assert allocated(ours) == allocated(theirs)
        assert ours.stat().st_size == theirs.stat().st_size


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"compat": "foo"}, "Parameter 'version' does not accept value 'foo'"),
        (
            {"compat": "0.10", "lazy_refcounts": "on"},
            "Lazy refcounts only supported with compatibility level 1.1 and above",
        ),
        (
            {"compat": "0.10", "refcount_bits": "8"},
            "Different refcount widths than 16 bits require compatibility level 1.1",
        ),
        ({"refcount_bits": "3"}, "Refcount width must be a power of two and may not exceed 64"),
        ({"refcount_bits": "128"}, "Refcount width must be a power of two"),
        ({"cluster_size": "1000"}, "Cluster size must be a power of two between 512 and 2048k"),
        ({"cluster_size": "4M"}, "Cluster size must be a power of two between 512 and 2048k"),
        (
            {"extended_l2": "on", "cluster_size": "8k"},
            "Extended L2 entries are only supported with cluster sizes of at least 16384",
        ),
        (
            {"extended_l2": "on", "compat": "0.10"},
            "Extended L2 entries are only supported with compatibility level 1.1",
        ),
        (
            {"compression_type": "zstd", "compat": "0.10"},
            "Non-zlib compression type is only supported with compatibility level 1.1",
        ),
        ({"compression_type": "lz4"}, "Parameter 'compression-type' does not accept value"),
        ({"lazy_refcounts": "maybe"}, "Parameter 'lazy_refcounts' expects 'on' or 'off'"),
    ],
)
async def test_invalid_options_use_qemu_messages(
    tmp_path: Path, options: dict[str, str], message: str
) -> None:
    await assert_refused_like_qemu(tmp_path / "bad.qcow2", options, message)


@pytest.mark.parametrize("key", ["encryption", "encrypt.format"])
async def test_encryption_options_say_encryption_is_not_supported(tmp_path: Path, key: str) -> None:
    """QEMU's encryption options, for a feature trioconv does not have: said so, not
    called unknown."""
    message = f"Encrypted qcow2 images are not supported ('{key}')"
    with pytest.raises(trioconv.UnsupportedError) as refused:
        await trioconv.create_image(tmp_path / "bad.qcow2", "qcow2", MiB, {key: "on"})
    assert str(refused.value) == message
    assert not (tmp_path / "bad.qcow2").exists()


def test_options_help_lists_qcow2_options() -> None:
    result = trioconv_cli("convert", "-O", "qcow2", "-o", "help", "a", "b")
    text = result.stdout + result.stderr
    for key in ("cluster_size", "compat", "refcount_bits", "compression_type", "preallocation"):
        assert key in text


# -- the driver ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [{}, {"compat": "0.10"}, {"cluster_size": "512"}, {"refcount_bits": "2", "cluster_size": "4k"}],
    ids=["default", "v2", "512", "refcount2"],
)
async def test_check_driver(tmp_path: Path, options: dict[str, str]) -> None:
    path = tmp_path / "d.qcow2"
    await create_image(path, "qcow2", 5 * MiB + 1234, options)
    async with trioconv.open_image(path, "qcow2", writable=True) as drv:
        assert isinstance(drv, Qcow2Writer)
        assert drv.caps.writable and drv.caps.zero_init and drv.caps.compress
        await check_driver(drv)
    assert_check_clean(path)


async def test_partial_cluster_writes_read_zero_around(tmp_path: Path) -> None:
    path = tmp_path / "p.qcow2"
    await create_image(path, "qcow2", 4 * MiB)
    expected = bytearray(4 * MiB)
    pieces = [(100, b"\x01" * 10), (65536 + 65000, b"\x02" * 1000), (3 * MiB + 5, b"\x03" * 7)]
    async with trioconv.open_image(path, "qcow2", writable=True) as drv:
        for offset, data in pieces:
            await drv.pwrite(offset, data)
            expected[offset : offset + len(data)] = data
        assert await drv.pread(0, 4 * MiB) == bytes(expected)
        tiles = await check_block_status_tiles(drv)
        assert tiles[0] == (0, 3 * 65536, ExtentKind.DATA)
        await drv.flush()
    assert_check_clean(path)
    raw = tmp_path / "p.raw"
    raw.write_bytes(bytes(expected))
    assert_identical(path, raw, "qcow2", "raw")


async def test_in_order_writes_lay_out_sequentially(tmp_path: Path) -> None:
    path = tmp_path / "s.qcow2"
    await create_image(path, "qcow2", 64 * MiB)
    async with trioconv.open_image(path, "qcow2", writable=True) as drv:
        async with trio.open_nursery() as nursery:
            for i in range(32):
                # Started in order; each write allocates before its first await.
                nursery.start_soon(drv.pwrite, i * MiB, bytes([i + 1]) * MiB)
                await trio.lowlevel.checkpoint()
        await drv.flush()
    entries = qemu_map(path, "qcow2")
    data = [e for e in entries if e["data"]]
    assert len(data) == 1 and data[0]["length"] == 32 * MiB, entries
    assert_check_clean(path)


@pytest.mark.parametrize("compat", ["1.1", "0.10"])
async def test_write_zeroes(tmp_path: Path, compat: str) -> None:
    path = tmp_path / "z.qcow2"
    await create_image(path, "qcow2", 4 * MiB, {"compat": compat})
    async with trioconv.open_image(path, "qcow2", writable=True) as drv:
        await drv.pwrite(0, b"\xee" * (4 * MiB))
        await drv.pwrite_zeroes(MiB, MiB, may_unmap=True)
        await drv.pwrite_zeroes(3 * MiB, 512 * 1024)  # keeps the clusters (v3 zero flag)
        await drv.pwrite_zeroes(100, 1000)  # partial cluster: written as zero bytes
        with pytest.raises(ZeroesNotSupported):
            await drv.pwrite_zeroes(200, 1000, fast=True)
        expected = bytearray(b"\xee" * (4 * MiB))
        expected[100:1100] = bytes(1000)
        expected[MiB : 2 * MiB] = bytes(MiB)
        expected[3 * MiB : 3 * MiB + 512 * 1024] = bytes(512 * 1024)
        assert await drv.pread(0, 4 * MiB) == bytes(expected)
        ext = await drv.block_status(MiB, MiB)
        assert ext.kind is ExtentKind.ZERO and ext.length == MiB
        await drv.flush()
    assert_check_clean(path)
    raw = tmp_path / "z.raw"
    raw.write_bytes(bytes(expected))
    assert_identical(path, raw, "qcow2", "raw")
    present = allocated(path)
    assert (MiB, 2 * MiB) not in present
    assert not any(lo <= MiB < hi for lo, hi in present), "unmapped range still allocated"


async def test_metadata_is_written_on_close_without_flush(tmp_path: Path) -> None:
    path = tmp_path / "c.qcow2"
    await create_image(path, "qcow2", 4 * MiB)
    async with trioconv.open_image(path, "qcow2", writable=True) as drv:
        await drv.pwrite(MiB, b"\x42" * 4096)
    assert_check_clean(path)
    assert allocated(path) == [(MiB, MiB + 65536)]


async def test_huge_virtual_size_with_bounded_memory(tmp_path: Path) -> None:
    """1 TiB virtual, 100 MiB spread over 100 L2 tables: the table cache stays small."""
    require_tool("qemu-io")
    path = tmp_path / "big.qcow2"
    size = 1 << 40
    await create_image(path, "qcow2", size)
    chunk = b"\x5a" * MiB
    offsets = [i * (size // 100) + i * 4096 for i in range(100)]
    tracemalloc.start()
    try:
        async with trioconv.open_image(path, "qcow2", writable=True) as drv:
            for offset in offsets:
                await drv.pwrite(offset, chunk)
            await drv.flush()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 16 * MiB, f"peak traced memory {peak} bytes"
    assert_check_clean(path)
    args: list[str | os.PathLike[str]] = ["qemu-io", "-f", "qcow2"]
    for offset in offsets[::10]:
        args += ["-c", f"read -P 0x5a {offset} 1M", "-c", f"read -P 0 {offset + MiB} 4k"]
    result = run(*args, path)
    assert "Pattern verification failed" not in result.stdout + result.stderr


# -- converting ------------------------------------------------------------------------


@pytest.fixture
def raw_source(make_image: ImageMaker) -> Path:
    return make_image("src.img", "8M", *RAW_COMMANDS)


@pytest.mark.parametrize(
    "flags",
    [[], ["-m", "1"], ["-m", "8"], ["-W"], ["-W", "-m", "16"], ["-S", "0"], ["-S", "64k"]],
    ids=lambda f: " ".join(f) or "default",
)
def test_convert_raw_to_qcow2(tmp_path: Path, raw_source: Path, flags: list[str]) -> None:
    out = tmp_path / "out.qcow2"
    ours_convert(*flags, "-O", "qcow2", raw_source, out)
    assert_identical(raw_source, out, "raw", "qcow2")
    assert_check_clean(out)
    theirs = qemu_convert(raw_source, tmp_path / "theirs.qcow2", *flags)
    assert info_summary(out) == info_summary(theirs)
    if flags != ["-S", "64k"]:  # the engine's -S keeps unaligned zero edges as data
        assert allocated(out) == allocated(theirs)
    if "-W" not in flags and "64k" not in flags:
        assert out.read_bytes() == theirs.read_bytes()


def test_convert_odd_size(tmp_path: Path, make_image: ImageMaker) -> None:
    src = make_image(
        "odd.img", str(5 * MiB + 12345), "write -P 0x77 0 100k", "write -P 0x78 5M 12345"
    )
    out = tmp_path / "odd.qcow2"
    ours_convert("-O", "qcow2", src, out)
    theirs = qemu_convert(src, tmp_path / "theirs.qcow2")
    assert qemu_info(out)["virtual-size"] == qemu_info(theirs)["virtual-size"] == 5 * MiB + 12800
    assert allocated(out) == allocated(theirs)
    assert_identical(src, out, "raw", "qcow2")
    assert_check_clean(out)


def test_convert_concatenated(tmp_path: Path, make_image: ImageMaker) -> None:
    a = make_image("a.img", "1M", "write -P 0x01 0 4k")
    b = make_image("b.img", str(MiB + 512), "write -P 0x02 1000 3000")
    c = make_image("c.img", "2M", "write -P 0x03 1M 1M")
    out = tmp_path / "cat.qcow2"
    ours_convert("-O", "qcow2", a, b, c, out)
    theirs = tmp_path / "cat-theirs.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", a, b, c, theirs)
    assert_identical(theirs, out, "qcow2", "qcow2")
    assert_check_clean(out)


def test_convert_qcow2_source(tmp_path: Path, raw_source: Path) -> None:
    src = qemu_convert(raw_source, tmp_path / "src.qcow2", "-o", "cluster_size=4k")
    out = tmp_path / "out.qcow2"
    ours_convert("-O", "qcow2", "-o", "cluster_size=512", src, out)
    assert_identical(src, out, "qcow2", "qcow2")
    assert_check_clean(out)
    assert allocated(out) == allocated(src)


@pytest.mark.parametrize(
    "options",
    [
        "compat=0.10",
        "cluster_size=512",
        "cluster_size=2M",
        "refcount_bits=1",
        "refcount_bits=64",
        "lazy_refcounts=on",
    ],
)
def test_convert_with_options(tmp_path: Path, raw_source: Path, options: str) -> None:
    out = tmp_path / "out.qcow2"
    ours_convert("-O", "qcow2", "-o", options, raw_source, out)
    assert_identical(raw_source, out, "raw", "qcow2")
    assert_check_clean(out)
    theirs = qemu_convert(raw_source, tmp_path / "theirs.qcow2", "-o", options)
    assert info_summary(out) == info_summary(theirs)
    assert allocated(out) == allocated(theirs)


def test_small_clusters_grow_the_refcount_table(tmp_path: Path, make_image: ImageMaker) -> None:
    # 512-byte clusters with 64-bit refcounts: one refcount table cluster covers 64
    # refcount blocks of 64 clusters, 2 MiB of file; 6 MiB of data needs a bigger table.
    src = make_image("big.img", "8M", "write -P 0x61 0 6M")
    out = tmp_path / "out.qcow2"
    ours_convert("-O", "qcow2", "-o", "cluster_size=512,refcount_bits=64", src, out)
    assert_identical(src, out, "raw", "qcow2")
    assert_check_clean(out)


def test_convert_into_existing_qcow2(tmp_path: Path, raw_source: Path) -> None:
    require_tool("qemu-io")
    target = tmp_path / "existing.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", target, "8M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x99 0 8M", target)
    ours_convert("-n", "-O", "qcow2", raw_source, target)
    assert_identical(raw_source, target, "raw", "qcow2")
    assert_check_clean(target)
    fresh = tmp_path / "fresh.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", fresh, "8M")
    ours_convert("-n", "-W", "-O", "qcow2", raw_source, fresh)
    assert_identical(raw_source, fresh, "raw", "qcow2")
    assert_check_clean(fresh)


# -- compressed ------------------------------------------------------------------------


def compressible_source(make_image: ImageMaker) -> Path:
    """8 MiB: text, random bytes (stored as normal clusters), patterns, holes."""
    text = b"".join(b"line %d of some compressible text\n" % i for i in range(40000))
    src = make_image("c.img", "8M", "write -P 0x11 6M 64k", "write -P 0x22 7M 1000")
    with src.open("r+b") as f:
        f.write(text[: 1200 * 1024])
        f.seek(3 * MiB)
        f.write(os.urandom(300 * 1024))  # does not compress: stored as normal clusters
    return src


@pytest.mark.parametrize(
    "flags",
    [
        [],
        ["-W"],
        ["-m", "1"],
        ["-S", "0"],
        ["-o", "compression_type=zstd"],
        ["-o", "cluster_size=4k"],
    ],
    ids=lambda f: " ".join(f) or "default",
)
def test_convert_compressed(tmp_path: Path, make_image: ImageMaker, flags: list[str]) -> None:
    src = compressible_source(make_image)
    out = tmp_path / "out.qcow2"
    ours_convert("-c", *flags, "-O", "qcow2", src, out)
    assert_identical(src, out, "raw", "qcow2")
    report = assert_check_clean(out)
    assert report["compressed-clusters"] > 0
    theirs = qemu_convert(src, tmp_path / "theirs.qcow2", "-c", *flags)
    # ISA-L's streams (the default encoder) are 1-3% larger than zlib's on this text. A
    # stream that no longer fits in what is left of a host cluster before a normal
    # cluster starts a new host cluster (qemu packs streams the same way), so an image
    # this small can also grow by one cluster.
    cluster = info_summary(theirs)["cluster-size"]
    assert out.stat().st_size <= theirs.stat().st_size * 1.03 + cluster
    assert info_summary(out) == info_summary(theirs)
    assert allocated(out) == allocated(theirs)


def _system_zlib_version() -> str | None:
    try:
        lib = ctypes.CDLL("libz.so.1")
    except OSError:
        return None
    lib.zlibVersion.restype = ctypes.c_char_p
    version: bytes = lib.zlibVersion()
    return version.decode()


@pytest.mark.parametrize(
    "flags",
    [[], ["-m", "1"], ["-S", "0"], ["-o", "cluster_size=4k"]],
    ids=lambda f: " ".join(f) or "default",
)
def test_compressed_zlib_encoder_writes_qemus_bytes(
    tmp_path: Path, make_image: ImageMaker, monkeypatch: pytest.MonkeyPatch, flags: list[str]
) -> None:
    # TRIOCONV_DEFLATE=zlib: the standard library's zlib with qemu's settings, so (in
    # guest order, no -W) the image is qemu-img's byte for byte when both use one zlib.
    if _system_zlib_version() != zlib.ZLIB_RUNTIME_VERSION:
        pytest.skip("Python's zlib is not the system's, which qemu-img uses")
    monkeypatch.setenv(compress.DEFLATE_ENV, "zlib")
    src = compressible_source(make_image)
    out = tmp_path / "out.qcow2"
    ours_convert("-c", *flags, "-O", "qcow2", src, out)
    theirs = qemu_convert(src, tmp_path / "theirs.qcow2", "-c", *flags).read_bytes()
    ours = out.read_bytes()
    # qemu-img's file may end later, in zeroes (up to the next 512-byte boundary).
    assert len(ours) <= len(theirs)
    assert ours == theirs[: len(ours)]
    assert not theirs[len(ours) :].strip(b"\0")


def _far_repeats() -> bytes:
    """Data that a 32 KiB window compresses well and a 4 KiB one hardly at all."""
    block = random.Random(7).randbytes(6000)
    near = b"".join(b"record %06d ok\n" % i for i in range(4096))
    return (block * 11)[:65536] + near[:65536] + (near[:1000] + block) * 10


@pytest.mark.parametrize("encoder", ["zlib", "isal"])
def test_deflate_streams_fit_qemus_window(monkeypatch: pytest.MonkeyPatch, encoder: str) -> None:
    # qemu inflates with a 4 KiB window: a stream must never refer further back.
    if encoder == "isal":
        pytest.importorskip("isal")
    monkeypatch.setenv(compress.DEFLATE_ENV, encoder)
    name, deflate = compress.deflate_backend()
    assert name == encoder
    data = _far_repeats()
    data += bytes(-len(data) % 65536)
    clusters = compress.compress_clusters(memoryview(data), 65536, False, deflate)
    assert any(is_compressed for is_compressed, _ in clusters)
    for k, (is_compressed, stream) in enumerate(clusters):
        plain = data[k * 65536 : (k + 1) * 65536]
        if not is_compressed:
            assert stream == plain
            continue
        d = zlib.decompressobj(-12)
        assert d.decompress(stream, 65536) == plain
        assert d.eof
        assert not d.unused_data


def test_compressed_far_repeats_read_back_by_qemu(tmp_path: Path) -> None:
    # The default encoder's image, read by qemu: compare, check, and convert back to raw.
    data = _far_repeats()
    src = tmp_path / "far.raw"
    src.write_bytes(data + bytes(-len(data) % MiB))
    out = tmp_path / "far.qcow2"
    ours_convert("-c", "-O", "qcow2", src, out)
    assert assert_check_clean(out)["compressed-clusters"] > 0
    assert_identical(src, out, "raw", "qcow2")
    back = tmp_path / "back.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", out, back)
    assert back.read_bytes() == src.read_bytes()


def test_deflate_encoder_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    compress._deflater.cache_clear()
    try:
        monkeypatch.setenv(compress.DEFLATE_ENV, "zlib")
        assert compress.deflate_backend()[0] == "zlib"
        monkeypatch.setenv(compress.DEFLATE_ENV, "gzip")
        with pytest.raises(UsageError, match=compress.DEFLATE_ENV):
            compress.deflate_backend()
        # Without the isal package: zlib, unless isal is asked for by name.
        monkeypatch.setitem(sys.modules, "isal", None)
        compress._deflater.cache_clear()
        monkeypatch.delenv(compress.DEFLATE_ENV)
        assert compress.deflate_backend()[0] == "zlib"
        monkeypatch.setenv(compress.DEFLATE_ENV, "isal")
        with pytest.raises(trioconv.UnsupportedError, match="isal"):
            compress.deflate_backend()
    finally:
        compress._deflater.cache_clear()


def test_compressed_odd_size(tmp_path: Path, make_image: ImageMaker) -> None:
    src = make_image("odd.img", str(3 * MiB + 777), "write -P 0x31 0 3M", "write -P 0x32 3M 777")
    out = tmp_path / "odd.qcow2"
    ours_convert("-c", "-O", "qcow2", src, out)
    assert_identical(src, out, "raw", "qcow2")
    assert_check_clean(out)


async def test_compressed_write_into_allocated_cluster_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.qcow2"
    await create_image(path, "qcow2", MiB)
    async with trioconv.open_image(path, "qcow2", writable=True) as drv:
        await drv.pwrite(0, b"\x01" * 65536)
        prepared = await drv.compress(0, memoryview(bytes(65536)))
        with pytest.raises(trioconv.TrioconvIOError, match="already allocated"):
            await drv.pwrite_compressed(0, prepared)
    assert_check_clean(path)


async def test_overwrite_compressed_cluster_partially(tmp_path: Path) -> None:
    path = tmp_path / "x.qcow2"
    await create_image(path, "qcow2", MiB)
    block = b"abcdefgh" * 8192
    async with trioconv.open_image(path, "qcow2", writable=True) as drv:
        await drv.pwrite_compressed(0, await drv.compress(0, memoryview(block)))
        await drv.pwrite(100, b"\xff" * 50)
        expected = block[:100] + b"\xff" * 50 + block[150:]
        assert await drv.pread(0, 65536) == expected
    assert_check_clean(path)
    raw = tmp_path / "x.raw"
    raw.write_bytes(expected + bytes(MiB - 65536))
    assert_identical(path, raw, "qcow2", "raw")


# -- codec -----------------------------------------------------------------------------


@pytest.mark.parametrize("order", range(7))
def test_refblock_round_trip(order: int) -> None:
    count = 4096 * 8 >> order
    block = codec.refcount_array(order, count)
    top = (1 << (1 << order)) - 1
    for i in range(0, count, 7):
        block[i] = (i * 2654435761) & top
    raw = codec.encode_refblock(block, order)
    assert len(raw) == 4096
    assert codec.decode_refblock(raw, order) == block


def test_sub_byte_refcounts_are_lsb_first() -> None:
    block = codec.refcount_array(0, 64)
    for i in range(13):
        block[i] = 1
    assert codec.encode_refblock(block, 0)[:3] == b"\xff\x1f\x00"


def test_header_encodes_back() -> None:
    header = codec.Header(3, 0, 0, 16, GiB, 0, 2, 0x30000, 0x10000, 1, 0, 0, 0, 1, 0, 4, 112, 0)
    raw = codec.encode_header(header)
    assert len(raw) == 112
    assert codec.parse_header(raw + bytes(8)) == header


def test_compressed_entry_round_trips() -> None:
    layout = codec.Layout(cluster_bits=16)
    entry = codec.compressed_l2_entry(0x12345, 3000, 16)
    decoded = codec.decode_l2_entry(entry, layout)
    assert decoded.kind is codec.ClusterKind.COMPRESSED
    assert decoded.host_offset == 0x12345
    assert decoded.compressed_size >= 3000


def test_preallocated_zero_clusters_are_written_in_place(tmp_path: Path) -> None:
    """Clusters qemu zeroed without freeing (zero flag and a host offset) are reused, as
    qemu reuses them, with zeroes around partial writes; the file does not grow."""
    image = tmp_path / "t.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", image, "4M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 2M", "-c", "write -z 0 2M", image)
    before = {m["start"]: m.get("offset") for m in qemu_map(image, "qcow2")}
    assert before[0] is not None  # zero, but still allocated
    size_before = image.stat().st_size
    src = tmp_path / "src.raw"
    run("qemu-img", "create", "-q", "-f", "raw", src, "4M")
    # Whole clusters, a partial one (1000 bytes into the third cluster), nothing past 2M.
    run("qemu-io", "-f", "raw", "-c", "write -P 7 0 128k", "-c", "write -P 8 132072 1000", src)
    result = trioconv_cli("convert", "-n", "--target-is-zero", "-O", "qcow2", src, image)
    assert result.returncode == 0, result.stderr
    assert_identical(src, image, "raw", "qcow2")
    check = run("qemu-img", "check", image)
    assert "No errors were found" in check.stdout and "leaked" not in check.stdout
    after = qemu_map(image, "qcow2")
    first = next(m for m in after if m["start"] == 0)
    assert first["data"] and first["offset"] == before[0]  # the same host cluster
    assert image.stat().st_size == size_before


def test_a_petabyte_of_nothing_converts_at_once(tmp_path: Path, qemu_img: str) -> None:
    """A 1 PiB qcow2 holding 164 KiB: block status skips L1 entries without tables and
    the engine skips zero runs on a new image whole, so the time depends on the data,
    not on the virtual size (a million status calls and four million zero jobs before)."""
    src = tmp_path / "huge.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", "-o", "cluster_size=2M", src, "4M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 64k", "-c", "write -P 0x22 2M 100k", src)
    with src.open("r+b") as f:  # 1 PiB, with the L1 table to match (zeroes after)
        f.seek(24)
        f.write((1 << 50).to_bytes(8, "big"))
        f.seek(36)
        f.write((2048).to_bytes(4, "big"))
    out = tmp_path / "out.qcow2"
    result = trioconv_cli("convert", "-O", "qcow2", src, out, timeout=30)
    assert result.returncode == 0, result.stderr
    # (qemu-img compare and map take seconds over a petabyte; qemu-io reads the data)
    run(
        "qemu-io", "-f", "qcow2", "-c", "read -P 0x11 0 64k", "-c", "read -P 0 64k 1984k",
        "-c", "read -P 0x22 2M 100k", "-c", "read -P 0 2148k 1948k", out,
    )  # fmt: skip
    assert_check_clean(out)
    assert qemu_info(out)["virtual-size"] == 1 << 50
    assert out.stat().st_size < 32 * MiB  # (mostly the refcount table a petabyte needs)

    async def walk() -> int:
        async with trioconv.open_image(src, "qcow2") as drv:
            return len(await check_block_status_tiles(drv))

    assert trio.run(walk) <= 8  # data, zeroes, data, then one extent to the end


@pytest.mark.parametrize(
    ("size", "commands", "flags"),
    [
        # The last data cluster written in part (an image size that is no multiple of it).
        ("1000001", ["write -P 0x11 0 1000001"], []),
        # -S splitting the last data cluster: data at its start, zeroes after.
        ("4M", ["write -P 0x11 0 1M", "write -P 0x22 3M 4k"], []),
        # Compressed streams packed into the last cluster: rounded up to a sector.
        ("64M", ["write -P 0x11 0 4k", "write -P 0x22 1M 3k"], ["-c"]),
    ],
)
def test_the_file_ends_where_qemu_img_ends_it(
    make_image: ImageMaker, tmp_path: Path, size: str, commands: list[str], flags: list[str]
) -> None:
    """The file's length is qemu-img's: a last data cluster written in part reaches its
    end (qemu-img writes the rest as zeroes; the image end offset ``check`` reports is
    the file's end), and after ``-c`` the file ends on a sector boundary."""
    src = make_image("src.raw", size, *commands)
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    result = trioconv_cli("convert", *flags, "-O", "qcow2", src, ours)
    assert result.returncode == 0, result.stderr
    run("qemu-img", "convert", *flags, "-O", "qcow2", src, theirs)
    assert ours.stat().st_size == theirs.stat().st_size
    assert ours.stat().st_size % 512 == 0
    assert_check_clean(ours)
    assert_identical(src, ours, "raw", "qcow2")

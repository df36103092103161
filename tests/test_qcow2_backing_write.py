"""``convert -B FILE -F FMT``: qcow2 targets that are overlays on a backing file.

qemu-img 7.2 is the oracle. With a backing file for the target it asks the source only
about its top layer: what that layer does not hold is left unallocated in the target
(the backing file shows through), its data is copied, and its zero clusters are written
as zero clusters - a new overlay does not read as zeroes. Every test converts the same
source with qemu-img and with trioconv and wants the same ``qemu-img map`` (which ranges
are allocated, at which depth, even at which host offsets), the same header (backing
file name as given, backing format extension), a clean ``qemu-img check`` and contents
identical to the source's when read through the target's chain.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import trioconv
from trioconv import ExtentKind
from trioconv._open import create_image
from trioconv.convert.pipeline import Chunker, RunKind
from trioconv.formats.qcow2 import Qcow2Writer

from .conftest import assert_identical, qemu_map, require_tool, run, trioconv_cli, walk_extents

MiB = 1024 * 1024

#: The top layer: data over the base's data and past it, zero clusters over the base's
#: data and over nothing, and ranges left unallocated (the base shows through).
TOP_COMMANDS = (
    "write -P 0x22 512k 256k",
    "write -z 1M 128k",
    "write -P 0x44 1600k 4k",
    "write -z 3M 128k",
    "write -P 0x33 3584k 64k",
)


def qemu_info(path: Path) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(run("qemu-img", "info", "--output=json", path).stdout)
    return info


def backing_fields(path: Path) -> dict[str, Any]:
    info = qemu_info(path)
    keys = ("virtual-size", "cluster-size", "backing-filename", "backing-filename-format")
    out = {key: info.get(key) for key in keys}
    out["format-specific"] = info["format-specific"]
    out["dirty-flag"] = info["dirty-flag"]
    return out


def assert_check_clean(path: Path) -> None:
    result = run("qemu-img", "check", "--output=json", "-f", "qcow2", path, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report.get("leaks", 0) == 0 and report.get("corruptions", 0) == 0, report


def one_error(result: Any) -> str:
    assert result.returncode == 1, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    line: str = lines[0]
    assert line.startswith("trioconv: ")
    return line.removeprefix("trioconv: ")


def qemu_error(*args: str | Path) -> str:
    result = run("qemu-img", "convert", *args, check=False)
    assert result.returncode == 1, result.stderr
    line: str = result.stderr.strip().splitlines()[0]
    return line.removeprefix("qemu-img: ")


def make_chain(folder: Path, base_fmt: str = "qcow2", base_size: str = "4M") -> Path:
    """A qcow2 overlay over a base with data in its first 2 MiB; returns the overlay."""
    require_tool("qemu-img")
    require_tool("qemu-io")
    base = folder / f"base.{base_fmt}"
    run("qemu-img", "create", "-q", "-f", base_fmt, base, base_size)
    run("qemu-io", "-f", base_fmt, "-c", "write -P 0x11 0 2M", base)
    top = folder / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", base_fmt, top, "4M")
    args: list[str | Path] = ["qemu-io"]
    for command in TOP_COMMANDS:
        args += ["-c", command]
    run(*args, top)
    return top


def both(source: Path, *args: str) -> tuple[Path, Path]:
    """Convert ``source`` with qemu-img and with trioconv (same options); the targets."""
    folder = source.parent
    theirs, ours = folder / "theirs.qcow2", folder / "ours.qcow2"
    run("qemu-img", "convert", *args, source, theirs)
    result = trioconv_cli("convert", *args, source, ours)
    assert result.returncode == 0, result.stderr
    return theirs, ours


def assert_like_qemu(
    source: Path, theirs: Path, ours: Path, *, offsets: bool = True, holes: bool = False
) -> None:
    """``ours`` holds ``source``'s content, passes check and is laid out as qemu-img's
    ``theirs``. ``holes``: a cluster may hold file holes where qemu-img's holds
    written zero bytes (``zero`` then differs within data; the clusters are the same)."""
    assert_identical(source, ours, "qcow2", "qcow2")
    assert_check_clean(ours)
    assert backing_fields(ours) == backing_fields(theirs)
    drop = (() if offsets else ("offset",)) + (("zero", "offset") if holes else ())

    def layout(path: Path) -> list[dict[str, Any]]:
        merged: list[dict[str, Any]] = []
        for e in qemu_map(path, "qcow2"):
            e = {k: v for k, v in e.items() if k not in drop}
            last = merged[-1] if merged else None
            same = last is not None and all(
                last[k] == e[k] for k in e if k not in ("start", "length", "offset")
            )
            if holes and same and last is not None:
                last["length"] += e["length"]
            else:
                merged.append(e)
        return merged

    assert layout(ours) == layout(theirs)


# -- the overlay is like qemu-img's --------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([], id="default"),
        pytest.param(["-W"], id="W"),
        pytest.param(["-m", "1"], id="m1"),
        pytest.param(["-W", "-m", "16"], id="W-m16"),
        pytest.param(["-S", "0"], id="S0"),
        pytest.param(["-o", "cluster_size=4k"], id="cluster-4k"),
        pytest.param(["-o", "cluster_size=2M"], id="cluster-2M"),
    ],
)
@pytest.mark.parametrize("base_fmt", ["qcow2", "raw"])
def test_overlay_like_qemu(tmp_path: Path, base_fmt: str, extra: list[str]) -> None:
    top = make_chain(tmp_path, base_fmt)
    args = ["-O", "qcow2", *extra, "-B", f"base.{base_fmt}", "-F", base_fmt]
    theirs, ours = both(top, *args)
    # With -W writes finish in any order, and so are the clusters laid out. With 2 MiB
    # clusters, the zeroes in the second one make it a zero cluster first (the backing
    # reads as zeroes there), and the data written into it later leaves the rest of it a
    # hole in the file, where qemu-img writes zero bytes.
    big = extra == ["-o", "cluster_size=2M"]
    assert_like_qemu(top, theirs, ours, offsets="-W" not in extra, holes=big)
    # The shared ranges stay with the backing file (depth 1), the top layer's zero
    # clusters are zero clusters in the target (depth 0, zero).
    entries = qemu_map(ours, "qcow2")
    if extra != ["-o", "cluster_size=2M"]:  # with 2M clusters the top holds all of the data
        assert any(e["depth"] == 1 and e["data"] for e in entries)
    if extra not in (["-S", "0"], ["-o", "cluster_size=2M"]):  # -S 0: zeroes as data
        assert any(e["depth"] == 0 and e["zero"] and e["present"] for e in entries)
    info = qemu_info(ours)
    assert info["backing-filename"] == f"base.{base_fmt}"
    assert info["backing-filename-format"] == base_fmt


def test_compressed_overlay(tmp_path: Path) -> None:
    top = make_chain(tmp_path)
    theirs, ours = both(top, "-O", "qcow2", "-c", "-B", "base.qcow2", "-F", "qcow2")
    assert_like_qemu(top, theirs, ours, offsets=False)
    check = json.loads(run("qemu-img", "check", "--output=json", ours).stdout)
    assert check["compressed-clusters"] > 0


def test_compat_v2_overlay(tmp_path: Path) -> None:
    """Version 2 has no zero clusters: the top layer's zeroes are written as data."""
    top = make_chain(tmp_path)
    theirs, ours = both(top, "-O", "qcow2", "-o", "compat=0.10", "-B", "base.qcow2", "-F", "qcow2")
    assert_like_qemu(top, theirs, ours, offsets=False)


@pytest.mark.parametrize("m", ["8", "16"])
def test_compat_v2_overlay_layout_is_qemus(tmp_path: Path, m: str) -> None:
    """Zeroes written as data take their clusters in turn, as data does: same file."""
    require_tool("qemu-io")
    base, top = tmp_path / "base.qcow2", tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "8M")
    run("qemu-io", "-c", "write -P 0x11 0 8M", base)
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", top, "8M")
    # Many small data runs, each followed by a zero run: every zero job is queued on
    # the writer's lock together with the data job after it.
    args: list[str | Path] = ["qemu-io"]
    for i in range(32):
        args += ["-c", f"write -P {i + 1} {i * 256}k 64k", "-c", f"write -z {i * 256 + 64}k 128k"]
    run(*args, top)
    opts = ["-m", m, "-O", "qcow2", "-o", "compat=0.10", "-B", base.name, "-F", "qcow2"]
    theirs, ours = both(top, *opts)
    assert_like_qemu(top, theirs, ours)
    assert ours.read_bytes() == theirs.read_bytes()


async def test_v2_zeroes_allocate_in_call_order(tmp_path: Path) -> None:
    """pwrite_zeroes that writes zero bytes allocates on entry, before a later pwrite."""
    require_tool("qemu-img")
    run("qemu-img", "create", "-q", "-f", "raw", tmp_path / "base.raw", "1M")
    path = tmp_path / "v2.qcow2"
    opts = {"compat": "0.10", "backing_file": "base.raw", "backing_fmt": "raw"}
    await create_image(path, "qcow2", MiB, opts)
    async with trioconv.open_image(path, "qcow2", writable=True) as drv:
        assert isinstance(drv, Qcow2Writer)
        # Both calls queue on the allocation lock, the zeroes first; the lock is let go
        # (and the nursery waits for them) once both wait.
        async with trio.open_nursery() as nursery, drv._lock:
            nursery.start_soon(partial(drv.pwrite_zeroes, 0, 64 * 1024, may_unmap=True))
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(drv.pwrite, 64 * 1024, b"\x55" * (64 * 1024))
            await trio.testing.wait_all_tasks_blocked()
        await drv.flush()
    entries = [e for e in qemu_map(path, "qcow2") if e["depth"] == 0 and e["present"]]
    assert entries == [
        {
            "start": 0,
            "length": 128 * 1024,
            "depth": 0,
            "present": True,
            "zero": False,
            "data": True,
            "offset": entries[0]["offset"],
        }
    ], entries
    assert_check_clean(path)


def test_o_backing_file_is_like_B(tmp_path: Path) -> None:
    top = make_chain(tmp_path)
    theirs, ours = both(top, "-O", "qcow2", "-o", "backing_file=base.qcow2,backing_fmt=qcow2")
    assert_like_qemu(top, theirs, ours)
    assert qemu_info(ours)["backing-filename"] == "base.qcow2"


def test_B_overrides_o_backing_file(tmp_path: Path) -> None:
    top = make_chain(tmp_path)
    run("qemu-img", "create", "-q", "-f", "qcow2", tmp_path / "other.qcow2", "4M")
    args = ["-O", "qcow2", "-o", "backing_file=other.qcow2,backing_fmt=qcow2"]
    theirs, ours = both(top, *args, "-B", "base.qcow2", "-F", "qcow2")
    assert_like_qemu(top, theirs, ours)
    assert qemu_info(ours)["backing-filename"] == "base.qcow2"


def test_short_backing_file(tmp_path: Path) -> None:
    """Past the end of the target's backing file the source's zeroes are left alone."""
    top = make_chain(tmp_path, "qcow2", base_size="2M")
    theirs, ours = both(top, "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2")
    assert_like_qemu(top, theirs, ours)


def test_backing_file_ending_inside_a_cluster(tmp_path: Path) -> None:
    """A backing file that ends inside a target cluster: the zeroes the source puts
    before its end make that cluster a zero cluster (the rest of it reads as zeroes
    anyway), as in qemu-img's overlay, not a data cluster of zero bytes."""
    require_tool("qemu-io")
    src = tmp_path / "src.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", src, "8M")
    base = tmp_path / "base.qcow2"
    end = 7 * MiB + 1536
    run("qemu-img", "create", "-q", "-f", "qcow2", base, str(end))
    run("qemu-io", "-f", "qcow2", "-c", f"write -P 5 0 {end}", base)
    args = ["-O", "qcow2", "-o", "cluster_size=16k", "-B", "base.qcow2", "-F", "qcow2"]
    theirs, ours = both(src, *args)
    assert_like_qemu(src, theirs, ours)
    assert not any(e["data"] for e in qemu_map(ours, "qcow2"))


@pytest.mark.parametrize("base_fmt", ["raw", "qcow2"])
def test_zeroes_over_backing_zeroes_make_a_zero_cluster(tmp_path: Path, base_fmt: str) -> None:
    """Zeroes the source's top layer holds in part of a target cluster whose rest reads
    as zeroes through the backing image: a zero cluster, as qemu-img makes it, not a
    data cluster of zero bytes; where the backing holds data around them, a data
    cluster (the backing's bytes copied around the zeroes)."""
    require_tool("qemu-io")
    base = tmp_path / f"base.{base_fmt}"
    run("qemu-img", "create", "-q", "-f", base_fmt, base, "1M")
    run("qemu-io", "-f", base_fmt, "-c", "write -P 0x11 0 64k", base)
    src = tmp_path / "src.qcow2"
    opts = ["-o", "cluster_size=512", "-b", base.name, "-F", base_fmt]
    run("qemu-img", "create", "-q", "-f", "qcow2", *opts, src)
    run("qemu-io", "-f", "qcow2", "-c", "write -P 0 128k 512", "-c", "write -P 0 32k 512", src)
    theirs, ours = both(src, "-O", "qcow2", "-B", base.name, "-F", base_fmt)
    assert_like_qemu(src, theirs, ours)
    top = [e for e in qemu_map(ours, "qcow2") if e["depth"] == 0]
    assert [(e["start"], e["data"], e["zero"]) for e in top] == [
        (0, True, False),
        (128 * 1024, False, True),
    ]


def test_raw_source(tmp_path: Path) -> None:
    """A raw source holds everything itself: all of it is copied (zeroes as zero clusters)."""
    require_tool("qemu-io")
    make_chain(tmp_path)
    src = tmp_path / "src.img"
    run("qemu-img", "create", "-q", "-f", "raw", src, "4M")
    run("qemu-io", "-f", "raw", "-c", "write -P 0x44 1M 128k", "-c", "write -P 0 2M 64k", src)
    theirs, ours = both(src, "-f", "raw", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2")
    assert_identical(src, ours, "raw", "qcow2")
    assert_check_clean(ours)
    assert qemu_map(ours, "qcow2") == qemu_map(theirs, "qcow2")
    assert all(e["depth"] == 0 and e["present"] for e in qemu_map(ours, "qcow2"))


def test_source_without_backing(tmp_path: Path) -> None:
    """Unallocated ranges of a source with no backing read as zeroes: written as zeroes."""
    require_tool("qemu-io")
    make_chain(tmp_path)
    src = tmp_path / "lone.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", src, "4M")
    run("qemu-io", "-c", "write -P 0x55 0 64k", "-c", "write -z 1M 64k", src)
    theirs, ours = both(src, "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2")
    assert_like_qemu(src, theirs, ours)
    assert not any(e["depth"] == 1 for e in qemu_map(ours, "qcow2"))


def test_backing_file_in_another_folder(tmp_path: Path) -> None:
    """The name is stored as given and resolved from the target's folder."""
    top = make_chain(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    ours = out / "ours.qcow2"
    result = trioconv_cli("convert", "-O", "qcow2", "-B", "../base.qcow2", "-F", "qcow2", top, ours)
    assert result.returncode == 0, result.stderr
    assert qemu_info(ours)["backing-filename"] == "../base.qcow2"
    assert_identical(top, ours, "qcow2", "qcow2")


def test_no_create_with_backing(tmp_path: Path) -> None:
    """``-n -B``: the existing target's header is left alone, unallocated ranges too."""
    top = make_chain(tmp_path)
    theirs, ours = tmp_path / "theirs.qcow2", tmp_path / "ours.qcow2"
    for target in (theirs, ours):
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", target)
    args = ["-n", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2"]
    run("qemu-img", "convert", *args, top, theirs)
    result = trioconv_cli("convert", *args, top, ours)
    assert result.returncode == 0, result.stderr
    assert_like_qemu(top, theirs, ours)


def test_library_progress_counts_backing_as_skipped(tmp_path: Path) -> None:
    top = make_chain(tmp_path)
    target = tmp_path / "lib.qcow2"
    opts = trioconv.ConvertOptions(
        target_format="qcow2", backing_file="base.qcow2", backing_format="qcow2"
    )
    result = trio.run(trioconv.convert, top, target, opts)
    assert result.total == 4 * MiB
    assert result.written + result.zeroed + result.skipped == result.total
    # 4k written at 1600k allocated a whole cluster in the top layer (copy on write).
    assert result.written == 256 * 1024 + 64 * 1024 + 64 * 1024
    assert result.zeroed == 2 * 128 * 1024
    assert_identical(top, target, "qcow2", "qcow2")


# -- errors: one line, exit 1, no target ---------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["-O", "qcow2", "-B", "missing.qcow2", "-F", "qcow2"], id="missing"),
        pytest.param(["-O", "qcow2", "-B", "base.qcow2"], id="no-F"),
        pytest.param(["-O", "qcow2", "-o", "backing_file=base.qcow2"], id="o-no-fmt"),
        pytest.param(["-O", "raw", "-B", "base.qcow2", "-F", "qcow2"], id="raw-B"),
        pytest.param(["-O", "raw", "-F", "qcow2"], id="raw-F"),
        pytest.param(["-O", "qcow2", "-F", "qcow2"], id="F-without-B"),
        pytest.param(["-O", "qcow2", "-B", "base.qcow2", "-F", "bogus"], id="F-bogus"),
        pytest.param(
            ["-O", "qcow2", "-o", "preallocation=metadata", "-B", "base.qcow2", "-F", "qcow2"],
            id="prealloc",
        ),
        # An empty name or format is one given, and wrong.
        pytest.param(["-O", "qcow2", "-B", ""], id="empty-B"),
        pytest.param(["-O", "qcow2", "-o", "backing_file="], id="empty-o-backing_file"),
        pytest.param(["-O", "raw", "-B", ""], id="raw-empty-B"),
        pytest.param(["-O", "raw", "-F", ""], id="raw-empty-F"),
        pytest.param(["-O", "qcow2", "-F", ""], id="empty-F"),
        pytest.param(["-O", "qcow2", "-o", "backing_fmt="], id="empty-o-backing_fmt"),
        pytest.param(["-O", "vmdk", "-o", "backing_file="], id="vmdk-empty-o-backing_file"),
        pytest.param(["-O", "qcow2", "-B", "base.qcow2", "-F", ""], id="B-empty-F"),
    ],
)
def test_refused_like_qemu(tmp_path: Path, args: list[str]) -> None:
    top = make_chain(tmp_path)
    theirs, ours = tmp_path / "theirs.qcow2", tmp_path / "ours.qcow2"
    expected = qemu_error(*args, top, theirs)
    message = one_error(trioconv_cli("convert", *args, top, ours))
    assert not ours.exists()
    # qemu-img prefixes errors from the format's creator with "TARGET: error while
    # converting qcow2: "; the message itself is the same.
    assert message == expected.split("error while converting qcow2: ")[-1].replace(
        str(theirs), str(ours)
    )


def test_concatenation_refused(tmp_path: Path) -> None:
    top = make_chain(tmp_path)
    ours = tmp_path / "ours.qcow2"
    args = ["-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2"]
    message = one_error(trioconv_cli("convert", *args, top, top, ours))
    assert message == qemu_error(*args, top, top, tmp_path / "theirs.qcow2")
    assert not ours.exists()


def test_target_is_zero_refused(tmp_path: Path) -> None:
    top = make_chain(tmp_path)
    ours = tmp_path / "ours.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", ours, "4M")
    args = ["-n", "--target-is-zero", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2"]
    message = one_error(trioconv_cli("convert", *args, top, ours))
    assert "--target-is-zero" in message and "backing file" in message


# -- creation and the API underneath -----------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"compat": "0.10"},
        {"cluster_size": "512"},
        {"cluster_size": "4k"},
        {"cluster_size": "8k"},
        {"refcount_bits": "64", "lazy_refcounts": "on"},
    ],
)
async def test_create_header_is_qemus(tmp_path: Path, options: dict[str, str]) -> None:
    """``qemu-img create -b NAME -F FMT`` byte for byte: extensions, then the name."""
    require_tool("qemu-img")
    ours, theirs = tmp_path / "ours.qcow2", tmp_path / "theirs.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", tmp_path / "base.qcow2", "4M")
    opts = {**options, "backing_file": "base.qcow2", "backing_fmt": "qcow2"}
    await create_image(ours, "qcow2", 4 * MiB, opts)
    o = ",".join(f"{k}={v}" for k, v in opts.items())
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", o, theirs, "4M")
    assert ours.read_bytes() == theirs.read_bytes()


async def test_layer_status(tmp_path: Path) -> None:
    top = make_chain(tmp_path)
    async with trioconv.open_image(top) as image:
        kinds = await walk_extents(image.layer_status, image.size)
        assert image.backing is not None
        # The base's data under unallocated clusters is not this layer's.
        assert kinds[0] == (0, 512 * 1024, ExtentKind.HOLE)
        assert (512 * 1024, 256 * 1024, ExtentKind.DATA) in kinds
        assert (MiB, 128 * 1024, ExtentKind.ZERO) in kinds
        # block_status, for the whole chain, calls the base's data DATA.
        assert (await image.block_status(0, MiB)).kind is ExtentKind.DATA
        # The base has no backing: its unallocated clusters are its own zeroes.
        ext = await image.backing.layer_status(3 * MiB, MiB)
        assert ext.kind is ExtentKind.ZERO


def test_chunker_backing_runs() -> None:
    c = Chunker(4 * MiB, align=4096, max_data=2 * MiB)
    jobs = c.feed(0, 100, RunKind.DATA) + c.feed(100, 3 * MiB, RunKind.BACKING)
    jobs += c.feed(3 * MiB + 100, MiB - 100, True) + c.finish()
    assert jobs == [
        (0, 4096, RunKind.DATA),
        (4096, 3 * MiB - 4096, RunKind.BACKING),
        (3 * MiB, 4096, RunKind.DATA),
        (3 * MiB + 4096, MiB - 4096, RunKind.ZERO),
    ]
    old: list[tuple[int, int, object]] = list(jobs)  # data and zero runs equal the old bools
    assert old[0] == (0, 4096, False) and old[-1][2] == 1

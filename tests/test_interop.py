"""Real images made by qemu-img and qemu-io, converted by the library, checked by qemu-img."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest
import trio

import trioconv
from trioconv.protocols.memory import MemoryDriver

from .conftest import (
    ImageMaker,
    assert_identical,
    create_filled,
    qemu_map,
    run,
    trioconv_cli,
)

MIXED = (
    "write -P 0xab 0 3M",
    "write -z 4M 1M",
    "write -P 0 6M 1M",  # allocated zeroes inside data
    "write -P 0x11 9M 5M",
    "write -P 0x22 20M 64k",
    "write -P 0x33 24M 1536",  # small, unaligned end
    "write -P 0x44 31M 1M",
)


@pytest.fixture
def mixed(make_image: ImageMaker) -> Path:
    return make_image("mixed.img", "32M", *MIXED)


VARIANTS: dict[str, dict[str, object]] = {
    "default": {},
    "m1": {"parallel": 1},
    "m8-W": {"parallel": 8, "oob_writes": True},
    "m64": {"parallel": 64},
    "S0": {"sparse_size": 0},
    "S64k": {"sparse_size": "64k"},
    "copy-range": {"copy_range": True},
    "odirect": {"source_cache": "none", "target_cache": "none"},
    "directsync-W": {"target_cache": "directsync", "oob_writes": True},
    "writeback": {"target_cache": "writeback"},
    "falloc": {"target_options": {"preallocation": "falloc"}},
    "small-buffers": {"buffer_size": "64k", "parallel": 16},
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
async def test_convert_matches_source(mixed: Path, tmp_path: Path, variant: str) -> None:
    target = tmp_path / "out.img"
    opts = trioconv.ConvertOptions(**VARIANTS[variant])  # type: ignore[arg-type]
    result = await trioconv.convert([mixed], target, opts)
    assert result.total == 32 * 1024 * 1024
    assert_identical(mixed, target)


async def test_sparse_layout_follows_source(mixed: Path, tmp_path: Path) -> None:
    target = tmp_path / "out.img"
    await trioconv.convert(mixed, target)
    data = [(e["start"], e["length"]) for e in qemu_map(target) if e["data"]]
    # Holes, write -z and the allocated zeroes at 6M all stay unallocated.
    assert (0, 3 * 1024 * 1024) in data
    assert all(not (6 * 2**20 <= int(s) < 7 * 2**20) for s, _ in data)
    assert all(not (4 * 2**20 <= int(s) < 5 * 2**20) for s, _ in data)
    full = tmp_path / "full.img"
    await trioconv.convert(mixed, full, trioconv.ConvertOptions(sparse_size=0))
    entries = qemu_map(full)
    assert len(entries) == 1 and entries[0]["data"] is True


async def test_concatenation_of_qemu_images(make_image: ImageMaker, tmp_path: Path) -> None:
    a = make_image("a.img", "1M", "write -P 1 0 1M")
    b = make_image("b.img", "1049088", "write -P 2 1048576 512")  # 1 MiB + 512
    c = make_image("c.img", "2M", "write -P 3 1M 4k")
    target = tmp_path / "abc.img"
    await trioconv.convert([a, b, c], target, trioconv.ConvertOptions(target_cache="none"))
    expected = tmp_path / "expected.img"
    expected.write_bytes(a.read_bytes() + b.read_bytes() + c.read_bytes())
    assert_identical(expected, target)


async def test_no_create_overwrites_in_place(make_image: ImageMaker, mixed: Path) -> None:
    target = make_image("existing.img", "40M", "write -P 0xff 0 40M")
    await trioconv.convert(mixed, target, trioconv.ConvertOptions(no_create=True))
    content = target.read_bytes()
    assert content[: 32 * 2**20] == mixed.read_bytes()
    assert content[32 * 2**20 :] == b"\xff" * 8 * 2**20


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


async def test_failed_conversion_removes_created_target(mixed: Path, tmp_path: Path) -> None:
    target = tmp_path / "out.img"
    before = _digest(mixed)
    source = MemoryDriver(data=mixed.read_bytes(), delay=0.001)
    source.fail_read_at = 20 * 2**20
    with pytest.raises(trioconv.ConvertError, match="reading"):
        await trioconv.convert([source], target)
    assert not target.exists()
    assert _digest(mixed) == before


async def test_failed_conversion_keeps_existing_target(make_image: ImageMaker) -> None:
    target = make_image("keep.img", "8M")
    source = MemoryDriver(data=bytes([7]) * 8 * 2**20)
    source.fail_read_at = 4 * 2**20
    with pytest.raises(trioconv.ConvertError):
        await trioconv.convert([source], target, trioconv.ConvertOptions(no_create=True))
    assert target.exists()


async def test_cancelled_conversion_removes_created_target(tmp_path: Path) -> None:
    target = tmp_path / "out.img"
    source = MemoryDriver(data=bytes([9]) * 64 * 2**20, delay=0.2)
    with trio.move_on_after(0.1) as scope:
        await trioconv.convert([source], target)
    assert scope.cancelled_caught
    assert not target.exists()


async def test_same_file_refused_before_anything_is_written(mixed: Path) -> None:
    before = _digest(mixed)
    with pytest.raises(trioconv.ImageError, match="both a source and the target"):
        await trioconv.convert(mixed, mixed)
    assert _digest(mixed) == before


async def test_info_matches_qemu(mixed: Path) -> None:
    async with trioconv.open_image(mixed) as drv:
        assert drv.name == "raw"
        assert drv.size == 32 * 2**20


async def test_failed_conversion_leaves_preexisting_file(make_image: ImageMaker) -> None:
    """Without -n an existing file is recreated; a failure does not delete the user's file."""
    target = make_image("was-here.img", "1M")
    source = MemoryDriver(data=bytes([5]) * 8 * 2**20)
    source.fail_read_at = 6 * 2**20
    with pytest.raises(trioconv.ConvertError):
        await trioconv.convert([source], target)
    assert target.exists()


async def test_copy_offload_falls_back_when_kernel_refuses(
    mixed: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trioconv.protocols.file import FileDriver

    calls = 0

    async def refuse(self: FileDriver, *args: object) -> None:
        nonlocal calls
        calls += 1
        raise trioconv.UnsupportedError("copy offload not possible: Invalid cross-device link")

    monkeypatch.setattr(FileDriver, "copy_range", refuse)
    target = tmp_path / "out.img"
    await trioconv.convert(mixed, target, trioconv.ConvertOptions(copy_range=True, parallel=8))
    assert calls >= 1
    assert_identical(mixed, target)


@pytest.mark.parametrize("subformat", ["monolithicFlat", "twoGbMaxExtentSparse"])
async def test_failed_conversion_removes_extent_files_too(tmp_path: Path, subformat: str) -> None:
    """A multi-file target (vmdk descriptor + extents) leaves nothing behind on failure."""
    keep = tmp_path / "out-unrelated.txt"
    keep.write_text("not ours")
    source = MemoryDriver(data=bytes([3]) * 8 * 2**20)
    source.fail_read_at = 6 * 2**20
    opts = trioconv.ConvertOptions(target_format="vmdk", target_options={"subformat": subformat})
    with pytest.raises(trioconv.ConvertError):
        await trioconv.convert([source], tmp_path / "out.vmdk", opts)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out-unrelated.txt"]


async def test_a_failed_conversion_leaves_files_that_appear_beside_its_target(
    tmp_path: Path,
) -> None:
    """Only the files the conversion made are removed after a failure: a file another
    task writes beside the target meanwhile, whose name starts like the target's,
    stays (conversions side by side in one nursery, as the API allows)."""
    source = MemoryDriver(data=bytes([3]) * 8 * 2**20, delay=0.01)
    source.fail_read_at = 6 * 2**20
    target = tmp_path / "vm.qcow2"
    neighbour = tmp_path / "vm-backup.qcow2"

    async def fail() -> None:
        opts = trioconv.ConvertOptions(target_format="qcow2", parallel=1)
        with pytest.raises(trioconv.ConvertError):
            await trioconv.convert([source], target, opts)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(fail)
        while not target.exists():  # noqa: ASYNC110 (a file appears: no event to wait on)
            await trio.sleep(0.001)
        neighbour.write_bytes(b"another conversion's finished image")
    assert not target.exists()
    assert neighbour.read_bytes() == b"another conversion's finished image"


async def test_creating_a_split_vmdk_that_fails_last_leaves_no_extent_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Creating an image removes every file it made when it fails or is cancelled at its
    very end (here the descriptor's final flush), the extent files included."""
    from trioconv.protocols.file import FileDriver

    flush = FileDriver.flush

    async def fail_on_the_descriptor(self: FileDriver) -> None:
        if self.location.endswith("disk.vmdk"):
            raise trioconv.ImageError("flush failed")
        await flush(self)

    monkeypatch.setattr(FileDriver, "flush", fail_on_the_descriptor)
    with pytest.raises(trioconv.ImageError, match="flush failed"):
        await trioconv.create_image(
            tmp_path / "disk.vmdk", "vmdk", 3 * 2**30, {"subformat": "twoGbMaxExtentSparse"}
        )
    assert list(tmp_path.iterdir()) == []


def test_side_files_are_named_as_the_formats_make_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trioconv._open import side_files

    monkeypatch.chdir(tmp_path / "..")  # a qcow2 data file's name is from here

    path = str(tmp_path / "disk.vmdk")
    split = {"subformat": "twoGbMaxExtentFlat"}
    assert [Path(p).name for p in side_files(path, "vmdk", 5 * 2**30, split)] == [
        "disk-f001.vmdk",
        "disk-f002.vmdk",
        "disk-f003.vmdk",
    ]
    flat = {"subformat": "monolithicFlat"}
    assert side_files(path, "vmdk", 2**20, flat) == [str(tmp_path / "disk-flat.vmdk")]
    assert side_files(path, "vmdk", 2**20, {}) == []
    qcow2 = str(tmp_path / "disk.qcow2")
    assert side_files(qcow2, "qcow2", 2**20, {"data_file": "d/x.raw"}) == [
        str(tmp_path.parent / "d" / "x.raw")
    ]
    assert side_files("nfs://host/export/disk.qcow2", "qcow2", 2**20, {}) == []
    assert side_files(path, "raw", 2**20, {}) == []


def _allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


@pytest.mark.parametrize(
    ("fmt", "options", "data_file"),
    [
        pytest.param("vpc", "subformat=fixed", "out.vpc", id="fixed-vhd"),
        pytest.param("vdi", "static=on", "out.vdi", id="static-vdi"),
        pytest.param("vmdk", "subformat=monolithicFlat", "out-flat.vmdk", id="flat-vmdk"),
    ],
)
async def test_zeroes_keep_a_preallocated_target_allocated(
    make_image: ImageMaker, tmp_path: Path, fmt: str, options: str, data_file: str
) -> None:
    """``-n`` into a fixed VHD, a static VDI or a flat VMDK writes the source's zeroes
    without punching holes into the preallocated data area, as qemu-img leaves it: the
    layout was chosen so that the space is there when the guest writes."""
    source = make_image("src.img", "8M", "write -P 1 0 2M", "write -P 0 2M 2M")
    target = create_filled(tmp_path / f"out.{fmt}", fmt, "8M", "write -P 9 0 8M", options=options)
    before = _allocated(tmp_path / data_file)
    assert before >= 8 * 2**20
    opts = trioconv.ConvertOptions(target_format=fmt, no_create=True)
    await trioconv.convert(source, target, opts)
    assert_identical(source, target, fmt_b=fmt)
    assert _allocated(tmp_path / data_file) >= before


def _data_ranges(path: Path, fmt: str = "raw") -> list[tuple[int, int]]:
    return [(e["start"], e["length"]) for e in qemu_map(path, fmt) if e["data"]]


def test_zeroes_after_the_last_block_boundary_of_data_stay_holes(
    tmp_path: Path, qemu_img: str
) -> None:
    """A dynamic VHD's data starts 512 bytes into its block, so the file's allocation -
    and the source's block status - runs 3.5 KiB past the last 4 KiB boundary of the
    data. Those zeroes are a partial block at the edge of what is copied; qemu-img skips
    them and so does trioconv, so the copy is allocated exactly as qemu-img's. The same
    for sources joined where their sizes are not multiples of 4 KiB."""
    raw = tmp_path / "a.raw"
    with raw.open("wb") as f:
        f.write(random.randbytes(2**20))
        f.truncate(8 * 2**20)
    vhd = tmp_path / "s.vhd"
    run(qemu_img, "convert", "-f", "raw", "-O", "vpc", raw, vhd)
    for fmt in ("raw", "qcow2"):
        ours, theirs = tmp_path / f"t.{fmt}", tmp_path / f"q.{fmt}"
        ok = trioconv_cli("convert", "-f", "vpc", "-O", fmt, vhd, ours)
        assert ok.returncode == 0, ok.stderr
        run(qemu_img, "convert", "-f", "vpc", "-O", fmt, vhd, theirs)
        assert_identical(theirs, ours, fmt, fmt)
        assert _data_ranges(ours, fmt) == _data_ranges(theirs, fmt)
    head, rest = tmp_path / "head.raw", tmp_path / "rest.raw"
    head.write_bytes(random.randbytes(512))
    with rest.open("wb") as f:
        f.write(random.randbytes(1536))
        f.truncate(2**20)
    ours, theirs = tmp_path / "joined-t.raw", tmp_path / "joined-q.raw"
    ok = trioconv_cli("convert", head, rest, ours)
    assert ok.returncode == 0, ok.stderr
    run(qemu_img, "convert", head, rest, theirs)
    assert_identical(theirs, ours)
    assert _data_ranges(ours) == _data_ranges(theirs) == [(0, 4096)]

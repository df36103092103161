"""``-l``/``-s``: converting a qcow2 internal snapshot instead of the active layer."""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import ImageMaker, assert_identical, run, trioconv_cli


@pytest.fixture
def snapped(tmp_path: Path, qemu_img: str, qemu_io: str) -> Path:
    """Two snapshots ('first' id 1, 'second' id 2), then more writes on top."""
    image = tmp_path / "snap.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", image, "16M")
    run(qemu_io, "-f", "qcow2", "-c", "write -P 0x11 0 2M", image)
    run(qemu_img, "snapshot", "-c", "first", image)
    run(qemu_io, "-f", "qcow2", "-c", "write -P 0x22 1M 4M", "-c", "write -z 8M 1M", image)
    run(qemu_img, "snapshot", "-c", "second", image)
    run(qemu_io, "-f", "qcow2", "-c", "write -z 0 8M", "-c", "write -P 0x33 12M 1M", image)
    return image


@pytest.mark.parametrize(
    "spec",
    [
        "first",
        "second",
        "1",
        "2",
        "snapshot.name=second",
        "snapshot.id=1",
        "snapshot.id=2,snapshot.name=second",
    ],
)
def test_snapshot_matches_qemu(snapped: Path, tmp_path: Path, qemu_img: str, spec: str) -> None:
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    result = trioconv_cli("convert", "-l", spec, "-O", "raw", snapped, ours)
    assert result.returncode == 0, result.stderr
    run(qemu_img, "convert", "-l", spec, "-O", "raw", snapped, theirs)
    assert_identical(ours, theirs)


def test_deprecated_s_is_the_same(snapped: Path, tmp_path: Path, qemu_img: str) -> None:
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    assert trioconv_cli("convert", "-s", "first", snapped, ours).returncode == 0
    run(qemu_img, "convert", "-l", "first", "-O", "raw", snapped, theirs)
    assert_identical(ours, theirs)


def test_active_layer_without_l(snapped: Path, tmp_path: Path) -> None:
    out = tmp_path / "active.raw"
    assert trioconv_cli("convert", snapped, out).returncode == 0
    assert_identical(snapped, out, "qcow2", "raw")


@pytest.mark.parametrize(
    ("spec", "message"),
    [("nope", "Can't find snapshot"), ("snapshot.bogus=1", "Failed in parsing")],
)
def test_bad_snapshot(snapped: Path, tmp_path: Path, spec: str, message: str) -> None:
    out = tmp_path / "out.raw"
    result = trioconv_cli("convert", "-l", spec, snapped, out)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1
    assert message in lines[0]
    assert not out.exists()


def test_snapshot_of_raw_or_several_sources(make_image: ImageMaker, snapped: Path) -> None:
    raw = make_image("plain.img", "1M")
    result = trioconv_cli("convert", "-l", "first", raw, raw.with_suffix(".out"))
    assert result.returncode == 1
    assert "does not support internal snapshots" in result.stderr
    result = trioconv_cli("convert", "-l", "first", snapped, snapped, raw.with_suffix(".o2"))
    assert result.returncode == 1
    assert "multiple snapshot" in result.stderr


@pytest.mark.parametrize("with_backing", [False, True], ids=["alone", "overlay"])
def test_snapshot_of_an_image_grown_since(tmp_path: Path, with_backing: bool) -> None:
    """``-l`` reads a snapshot at the image's current size, as qemu-img does: past the
    snapshot's own tables it reads as unallocated (zeroes, or the backing file)."""
    img = tmp_path / "grown.qcow2"
    if with_backing:
        base = tmp_path / "base.qcow2"
        run("qemu-img", "create", "-q", "-f", "qcow2", base, "8M")
        run("qemu-io", "-f", "qcow2", "-c", "write -P 9 0 8M", base)
        run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "qcow2", img, "4M")
    else:
        run("qemu-img", "create", "-q", "-f", "qcow2", img, "4M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 1M", img)
    run("qemu-img", "snapshot", "-c", "before", img)
    run("qemu-img", "resize", "-q", img, "8M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 2 6M 1M", img)
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    result = trioconv_cli("convert", "-l", "before", "-O", "raw", img, ours)
    assert result.returncode == 0, result.stderr
    run("qemu-img", "convert", "-l", "before", "-O", "raw", img, theirs)
    assert ours.read_bytes() == theirs.read_bytes()

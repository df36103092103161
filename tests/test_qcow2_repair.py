"""Dirty qcow2 images: refcounts recounted and rebuilt before writing, as qemu does.

The images are left dirty the way they are in real life: ``qemu-io`` writes into an
image with ``lazy_refcounts=on`` and is killed by ``abort`` before it closes it, so the
refcounts on disk are stale (``qemu-img check`` reports errors) and the dirty bit is
set. ``convert -n`` into such an image must repair it first; afterwards ``qemu-img
check`` finds nothing, the content is what was written, and snapshots and compressed
clusters the image held are intact. Reading a dirty image leaves it as it is.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import ImageMaker, assert_identical, run, trioconv_cli

MiB = 1024 * 1024


def make_dirty(path: Path, size: str, *commands: str, options: str = "") -> None:
    """Write ``commands`` into ``path`` (made with lazy refcounts) and crash qemu-io."""
    opts = "lazy_refcounts=on" + (f",{options}" if options else "")
    if not path.exists():
        run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opts, path, size)
    args = ["qemu-io", "-f", "qcow2"]
    for command in commands:
        args += ["-c", command]
    args += ["-c", "abort"]
    crashed = subprocess.run([*args, str(path)], capture_output=True, check=False)
    assert crashed.returncode != 0  # it did abort
    assert dirty(path)


def dirty(path: Path) -> bool:
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", path).stdout)
    return bool(info["dirty-flag"])


def repaired_into(src: Path, target: Path) -> None:
    """``convert -n`` of raw ``src`` into the dirty ``target`` works, and leaves it clean
    and holding ``src``."""
    result = trioconv_cli("convert", "-n", "-f", "raw", "-O", "qcow2", src, target)
    assert result.returncode == 0, result.stderr
    check_clean(target)
    assert_identical(src, target, "raw", "qcow2")


def check_clean(path: Path) -> None:
    result = run("qemu-img", "check", "--output=json", path, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert not report.get("corruptions") and not report.get("leaks"), report
    assert not dirty(path)


@pytest.mark.parametrize(
    "options",
    ["", "cluster_size=4096", "refcount_bits=1", "refcount_bits=64", "extended_l2=on"],
)
def test_n_into_dirty_image_repairs_first(
    make_image: ImageMaker, tmp_path: Path, options: str
) -> None:
    target = tmp_path / "dirty.qcow2"
    make_dirty(target, "8M", "write -P 5 0 1M", "write -P 6 3M 512k", options=options)
    stale = run("qemu-img", "check", target, check=False)
    assert stale.returncode != 0  # the crash left errors behind
    src = make_image("src.img", "8M", "write -P 7 512k 2M", "write -P 8 6M 1M")
    repaired_into(src, target)


def test_repair_keeps_snapshots_and_compressed_clusters(tmp_path: Path) -> None:
    target = tmp_path / "dirty.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", target, "8M")
    run("qemu-io", "-f", "qcow2", "-c", "write -P 1 0 2M", "-c", "write -c -P 2 4M 256k", target)
    run("qemu-img", "snapshot", "-c", "before", target)
    before = tmp_path / "before.img"
    run("qemu-img", "convert", "-l", "before", "-O", "raw", target, before)
    # After the snapshot: shared clusters rewritten (copied on write), new ones written.
    make_dirty(target, "8M", "write -P 3 1M 128k", "write -P 4 6M 1M")
    src = tmp_path / "src.img"
    run("qemu-img", "convert", "-U", "-O", "raw", target, src)
    run("qemu-io", "-f", "raw", "-c", "write -P 9 7M 64k", src)
    repaired_into(src, target)
    snap = tmp_path / "snap.img"
    run("qemu-img", "convert", "-l", "before", "-O", "raw", target, snap)
    assert snap.read_bytes() == before.read_bytes()


def test_repair_with_persistent_bitmaps(make_image: ImageMaker, tmp_path: Path) -> None:
    target = tmp_path / "dirty.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", target, "8M")
    run("qemu-img", "bitmap", "--add", target, "b0")
    make_dirty(target, "8M", "write -P 5 0 1M")
    src = make_image("src.img", "8M", "write -P 7 2M 1M")
    repaired_into(src, target)


def test_reading_a_dirty_image_leaves_it_alone(tmp_path: Path) -> None:
    src = tmp_path / "dirty.qcow2"
    make_dirty(src, "8M", "write -P 5 0 1M", "write -P 6 3M 512k")
    digest = hashlib.sha256(src.read_bytes()).hexdigest()
    ours, theirs = tmp_path / "ours.img", tmp_path / "theirs.img"
    result = trioconv_cli("convert", "-O", "raw", src, ours)
    assert result.returncode == 0, result.stderr
    run("qemu-img", "convert", "-O", "raw", src, theirs)
    assert ours.read_bytes() == theirs.read_bytes()
    assert hashlib.sha256(src.read_bytes()).hexdigest() == digest
    assert dirty(src)


def patch_first_l2_entry(path: Path, change: Callable[[int], int]) -> None:
    """Replace the first L2 entry of the image's first L2 table by ``change(entry)``."""
    data = bytearray(path.read_bytes())
    l1_offset = int.from_bytes(data[40:48], "big")
    l2_offset = int.from_bytes(data[l1_offset : l1_offset + 8], "big") & 0x00FF_FFFF_FFFF_FE00
    entry = int.from_bytes(data[l2_offset : l2_offset + 8], "big")
    data[l2_offset : l2_offset + 8] = change(entry).to_bytes(8, "big")
    path.write_bytes(bytes(data))


def refused(tmp_path: Path, target: Path, needle: str, *, compare: bool = True) -> None:
    """``convert -n`` into ``target`` fails in one line naming ``needle``, leaving it as
    it was (compared byte for byte unless it is too large to read)."""
    before = target.read_bytes() if compare else b""
    src = tmp_path / "src.img"
    src.write_bytes(bytes(8 * MiB))
    result = trioconv_cli("convert", "-n", "-f", "raw", "-O", "qcow2", src, target)
    assert result.returncode == 1
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
    if compare:
        assert target.read_bytes() == before


def test_unrepairable_dirty_image_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "dirty.qcow2"
    make_dirty(target, "8M", "write -P 5 0 1M")
    # Point an L2 entry past the end of the file: no count can be trusted then.
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", target).stdout)
    assert info["dirty-flag"]
    patch_first_l2_entry(target, lambda entry: (1 << 63) | (1 << 40))
    refused(tmp_path, target, "beyond the end of the file")


def test_huge_sparse_dirty_file_is_refused_in_one_line(tmp_path: Path) -> None:
    # More clusters than qemu repairs (INT_MAX), or than a bounded memory holds.
    target = tmp_path / "dirty.qcow2"
    make_dirty(target, "8M", "write -P 5 0 1M", options="cluster_size=512")
    with open(target, "r+b") as f:
        f.truncate(2 << 40)  # 2 TiB, sparse
    refused(tmp_path, target, "Could not repair dirty image: File too large", compare=False)
    assert dirty(target)


def test_unaligned_data_cluster_in_dirty_image_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "dirty.qcow2"
    make_dirty(target, "8M", "write -P 5 0 1M")
    patch_first_l2_entry(target, lambda entry: entry | 0x200)
    refused(tmp_path, target, "unaligned")

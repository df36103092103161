"""Image locks: trioconv and QEMU see each other's images in use.

Local images are locked the way QEMU locks them (shared open file description locks on
bytes 100 + n and 200 + n), so trioconv refuses to write into an image a running QEMU
uses, or to read one that a QEMU writes (unless ``-U``), and QEMU refuses trioconv's
images the same way. The images are held by real ``qemu-io`` processes.
"""

from __future__ import annotations

import hashlib
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

import trioconv
from trioconv import ImageError, UsageError
from trioconv.protocols.file import open_file

from .conftest import assert_identical, create_filled, require_tool, run, trioconv_cli


@contextmanager
def held_by_qemu(path: Path, fmt: str, *, read_only: bool = False) -> Iterator[None]:
    """``qemu-io`` keeps ``path`` open (read-write, or read-only) until the block ends."""
    args = [require_tool("qemu-io"), "-f", fmt, *(["-r"] if read_only else []), str(path)]
    proc = subprocess.Popen(
        args, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        # Open (and locked) once it answers a command.
        assert proc.stdin is not None
        proc.stdin.write(b"length\n")
        proc.stdin.flush()
        deadline = time.monotonic() + 10
        while not _locked(path):
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "qemu-io did not lock the image"
            time.sleep(0.02)
        yield
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()


def _locked(path: Path) -> bool:
    """Whether someone holds QEMU's consistent-read lock byte of ``path``."""
    import fcntl
    import os
    import struct

    fd = os.open(path, os.O_RDONLY)
    try:
        arg = struct.pack("@hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 100, 1, 0)
        kind = struct.unpack("@hhqqi4x", fcntl.fcntl(fd, fcntl.F_OFD_GETLK, arg))[0]
        return bool(kind != fcntl.F_UNLCK)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.fixture
def image(tmp_path: Path) -> Path:
    return create_filled(tmp_path / "disk.qcow2", "qcow2", "4M", "write -P 7 0 1M")


def test_source_written_by_qemu_is_refused_unless_force_share(image: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.raw"
    with held_by_qemu(image, "qcow2"):
        line = one_line(trioconv_cli("convert", "-O", "raw", image, out))
        assert 'Failed to get shared "write" lock' in line and str(image) in line
        assert not out.exists()
        # As qemu-img: -U reads it anyway.
        result = trioconv_cli("convert", "-U", "-O", "raw", image, out)
        assert result.returncode == 0, result.stderr
        info = trioconv_cli("info", image)
        assert 'Failed to get shared "write" lock' in one_line(info)
        assert trioconv_cli("info", "-U", image).returncode == 0
    assert_identical(image, out, "qcow2", "raw")


@pytest.mark.parametrize("fmt", ["raw", None], ids=["-f raw", "probed"])
def test_info_looks_at_a_raw_image_in_use(tmp_path: Path, fmt: str | None) -> None:
    """qemu-img info reads no data and takes no lock on a raw image: a running VM's raw
    disk can be looked at without -U (a conversion from it still needs -U)."""
    disk = create_filled(tmp_path / "disk.raw", "raw", "4M", "write -P 7 0 1M")
    args = [*(["-f", fmt] if fmt else []), str(disk)]
    with held_by_qemu(disk, "raw"):
        for extra in ([], ["--output=json"], ["--backing-chain"]):
            ours = trioconv_cli("info", *extra, *args)
            assert ours.returncode == 0, ours.stderr
            assert ours.stdout == run("qemu-img", "info", *extra, *args).stdout
        line = one_line(trioconv_cli("convert", *args, tmp_path / "out.raw"))
        assert 'Failed to get shared "write" lock' in line
        assert not (tmp_path / "out.raw").exists()


def test_info_follows_a_chain_down_to_a_raw_backing_file_in_use(tmp_path: Path) -> None:
    """An overlay on a raw image that a VM writes: --backing-chain shows both, as
    qemu-img does; converting the overlay is refused (its data is in use)."""
    base = create_filled(tmp_path / "base.raw", "raw", "4M", "write -P 7 0 1M")
    top = tmp_path / "top.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", "-b", base.name, "-F", "raw", top)
    with held_by_qemu(base, "raw"):
        for output in ("human", "json"):
            args = ["info", "--backing-chain", "--output", output, str(top)]
            ours = trioconv_cli(*args)
            assert ours.returncode == 0, ours.stderr
            assert ours.stdout == run("qemu-img", *args).stdout
        line = one_line(trioconv_cli("convert", top, tmp_path / "out.raw"))
        assert "Could not open backing file" in line and "lock" in line


@pytest.mark.parametrize("no_create", [True, False], ids=["-n", "new"])
@pytest.mark.parametrize("read_only", [False, True], ids=["qemu-writes", "qemu-reads"])
def test_target_in_use_is_left_alone(
    image: Path, tmp_path: Path, no_create: bool, read_only: bool
) -> None:
    """Not even truncated: whatever uses it keeps its bytes."""
    src = create_filled(tmp_path / "src.raw", "raw", "4M", "write -P 1 0 4M")
    before = sha256(image)
    with held_by_qemu(image, "qcow2", read_only=read_only):
        args = ["-n"] if no_create else []
        line = one_line(trioconv_cli("convert", *args, "-O", "qcow2", src, image))
        assert f"lock. Is another process using the image [{image}]?" in line
        assert sha256(image) == before
    run("qemu-img", "check", image)
    assert sha256(image) == before


@pytest.mark.parametrize("no_create", [True, False], ids=["-n", "new"])
@pytest.mark.parametrize("read_only", [False, True], ids=["qemu-writes", "qemu-reads"])
def test_raw_target_shared_as_qemu_img_shares_it(
    tmp_path: Path, no_create: bool, read_only: bool
) -> None:
    """A raw image's user that shares writing (``qemu-io`` on a raw file does; a VM's
    disk does not) does not keep qemu-img out of it, nor trioconv: QEMU's raw format
    passes its user's sharing down to the file."""
    src = create_filled(tmp_path / "src.raw", "raw", "4M", "write -P 1 0 4M")
    target = create_filled(tmp_path / "t.raw", "raw", "4M", "write -P 2 0 4M")
    with held_by_qemu(target, "raw", read_only=read_only):
        args = ["-n"] if no_create else []
        result = trioconv_cli("convert", *args, "-O", "raw", src, target)
        assert result.returncode == 0, result.stderr
        assert run("qemu-img", "convert", *args, "-O", "raw", src, target).returncode == 0
    assert_identical(src, target)


@pytest.mark.parametrize("read_only", [False, True], ids=["qemu-writes", "qemu-reads"])
def test_raw_target_under_a_user_that_does_not_share_writes(
    image: Path, tmp_path: Path, read_only: bool
) -> None:
    """Written as raw or not, a file that a qcow2 user (like a VM's disk) holds is left
    alone: that user does not share writing."""
    src = create_filled(tmp_path / "src.raw", "raw", "4M", "write -P 1 0 4M")
    before = sha256(image)
    with held_by_qemu(image, "qcow2", read_only=read_only):
        line = one_line(trioconv_cli("convert", "-n", "-O", "raw", src, image))
        assert 'Failed to get "write" lock' in line
    assert sha256(image) == before


async def test_qemu_sees_trioconv_locks(image: Path) -> None:
    require_tool("qemu-img")
    async with trioconv.open_image(image, "qcow2", writable=True):
        result = run("qemu-img", "info", image, check=False)
        assert result.returncode == 1
        assert 'Failed to get shared "write" lock' in result.stderr
        assert run("qemu-img", "info", "-U", image, check=False).returncode == 0
    async with trioconv.open_image(image, "qcow2"):
        # A reader shares reading, not writing.
        assert run("qemu-img", "info", image, check=False).returncode == 0
        result = run("qemu-io", "-f", "qcow2", "-c", "write 0 4k", image, check=False)
        assert 'Failed to get "write" lock' in result.stderr
    assert run("qemu-io", "-f", "qcow2", "-c", "write 0 4k", image).returncode == 0


async def test_trioconv_sees_its_own_locks(image: Path) -> None:
    async with trioconv.open_image(image, "qcow2"), trioconv.open_image(image, "qcow2"):
        pass  # readers share
    async with trioconv.open_image(image, "qcow2", writable=True):
        with pytest.raises(ImageError, match='Failed to get shared "write" lock'):
            async with trioconv.open_image(image, "qcow2"):
                pass
        async with trioconv.open_image(image, "qcow2", force_share=True) as reader:
            assert reader.size == 4 * 1024 * 1024


async def test_force_share_is_for_readers(image: Path) -> None:
    with pytest.raises(UsageError, match="read-only"):
        await open_file(image, writable=True, force_share=True)

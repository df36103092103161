"""Shared fixtures: real qemu tools as oracles, image makers, and the CI rule on missing tools.

Tests that run an external program ask for it through :func:`require_tool`. On a
developer's machine a missing tool skips the test with the reason; under ``CI=true`` it
fails, so a green CI always means the interop tests really ran.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from trioconv import Extent, ExtentKind

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

#: The Debian package that brings each external program the tests run.
DEBIAN_PACKAGES = {
    "nbdkit": "nbdkit",
    "nbdinfo": "libnbd-bin",
    "nginx": "nginx-light",
    "openssl": "openssl",
    "setpriv": "util-linux",
    "losetup": "mount",
    "ganesha.nfsd": "nfs-ganesha nfs-ganesha-vfs",
    "rpcbind": "rpcbind",
    "rpcinfo": "rpcbind",
    "tgtd": "tgt",
    "tgtadm": "tgt",
    # Not a program: qemu-img's iscsi:// driver module (tests/iscsi_target.require_qemu_iscsi).
    "qemu-img-iscsi": "qemu-block-extra",
}

pytest_plugins = ["tests.nbd_servers", "tests.iscsi_target", "tests.http_server"]


def require_tool(name: str) -> str:
    """Return the path of ``name``; skip (or fail under CI=true) when it is missing."""
    path = shutil.which(name)
    if path is None:
        package = DEBIAN_PACKAGES.get(name, "qemu-utils")
        message = f"{name} is not installed (Debian: apt-get install {package})"
        if IN_CI:
            pytest.fail(f"CI=true and {message}")
        pytest.skip(message)
    return path


def run(
    *args: str | os.PathLike[str], check: bool = True, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command and capture its text output."""
    return subprocess.run(
        [os.fspath(a) for a in args],
        capture_output=True,
        text=True,
        check=check,
        timeout=120,
        cwd=cwd,
    )


def qemu_io_run(path: Path, fmt: str, *commands: str) -> None:
    """``qemu-io -f FMT -c CMD ... PATH``."""
    args: list[str | os.PathLike[str]] = [require_tool("qemu-io"), "-f", fmt]
    for command in commands:
        args += ["-c", command]
    run(*args, path)


def create_filled(
    path: Path,
    fmt: str,
    size: str,
    *commands: str,
    options: str = "",
    backing: str | None = None,
    backing_fmt: str | None = None,
) -> Path:
    """``qemu-img create -f FMT [-o OPTIONS] [-b B -F BF] PATH SIZE``, then qemu-io commands."""
    args: list[str | os.PathLike[str]] = [require_tool("qemu-img"), "create", "-q", "-f", fmt]
    if options:
        args += ["-o", options]
    if backing is not None:
        args += ["-b", backing]
    if backing_fmt is not None:
        args += ["-F", backing_fmt]
    run(*args, path, size)
    if commands:
        qemu_io_run(path, fmt, *commands)
    return path


def make_raw(path: Path, size: str, *commands: str) -> Path:
    """A raw image at ``path`` filled by qemu-io commands."""
    return create_filled(path, "raw", size, *commands)


@pytest.fixture
def qemu_img() -> str:
    return require_tool("qemu-img")


@pytest.fixture
def qemu_io() -> str:
    return require_tool("qemu-io")


ImageMaker = Callable[..., Path]


@pytest.fixture
def make_image(tmp_path: Path, qemu_img: str, qemu_io: str) -> ImageMaker:
    """Make a raw image with ``qemu-img create`` and fill it with ``qemu-io`` commands.

    ``make_image("src.img", "8M", "write -P 0xab 0 1M", "write -z 2M 1M")``
    """

    def make(name: str, size: str, *commands: str, fmt: str = "raw") -> Path:
        path = tmp_path / name
        run(qemu_img, "create", "-q", "-f", fmt, path, size)
        if commands:
            args: list[str] = [qemu_io, "-f", fmt]
            for command in commands:
                args += ["-c", command]
            run(*args, path)
        return path

    return make


def assert_identical(a: Path, b: Path, fmt_a: str = "raw", fmt_b: str = "raw") -> None:
    """``qemu-img compare`` must say the images are identical."""
    result = run("qemu-img", "compare", "-f", fmt_a, "-F", fmt_b, a, b, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Images are identical" in result.stdout


def qemu_map(path: Path, fmt: str = "raw") -> list[dict[str, Any]]:
    """``qemu-img map --output=json``, parsed."""
    import json

    return list(json.loads(run("qemu-img", "map", "--output=json", "-f", fmt, path).stdout))


async def walk_extents(
    query: Callable[[int, int], Awaitable[Extent]], size: int
) -> list[tuple[int, int, ExtentKind]]:
    """Ask ``query`` (``block_status``, ``layer_status``) from 0 to ``size``, each time from
    where the last extent ended; every extent starts where it was asked and is not empty."""
    seen: list[tuple[int, int, ExtentKind]] = []
    pos = 0
    while pos < size:
        ext = await query(pos, size - pos)
        assert ext.offset == pos and ext.length > 0
        seen.append((ext.offset, ext.length, ext.kind))
        pos = ext.end
    return seen


def trioconv_cli(
    *args: str | os.PathLike[str], timeout: float = 60, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m trioconv`` as a user would, in a separate process."""
    return subprocess.run(
        [sys.executable, "-m", "trioconv", *[os.fspath(a) for a in args]],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        cwd=cwd,
    )

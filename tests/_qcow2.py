"""Helpers shared by the qcow2 write tests: qemu-img as the oracle for trioconv's images."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from trioconv import UsageError
from trioconv._open import create_image

from .conftest import require_tool, run

MiB = 1024 * 1024

#: A raw source: data, a hole, written zeroes, small unaligned pieces, data at the end.
RAW_COMMANDS = (
    "write -P 0xab 0 300k",
    "write -z 400k 200k",
    "write -P 0x11 1M 1M",
    "write -P 0x22 2500k 4k",
    "write -P 0x33 3M 1536",
    "write -P 0 3500k 128k",
    "write -P 0x44 8128k 64k",
)


def qemu_info(path: Path) -> dict[str, Any]:
    info: dict[str, Any] = json.loads(
        run("qemu-img", "info", "--output=json", "-f", "qcow2", path).stdout
    )
    return info


def assert_check_clean(path: Path) -> dict[str, Any]:
    """``qemu-img check`` exits 0 and finds no errors (COPIED flags included), no leaks."""
    result = run("qemu-img", "check", "--output=json", "-f", "qcow2", path, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    assert report.get("leaks", 0) == 0, report
    assert report.get("corruptions", 0) == 0, report
    assert report.get("check-errors", 0) == 0, report
    return report


async def assert_create_refused(path: Path, options: dict[str, str], message: str) -> str:
    """trioconv refuses to create a 1 MiB qcow2 ``path`` with ``options``, saying
    ``message``; the options as qemu-img's ``-o`` takes them (to try it there too)."""
    require_tool("qemu-img")
    with pytest.raises(UsageError, match=message):
        await create_image(path, "qcow2", MiB, options)
    return ",".join(f"{k}={v}" for k, v in options.items())


async def assert_refused_like_qemu(path: Path, options: dict[str, str], message: str) -> None:
    """trioconv and ``qemu-img create`` both refuse ``options`` with the same ``message``."""
    opt = await assert_create_refused(path, options, message)
    qemu = run("qemu-img", "create", "-q", "-f", "qcow2", "-o", opt, path, "1M", check=False)
    assert qemu.returncode != 0 and message in qemu.stderr

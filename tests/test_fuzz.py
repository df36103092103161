"""Fuzzing the image parsers with mutated real images, in a small fixed budget.

Every mutated image must either open (and then read without crashing) or be refused
with a trioconv error: never another exception, never a hang, never unbounded memory.
"""

from __future__ import annotations

import contextlib
import functools
import subprocess
import tempfile
from pathlib import Path

import trio
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import trioconv
from trioconv._open import OpenContext
from trioconv.formats.qcow2 import open_qcow2
from trioconv.protocols.memory import MemoryDriver

from .conftest import require_tool


def _qcow2_bytes(*create_options: str) -> bytes:
    qemu_img = require_tool("qemu-img")
    qemu_io = require_tool("qemu-io")
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "seed.qcow2"
        opts = ["-o", ",".join(create_options)] if create_options else []
        subprocess.run([qemu_img, "create", "-q", "-f", "qcow2", *opts, image, "4M"], check=True)
        subprocess.run(
            [
                qemu_io,
                "-f",
                "qcow2",
                "-c",
                "write -P 0x61 0 256k",
                "-c",
                "write -z 1M 64k",
                "-c",
                "write -P 0x62 3M 4k",
                image,
            ],
            check=True,
            capture_output=True,
        )
        subprocess.run([qemu_img, "snapshot", "-c", "s1", image], check=True)
        return image.read_bytes()


@functools.cache
def seed(which: int) -> bytes:
    """Real images to mutate (made once per test run)."""
    options = [(), ("cluster_size=4096", "refcount_bits=64"), ("compat=0.10",), ("extended_l2=on",)]
    return _qcow2_bytes(*options[which])


async def _open_and_read(data: bytes, snapshot: str | None) -> None:
    transport = MemoryDriver(data=data, writable=False)
    with trio.fail_after(20):
        await _open_and_read_in_time(transport, snapshot)


async def _open_and_read_in_time(transport: MemoryDriver, snapshot: str | None) -> None:
    async with contextlib.AsyncExitStack() as stack:
        ctx = OpenContext("fuzz.qcow2", (), stack, snapshot=snapshot)
        try:
            image = await open_qcow2(transport, ctx)
        except trioconv.TrioconvError:
            return
        size = min(image.size, 4 * 1024 * 1024)
        try:
            pos = 0
            while pos < size:
                ext = await image.block_status(pos, size - pos)
                pos += max(ext.length, 1)
            if size:
                await image.pread(0, min(size, 512 * 1024))
        except trioconv.TrioconvError:
            return


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    which=st.integers(0, 3),
    edits=st.lists(
        st.tuples(st.integers(0, 4 * 65536 - 1), st.integers(0, 255)), min_size=1, max_size=8
    ),
    header_bias=st.booleans(),
    snapshot=st.sampled_from([None, "s1"]),
)
def test_mutated_qcow2_is_read_or_refused(
    which: int,
    edits: list[tuple[int, int]],
    header_bias: bool,
    snapshot: str | None,
) -> None:
    data = bytearray(seed(which))
    for pos, value in edits:
        at = pos % 512 if header_bias else pos % len(data)
        data[at] = value
    trio.run(_open_and_read, bytes(data), snapshot)

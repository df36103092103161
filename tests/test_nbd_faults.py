"""NBD servers that break the protocol or stop listening: one clear line, promptly.

The scripted server (:mod:`tests.fake_nbd`) sends what real servers never do.
"""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ._faults import FAULT_DEADLINE, interrupt_cli, one_line_error
from .conftest import ImageMaker, trioconv_cli
from .fake_nbd import (
    CMD_READ,
    STOP_READING,
    STRUCTURED_MAGIC,
    FakeNBDServer,
    Request,
    data_chunk,
    error_chunk,
    honest,
    simple_reply,
)

SIZE = 1 << 20


def short_reads(req: Request) -> bytes:
    """A read answered with half its bytes, then "done"."""
    if req.kind == CMD_READ:
        return data_chunk(req, req.offset, b"\x01" * (req.length // 2), done=True)
    return honest(req)


def simple_replies_to_reads(req: Request) -> bytes:
    return simple_reply(req) if req.kind == CMD_READ else honest(req)


def chatty_errors(req: Request) -> bytes:
    if req.kind == CMD_READ:
        return error_chunk(req, 5, b"disk on fire\nTraceback (most recent call last):\n" * 40)
    return honest(req)


def huge_chunks(req: Request) -> bytes:
    """A data chunk whose header claims a gigabyte."""
    if req.kind == CMD_READ:
        return struct.pack(">IHHQI", STRUCTURED_MAGIC, 1, 1, req.cookie, 1 << 30)
    return honest(req)


@pytest.mark.parametrize(
    ("behaviour", "message"),
    [
        (short_reads, f"the server's reply to a read of {SIZE} bytes at byte 0 gave {SIZE // 2}"),
        (simple_replies_to_reads, "a simple reply to a read"),
        (chatty_errors, "Input/output error (disk on fire\\nTraceback"),
        (huge_chunks, "connection to the NBD server lost"),
    ],
)
def test_broken_read_replies(tmp_path: Path, behaviour: object, message: str) -> None:
    """A reply that leaves part of a read unfilled is an error, never stale bytes in
    the output; server text is printed on one line, escaped and cut short; a claimed
    chunk larger than any request is refused before memory is taken for it."""
    out = tmp_path / "out.img"
    assert callable(behaviour)
    with FakeNBDServer(tmp_path / "s.sock", size=SIZE, behaviour=behaviour) as server:
        started = time.monotonic()
        result = trioconv_cli("convert", "-f", "raw", server.uri, out)
    assert time.monotonic() - started < FAULT_DEADLINE
    line = one_line_error(result)
    assert message in line
    assert len(line) < 600
    assert not out.exists()


def test_huge_chunk_from_a_server_without_a_maximum(tmp_path: Path) -> None:
    """A server that sets no maximum block size still cannot make the client take a
    gigabyte for one reply: memory stays bounded by what trioconv asks for."""
    with FakeNBDServer(
        tmp_path / "s.sock", size=SIZE, behaviour=huge_chunks, block_sizes=(1, 4096, 0xFFFFFFFF)
    ) as server:
        # Run through a fresh interpreter that reports its one child's peak memory.
        code = (
            "import resource, subprocess, sys; "
            "r = subprocess.run([sys.executable, '-m', 'trioconv', *sys.argv[1:]]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
            "sys.exit(r.returncode)"
        )
        args = ["convert", "-f", "raw", server.uri, str(tmp_path / "out.img")]
        result = subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60
        )
    assert "connection to the NBD server lost" in one_line_error(result)
    assert int(result.stdout) < 200 * 1024  # KiB


def test_a_tiny_maximum_block_size_keeps_memory_bounded(tmp_path: Path) -> None:
    """A 512-byte maximum request splits each 2 MiB read in 4096: they run a bounded
    number at a time (thousands of tasks per request took hundreds of MiB)."""
    size = 16 << 20
    with FakeNBDServer(tmp_path / "s.sock", size=size, block_sizes=(512, 512, 512)) as server:
        code = (
            "import resource, subprocess, sys; "
            "r = subprocess.run([sys.executable, '-m', 'trioconv', *sys.argv[1:]]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
            "sys.exit(r.returncode)"
        )
        out = tmp_path / "out.img"
        args = ["convert", "-f", "raw", "-m", "16", server.uri, str(out)]
        result = subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
        )
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == bytes(size)
    assert int(result.stdout) < 120 * 1024  # KiB


@pytest.mark.parametrize(
    ("sizes", "ok"),
    [
        ((3, 4096, 1 << 20), False),  # minimum not a power of two
        ((1 << 17, 1 << 17, 1 << 20), False),  # minimum over 64 KiB
        ((512, 1000, 1 << 20), False),  # preferred not a power of two
        ((4096, 512, 1 << 20), False),  # preferred under the minimum
        ((512, 4096, 1000), False),  # maximum not a multiple of the minimum
        ((1, 4096, 0xFFFFFFFF), True),  # no maximum: capped to what trioconv asks
    ],
)
def test_block_size_constraints(tmp_path: Path, sizes: tuple[int, int, int], ok: bool) -> None:
    with FakeNBDServer(tmp_path / "s.sock", size=SIZE, block_sizes=sizes) as server:
        result = trioconv_cli("convert", "-f", "raw", server.uri, tmp_path / "out.img")
    if ok:
        assert result.returncode == 0, result.stderr
        assert (tmp_path / "out.img").read_bytes() == bytes(SIZE)
    else:
        assert "invalid block sizes" in one_line_error(result)


def test_connections_must_agree_on_the_size(tmp_path: Path) -> None:
    """Multi-conn promises one export: a further connection that sees another size is
    not used, and the image is the first connection's."""
    with FakeNBDServer(tmp_path / "s.sock", size=SIZE, multi_conn=True, size_step=512) as server:
        info = trioconv_cli("info", "--output", "json", server.uri)
    out = tmp_path / "out.img"
    with FakeNBDServer(tmp_path / "t.sock", size=SIZE, multi_conn=True, size_step=512) as server:
        result = trioconv_cli("convert", "-f", "raw", server.uri, out)
    assert info.returncode == 0, info.stderr
    assert json.loads(info.stdout)["virtual-size"] == SIZE
    assert result.returncode == 0, result.stderr
    assert out.stat().st_size == SIZE


def test_refusal_text_is_one_line(tmp_path: Path) -> None:
    go_error = b"no such export\r\nsecond line\x00\x07" + b"x" * 5000
    with FakeNBDServer(tmp_path / "s.sock", size=SIZE, go_error=go_error) as server:
        line = one_line_error(trioconv_cli("info", server.uri))
    assert "no such export\\r\\nsecond line\\x00\\x07" in line and len(line) < 600


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_while_the_server_stopped_reading(
    make_image: ImageMaker, tmp_path: Path, signum: signal.Signals
) -> None:
    """The server takes the handshake, then never reads again: writes stay stuck on a
    full socket buffer, and a signal still ends the conversion at once."""
    src = make_image("src.img", "8M", "write -P 0x5a 0 8M")
    with FakeNBDServer(
        tmp_path / "s.sock", size=8 << 20, behaviour=lambda req: STOP_READING
    ) as server:
        status, stderr, elapsed = interrupt_cli(
            ["convert", "-n", src, server.uri], after=1.5, signum=signum
        )
    assert status == -signum, stderr
    assert stderr.splitlines() == [f"trioconv: interrupted by {signum.name}"]
    assert elapsed < 5, elapsed

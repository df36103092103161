"""NBD servers that break the protocol, stop answering or stop listening: one clear
error, promptly.

The scripted server (:mod:`tests.fake_nbd`) sends what real servers never do. The CLI
runs check the one line a user sees; the library runs (:func:`open_nbd` with short
``open_timeout`` and ``reply_timeout``) check the bounds on silence and the reasons
given for each protocol violation.
"""

from __future__ import annotations

import errno
import json
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from trioconv import Extent, ExtentKind, ImageError, TrioconvIOError
from trioconv.driver import Driver
from trioconv.protocols.nbd import MultiConnDriver, open_nbd

from ._faults import FAULT_DEADLINE, interrupt_cli, one_line_error
from .conftest import ImageMaker, trioconv_cli
from .fake_nbd import (
    CHUNK_DATA,
    CHUNK_ERROR,
    CMD_BLOCK_STATUS,
    CMD_FLUSH,
    CMD_READ,
    CMD_WRITE,
    NO_REPLY,
    STATE_HOLE,
    STATE_ZERO,
    STOP_READING,
    STRUCTURED_MAGIC,
    Answer,
    FakeNBDServer,
    Request,
    Stall,
    chunk,
    data_chunk,
    error_chunk,
    error_offset_chunk,
    hole_chunk,
    honest,
    simple_reply,
    status_chunk,
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


# -- the library against a scripted server: what the CLI runs, with short timeouts -------


async def first_error(body: Callable[[Driver], Awaitable[None]], uri: str, **kw: Any) -> Exception:
    """Open ``uri`` with :func:`open_nbd` (keywords as given), run ``body`` on the
    driver, and return the error it ended with. A lost connection fails both the
    request and the reader task, which trio may report together: the group is taken
    apart here, and every error in it must be the same one.
    """
    with trio.fail_after(FAULT_DEADLINE):
        try:
            async with open_nbd(uri, **kw) as driver:
                await body(driver)
        except BaseExceptionGroup as group:
            leaves: list[BaseException] = []
            todo: list[BaseException] = [group]
            while todo:
                item = todo.pop()
                if isinstance(item, BaseExceptionGroup):
                    todo.extend(item.exceptions)
                else:
                    leaves.append(item)
            assert len({str(e) for e in leaves}) == 1, leaves
            assert isinstance(leaves[0], Exception)
            return leaves[0]
        except Exception as exc:
            return exc
    raise AssertionError("no error")


def read_at(offset: int, length: int) -> Callable[[Driver], Awaitable[None]]:
    async def body(driver: Driver) -> None:
        await driver.preadinto(offset, memoryview(bytearray(length)))

    return body


@pytest.mark.parametrize("stall", ["greeting", "options", "go"])
async def test_a_server_silent_in_the_handshake(tmp_path: Path, stall: Stall) -> None:
    """A server that accepts the connection and then says nothing - no greeting, no
    answer to an option, none to NBD_OPT_GO - ends the open after ``open_timeout``
    seconds, naming what it did not do (not a hang: qemu-img would wait for good)."""
    with FakeNBDServer(tmp_path / "s.sock", size=SIZE, stall=stall) as server:
        started = trio.current_time()
        error = await first_error(read_at(0, 512), server.uri, open_timeout=0.5)
    assert isinstance(error, ImageError)
    assert "the server did not complete the NBD handshake within 0.5 s" in str(error)
    assert trio.current_time() - started < 3


async def test_a_listener_that_never_accepts() -> None:
    """A TCP server whose accept queue is full (it stopped accepting) drops the
    client's SYN: the connect alone would wait for the kernel's timeout, over two
    minutes. It is bounded by ``open_timeout`` too."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        queued = []
        try:
            for _ in range(4):  # fill the accept queue (nobody accepts)
                s = socket.socket()
                s.setblocking(False)
                s.connect_ex(("127.0.0.1", port))
                queued.append(s)
            started = trio.current_time()
            error = await first_error(read_at(0, 512), f"nbd://127.0.0.1:{port}/", open_timeout=0.5)
        finally:
            for s in queued:
                s.close()
    assert isinstance(error, ImageError)
    assert f"Failed to connect to '127.0.0.1:{port}': no connection within 0.5 s" in str(error)
    assert trio.current_time() - started < 3


def never_answers_reads(req: Request) -> Answer:
    return NO_REPLY if req.kind == CMD_READ else honest(req)


def stops_reading_at_writes(req: Request) -> Answer:
    return STOP_READING if req.kind == CMD_WRITE else honest(req)


async def test_a_request_the_server_never_answers(tmp_path: Path) -> None:
    """A read the server takes and never answers gives up the connection once the server
    has been silent for ``reply_timeout`` seconds, with one error saying so."""
    with FakeNBDServer(tmp_path / "s.sock", size=SIZE, behaviour=never_answers_reads) as server:
        started = trio.current_time()
        error = await first_error(read_at(0, 4096), server.uri, reply_timeout=0.5)
    assert isinstance(error, TrioconvIOError)
    assert str(error) == (
        f"{server.uri}: the NBD server sent nothing for 0.5 s while 1 request waited for a reply"
    )
    assert error.errno == errno.ETIMEDOUT
    assert trio.current_time() - started < 3


async def test_a_server_that_stopped_reading(tmp_path: Path) -> None:
    """The server stops reading mid-write: the write stays stuck on a full socket buffer
    until the silence bound gives the connection up, which stops the send too."""
    with FakeNBDServer(
        tmp_path / "s.sock", size=16 << 20, behaviour=stops_reading_at_writes
    ) as server:

        async def write(driver: Driver) -> None:
            await driver.pwrite(0, bytes(16 << 20))

        started = trio.current_time()
        error = await first_error(write, server.uri, writable=True, reply_timeout=0.5)
    assert isinstance(error, TrioconvIOError)
    assert "the NBD server sent nothing for 0.5 s" in str(error)
    assert trio.current_time() - started < 3


def slow_but_answering(req: Request) -> Answer:
    """Each read answered after 0.3 s, its 1 MiB sent in eight pieces 0.15 s apart."""
    if req.kind != CMD_READ:
        return honest(req)
    reply = data_chunk(req, req.offset, bytes(range(256)) * (req.length // 256), done=True)
    step = len(reply) // 8
    pieces: list[bytes | float] = [0.3]
    for start in range(0, len(reply), step):
        pieces += [reply[start : start + step], 0.15]
    return pieces


async def test_a_slow_server_that_answers_is_not_given_up(tmp_path: Path) -> None:
    """Only silence counts: reads that each take 1.3 s, their payloads trickling in,
    go through with a 0.5 s bound - every byte received starts the count again, those
    received straight into the reader's buffer too."""
    with FakeNBDServer(tmp_path / "s.sock", size=SIZE, behaviour=slow_but_answering) as server:
        async with open_nbd(server.uri, connections=1, reply_timeout=0.5) as driver:
            for _ in range(2):
                buf = bytearray(SIZE)
                await driver.preadinto(0, memoryview(buf))
                assert buf == bytes(range(256)) * (SIZE // 256)


def slow_flush(req: Request) -> Answer:
    """A FLUSH answered after 1.5 s (a large cache written out), the rest at once."""
    return [1.5, honest(req)] if req.kind == CMD_FLUSH else honest(req)


async def test_a_long_flush_is_waited_for(tmp_path: Path) -> None:
    """A server writing its cache out has nothing to say until it is done: while a FLUSH
    waits, silence does not count, and a flush longer than the bound goes through."""
    with FakeNBDServer(tmp_path / "s.sock", size=SIZE, behaviour=slow_flush) as server:
        async with open_nbd(server.uri, writable=True, connections=1, reply_timeout=0.5) as d:
            await d.pwrite(0, b"\x01" * 4096)
            started = trio.current_time()
            await d.flush()
            assert trio.current_time() - started >= 1.5


READ_AT, READ_LEN = 8192, 65536


def overlapping(req: Request) -> Answer:
    """The first half twice: as many bytes as asked for, the second half never."""
    if req.kind != CMD_READ:
        return honest(req)
    half = b"\x01" * (req.length // 2)
    return data_chunk(req, req.offset, half, done=False) + data_chunk(
        req, req.offset, half, done=True
    )


def wrong_cookie(req: Request) -> Answer:
    if req.kind != CMD_READ:
        return honest(req)
    req.cookie += 1000
    return data_chunk(req, req.offset, bytes(req.length), done=True)


def before_the_request(req: Request) -> Answer:
    if req.kind != CMD_READ:
        return honest(req)
    return data_chunk(req, req.offset - 4096, bytes(req.length), done=True)


def past_the_request(req: Request) -> Answer:
    if req.kind != CMD_READ:
        return honest(req)
    return data_chunk(req, req.offset + 4096, bytes(req.length), done=True)


def empty_hole(req: Request) -> Answer:
    if req.kind != CMD_READ:
        return honest(req)
    return data_chunk(req, req.offset, bytes(req.length), done=False) + hole_chunk(
        req, req.offset + req.length, 0, done=True
    )


def empty_data(req: Request) -> Answer:
    if req.kind != CMD_READ:
        return honest(req)
    return chunk(req, CHUNK_DATA, struct.pack(">Q", req.offset), done=False) + data_chunk(
        req, req.offset, bytes(req.length), done=True
    )


def error_offset_outside(req: Request) -> Answer:
    if req.kind != CMD_READ:
        return honest(req)
    return error_offset_chunk(req, 5, b"bad sector", req.offset + req.length)


def error_zero(req: Request) -> Answer:
    return error_chunk(req, 0, b"all is well") if req.kind == CMD_READ else honest(req)


def error_message_too_long(req: Request) -> Answer:
    if req.kind != CMD_READ:
        return honest(req)
    return chunk(req, CHUNK_ERROR, struct.pack(">IH", 5, 100) + b"short")


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        (overlapping, f"read chunk at byte {READ_AT} overlaps an earlier one"),
        (wrong_cookie, "reply for unknown cookie 1001"),
        (before_the_request, f"read chunk at byte {READ_AT - 4096} outside the request"),
        (past_the_request, f"read chunk at byte {READ_AT + 4096} outside the request"),
        (empty_hole, "OFFSET_HOLE chunk of 0 bytes"),
        (empty_data, "OFFSET_DATA chunk without data"),
        (
            error_offset_outside,
            f"error offset {READ_AT + READ_LEN} outside the request at byte {READ_AT}",
        ),
        (error_zero, "error chunk with error 0"),
        (error_message_too_long, "error chunk message longer than the chunk"),
    ],
)
async def test_replies_that_break_the_protocol(
    tmp_path: Path, behaviour: Callable[[Request], Answer], reason: str
) -> None:
    """Replies the protocol forbids give the connection up with the reason - never a
    read that succeeds with bytes the server did not send (overlapping chunks that add
    up to the request's length left half the buffer as it was)."""
    with FakeNBDServer(tmp_path / "s.sock", size=SIZE, behaviour=behaviour) as server:
        error = await first_error(read_at(READ_AT, READ_LEN), server.uri)
    assert isinstance(error, TrioconvIOError)
    assert str(error) == f"{server.uri}: connection to the NBD server lost: {reason}"


def data_for_writes(req: Request) -> Answer:
    return data_chunk(req, req.offset, b"x", done=True) if req.kind == CMD_WRITE else honest(req)


def status_for_writes(req: Request) -> Answer:
    if req.kind != CMD_WRITE:
        return honest(req)
    return status_chunk(req, [(req.length, 0)])


@pytest.mark.parametrize(
    ("behaviour", "reason"),
    [
        (data_for_writes, "a data chunk in the reply to a WRITE request"),
        (status_for_writes, "a status chunk in the reply to a WRITE request"),
    ],
)
async def test_chunks_a_write_cannot_get(
    tmp_path: Path, behaviour: Callable[[Request], Answer], reason: str
) -> None:
    """A write answered with read data or block status is not a successful write."""

    async def write(driver: Driver) -> None:
        await driver.pwrite(0, bytes(4096))

    with FakeNBDServer(
        tmp_path / "s.sock", size=SIZE, behaviour=behaviour, meta_context=True
    ) as server:
        error = await first_error(write, server.uri, writable=True)
    assert isinstance(error, TrioconvIOError)
    assert str(error) == f"{server.uri}: connection to the NBD server lost: {reason}"


async def test_structured_replies_only_when_negotiated(tmp_path: Path) -> None:
    """A server that refused structured replies must not send them: read data in a
    chunk it did not agree to is refused, not taken."""
    with FakeNBDServer(tmp_path / "s.sock", size=SIZE, structured=False) as server:
        error = await first_error(read_at(0, 4096), server.uri)
    assert isinstance(error, TrioconvIOError)
    assert str(error).endswith("a structured reply, which was not negotiated")


def fails_in_the_middle(req: Request) -> Answer:
    """A read whose first half arrives, then an error at a byte of its second half."""
    if req.kind != CMD_READ:
        return honest(req)
    half = req.length // 2
    return data_chunk(req, req.offset, bytes(half), done=False) + error_offset_chunk(
        req, 5, b"bad sector", req.offset + half + 512
    )


async def test_an_error_offset_names_the_failing_byte(tmp_path: Path) -> None:
    """``NBD_REPLY_TYPE_ERROR_OFFSET`` says where the read failed: the error names that
    byte rather than the request's start, and the connection stays usable."""
    with FakeNBDServer(tmp_path / "s.sock", size=SIZE, behaviour=fails_in_the_middle) as server:
        async with open_nbd(server.uri, connections=1) as driver:
            with pytest.raises(TrioconvIOError) as info:
                await driver.preadinto(READ_AT, memoryview(bytearray(READ_LEN)))
            failing = READ_AT + READ_LEN // 2 + 512
            assert str(info.value) == (
                f"error while reading {server.uri} at byte {failing}: "
                "Input/output error (bad sector)"
            )
            assert info.value.offset == failing
            assert info.value.errno == errno.EIO
            assert (await driver.block_status(0, SIZE)).kind is ExtentKind.DATA  # still up


def status_past_the_request(req: Request) -> Answer:
    """Block status whose first extent already covers the request, and a second one
    after it (forbidden; only the last extent may go past the request). Asked again
    from there, the truth: data."""
    if req.kind != CMD_BLOCK_STATUS:
        return honest(req)
    if req.offset == 0:
        return status_chunk(req, [(req.length, 0), (SIZE - req.length, STATE_HOLE | STATE_ZERO)])
    return status_chunk(req, [(req.length, 0)])


async def test_block_status_past_the_request_is_not_kept(tmp_path: Path) -> None:
    """Extents after the one that reaches the request's end are ignored, as QEMU
    clamps them: the next query asks the server again instead of trusting them."""
    with FakeNBDServer(
        tmp_path / "s.sock", size=SIZE, behaviour=status_past_the_request, meta_context=True
    ) as server:
        async with open_nbd(server.uri, connections=1) as driver:
            assert await driver.block_status(0, 65536) == Extent(0, 65536, ExtentKind.DATA)
            assert await driver.block_status(65536, 65536) == Extent(65536, 65536, ExtentKind.DATA)
    assert [r.kind for r in server.requests] == [CMD_BLOCK_STATUS, CMD_BLOCK_STATUS]


def empty_first_extent(req: Request) -> Answer:
    if req.kind != CMD_BLOCK_STATUS:
        return honest(req)
    return status_chunk(req, [(0, 0), (req.length, 0)])


async def test_block_status_that_does_not_advance(tmp_path: Path) -> None:
    """An extent of 0 bytes first (the protocol forbids it) cannot make the client ask
    again for ever: the query fails, naming the byte."""
    with FakeNBDServer(
        tmp_path / "s.sock", size=SIZE, behaviour=empty_first_extent, meta_context=True
    ) as server:

        async def status(driver: Driver) -> None:
            await driver.block_status(0, SIZE)

        error = await first_error(status, server.uri)
    assert isinstance(error, TrioconvIOError)
    assert str(error) == f"{server.uri}: empty block status at byte 0"


async def test_every_connection_says_goodbye(tmp_path: Path) -> None:
    """Each connection ends with NBD_CMD_DISC before it closes, as qemu's does (a
    server then knows the client left on purpose, not in a crash)."""
    with FakeNBDServer(tmp_path / "s.sock", size=SIZE, multi_conn=True) as server:
        async with open_nbd(server.uri) as driver:
            assert isinstance(driver, MultiConnDriver)
            for _ in range(100):
                if len(driver.connections) == 4:
                    break
                await trio.sleep(0.01)
            assert len(driver.connections) == 4
            await driver.preadinto(0, memoryview(bytearray(4096)))
        for _ in range(100):  # (the server's threads see the DISC in their own time)
            if server.disconnects == 4:
                break
            await trio.sleep(0.01)
    assert server.disconnects == 4


async def test_a_connection_with_other_block_sizes_is_not_used(tmp_path: Path) -> None:
    """Requests go to any connection of a multi-conn export, sized by the first one's
    block sizes: a further connection that announced others (a larger minimum, a
    smaller maximum) would get requests it refuses, so it is not used."""
    sizes = [(1, 4096, 1 << 20), (4096, 4096, 65536)]
    with FakeNBDServer(
        tmp_path / "s.sock", size=SIZE, multi_conn=True, block_sizes=sizes
    ) as server:
        async with open_nbd(server.uri) as driver:
            assert isinstance(driver, MultiConnDriver)
            await trio.sleep(0.3)  # the three further handshakes are done by then
            assert len(driver.connections) == 1
            await driver.preadinto(0, memoryview(bytearray(SIZE)))


def first_read_slow(req: Request) -> Answer:
    """The first read is answered after 1 s, during which the server reads nothing."""
    if req.kind == CMD_READ and req.offset == 0:
        return [1.0, data_chunk(req, 0, bytes(req.length), done=True)]
    return honest(req)


async def test_a_request_cancelled_before_it_was_sent_is_not_waited_for(tmp_path: Path) -> None:
    """A read cancelled while it waited to be sent (behind a write stuck on a server
    that is not reading) never reached the server, which owes it nothing: the idle
    connection afterwards is not given up for the missing reply."""
    with FakeNBDServer(tmp_path / "s.sock", size=16 << 20, behaviour=first_read_slow) as server:
        async with (
            open_nbd(server.uri, writable=True, connections=1, reply_timeout=2) as driver,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(driver.preadinto, 0, memoryview(bytearray(4096)))
            await trio.sleep(0.1)
            nursery.start_soon(driver.pwrite, 0, bytes(8 << 20))  # stuck: nobody reads
            await trio.sleep(0.1)
            with trio.move_on_after(0.2) as waited:
                await driver.preadinto(4096, memoryview(bytearray(4096)))
            assert waited.cancelled_caught
            # (the nursery ends once the first read and the write are answered)
            await trio.sleep(3)  # idle, longer than the bound
            await driver.preadinto(8192, memoryview(bytearray(4096)))
    assert [r.offset for r in server.requests if r.kind == CMD_READ] == [0, 8192]

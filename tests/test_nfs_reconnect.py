"""The NFS client reconnects, as libnfs does: a dropped connection or a server restarted
mid-copy costs a pause, not the conversion.

Two servers, two views. Over a socket pair the reader's connection is cut exactly where
a test wants - with calls in flight, half-way through a READ reply's data - and the
calls must go out again, with their xids, on the new one. The scripted server
(:mod:`tests.fake_nfs`) resets its connection at a chosen call, once or every time, and
can forget what was never committed, as a restarted server does: the conversion must
still be byte-exact, the writes the restart lost written again. A server that stays
away, or drops every connection, must still end the conversion with one line, promptly.
(nfs-ganesha restarted for real mid-copy is in :mod:`tests.test_nfs`, which holds the
one running ganesha.)
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import re
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from trioconv import TrioconvIOError
from trioconv.protocols.nfs import _client as nfs_client
from trioconv.protocols.nfs import _proto as proto

from ._faults import FAULT_DEADLINE, MiB, one_line_error
from .conftest import trioconv_cli
from .fake_nfs import Call, FakeNFSServer, Reset
from .test_nfs_proto import FH, ScriptedServer, accepted, fattr3, read_reply, u32

# -- the reader over socket pairs -------------------------------------------------------------


class Redial:
    """Stands in for reconnecting to the server: each call makes a new socket pair, and
    hands its server end to the test (``servers``) - or, with ``refuse``, fails as a
    server that is down does."""

    def __init__(self) -> None:
        self.refuse = False
        self.count = 0
        self.made: list[ScriptedServer] = []
        self._send, self.servers = trio.open_memory_channel[ScriptedServer](8)

    async def __call__(self) -> trio.SocketStream:
        self.count += 1
        await trio.lowlevel.checkpoint()
        if self.refuse:
            raise ConnectionRefusedError(errno.ECONNREFUSED, os.strerror(errno.ECONNREFUSED))
        a, b = trio.socket.socketpair()
        self.made.append(ScriptedServer(b))
        self._send.send_nowait(self.made[-1])
        return trio.SocketStream(a)


@contextlib.asynccontextmanager
async def reconnecting_session() -> AsyncIterator[tuple[Any, ScriptedServer, Redial]]:
    """An NFS session whose reader runs and reconnects through a :class:`Redial`, and the
    server end of its first connection."""
    a, b = trio.socket.socketpair()
    client = nfs_client.RPCClient(trio.SocketStream(a), "nfs://fake/export/disk.img", None, 4 << 20)
    redial = Redial()
    client.redial = redial
    session = nfs_client._Session(client, FH, "/export", [], "nfs://fake/export/disk.img")
    server = ScriptedServer(b)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(client.reader)
        try:
            yield session, server, redial
        finally:
            # (Shielded: the reader's failure may have cancelled the test's body, and
            # a cancelled aclose() would leave the remaining ends open.)
            with trio.CancelScope(shield=True):
                await client.aclose()
                for end in [server, *redial.made]:
                    await end.stream.aclose()


def write_reply(xid: int, count: int, verf: bytes) -> bytes:
    """WRITE3resok: no wcc data, ``count`` bytes UNSTABLE under ``verf``."""
    return accepted(xid, 0, u32(0, 0, 0, count, proto.Stable.UNSTABLE) + verf)


async def three_calls(session: Any, buf: bytearray, results: dict[str, object]) -> None:
    """A 1 MiB READ (its data received straight into ``buf``), a WRITE and a GETATTR."""

    async def read() -> None:
        results["READ"] = await session.read(FH, 0, memoryview(buf))

    async def write() -> None:
        head = proto.encode_write_head(FH, 4096, 5, proto.Stable.UNSTABLE)
        write = await session.nfs(
            proto.Proc.WRITE, head, proto.decode_write, payload=memoryview(b"hello")
        )
        results["WRITE"] = (write.count, write.verf)

    async def getattr_() -> None:
        attr = await session.nfs(proto.Proc.GETATTR, proto.encode_fh(FH), proto.decode_getattr)
        results["GETATTR"] = attr.size

    async with trio.open_nursery() as nursery:
        for call in (read, write, getattr_):
            nursery.start_soon(call)


async def receive_calls(server: ScriptedServer, n: int) -> dict[int, tuple[int, bytes]]:
    """The next ``n`` calls by procedure: their xids and arguments."""
    calls: dict[int, tuple[int, bytes]] = {}
    for _ in range(n):
        xid, proc, args = await server.next_call()
        calls[proc] = (xid, args)
    return calls


async def test_calls_in_flight_go_out_again_on_the_new_connection() -> None:
    """The connection breaks half-way through a READ reply's data, with a WRITE and a
    GETATTR waiting too: all three go out again, with the same xids and arguments, on
    the new connection, and their callers just see their replies."""
    data = os.urandom(MiB)
    buf = bytearray(b"\xee" * MiB)
    results: dict[str, object] = {}
    fh = u32(len(FH)) + FH
    async with reconnecting_session() as (session, first, redial):
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(three_calls, session, buf, results)
                calls = await receive_calls(first, 3)
                assert sorted(calls) == [proto.Proc.GETATTR, proto.Proc.READ, proto.Proc.WRITE]
                message = read_reply(calls[proto.Proc.READ][0], data, eof=True)
                message = u32(0x80000000 | len(message)) + message
                await first.stream.send_all(message[: len(message) // 2])
                await trio.testing.wait_all_tasks_blocked()
                await first.stream.aclose()  # mid-data: the READ has no answer
                second = await redial.servers.receive()
                assert await receive_calls(second, 3) == calls
                xid = calls[proto.Proc.READ][0]
                await second.send(read_reply(xid, data, eof=True))
                await second.send(write_reply(calls[proto.Proc.WRITE][0], 5, b"VERF-two"))
                await second.send(
                    accepted(calls[proto.Proc.GETATTR][0], 0, u32(0) + fattr3(1 << 20))
                )
        assert calls[proto.Proc.GETATTR][1] == fh
        assert results == {"READ": (MiB, True), "WRITE": (5, b"VERF-two"), "GETATTR": 1 << 20}
        assert buf == data
        assert session.client.connection == 1 and redial.count == 1
        # The new connection serves the calls that come next.
        async with trio.open_nursery() as nursery:
            nursery.start_soon(three_calls, session, buf, results)
            calls = await receive_calls(second, 3)
            await second.send(read_reply(calls[proto.Proc.READ][0], data[::-1], eof=True))
            await second.send(write_reply(calls[proto.Proc.WRITE][0], 5, b"VERF-two"))
            await second.send(accepted(calls[proto.Proc.GETATTR][0], 0, u32(0) + fattr3(7)))
        assert buf == data[::-1] and results["GETATTR"] == 7


async def test_a_connection_lost_while_idle_is_made_again() -> None:
    """No call waits: the connection is replaced all the same, for the next one."""
    async with reconnecting_session() as (session, first, redial):
        with trio.fail_after(10):
            await first.stream.aclose()
            second = await redial.servers.receive()
            got: list[int] = []

            async def getattr_() -> None:
                got.append(
                    (
                        await session.nfs(
                            proto.Proc.GETATTR, proto.encode_fh(FH), proto.decode_getattr
                        )
                    ).size
                )

            async with trio.open_nursery() as nursery:
                nursery.start_soon(getattr_)
                xid, proc, _args = await second.next_call()
                assert proc == proto.Proc.GETATTR
                await second.send(accepted(xid, 0, u32(0) + fattr3(12345)))
        assert got == [12345]


@pytest.fixture
def quick_reconnects(monkeypatch: pytest.MonkeyPatch) -> None:
    """Three attempts, 10 ms apart: the policy, not the waiting, is under test."""
    monkeypatch.setattr(nfs_client, "_RECONNECT_DELAYS", (0.0, 0.01, 0.01))


async def getattr_into(session: Any, results: list[int | TrioconvIOError]) -> None:
    """GETATTR the file: its size, or the error, goes into ``results``."""
    try:
        attr = await session.nfs(proto.Proc.GETATTR, proto.encode_fh(FH), proto.decode_getattr)
    except TrioconvIOError as exc:
        results.append(exc)
    else:
        results.append(attr.size)


@pytest.mark.usefixtures("quick_reconnects")
async def test_a_server_that_stays_away_fails_every_call() -> None:
    """Every attempt refused: the waiting call fails, and so does the reader (which
    ends the conversion), with one line saying what happened first and last."""
    results: list[int | TrioconvIOError] = []
    with trio.fail_after(10), pytest.raises(BaseExceptionGroup) as info:  # noqa: PT012
        async with reconnecting_session() as (session, first, redial):
            redial.refuse = True
            async with trio.open_nursery() as nursery:
                nursery.start_soon(getattr_into, session, results)
                await first.next_call()
                await first.stream.aclose()
    assert info.value.split(TrioconvIOError)[0] is not None  # (the reader's)
    assert redial.count == 3
    assert [str(error) for error in results] == [
        "nfs://fake/export/disk.img: connection to the NFS server lost: the server closed the "
        "connection; 3 attempts to reconnect failed, the last: Connection refused"
    ]


async def test_a_new_connection_lost_before_answering_is_one_failed_attempt() -> None:
    """A dying server's listening socket may still take a connection, then reset it:
    the call goes out on a third connection, and gets its reply there."""
    results: list[int | TrioconvIOError] = []
    async with reconnecting_session() as (session, first, redial):
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(getattr_into, session, results)
                xid, _proc, _args = await first.next_call()
                await first.stream.aclose()
                second = await redial.servers.receive()
                assert (await second.next_call())[0] == xid
                await second.stream.aclose()
                third = await redial.servers.receive()
                assert (await third.next_call())[0] == xid
                await third.send(accepted(xid, 0, u32(0) + fattr3(4242)))
        assert results == [4242]
        assert redial.count == 2 and session.client.connection == 2


@pytest.mark.usefixtures("quick_reconnects")
async def test_a_server_that_drops_every_new_connection_is_given_up() -> None:
    """Each new connection breaks before answering: three of them (the attempts), then
    the end - not a loop."""
    results: list[int | TrioconvIOError] = []
    with trio.fail_after(10), pytest.raises(BaseExceptionGroup):  # noqa: PT012
        async with (
            reconnecting_session() as (session, first, redial),
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(getattr_into, session, results)
            xid, _proc, _args = await first.next_call()
            await first.stream.aclose()
            for _ in range(3):
                server = await redial.servers.receive()
                assert (await server.next_call())[0] == xid
                await server.stream.aclose()
    assert redial.count == 3
    assert [str(error) for error in results] == [
        "nfs://fake/export/disk.img: connection to the NFS server lost: the server closed the "
        "connection; 3 attempts to reconnect failed, the last: connected, then lost before "
        "any reply: the server closed the connection"
    ]


async def test_closing_while_reconnecting_does_not_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """The file is closed while the reader pauses before an attempt: it stops at once."""
    monkeypatch.setattr(nfs_client, "_RECONNECT_DELAYS", (30.0,))
    with trio.fail_after(5):
        async with reconnecting_session() as (session, first, redial):
            await first.stream.aclose()
            await trio.testing.wait_all_tasks_blocked()
            await session.client.aclose()
    assert redial.count == 0


@pytest.mark.usefixtures("quick_reconnects")
async def test_a_server_that_cuts_every_read_reply_is_given_up() -> None:
    """Half of each READ reply's data, then the connection drops: a reply cut short is
    no answer, so the new connections count as failed attempts - three, then the end,
    not a reconnect loop."""
    data = os.urandom(MiB)
    buf = bytearray(MiB)
    results: list[object] = []

    async def read() -> None:
        try:
            results.append(await session.read(FH, 0, memoryview(buf)))
        except TrioconvIOError as exc:
            results.append(exc)

    with trio.fail_after(10), pytest.raises(BaseExceptionGroup):  # noqa: PT012
        async with (
            reconnecting_session() as (session, server, redial),
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(read)
            for _ in range(4):
                xid, _proc, _args = await server.next_call()
                reply = read_reply(xid, data, eof=True)
                record = u32(0x80000000 | len(reply)) + reply
                await server.stream.send_all(record[: len(record) // 2])
                await trio.testing.wait_all_tasks_blocked()
                await server.stream.aclose()
                if redial.count == 3:
                    break
                server = await redial.servers.receive()
    assert redial.count == 3
    assert len(results) == 1 and isinstance(results[0], TrioconvIOError), results
    assert "3 attempts to reconnect failed" in str(results[0])


async def test_closing_just_as_the_reader_reconnects_does_not_wait() -> None:
    """The file is closed while the reader is closing the broken stream, before its
    first attempt: it makes none, and ends at once."""
    a, b = trio.socket.socketpair()
    client = nfs_client.RPCClient(trio.SocketStream(a), "nfs://fake/export/disk.img", None, 4 << 20)
    redial = Redial()
    redial.refuse = True
    client.redial = redial
    server = ScriptedServer(b)
    closing_stream = client._stream.aclose
    calls = 0

    async def close_stream() -> None:
        # The reader's shielded close of the broken stream: the file's owner closes
        # the file just then (its own close of the stream is the second call).
        nonlocal calls
        calls += 1
        await closing_stream()
        if calls == 1:
            await client.aclose()

    client._stream.aclose = close_stream  # type: ignore[method-assign]
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(client.reader)
            await trio.testing.wait_all_tasks_blocked()
            await server.stream.aclose()
    assert redial.count == 0


# -- the scripted server: a reset exactly where wanted ----------------------------------------

#: 1.5 MiB of random bytes: 24 READs or WRITEs of the 64 KiB the scripted server allows.
DATA = os.urandom(3 * MiB // 2)
TRANSFER = 64 * 1024


def reset_at(
    proc: str, n: int, then: Callable[[Call], None] | None = None
) -> Callable[[Call], bytes | None]:
    """Reset the connection instead of answering the ``n``-th ``proc`` call (once),
    after ``then(call)``."""
    seen = itertools.count(1)

    def behaviour(call: Call) -> bytes | None:
        if call.proc == proc and next(seen) == n:
            if then is not None:
                then(call)
            return Reset()
        return None

    return behaviour


def convert(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return trioconv_cli("convert", "-f", "raw", "-O", "raw", *args, timeout=FAULT_DEADLINE * 2)


@pytest.mark.parametrize("direction", ["read", "write"])
def test_a_reset_mid_copy_is_survived(tmp_path: Path, direction: str) -> None:
    """The server resets the connection instead of answering the fifth READ (WRITE):
    that call and the others in flight go out again, and the copy is exact."""
    src, out = tmp_path / "src.img", tmp_path / "out.img"
    src.write_bytes(DATA)
    proc = direction.upper()
    initial = DATA if direction == "read" else b"\xaa" * len(DATA)
    with FakeNFSServer(initial, reset_at(proc, 5), transfer=TRANSFER) as server:
        args = (server.url, out) if direction == "read" else ("-n", src, server.url)
        result = convert(*args)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        assert server.calls.count(proc) > len(DATA) // TRANSFER  # some went out twice
        if direction == "write":
            assert server.file == bytearray(DATA)
    if direction == "read":
        assert out.read_bytes() == DATA


def test_a_restart_that_loses_unstable_writes(tmp_path: Path) -> None:
    """A restart at the tenth WRITE: the server forgets every write not committed (all
    nine answered so far: only the end commits), takes a new write verifier and resets
    the connection. The client reconnects, sends what was in flight again, and the
    COMMIT's new verifier makes it write the nine lost ones again - the file is exact."""
    durable = bytearray(b"\xaa" * len(DATA))
    restarts = reset_at("WRITE", 10)

    def behaviour(call: Call) -> bytes | None:
        assert call.server is not None
        server = call.server
        assert server.file is not None
        if call.proc == "COMMIT":
            committed = call.honest()
            durable[:] = server.file
            return committed
        reset = restarts(call)
        if reset is not None:
            server.file[:] = durable  # what the restart lost
            server.verf = b"rebooted"
        return reset

    src = tmp_path / "src.img"
    src.write_bytes(DATA)
    with FakeNFSServer(bytes(durable), behaviour, transfer=TRANSFER) as server:
        result = convert("-n", src, server.url)
        assert result.returncode == 0, result.stderr
        assert server.file == bytearray(DATA)
        assert server.calls.count("COMMIT") == 2  # one finds the change, one after rewriting
        assert server.calls.count("WRITE") >= len(DATA) // TRANSFER + 9


def test_a_server_that_drops_every_connection(tmp_path: Path) -> None:
    """Every READ resets the connection: five new connections (about 7.5 s of pauses
    between them), then one line - no loop."""
    out = tmp_path / "out.img"
    with FakeNFSServer(DATA, lambda call: Reset() if call.proc == "READ" else None) as server:
        started = time.monotonic()
        line = one_line_error(convert(server.url, out))
        elapsed = time.monotonic() - started
    # (A reset may be seen as a reset or, when it comes as the reader reads, as the end
    # of the stream.)
    lost = "(Connection reset by peer|the server closed the connection)"
    assert re.search(
        f"connection to the NFS server lost: {lost}; 5 attempts to reconnect failed, the "
        f"last: connected, then lost before any reply: {lost}$",
        line,
    ), line
    assert elapsed < FAULT_DEADLINE
    assert not out.exists()

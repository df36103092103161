"""A server that takes the connection and then says nothing: every wait is bounded.

TCP alone cannot tell a server that is thinking from one that is gone: a hung server
(or a stopped one, whose kernel still completes connections) keeps the connection open
and silent for ever. The NFS client therefore bounds every wait itself, strictly where
nothing legitimate takes long and generously where something may:

* opening: each new connection - portmapper, MOUNT, NFS - is made and answers (GETPORT,
  MNT, a NULL call) within :data:`~trioconv.protocols.nfs._client._HANDSHAKE_TIMEOUT`,
  and the opening calls after that within ``OPEN_TIMEOUT``; a silent UMNT (advisory) is
  left unanswered rather than failing the open;
* an open file's calls: with calls waiting and no reply at all for
  :data:`~trioconv.protocols.nfs._client._REPLY_TIMEOUT` (a minute: a busy server's
  COMMIT can take long) the connection is made again and the calls sent again; silence
  on the new one too ends the conversion;
* reconnecting: a new connection must answer a NULL call within the attempt's time, so
  a server that takes connections and never answers is a failed attempt.

The limits are module constants; these tests make them small, in-process with
``monkeypatch`` and for the command line with :func:`cli_with`, which sets them in the
child before the command runs. Scripted servers (:mod:`tests.fake_nfs`, the socket
pairs of :mod:`tests.test_nfs_reconnect`) play the silent servers; nfs-ganesha stopped
mid-copy, resumed or not, is in :mod:`tests.test_nfs`.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
import trio
import trio.testing

from trioconv import ImageError, TrioconvIOError
from trioconv.protocols.nfs import _client as nfs_client
from trioconv.protocols.nfs import _proto as proto
from trioconv.protocols.nfs import open_nfs

from ._faults import FAULT_DEADLINE, MiB, one_line_error
from ._scripted import ScriptedServer
from .fake_nfs import Behaviour, Call, FakeNFSServer, Reset, reply
from .test_nfs_proto import FH, accepted, fattr3, read_reply, u32
from .test_nfs_reconnect import getattr_into, reconnecting_session

DATA = bytes(range(256)) * 4096  # 1 MiB


class SilentServer(ScriptedServer):
    """Accepts connections, reads whatever comes, never sends a byte."""

    def __init__(self) -> None:
        super().__init__(socket.create_server(("127.0.0.1", 0)))
        self.port: int = self._listener.getsockname()[1]

    def serve(self, conn: socket.socket) -> None:
        while conn.recv(65536):
            pass


def silent_at(*procs: str) -> Behaviour:
    """A :class:`FakeNFSServer` behaviour: no answer at all to ``procs``."""
    return lambda call: b"" if call.proc in procs else None


def cli_with(limits: Mapping[str, object], *args: str | Path) -> subprocess.CompletedProcess[str]:
    """``python -m trioconv ARGS`` with some of the NFS client's limits set first (as a
    test's ``monkeypatch`` would): the command line as users run it, faster."""
    setup = "".join(f"_client.{name} = {value!r}; " for name, value in limits.items())
    code = (
        "from trioconv.protocols.nfs import _client; "
        f"{setup}"
        "from _trioconv_launch import main; main()"
    )
    return subprocess.run(
        [sys.executable, "-c", code, *[str(a) for a in args]],
        capture_output=True,
        text=True,
        timeout=FAULT_DEADLINE,
        check=False,
    )


# -- opening -----------------------------------------------------------------------------------


@pytest.fixture
def short_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """0.3 s for each handshake, 1 s for the opening calls, 0.2 s for UMNT."""
    monkeypatch.setattr(nfs_client, "_HANDSHAKE_TIMEOUT", 0.3)
    monkeypatch.setattr(nfs_client, "_UMNT_TIMEOUT", 0.2)
    monkeypatch.setattr(nfs_client, "OPEN_TIMEOUT", 1.0)


@pytest.mark.usefixtures("short_open")
async def test_a_silent_portmapper(monkeypatch: pytest.MonkeyPatch) -> None:
    """The portmapper takes the connection and never answers GETPORT."""
    with SilentServer() as server:
        monkeypatch.setattr(proto, "PMAP_PORT", server.port)
        uri = "nfs://127.0.0.1/export/disk.img"
        started = trio.current_time()
        with pytest.raises(ImageError) as info:
            async with open_nfs(uri):
                pass
    assert str(info.value) == (
        f"Could not open '{uri}': the portmapper at 127.0.0.1:{server.port} did not answer in 0.3 s"
    )
    assert trio.current_time() - started < 2


@pytest.mark.usefixtures("short_open")
@pytest.mark.parametrize("proc", ["MNT", "NULL", "LOOKUP", "GETATTR", "ACCESS", "FSINFO"])
async def test_silent_while_opening(proc: str) -> None:
    """Silent at one call of the opening: one line naming the stage, promptly. A new
    connection's first answer (MNT on MOUNT's, NULL on NFS's) is a handshake."""
    with FakeNFSServer(DATA, silent_at(proc)) as server:
        url, nfs_port, mount_port = server.url, server.nfs_port, server.mount_port
        started = trio.current_time()
        with pytest.raises(ImageError) as info:
            async with open_nfs(url):
                pass
    if proc == "MNT":
        why = f"the MOUNT server at 127.0.0.1:{mount_port} did not answer in 0.3 s"
    elif proc == "NULL":
        why = f"the NFS server at 127.0.0.1:{nfs_port} did not answer in 0.3 s"
    else:
        why = "the server did not answer in time"
    assert str(info.value) == f"Could not open '{url}': {why}"
    assert trio.current_time() - started < 2


@pytest.mark.usefixtures("short_open")
async def test_a_silent_umnt_does_not_fail_the_open() -> None:
    """UMNT only tidies the server's advisory mount list: no answer, no matter."""
    with FakeNFSServer(DATA, silent_at("UMNT")) as server:
        started = trio.current_time()
        async with open_nfs(server.url) as driver:
            buf = bytearray(4096)
            await driver.preadinto(4096, memoryview(buf))
        assert buf == DATA[4096:8192]
        assert "UMNT" in server.calls
    assert trio.current_time() - started < 2


def test_cli_against_a_silent_listener(tmp_path: Path) -> None:
    """``convert nfs://host:PORT/...`` to a listener that never answers: status 1, one
    line, no traceback, no target left - in a second, not for ever."""
    out = tmp_path / "out.raw"
    with SilentServer() as server:
        url = f"nfs://127.0.0.1:{server.port}/export/disk.img?mountport={server.port}"
        started = time.monotonic()
        result = cli_with({"_HANDSHAKE_TIMEOUT": 0.5}, "convert", "-O", "raw", url, out)
        elapsed = time.monotonic() - started
    line = one_line_error(result)
    assert line == (
        f"trioconv: Could not open '{url}': the MOUNT server at 127.0.0.1:{server.port} did "
        "not answer in 0.5 s"
    )
    assert "Traceback" not in result.stderr
    assert not out.exists()
    assert elapsed < 5


def test_cli_creating_on_a_silent_listener(tmp_path: Path) -> None:
    """The same as the target: nothing is created, one line."""
    src = tmp_path / "src.raw"
    src.write_bytes(DATA)
    with SilentServer() as server:
        url = f"nfs://127.0.0.1/export/new.img?nfsport={server.port}&mountport={server.port}"
        result = cli_with({"_HANDSHAKE_TIMEOUT": 0.5}, "convert", "-O", "raw", src, url)
    assert "did not answer in 0.5 s" in one_line_error(result)


# -- an open file's calls ----------------------------------------------------------------------


@pytest.fixture
def short_replies(monkeypatch: pytest.MonkeyPatch) -> None:
    """0.2 s of silence with calls waiting is a stalled connection; quick reconnects."""
    monkeypatch.setattr(nfs_client, "_REPLY_TIMEOUT", 0.2)
    monkeypatch.setattr(nfs_client, "_RECONNECT_DELAYS", (0.0, 0.01, 0.01))


@pytest.mark.usefixtures("short_replies")
async def test_an_unanswered_call_goes_out_again_on_a_new_connection() -> None:
    """No reply in the time allowed: the connection is replaced and the call sent again
    (same xid) - answered there, its caller never knows."""
    results: list[int | TrioconvIOError] = []
    async with reconnecting_session() as (session, first, redial):
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(getattr_into, session, results)
                xid, _proc, _args = await first.next_call()
                second = await redial.servers.receive()  # (after 0.2 s of silence)
                assert (await second.next_call())[0] == xid
                await second.send(accepted(xid, 0, u32(0) + fattr3(777)))
    assert results == [777]
    assert redial.count == 1


@pytest.mark.usefixtures("short_replies")
@pytest.mark.parametrize("noise", [False, True], ids=["silent", "replies-to-no-call"])
async def test_a_server_that_never_answers_is_given_up(noise: bool) -> None:
    """Silent on the first connection and on the new one: the call fails, and the reader
    with it (ending the conversion), with one line. Replies to calls nobody made do not
    count as answers (else a server answering each call with a wrong xid would keep the
    conversion waiting for ever)."""
    results: list[int | TrioconvIOError] = []
    started = trio.current_time()
    with trio.fail_after(5), pytest.raises(BaseExceptionGroup) as info:  # noqa: PT012
        async with (
            reconnecting_session() as (session, server, redial),
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(getattr_into, session, results)
            for _ in range(2):
                xid, _proc, _args = await server.next_call()
                if noise:
                    await server.send(accepted(xid ^ 0x5A5A, 0, u32(0) + fattr3(1)))
                if redial.count == 0:
                    server = await redial.servers.receive()
            await trio.sleep_forever()  # (the reader's failure cancels this)
    assert info.value.split(TrioconvIOError)[0] is not None
    assert redial.count == 1
    assert [str(error) for error in results] == [
        "nfs://fake/export/disk.img: the NFS server stopped answering: no reply in 0.2 s, "
        "nor in 0.2 s more on a new connection"
    ]
    assert trio.current_time() - started < 2


@pytest.mark.usefixtures("short_replies")
async def test_silent_half_way_through_read_data() -> None:
    """The reply of a READ stops half-way through its data (received straight into the
    caller's buffer): that is silence too; the READ goes out again, and is exact."""
    data = bytes(range(256)) * 4096
    buf = bytearray(MiB)
    results: list[object] = []

    async def read() -> None:
        results.append(await session.read(FH, 0, memoryview(buf)))

    async with reconnecting_session() as (session, first, redial):
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(read)
                xid, _proc, _args = await first.next_call()
                message = read_reply(xid, data, eof=True)
                message = u32(0x80000000 | len(message)) + message
                await first.stream.send_all(message[: len(message) // 2])
                second = await redial.servers.receive()
                assert (await second.next_call())[0] == xid
                await second.send(read_reply(xid, data, eof=True))
    assert results == [(MiB, True)]
    assert buf == data
    assert redial.count == 1


async def test_a_slow_server_that_keeps_answering_is_not_given_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The limit is on silence, not on a call's age: two calls waiting, 0.5 s allowed,
    answered 0.3 s apart (0.6 s for the second) - each reply restarts the clock."""
    monkeypatch.setattr(nfs_client, "_REPLY_TIMEOUT", 0.5)
    results: list[int | TrioconvIOError] = []
    async with reconnecting_session() as (session, server, redial):
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(getattr_into, session, results)
                nursery.start_soon(getattr_into, session, results)
                calls = [await server.next_call(), await server.next_call()]
                for size, (xid, _proc, _args) in enumerate(calls, 1):
                    await trio.sleep(0.3)
                    await server.send(accepted(xid, 0, u32(0) + fattr3(size)))
    assert set(results) == {1, 2}
    assert redial.count == 0


@pytest.mark.usefixtures("short_replies")
async def test_an_idle_connection_or_a_cancelled_call_is_not_silence() -> None:
    """No call waiting, or only a cancelled one: nothing is due, nothing is made again."""
    results: list[int | TrioconvIOError] = []
    async with reconnecting_session() as (session, server, redial):
        with trio.fail_after(5):
            await trio.sleep(0.5)  # idle
            with trio.move_on_after(0.05):
                await getattr_into(session, results)  # cancelled, never answered
            await server.next_call()
            await trio.sleep(0.5)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(getattr_into, session, results)
                xid, _proc, _args = await server.next_call()
                await server.send(accepted(xid, 0, u32(0) + fattr3(5)))
    assert results == [5]
    assert redial.count == 0


@pytest.mark.parametrize("direction", ["read", "write"])
def test_cli_silent_mid_copy(tmp_path: Path, direction: str) -> None:
    """Silent at every READ (or at COMMIT, a new target's last call): one line, status 1;
    the READ (COMMIT) went out on a second connection first; no target stays - the new
    NFS file is removed, as after any failure."""
    src, out = tmp_path / "src.raw", tmp_path / "out.raw"
    src.write_bytes(DATA)
    proc = "READ" if direction == "read" else "COMMIT"
    initial = DATA if direction == "read" else None
    limits = {"_REPLY_TIMEOUT": 0.3}
    with FakeNFSServer(initial, silent_at(proc)) as server:
        args = (server.url, out) if direction == "read" else (src, server.url)
        started = time.monotonic()
        result = cli_with(limits, "convert", "-f", "raw", "-O", "raw", *args)
        elapsed = time.monotonic() - started
        line = one_line_error(result)
        assert line.endswith(
            "the NFS server stopped answering: no reply in 0.3 s, nor in 0.3 s more on a "
            "new connection"
        )
        if direction == "read":
            assert server.calls.count("NULL") == 2  # opening, and the new connection
        else:
            assert server.calls.count("COMMIT") == 2
            assert server.file is None
    assert not out.exists()
    assert elapsed < 5


def test_cli_reconnecting_to_a_server_that_takes_connections_and_never_answers(
    tmp_path: Path,
) -> None:
    """The connection resets mid-copy, and the server, as if hung, then takes every new
    connection and answers nothing: each attempt is given the attempt's time for a NULL
    reply, and the conversion ends within the reconnect budget."""
    out = tmp_path / "out.raw"
    hung: list[bool] = []

    def reset_then_hang(call: Call) -> bytes | None:
        if hung:
            return b""
        if call.proc == "READ":
            hung.append(True)
            return Reset()
        return None

    limits = {"_RECONNECT_ATTEMPT_TIMEOUT": 0.2, "_RECONNECT_DELAYS": (0.0, 0.01, 0.01)}
    with FakeNFSServer(DATA, reset_then_hang) as server:
        started = time.monotonic()
        result = cli_with(limits, "convert", "-f", "raw", "-O", "raw", server.url, out)
        elapsed = time.monotonic() - started
        assert server.calls.count("NULL") == 1 + 3  # opening, then each attempt
    line = one_line_error(result)
    assert line.endswith("3 attempts to reconnect failed, the last: no answer in 0.2 s")
    assert not out.exists()
    assert elapsed < 5


# -- a hostile server --------------------------------------------------------------------------


async def test_replies_to_no_call_do_not_restart_the_reconnect_budget(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each new connection gets a reply with an xid nobody used, then drops: that
    answers nothing, so each is a failed attempt - three, then the end, not a new round
    of attempts per connection for ever."""
    monkeypatch.setattr(nfs_client, "_RECONNECT_DELAYS", (0.0, 0.01, 0.01))
    results: list[int | TrioconvIOError] = []
    with trio.fail_after(5), pytest.raises(BaseExceptionGroup):  # noqa: PT012
        async with (
            reconnecting_session() as (session, server, redial),
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(getattr_into, session, results)
            xid, _proc, _args = await server.next_call()
            await server.stream.aclose()
            while True:
                server = await redial.servers.receive()
                xid, _proc, _args = await server.next_call()
                await server.send(accepted(xid + 1, 0, u32(0) + fattr3(1)))
                await trio.testing.wait_all_tasks_blocked()
                await server.stream.aclose()
    assert redial.count == 3
    assert len(results) == 1 and "3 attempts to reconnect failed" in str(results[0])


def test_a_reply_then_reset_on_every_connection(tmp_path: Path) -> None:
    """The same through the command line, with the honest-looking stray reply of an old
    xid before each reset: one line, within the reconnect budget."""
    out = tmp_path / "out.raw"

    def stray_then_reset(call: Call) -> bytes | None:
        if call.proc == "READ":
            stray = Call(call.xid ^ 0x80000000, "READ")
            return Reset(reply(stray, b""))
        return None

    limits = {"_RECONNECT_DELAYS": (0.0, 0.01, 0.01)}
    with FakeNFSServer(DATA, stray_then_reset) as server:
        started = time.monotonic()
        result = cli_with(limits, "convert", "-f", "raw", "-O", "raw", server.url, out)
        elapsed = time.monotonic() - started
    line = one_line_error(result)
    assert "3 attempts to reconnect failed, the last: connected, then lost" in line
    assert elapsed < 5

"""NFS servers that break the protocol: the served bytes or one clear line, promptly.

The scripted server (:mod:`tests.fake_nfs`) sends what real servers never do. An end of
file before the size the file was opened with is an error, not zeroes; a connection lost
or a record that cannot be a reply while opening is one line, and a lost UMNT reply does
not matter; a flood of empty record fragments costs no memory; a server whose write
verifier keeps changing ends the conversion instead of livelocking it; a target file the
conversion created does not stay on the server when the conversion fails.
"""

from __future__ import annotations

import itertools
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from trioconv.protocols.nfs import _proto as proto
from trioconv.protocols.nfs._rpc import MAX_FRAGMENTS, AcceptStat

from ._faults import FAULT_DEADLINE, MiB, one_line_error
from .conftest import trioconv_cli
from .fake_nfs import (
    NFS3ERR_FBIG,
    NFS3ERR_NOSPC,
    Behaviour,
    Call,
    FakeNFSServer,
    Reset,
    error,
    read_reply,
    record,
    reply,
    write_reply,
)

#: 1 MiB of random bytes, 256 KiB of zeroes, 256 KiB more: two 1 MiB READs (or WRITEs),
#: the second short, and a zero run a new target need not be written.
DATA = os.urandom(MiB) + bytes(256 * 1024) + os.urandom(256 * 1024)


def read_from(server: FakeNFSServer, out: Path) -> subprocess.CompletedProcess[str]:
    return trioconv_cli("convert", "-f", "raw", "-O", "raw", server.url, out)


def write_to(
    server: FakeNFSServer, tmp_path: Path, *options: str, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    src = tmp_path / "src.img"
    src.write_bytes(DATA)
    args = ["convert", *options, "-f", "raw", "-O", "raw", str(src), server.url]
    return trioconv_cli(*args, timeout=timeout)


def test_honest_read(tmp_path: Path) -> None:
    with FakeNFSServer(DATA) as server:
        result = read_from(server, tmp_path / "out.img")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.img").read_bytes() == DATA


def test_honest_write_to_an_existing_file(tmp_path: Path) -> None:
    """``-n`` writes every byte, the zeroes too, over what the file held."""
    with FakeNFSServer(b"\xaa" * len(DATA)) as server:
        result = write_to(server, tmp_path, "-n")
        assert result.returncode == 0, result.stderr
        assert server.file == bytearray(DATA)


def test_honest_create(tmp_path: Path) -> None:
    with FakeNFSServer(None) as server:
        result = write_to(server, tmp_path)
        assert result.returncode == 0, result.stderr
        assert server.file == bytearray(DATA)


@pytest.mark.parametrize(
    ("cache", "stable", "commits"),
    [("unsafe", proto.Stable.UNSTABLE, 1), ("writethrough", proto.Stable.FILE_SYNC, 0),
     ("directsync", proto.Stable.FILE_SYNC, 0)],
)  # fmt: skip
def test_write_through_modes_write_file_sync(
    tmp_path: Path, cache: str, stable: proto.Stable, commits: int
) -> None:
    """Under ``writethrough`` and ``directsync`` every WRITE is FILE_SYNC, durable when
    answered, and nothing is left to COMMIT; otherwise UNSTABLE, committed at the end
    (under ``unsafe`` too: the verifier shows whether a restarted server lost writes)."""
    seen: list[Call] = []
    with FakeNFSServer(b"\xaa" * len(DATA), seen.append) as server:
        result = write_to(server, tmp_path, "-n", "-t", cache)
        assert result.returncode == 0, result.stderr
        assert server.file == bytearray(DATA)
    writes = [call.stable for call in seen if call.proc == "WRITE"]
    assert writes and set(writes) == {stable}
    assert [call.proc for call in seen].count("COMMIT") == commits


@pytest.mark.parametrize("kept", [0.5, 0.0], ids=["half", "nothing"])
def test_early_end_of_file_is_an_error(tmp_path: Path, kept: float) -> None:
    """A READ that says eof before the size GETATTR gave is an error, not zeroes."""

    def early_eof(call: Call) -> bytes | None:
        if call.proc == "READ":
            data = DATA[call.offset : call.offset + int(call.count * kept)]
            return read_reply(call, data, eof=True)
        return None

    out = tmp_path / "out.img"
    with FakeNFSServer(DATA, early_eof) as server:
        line = one_line_error(read_from(server, out))
    assert f"the server reported the end of the file before its size ({len(DATA)})" in line
    assert not out.exists()


#: Replies that end the connection: a reset, records too short to hold an xid, and a
#: record mark announcing 2 GiB (refused before anything is buffered for it).
BROKEN_REPLIES: dict[str, Behaviour] = {
    "reset": lambda call: Reset(),
    "empty record": lambda call: record(b""),
    "2-byte record": lambda call: record(b"ab"),
    "huge record mark": lambda call: struct.pack(">I", 0xFFFFFFFF) + bytes(64),
}


@pytest.mark.parametrize(
    ("proc", "fault"),
    [
        ("MNT", "reset"),
        ("MNT", "huge record mark"),
        ("LOOKUP", "empty record"),
        ("LOOKUP", "reset"),
        ("GETATTR", "2-byte record"),
        ("GETATTR", "huge record mark"),
        ("FSINFO", "empty record"),
        ("FSINFO", "2-byte record"),
    ],
)
def test_connection_broken_while_opening(tmp_path: Path, proc: str, fault: str) -> None:
    """Before the reader task runs, calls read their own replies: a broken connection
    there is the same one line as later, not a trio or RPC exception's traceback."""
    broken = BROKEN_REPLIES[fault]
    out = tmp_path / "out.img"
    with FakeNFSServer(DATA, lambda call: broken(call) if call.proc == proc else None) as server:
        result = read_from(server, out)
        line = one_line_error(result)
        assert f"Could not open '{server.url}': " in line
        assert line.count(server.url) == 1
    assert "connection to the NFS server lost" in line
    assert not out.exists()


def test_reset_instead_of_the_umnt_reply(tmp_path: Path) -> None:
    """The mount list is advisory: a UMNT that never gets its reply changes nothing."""
    with FakeNFSServer(DATA, lambda call: Reset() if call.proc == "UMNT" else None) as server:
        result = read_from(server, tmp_path / "out.img")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert (tmp_path / "out.img").read_bytes() == DATA


@pytest.mark.parametrize("remove_reply", ["honest", "reset"])
def test_no_space_on_a_new_target(tmp_path: Path, remove_reply: str) -> None:
    """WRITE fails with NOSPC: that is the message, and the file the conversion created
    is removed - quietly, even when the REMOVE's reply is lost to a reset."""

    def no_space(call: Call) -> bytes | None:
        if call.proc == "WRITE":
            return error(call, NFS3ERR_NOSPC)
        if call.proc == "REMOVE" and remove_reply == "reset":
            call.honest()  # removed, but the client never hears so
            return Reset()
        return None

    with FakeNFSServer(None, no_space) as server:
        line = one_line_error(write_to(server, tmp_path))
        assert "No space left on device (NFS3ERR_NOSPC)" in line
        assert "internal error" not in line
        assert "REMOVE" in server.calls
        assert server.file is None


def test_removing_a_new_target_does_not_wait_for_a_stalled_server(tmp_path: Path) -> None:
    """A server that stops answering when the failed conversion removes its new file
    gets a short while (NFS_REMOVE_TIMEOUT), not ten seconds: the error comes promptly,
    and the file stays, as on a server that is gone."""
    import threading
    import time

    release = threading.Event()

    def stalls_on_remove(call: Call) -> bytes | None:
        if call.proc == "WRITE":
            return error(call, NFS3ERR_NOSPC)
        if call.proc == "REMOVE":
            release.wait(30)
        return None

    with FakeNFSServer(None, stalls_on_remove) as server:
        started = time.monotonic()
        line = one_line_error(write_to(server, tmp_path))
        elapsed = time.monotonic() - started
        release.set()
        assert "No space left on device" in line
        assert "REMOVE" in server.calls
    assert elapsed < 6, elapsed


@pytest.mark.parametrize("fragments", [1000, 3 << 20])
def test_empty_fragments(tmp_path: Path, fragments: int) -> None:
    """Empty non-last fragments before a READ reply: a thousand make the same record; three
    million (12 MiB on the wire) are refused once past the cap, with memory bounded all
    along (each fragment used to cost ~100 bytes, and a stream of them the CPU for ever)."""
    flooded: list[int] = []

    def flood(call: Call) -> bytes | None:
        if call.proc == "READ" and not flooded:
            flooded.append(call.offset)
            return bytes(4 * fragments) + call.honest()  # a zero mark: not last, 0 bytes
        return None

    out = tmp_path / "out.img"
    with FakeNFSServer(DATA, flood) as server:
        # Run through a fresh interpreter that reports its one child's peak memory.
        code = (
            "import resource, subprocess, sys; "
            "r = subprocess.run([sys.executable, '-m', 'trioconv', *sys.argv[1:]]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
            "sys.exit(r.returncode)"
        )
        args = ["convert", "-f", "raw", "-O", "raw", server.url, str(out)]
        result = subprocess.run(
            [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=60
        )
    assert flooded
    assert int(result.stdout.strip().splitlines()[-1]) < 200 * 1024  # KiB
    if fragments < MAX_FRAGMENTS:
        assert result.returncode == 0, result.stderr
        assert out.read_bytes() == DATA
    else:
        assert f"a record in more than {MAX_FRAGMENTS} fragments" in one_line_error(result)


def test_short_writes_under_a_changing_verifier(tmp_path: Path) -> None:
    """Every WRITE takes half its bytes under a new verifier: each time the piece must
    start again (the earlier half may be lost) - a few rounds, then one line."""
    verifiers = itertools.count()

    def restarting(call: Call) -> bytes | None:
        if call.proc == "WRITE":
            return write_reply(call, len(call.data) // 2, next(verifiers).to_bytes(8, "big"))
        return None

    with FakeNFSServer(bytes(len(DATA)), restarting) as server:
        result = write_to(server, tmp_path, "-n", timeout=FAULT_DEADLINE)  # or TimeoutExpired
    assert "the server's write verifier changed" in one_line_error(result)


@pytest.mark.parametrize("fault", ["FBIG", "reset"])
def test_failed_setattr_removes_the_new_file(tmp_path: Path, fault: str) -> None:
    """CREATE made the file, SETATTR could not size it - refused, or its reply lost with
    the connection: the file does not stay behind (removed over a new connection), and
    the message names the URL once."""

    def failing_setattr(call: Call) -> bytes | None:
        if call.proc != "SETATTR":
            return None
        return error(call, NFS3ERR_FBIG) if fault == "FBIG" else Reset()

    with FakeNFSServer(None, failing_setattr) as server:
        line = one_line_error(write_to(server, tmp_path))
        assert line.startswith(f"trioconv: Could not create '{server.url}': ")
        assert line.count(server.url) == 1
        if fault == "FBIG":
            assert "File too large (NFS3ERR_FBIG)" in line
        assert "CREATE" in server.calls and "REMOVE" in server.calls
        assert server.file is None


@pytest.mark.parametrize(
    ("proc", "results", "accept", "message"),
    [
        ("GETATTR", b"", AcceptStat.SYSTEM_ERR, "server system error"),
        ("FSINFO", b"\0\0\0\0", 0, "malformed FSINFO reply: truncated"),  # NFS3_OK, no more
    ],
    ids=["refused", "malformed"],
)
def test_open_error_names_the_url_once(
    tmp_path: Path, proc: str, results: bytes, accept: int, message: str
) -> None:
    def refuse(call: Call) -> bytes | None:
        return reply(call, results, accept) if call.proc == proc else None

    with FakeNFSServer(DATA, refuse) as server:
        line = one_line_error(read_from(server, tmp_path / "out.img"))
        assert line.startswith(f"trioconv: Could not open '{server.url}': {message}")
        assert line.count(server.url) == 1

"""The iSCSI initiator reconnects, as libiscsi does for QEMU: a target restarted, a reset
connection, a target asking to be logged out cost a pause, not the conversion.

The scripted target (:mod:`tests.fake_iscsi`) drops its connection exactly where a test
wants - half-way through a READ's Data-In, with an R2T's data half sent, right after a
status, or with nothing in flight - and records every login and the order of the
commands each connection received. The commands that had no status must go out again,
in the order they first went, with new task tags and CmdSNs, after a login with the same
ISID and TSIH 0 (session reinstatement); the bytes that end up in buffers or in the LUN
are compared exactly, and no Data-Out of a lost connection's task may reach the next
one. A target that stays away, drops every new connection, refuses the login or comes
back with another LUN must end the conversion with one line, promptly; cancelling must
work while reconnecting. Last, tgtd itself is restarted mid-copy, in both directions,
in-process and through the CLI, and the result checked with ``qemu-img compare``.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
import trio

import trioconv
from trioconv import ConvertError, ConvertOptions, TrioconvIOError
from trioconv.protocols.iscsi import _client, open_iscsi, parse_iscsi_uri
from trioconv.protocols.iscsi._pdu import Opcode
from trioconv.protocols.memory import MemoryDriver

from ._faults import FAULT_DEADLINE, MiB, start_cli
from .conftest import assert_identical, trioconv_cli
from .fake_iscsi import (
    BLOCK,
    PDU,
    Dropped,
    FakeISCSITarget,
    Session,
    honest_read,
    honest_write,
)
from .iscsi_target import ISCSITarget

SIZE = 4 * MiB
LUN = os.urandom(SIZE)
#: Commands in flight in the ordering tests, and how many of them are answered before
#: the connection drops.
IN_FLIGHT = 16
ANSWERED = 3
PIECE = 128 * 1024


@pytest.fixture
def quick_reconnects(monkeypatch: pytest.MonkeyPatch) -> None:
    """Five attempts 10 ms apart, each allowed 1 s: the policy, not the waiting, is under
    test (0, 0.5, 1, 2 and 4 s, 3 s each, 12 s in all for real)."""
    monkeypatch.setattr(_client, "_RECONNECT_DELAYS", (0.0, 0.01, 0.01, 0.01, 0.01))
    monkeypatch.setattr(_client, "_RECONNECT_ATTEMPT_TIMEOUT", 1.0)


def lost(exc: BaseException) -> TrioconvIOError:
    """The TrioconvIOError a session ended with (out of the group it may come in)."""
    while isinstance(exc, BaseExceptionGroup):
        ours, _ = exc.split(TrioconvIOError)
        assert ours is not None, exc
        exc = ours.exceptions[0]
    assert isinstance(exc, TrioconvIOError), exc
    return exc


def reinstated(target: FakeISCSITarget, logins: int) -> None:
    """``logins`` logins, all with the same ISID and TSIH 0: the session reinstated."""
    assert len(target.logins) == logins, target.logins
    assert {isid for isid, _ in target.logins} == {target.logins[0][0]}
    assert {tsih for _, tsih in target.logins} == {0}


def went_again_in_order(target: FakeISCSITarget, answered: int) -> None:
    """The second connection received, first, the commands the first one received
    without answering, in the same order, under new task tags and consecutive CmdSNs -
    and nothing of the lost tasks' data."""
    first, second = target.seen[0], target.seen[1]
    waiting = [(op, lba, blocks) for op, lba, blocks, _, _ in first[answered:]]
    again = [(op, lba, blocks) for op, lba, blocks, _, _ in second[: len(waiting)]]
    assert again == waiting
    assert len(waiting) >= IN_FLIGHT - answered
    assert not {itt for *_, itt, _ in first} & {itt for *_, itt, _ in second}
    sns = [sn for *_, sn in second]
    assert sns == list(range(sns[0], sns[0] + len(sns)))
    assert target.strays == 0


# -- commands in flight go out again ----------------------------------------------------------


@pytest.mark.parametrize("cut", ["mid-data", "after-a-status"])
async def test_reads_in_flight_go_out_again_in_order(cut: str) -> None:
    """16 READs in flight; the target answers 3, sends half the 4th's Data-In (or
    nothing more), takes the other 12 and drops the connection. The 13 go out again in
    their order, read into the same buffers: every buffer ends up exact."""

    def reads(s: Session, cmd: PDU, data: bytes) -> Sequence[bytes]:
        n = len(s.target.seen[s.number])  # this READ is the n-th of the connection
        if s.number or n <= ANSWERED:
            return honest_read(s, cmd, data)
        if n == ANSWERED + 1 and cut == "mid-data":
            return [s.data_in(cmd, 0, data[: len(data) // 2])]
        if n < IN_FLIGHT:
            return []  # not answered yet: the target reads on
        raise Dropped

    bufs = [memoryview(bytearray(b"\xee" * PIECE)) for _ in range(IN_FLIGHT)]
    with FakeISCSITarget(bytearray(LUN), reads=reads) as target:
        async with open_iscsi(target.url) as lun:
            with trio.fail_after(FAULT_DEADLINE):
                await lun.preadinto_many([(i * PIECE, b) for i, b in enumerate(bufs)])
            assert lun._conn.connection == 1
            # The new connection serves what comes next.
            assert await lun.pread(SIZE - 4096, 4096) == LUN[-4096:]
    for i, b in enumerate(bufs):
        assert b == LUN[i * PIECE : (i + 1) * PIECE], i
    reinstated(target, 2)
    went_again_in_order(target, ANSWERED)


def r2t_then_data(s: Session, cmd: PDU) -> None:
    """An R2T for half of what the command did not carry; its data is taken."""
    sent = len(cmd.data)
    s.collect(cmd, [(sent, (cmd.word20 - sent) // 2)])


def r2t_only(s: Session, cmd: PDU) -> None:
    """An R2T for all the rest; its data is left unread (the drop comes first)."""
    sent = len(cmd.data)
    s.send(s.r2t(cmd, sent, cmd.word20 - sent))


@pytest.mark.parametrize(
    "fourth",
    [r2t_then_data, r2t_only, None],
    ids=["mid-r2t-data", "r2t-unanswered", "after-a-status"],
)
async def test_writes_in_flight_go_out_again_in_order(fourth: object) -> None:
    """16 WRITEs of 128 KiB in flight (64 KiB immediate data, the rest on R2T); the
    target completes 3, asks for (part of) the 4th's data or not, takes the others and
    drops the connection. The 13 go out again in order, the new connection asks for
    their data afresh: the LUN holds every byte, and no Data-Out of a task of the lost
    connection reaches the new one."""

    def writes(s: Session, cmd: PDU) -> Sequence[bytes]:
        n = len(s.target.seen[s.number])
        if s.number or n <= ANSWERED:
            return honest_write(s, cmd)
        if n == ANSWERED + 1 and callable(fourth):
            fourth(s, cmd)
        if n < IN_FLIGHT:
            return []
        raise Dropped

    data = os.urandom(IN_FLIGHT * PIECE)
    lun_bytes = bytearray(os.urandom(SIZE))
    expected = bytearray(lun_bytes)
    expected[: len(data)] = data
    with FakeISCSITarget(lun_bytes, writes=writes) as target:
        async with open_iscsi(target.url, writable=True) as lun:
            with trio.fail_after(FAULT_DEADLINE):
                async with trio.open_nursery() as nursery:
                    for i in range(IN_FLIGHT):
                        piece = memoryview(data)[i * PIECE : (i + 1) * PIECE]
                        nursery.start_soon(lun.pwrite, i * PIECE, piece)
            assert lun._conn.connection == 1
    assert lun_bytes == expected
    reinstated(target, 2)
    went_again_in_order(target, ANSWERED)


async def test_writes_follow_the_values_of_the_new_login() -> None:
    """The first login allows everything unasked (ImmediateData, InitialR2T=No, 128 KiB
    first bursts): each 128 KiB WRITE goes whole with its command. The target comes back
    allowing nothing unasked, with 16 KiB bursts and 4 KiB data segments: the WRITEs that
    go again wait for R2Ts and send their data in 4 KiB PDUs, as the new login says."""
    permissive = {"InitialR2T": "No", "ImmediateData": "Yes", "FirstBurstLength": "131072"}
    strict = {
        "InitialR2T": "Yes",
        "ImmediateData": "No",
        "MaxBurstLength": "16384",
        "MaxRecvDataSegmentLength": "4096",
    }

    def writes(s: Session, cmd: PDU) -> Sequence[bytes]:
        n = len(s.target.seen[s.number])
        if s.number or n <= ANSWERED:
            return honest_write(s, cmd)
        if n < IN_FLIGHT:
            return []
        s.target.params = strict
        raise Dropped

    data = os.urandom(IN_FLIGHT * PIECE)
    lun_bytes = bytearray(SIZE)
    with FakeISCSITarget(lun_bytes, params=permissive, writes=writes) as target:
        async with open_iscsi(target.url, writable=True) as lun:
            before = lun._conn.params
            assert (before.initial_r2t, before.first_burst) == (False, 131072)
            with trio.fail_after(FAULT_DEADLINE):
                async with trio.open_nursery() as nursery:
                    for i in range(IN_FLIGHT):
                        piece = memoryview(data)[i * PIECE : (i + 1) * PIECE]
                        nursery.start_soon(lun.pwrite, i * PIECE, piece)
            after = lun._conn.params
            assert (after.initial_r2t, after.immediate_data) == (True, False)
            assert (after.max_burst, after.max_send_segment) == (16384, 4096)
    assert lun_bytes[: len(data)] == data
    assert target.violations == []
    went_again_in_order(target, ANSWERED)


async def test_a_connection_lost_between_commands() -> None:
    """Dropped with nothing in flight: made again all the same, and a command issued
    meanwhile waits for the new connection rather than failing."""
    with FakeISCSITarget(bytearray(LUN)) as target:
        async with open_iscsi(target.url, writable=True) as lun:
            with trio.fail_after(FAULT_DEADLINE):
                assert await lun.pread(0, 4096) == LUN[:4096]
                target.drop()
                await trio.sleep(0.05)  # the reader sees the end and reconnects
                assert await lun.pread(8192, 4096) == LUN[8192:12288]
                await lun.pwrite(4096, b"\x5a" * 4096)
                target.drop()
                await lun.pwrite(12288, b"\xa5" * 4096)  # at once, mid-reconnect
                await lun.flush()
            assert lun._conn.connection == 2
    assert target.lun[4096:8192] == b"\x5a" * 4096
    assert target.lun[12288:16384] == b"\xa5" * 4096
    reinstated(target, 3)


def test_a_target_asking_to_log_out_is_logged_out_and_the_copy_goes_on(tmp_path: Path) -> None:
    """An Async Message asking the initiator to log out (event 1) in place of the first
    READ's reply: the initiator logs out, logs in again (same ISID, TSIH 0), and reads
    again what had no answer - only that: a READ answered before the Logout is not
    read twice. The copy succeeds."""
    answered: list[int] = []

    def logout_please(s: Session, cmd: PDU, data: bytes) -> Sequence[bytes]:
        if s.number == 0 and not s.target.seen[0][:-1]:
            return [s.pdu(Opcode.ASYNC_MESSAGE, words=(1 << 24, 0, 0))]
        if s.number == 0:
            answered.append(cmd.lba_blocks[0])
        return honest_read(s, cmd, data)

    out = tmp_path / "out.raw"
    with FakeISCSITarget(bytearray(LUN), reads=logout_please) as target:
        result = trioconv_cli("convert", "-f", "raw", "-O", "raw", target.url, out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == LUN
    assert target.logout_at is not None
    reinstated(target, 2)
    again = [lba for _, lba, *_ in target.seen[1]]
    assert again and not set(again) & set(answered)


async def test_a_target_dropping_the_connection_is_waited_for() -> None:
    """An Async Message saying the target drops the connection (event 2) with a
    Time2Wait of 1 s, then the drop: the new login comes no sooner than that."""

    def dropping(s: Session, cmd: PDU, data: bytes) -> Sequence[bytes]:
        if s.number == 0:
            s.send(s.pdu(Opcode.ASYNC_MESSAGE, words=(2 << 24, 1 << 16, 0)))
            raise Dropped
        return honest_read(s, cmd, data)

    with FakeISCSITarget(bytearray(LUN), reads=dropping) as target:
        async with open_iscsi(target.url) as lun:
            started = trio.current_time()
            with trio.fail_after(FAULT_DEADLINE):
                assert await lun.pread(0, 4096) == LUN[:4096]
            assert trio.current_time() - started >= 1.0
    reinstated(target, 2)


@pytest.mark.usefixtures("quick_reconnects")
async def test_a_redirected_session_goes_back_to_the_first_portal() -> None:
    """Logged in where the URL's portal redirected to; that portal is gone when the
    connection drops: the first attempt dials it (refused), the next the URL's portal,
    whose new redirection is followed - one session all along (same ISID)."""
    lun_bytes = bytearray(LUN)

    def gone_after_a_read(s: Session, cmd: PDU, data: bytes) -> Sequence[bytes]:
        if len(s.target.seen[s.number]) > 1:
            s.target.go_away()
            raise Dropped
        return honest_read(s, cmd, data)

    with (
        FakeISCSITarget(lun_bytes, reads=gone_after_a_read) as first,
        FakeISCSITarget(lun_bytes) as second,
    ):
        ports = [first.port, second.port]

        def redirect(s: Session, req: PDU) -> bytes | None:
            return s.redirect(req, ports[len(s.target.logins) - 1])

        with FakeISCSITarget(bytearray(), login=redirect) as portal:
            async with open_iscsi(portal.url) as lun:
                with trio.fail_after(FAULT_DEADLINE):
                    assert await lun.pread(0, 4096) == LUN[:4096]
                    assert await lun.pread(MiB, 4096) == LUN[MiB : MiB + 4096]
                assert lun._conn.connection == 1
    assert len(portal.logins) == 2 and len(first.logins) == 1 and len(second.logins) == 1
    isids = {isid for t in (portal, first, second) for isid, _ in t.logins}
    assert len(isids) == 1


@pytest.mark.usefixtures("quick_reconnects")
async def test_a_target_silent_once_is_made_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first connection falls silent mid-READ (pings unanswered); given up after
    0.5 s, it is made again, and the READ answered on the new one."""
    monkeypatch.setattr(_client, "_PING_INTERVAL", 0.1)
    monkeypatch.setattr(_client, "_SILENCE_LIMIT", 0.5)
    release = threading.Event()

    def silent_at_first(s: Session, cmd: PDU, data: bytes) -> Sequence[bytes]:
        if s.number == 0:
            release.wait(30)  # reads nothing meanwhile, pings included
            raise Dropped
        return honest_read(s, cmd, data)

    with FakeISCSITarget(bytearray(LUN), reads=silent_at_first) as target:
        try:
            async with open_iscsi(target.url) as lun:
                with trio.fail_after(FAULT_DEADLINE):
                    assert await lun.pread(0, 4096) == LUN[:4096]
        finally:
            release.set()
    reinstated(target, 2)


# -- ends: one line, promptly ------------------------------------------------------------------


def drop_every_read(s: Session, cmd: PDU, data: bytes) -> Sequence[bytes]:
    raise Dropped


def drop_first_read(s: Session, cmd: PDU, data: bytes) -> Sequence[bytes]:
    if s.number == 0:
        raise Dropped
    return honest_read(s, cmd, data)


def away_at_first_read(s: Session, cmd: PDU, data: bytes) -> Sequence[bytes]:
    s.target.go_away()
    raise Dropped


def refuse_again(s: Session, req: PDU) -> bytes | None:
    return s.refuse(req) if s.number else None


CLOSED = "connection to the iSCSI target lost: the target closed the connection"


@pytest.mark.usefixtures("quick_reconnects")
@pytest.mark.parametrize(
    ("hooks", "logins", "ending"),
    [
        (
            {"reads": drop_every_read},
            6,
            "; 5 attempts to reconnect failed, the last: connected, then lost before any "
            "answer: the target closed the connection",
        ),
        (
            {"reads": drop_first_read, "login": refuse_again},
            6,
            "; 5 attempts to reconnect failed, the last: login failed: target not found "
            "(wrong IQN?) (login status 0x0203)",
        ),
        (
            {"reads": away_at_first_read},
            1,
            "; 5 attempts to reconnect failed, the last: Connection refused",
        ),
    ],
    ids=["keeps-dropping", "refuses-the-login", "stays-away"],
)
async def test_a_target_that_does_not_come_back(
    hooks: dict[str, object], logins: int, ending: str
) -> None:
    """A conversion reading the LUN ends with one line naming the target, the first
    loss and the last failure, after five attempts - a new connection lost before it
    answered anything counting as one."""
    with FakeISCSITarget(bytearray(LUN), **hooks) as target:  # type: ignore[arg-type]
        started = trio.current_time()
        with pytest.raises(ConvertError) as info:
            await trioconv.convert(target.url, MemoryDriver(SIZE), ConvertOptions())
    assert trio.current_time() - started < 5
    message = str(info.value)
    assert message == f"{target.url}: {CLOSED}{ending}", message
    reinstated(target, logins)


@pytest.mark.usefixtures("quick_reconnects")
@pytest.mark.parametrize(
    ("change", "ending"),
    [
        ("shrunk", "LUN 1 now holds 2097152 bytes, not 4194304"),
        ("blocks", "LUN 1 now has 4096-byte blocks, not 512-byte ones"),
        ("grown", None),
    ],
)
async def test_a_lun_that_came_back_changed(change: str, ending: str | None) -> None:
    """The target comes back with a smaller LUN, or one of 4096-byte blocks: the data
    would go to other places, so the conversion ends at once (no further attempts). A
    LUN grown meanwhile is the same LUN: reading goes on."""

    def change_then_drop(s: Session, cmd: PDU, data: bytes) -> Sequence[bytes]:
        if s.number:
            return honest_read(s, cmd, data)
        target = s.target
        if change == "shrunk":
            target.lun = target.lun[: SIZE // 2]
        elif change == "blocks":
            target.block_size = 4096
        else:
            target.lun += bytes(MiB)
        raise Dropped

    with FakeISCSITarget(bytearray(LUN), reads=change_then_drop) as target:
        if ending is None:
            async with open_iscsi(target.url) as lun:
                with trio.fail_after(FAULT_DEADLINE):
                    assert await lun.pread(4096, 4096) == LUN[4096:8192]
        else:
            with pytest.raises((TrioconvIOError, BaseExceptionGroup)) as info:  # noqa: PT012
                async with open_iscsi(target.url) as lun:
                    with trio.fail_after(FAULT_DEADLINE):
                        await lun.pread(4096, 4096)
            message = str(lost(info.value))
            assert message == f"{target.url}: {CLOSED}; the target came back, but {ending}"
    reinstated(target, 2)


# -- cancelling while reconnecting ----------------------------------------------------------


@pytest.fixture
def slow_reconnects(monkeypatch: pytest.MonkeyPatch) -> None:
    """Attempts 10 s apart: a reconnect that would outlast any test."""
    monkeypatch.setattr(_client, "_RECONNECT_DELAYS", (0.0, 10.0, 10.0, 10.0, 10.0))


def away_at_first_write(s: Session, cmd: PDU) -> Sequence[bytes]:
    s.target.go_away()
    raise Dropped


@pytest.mark.usefixtures("slow_reconnects")
@pytest.mark.parametrize("what", ["read", "write"])
async def test_cancelled_while_reconnecting(what: str) -> None:
    """Cancelled (a deadline, Ctrl-C) while the initiator waits to dial again: the READ,
    or the WRITE whose data waited for an R2T (in a shielded loop), and the session end
    at once, not after the 10 s wait."""
    hooks = {"reads": away_at_first_read, "writes": away_at_first_write}
    with FakeISCSITarget(bytearray(LUN), **hooks) as target:  # type: ignore[arg-type]
        async with open_iscsi(target.url, writable=True) as lun:
            with trio.move_on_after(0.5) as scope:
                if what == "read":
                    await lun.pread(0, 4096)
                else:
                    await lun.pwrite(0, bytes(PIECE))
            cancelled = trio.current_time()
        ended = trio.current_time()
    assert scope.cancelled_caught
    assert ended - cancelled < 0.5


@pytest.mark.usefixtures("slow_reconnects")
async def test_a_failure_elsewhere_while_reconnecting() -> None:
    """The first 2 MiB READ the target gets is answered, then the target goes away;
    while the initiator waits to dial again, writing those 2 MiB to the other image
    fails: the conversion ends with that error at once, not after the reconnect's wait.
    (The two READs may reach the target in either order, and the writes go out of
    order, so whichever is answered is written, and fails.)"""
    memory = MemoryDriver(SIZE, delay=0.3)
    answered: list[int] = []

    def first_only(s: Session, cmd: PDU, data: bytes) -> Sequence[bytes]:
        if not answered:
            answered.append(cmd.lba_blocks[0] * BLOCK)
            memory.fail_write_at = answered[0]
            return honest_read(s, cmd, data)
        s.target.stop_listening()  # gone, once the answer to the first went out
        raise Dropped

    opts = ConvertOptions(source_format="raw", oob_writes=True)
    with FakeISCSITarget(bytearray(LUN), reads=first_only) as target:
        started = trio.current_time()
        with pytest.raises(ConvertError) as info:
            await trioconv.convert(target.url, memory, opts)
    assert trio.current_time() - started < 2
    message = f"error while writing memory at byte {answered[0]}: Input/output error"
    assert message in str(info.value)


def test_ctrl_c_while_reconnecting(tmp_path: Path) -> None:
    """Ctrl-C while the CLI waits to dial a target that went away: it ends at once, as
    interrupted, with nothing left behind."""
    out = tmp_path / "out.raw"
    target = FakeISCSITarget(bytearray(LUN), reads=away_at_first_read)
    with target, start_cli(["convert", "-f", "raw", "-O", "raw", target.url, out]) as proc:
        try:
            deadline = time.monotonic() + FAULT_DEADLINE
            while not (target.seen and target.seen[0]) and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.8)  # refused at once and after 0.5 s; the next try is at 1.5 s
            assert proc.poll() is None, proc.communicate()
            proc.send_signal(signal.SIGINT)
            sent = time.monotonic()
            _, stderr = proc.communicate(timeout=FAULT_DEADLINE)
            elapsed = time.monotonic() - sent
        finally:
            if proc.poll() is None:
                proc.kill()
    assert proc.returncode == -signal.SIGINT, stderr
    assert stderr == "trioconv: interrupted by SIGINT\n"
    assert elapsed < 2
    assert not out.exists()


# -- tgtd restarted ------------------------------------------------------------------------------


@pytest.mark.parametrize("direction", ["read", "write"])
async def test_tgtd_restarted_mid_copy(
    iscsi_target: ISCSITarget, tmp_path: Path, direction: str
) -> None:
    """tgtd killed mid-copy (its connections reset), its portal refusing for 0.3 s,
    then started again with the same target and LUN, as its service manager would: the
    conversion carries on over a new session, and every byte arrives."""
    size = 64 * MiB
    backing = tmp_path / "lun.img"
    url = iscsi_target.add_lun(backing, size)
    data = os.urandom(size)
    memory: MemoryDriver
    if direction == "read":
        backing.write_bytes(data)
        memory = MemoryDriver(size, delay=0.1)
        source: str | MemoryDriver = url
        target: str | MemoryDriver = memory
        opts = ConvertOptions()
    else:
        memory = MemoryDriver(data=data, delay=0.1, block_status=False)
        source, target = memory, url
        opts = ConvertOptions(no_create=True)
    done: list[bool] = []
    restarted: list[bool] = []

    async def restart() -> None:
        for _ in range(1000):
            if memory.log:
                break
            await trio.sleep(0.01)
        await trio.sleep(0.1)
        restarted.append(not done)  # (the copy was still going)
        luns = iscsi_target.luns
        iscsi_target.stop(kill=True)
        await trio.sleep(0.3)  # the initiator finds the portal refusing
        iscsi_target.start()
        iscsi_target.recreate(luns)

    try:
        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(restart)
                await trioconv.convert(source, target, opts)
                done.append(True)
    finally:
        iscsi_target.start()
    assert restarted == [True], "the copy ended before tgtd was restarted"
    if direction == "read":
        assert memory.data == data
    else:
        assert backing.read_bytes() == data


@pytest.mark.parametrize(
    ("direction", "kill"),
    [("write", True), ("read", True), ("write", False)],
    ids=["write-killed", "read-killed", "write-stopped-cleanly"],
)
def test_the_cli_across_a_tgtd_restart(
    iscsi_target: ISCSITarget, tmp_path: Path, direction: str, kill: bool
) -> None:
    """``trioconv convert`` to or from a LUN, slowed to 16 MiB/s, while tgtd is stopped
    (killed, or the clean way: its targets deleted, their sessions ended) and started
    again 0.3 s later with the same LUN: it exits 0, and ``qemu-img compare`` finds the
    images identical."""
    size = 32 * MiB
    backing = tmp_path / "lun.img"
    url = iscsi_target.add_lun(backing, size)
    image = tmp_path / "image.raw"
    args: list[str | Path]
    if direction == "write":
        image.write_bytes(os.urandom(size))
        args = ["convert", "-n", "-r", "16M", "-f", "raw", "-O", "raw", image, url]
    else:
        backing.write_bytes(os.urandom(size))
        args = ["convert", "-r", "16M", "-f", "raw", "-O", "raw", url, image]
    written = backing if direction == "write" else image
    with start_cli(args) as proc:
        try:
            # Once the first data reached the other side, 1.5 s of copying remain.
            deadline = time.monotonic() + FAULT_DEADLINE
            while time.monotonic() < deadline and proc.poll() is None:
                if written.exists() and written.stat().st_blocks:
                    break
                time.sleep(0.01)
            time.sleep(0.2)
            assert proc.poll() is None, proc.communicate()
            iscsi_target.restart(kill=kill, down=0.3)
            assert proc.poll() is None, "the copy ended before tgtd came back"
            _, stderr = proc.communicate(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
            iscsi_target.start()
    assert proc.returncode == 0, stderr
    assert stderr == ""
    assert_identical(image, backing)


async def test_a_connection_reset_with_commands_in_flight_on_tgt(
    iscsi_target: ISCSITarget, tmp_path: Path
) -> None:
    """tgtd stays up, but the connection is reset under 16 WRITEs in flight, then under
    16 READs: tgt takes the new login with the same ISID as the same session (one I_T
    nexus remains), the commands go again, and the LUN and the buffers are exact. A
    login by someone else with the session's ISID reinstates the session too: tgt
    drops our connection, and the initiator takes the session back."""
    size = 8 * MiB
    backing = tmp_path / "lun.img"
    url = iscsi_target.add_lun(backing, size)
    tid = str(iscsi_target.lun(url).tid)
    data = os.urandom(size)
    step = size // IN_FLIGHT
    async with open_iscsi(url, writable=True) as lun:
        conn = lun._conn
        with trio.fail_after(FAULT_DEADLINE):
            async with trio.open_nursery() as nursery:
                for i in range(IN_FLIGHT):
                    piece = memoryview(data)[i * step : (i + 1) * step]
                    nursery.start_soon(lun.pwrite, i * step, piece)
                await _commands_in_flight(conn)
                conn._shut()  # as a reset does: the reader sees the end of the stream
            await lun.flush()
            assert backing.read_bytes() == data
            bufs = [memoryview(bytearray(step)) for _ in range(IN_FLIGHT)]
            async with trio.open_nursery() as nursery:
                nursery.start_soon(lun.preadinto_many, [(i * step, b) for i, b in enumerate(bufs)])
                await _commands_in_flight(conn)
                conn._shut()
            assert b"".join(bufs) == data
            assert conn.connection == 2
            assert nexuses(iscsi_target, tid) == 1  # the old session is gone
            intruder = await _client._dial(parse_iscsi_uri(url), parse_iscsi_uri(url), conn.isid)
            try:
                assert await lun.pread(0, 4096) == data[:4096]
            finally:
                await intruder.aclose()
            assert conn.connection == 3


async def _commands_in_flight(conn: _client.Connection) -> None:
    """Wait until commands have gone out and wait for their status (a fixed pause may
    end before they go, or after they are answered, on a loaded machine)."""
    for _ in range(10_000):  # (the caller's fail_after ends a regression first)
        if any(task.issued for task in conn._pending.values()):
            return
        await trio.sleep(0.001)


def nexuses(iscsi_target: ISCSITarget, tid: str) -> int:
    """How many sessions (I_T nexuses) tgt has on target ``tid``."""
    shown = iscsi_target.tgtadm("--lld", "iscsi", "--mode", "target", "--op", "show").stdout
    return shown.split(f"Target {tid}:")[1].split("\nTarget ")[0].count("I_T nexus:")


async def test_chap_credentials_are_used_again(iscsi_target: ISCSITarget, tmp_path: Path) -> None:
    """A LUN that needs CHAP: the new login after tgtd's restart authenticates with the
    credentials of the URL, and writing goes on."""
    backing = tmp_path / "lun.img"
    url = iscsi_target.add_lun(backing, 4 * MiB, chap=("reuser", "s3cret-pw"))
    data = os.urandom(2 * MiB)
    try:
        async with open_iscsi(url, writable=True) as lun:
            with trio.fail_after(FAULT_DEADLINE):
                await lun.pwrite(0, data[:MiB])
                iscsi_target.restart(kill=True)  # (the initiator waits meanwhile)
                await lun.pwrite(MiB, data[MiB:])
                await lun.flush()
            assert lun._conn.connection == 1
    finally:
        iscsi_target.start()
    assert backing.read_bytes()[: 2 * MiB] == data

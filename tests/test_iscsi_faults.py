"""iSCSI targets that break the protocol: one clear line, never wrong bytes.

The scripted target (:mod:`tests.fake_iscsi`) sends what tgtd never does. The rules the
initiator holds it to (RFC 7143, with DataPDUInOrder and DataSequenceInOrder agreed):

* a READ's Data-In PDUs fill its buffer in order, with no gap and no overlap, numbered
  by DataSN from 0, and the status ends them - data after it belongs to nothing; an
  underflow residual (U bit) says data is missing, an overflow (O bit) that the target
  counts in other blocks, whatever the status;
* a WRITE is over only when all its data went: R2Ts ask, in order, for what was not sent
  yet; a status before that, an underflow residual, or a NOP-In in the command's place
  fail it;
* an R2T carries the next R2TSN and a transfer tag of its own, and asks for at most
  MaxBurstLength bytes; several R2Ts waiting at once are answered in order;
* a target answering BUSY or TASK SET FULL is retried with growing waits, as QEMU does;
  one that falls silent with commands waiting is pinged and, silent still, given up -
  its connection made again, and the conversion ended when it is silent there too;
* a target's ping is answered with its data through a small queue, so a flood of pings
  costs no memory; a ping larger than the initiator's MaxRecvDataSegmentLength is an
  error, as are login data segments and texts larger than the login allows;
* a LUN that refuses WRITE SAME gets its zeroes written; a connection closed instead of a
  Logout Response ends the session at once.

Each conversion runs through the CLI, as a user runs it, and the bytes that end up in the
output file or in the LUN are compared exactly. Memory is checked where a target could
make the initiator hoard it: the peak RSS of the converting process stays under 200 MiB.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio

from trioconv import TrioconvIOError, UnsupportedError
from trioconv.protocols.iscsi import _client, open_iscsi
from trioconv.protocols.iscsi import _scsi as scsi
from trioconv.protocols.iscsi._pdu import RESERVED_TAG, Opcode

from ._faults import FAULT_DEADLINE, MiB, one_line_error
from .conftest import trioconv_cli
from .fake_iscsi import (
    BUSY,
    GOOD,
    PDU,
    TASK_SET_FULL,
    FakeISCSITarget,
    Session,
    honest_read,
    honest_write,
)

SIZE = 4 * MiB
#: The LUN's bytes, for reads. Reads go as two 2 MiB READs.
LUN = os.urandom(SIZE)
#: The largest data segment a PDU can carry (24 bits of length).
MAX_SEGMENT = (1 << 24) - 1
#: The initiator's MaxRecvDataSegmentLength: the most ping data it echoes.
OUR_SEGMENT = 262144
#: A target's smallest limits: 512-byte bursts, no immediate data (an R2T for every
#: block), one block per READ or WRITE (Block Limits).
TINY: dict[str, Any] = {
    "params": {"MaxBurstLength": "512", "FirstBurstLength": "512", "ImmediateData": "No"},
    "max_transfer": 1,
}


def source(tmp_path: Path) -> tuple[Path, bytes]:
    """A raw image to write into the LUN: data, a zero run (WRITE SAME), data."""
    data = os.urandom(MiB) + bytes(2 * MiB) + os.urandom(MiB)
    path = tmp_path / "src.raw"
    path.write_bytes(data)
    return path, data


def measured(*args: str | os.PathLike[str]) -> tuple[subprocess.CompletedProcess[str], int]:
    """Run the CLI in a fresh interpreter that reports its one child's peak RSS (KiB)."""
    code = (
        "import resource, subprocess, sys; "
        "r = subprocess.run([sys.executable, '-m', 'trioconv', *sys.argv[1:]]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); "
        "sys.exit(r.returncode)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *[os.fspath(a) for a in args]],
        capture_output=True,
        text=True,
        timeout=60,
    )
    return result, int(result.stdout)


def writes_with_r2t(cmd: PDU) -> bool:
    """A WRITE (not a WRITE SAME) whose data does not all fit in the command PDU."""
    return cmd.cdb[0] == scsi.WRITE_16 and cmd.word20 > len(cmd.data)


def lost(exc: BaseException) -> TrioconvIOError:
    """The TrioconvIOError a session ended with (the reader's, in a group with the
    command's when both raise)."""
    if isinstance(exc, BaseExceptionGroup):
        ours, _ = exc.split(TrioconvIOError)
        assert ours is not None, exc
        exc = ours
        while isinstance(exc, BaseExceptionGroup):
            exc = exc.exceptions[0]
    assert isinstance(exc, TrioconvIOError), exc
    return exc


# -- honest targets --------------------------------------------------------------------------


@pytest.mark.parametrize("limits", [{}, TINY], ids=["default", "tiny-limits"])
def test_reading_a_lun(tmp_path: Path, limits: dict[str, Any]) -> None:
    """The LUN's bytes, also through 8192 one-block READs (in bounded memory)."""
    out = tmp_path / "out.raw"
    with FakeISCSITarget(bytearray(LUN), **limits) as target:
        result, rss = measured("convert", "-f", "raw", "-O", "raw", target.url, out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == LUN
    assert rss < 200 * 1024


@pytest.mark.parametrize("limits", [{}, TINY], ids=["default", "tiny-limits"])
def test_writing_into_a_lun(tmp_path: Path, limits: dict[str, Any]) -> None:
    """Immediate data and R2Ts, or one 512-byte R2T per block: the LUN holds the image,
    zeroes included (WRITE SAME over what it held before)."""
    src, data = source(tmp_path)
    lun = bytearray(os.urandom(SIZE))
    with FakeISCSITarget(lun, **limits) as target:
        result, rss = measured("convert", "-n", "-f", "raw", "-O", "raw", src, target.url)
    assert result.returncode == 0, result.stderr
    assert lun == data
    assert target.opcodes[scsi.WRITE_SAME_16]
    assert rss < 200 * 1024


@pytest.mark.parametrize(
    ("flags", "syncs"),
    [
        ([], 0),
        (["-t", "unsafe"], 0),
        (["-t", "writeback"], 1),
        (["-t", "none"], 1),
        (["-t", "writethrough"], -4),
        (["-t", "directsync"], -4),
    ],
    ids=["default", "unsafe", "writeback", "none", "writethrough", "directsync"],
)
def test_synchronize_cache_follows_the_cache_mode(
    tmp_path: Path, flags: list[str], syncs: int
) -> None:
    """SYNCHRONIZE CACHE once at the end, except under ``unsafe`` (the default for a
    target, as qemu-img's), which ignores flushes as it does for a local file; the
    write-through modes also send one after each write (-4: at least one after the data,
    the zeroes and the data again - a run may go as two writes - and the end's)."""
    src, data = source(tmp_path)
    lun = bytearray(os.urandom(SIZE))
    with FakeISCSITarget(lun) as target:
        result = trioconv_cli("convert", "-n", *flags, "-f", "raw", "-O", "raw", src, target.url)
    assert result.returncode == 0, result.stderr
    assert lun == data
    if syncs >= 0:
        assert target.opcodes[scsi.SYNCHRONIZE_CACHE_16] == syncs
    else:
        assert target.opcodes[scsi.SYNCHRONIZE_CACHE_16] >= -syncs


# -- reads -----------------------------------------------------------------------------------


def overlapping(s: Session, cmd: PDU, data: bytes) -> Sequence[bytes]:
    """The first half twice, the second half never: as many bytes as asked for."""
    half = len(data) // 2
    return [s.data_in(cmd, 0, data[:half]), s.data_in(cmd, 0, data[:half], status=GOOD)]


def data_after_the_status(s: Session, cmd: PDU, data: bytes) -> Sequence[bytes]:
    """The status with the first half; then other bytes for the second half (which,
    taken, would make the count right)."""
    half = len(data) // 2
    return [s.data_in(cmd, 0, data[:half], status=GOOD), s.data_in(cmd, half, b"\xee" * half)]


def underflow(s: Session, cmd: PDU, data: bytes) -> Sequence[bytes]:
    """All the data, but the status says half of it was not transferred (U bit)."""
    return [s.data_in(cmd, 0, data, status=GOOD, underflow=len(data) // 2)]


def overflow(s: Session, cmd: PDU, data: bytes) -> Sequence[bytes]:
    """All the data, but the status says the CDB asked for a quarter more (O bit): the
    target counts in larger blocks than it said at open."""
    return [s.data_in(cmd, 0, data, status=GOOD, overflow=len(data) // 4)]


def a_pdu_missing(s: Session, cmd: PDU, data: bytes) -> Sequence[bytes]:
    """The second Data-In PDU never sent: the third follows the first."""
    seg = s.peer_segment
    return [s.data_in(cmd, 0, data[:seg]), s.data_in(cmd, 2 * seg, data[2 * seg :], status=GOOD)]


def pdus_swapped(s: Session, cmd: PDU, data: bytes) -> Sequence[bytes]:
    """The first two Data-In PDUs in the wrong order, each with its own offset."""
    seg = s.peer_segment
    first, second = s.data_in(cmd, 0, data[:seg]), s.data_in(cmd, seg, data[seg : 2 * seg])
    return [second, first, s.data_in(cmd, 2 * seg, data[2 * seg :], status=GOOD)]


def beyond_the_end(s: Session, cmd: PDU, data: bytes) -> Sequence[bytes]:
    """All the data, then more past the expected transfer length, then the status."""
    return [s.data_in(cmd, 0, data), s.data_in(cmd, len(data), b"\xee" * 512, status=GOOD)]


def data_sn_from_one(s: Session, cmd: PDU, data: bytes) -> Sequence[bytes]:
    """The right bytes at the right offsets, but DataSN counts from 1, not 0."""
    return [s.data_in(cmd, 0, data, status=GOOD, data_sn=1)]


def data_sn_repeated(s: Session, cmd: PDU, data: bytes) -> Sequence[bytes]:
    """The right bytes at the right offsets, but the second PDU repeats DataSN 0."""
    seg = s.peer_segment
    first = s.data_in(cmd, 0, data[:seg])
    return [first, s.data_in(cmd, seg, data[seg:], status=GOOD, data_sn=0)]


@pytest.mark.parametrize(
    ("reads", "message"),
    [
        (overlapping, "connection to the iSCSI target lost: Data-In at offset 0 where "),
        (data_after_the_status, "the target sent 1048576 of 2097152 bytes"),
        (underflow, "the target transferred 1048576 bytes less than asked for"),
        (overflow, "the target wanted to transfer 524288 bytes more than asked for"),
        (a_pdu_missing, "Data-In at offset 524288 where 262144 was expected"),
        (pdus_swapped, "Data-In at offset 262144 where 0 was expected"),
        (beyond_the_end, "Data-In at offset 2097152+512 beyond the 2097152 bytes asked for"),
        (data_sn_from_one, "Data-In with DataSN 1 where 0 was expected"),
        (data_sn_repeated, "Data-In with DataSN 0 where 1 was expected"),
    ],
)
def test_broken_read_replies(
    tmp_path: Path, reads: Callable[[Session, PDU, bytes], Sequence[bytes]], message: str
) -> None:
    """Whatever the status says, a READ the target did not fill exactly fails: its Data-In
    PDUs must come in order (DataPDUInOrder and DataSequenceInOrder are Yes), without
    gaps, within the expected transfer length, numbered 0, 1, 2... (DataSN)."""
    out = tmp_path / "out.raw"
    with FakeISCSITarget(bytearray(LUN), reads=reads) as target:
        started = time.monotonic()
        result = trioconv_cli("convert", "-f", "raw", "-O", "raw", target.url, out)
    assert time.monotonic() - started < FAULT_DEADLINE
    line = one_line_error(result)
    assert target.url in line and message in line, line
    assert not out.exists()


def test_data_in_after_a_complete_reply_is_ignored(tmp_path: Path) -> None:
    """A stray Data-In for a READ that already has its status - here after each of 128
    READs of 32 KiB - never lands in its buffer (which may hold other data by then)."""

    def stray_after(s: Session, cmd: PDU, data: bytes) -> Sequence[bytes]:
        return [*honest_read(s, cmd, data), s.data_in(cmd, 0, b"\xee" * 4096)]

    out = tmp_path / "out.raw"
    with FakeISCSITarget(bytearray(LUN), max_transfer=64, reads=stray_after) as target:
        result = trioconv_cli("convert", "-f", "raw", "-O", "raw", target.url, out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == LUN


# -- writes ----------------------------------------------------------------------------------


def good_without_r2t(s: Session, cmd: PDU) -> Sequence[bytes]:
    """GOOD after the immediate data: the rest never asked for."""
    if not writes_with_r2t(cmd):
        return honest_write(s, cmd)
    return [s.store(cmd, cmd.data)]


def good_after_half(s: Session, cmd: PDU) -> Sequence[bytes]:
    """An R2T for half of what is left, then GOOD."""
    if not writes_with_r2t(cmd):
        return honest_write(s, cmd)
    sent = len(cmd.data)
    half = (cmd.word20 - sent) // 2
    return [s.store(cmd, s.collect(cmd, [(sent, half)])[: sent + half])]


def r2t_for_the_immediate_data(s: Session, cmd: PDU) -> Sequence[bytes]:
    """An R2T for the bytes the command carried already; the target then waits for
    them (and serves the other commands meanwhile)."""
    if not writes_with_r2t(cmd):
        return honest_write(s, cmd)
    return [s.r2t(cmd, 0, len(cmd.data))]


def r2t_for_the_immediate_data_then_wait(s: Session, cmd: PDU) -> Sequence[bytes]:
    """The same R2T, but the target (one command at a time) waits for those bytes before
    serving anything else: only giving up the connection ends the other WRITEs' waits."""
    if not writes_with_r2t(cmd):
        return honest_write(s, cmd)
    return [s.store(cmd, s.collect(cmd, [(0, len(cmd.data))]))]


def nop_in_for_the_write(s: Session, cmd: PDU) -> Sequence[bytes]:
    """A NOP-In carrying the WRITE's task tag, in place of R2Ts and status."""
    if not writes_with_r2t(cmd):
        return honest_write(s, cmd)
    return [s.nop_in(itt=cmd.itt)]


def underflow_on_writes(s: Session, cmd: PDU) -> Sequence[bytes]:
    """All the data asked for and taken, then GOOD saying half was not transferred."""
    if not writes_with_r2t(cmd):
        return honest_write(s, cmd)
    s.collect(cmd)
    return [s.response(cmd, underflow=cmd.word20 // 2)]


def r2t_sn_from_one(s: Session, cmd: PDU) -> Sequence[bytes]:
    """R2Ts that ask for the right bytes, but numbered from 1 (an R2T went missing)."""
    if not writes_with_r2t(cmd):
        return honest_write(s, cmd)
    return [s.store(cmd, s.collect(cmd, first_sn=1))]


def r2t_with_the_reserved_tag(s: Session, cmd: PDU) -> Sequence[bytes]:
    """An R2T whose target transfer tag is 0xffffffff, the mark of unsolicited data."""
    if not writes_with_r2t(cmd):
        return honest_write(s, cmd)
    return [s.store(cmd, s.collect(cmd, ttt=RESERVED_TAG))]


@pytest.mark.parametrize(
    ("writes", "message"),
    [
        (r2t_sn_from_one, "R2T with R2TSN 1 where 0 was expected"),
        (r2t_with_the_reserved_tag, "R2T with the reserved transfer tag"),
        (good_without_r2t, "the target ended a write after 65536 of its 262144 bytes"),
        (good_after_half, "the target ended a write after 163840 of its 262144 bytes"),
        (r2t_for_the_immediate_data, "R2T for 65536 bytes at 0 of a 262144-byte write"),
        (r2t_for_the_immediate_data_then_wait, "R2T for 65536 bytes at 0 of a 262144-byte"),
        (nop_in_for_the_write, "connection to the iSCSI target lost: NOP-In for a SCSI command"),
        (underflow_on_writes, "the target transferred 131072 bytes less than asked for"),
    ],
)
def test_broken_write_flows(
    tmp_path: Path, writes: Callable[[Session, PDU], Sequence[bytes]], message: str
) -> None:
    """Whatever the status says, a WRITE whose data did not all go fails."""
    src, _ = source(tmp_path)
    with FakeISCSITarget(bytearray(SIZE), writes=writes) as target:
        started = time.monotonic()
        args = ["convert", "-n", "-f", "raw", "-O", "raw", str(src), target.url]
        result = trioconv_cli(*args, timeout=FAULT_DEADLINE)
    assert time.monotonic() - started < FAULT_DEADLINE
    line = one_line_error(result)
    assert target.url in line and message in line, line


@pytest.mark.parametrize("thin", [False, True], ids=["thick", "thin"])
def test_a_lun_without_write_same_gets_zeroes_written(tmp_path: Path, thin: bool) -> None:
    """WRITE SAME refused (ILLEGAL REQUEST, invalid opcode), here split in many pieces
    in flight (Block Limits allow 16 blocks each): zero buffers go instead."""
    src, data = source(tmp_path)
    lun = bytearray(os.urandom(SIZE))
    with FakeISCSITarget(lun, thin=thin, write_same=False, max_write_same=16) as target:
        result = trioconv_cli("convert", "-n", "-f", "raw", "-O", "raw", src, target.url)
    assert result.returncode == 0, result.stderr
    assert target.opcodes[scsi.WRITE_SAME_16]
    assert lun == data


async def test_an_r2t_beyond_max_burst_length() -> None:
    """An R2T may ask for at most MaxBurstLength bytes (RFC 7143 11.8.4). The driver's
    WRITEs are never longer than that, so a longer R2T also reaches past the end of one;
    a command with more data (here 1 MiB against 64 KiB bursts) shows the rule itself:
    one R2T for all the rest gives up the connection, nothing of it is sent."""

    def one_big_r2t(s: Session, cmd: PDU) -> Sequence[bytes]:
        sent = len(cmd.data)
        return [s.store(cmd, s.collect(cmd, [(sent, cmd.word20 - sent)]))]

    lun = bytearray(SIZE)
    params = {"MaxBurstLength": "65536"}
    with (  # noqa: PT012
        FakeISCSITarget(lun, params=params, writes=one_big_r2t) as target,
        pytest.raises((TrioconvIOError, BaseExceptionGroup)) as info,
    ):
        async with open_iscsi(target.url, writable=True) as driver:
            cdb = scsi.cdb_write_16(0, MiB // 512)
            await driver._conn.command(1, cdb, data_out=memoryview(b"\xab" * MiB))
    message = str(lost(info.value))
    assert "connection to the iSCSI target lost: R2T for 983040 bytes at 65536, " in message
    assert "more than MaxBurstLength (65536)" in message
    assert lun == bytes(SIZE)


def test_r2ts_waiting_together_are_answered_in_order(tmp_path: Path) -> None:
    """Two R2Ts of one WRITE at once, before any of their data (more than the
    MaxOutstandingR2T of 1 agreed, which the initiator cannot tell from an R2T that
    overtook the end of its send): each gets exactly the bytes it asks for, in order."""

    def two_at_once(s: Session, cmd: PDU) -> Sequence[bytes]:
        if not writes_with_r2t(cmd):
            return honest_write(s, cmd)
        sent = len(cmd.data)
        half = (cmd.word20 - sent) // 2
        r2ts = [(sent, half), (sent + half, cmd.word20 - sent - half)]
        return [s.store(cmd, s.collect(cmd, r2ts, together=True))]

    src, data = source(tmp_path)
    lun = bytearray(os.urandom(SIZE))
    with FakeISCSITarget(lun, writes=two_at_once) as target:
        result = trioconv_cli("convert", "-n", "-f", "raw", "-O", "raw", src, target.url)
    assert result.returncode == 0, result.stderr
    assert lun == data


def test_a_bad_r2t_for_write_same_names_the_lun(tmp_path: Path) -> None:
    """Not an "internal error": the R2T of a WRITE SAME is checked like any other, and
    a bad one gives up the connection (the target waits for data that will not come)."""

    def r2t_beyond(s: Session, cmd: PDU) -> Sequence[bytes]:
        if cmd.cdb[0] == scsi.WRITE_SAME_16:
            return [s.r2t(cmd, 4096, 512)]
        return honest_write(s, cmd)

    src, _ = source(tmp_path)
    params = {"ImmediateData": "No"}  # the block goes when an R2T asks for it
    with FakeISCSITarget(bytearray(SIZE), params=params, writes=r2t_beyond) as target:
        line = one_line_error(trioconv_cli("convert", "-n", "-f", "raw", src, target.url))
    assert line.startswith(f"trioconv: {target.url}: connection to the iSCSI target lost: ")
    assert "R2T for 512 bytes at 4096 of a 512-byte write" in line
    assert "internal error" not in line


async def test_a_thin_lun_without_unmap_refuses_discards() -> None:
    """A thin LUN whose provisioning page offers WRITE SAME with UNMAP but not UNMAP
    itself (no LBPU bit): no trim capability, and a discard is unsupported - not an I/O
    error that would fail a qcow2 conversion freeing clusters on the LUN."""
    with FakeISCSITarget(bytearray(SIZE), thin=True) as target:
        async with open_iscsi(target.url, writable=True) as lun:
            assert not lun.caps.trim
            with pytest.raises(UnsupportedError, match="the LUN has no UNMAP"):
                await lun.discard(0, MiB)
            await lun.pwrite_zeroes(0, MiB, may_unmap=True, fast=True)  # still fine
    assert target.opcodes[scsi.UNMAP] == 0


# -- busy targets ----------------------------------------------------------------------------


@pytest.mark.parametrize("status", [BUSY, TASK_SET_FULL], ids=["busy", "task-set-full"])
def test_a_target_busy_for_a_second_is_waited_out(tmp_path: Path, status: int) -> None:
    """Every READ answered BUSY (or TASK SET FULL) for the first 1.2 s: retried after
    growing waits, as QEMU retries (8 ms, 32 ms, ... 33 s: about 44 s in all), the copy
    succeeds. The retries used to be over after 0.55 s."""
    until: list[float] = []

    def busy_at_first(s: Session, cmd: PDU, data: bytes) -> Sequence[bytes]:
        if not until:
            until.append(time.monotonic() + 1.2)
        if time.monotonic() < until[0]:
            return [s.response(cmd, status)]
        return honest_read(s, cmd, data)

    out = tmp_path / "out.raw"
    with FakeISCSITarget(bytearray(LUN), reads=busy_at_first) as target:
        result = trioconv_cli("convert", "-f", "raw", "-O", "raw", target.url, out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == LUN
    assert time.monotonic() > until[0]


# -- silent targets --------------------------------------------------------------------------


@pytest.fixture
def quick_watchdog(monkeypatch: pytest.MonkeyPatch) -> None:
    """Ping after 0.1 s of silence, give up after 0.5 s (5 s and 20 s for real)."""
    monkeypatch.setattr(_client, "_PING_INTERVAL", 0.1)
    monkeypatch.setattr(_client, "_SILENCE_LIMIT", 0.5)


@pytest.mark.usefixtures("quick_watchdog")
async def test_a_target_that_falls_silent_is_given_up() -> None:
    """A target that stops answering mid-copy - its host frozen, the network dropping
    every packet - while its connection stays open: pinged, then given up and logged in
    to again; silent there too, given up with one error, instead of the READ waiting
    for ever."""
    release = threading.Event()

    def silent(s: Session, cmd: PDU, data: bytes) -> Sequence[bytes]:
        release.wait(30)  # reads nothing meanwhile, pings included
        return honest_read(s, cmd, data)

    with FakeISCSITarget(bytearray(LUN), reads=silent) as target:
        started = trio.current_time()
        try:
            with pytest.raises((TrioconvIOError, BaseExceptionGroup)) as info:  # noqa: PT012
                async with open_iscsi(target.url) as lun:
                    with trio.fail_after(FAULT_DEADLINE):  # a regression fails, not hangs
                        await lun.pread(0, 4096)
        finally:
            release.set()
    message = str(lost(info.value))
    assert message == (
        f"{target.url}: connection to the iSCSI target lost: the target sent nothing for "
        "0.5 s, not even the answer to a ping, nor in 0.5 s more on a new connection"
    )
    assert trio.current_time() - started < 3
    assert len(target.logins) == 2


@pytest.mark.usefixtures("quick_watchdog")
async def test_a_slow_target_that_answers_pings_is_waited_for() -> None:
    """A READ answered after 1.5 s - three times the silence allowed - by a target that
    answers the pings meanwhile: alive, so waited for."""

    def slow(s: Session, cmd: PDU, data: bytes) -> Sequence[bytes]:
        threading.Timer(1.5, lambda: s.send(*honest_read(s, cmd, data))).start()
        return []  # the target reads on (and answers pings) while the timer runs

    with FakeISCSITarget(bytearray(LUN), reads=slow) as target:
        async with open_iscsi(target.url) as lun:
            with trio.fail_after(FAULT_DEADLINE):
                assert await lun.pread(4096, 4096) == LUN[4096:8192]
    assert target.pinged >= 3


@pytest.fixture
def quick_command_bound(monkeypatch: pytest.MonkeyPatch) -> None:
    """A command may wait 0.5 s for its status (300 s for real), looked at every 0.1 s."""
    monkeypatch.setattr(_client, "_PING_INTERVAL", 0.1)
    monkeypatch.setattr(_client, "_COMMAND_LIMIT", 0.5)


@pytest.mark.usefixtures("quick_command_bound")
async def test_a_command_the_target_never_answers_goes_again_then_ends_the_copy() -> None:
    """A target whose backing store hung: it answers pings, so it is alive, but a READ
    never gets its status. Past the command bound the connection is made again and the
    READ goes again; stuck there too, the copy ends with one error instead of waiting
    for ever."""

    def hung(s: Session, cmd: PDU, data: bytes) -> Sequence[bytes]:
        return []  # no status, ever; pings are still answered

    with FakeISCSITarget(bytearray(LUN), reads=hung) as target:
        started = trio.current_time()
        with pytest.raises((TrioconvIOError, BaseExceptionGroup)) as info:  # noqa: PT012
            async with open_iscsi(target.url) as lun:
                with trio.fail_after(FAULT_DEADLINE):  # a regression fails, not hangs
                    await lun.pread(0, 4096)
    assert str(lost(info.value)) == (
        f"{target.url}: connection to the iSCSI target lost: a command got no answer in "
        "0.5 s, though the target answers pings, nor on a new connection"
    )
    assert trio.current_time() - started < 4
    assert len(target.logins) == 2
    assert [len(seen) for seen in target.seen] == [1, 1]  # the READ, on each connection
    assert target.pinged >= 1


@pytest.mark.usefixtures("quick_command_bound")
async def test_a_command_stuck_once_is_answered_when_it_goes_again() -> None:
    """The first READ is lost inside the target (no status); sent again on a new
    connection, it is answered, and the data is right."""
    calls = 0

    def once_hung(s: Session, cmd: PDU, data: bytes) -> Sequence[bytes]:
        nonlocal calls
        calls += 1
        return [] if calls == 1 else honest_read(s, cmd, data)

    with FakeISCSITarget(bytearray(LUN), reads=once_hung) as target:
        async with open_iscsi(target.url) as lun:
            with trio.fail_after(FAULT_DEADLINE):
                assert await lun.pread(8192, 4096) == LUN[8192:12288]
    assert len(target.logins) == 2
    assert calls == 2


class _SlowSync(FakeISCSITarget):
    """SYNCHRONIZE CACHE takes 1.5 s (a cache of gigabytes written out); pings are
    answered meanwhile."""

    def execute(self, s: Session, cmd: PDU) -> Sequence[bytes]:
        if cmd.cdb[0] == scsi.SYNCHRONIZE_CACHE_16:
            self.opcodes[cmd.cdb[0]] += 1
            threading.Timer(1.5, lambda: s.send(s.response(cmd))).start()
            return []
        return super().execute(s, cmd)


@pytest.mark.usefixtures("quick_command_bound")
async def test_synchronize_cache_is_waited_for_unless_the_timeout_option_bounds_it() -> None:
    """Writing a cache out may take long on a live target: SYNCHRONIZE CACHE is not
    bounded by default. The ``timeout`` option (QEMU's request timeout) bounds every
    command, SYNCHRONIZE CACHE included."""
    with _SlowSync(bytearray(LUN)) as target:
        async with open_iscsi(target.url, writable=True) as lun:
            with trio.fail_after(FAULT_DEADLINE):
                await lun.pwrite(0, b"\x5a" * 4096)
                await lun.flush()
        assert len(target.logins) == 1
        assert bytes(target.lun[:4096]) == b"\x5a" * 4096
        with pytest.raises((TrioconvIOError, BaseExceptionGroup)) as info:  # noqa: PT012
            async with open_iscsi(target.url, writable=True, timeout=0.5) as lun:
                with trio.fail_after(FAULT_DEADLINE):
                    await lun.flush()
    assert "a command got no answer in 0.5 s, though the target answers pings, nor on a " in (
        str(lost(info.value))
    )


# -- the target's own messages ---------------------------------------------------------------


def test_a_rejected_command_fails_alone(tmp_path: Path) -> None:
    """A Reject PDU (reason 0x09, invalid PDU field) carrying a READ's header: that READ
    fails with the reason, named by the LUN."""

    def reject(s: Session, cmd: PDU, data: bytes) -> Sequence[bytes]:
        header = bytes((Opcode.SCSI_COMMAND,)) + bytes(15) + cmd.itt.to_bytes(4, "big")
        return [s.pdu(Opcode.REJECT, b2=0x09, data=header.ljust(48, b"\0"))]

    with FakeISCSITarget(bytearray(LUN), reads=reject) as target:
        line = one_line_error(trioconv_cli("convert", "-f", "raw", target.url, tmp_path / "o"))
    assert f"{target.url}: the target rejected the command (reason 0x09)" in line


@pytest.mark.parametrize(
    ("itt", "error"),
    [(0x7FFF0000, None), (RESERVED_TAG, "the target rejected a PDU (reason 0x09)")],
    ids=["a-task-no-longer-waiting", "untagged"],
)
def test_a_reject_for_no_waiting_command(tmp_path: Path, itt: int, error: str | None) -> None:
    """A Reject carrying a task tag no command waits on - one cancelled meanwhile, as
    when a conversion fails and its other READs stop waiting - is a stray, like any
    response for such a task: the copy goes on. One carrying the reserved tag (our
    answers to the target's pings have no other) is refused."""

    def reject_then_answer(s: Session, cmd: PDU, data: bytes) -> Sequence[bytes]:
        header = bytes((Opcode.NOP_OUT,)) + bytes(15) + itt.to_bytes(4, "big")
        reject = s.pdu(Opcode.REJECT, b2=0x09, data=header.ljust(48, b"\0"))
        return [reject, *honest_read(s, cmd, data)]

    out = tmp_path / "out.raw"
    with FakeISCSITarget(bytearray(LUN), reads=reject_then_answer) as target:
        result = trioconv_cli("convert", "-f", "raw", "-O", "raw", target.url, out)
    if error is None:
        assert result.returncode == 0, result.stderr
        assert out.read_bytes() == LUN
    else:
        assert f"connection to the iSCSI target lost: {error}" in one_line_error(result)


# -- pings -----------------------------------------------------------------------------------


def test_a_ping_flood_is_answered_in_bounded_memory(tmp_path: Path) -> None:
    """600 pings of 256 KiB (150 MiB) while the target reads nothing for a second: the
    initiator stops reading too instead of keeping them, then echoes every one."""
    ping = os.urandom(OUR_SEGMENT)
    count = 600

    def flood(s: Session, cmd: PDU, data: bytes) -> Sequence[bytes]:
        if cmd.lba_blocks[0] == 0:
            s.send(*(s.nop_in(ttt=ttt, data=ping) for ttt in range(1, count + 1)))
            time.sleep(1)
        return honest_read(s, cmd, data)

    out = tmp_path / "out.raw"
    with FakeISCSITarget(bytearray(LUN), reads=flood) as target:
        result, rss = measured("convert", "-f", "raw", "-O", "raw", target.url, out)
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == LUN
    assert target.pongs == [(ttt, zlib.crc32(ping)) for ttt in range(1, count + 1)]
    assert rss < 200 * 1024


def test_a_ping_larger_than_our_segment_limit(tmp_path: Path) -> None:
    """More ping data than the initiator declared it takes: refused, not echoed."""

    def big_ping(s: Session, cmd: PDU, data: bytes) -> Sequence[bytes]:
        return [s.nop_in(ttt=7, data=bytes(OUR_SEGMENT + 4)), *honest_read(s, cmd, data)]

    with FakeISCSITarget(bytearray(LUN), reads=big_ping) as target:
        line = one_line_error(trioconv_cli("convert", "-f", "raw", target.url, tmp_path / "o"))
    lost = "connection to the iSCSI target lost"
    assert f"{lost}: a {OUR_SEGMENT + 4}-byte data segment (at most {OUR_SEGMENT})" in line


# -- login and logout ------------------------------------------------------------------------


def test_login_text_continued_forever(tmp_path: Path) -> None:
    """Every response has the C bit (more text follows): refused past 64 KiB, long
    before the 30-second login timeout."""

    def more_and_more(s: Session, req: PDU) -> bytes:
        return s.login_response(req, b"X=" + b"a" * 4000, more=True)

    with FakeISCSITarget(bytearray(LUN), login=more_and_more) as target:
        started = time.monotonic()
        result = trioconv_cli("convert", "-f", "raw", target.url, tmp_path / "o", timeout=10)
    assert time.monotonic() - started < 5
    line = one_line_error(result)
    assert f"Could not open '{target.url}': login failed: the target's login text is " in line


def test_a_huge_login_data_segment(tmp_path: Path) -> None:
    """16 MiB of login text in one PDU: refused from its header (at most 8192 bytes
    until the login is over), before it is read."""

    def huge(s: Session, req: PDU) -> bytes | None:
        if req.flags & 0x0C:  # past the security stage
            return None
        text = b"AuthMethod=None\0TargetPortalGroupTag=1\0X="
        return s.login_response(req, text.ljust(MAX_SEGMENT - 1, b"a") + b"\0")

    with FakeISCSITarget(bytearray(LUN), login=huge) as target:
        line = one_line_error(trioconv_cli("convert", "-f", "raw", target.url, tmp_path / "o"))
    assert f"login failed: a {MAX_SEGMENT}-byte data segment (at most 8192)" in line


def test_a_target_that_closes_instead_of_answering_logout(tmp_path: Path) -> None:
    """The closed connection is the answer: no waiting out the logout timeout."""
    out = tmp_path / "out.raw"
    with FakeISCSITarget(bytearray(LUN), answer_logout=False) as target:
        result = trioconv_cli("convert", "-f", "raw", "-O", "raw", target.url, out)
        ended = time.monotonic()
    assert result.returncode == 0, result.stderr
    assert out.read_bytes() == LUN
    assert target.logout_at is not None
    assert ended - target.logout_at < 2


def test_the_timeout_option_bounds_the_login(tmp_path: Path) -> None:
    """QEMU's ``timeout`` block option: a target that takes the connection and never
    answers the login is given up after that many seconds (30 by default)."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as silent:  # never accepts, never answers
        port = silent.getsockname()[1]
        opts = f"driver=iscsi,transport=tcp,portal=127.0.0.1:{port},target=iqn.x:y,lun=1,timeout=1"
        started = time.monotonic()
        result = trioconv_cli("info", "--image-opts", opts)
        elapsed = time.monotonic() - started
    assert "did not" in one_line_error(result) and "in time" in result.stderr
    assert elapsed < 10, elapsed

"""How zeroes reach a thick LUN: :class:`ZeroingChoice` alone, then against a real tgt.

tgt expands WRITE SAME with one system call per logical block, so on a thick LUN it can
be slower than receiving the zeroes as data; the driver watches what each kind of
command achieves and sends zeroes the faster way. Which way is faster on this machine
is not asserted (tests do not depend on speed): the choice is tested with given times,
and each path is tested for landing the right bytes on a real LUN.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio

from trioconv.protocols.iscsi import open_iscsi
from trioconv.protocols.iscsi._zeroing import Kind, ZeroingChoice

from ._faults import MiB
from .iscsi_target import ISCSITarget


def run(choice: ZeroingChoice, kind: Kind, start: float, seconds: float, nbytes: int) -> None:
    choice.started(kind, start)
    choice.finished(kind, nbytes, start + seconds)


def test_write_same_until_both_have_evidence() -> None:
    choice = ZeroingChoice()
    assert not choice.zeroes_as_data(0.0)
    run(choice, Kind.WRITE_SAME, 0.0, 0.1, 8 * MiB)  # 80 MiB/s
    assert not choice.zeroes_as_data(0.1)  # no data WRITEs seen yet
    run(choice, Kind.WRITE, 0.1, 0.001, MiB)  # fast, but too little to judge
    assert choice.rate(Kind.WRITE, 0.2) is None
    assert not choice.zeroes_as_data(0.2)
    run(choice, Kind.WRITE, 0.2, 0.004, 4 * MiB)
    assert choice.zeroes_as_data(0.3)


def test_fast_write_same_stays() -> None:
    """An array that expands WRITE SAME in place: zeroes never cross the network."""
    choice = ZeroingChoice()
    now = 0.0
    for _ in range(10):
        run(choice, Kind.WRITE, now, 0.008, MiB)  # a 1 Gbit/s link
        run(choice, Kind.WRITE_SAME, now + 0.01, 0.002, 8 * MiB)
        now += 0.02
        assert not choice.zeroes_as_data(now)


def test_parallel_commands_count_busy_time_once() -> None:
    """Eight WRITEs in flight together for 10 ms moved 8 MiB in 10 ms, not in 80."""
    choice = ZeroingChoice()
    for i in range(8):
        choice.started(Kind.WRITE, 0.0 + i * 1e-6)
    for i in range(8):
        choice.finished(Kind.WRITE, MiB, 0.010 + i * 1e-6)
    rate = choice.rate(Kind.WRITE, 1.0)
    assert rate is not None and 790 * MiB < rate < 810 * MiB
    # A command in flight now counts its time so far, not its bytes yet.
    choice.started(Kind.WRITE, 1.0)
    assert choice.rate(Kind.WRITE, 1.01) == pytest.approx(8 * MiB / 0.020, rel=1e-3)


def test_failed_commands_move_no_bytes() -> None:
    choice = ZeroingChoice(evidence=0)
    choice.started(Kind.WRITE_SAME, 0.0)
    choice.finished(Kind.WRITE_SAME, 0, 0.5)
    assert choice.rate(Kind.WRITE_SAME, 1.0) == 0.0


def test_reprobes_write_same_and_follows_it_back() -> None:
    choice = ZeroingChoice(reprobe=4)
    run(choice, Kind.WRITE, 0.0, 0.01, 8 * MiB)  # 800 MiB/s
    run(choice, Kind.WRITE_SAME, 0.01, 0.1, 8 * MiB)  # 80 MiB/s
    answers = [choice.zeroes_as_data(0.2) for _ in range(8)]
    assert answers == [True, True, True, False] * 2  # every 4th asks WRITE SAME again
    now = 0.2
    for _ in range(50):  # the target got fast at it
        run(choice, Kind.WRITE_SAME, now, 0.001, 8 * MiB)
        now += 0.001
    assert not choice.zeroes_as_data(now)


async def test_tgt_thick_lun_tallies_both_kinds(iscsi_target: ISCSITarget, tmp_path: Path) -> None:
    url = iscsi_target.add_lun(tmp_path / "lun.img", 24 * MiB)
    async with open_iscsi(url, writable=True) as lun:
        choice = lun._zeroing
        await lun.pwrite(0, os.urandom(4 * MiB))
        assert choice.rate(Kind.WRITE, trio.current_time()) is not None
        assert choice.rate(Kind.WRITE_SAME, trio.current_time()) is None
        await lun.pwrite_zeroes(4 * MiB, 8 * MiB)  # WRITE SAME: no evidence against it yet
        assert choice.rate(Kind.WRITE_SAME, trio.current_time()) is not None
        await lun.pwrite_zeroes(12 * MiB, 12 * MiB, may_unmap=True)  # no UNMAP on a thick LUN
        assert await lun.pread(4 * MiB, 20 * MiB) == bytes(20 * MiB)


async def test_tgt_thick_lun_zeroes_as_data(iscsi_target: ISCSITarget, tmp_path: Path) -> None:
    """Once WRITE SAME has been seen slower, zeroes land as WRITEs of zero bytes."""
    backing = tmp_path / "lun.img"
    size = 48 * MiB
    url = iscsi_target.add_lun(backing, size)
    with backing.open("r+b") as f:
        f.write(b"\xa5" * size)
    async with open_iscsi(url, writable=True) as lun:
        # Given history: WRITE SAME at 1 MiB/s, far below any data rate here.
        run(lun._zeroing, Kind.WRITE_SAME, -100.0, 99.0, 99 * MiB)
        sent: list[int] = []
        real_same = lun._write_same

        async def counting_same(offset: int, length: int, block: memoryview, unmap: bool) -> None:
            sent.append(length)
            await real_same(offset, length, block, unmap)

        lun._write_same = counting_same  # type: ignore[method-assign]
        await lun.pwrite(0, b"\x5a" * (4 * MiB))  # data WRITEs: the other rate
        for start in range(4 * MiB, 44 * MiB, 8 * MiB):
            await lun.pwrite_zeroes(start, 8 * MiB)
        await lun.pwrite_zeroes(44 * MiB + 512, 3 * MiB)  # unaligned ends too
        assert sent == []  # not one WRITE SAME
        await lun.flush()
        tail = await lun.pread(44 * MiB, 4 * MiB)
    data = backing.read_bytes()
    assert data[: 4 * MiB] == b"\x5a" * (4 * MiB)
    assert data[4 * MiB : 44 * MiB] == bytes(40 * MiB)
    assert tail == b"\xa5" * 512 + bytes(3 * MiB) + b"\xa5" * (MiB - 512)
    assert data[44 * MiB :] == tail

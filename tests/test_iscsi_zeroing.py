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

from trioconv.protocols.iscsi import open_iscsi
from trioconv.protocols.iscsi._zeroing import Kind, ZeroingChoice

from ._faults import MiB
from .iscsi_target import ISCSITarget

RTT = 0.002


def test_write_same_until_both_are_seen() -> None:
    choice = ZeroingChoice()
    choice.note_command(RTT)
    assert not choice.zeroes_as_data()
    choice.note(Kind.WRITE_SAME, 8 * MiB, RTT + 0.100)  # 80 MiB/s beyond the round trip
    assert not choice.zeroes_as_data()  # no data WRITEs seen yet
    choice.note(Kind.WRITE, 4096, RTT)  # too short to tell anything
    assert choice.cost(Kind.WRITE) is None and not choice.zeroes_as_data()
    choice.note(Kind.WRITE, MiB, RTT + 0.002)  # 500 MiB/s
    assert choice.zeroes_as_data()


def test_fast_write_same_stays() -> None:
    """An array that expands WRITE SAME in place: zeroes never cross the network."""
    choice = ZeroingChoice()
    choice.note_command(RTT)
    for _ in range(10):
        choice.note(Kind.WRITE, MiB, RTT + 0.008)  # a 1 Gbit/s link
        choice.note(Kind.WRITE_SAME, 8 * MiB, RTT + 0.002)
        assert not choice.zeroes_as_data()


def test_round_trip_is_not_counted_as_cost() -> None:
    """10 ms of round trip: a small WRITE takes longer per byte than a large WRITE SAME
    the target expands quickly; less the round trip, WRITE SAME is still cheaper."""
    choice = ZeroingChoice()
    choice.note_command(0.010)  # READ CAPACITY at open
    choice.note(Kind.WRITE, 256 * 1024, 0.0105)
    choice.note(Kind.WRITE_SAME, 8 * MiB, 0.012)
    assert not choice.zeroes_as_data()


def test_queueing_does_not_count_as_cost() -> None:
    """Commands that waited behind others took longer; the lowest recent cost counts."""
    choice = ZeroingChoice()
    choice.note_command(RTT)
    choice.note(Kind.WRITE, MiB, RTT + 0.002)
    for _ in range(8):
        choice.note(Kind.WRITE, MiB, RTT + 0.050)  # queued behind seven others
    choice.note(Kind.WRITE_SAME, MiB, RTT + 0.012)
    assert choice.cost(Kind.WRITE) == pytest.approx(0.002 / MiB)
    assert choice.zeroes_as_data()


def test_reprobes_write_same_and_follows_it_back() -> None:
    choice = ZeroingChoice(reprobe=4, recent=4)
    choice.note_command(RTT)
    choice.note(Kind.WRITE, MiB, RTT + 0.001)
    choice.note(Kind.WRITE_SAME, 8 * MiB, RTT + 0.200)
    answers = [choice.zeroes_as_data() for _ in range(8)]
    assert answers == [True, True, True, False] * 2  # every 4th asks WRITE SAME again
    choice.note(Kind.WRITE_SAME, 8 * MiB, RTT + 0.0001)  # the target got fast at it
    assert not choice.zeroes_as_data()


async def test_tgt_thick_lun_times_both_kinds(iscsi_target: ISCSITarget, tmp_path: Path) -> None:
    url = iscsi_target.add_lun(tmp_path / "lun.img", 24 * MiB)
    async with open_iscsi(url, writable=True) as lun:
        choice = lun._zeroing
        assert 0 < choice.floor < 30  # READ CAPACITY at open
        await lun.pwrite(0, os.urandom(4 * MiB))
        assert choice.cost(Kind.WRITE) is not None
        assert choice.cost(Kind.WRITE_SAME) is None
        await lun.pwrite_zeroes(4 * MiB, 8 * MiB)  # WRITE SAME: nothing against it yet
        assert choice.cost(Kind.WRITE_SAME) is not None
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
        lun._zeroing.note(Kind.WRITE_SAME, 8 * MiB, 8.0)
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

"""Fault scaffolding shared by the tests against real servers (iSCSI, NFS).

A server killed mid-copy, a reader whose connection is lost, a failed CLI run: each must
end with one clear line, promptly (within :data:`FAULT_DEADLINE`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import trio

import trioconv
from trioconv import ConvertError, ConvertOptions, TrioconvIOError
from trioconv.protocols.memory import MemoryDriver

from .conftest import ImageMaker

MiB = 1024 * 1024
#: A fault must end the conversion within this many seconds.
FAULT_DEADLINE = 15.0


def make_mixed_src(make_image: ImageMaker) -> Path:
    """8 MiB raw: data, written zeroes, holes, a data run that ends unaligned."""
    return make_image(
        "src.img",
        "8M",
        "write -P 0xab 0 1M",
        "write -z 2M 1M",
        "write -P 0x5c 3M 512k",
        "write -P 0x17 7M 4k",
        "write -P 0x99 8386560 1536",
    )


def one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """The single ``trioconv: ...`` line of a failed CLI run."""
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("trioconv: ")
    return lines[0]


async def kill_when_copying(
    kill: Callable[[], None], memory: MemoryDriver, killed_at: list[float]
) -> None:
    """Call ``kill`` once the copy is under way (``memory`` saw I/O); note when."""
    for _ in range(1000):
        if memory.log:
            break
        await trio.sleep(0.01)
    await trio.sleep(0.1)
    kill()
    killed_at.append(trio.current_time())


async def check_killed_mid_copy(
    direction: str, url: str, size: int, kill: Callable[[], None], server: str
) -> None:
    """Copy ``size`` bytes from (``read``) or to (``write``) ``url`` through a slow memory
    driver, ``kill`` the server once it runs: the conversion must fail promptly, with one
    line naming the ``server`` ("iSCSI target", "NFS server"). The memory side holds
    each request 50 ms, so 64 MiB take at least 0.2 s at ``-m 8``: the kill, 0.1 s after
    the first request, lands mid-copy (at 20 ms a fast run could finish first)."""
    memory: MemoryDriver
    if direction == "read":
        memory = MemoryDriver(size, delay=0.05)
        source: str | MemoryDriver = url
        target: str | MemoryDriver = memory
        opts = ConvertOptions()
    else:
        memory = MemoryDriver(data=os.urandom(size), delay=0.05, block_status=False)
        source, target = memory, url
        opts = ConvertOptions(no_create=True)
    killed_at: list[float] = []
    errors: list[ConvertError] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(kill_when_copying, kill, memory, killed_at)
        try:
            await trioconv.convert(source, target, opts)
        except ConvertError as exc:
            errors.append(exc)
    what = server.split()[-1]  # "target", "server"
    assert killed_at, f"the copy ended before the {what} was stopped"
    assert errors, f"the conversion succeeded although the {what} was killed"
    assert trio.current_time() - killed_at[0] < FAULT_DEADLINE
    message = str(errors[0])
    assert "\n" not in message and server in message, message


async def check_reader_fails_after_loss(url: str, kill: Callable[[], None]) -> None:
    """An open image whose server is killed fails its reader with a TrioconvIOError."""
    with pytest.raises(BaseExceptionGroup) as info:  # noqa: PT012
        async with trioconv.open_image(url, "raw") as image:
            await image.pread(0, 4096)
            kill()
            await trio.sleep(FAULT_DEADLINE)  # the reader's failure cancels this
    assert info.value.split(TrioconvIOError)[0] is not None


async def check_cancelled_while_stopped(url: str, size: int, pid: int) -> None:
    """Write ``size`` bytes to ``url``; once under way, stop the server (SIGSTOP: it
    reads nothing more, sends fill the socket buffer) and cancel the conversion, as
    Ctrl-C does: it must end promptly all the same. (The server is continued after
    :data:`FAULT_DEADLINE` at the latest, so a regression fails instead of hanging.)"""
    memory = MemoryDriver(data=os.urandom(size), delay=0.25, block_status=False)
    rescue = threading.Timer(FAULT_DEADLINE, os.kill, (pid, signal.SIGCONT))
    cancelled_at: list[float] = []

    async def stop_then_cancel(scope: trio.CancelScope) -> None:
        for _ in range(1000):
            if memory.log:
                break
            await trio.sleep(0.01)
        await trio.sleep(0.2)
        os.kill(pid, signal.SIGSTOP)
        rescue.start()
        await trio.sleep(0.5)
        cancelled_at.append(trio.current_time())
        scope.cancel()

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_then_cancel, nursery.cancel_scope)
            await trioconv.convert(memory, url, ConvertOptions(no_create=True))
            nursery.cancel_scope.cancel()
    finally:
        rescue.cancel()
        os.kill(pid, signal.SIGCONT)
    assert cancelled_at, "the copy ended before the server was stopped"
    assert trio.current_time() - cancelled_at[0] < 5


def start_cli(args: Sequence[str | os.PathLike[str]]) -> subprocess.Popen[str]:
    """``python -m trioconv ARGS`` started as a user would, its output captured as text:
    for a test that does something to it (a signal, a server fault) while it runs."""
    return subprocess.Popen(
        [sys.executable, "-m", "trioconv", *[os.fspath(a) for a in args]],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def interrupt_cli(
    args: list[str | os.PathLike[str]],
    *,
    after: float,
    signum: signal.Signals,
    before_signal: Callable[[], None] | None = None,
) -> tuple[int, str, float]:
    """Run the CLI, send ``signum`` ``after`` seconds in; its status, stderr and how long
    it took to end after the signal."""
    proc = start_cli(args)
    try:
        time.sleep(after)
        assert proc.poll() is None, proc.communicate()
        if before_signal is not None:
            before_signal()
        proc.send_signal(signum)
        sent = time.monotonic()
        _, stderr = proc.communicate(timeout=FAULT_DEADLINE)
        return proc.returncode, stderr, time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

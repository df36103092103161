"""The ``trioconv`` command's entry point: Ctrl-C handled from the first moment.

This module lives beside the ``trioconv`` package, not in it, so that the console
script reaches it without importing the package (whose public names load attrs and
the driver contract, some 25 ms). Loading the command line (Trio, cyclopts and the
drivers) takes a good part of a second's first tenth. A SIGINT in that time would
otherwise end the process with a Python traceback, and one that lands after Trio
starts but before the conversion watches for signals, with a bare status. So, before
anything heavy is imported, SIGINT, SIGTERM and SIGHUP are set to end the process at
once - nothing exists yet that needs cleaning up - with the same one line and the same
death by the signal as an interrupted conversion. (What is left is the interpreter's
own start, some 15 ms, before any of trioconv's code runs.) Once a conversion runs, it
takes the signals over (:func:`trioconv.cli._supervise`) and cancels itself cleanly.

Start and end cost time too, which a short conversion feels: the collector is kept off
while the command line loads, the C library's threads are found without running a
program (:func:`_without_ldconfig`), and the process ends without Python's shutdown.
"""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Iterator
    from types import FrameType


def _die_early(signum: int, _frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    try:  # noqa: SIM105 (contextlib.suppress would cost an import here)
        os.write(2, f"trioconv: interrupted by {name}\n".encode())
    except OSError:
        pass  # no stderr to tell: the death by the signal still tells
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _exit_now(code: object) -> None:
    """End the process with ``code`` (a :class:`SystemExit`'s), as Python would, less
    the interpreter's shutdown.

    Shutting down tears down every module, class and function that Trio, cyclopts,
    attrs and trioconv loaded, some 10 ms of a short conversion's 0.1 s, to give back
    memory the operating system takes back anyway. By now the command has finished: its
    files are closed (a target is complete or removed), and its worker threads, all
    daemons, sit idle. What remains is the buffered text on stdout and stderr, flushed
    here, with Python's status 120 if stdout cannot take it.
    """
    if code is None:
        status = 0
    elif isinstance(code, int):
        status = code
    else:
        print(code, file=sys.stderr)
        status = 1
    for stream in (sys.stdout, sys.stderr):
        try:
            if stream is not None:
                stream.flush()
        except (OSError, ValueError):
            status = 120
    os._exit(status & 0xFF)


@contextlib.contextmanager
def _without_ldconfig() -> Iterator[None]:
    """While Trio loads, ``ctypes.util.find_library("pthread")`` answers at once.

    Trio names its worker threads through ``pthread_setname_np``, and looks for the
    library that has it when it is imported: on Linux ``find_library`` runs
    ``ldconfig -p`` in a child process and reads its whole list, some 15 ms of a start
    that is over in 0.1 s. With the GNU C library the answer is known without asking:
    ``libpthread.so.0`` is there in every version (since 2.34 a stub whose symbols
    resolve to the C library's own). Any other name, or another C library, is looked
    up as before.
    """
    try:
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError):
        libc = ""
    if not libc.startswith("glibc "):
        yield
        return
    import ctypes.util

    real = ctypes.util.find_library

    def find_library(name: str) -> str | None:
        return "libpthread.so.0" if name == "pthread" else real(name)

    ctypes.util.find_library = find_library
    try:
        yield
    finally:
        ctypes.util.find_library = real


def main() -> None:
    """Run the command line with ``sys.argv``; exits with its status."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL):
            signal.signal(signum, _die_early)
    # Loading makes a few hundred thousand objects that live until the end. The cyclic
    # collector would walk them over and over while they are made (some 5-10 ms);
    # frozen once loaded, they are left out of every later collection.
    gc.disable()
    try:
        with _without_ldconfig():
            from trioconv.cli import main as cli_main
    finally:
        gc.freeze()
        gc.enable()
    try:
        cli_main()
    except SystemExit as end:
        _exit_now(end.code)

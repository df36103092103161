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
"""

from __future__ import annotations

import os
import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import FrameType


def _die_early(signum: int, _frame: FrameType | None) -> None:
    name = signal.Signals(signum).name
    try:  # noqa: SIM105 (contextlib.suppress would cost an import here)
        os.write(2, f"trioconv: interrupted by {name}\n".encode())
    except OSError:
        pass  # no stderr to tell: the death by the signal still tells
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def main() -> None:
    """Run the command line with ``sys.argv``; exits with its status."""
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) in (signal.default_int_handler, signal.SIG_DFL):
            signal.signal(signum, _die_early)
    from trioconv.cli import main as cli_main

    cli_main()

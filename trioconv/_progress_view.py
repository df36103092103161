"""Showing a :class:`~trioconv.Progress` to people and programs.

* ``qemu``: exactly qemu-img's ``    (NN.NN/100%)\\r`` on stdout, at every whole percent;
  scripts and management platforms parse it. The default when stdout is not a terminal.
* ``bar``: a live bar with bytes, rate and ETA, redrawn in place. The default on a terminal.
* ``json``: one JSON object per line on stdout, for programs.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import TextIO

import trio
import trio_util

from ._sizes import format_size
from .convert.progress import Progress

__all__ = ["qemu_line", "render"]


def qemu_line(progress: Progress) -> str:
    """qemu-img's progress text, without the trailing ``\\r``."""
    return f"    ({progress.percent:3.2f}/100%)"


def _rate(progress: Progress) -> float:
    if progress.started_at is None:
        return 0.0
    elapsed = trio.current_time() - progress.started_at
    return progress.done / elapsed if elapsed > 0 else 0.0


def _eta(progress: Progress) -> str:
    """Time left, from the share of the data done so far and the time it took (holes,
    passed over in no time, would make a rate of bytes promise too much)."""
    fraction = progress.fraction
    if progress.started_at is None or not 0 < fraction < 1:
        return "--:--"
    elapsed = trio.current_time() - progress.started_at
    left = int(elapsed * (1 - fraction) / fraction)
    return f"{left // 60}:{left % 60:02d}"


def _bar_line(progress: Progress, width: int = 30) -> str:
    filled = int(width * progress.fraction)
    rate = _rate(progress)
    eta = _eta(progress)
    return (
        f"[{'#' * filled}{' ' * (width - filled)}] {progress.percent:6.2f}%  "
        f"{format_size(progress.done)} / {format_size(progress.total)}  "
        f"{format_size(rate)}/s  ETA {eta}"
    )


def _json_line(progress: Progress) -> str:
    return json.dumps(
        {
            "done": progress.done,
            "total": progress.total,
            "percent": round(progress.percent, 2),
            "written": progress.written,
            "zeroed": progress.zeroed,
            "skipped": progress.skipped,
            "data_done": progress.data_done,
            "data_total": progress.data_total,
            "rate": round(_rate(progress)),
            "finished": progress.finished,
        }
    )


async def render(
    progress: Progress,
    style: str,
    out: TextIO | None = None,
    on_error: Callable[[], None] | None = None,
) -> None:
    """Draw ``progress`` in ``style`` until it finishes; run it in its own task.

    A failed write to ``out`` (a closed pipe, a full disk) ends the drawing, not the
    conversion; ``on_error`` is called then.
    """
    out = out if out is not None else sys.stdout
    try:
        await _draw(progress, style, out)
    except OSError:
        if on_error is not None:
            on_error()


async def _draw(progress: Progress, style: str, out: TextIO) -> None:
    if style == "qemu":
        # qemu-img shows 0.00 before it opens anything; a conversion that fails shows
        # no more than it reached.
        shown, last = 0, qemu_line(Progress())
        out.write(last + "\r")
        out.flush()
        while True:
            if progress.finished and (
                progress.started_at is None or progress.done < progress.total or not progress.total
            ):
                return  # (nothing to copy: qemu-img shows only its closing line)
            whole = int(progress.percent)
            line = qemu_line(progress)
            if (whole > shown or progress.finished) and line != last:
                shown, last = whole, line
                out.write(line + "\r")
                out.flush()
            if progress.finished:
                return
            await progress.wait_changed()
    while progress.started_at is None and not progress.finished:
        await progress.wait_changed()
    interval = 0.2 if style == "bar" else 0.5
    async for _ in trio_util.periodic(interval):
        if style == "bar":
            out.write("\r" + _bar_line(progress))
        else:
            out.write(_json_line(progress) + "\n")
        out.flush()
        if progress.finished:
            return

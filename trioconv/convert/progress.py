"""Progress of a conversion, observable from the caller's own tasks."""

from __future__ import annotations

import attrs
import trio

__all__ = ["Progress"]


@attrs.define(eq=False)
class Progress:
    """Live statistics of one conversion.

    Make one, pass it to :func:`trioconv.convert`, and watch it from another task: the
    counters only grow, and :meth:`wait_changed` wakes whenever they do::

        progress = trioconv.Progress()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(trioconv.convert, [src], dst, progress=progress))
            while not progress.finished:
                await progress.wait_changed()
                print(f"{progress.percent:.1f}%")

    Attributes:
        total: bytes of the target the conversion covers (sum of the source sizes).
        done: bytes finished so far - written, zeroed, or skipped as already zero.
        written: data bytes written to the target.
        zeroed: bytes made to read as zero on the target (write-zeroes or zero buffers).
        skipped: bytes not touched because the target already reads as zero there.
        started_at: ``trio.current_time()`` when copying began, None before.
        finished: True once the conversion has ended, successfully or not.
    """

    total: int = 0
    done: int = 0
    written: int = 0
    zeroed: int = 0
    skipped: int = 0
    started_at: float | None = None
    finished: bool = False
    # Made by the first waiter and set by the next change: no event per update when
    # nobody watches.
    _changed: trio.Event | None = attrs.field(default=None, init=False, repr=False)

    @property
    def fraction(self) -> float:
        """Share of the work done, 0.0 to 1.0 (1.0 for an empty image once copied; 0.0
        when the conversion ended before copying began)."""
        if self.total:
            return self.done / self.total
        return 1.0 if self.finished and self.started_at is not None else 0.0

    @property
    def percent(self) -> float:
        """:attr:`fraction` as a percentage."""
        return 100.0 * self.fraction

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _start(self, total: int) -> None:
        self.total = total
        self.started_at = trio.current_time()
        self._notify()

    def _advance(self, *, written: int = 0, zeroed: int = 0, skipped: int = 0) -> None:
        self.written += written
        self.zeroed += zeroed
        self.skipped += skipped
        self.done += written + zeroed + skipped
        self._notify()

    def _finish(self) -> None:
        self.finished = True
        self._notify()

    async def wait_changed(self) -> None:
        """Sleep until the counters change or the conversion finishes."""
        if self.finished:
            await trio.lowlevel.checkpoint()
            return
        if self._changed is None:
            self._changed = trio.Event()
        await self._changed.wait()

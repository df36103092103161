"""Progress of a conversion, observable from the caller's own tasks."""

from __future__ import annotations

import attrs
import trio

from ..driver import require_trio

__all__ = ["Progress"]


@attrs.define(eq=False)
class Progress:
    """Live statistics of one conversion.

    Make one (``Progress()``: it takes no arguments), pass it to
    :func:`trioconv.convert`, and watch it from another task: the counters only grow,
    and :meth:`wait_changed` wakes whenever they do::

        progress = trioconv.Progress()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(partial(trioconv.convert, [src], dst, progress=progress))
            while not progress.finished:
                await progress.wait_changed()
                print(f"{progress.percent:.1f}%")

    The percentage counts data, as qemu-img's ``-p`` does: of a 2 GiB image holding
    400 MiB, the 400 MiB are the whole way, not a fifth of it followed by a jump over
    the holes. How much data the sources hold is learnt from their block status, read
    beside the copy (:attr:`data_total` is None until then, and the percentage 0). A
    conversion given no Progress does not learn it.

    Attributes:
        total: bytes of the target the conversion covers (sum of the source sizes).
        done: bytes finished so far - written, zeroed, or skipped as already zero.
        written: data bytes written to the target.
        zeroed: bytes made to read as zero on the target (write-zeroes or zero buffers).
        skipped: bytes not touched because the target already reads as zero there.
        data_total: bytes the sources hold as data - all of them with ``-S 0``; with
            ``-B``, those of the top layer - which are read and copied (those that turn
            out to be zeroes included); None until known.
        data_done: of those, the bytes finished so far.
        started_at: ``trio.current_time()`` when copying began, None before.
        finished: True once the conversion has ended, successfully or not.
    """

    # Not arguments: a Progress starts at zero, and the ConvertResult of the conversion
    # it follows is read from it.
    total: int = attrs.field(default=0, init=False)
    done: int = attrs.field(default=0, init=False)
    written: int = attrs.field(default=0, init=False)
    zeroed: int = attrs.field(default=0, init=False)
    skipped: int = attrs.field(default=0, init=False)
    data_total: int | None = attrs.field(default=None, init=False)
    data_done: int = attrs.field(default=0, init=False)
    started_at: float | None = attrs.field(default=None, init=False)
    finished: bool = attrs.field(default=False, init=False)
    # True while data_total is being learnt (the percentage waits for it).
    _measuring: bool = attrs.field(default=False, init=False, repr=False)
    # Learn data_total at all: a Progress nobody watches (the one trioconv.convert makes
    # when given none, the command line's without -p) spares the sources the walk.
    _wants_data: bool = attrs.field(default=True, init=False, repr=False)
    # Given to a conversion: a Progress follows one (taken when the call starts, so
    # that two conversions started together cannot both take it).
    _taken: bool = attrs.field(default=False, init=False, repr=False)
    # Made by the first waiter and set by the next change: no event per update when
    # nobody watches.
    _changed: trio.Event | None = attrs.field(default=None, init=False, repr=False)

    @property
    def fraction(self) -> float:
        """Share of the work done, 0.0 to 1.0: of the data (:attr:`data_done` of
        :attr:`data_total`), or, for sources with no data, of the whole size; 0.0 while
        the amount of data is not known yet. (1.0 for an empty image once copied; 0.0
        when the conversion ended before copying began.)"""
        if self.data_total:
            return min(1.0, self.data_done / self.data_total)
        if self._measuring and not self.finished:
            return 0.0
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

    def _measure(self) -> None:
        self._measuring = True

    def _measured(self, data_total: int | None) -> None:
        """The amount of data is known (None: it could not be learnt)."""
        self._measuring = False
        self.data_total = data_total
        self._notify()

    def _advance(
        self, *, written: int = 0, zeroed: int = 0, skipped: int = 0, data: int = 0
    ) -> None:
        self.written += written
        self.zeroed += zeroed
        self.skipped += skipped
        self.done += written + zeroed + skipped
        self.data_done += data
        self._notify()

    def _finish(self) -> None:
        self.finished = True
        self._notify()

    async def wait_changed(self) -> None:
        """Sleep until the counters change or the conversion finishes.

        Raises:
            UsageError: called outside a Trio task (from asyncio, say).
        """
        require_trio("Progress.wait_changed")
        if self.finished:
            await trio.lowlevel.checkpoint()
            return
        if self._changed is None:
            self._changed = trio.Event()
        await self._changed.wait()

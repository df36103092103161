"""How zeroes reach a thick LUN: WRITE SAME, or WRITEs of zero bytes - whichever is cheaper.

On a LUN without thin provisioning every zero block must really be written. WRITE SAME
keeps those zeroes off the network: the initiator sends one block and a count, and a
storage array usually expands it in place far faster than it could receive the bytes.
Some targets, though, expand it one logical block at a time (tgt makes one system call
per block): many times the work of receiving the zeroes as ordinary data, work that
also slows everything else the target (and, on a small machine, the initiator) does.

Nothing in the SCSI standard tells the two apart, so :class:`ZeroingChoice` watches the
copy. Every data WRITE and every WRITE SAME without UNMAP of at least ``min_bytes`` is
timed; its cost per byte is what is left of its time after a round trip (the fastest
command seen, a lower bound of one), and each kind's cost is the lowest of its recent
commands - queueing behind other commands only ever adds time, so the lowest is the
nearest to what the command itself costs. Zeroes go as data only once WRITE SAME has
been seen costing clearly more per byte; even then WRITE SAME is tried again now and
then, so the choice follows a target whose speed changes. Until both kinds have been
seen, WRITE SAME is used, as qemu does.

The class does no I/O and reads no clock: the driver reports what each command took.
"""

from __future__ import annotations

import collections
import enum
import math

__all__ = ["Kind", "ZeroingChoice"]


class Kind(enum.Enum):
    """The commands that are timed."""

    WRITE = "write"
    WRITE_SAME = "write-same"


class ZeroingChoice:
    """Timings of WRITEs and WRITE SAMEs, and the choice they lead to.

    Args:
        margin: WRITE SAME must cost this many times a data WRITE's per byte before
            zeroes are sent as data (a clear difference, not noise).
        min_bytes: shorter commands are not timed (a round trip hides their cost).
        recent: how many of each kind's latest timings are kept.
        reprobe: while zeroes go as data, every ``reprobe``-th zeroing request uses WRITE
            SAME again, to refresh its timings.
    """

    def __init__(
        self,
        *,
        margin: float = 2.0,
        min_bytes: int = 256 * 1024,
        recent: int = 16,
        reprobe: int = 32,
    ) -> None:
        self.margin = margin
        self.min_bytes = min_bytes
        self.reprobe = reprobe
        #: The fastest command seen, in seconds: a lower bound of the round trip.
        self.floor = math.inf
        self._timings: dict[Kind, collections.deque[tuple[float, int]]] = {
            kind: collections.deque(maxlen=recent) for kind in Kind
        }
        self._asked = 0

    def note_command(self, seconds: float) -> None:
        """Any command's time, from sending it to its status (lowers the floor)."""
        if seconds >= 0:
            self.floor = min(self.floor, seconds)

    def note(self, kind: Kind, nbytes: int, seconds: float) -> None:
        """A command of ``kind`` covering ``nbytes`` succeeded in ``seconds``."""
        self.note_command(seconds)
        if nbytes >= self.min_bytes:
            self._timings[kind].append((seconds, nbytes))

    def cost(self, kind: Kind) -> float | None:
        """Seconds per byte beyond a round trip: the lowest recent; None if none seen."""
        timings = self._timings[kind]
        if not timings:
            return None
        return min(max(seconds - self.floor, 0.0) / nbytes for seconds, nbytes in timings)

    def zeroes_as_data(self) -> bool:
        """Whether the next zeroing request should send zero bytes with WRITE."""
        same, write = self.cost(Kind.WRITE_SAME), self.cost(Kind.WRITE)
        if same is None or write is None or same <= self.margin * write:
            self._asked = 0
            return False
        self._asked += 1
        return self._asked % self.reprobe != 0

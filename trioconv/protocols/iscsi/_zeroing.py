"""How zeroes reach a thick LUN: WRITE SAME, or WRITEs of zero bytes - whichever is faster.

On a LUN without thin provisioning every zero block must really be written. WRITE SAME
keeps those zeroes off the network: the initiator sends one block and a count, and a
storage array usually expands it in place far faster than it could receive the bytes.
Some targets, though, expand it one logical block at a time (tgt makes one system call
per block), which is many times slower than receiving the zeroes as ordinary data.

Nothing in the SCSI standard tells the two apart, so :class:`ZeroingChoice` watches the
copy. For each kind of command - data WRITE, and WRITE SAME without UNMAP - it adds up
the bytes done and the time during which at least one command of that kind was in
flight: bytes over busy time is the rate that kind achieves as the copy uses it, with
its round trips and its parallelism. Zeroes go as data only once WRITE SAME has been
seen clearly slower; even then WRITE SAME is tried again now and then, so the choice
can follow a target whose speed changes. Until both kinds have done enough to judge,
WRITE SAME is used, as qemu does.

The class does no I/O and reads no clock: the driver reports when commands start and
end, with times from its clock.
"""

from __future__ import annotations

import enum

__all__ = ["Kind", "ZeroingChoice"]


class Kind(enum.Enum):
    """The commands that are timed."""

    WRITE = "write"
    WRITE_SAME = "write-same"


class _Tally:
    __slots__ = ("busy", "done", "in_flight", "since")

    def __init__(self) -> None:
        self.done = 0  # bytes of finished commands
        self.busy = 0.0  # seconds with one or more in flight (closed periods)
        self.in_flight = 0
        self.since = 0.0  # start of the open busy period

    def rate(self, now: float) -> float:
        busy = self.busy + (now - self.since if self.in_flight else 0.0)
        return self.done / busy if busy > 0 else 0.0


class ZeroingChoice:
    """What WRITEs and WRITE SAMEs achieve, and the choice that follows.

    Args:
        margin: data WRITEs must move bytes this many times faster than WRITE SAME
            before zeroes are sent as data (a clear difference, not noise).
        evidence: bytes each kind must have done before the rates are trusted.
        reprobe: while zeroes go as data, every ``reprobe``-th zeroing request uses WRITE
            SAME again, to refresh its rate.
    """

    def __init__(
        self, *, margin: float = 2.0, evidence: int = 4 * 1024 * 1024, reprobe: int = 32
    ) -> None:
        self.margin = margin
        self.evidence = evidence
        self.reprobe = reprobe
        self._tally = {kind: _Tally() for kind in Kind}
        self._asked = 0

    def started(self, kind: Kind, now: float) -> None:
        """A command of ``kind`` was sent at ``now``."""
        t = self._tally[kind]
        if not t.in_flight:
            t.since = now
        t.in_flight += 1

    def finished(self, kind: Kind, nbytes: int, now: float) -> None:
        """A command of ``kind`` covering ``nbytes`` ended at ``now`` (0 bytes: it failed)."""
        t = self._tally[kind]
        t.in_flight -= 1
        t.done += nbytes
        if not t.in_flight:
            t.busy += now - t.since

    def rate(self, kind: Kind, now: float) -> float | None:
        """Bytes per busy second of ``kind`` so far; None until there is enough evidence."""
        t = self._tally[kind]
        return t.rate(now) if t.done >= self.evidence else None

    def zeroes_as_data(self, now: float) -> bool:
        """Whether the next zeroing request should send zero bytes with WRITE."""
        same = self.rate(Kind.WRITE_SAME, now)
        write = self.rate(Kind.WRITE, now)
        if same is None or write is None or write <= self.margin * same:
            self._asked = 0
            return False
        self._asked += 1
        return self._asked % self.reprobe != 0

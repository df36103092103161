"""Cache modes, with the meanings qemu-img gives them.

=============  ==========  =============  =====================================
mode           O_DIRECT    flush honoured  note
=============  ==========  =============  =====================================
writeback      no          yes            default for sources (``-T``)
unsafe         no          no             default for targets (``-t``)
none           yes         yes            bypasses the page cache
directsync     yes         every write    O_DIRECT | O_DSYNC
writethrough   no          every write    O_DSYNC
=============  ==========  =============  =====================================
"""

from __future__ import annotations

import enum

from ._errors import UsageError

__all__ = ["CacheMode"]


class CacheMode(enum.Enum):
    """How an image is opened with respect to the host page cache."""

    WRITEBACK = "writeback"
    UNSAFE = "unsafe"
    NONE = "none"
    DIRECTSYNC = "directsync"
    WRITETHROUGH = "writethrough"

    @property
    def direct(self) -> bool:
        """Open with O_DIRECT."""
        return self in (CacheMode.NONE, CacheMode.DIRECTSYNC)

    @property
    def dsync(self) -> bool:
        """Open with O_DSYNC: every write is durable when it completes."""
        return self in (CacheMode.DIRECTSYNC, CacheMode.WRITETHROUGH)

    @property
    def flush(self) -> bool:
        """Whether ``flush()`` reaches the disk (``unsafe`` ignores it)."""
        return self is not CacheMode.UNSAFE

    @classmethod
    def parse(cls, value: str | CacheMode, *, what: str = "cache") -> CacheMode:
        """Parse a cache mode name as ``-t``/``-T`` take it.

        Raises:
            UsageError: the name is not a cache mode.
        """
        if isinstance(value, CacheMode):
            return value
        if not isinstance(value, str):
            raise UsageError(f"Invalid {what} option: {value!r}")
        if value == "off":  # qemu's other name for none
            return CacheMode.NONE
        try:
            return cls(value)
        except ValueError:
            raise UsageError(f"Invalid {what} option: {value}") from None

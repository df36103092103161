"""XDR (RFC 4506), the wire encoding of ONC RPC and NFS, sans I/O.

XDR is simple: every item is a multiple of four bytes, big-endian. Integers are 4 bytes
(``int``/``unsigned int``/``enum``/``bool``) or 8 bytes (``hyper``/``unsigned hyper``);
``opaque<N>`` and ``string<N>`` are a 4-byte length, the bytes, and zero padding to the
next multiple of four; ``opaque[N]`` has a fixed length and no length word; an array
``T<N>`` is a 4-byte count followed by the items; an optional ``*T`` is a bool followed
by the item when true.

:class:`Packer` appends items to a list of byte strings that is joined once at the end,
and :class:`Unpacker` reads items from a ``memoryview`` with a cursor. Every length read
from the wire is checked against what is left *before* anything is sliced or allocated,
and against the declared maximum, so a hostile peer can make the decoder fail but never
allocate more than the record it already sent.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from typing import TypeVar

__all__ = ["Packer", "Unpacker", "XDRError", "pad"]

_T = TypeVar("_T")

_U32 = struct.Struct(">I")
_I32 = struct.Struct(">i")
_U64 = struct.Struct(">Q")
_I64 = struct.Struct(">q")
_PADS = (b"", b"\0\0\0", b"\0\0", b"\0")


class XDRError(Exception):
    """Bytes that are not valid XDR for the expected type (short, too long, bad value)."""


def pad(length: int) -> bytes:
    """The zero bytes that follow ``length`` bytes of opaque data."""
    return _PADS[length % 4]


class Packer:
    """Builds XDR: call ``pack_*`` in order, then :meth:`get_buffer` once."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []

    def get_buffer(self) -> bytes:
        """Everything packed so far, as one byte string."""
        return b"".join(self._parts)

    def pack_uint(self, value: int) -> None:
        """``unsigned int`` (also ``enum`` values, which are never negative here)."""
        if not 0 <= value < 1 << 32:
            raise XDRError(f"unsigned int out of range: {value}")
        self._parts.append(_U32.pack(value))

    def pack_int(self, value: int) -> None:
        if not -(1 << 31) <= value < 1 << 31:
            raise XDRError(f"int out of range: {value}")
        self._parts.append(_I32.pack(value))

    def pack_uhyper(self, value: int) -> None:
        if not 0 <= value < 1 << 64:
            raise XDRError(f"unsigned hyper out of range: {value}")
        self._parts.append(_U64.pack(value))

    def pack_hyper(self, value: int) -> None:
        if not -(1 << 63) <= value < 1 << 63:
            raise XDRError(f"hyper out of range: {value}")
        self._parts.append(_I64.pack(value))

    def pack_bool(self, value: bool) -> None:
        self._parts.append(_U32.pack(1 if value else 0))

    def pack_fopaque(self, size: int, data: bytes) -> None:
        """``opaque[size]``: exactly ``size`` bytes, padded."""
        if len(data) != size:
            raise XDRError(f"fixed opaque of {size} bytes given {len(data)}")
        self._parts.append(bytes(data) + pad(size))

    def pack_opaque(self, data: bytes, maximum: int = 0xFFFFFFFF) -> None:
        """``opaque<maximum>``: a length, the bytes, padding."""
        if len(data) > maximum:
            raise XDRError(f"opaque of {len(data)} bytes exceeds its maximum {maximum}")
        self._parts.append(_U32.pack(len(data)) + bytes(data) + pad(len(data)))

    def pack_string(self, text: str, maximum: int = 0xFFFFFFFF) -> None:
        """``string<maximum>``, UTF-8 encoded."""
        self.pack_opaque(text.encode("utf-8", "surrogateescape"), maximum)

    def pack_array(
        self, items: Sequence[_T], pack_item: Callable[[_T], None], maximum: int = 0xFFFFFFFF
    ) -> None:
        """``T<maximum>``: a count, then each item packed by ``pack_item``."""
        if len(items) > maximum:
            raise XDRError(f"array of {len(items)} items exceeds its maximum {maximum}")
        self.pack_uint(len(items))
        for item in items:
            pack_item(item)


class Unpacker:
    """Reads XDR items from ``data`` starting at ``offset``."""

    def __init__(self, data: bytes | bytearray | memoryview, offset: int = 0) -> None:
        self._data = memoryview(data).cast("B") if not isinstance(data, bytes) else data
        self.pos = offset

    @property
    def remaining(self) -> int:
        """Bytes not yet read."""
        return len(self._data) - self.pos

    def _take(self, n: int) -> bytes | memoryview:
        if n > len(self._data) - self.pos:
            raise XDRError(f"truncated: {n} bytes needed at byte {self.pos}, {self.remaining} left")
        start = self.pos
        self.pos += n
        return self._data[start : self.pos]

    def _word(self, fmt: struct.Struct) -> int:
        if fmt.size > len(self._data) - self.pos:
            raise XDRError(
                f"truncated: {fmt.size} bytes needed at byte {self.pos}, {self.remaining} left"
            )
        (value,) = fmt.unpack_from(self._data, self.pos)
        self.pos += fmt.size
        return int(value)

    def unpack_uint(self) -> int:
        return self._word(_U32)

    def unpack_int(self) -> int:
        return self._word(_I32)

    def unpack_uhyper(self) -> int:
        return self._word(_U64)

    def unpack_hyper(self) -> int:
        return self._word(_I64)

    def unpack_bool(self) -> bool:
        value = self._word(_U32)
        if value > 1:
            raise XDRError(f"bool must be 0 or 1, got {value} at byte {self.pos - 4}")
        return value == 1

    def unpack_fopaque_view(self, size: int) -> memoryview:
        """``opaque[size]`` as a view of the input (no copy)."""
        view = memoryview(self._take(size))
        self._take(-size % 4)
        return view

    def unpack_fopaque(self, size: int) -> bytes:
        return bytes(self.unpack_fopaque_view(size))

    def unpack_opaque_view(self, maximum: int = 0xFFFFFFFF) -> memoryview:
        """``opaque<maximum>`` as a view of the input (no copy)."""
        size = self.unpack_uint()
        if size > maximum:
            raise XDRError(f"opaque of {size} bytes exceeds its maximum {maximum}")
        return self.unpack_fopaque_view(size)

    def unpack_opaque(self, maximum: int = 0xFFFFFFFF) -> bytes:
        return bytes(self.unpack_opaque_view(maximum))

    def unpack_string(self, maximum: int = 0xFFFFFFFF) -> str:
        return self.unpack_opaque(maximum).decode("utf-8", "surrogateescape")

    def unpack_array(self, unpack_item: Callable[[], _T], maximum: int = 0xFFFFFFFF) -> list[_T]:
        """``T<maximum>``; refuses counts that cannot fit in what is left (4+ bytes each)."""
        count = self.unpack_uint()
        if count > maximum:
            raise XDRError(f"array of {count} items exceeds its maximum {maximum}")
        if count * 4 > self.remaining:
            raise XDRError(f"array of {count} items cannot fit in {self.remaining} bytes")
        return [unpack_item() for _ in range(count)]

    def done(self) -> None:
        """Check that every byte was consumed."""
        if self.pos != len(self._data):
            raise XDRError(f"{self.remaining} unexpected bytes after the last item")

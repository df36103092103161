"""Sizes as qemu-img writes them: ``4096``, ``4k``, ``1.5G``, ``10M``."""

from __future__ import annotations

import math
import re

from ._errors import UsageError

__all__ = ["format_size", "parse_size", "qemu_size_str"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "m": 1 << 20,
    "g": 1 << 30,
    "t": 1 << 40,
    "p": 1 << 50,
    "e": 1 << 60,
}
#: Compiled on first use (by ``re``'s cache), not at import: most runs never parse a size.
_SIZE_PATTERN = r"[ \t\n\v\f\r]*([0-9]+(?:\.[0-9]*)?)([bkmgtpeBKMGTPE]?)"


def parse_size(text: str | int, *, what: str = "size") -> int:
    """Parse a byte count with an optional binary suffix (b, k, M, G, T, P, E).

    Raises:
        UsageError: the text is not a size, or does not name a whole number of bytes.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        if text < 0:
            raise UsageError(f"Invalid {what} specified: {text}")
        return text
    if not isinstance(text, str):
        raise UsageError(
            f"Invalid {what} specified: {text!r} (a whole number of bytes or a size such as '4k')"
        )
    hexa = re.fullmatch(r"[ \t\n\v\f\r]*0[xX]([0-9a-fA-F]+)([bBkKmMgGtTpPeE]?)", text)
    if hexa:  # qemu takes hexadecimal sizes too (whole numbers only): 0x200, 0x10M
        return int(hexa.group(1), 16) * _UNITS[hexa.group(2).lower()]
    match = re.fullmatch(_SIZE_PATTERN, text)
    if not match:
        raise UsageError(
            f"Invalid {what} specified. Must be a non-negative number "
            f"followed by an optional suffix of K, M, G, T, P or E: '{text}'"
        )
    number, unit = match.groups()
    scale = _UNITS[unit.lower()]
    if "." in number:
        value = float(number) * scale
        if scale == 1 and not value.is_integer():
            raise UsageError(f"Invalid {what} specified: '{text}' is not a whole number of bytes")
        return int(value)
    return int(number) * scale


def format_size(value: float) -> str:
    """A size for people: ``1.5 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(value) < 1024 or unit == "PiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def qemu_size_str(value: int) -> str:
    """A size written as ``qemu-img info`` writes it: three significant digits, and the
    next binary unit from 1000 on (``6 MiB``, ``1.5 MiB``, ``0.977 GiB``)."""
    suffixes = ("", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei")
    if value <= 0:
        return "0 B"
    _, exponent = math.frexp(value / (1000.0 / 1024.0))
    i = min((exponent - 1) // 10, len(suffixes) - 1)
    return f"{value / (1 << (i * 10)):0.3g} {suffixes[i]}B"

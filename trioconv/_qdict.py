"""QEMU's JSON key order, for output that matches qemu-img's byte for byte.

QEMU prints a dictionary (a QDict) by walking its hash table bucket by bucket, so keys
come out in the order of their hash, not of insertion; qemu-img info's JSON and the
``json:{...}`` names QEMU makes for images both show it.
"""

from __future__ import annotations

import re

__all__ = ["qdict_bucket", "qemu_order"]


def qdict_bucket(key: str) -> int:
    """The bucket of ``key`` in a QEMU QDict (its ``tdb_hash`` modulo 512)."""
    raw = key.encode()
    value = (0x238F13AF * len(raw)) & 0xFFFFFFFF
    for i, byte in enumerate(raw):
        value = (value + (byte << (i * 5 % 24))) & 0xFFFFFFFF
    return ((1103515243 * value + 12345) & 0xFFFFFFFF) % 512


#: A line of indented JSON that ends in an empty list or object (a string value cannot:
#: it ends in a quote).
_EMPTY_JSON = re.compile(r'^( *)((?:"(?:[^"\\]|\\.)*": )?)(\[\]|\{\})(,?)$', re.MULTILINE)


#: A JSON escape: ``\\uXXXX``, or a backslash and one character. Read from left to
#: right, an escaped backslash followed by ``u`` is not taken for an escape of its own.
_ESCAPE = re.compile(r"\\(u[0-9a-fA-F]{4}|.)")


def _qemu_escapes(text: str) -> str:
    """JSON text (``ensure_ascii``) with QEMU's escapes: upper-case hex (``\\u00FC``),
    and U+FFFD for a byte of a file name that is not UTF-8.

    Python keeps such a byte as a lone surrogate (``\\udce9``, from ``surrogateescape``),
    which strict parsers refuse and which cannot be encoded again; QEMU prints the
    replacement character. A low surrogate right after a high one is half of a real
    character beyond the BMP and stays.
    """
    out: list[str] = []
    pos = 0
    high = False  # the escape just before this one was a high surrogate, adjacent
    for m in _ESCAPE.finditer(text):
        out.append(text[pos : m.start()])
        adjacent = high and m.start() == pos
        token = m[1]
        high = False
        if token[0] == "u":
            code = int(token[1:], 16)
            if 0xDC80 <= code <= 0xDCFF and not adjacent:
                code = 0xFFFD
            high = 0xD800 <= code <= 0xDBFF
            token = f"u{code:04X}"
        out.append("\\" + token)
        pos = m.end()
    out.append(text[pos:])
    return "".join(out)


def qemu_json(text: str) -> str:
    """Indented JSON as QEMU prints it: an empty list or object opens on its line and
    closes on the next (``"flags": [`` then ``]``), where Python writes ``[]``; escapes
    as QEMU writes them (:func:`_qemu_escapes`)."""
    text = _EMPTY_JSON.sub(lambda m: f"{m[1]}{m[2]}{m[3][0]}\n{m[1]}{m[3][1]}{m[4]}", text)
    return _qemu_escapes(text)


def qemu_order(value: object) -> object:
    """``value`` with every mapping's keys in the order QEMU prints them: bucket by
    bucket, the later key first within one."""
    if isinstance(value, dict):
        keys = list(value)[::-1]
        keys.sort(key=qdict_bucket)
        return {k: qemu_order(value[k]) for k in keys}
    if isinstance(value, list):
        return [qemu_order(v) for v in value]
    return value

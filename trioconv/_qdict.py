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


def qemu_json(text: str) -> str:
    """Indented JSON as QEMU prints it: an empty list or object opens on its line and
    closes on the next (``"flags": [`` then ``]``), where Python writes ``[]``."""
    return _EMPTY_JSON.sub(lambda m: f"{m[1]}{m[2]}{m[3][0]}\n{m[1]}{m[3][1]}{m[4]}", text)


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

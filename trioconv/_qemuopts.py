"""QemuOpts lists, the ``key=value,key=value`` text of ``-o``, ``--object`` and
``--image-opts``."""

from __future__ import annotations

__all__ = ["split_option_list"]


def split_option_list(text: str) -> list[str]:
    """Split ``a=b,c=d`` at single commas; ``,,`` stands for a comma in a value."""
    items: list[str] = []
    current: list[str] = []
    i = 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1 : i + 2] == ",":
                current.append(",")
                i += 2
                continue
            items.append("".join(current))
            current = []
        else:
            current.append(text[i])
        i += 1
    items.append("".join(current))
    return items

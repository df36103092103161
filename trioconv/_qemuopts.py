"""QemuOpts lists, the ``key=value,key=value`` text of ``-o``, ``--object`` and
``--image-opts``."""

from __future__ import annotations

from ._errors import UsageError

__all__ = ["parse_bool", "split_option_list"]

_ON = ("on", "yes", "true", "y")
_OFF = ("off", "no", "false", "n")


def parse_bool(key: str, value: str) -> bool:
    """A boolean option value as QEMU takes it: ``on``/``off``, ``yes``/``no``,
    ``true``/``false`` or ``y``/``n``, exactly (``ON`` or `` on`` is refused, as there).

    Raises:
        UsageError: anything else, in qemu-img's words.
    """
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise UsageError(f"Parameter '{key}' expects 'on' or 'off'")


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

"""QemuOpts lists, the ``key=value,key=value`` text of ``-o``, ``--object`` and
``--image-opts``."""

from __future__ import annotations

from ._errors import UsageError

__all__ = ["parse_bool", "split_option_list"]

_ON = ("on", "yes", "true", "y")
_OFF = ("off", "no", "false", "n")


def parse_bool(key: str, value: str, *, exact: bool = False) -> bool:
    """A boolean option value: ``on``/``off`` (or ``yes``/``no``, ``true``/``false``,
    ``y``/``n``), case and surrounding blanks aside unless ``exact``.

    Raises:
        UsageError: anything else, in qemu-img's words.
    """
    text = value if exact else value.strip().lower()
    if text in _ON:
        return True
    if text in _OFF:
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

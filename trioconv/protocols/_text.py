"""Text from the far side, made fit to print (no I/O here: the sans-I/O codecs use it)."""

from __future__ import annotations

__all__ = ["peer_text"]


def peer_text(raw: bytes | str, limit: int = 200) -> str:
    """Text a server sent (an error message), safe to print in one line of ours:
    control characters (newlines above all) escaped, at most ``limit`` characters."""
    text = raw.decode(errors="replace") if isinstance(raw, bytes) else raw
    text = text.strip()[: limit + 1]  # (one more than fits: the cut still shows)
    if text.isprintable() and len(text) <= limit:
        return text
    out = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return out if len(out) <= limit else out[: limit - 3] + "..."

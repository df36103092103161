"""On a terminal, ``-p`` draws a live bar with bytes, rate and ETA instead of qemu's text."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import time
from pathlib import Path

from .conftest import ImageMaker


def test_progress_bar_on_a_terminal(make_image: ImageMaker, tmp_path: Path) -> None:
    src = make_image("src.img", "8M", "write -P 0x5a 0 8M")
    dst = tmp_path / "dst.img"
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trioconv", "convert", "-p", "-r", "16M", src, dst],
            stdout=follower,
            stderr=subprocess.DEVNULL,
        )
        os.close(follower)
        output = b""
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # the terminal closed: the child has exited
                break
            if not chunk:
                break
            output += chunk
        assert proc.wait(timeout=30) == 0
    finally:
        os.close(leader)
    text = output.decode(errors="replace")
    assert "(0.00/100%)" not in text  # not the qemu-img text on a terminal
    assert "ETA" in text
    assert "100.00%" in text
    assert "/s" in text
    assert "8.00 MiB / 8.00 MiB" in text

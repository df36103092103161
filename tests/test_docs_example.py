"""The runnable example in the documentation runs and verifies its own copy."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

EXAMPLE = Path(__file__).resolve().parent.parent / "docs" / "example_convert.py"


def test_example_convert_runs() -> None:
    result = subprocess.run(
        [sys.executable, str(EXAMPLE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert "verified: copy.img is identical to source.img" in lines
    assert any(line.startswith("cancelled: True") for line in lines), result.stdout
    assert any(line.startswith("ConvertResult(total=16777216,") for line in lines), result.stdout

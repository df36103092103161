"""The public surface of ``import trioconv``: pinned, typed and documented."""

from __future__ import annotations

import inspect
import subprocess
import sys

import trioconv

PUBLIC = {
    "CacheMode",
    "Caps",
    "ConvertError",
    "ConvertOptions",
    "ConvertResult",
    "Driver",
    "Extent",
    "ExtentKind",
    "ImageError",
    "Limits",
    "MemoryDriver",
    "Progress",
    "TrioconvError",
    "TrioconvIOError",
    "UnsupportedError",
    "UsageError",
    "ZeroesNotSupported",
    "convert",
    "create_image",
    "open_image",
    "parse_size",
}


def test_public_names_are_exactly_these() -> None:
    names = {n for n in dir(trioconv) if not n.startswith("_")}
    modules = {n for n in names if inspect.ismodule(getattr(trioconv, n))}
    assert names - modules - {"annotations", "TYPE_CHECKING"} == PUBLIC
    assert set(trioconv.__all__) == PUBLIC
    assert trioconv.MemoryDriver.__name__ == "MemoryDriver"  # loaded on first use


def test_import_is_light() -> None:
    """``import trioconv`` loads no Trio (the command line handles Ctrl-C before it
    does); what needs Trio loads on first use."""
    code = (
        "import sys, trioconv; assert 'trio' not in sys.modules, 'trio'; "
        "trioconv.open_image; assert 'trio' in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names_are_documented() -> None:
    for name in PUBLIC:
        obj = getattr(trioconv, name)
        assert inspect.getdoc(obj), f"trioconv.{name} has no docstring"


def test_package_is_typed() -> None:
    from importlib.resources import files

    assert files("trioconv").joinpath("py.typed").is_file()

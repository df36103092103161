"""What a conversion should do: :class:`ConvertOptions`, with qemu-img's defaults and rules."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator, Mapping
from typing import Any

import attrs

from .._cache import CacheMode
from .._errors import UsageError
from .._sizes import parse_size

__all__ = ["ConvertOptions", "MAX_PARALLEL", "MAX_SPARSE_SIZE"]

#: Upper bound of ``-m``.
MAX_PARALLEL = 64
#: Upper bound of ``-S`` (qemu-img's MAX_BUF_SECTORS, 16 MiB).
MAX_SPARSE_SIZE = 32768 * 512
#: Default copy buffer size (qemu-img's 2 MiB).
DEFAULT_BUFFER_SIZE = 2 * 1024 * 1024


def _sparse(value: int | str) -> int:
    # Not a size at all: parse_size says how one is written, as qemu-img's cvtnum does.
    size = parse_size(value, what="buffer size for sparse output")
    if size < 0 or size % 512 or size > MAX_SPARSE_SIZE:
        raise UsageError(
            "Invalid buffer size for sparse output specified. Valid sizes are multiples of "
            f"512 up to {MAX_SPARSE_SIZE}. Select 0 to disable sparse detection "
            "(fully allocates output)."
        )
    return size


def _c_integer(text: str) -> int:
    """An integer as C's ``strtoul`` with base 0 reads it (qemu-img reads ``-m`` so):
    ``0x10`` is 16, ``010`` is 8, ``09`` is no number."""
    # Leading blanks and a plus sign, as strtoul; nothing after the digits, and only
    # ASCII digits (Python's int() would also take "1_0" and full-width digits).
    match = re.fullmatch(r"[ \t\n\v\f\r]*\+?(?:0[xX]([0-9a-fA-F]+)|(0[0-7]*)|([1-9][0-9]*))", text)
    if match is None:
        raise ValueError(text)
    hexa, octal, decimal = match.groups()
    if hexa is not None:
        return int(hexa, 16)
    if octal is not None:
        return int(octal, 8)
    return int(decimal, 10)


def _parallel(value: int | str) -> int:
    try:
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise ValueError(value)  # (a bool is an int to Python, not a count)
        count = value if isinstance(value, int) else _c_integer(value)
    except ValueError:
        count = 0
    if not 1 <= count <= MAX_PARALLEL:
        raise UsageError(
            f"Invalid number of coroutines: '{value}'. Allowed number of coroutines is "
            f"between 1 and {MAX_PARALLEL}"
        )
    return count


def _rate(value: int | str | None) -> int | None:
    if value is None:
        return None
    rate = parse_size(value, what="rate limit")
    if rate > 2**63 - 1:
        raise UsageError(f"Invalid rate limit specified. Must be between 0 and {2**63 - 1}.")
    return rate or None


def _cache_target(value: CacheMode | str) -> CacheMode:
    return CacheMode.parse(value, what="cache")


def _cache_source(value: CacheMode | str) -> CacheMode:
    return CacheMode.parse(value, what="source cache")


class _TargetOptions(Mapping[str, str]):
    """``-o`` options as a value: read-only, hashable, and copied or pickled like the
    rest of :class:`ConvertOptions` (a ``MappingProxyType`` is none of the last three).
    It equals any mapping with the same items, a plain ``dict`` included."""

    __slots__ = ("_items",)

    def __init__(self, items: Mapping[str, str]) -> None:
        self._items = dict(items)

    def __getitem__(self, key: str) -> str:
        return self._items[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __hash__(self) -> int:
        return hash(frozenset(self._items.items()))

    def __repr__(self) -> str:
        return repr(self._items)

    def __reduce__(self) -> tuple[type[_TargetOptions], tuple[dict[str, str]]]:
        return type(self), (self._items,)


def _mapping(value: Mapping[str, str] | None) -> Mapping[str, str]:
    if value is None:
        return _TargetOptions({})
    if not isinstance(value, Mapping):
        # (A string such as "cluster_size=64k" would otherwise be read as pairs of
        # characters, and a list of pairs is not what the type says.)
        raise UsageError(
            f"Invalid -o options {value!r}: give a mapping of names to strings, such as "
            "{'cluster_size': '64k'}"
        )
    for key, item in value.items():
        if not isinstance(key, str) or not isinstance(item, str):
            raise UsageError(
                f"Invalid -o option {key!r}: {item!r} (names and values are strings, "
                "as on the command line: 'on', '64k')"
            )
    return _TargetOptions(value)


def _flag(_: Any, field: attrs.Attribute[Any], value: object) -> None:
    """A switch is ``True`` or ``False``: ``"no"`` or ``0`` would be read as Python reads
    them, which is rarely what was meant."""
    if not isinstance(value, bool):
        raise UsageError(f"Invalid value for {field.name}: {value!r} (True or False)")


def _name(_: Any, field: attrs.Attribute[Any], value: object) -> None:
    """A format or snapshot name is a string (or None, for the default)."""
    if value is not None and not isinstance(value, str):
        raise UsageError(f"Invalid value for {field.name}: {value!r} (a string, or None)")


def _file_name(value: str | os.PathLike[str] | None) -> str | None:
    """A backing file's name, as a string: a path object is taken as the name it holds
    (stored as given, so a relative one stays relative)."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, os.PathLike):
        name = os.fspath(value)
        if isinstance(name, str):
            return name
    raise UsageError(f"Invalid value for backing_file: {value!r} (a file name, or None)")


def _buffer(value: int | str) -> int:
    size = parse_size(value, what="buffer size")
    if size < 512 or size % 512 or size > MAX_SPARSE_SIZE:
        raise UsageError(f"Invalid buffer size {size}: a multiple of 512 up to 16 MiB")
    return size


@attrs.frozen(kw_only=True)
class ConvertOptions:
    """Options of one conversion; each field is a ``qemu-img convert`` option.

    Values are checked when the object is made, so a bad value - or one of the wrong
    type, from untyped code - fails early with a :class:`~trioconv.UsageError` whose
    message says what to fix. Sizes accept qemu-img's suffixes (``"4k"``, ``"10M"``).

    The object is a value: immutable, compared and hashed by its fields, and it can be
    copied and pickled. ``attrs.evolve(options, parallel=16)`` makes a changed copy,
    checked like a new one.

    Attributes:
        source_format: ``-f``; probed when None.
        target_format: ``-O``; raw by default. None (with ``no_create`` only) takes the
            existing target's format as its ``json:`` options name it, or probes it, as
            ``qemu-img convert -n --target-image-opts`` does.
        target_options: ``-o`` as a mapping (``{"preallocation": "falloc"}``).
        source_cache: ``-T``; ``writeback`` by default.
        target_cache: ``-t``; ``unsafe`` by default (qemu-img's default for convert).
        sparse_size: ``-S``; runs of at least this many zero bytes inside data are not
            written (4 KiB by default; 0 writes a fully allocated target).
        no_create: ``-n``; write into an existing target, which must be large enough.
        target_is_zero: ``--target-is-zero``; the existing target already reads as zeroes.
        compress: ``-c``.
        parallel: ``-m``; copy tasks in flight, 1..64, 8 by default.
        oob_writes: ``-W``; let writes start out of order.
        copy_range: ``-C``; offload copies to the kernel where possible.
        rate_limit: ``-r``; bytes per second of writes, None for no limit.
        salvage: ``--salvage``; unreadable source ranges become zeroes, with a warning.
        backing_file / backing_format: ``-B``/``-b`` and ``-F``: the target is made an
            overlay on this file (stored as given, relative to the target's folder),
            as with ``-o backing_file=...,backing_fmt=...``, which they override. The
            file may be given as a path object; it is kept as its string.
        snapshot: ``-l``/``-s``.
        bitmaps: ``--bitmaps``.
        buffer_size: bytes per copy request (2 MiB, as qemu-img).
        connections: NBD connections per image when the server allows several
            (multi-conn); None means 4.
        force_share: ``-U``; read local sources even while another process (a running
            QEMU) writes them. Without it such a source is refused, as qemu-img does.
    """

    source_format: str | None = attrs.field(default=None, validator=_name)
    target_format: str | None = attrs.field(default="raw", validator=_name)
    target_options: Mapping[str, str] = attrs.field(factory=dict, converter=_mapping)
    source_cache: CacheMode = attrs.field(default=CacheMode.WRITEBACK, converter=_cache_source)
    target_cache: CacheMode = attrs.field(default=CacheMode.UNSAFE, converter=_cache_target)
    sparse_size: int = attrs.field(default=4096, converter=_sparse)
    no_create: bool = attrs.field(default=False, validator=_flag)
    target_is_zero: bool = attrs.field(default=False, validator=_flag)
    compress: bool = attrs.field(default=False, validator=_flag)
    parallel: int = attrs.field(default=8, converter=_parallel)
    oob_writes: bool = attrs.field(default=False, validator=_flag)
    copy_range: bool = attrs.field(default=False, validator=_flag)
    rate_limit: int | None = attrs.field(default=None, converter=_rate)
    salvage: bool = attrs.field(default=False, validator=_flag)
    backing_file: str | None = attrs.field(default=None, converter=_file_name)
    backing_format: str | None = attrs.field(default=None, validator=_name)
    snapshot: str | None = attrs.field(default=None, validator=_name)
    bitmaps: bool = attrs.field(default=False, validator=_flag)
    skip_broken_bitmaps: bool = attrs.field(default=False, validator=_flag)
    buffer_size: int = attrs.field(default=DEFAULT_BUFFER_SIZE, converter=_buffer)
    explicit_sparse_size: bool = attrs.field(default=False, validator=_flag)
    connections: int | None = None
    force_share: bool = attrs.field(default=False, validator=_flag)

    @property
    def target_backing_file(self) -> str | None:
        """The target's backing file: ``-B``, else ``-o backing_file`` (None: none).

        An empty name (``-B ''``, ``-o backing_file=``) is a backing file given, as
        qemu-img takes it (it then needs a backing format, and no image has that
        name)."""
        if self.backing_file is not None:
            return self.backing_file
        return self.target_options.get("backing_file")

    @property
    def target_backing_format(self) -> str | None:
        """The backing file's format: ``-F``, else ``-o backing_fmt`` (None: not given)."""
        if self.backing_format is not None:
            return self.backing_format
        return self.target_options.get("backing_fmt")

    def create_options(self) -> dict[str, str]:
        """``-o`` for creating the target, with ``-B``/``-F`` folded in (they win)."""
        out = dict(self.target_options)
        if self.backing_file is not None:
            out["backing_file"] = self.backing_file
        if self.backing_format is not None:
            out["backing_fmt"] = self.backing_format
        return out

    def __attrs_post_init__(self) -> None:
        if self.skip_broken_bitmaps and not self.bitmaps:
            raise UsageError("Use of --skip-broken-bitmaps requires --bitmaps")
        if self.compress and self.copy_range:
            raise UsageError("Cannot enable copy offloading when -c is used")
        if self.compress and self.target_options.get("preallocation", "off") != "off":
            raise UsageError("Compression and preallocation not supported at the same time")
        if self.explicit_sparse_size and self.copy_range:
            raise UsageError("Cannot enable copy offloading when -S is used")
        if self.copy_range and self.salvage:
            raise UsageError("Cannot use copy offloading in salvaging mode")
        if self.no_create and self.target_options:
            raise UsageError("-o has no effect when skipping image creation")
        if self.target_format is None and not self.no_create:
            raise UsageError("A target format is needed to create the target (or use -n)")
        if self.target_is_zero and not self.no_create:
            raise UsageError("--target-is-zero requires use of -n flag")
        if self.connections is not None and (
            not isinstance(self.connections, int)
            or isinstance(self.connections, bool)
            or not 1 <= self.connections <= 64
        ):
            raise UsageError("Invalid number of connections: must be between 1 and 64")

"""The ``trioconv`` command: ``convert`` and ``info``, spoken like ``qemu-img``.

Arguments are read the way qemu-img's getopt reads them - bundled flags (``-pW``),
attached values (``-m8``, ``-Oraw``), repeated ``-o`` - and then handed to cyclopts, so
a script written for ``qemu-img convert`` works with ``trioconv convert`` in its place.
Every error is one line on stderr and exit status 1; SIGINT, SIGTERM and SIGHUP cancel
the conversion cleanly (exit 130, 143, 129) and SIGUSR1 prints one progress line to stderr.

Start-up matters for a drop-in of a C tool, so this module imports only what every run
needs: the annotations are real objects (no ``from __future__ import annotations``), which
spares cyclopts an ``eval`` of every annotation string when it reads the commands'
signatures, and ``json`` and the progress renderer are imported where they are used.
"""

import contextlib
import io
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Literal

import cyclopts
import trio
from cyclopts import Parameter

from . import _open
from ._cache import CacheMode
from ._errors import ImageError, ImageInUse, TrioconvError, UsageError
from ._qdict import qemu_json
from ._qdict import qemu_order as _qemu_order
from ._qemuopts import split_option_list
from ._sizes import qemu_size_str
from .convert import ConvertOptions, Progress
from .convert import convert as run_convert
from .convert.options import DEFAULT_BUFFER_SIZE
from .driver import Driver
from .formats._common import beside

__all__ = ["app", "main", "normalize_argv"]

app = cyclopts.App(
    name="trioconv",
    help="Convert virtual-disk images between formats and storage back ends, fast.",
    # Worded as qemu-img's first line ("qemu-img version 7.2.0"), for scripts that look
    # for "version N.N.N".
    version=lambda: f"trioconv version {__import__('trioconv').__version__}",
    # Printed as is: the default (markdown) imports rich.markdown, ~35 ms, for "0.1.0".
    version_format="plaintext",
    version_flags=["--version", "-V"],  # (qemu-img -V too)
    help_on_error=False,
)

#: Every option of each command: its spellings (the first is the one handed on to
#: cyclopts) and whether it takes a value. A test keeps this in step with the
#: signatures of :func:`convert` and :func:`info`.
_OPTIONS: dict[str, tuple[tuple[tuple[str, ...], bool], ...]] = {
    "convert": (
        (("-f", "--source-format"), True),
        (("-O", "--target-format", "--output-format"), True),
        (("-o", "--target-format-options", "--options"), True),
        (("-T", "--source-cache"), True),
        (("-t", "--target-cache", "--output-cache"), True),
        (("-B", "-b", "--backing"), True),
        (("-F", "--backing-format"), True),
        (("-l", "-s", "--snapshot"), True),
        (("-S", "--sparse-size"), True),
        (("-m", "--parallel"), True),
        (("-r", "--rate-limit", "--rate"), True),
        (("--progress-style",), True),
        (("--object",), True),
        (("--connections",), True),
        (("-c", "--compress"), False),
        (("-p", "--progress"), False),
        (("-q", "--quiet"), False),
        (("-n", "--no-create"), False),
        (("-W", "--oob-writes"), False),
        (("-U", "--force-share"), False),
        (("-C", "--copy-range-offloading"), False),
        (("--salvage",), False),
        (("--target-is-zero",), False),
        (("--bitmaps",), False),
        (("--skip-broken-bitmaps",), False),
        (("--image-opts",), False),
        (("--target-image-opts",), False),
        (("-h", "--help"), False),
    ),
    "info": (
        (("-f", "--format"), True),
        (("--output",), True),
        (("--object",), True),
        (("--backing-chain",), False),
        (("-U", "--force-share"), False),
        (("--image-opts",), False),
        (("-h", "--help"), False),
    ),
}
#: Options whose values add up (``-o a=1 -o b=2``); any other given twice keeps the last
#: value, as with qemu-img's getopt loop.
_REPEATABLE = {"-o", "--object"}


#: qemu-img 7.2's own long options: a beginning that names one of them unambiguously
#: there means that one here too, even where trioconv's extra long names make it
#: ambiguous (``--b`` is ``--bitmaps``, ``--o`` is ``--object``, as for qemu-img).
_QEMU_LONGS: dict[str, tuple[str, ...]] = {
    "convert": (
        "--help",
        "--object",
        "--image-opts",
        "--target-image-opts",
        "--force-share",
        "--salvage",
        "--target-is-zero",
        "--bitmaps",
        "--skip-broken-bitmaps",
    ),
    "info": (
        "--help",
        "--format",
        "--output",
        "--object",
        "--backing-chain",
        "--force-share",
        "--image-opts",
    ),
}


def _long_option(name: str, known: Sequence[str], qemu: Sequence[str] = ()) -> str:
    """The long option ``name`` stands for: itself, or as getopt_long allows, the one
    known option it is an unambiguous beginning of (among qemu-img's own first)."""
    if name in known:
        return name
    matches = [k for k in known if k.startswith(name)]
    if len(matches) == 1:
        return matches[0]
    theirs = [k for k in qemu if k.startswith(name)]
    if len(theirs) == 1:
        return theirs[0]
    if matches:
        raise UsageError(f"option '{name}' is ambiguous; possibilities: {' '.join(matches)}")
    raise UsageError(f"unrecognized option '{name}'")


def normalize_argv(argv: Sequence[str]) -> list[str]:
    """Rewrite qemu-img style arguments into one token per option, options first.

    ``-pWm8`` becomes ``-p -W --parallel=8``; ``--progress=json`` becomes ``-p
    --progress-style=json``; ``--salv`` becomes ``--salvage``. As with qemu-img's
    getopt, options may come after file names (``convert a.qcow2 -O raw b.raw``): the
    file names move behind the options, in their order. Everything after ``--`` is a
    file name. An option given twice keeps its last value (``-o`` adds up), and one that
    lacks its value is an error.
    """
    command = argv[0] if argv else ""
    spec = _OPTIONS.get(command)
    if spec is None:
        return list(argv)
    canonical = {name: names[0] for names, _ in spec for name in names}
    valued = {name for names, takes in spec if takes for name in names}
    # A value goes on as ``--long=value``, one token: a value that looks like an option
    # (``-B -base.qcow2``, ``-l --help``) is still the value, as getopt takes it.
    long_of = {names[0]: next(n for n in names if n.startswith("--")) for names, _ in spec}
    longs = [name for name in canonical if name.startswith("--")]
    given: dict[str, str | None] = {}  # canonical name -> last value, in first-seen order
    repeated: list[tuple[str, str]] = []
    files: list[str] = []
    args = iter(argv[1:])

    def option(name: str, value: str | None) -> None:
        name = canonical[name]
        if name in _REPEATABLE and value is not None:
            repeated.append((name, value))
        else:
            given.pop(name, None)  # qemu-img reads the last one
            given[name] = value

    def value_of(shown: str, attached: str | None) -> str:
        if attached is not None:
            return attached
        value = next(args, None)
        if value is None:
            raise UsageError(f"missing argument for option '{shown}'")
        return value

    for arg in args:
        if arg == "--":
            files.extend(args)
            break
        if arg.startswith("--"):
            typed, eq, attached = arg.partition("=")
            if command == "convert" and typed == "--progress" and eq:
                option("-p", None)
                option("--progress-style", attached)
                continue
            name = _long_option(typed, longs, _QEMU_LONGS.get(command, ()))
            if name in valued:
                option(name, value_of(typed, attached if eq else None))
            elif eq:
                raise UsageError(f"option '{name}' doesn't allow an argument")
            else:
                option(name, None)
            continue
        if arg.startswith("-") and len(arg) >= 2:
            i = 1
            while i < len(arg):
                name = "-" + arg[i]
                if name not in canonical:
                    raise UsageError(f"invalid option -- '{arg[i]}'")
                if name in valued:
                    option(name, value_of(name, arg[i + 1 :] or None))
                    break
                option(name, None)
                i += 1
            continue
        files.append(arg)
    out = [command]
    for name, value in given.items():
        out.append(name if value is None else f"{long_of[name]}={value}")
    for name, value in repeated:
        out.append(f"{long_of[name]}={value}")
    if any(f.startswith("-") for f in files):
        out.append("--")
    return out + files


def _parse_o(values: Sequence[str]) -> dict[str, str]:
    """Parse ``-o a=b,c=d`` (repeatable) into a mapping; ``help`` maps to ``"help"``."""
    opts: dict[str, str] = {}
    for value in values:
        items = split_option_list(value)
        if any(not item for item in items):
            raise UsageError(f"Invalid option list: {value}")
        for item in items:
            key, _, val = item.partition("=")
            opts[key] = val if _ else ("help" if key in ("help", "?") else "on")
    return opts


def _say(message: str) -> None:
    """One line on stderr; nothing when stderr is closed (never on stdout instead).

    A file name's bytes that are not UTF-8 (kept by Python as lone surrogates) are
    written back as the bytes they were, as qemu-img writes the name, not as
    ``\\udce9``.
    """
    if sys.stderr is None:
        return
    line = message + "\n"
    encoding = getattr(sys.stderr, "encoding", None) or "utf-8"
    try:
        data = line.encode(encoding, "surrogateescape")
    except UnicodeEncodeError:  # a character this stderr cannot show, as Python shows it
        data = line.encode(encoding, "backslashreplace")
    with contextlib.suppress(OSError, ValueError):  # (ValueError: stderr closed)
        buffer = getattr(sys.stderr, "buffer", None)
        if buffer is None:  # a text-only stream put in its place (tests, IDEs)
            print(message, file=sys.stderr, flush=True)
            return
        sys.stderr.flush()
        buffer.write(data)
        buffer.flush()


def _stdout_gone() -> None:
    """stdout failed (a closed pipe, a full disk): send the rest to /dev/null, as a C
    tool that ignores its write errors would, so exiting does not fail on it again."""
    with contextlib.suppress(OSError, ValueError, AttributeError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)


def _emit(text: str) -> None:
    """Print ``text`` on stdout; a stdout that cannot take it is not an error (qemu-img
    ignores it too)."""
    if sys.stdout is None:
        return
    try:
        sys.stdout.write(text)
        sys.stdout.flush()
    except OSError:
        _stdout_gone()


#: The signals that stop a conversion cleanly, and end the process by themselves after.
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

#: True when this process is the ``trioconv`` program (not a caller of :func:`main`):
#: then a stop signal that comes once a conversion is over is ignored until the end.
_AS_PROGRAM = False


async def _supervise(work: Callable[[], Awaitable[None]], progress: Progress | None) -> int:
    """Run ``work`` until it ends or a signal stops it; return the exit status.

    The first SIGINT, SIGTERM or SIGHUP (the terminal went away) cancels the work,
    which then cleans up (a target it created is removed); signals that come while it
    does are taken and ignored, so a second Ctrl-C does not cut the cleanup short. A
    signal the process was started ignoring (``nohup``, a shell's background job) stays
    ignored.
    """
    status = 0
    work_scope = trio.CancelScope()
    stops = [s for s in _STOP_SIGNALS if signal.getsignal(s) != signal.SIG_IGN]

    async def watch_signals(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        nonlocal status
        try:
            with trio.open_signal_receiver(*stops, signal.SIGUSR1) as sigs:
                task_status.started()
                async for signum in sigs:
                    if signum == signal.SIGUSR1:
                        if progress is not None:
                            from ._progress_view import qemu_line

                            _say(qemu_line(progress))
                    elif not status:
                        status = 128 + signum
                        work_scope.cancel()
        finally:
            if _AS_PROGRAM:
                # The work is over: the target is complete, or already removed, and the
                # process is about to end, so a late signal changes nothing (and does
                # not say "interrupted" a second time).
                for signum in stops:
                    signal.signal(signum, signal.SIG_IGN)

    async with trio.open_nursery() as nursery:
        await nursery.start(watch_signals)
        try:
            with work_scope:
                await work()
        except Exception:
            # After a signal, an error is the cancellation's doing (a connection given
            # up while requests waited on it): the interruption is what happened.
            if not status:
                raise
        nursery.cancel_scope.cancel()
    if status:
        name = signal.Signals(status - 128).name
        _say(f"trioconv: interrupted by {name}")
    return status


@app.command
async def convert(
    files: Annotated[
        tuple[str, ...], Parameter(name="FILES", help="source image(s), then the target")
    ] = (),
    /,
    *,
    source_format: Annotated[str | None, Parameter(name=["-f", "--source-format"])] = None,
    target_format: Annotated[
        str | None, Parameter(name=["-O", "--target-format", "--output-format"])
    ] = None,
    options: Annotated[
        list[str] | None,
        Parameter(name=["-o", "--target-format-options", "--options"], negative_iterable=""),
    ] = None,
    source_cache: Annotated[str, Parameter(name=["-T", "--source-cache"])] = "writeback",
    target_cache: Annotated[
        str, Parameter(name=["-t", "--target-cache", "--output-cache"])
    ] = "unsafe",
    backing: Annotated[str | None, Parameter(name=["-B", "-b", "--backing"])] = None,
    backing_format: Annotated[str | None, Parameter(name=["-F", "--backing-format"])] = None,
    snapshot: Annotated[str | None, Parameter(name=["-l", "-s", "--snapshot"])] = None,
    sparse_size: Annotated[str | None, Parameter(name=["-S", "--sparse-size"])] = None,
    parallel: Annotated[str, Parameter(name=["-m", "--parallel"])] = "8",
    rate_limit: Annotated[str | None, Parameter(name=["-r", "--rate-limit", "--rate"])] = None,
    compress: Annotated[bool, Parameter(name=["-c", "--compress"], negative="")] = False,
    progress: Annotated[bool, Parameter(name=["-p", "--progress"], negative="")] = False,
    progress_style: Annotated[
        Literal["auto", "qemu", "bar", "json"], Parameter(name="--progress-style")
    ] = "auto",
    quiet: Annotated[bool, Parameter(name=["-q", "--quiet"], negative="")] = False,
    no_create: Annotated[bool, Parameter(name=["-n", "--no-create"], negative="")] = False,
    oob_writes: Annotated[bool, Parameter(name=["-W", "--oob-writes"], negative="")] = False,
    force_share: Annotated[bool, Parameter(name=["-U", "--force-share"], negative="")] = False,
    copy_range: Annotated[
        bool, Parameter(name=["-C", "--copy-range-offloading"], negative="")
    ] = False,
    salvage: Annotated[bool, Parameter(name="--salvage", negative="")] = False,
    target_is_zero: Annotated[bool, Parameter(name="--target-is-zero", negative="")] = False,
    bitmaps: Annotated[bool, Parameter(name="--bitmaps", negative="")] = False,
    skip_broken_bitmaps: Annotated[
        bool, Parameter(name="--skip-broken-bitmaps", negative="")
    ] = False,
    image_opts: Annotated[bool, Parameter(name="--image-opts", negative="")] = False,
    target_image_opts: Annotated[bool, Parameter(name="--target-image-opts", negative="")] = False,
    object_: Annotated[list[str] | None, Parameter(name="--object", negative_iterable="")] = None,
    connections: Annotated[int | None, Parameter(name="--connections")] = None,
) -> int:
    """Convert FILES (one or more sources, concatenated) into the last one, like qemu-img convert.

    Same options, meanings and defaults as ``qemu-img convert``: ``-m`` copy requests in
    flight (default 8), ``-W`` out-of-order writes, ``-S`` sparse size (default 4k),
    ``-t`` target cache (default unsafe), ``-T`` source cache (default writeback).
    Sources and target may be NBD URIs (``nbd://host/export``,
    ``nbd+unix:///export?socket=PATH``); ``--connections N`` sets how many connections
    to use when an NBD server allows several (default 4).

    ``--image-opts`` / ``--target-image-opts`` take QEMU block options instead of file
    names (``driver=qcow2,file.filename=disk.qcow2``), and ``--object`` defines the
    secrets and TLS credentials they refer to, as with qemu-img.
    """
    if _define_objects(object_):
        return 0
    if target_image_opts and not no_create:
        raise UsageError("--target-image-opts requires use of -n flag")
    if (image_opts and source_format is not None) or (
        target_image_opts and target_format is not None
    ):
        raise UsageError("--image-opts and --format are mutually exclusive")
    if files and (image_opts or target_image_opts):
        files = _as_json_filenames(files, sources=image_opts, target=target_image_opts)
    # x:y.raw is protocol x, as qemu-img reads it - but not a source whose protocol is
    # given (-f file): that one is the name the protocol takes as it is.
    for i, name in enumerate(files):
        if i == len(files) - 1 or source_format not in _PROTOCOL_FORMATS:
            _open.refuse_unknown_protocol(name, target=i == len(files) - 1 and len(files) > 1)
    if source_format in _PROTOCOL_FORMATS:
        protocol, source_format = source_format, None
        files = (*(_protocol_as_format(f, protocol) for f in files[:-1]), *files[-1:])
    if target_format in _PROTOCOL_FORMATS:
        if target_format != "file" and files:
            _require_device(files[-1], target_format)
        target_format = "raw"  # qemu-img writes the same bytes either way
    o = _parse_o(options or [])
    fmt: str | None = target_format if target_format is not None else "raw"
    if target_image_opts:
        fmt = None  # the target's options name its format, or it is probed
    opts = ConvertOptions(
        source_format=source_format,
        target_format=fmt,
        target_options=o,
        source_cache=source_cache,
        target_cache=target_cache,
        sparse_size=sparse_size if sparse_size is not None else 4096,
        explicit_sparse_size=sparse_size is not None,
        no_create=no_create,
        target_is_zero=target_is_zero,
        compress=compress,
        parallel=parallel,
        oob_writes=oob_writes,
        copy_range=copy_range,
        rate_limit=rate_limit,
        salvage=salvage,
        backing_file=backing,
        backing_format=backing_format,
        snapshot=snapshot,
        bitmaps=bitmaps,
        skip_broken_bitmaps=skip_broken_bitmaps,
        buffer_size=DEFAULT_BUFFER_SIZE,
        connections=connections,
        force_share=force_share,
    )
    # Like qemu-img, ``-o help`` is answered once the flags have passed their checks.
    if o.get("help") == "help" or "?" in o:
        if no_create:
            raise UsageError("-o has no effect when skipping image creation")
        _emit(_open.create_options_help(fmt or "raw", with_files=len(files) >= 2) + "\n")
        return 0
    if len(files) < 2:
        raise UsageError(
            "Expecting a source image and a target image"
            if files
            else "Must specify image file name"
        )
    show = progress and not quiet and sys.stdout is not None
    style = progress_style
    if style == "auto":
        style = "bar" if show and sys.stdout.isatty() else "qemu"
    stats = Progress()
    # The data to copy is measured for a percentage someone sees (-p); SIGUSR1 alone
    # shows the share of the whole size.
    stats._wants_data = show

    async def work() -> None:
        ok = False
        try:
            async with trio.open_nursery() as nursery:
                if show:
                    from ._progress_view import render  # trio_util and json: only with -p

                    nursery.start_soon(render, stats, style, None, _stdout_gone)
                await run_convert(files[:-1], files[-1], opts, progress=stats)
            ok = True
        finally:
            if show and style == "qemu":
                from ._progress_view import qemu_line

                # qemu-img ends with the last line once more, or after a failure with
                # what it showed; then a newline.
                _emit(qemu_line(stats) + "\r\n" if ok else "\n")
            elif show and style == "bar":
                _emit("\n")

    return await _supervise(work, stats)


#: ``--object TYPE,help``: the properties of the types trioconv implements, as qemu-img
#: lists them.
_OBJECT_PROPERTIES = {
    "secret": (
        "data=<string>",
        "file=<string>",
        "format=<QCryptoSecretFormat>",
        "iv=<string>",
        "keyid=<string>",
    ),
    "tls-creds-x509": (
        "dir=<string>",
        "endpoint=<QCryptoTLSCredsEndpoint>",
        "passwordid=<string>",
        "priority=<string>",
        "sanity-check=<bool>",
        "verify-peer=<bool>",
    ),
}


def _define_objects(values: Sequence[str] | None) -> bool:
    """``--object``: define the secrets and TLS credentials block options refer to.

    Returns True when ``--object help`` listed the types instead (nothing else to do).
    """
    if not values:
        return False
    from . import _blockopts

    if "help" in values or "?" in values:
        _emit("List of user creatable objects:\n  secret\n  tls-creds-x509\n")
        return True
    for value in values:
        kind, _, rest = value.partition(",")
        if rest in ("help", "?") and kind in _OBJECT_PROPERTIES:
            lines = [f"{kind} options:"] + [f"  {p}" for p in _OBJECT_PROPERTIES[kind]]
            _emit("\n".join(lines) + "\n")
            return True
    _blockopts.use_objects([_blockopts.parse_object(v) for v in values])
    return False


def _as_json_filenames(files: Sequence[str], *, sources: bool, target: bool) -> tuple[str, ...]:
    """``--image-opts`` / ``--target-image-opts``: the option strings among ``files``
    checked and turned into the ``json:`` filenames they stand for."""
    from . import _blockopts

    out = list(files)
    last = len(out) - 1
    for i, text in enumerate(out):
        if (sources and i < last) or (target and i == last) or (sources and last == 0):
            out[i] = _blockopts.image_opts_to_json(text)
    return tuple(out)


#: Protocol drivers that qemu-img also takes as a format (``-f file``): the file's bytes
#: as they are, which is what the raw format gives.
_PROTOCOL_FORMATS = ("file", "host_device", "host_cdrom")


def _protocol_as_format(location: str, protocol: str) -> str:
    """``-f file`` (or ``host_device``, ``host_cdrom``) on a file name: the ``json:``
    filename of that protocol node, which reads the file's bytes and is shown as
    qemu-img shows it (``file format: file``)."""
    from . import _blockopts

    if location.startswith("json:") or "://" in location:
        return location  # (the options or the URI name their own driver)
    return _blockopts.protocol_node_json(location, protocol)


def _require_device(target: str, protocol: str) -> None:
    """``-O host_device``: the target must be a device that exists (the protocol creates
    nothing), as qemu-img requires."""
    import stat

    path = _local_path(target)
    if path is None:
        return  # (a URI names its own driver)
    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise ImageError(f"Could not open '{target}': {exc.strerror}") from None
    if not (stat.S_ISBLK(mode) or stat.S_ISCHR(mode)):
        raise ImageError(
            f"Could not open '{target}': '{protocol}' driver requires '{target}' to be "
            "either a character or block device"
        )


def _local_path(location: str) -> str | None:
    if "://" in location:
        return None
    return location[5:] if location.startswith("file:") else location


def _plain_file_name(location: str) -> str:
    """A ``file:``-prefixed name as QEMU shows it: without the prefix, and with ``./``
    in front of a relative name that would otherwise read as ``protocol:...``."""
    name = location[5:]
    head = name.split("/", 1)[0]
    return f"./{name}" if ":" in head else name


def _chain_key(location: str) -> str:
    """What makes two names of a backing chain the same image (a local file's real path)."""
    path = _local_path(location)
    return os.path.realpath(path) if path is not None and "\0" not in path else location


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _nbd_name(uri: str) -> str:
    """An NBD URI as QEMU names the image (no ``/`` without an export; TLS URIs, which
    qemu-img does not take, as given)."""
    from .protocols.nbd import parse_nbd_uri

    address = parse_nbd_uri(uri)
    if address.tls:
        return uri
    export = "/" + address.export if address.export else ""
    if address.socket is not None:
        return f"nbd+unix://{export}?socket={address.socket}"
    host = f"[{address.host}]" if address.host and ":" in address.host else address.host
    return f"nbd://{host}:{address.port}{export}"


def _nfs_name(uri: str) -> str:
    """An NFS URL as QEMU names the image: the path decoded, the port and the tuning
    parameters left out, ``uid`` and ``gid`` kept when given and not 0. (A URL it
    cannot take is shown as given; opening it says what is wrong.)"""
    import urllib.parse

    try:
        parts = urllib.parse.urlsplit(uri)
        host = parts.hostname
        query = urllib.parse.parse_qs(parts.query)
        ids = {key: int(query[key][-1]) for key in ("uid", "gid") if key in query}
    except ValueError:
        return uri
    if not host:
        return uri
    if ":" in host:
        host = f"[{host}]"
    extra = "&".join(f"{key}={value}" for key, value in ids.items() if value)
    return f"nfs://{host}{urllib.parse.unquote(parts.path)}" + (f"?{extra}" if extra else "")


def _bottom(drv: Driver) -> Driver:
    """The transport at the bottom of a driver stack."""
    layer = drv
    while (child := getattr(layer, "child", None)) is not None:
        layer = child
    return layer


def _file_under(drv: Driver) -> str | None:
    """The local file at the bottom of a driver stack (block options name an image
    by its options, not its file), or None."""
    from .protocols.file import FileDriver

    bottom = _bottom(drv)
    return bottom.location if isinstance(bottom, FileDriver) else None


def _info_dict(drv: Driver) -> dict[str, object]:
    """qemu-img info's JSON for one image (keys in qemu's order where it matters)."""
    info: dict[str, object] = {
        "virtual-size": drv.size,
        "filename": drv.location,
        "format": drv.name,
    }
    path = _local_path(drv.location)
    if path is None or path.startswith("json:"):
        path = _file_under(drv)
    if path is not None:
        with contextlib.suppress(OSError):
            info["actual-size"] = os.stat(path).st_blocks * 512
    elif _bottom(drv).name in ("null-co", "null-aio"):
        info["actual-size"] = 0  # a null device holds nothing
    elif isinstance(used := getattr(_bottom(drv), "allocated", None), int):
        info["actual-size"] = used  # what an NFS server says the file takes
    if drv.name != "raw" or _file_under(drv) is not None or _bottom(drv).name == "iscsi":
        # (QEMU has it where the protocol gives block info: files and iSCSI LUNs.)
        info["dirty-flag"] = False
    if drv.limits.cluster_size:
        info["cluster-size"] = drv.limits.cluster_size
    info.update(drv.describe())
    for key in [key for key, value in info.items() if value is None]:
        del info[key]  # (a format withdraws a key it does not have)
    return info


def _left(value: object, width: int) -> str:
    """``value`` padded on the right as C's ``printf("%-*s")`` pads it: to ``width``
    bytes, not characters (``ü`` is two bytes of UTF-8, so it gets one space fewer than
    ``u``), and never cut when it is longer. A byte of a name that is not UTF-8 (kept
    as a lone surrogate) counts as the one byte qemu-img prints."""
    text = str(value)
    try:
        size = len(text.encode("utf-8", "surrogateescape"))
    except UnicodeEncodeError:  # (a surrogate no byte stands for: count characters)
        size = len(text)
    return text + " " * (width - size)


def _snapshot_line(snap: dict[str, object]) -> str:
    """One row of qemu-img info's snapshot table, laid out as qemu-img 7.2 prints it
    (``"%-9s %-16s %8s%20s%13s%11s"``, under the header's ``"%-10s%-17s%8s..."``): a
    space always follows the ID and the tag, so a longer one (more than 9 or 16 bytes)
    pushes the rest of its row right and never runs into the next column."""
    date = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(int(str(snap["date-sec"]))))
    secs = int(str(snap["vm-clock-sec"]))
    clock = f"{secs // 3600:02d}:{secs // 60 % 60:02d}:{secs % 60:02d}."
    clock += f"{int(str(snap['vm-clock-nsec'])) // 1_000_000:03d}"
    icount = snap.get("icount", "")
    vm_size = qemu_size_str(int(str(snap["vm-state-size"])))
    ident, name = _left(snap["id"], 9), _left(snap["name"], 16)
    return f"{ident} {name} {vm_size:>8}{date:>20}{clock:>13}{icount!s:>11}"


_HUMAN_KEYS = {
    "backing-filename": "backing file",
    "backing-filename-format": "backing file format",
}


def _print_human(data: dict[str, object]) -> None:
    """One image of qemu-img info's human text, laid out from its JSON document alone:
    the fixed lines (image, format, sizes), then those of the keys present in qemu-img's
    order (``encrypted: yes``, cluster size, ``cleanly shut down: no``, backing file and
    format), the snapshot table and the format-specific data. Any document qemu-img
    itself prints as JSON comes out as qemu-img prints it as text."""
    vsize = int(str(data["virtual-size"]))
    print(f"image: {data['filename']}")
    print(f"file format: {data['format']}")
    print(f"virtual size: {qemu_size_str(vsize)} ({vsize} bytes)")
    if "actual-size" in data:
        print(f"disk size: {qemu_size_str(int(str(data['actual-size'])))}")
    else:
        print("disk size: unavailable")
    if data.get("encrypted") is True:
        print("encrypted: yes")
    if "cluster-size" in data:
        print(f"cluster_size: {data['cluster-size']}")
    if data.get("dirty-flag") is True:
        print("cleanly shut down: no")
    for key, label in _HUMAN_KEYS.items():
        if key in data:
            suffix = ""
            if key == "backing-filename" and "full-backing-filename" in data:
                full = data["full-backing-filename"]
                suffix = f" (actual path: {full})" if full != data[key] else ""
            elif key == "backing-filename":
                suffix = " (cannot determine actual path)"
            print(f"{label}: {data[key]}{suffix}")
    snaps = data.get("snapshots")
    if isinstance(snaps, list) and snaps:
        print("Snapshot list:")
        print(f"{'ID':<10}{'TAG':<18}{'VM SIZE':>7}{'DATE':>20}{'VM CLOCK':>13}{'ICOUNT':>11}")
        for snap in snaps:
            print(_snapshot_line(snap))
    specific = data.get("format-specific")
    if isinstance(specific, dict) and isinstance(specific.get("data"), dict):
        print("Format specific information:")
        _print_nested(specific["data"], 1)


def _print_nested(value: object, depth: int) -> None:
    """qemu-img info's human layout of format-specific data: dicts as ``key: value``
    lines, lists as ``[N]:`` items, four spaces deeper per level."""
    pad = "    " * depth
    items: list[tuple[object, object]] = []
    if isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, list):
        items = list(enumerate(value))
    for key, item in items:
        label = f"[{key}]" if isinstance(key, int) else str(key).replace("-", " ")
        if isinstance(item, (dict, list)):
            print(f"{pad}{label}:")
            _print_nested(item, depth + 1)
        else:
            text = str(item).lower() if isinstance(item, bool) else item
            print(f"{pad}{label}: {text}")


@app.command
async def info(
    *images: str,
    fmt: Annotated[str | None, Parameter(name=["-f", "--format"])] = None,
    output: Annotated[str, Parameter(name="--output")] = "human",
    backing_chain: Annotated[bool, Parameter(name="--backing-chain", negative="")] = False,
    force_share: Annotated[bool, Parameter(name=["-U", "--force-share"], negative="")] = False,
    image_opts: Annotated[bool, Parameter(name="--image-opts", negative="")] = False,
    object_: Annotated[list[str] | None, Parameter(name="--object", negative_iterable="")] = None,
) -> int:
    """Show an image's format, sizes and format details, like qemu-img info.

    With ``--backing-chain``, every image of the backing chain, top first.
    """
    if _define_objects(object_):
        return 0
    if len(images) != 1:
        raise UsageError("Expecting one image file name")
    if output not in ("human", "json"):
        raise UsageError("--output must be used with human or json as argument.")
    image = shown = images[0]
    if not image_opts and fmt not in _PROTOCOL_FORMATS:
        _open.refuse_unknown_protocol(image)
        image = os.fspath(_open.legacy_nbd_name(image))  # (nbd:unix:PATH:exportname=X)
    if fmt in _PROTOCOL_FORMATS and not image_opts:
        image, fmt = _protocol_as_format(image, fmt), None
    protocol: str | None = None
    if image_opts:
        from . import _blockopts

        if fmt is not None:
            raise UsageError("--image-opts and --format are mutually exclusive")
        image = _blockopts.image_opts_to_json(image)
    if image.startswith("json:"):
        from . import _blockopts

        spec = _blockopts.resolve_json(image, fmt)
        shown = spec.name  # as QEMU names it
        if _open.is_nbd_uri(shown):
            shown = _nbd_name(shown)  # (an export's URI, as for one given as is)
        if fmt is None and spec.inner is None and spec.fmt == "raw":
            # A protocol driver at the top: QEMU shows it as the format.
            top = _blockopts.parse_json_filename(image).get("driver")
            protocol = top if top != "raw" else None
    elif _open.is_nbd_uri(image):
        shown = _nbd_name(image)
    elif image.lower().startswith("nfs://"):
        shown = _nfs_name(image)
    elif image.startswith("file:"):
        shown = _plain_file_name(image)
    chain: list[dict[str, object]] = []
    async with contextlib.AsyncExitStack() as stack:

        def opening(
            location: str, layer_fmt: str | None, share: bool
        ) -> contextlib.AbstractAsyncContextManager[Driver]:
            return _open.open_image(
                location,
                layer_fmt,
                cache=CacheMode.WRITEBACK,
                connections=1,  # (one look at the image, as qemu-img takes it)
                force_share=share,
                backing=False,
            )

        async def alone(location: str, layer_fmt: str | None) -> Driver:
            try:
                return await stack.enter_async_context(opening(location, layer_fmt, force_share))
            except ImageInUse:
                # qemu-img info reads no data, and a raw image passes its user's
                # sharing down to the file: it looks at a raw image in use (a running
                # VM's disk) without -U. Every other format guards its metadata.
                async with contextlib.AsyncExitStack() as mine:
                    driver = await mine.enter_async_context(opening(location, layer_fmt, True))
                    if driver.name != "raw":
                        raise
                    stack.push_async_exit(mine.pop_all())
                    return driver

        # qemu-img info looks at each image alone, reading no data: the backing file is
        # shown by the name the image stores, and one that is missing, loops or is raw
        # with no format recorded is not an error. With --backing-chain it follows those
        # names, one image at a time, as qemu-img does, rather than opening the chain as
        # a conversion reads it: so what reading refuses (a raw backing file to probe,
        # an external data file that is gone) does not stop it, and each image's
        # full-backing-filename is its stored name resolved, never where the reader's
        # rules took it (a ``file:`` name is shown with its prefix).
        first = await alone(image, fmt)
        seen = {_chain_key(first.location)}
        layer: Driver | None = first
        named: dict[str, object] = {}  # (how the layer is shown, when not by its driver)
        while layer is not None:
            data = _info_dict(layer)
            data.update(named)
            chain.append(data)
            if not backing_chain:
                break
            named = {}
            below = layer.backing
            name = data.get("backing-filename")
            if below is None and isinstance(name, str):
                # (also past ``backing: null`` in block options, as qemu-img goes on)
                location = beside(layer.location, name)
                if _chain_key(location) in seen:
                    raise ImageError(f"Backing file '{location}' creates an infinite loop")
                if len(seen) >= _open.MAX_CHAIN_LENGTH:
                    raise ImageError(
                        f"Could not open '{shown}': its backing chain is longer than "
                        f"{_open.MAX_CHAIN_LENGTH} images"
                    )
                seen.add(_chain_key(location))
                below_fmt = _str_or_none(data.get("backing-filename-format"))
                if below_fmt in _PROTOCOL_FORMATS and _local_path(location) is not None:
                    # A protocol recorded as the format (``-F file``): the file's bytes,
                    # shown by its name under that driver, as ``info -f file`` shows it.
                    named = {"filename": location, "format": below_fmt}
                    location, below_fmt = _protocol_as_format(location, str(below_fmt)), None
                below = await alone(location, below_fmt)
            layer = below
    chain[0]["filename"] = _open.redact_location(shown)
    if protocol is not None:
        chain[0]["format"] = protocol
    if output == "json":
        import json

        ordered = _qemu_order(chain if backing_chain else chain[0])
        _emit(qemu_json(json.dumps(ordered, indent=4)) + "\n")
    else:
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            for i, data in enumerate(chain):
                if i:
                    print()
                _print_human(data)
        _emit(text.getvalue())
    return 0


def _first_error(group: BaseExceptionGroup[BaseException]) -> TrioconvError | None:
    for exc in group.exceptions:
        if isinstance(exc, TrioconvError):
            return exc
        if isinstance(exc, BaseExceptionGroup):
            found = _first_error(exc)
            if found is not None:
                return found
    return None


class _LineHandler(logging.Handler):
    """Log records as ``trioconv: MESSAGE`` lines on stderr.

    A record marked ``cleanup`` (a problem while closing an image) waits for the end of
    the command: after a failure or an interruption it only repeats the first error in
    other words, and the rule is one line per failure, so it is dropped then.
    """

    def __init__(self) -> None:
        super().__init__()
        self.held: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        line = f"trioconv: {record.getMessage()}"
        if getattr(record, "cleanup", False):
            self.held.append(line)
        else:
            _say(line)

    def finish(self, status: int) -> None:
        held, self.held = self.held, []
        if status == 0:
            for line in held:
                _say(line)


def _run(args: list[str]) -> int:
    """Run one command line; return the exit status, with any error printed on stderr."""
    if not args:
        _say("trioconv: Not enough arguments")
        _say("Try 'trioconv --help' for more information")
        return 1
    logger = logging.getLogger("trioconv")
    handler = next((h for h in logger.handlers if isinstance(h, _LineHandler)), None)
    if handler is None:
        handler = _LineHandler()
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
    status = _run_app(args)
    handler.finish(status)
    return status


def _run_app(args: list[str]) -> int:
    """The command itself: its exit status, its error (if any) printed as one line."""
    try:
        result = app(
            normalize_argv(args),
            exit_on_error=False,
            print_error=False,
            backend="trio",
            result_action="return_value",
        )
    except TrioconvError as exc:
        _say(f"trioconv: {_open.as_typed(str(exc), args)}")
        return 1
    except BaseExceptionGroup as group:
        error = _first_error(group)
        if error is None:
            raise
        _say(f"trioconv: {_open.as_typed(str(error), args)}")
        return 1
    except cyclopts.CycloptsError as exc:
        message = " ".join(str(exc).split())
        _say(f"trioconv: {message}")
        return 1
    except BrokenPipeError:
        # stdout went away (``trioconv ... | head``): stop quietly, as C tools do.
        _stdout_gone()
        return 1
    return result if isinstance(result, int) else 0


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``trioconv`` command; exits with the command's status."""
    if argv is None:
        global _AS_PROGRAM
        _AS_PROGRAM = True
        # Opening a backing chain nests a few frames per image: room for the longest
        # chain trioconv opens (_open.MAX_CHAIN_LENGTH images).
        sys.setrecursionlimit(max(sys.getrecursionlimit(), 16 * _open.MAX_CHAIN_LENGTH))
    status = _run(list(sys.argv[1:] if argv is None else argv))
    if argv is None and status - 128 in _STOP_SIGNALS:
        _die_by(signal.Signals(status - 128))
    sys.exit(status)


def _die_by(signum: signal.Signals) -> None:
    """End the process by the signal that interrupted it, now that the conversion is
    cleaned up, as qemu-img ends: a shell sees status 128 + N either way, but a shell
    loop stops on Ctrl-C only when its command died by SIGINT, and a parent process
    sees the signal."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            if stream is not None:
                stream.flush()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)

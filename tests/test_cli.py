"""The ``trioconv`` command line, run as a separate process the way a user or script would.

Images are made with ``qemu-img``/``qemu-io`` and every result is checked with
``qemu-img compare`` / ``qemu-img map`` (or plain bytes), so these tests say whether
``trioconv convert`` really is a drop-in for ``qemu-img convert``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import pytest

import trioconv
from tests.conftest import (
    ImageMaker,
    assert_identical,
    qemu_map,
    require_tool,
    run,
    trioconv_cli,
)
from trioconv import UsageError

MiB = 1024 * 1024

#: qemu-img's progress text, one record per ``\r``.
QEMU_PROGRESS_RECORD = re.compile(rb"    \((\d+\.\d\d)/100%\)\r")
#: What SIGUSR1 prints on stderr.
PROGRESS_ON_STDERR = re.compile(r"\(\d+\.\d\d/100%\)")


# -- helpers -----------------------------------------------------------------------------------


def trioconv_bytes(*args: str | os.PathLike[str]) -> subprocess.CompletedProcess[bytes]:
    """Like ``trioconv_cli`` but with raw bytes: text mode would turn ``\\r`` into ``\\n``."""
    return subprocess.run(
        [sys.executable, "-m", "trioconv", *[os.fspath(a) for a in args]],
        capture_output=True,
        timeout=60,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr


def assert_one_error(result: subprocess.CompletedProcess[str]) -> str:
    """Exit status 1, exactly one ``trioconv: ...`` line on stderr, no traceback."""
    assert result.returncode == 1, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("trioconv: "), result.stderr
    assert result.stdout == ""
    return lines[0]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ranges(path: Path, *, data: bool) -> list[tuple[int, int]]:
    """Merged ``[start, end)`` ranges of ``qemu-img map`` entries whose ``data`` is ``data``."""
    out: list[tuple[int, int]] = []
    for entry in qemu_map(path):
        if entry["data"] is not data:
            continue
        if data is False:
            assert entry["zero"] is True, entry
        start = int(str(entry["start"]))
        end = start + int(str(entry["length"]))
        if out and out[-1][1] == start:
            out[-1] = (out[-1][0], end)
        else:
            out.append((start, end))
    return out


def json_lines(stdout: str) -> list[dict[str, object]]:
    lines = [json.loads(line) for line in stdout.splitlines()]
    assert lines, "no JSON progress lines"
    assert all(isinstance(line, dict) for line in lines)
    return lines


def wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def src(make_image: ImageMaker) -> Path:
    """4 MiB: data, a hole, data, a hole."""
    return make_image("src.img", "4M", "write -P 0xab 0 1M", "write -P 0xcd 3M 512k")


# -- 1. basic conversion and progress ----------------------------------------------------------


def test_convert_raw_to_raw(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst.img"
    result = trioconv_cli("convert", "-f", "raw", "-O", "raw", src, dst)
    ok(result)
    assert result.stdout == ""
    assert result.stderr == ""
    assert_identical(src, dst)
    assert dst.stat().st_size == src.stat().st_size


def test_progress_has_qemu_img_format(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst.img"
    result = trioconv_bytes("convert", "-p", "-f", "raw", "-O", "raw", src, dst)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.startswith(b"    (0.00/100%)\r"), out
    assert out.endswith(b"    (100.00/100%)\r\n"), out
    assert re.fullmatch(rb"(?:    \(\d+\.\d\d/100%\)\r)+\n", out), out
    records = out[:-1].split(b"\r")[:-1]
    assert all(re.fullmatch(rb"    \(\d+\.\d\d/100%\)", r) for r in records), records
    values = [float(v) for v in QEMU_PROGRESS_RECORD.findall(out)]
    assert values == sorted(values), values
    assert_identical(src, dst)


def test_quiet_silences_progress(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst.img"
    result = trioconv_bytes("convert", "-q", "-p", src, dst)
    assert result.returncode == 0, result.stderr
    assert result.stdout == b""
    assert result.stderr == b""
    assert_identical(src, dst)


def test_progress_json(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst.img"
    result = trioconv_cli("convert", "--progress=json", src, dst)
    ok(result)
    lines = json_lines(result.stdout)
    last = lines[-1]
    assert last["finished"] is True
    assert last["done"] == last["total"] == 4 * MiB
    assert all(line["finished"] is False for line in lines[:-1])
    assert_identical(src, dst)


# -- 2. getopt-style arguments -----------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["-m8", "-Oraw", "-fraw"], id="attached-values"),
        pytest.param(
            [
                "--source-format",
                "raw",
                "--target-format",
                "raw",
                "--parallel",
                "2",
                "--oob-writes",
                "--sparse-size",
                "8k",
            ],
            id="long-options",
        ),
        pytest.param(["--source-format=raw", "--target-format=raw", "--parallel=3"], id="long-eq"),
    ],
)
def test_getopt_forms(src: Path, tmp_path: Path, args: list[str]) -> None:
    dst = tmp_path / "dst.img"
    result = trioconv_cli("convert", *args, src, dst)
    ok(result)
    assert result.stdout == ""
    assert_identical(src, dst)


def test_bundled_flags_with_attached_value(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst.img"
    result = trioconv_bytes("convert", "-pWm4", "-Oraw", src, dst)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(b"    (0.00/100%)\r")
    assert result.stdout.endswith(b"    (100.00/100%)\r\n")
    assert_identical(src, dst)


@pytest.mark.parametrize("bundle", ["-pWm65", "-qm0"])
def test_bundled_value_is_the_value_of_the_option(src: Path, tmp_path: Path, bundle: str) -> None:
    """The text after ``m`` in a bundle really is ``-m``'s value: a bad one is refused."""
    dst = tmp_path / "dst.img"
    message = assert_one_error(trioconv_cli("convert", bundle, src, dst))
    assert "coroutines" in message
    assert f"'{bundle.split('m')[-1]}'" in message
    assert not dst.exists()


@pytest.mark.parametrize(
    "order",
    [
        pytest.param(["{a}", "-O", "raw", "{b}", "{out}"], id="options-between"),
        pytest.param(["{a}", "{b}", "{out}", "-O", "raw", "-m", "2", "-W"], id="options-after"),
        pytest.param(["-f", "raw", "{a}", "--target-format", "raw", "{b}", "{out}"], id="long"),
        pytest.param(["-O", "raw", "--", "{a}", "{b}", "{out}"], id="double-dash"),
    ],
)
def test_options_may_follow_file_names(
    make_image: ImageMaker, tmp_path: Path, order: list[str]
) -> None:
    """qemu-img's getopt takes ``convert a.qcow2 -O raw b.raw``; so must trioconv."""
    a = make_image("a.raw", "2M", "write -P 0x11 0 1M")
    b = make_image("b.raw", "1M", "write -P 0x22 4k 8k")
    out = tmp_path / "out.raw"
    names = {"a": str(a), "b": str(b), "out": str(out)}
    ok(trioconv_cli("convert", *[arg.format(**names) for arg in order]))
    expected = tmp_path / "expected.raw"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", a, b, expected)
    assert_identical(expected, out)


def test_file_names_starting_with_a_dash(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "-src.img").write_bytes(src.read_bytes())
    ok(trioconv_cli("convert", "-O", "raw", "--", "-src.img", "-dst.img"))
    assert_identical(src, tmp_path / "-dst.img")


def test_option_values_that_look_like_options_are_values(
    src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``-O -h`` is the format "-h", not a request for help that exits 0 having
    converted nothing; ``-B -base.raw`` names a backing file, as with qemu-img."""
    monkeypatch.chdir(tmp_path)
    dst = tmp_path / "dst.img"
    cases: list[tuple[list[str | Path], str]] = [
        (["convert", "-O", "-h", src, dst], "Unknown file format '-h'"),
        (["convert", "-f", "--version", src, dst], "Unknown driver '--version'"),
        (["info", "-f", "--help", src], "Unknown driver '--help'"),
    ]
    for args, message in cases:
        assert message in assert_one_error(trioconv_cli(*args, cwd=tmp_path))
        assert not dst.exists()
    (tmp_path / "-base.raw").write_bytes(src.read_bytes())
    backing: list[str | Path] = ["-O", "qcow2", "-B", "-base.raw", "-F", "raw", src]
    ok(trioconv_cli("convert", *backing, "ours.qcow2", cwd=tmp_path))
    run("qemu-img", "convert", *backing, "theirs.qcow2")
    ours = json.loads(run("qemu-img", "info", "--output=json", "ours.qcow2").stdout)
    theirs = json.loads(run("qemu-img", "info", "--output=json", "theirs.qcow2").stdout)
    assert ours["backing-filename"] == theirs["backing-filename"] == "-base.raw"
    assert_identical(src, tmp_path / "ours.qcow2", "raw", "qcow2")


def test_a_target_that_cannot_be_sized_is_left_where_it_was(src: Path, tmp_path: Path) -> None:
    """A target that exists but cannot be made an image (a FIFO, a link to a pipe, a
    character device) fails in one line and is still there afterwards: only what
    trioconv itself created is removed. (As root, ``convert ... /dev/null`` must not
    take ``/dev/null`` away.)"""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    link = tmp_path / "stdout"
    link.symlink_to(fifo)
    targets = [fifo, link]
    if os.geteuid() == 0:
        null = tmp_path / "null"
        os.mknod(null, 0o666 | stat.S_IFCHR, os.makedev(1, 3))  # a copy of /dev/null
        targets.append(null)
    for target in targets:
        before = os.lstat(target)
        line = assert_one_error(trioconv_cli("convert", "-O", "raw", src, target, timeout=30))
        assert f"Could not create '{target}'" in line
        after = os.lstat(target)
        assert (after.st_mode, after.st_ino, after.st_rdev) == (
            before.st_mode,
            before.st_ino,
            before.st_rdev,
        )
        assert qemu_img_exit(["convert", "-O", "raw", src, target]) == 1


def test_a_failed_target_through_a_dangling_link_leaves_the_link(
    make_image: ImageMaker, tmp_path: Path
) -> None:
    """A target named by a link to a file not there yet: the file is created through
    it, and when the conversion stops (here SIGTERM) that file goes, while the link
    stays as it was."""
    from ._faults import interrupt_cli

    src = make_image("big.img", "16M", "write -P 0xab 0 8M")  # 8 s at 1 MiB/s
    link = tmp_path / "link.raw"
    made = tmp_path / "made.raw"
    link.symlink_to(made)
    status, stderr, _ = interrupt_cli(
        ["convert", "-r", "1M", "-O", "raw", src, link], after=1.0, signum=signal.SIGTERM
    )
    assert status == -signal.SIGTERM, stderr
    assert link.is_symlink() and os.readlink(link) == str(made)
    assert not made.exists()


def test_a_pipe_is_not_read_as_an_empty_disk(src: Path, tmp_path: Path) -> None:
    """A pipe or a FIFO has no size and no offsets: read, it would make a 0-byte image
    and exit 0. It is refused in one line, as qemu-img refuses it, and a FIFO without a
    writer is refused at once (opening it would wait for one)."""
    dst = tmp_path / "out.raw"
    piped = subprocess.run(
        [sys.executable, "-m", "trioconv", "convert", "-O", "raw", "/dev/stdin", dst],
        input=src.read_bytes(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    result = subprocess.CompletedProcess(
        piped.args, piped.returncode, piped.stdout.decode(), piped.stderr.decode()
    )
    line = assert_one_error(result)
    assert line == (
        "trioconv: Could not open '/dev/stdin': 'file' driver requires '/dev/stdin' "
        "to be a regular file"
    )
    assert not dst.exists()
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    cases: list[list[str | Path]] = [
        ["convert", "-O", "raw", fifo, dst],
        ["info", fifo],
        ["convert", "-n", src, fifo],
    ]
    for args in cases:
        line = assert_one_error(trioconv_cli(*args, timeout=30))
        assert line.endswith(f"'file' driver requires '{fifo}' to be a regular file"), line
    assert not dst.exists()
    # A character device is a device: /dev/null reads as an empty disk, as in qemu-img.
    ok(trioconv_cli("convert", "-O", "raw", "/dev/null", dst))
    assert dst.stat().st_size == 0


def test_a_name_that_is_not_utf8_is_shown_as_qemu_img_shows_it(tmp_path: Path) -> None:
    """A file name's bytes that are not UTF-8: errors write them back as they were, and
    ``info --output=json`` has U+FFFD for them (strict JSON, as qemu-img's) and QEMU's
    upper-case escapes for the rest - byte for byte qemu-img's output."""
    name = os.fsencode(tmp_path) + b"/caf\xe9-m\xc3\xbcller.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", os.fsdecode(name), "1M")
    ours = subprocess.run(
        [sys.executable, "-m", "trioconv", "info", "--output=json", name],
        capture_output=True,
        check=True,
    ).stdout
    theirs = subprocess.run(
        ["qemu-img", "info", "--output=json", name], capture_output=True, check=True
    ).stdout
    assert b'/caf\\uFFFD-m\\u00FCller.qcow2"' in ours
    assert json.loads(ours)["filename"] == json.loads(theirs)["filename"]
    assert ours == theirs
    missing = os.fsencode(tmp_path) + b"/nope\xe9.raw"
    ours = subprocess.run(
        [sys.executable, "-m", "trioconv", "info", missing], capture_output=True
    ).stderr
    assert ours == b"trioconv: Could not open '" + missing + b"': No such file or directory\n"


def test_an_older_nbd_name_is_named_as_typed_in_errors(src: Path, tmp_path: Path) -> None:
    """``nbd:unix:PATH:exportname=X`` is opened as the URI it stands for, but a failure
    names it as typed, word for word as qemu-img does, for convert and info alike."""
    sock = tmp_path / "none.sock"
    for name in (f"nbd:unix:{sock}:exportname=foo", f"nbd:unix:{sock}", "nbd:127.0.0.1:1"):
        for args in (
            ["convert", "-O", "raw", name, "out.raw"],
            ["convert", "-n", src, name],
            ["info", name],
        ):
            line = assert_one_error(trioconv_cli(*args, cwd=tmp_path))
            their = subprocess.run(
                ["qemu-img", *map(str, args)], capture_output=True, text=True, cwd=tmp_path
            )
            assert their.returncode == 1
            assert line == their.stderr.strip().replace("qemu-img: ", "trioconv: ", 1), args
            assert f"'{name}'" in line
    assert not (tmp_path / "out.raw").exists()


def test_a_name_with_a_protocol_prefix_is_refused_even_when_the_file_exists(
    src: Path, tmp_path: Path
) -> None:
    """``x:y.raw`` is protocol ``x`` to qemu-img, file or no file: refused in one line
    and left as it was; ``./x:y.raw`` and ``file:x:y.raw`` name the file."""
    odd = tmp_path / "x:y.raw"
    odd.write_bytes(b"\x01" * 4096)
    for args, verb in (
        (["convert", src, "x:y.raw"], "create"),
        (["convert", "x:y.raw", "out.raw"], "open"),
        (["info", "x:y.raw"], "open"),
    ):
        line = assert_one_error(trioconv_cli(*args, cwd=tmp_path))
        assert line == f"trioconv: Could not {verb} 'x:y.raw': Unknown protocol 'x'"
        their = subprocess.run(["qemu-img", *map(str, args)], capture_output=True, cwd=tmp_path)
        assert their.returncode == 1
    # Whatever comes before the first colon (no slash before it), as typed.
    for name, protocol in (("my_file:1.raw", "my_file"), ("1x:y.raw", "1x"), ("A b:c", "A b")):
        (tmp_path / name).write_bytes(b"\x02" * 512)
        line = assert_one_error(trioconv_cli("convert", src, name, cwd=tmp_path))
        assert line == f"trioconv: Could not create '{name}': Unknown protocol '{protocol}'"
        assert (tmp_path / name).read_bytes() == b"\x02" * 512
    assert odd.read_bytes() == b"\x01" * 4096
    assert not (tmp_path / "out.raw").exists()
    ok(trioconv_cli("convert", "-O", "raw", src, "./x:y.raw", cwd=tmp_path))
    assert_identical(src, odd)
    ok(trioconv_cli("info", "file:x:y.raw", cwd=tmp_path))
    # A source given with its protocol (-f file) is that protocol's name, as it is.
    ok(trioconv_cli("convert", "-f", "file", "x:y.raw", "copy.raw", cwd=tmp_path))
    assert_identical(src, tmp_path / "copy.raw")
    ours = trioconv_cli("info", "-f", "file", "x:y.raw", cwd=tmp_path)
    assert ours.stdout == run("qemu-img", "info", "-f", "file", "x:y.raw", cwd=tmp_path).stdout


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version(flag: str) -> None:
    """``--version`` and qemu-img's ``-V``: the version on stdout worded as qemu-img's
    first line (``qemu-img version 7.2.0``), status 0."""
    result = trioconv_cli(flag)
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"trioconv version {trioconv.__version__}\n"
    assert result.stderr == ""
    theirs = run("qemu-img", flag).stdout.splitlines()[0]
    assert re.match(r"qemu-img version \d+\.\d+\.\d+", theirs)
    assert re.match(r"trioconv version \d+\.\d+\.\d+", result.stdout)


def test_option_table_matches_the_commands() -> None:
    """normalize_argv must know every option and whether it takes a value, or a value
    that follows it would be moved behind the options as if it were a file name."""
    import inspect
    import typing

    from cyclopts import Parameter

    from trioconv import cli

    for command in ("convert", "info"):
        expected: set[tuple[tuple[str, ...], bool]] = {(("-h", "--help"), False)}
        signature = inspect.signature(getattr(cli, command), eval_str=True)
        for param in signature.parameters.values():
            args = typing.get_args(param.annotation)
            meta = [m for m in args[1:] if isinstance(m, Parameter)] if args else []
            if not meta or param.kind is param.POSITIONAL_ONLY:
                continue
            names = meta[0].name
            names = (names,) if isinstance(names, str) else tuple(names or ())
            expected.add((names, args[0] is not bool))
        assert expected == set(cli._OPTIONS[command]), command
    assert cli.normalize_argv(["convert", "a", "--parallel", "4", "-pWm8", "b"]) == [
        "convert",
        "-p",
        "-W",
        "--parallel=8",
        "a",
        "b",
    ]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        # Given twice: the last value counts, as with qemu-img's getopt; -o adds up.
        (["-O", "qcow2", "-O", "raw", "a", "b"], ["--target-format=raw", "a", "b"]),
        (["--target-format", "qcow2", "-Oraw", "a", "b"], ["--target-format=raw", "a", "b"]),
        (
            ["-o", "x=1", "-p", "-o", "y=2", "a", "b"],
            ["-p", "--target-format-options=x=1", "--target-format-options=y=2", "a", "b"],
        ),
        (["--salvage", "--salvage", "-qq", "a", "b"], ["--salvage", "-q", "a", "b"]),
        # Unambiguous beginnings of long options, as getopt_long takes them.
        (
            ["--salv", "--target-is", "--parallel=4", "a", "b"],
            ["--salvage", "--target-is-zero", "--parallel=4", "a", "b"],
        ),
        (["--progress=json", "a", "b"], ["-p", "--progress-style=json", "a", "b"]),
        (["a", "--", "-b"], ["--", "a", "-b"]),
        # Ambiguous among trioconv's long names, but not among qemu-img's: as qemu-img.
        (["--b", "--o", "help", "a", "b"], ["--bitmaps", "--object=help", "a", "b"]),
        (["--f", "a", "b"], ["-U", "a", "b"]),
        # An option's value is the next word, whatever it looks like, as getopt has it.
        (["-B", "-base.qcow2", "a", "b"], ["--backing=-base.qcow2", "a", "b"]),
        (["-l", "--help", "a", "b"], ["--snapshot=--help", "a", "b"]),
        (["-O", "-h", "a", "b"], ["--target-format=-h", "a", "b"]),
        (["--object=--version", "a", "b"], ["--object=--version", "a", "b"]),
    ],
)
def test_normalize_argv_reads_like_getopt(argv: list[str], expected: list[str]) -> None:
    from trioconv import cli

    assert cli.normalize_argv(["convert", *argv]) == ["convert", *expected]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["a", "b", "-O"], "missing argument for option '-O'"),
        (["a", "b", "-o"], "missing argument for option '-o'"),
        (["a", "b", "--parallel"], "missing argument for option '--parallel'"),
        (["--ta", "a", "b"], "option '--ta' is ambiguous"),
        (["--frobnicate", "a", "b"], "unrecognized option '--frobnicate'"),
        (["-pZ", "a", "b"], "invalid option -- 'Z'"),
        (["--salvage=yes", "a", "b"], "option '--salvage' doesn't allow an argument"),
    ],
)
def test_normalize_argv_refuses_like_getopt(argv: list[str], message: str) -> None:
    from trioconv import cli

    with pytest.raises(UsageError, match=message):
        cli.normalize_argv(["convert", *argv])


def test_default_sparse_size_is_4k(make_image: ImageMaker, tmp_path: Path) -> None:
    """A 4 KiB zero block inside data becomes a hole with the default -S (4k)."""
    src = make_image("src.img", "4M", "write -P 0x11 0 4M", "write -P 0 1M 4k")
    dst = tmp_path / "dst.img"
    ok(trioconv_cli("convert", src, dst))
    assert ranges(dst, data=False) == [(MiB, MiB + 4096)]
    assert_identical(src, dst)


@pytest.mark.parametrize("form", [["--sparse-size", "8k"], ["-S8k"]], ids=["long", "attached"])
def test_sparse_size_option_is_honoured(
    make_image: ImageMaker, tmp_path: Path, form: list[str]
) -> None:
    """... but not with -S 8k: the 8 KiB block around it is not all zero."""
    src = make_image("src.img", "4M", "write -P 0x11 0 4M", "write -P 0 1M 4k")
    dst = tmp_path / "dst.img"
    ok(trioconv_cli("convert", *form, src, dst))
    assert ranges(dst, data=False) == []
    assert_identical(src, dst)


# -- 3. several sources ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        pytest.param([], id="default"),
        pytest.param(["-W", "-m", "3"], id="oob"),
        pytest.param(["-t", "none", "-T", "none"], id="direct"),
    ],
)
def test_sources_are_concatenated(make_image: ImageMaker, tmp_path: Path, args: list[str]) -> None:
    a = make_image("a.img", "1M", "write -P 0xa1 0 1M")
    b = make_image(
        "b.img", "3146240", "write -P 0xb2 4096 64k", "write -P 0xb3 2M 4k", "write -P 0xb4 3M 512"
    )
    c = make_image("c.img", "2M", "write -P 0xc4 0 512", "write -P 0xc5 1M 8k")
    expected = tmp_path / "expected.img"
    expected.write_bytes(b"".join(p.read_bytes() for p in (a, b, c)))
    dst = tmp_path / "dst.img"
    ok(trioconv_cli("convert", *args, "-f", "raw", a, b, c, dst))
    assert dst.stat().st_size == 1 * MiB + 3146240 + 2 * MiB
    assert_identical(expected, dst)
    assert dst.read_bytes() == expected.read_bytes()


# -- 4. sparse output --------------------------------------------------------------------------


def test_zero_runs_are_skipped(make_image: ImageMaker, tmp_path: Path) -> None:
    src = make_image("sparse.img", "8M", "write -P 0xab 0 1M", "write -P 0xcd 4M 1M")
    dst = tmp_path / "dst.img"
    ok(trioconv_cli("convert", src, dst))
    assert_identical(src, dst)
    assert ranges(dst, data=True) == [(0, MiB), (4 * MiB, 5 * MiB)]
    assert ranges(dst, data=False) == [(MiB, 4 * MiB), (5 * MiB, 8 * MiB)]


def test_sparse_size_zero_fully_allocates(make_image: ImageMaker, tmp_path: Path) -> None:
    src = make_image("sparse.img", "8M", "write -P 0xab 0 1M", "write -P 0xcd 4M 1M")
    dst = tmp_path / "dst.img"
    ok(trioconv_cli("convert", "-S", "0", src, dst))
    assert_identical(src, dst)
    entries = qemu_map(dst)
    assert len(entries) == 1, entries
    assert entries[0]["data"] is True
    assert entries[0]["start"] == 0
    assert entries[0]["length"] == 8 * MiB


def test_written_zeroes_inside_data_become_a_hole(make_image: ImageMaker, tmp_path: Path) -> None:
    src = make_image("zeroed.img", "4M", "write -P 0x11 0 4M", "write -P 0 1M 1M")
    assert ranges(src, data=False) == [], "precondition: the zeroes are allocated data"
    dst = tmp_path / "dst.img"
    ok(trioconv_cli("convert", src, dst))
    assert_identical(src, dst)
    assert ranges(dst, data=False) == [(MiB, 2 * MiB)]
    assert ranges(dst, data=True) == [(0, MiB), (2 * MiB, 4 * MiB)]


# -- 5. -n: writing into an existing target ----------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        pytest.param([], id="default"),
        pytest.param(["-W", "-t", "none"], id="oob-direct"),
    ],
)
def test_no_create_onto_larger_dirty_target(
    make_image: ImageMaker, tmp_path: Path, args: list[str]
) -> None:
    src = make_image(
        "src.img",
        "4M",
        "write -P 0xab 0 1M",
        "write -P 0 256k 64k",  # written zeroes inside data
        "write -P 0xcd 2M 512k",
    )
    target = make_image("target.img", "6M", "write -P 0xff 0 6M")
    ok(trioconv_cli("convert", "-n", *args, src, target))
    data = target.read_bytes()
    assert len(data) == 6 * MiB
    source = src.read_bytes()
    assert data[: 4 * MiB] == source
    assert data[4 * MiB :] == b"\xff" * (2 * MiB)
    # The source's zeroes really are zeroes on the target, not left-over 0xff.
    assert data[256 * 1024 : 320 * 1024] == bytes(64 * 1024)
    assert data[MiB : 2 * MiB] == bytes(MiB)
    assert data[2 * MiB + 512 * 1024 : 4 * MiB] == bytes(MiB + 512 * 1024)


def test_no_create_writes_zeroes_without_target_is_zero(src: Path, make_image: ImageMaker) -> None:
    target = make_image("target.img", "4M", "write -P 0xff 0 4M")
    result = trioconv_cli("convert", "-n", "--progress=json", src, target)
    ok(result)
    last = json_lines(result.stdout)[-1]
    assert last["skipped"] == 0
    assert isinstance(last["zeroed"], int)
    assert last["zeroed"] >= 2 * MiB + 512 * 1024
    assert_identical(src, target)


def test_no_create_target_is_zero(src: Path, make_image: ImageMaker) -> None:
    target = make_image("target.img", "4M")
    result = trioconv_cli("convert", "-n", "--target-is-zero", "--progress=json", src, target)
    ok(result)
    last = json_lines(result.stdout)[-1]
    assert last["done"] == last["total"] == 4 * MiB
    assert isinstance(last["skipped"], int)
    assert last["skipped"] >= 2 * MiB + 512 * 1024
    assert last["zeroed"] == 0
    assert_identical(src, target)


# -- 6. bad input: one line, exit 1, nothing left behind ---------------------------------------


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        pytest.param(["-m", "0"], "coroutines", id="m0"),
        pytest.param(["-m", "65"], "coroutines", id="m65"),
        pytest.param(["-m", "x"], "coroutines", id="mx"),
        pytest.param(["-S", "100"], "sparse", id="S100"),
        pytest.param(["-S", "1x"], "sparse", id="S1x"),
        pytest.param(["--target-is-zero"], "-n", id="target-is-zero-without-n"),
        pytest.param(["-C", "-S", "4k"], "-S", id="C-with-S"),
        pytest.param(["-c"], "compress", id="compress-raw"),
        pytest.param(["-B", "base.img"], "backing", id="backing-raw"),
        pytest.param(["-O", "qcow"], "qcow", id="O-qcow"),
        pytest.param(["--bogus"], "--bogus", id="unknown-long-option"),
        pytest.param(["-t", "bogus"], "bogus", id="t-bogus"),
        pytest.param(["-o", "foo=bar"], "foo", id="o-foo"),
        pytest.param(
            ["-o", "preallocation=bogus"], "invalid parameter value: bogus", id="o-prealloc-bogus"
        ),
        pytest.param(["-r", "1x"], "rate", id="r-1x"),
        pytest.param(["-f", "nosuchformat"], "nosuchformat", id="f-unknown"),
    ],
)
def test_bad_option(src: Path, tmp_path: Path, args: list[str], needle: str) -> None:
    dst = tmp_path / "dst.img"
    before = sha256(src)
    message = assert_one_error(trioconv_cli("convert", *args, src, dst))
    assert needle.lower() in message.lower()
    assert not dst.exists()
    assert sha256(src) == before


def test_missing_source(tmp_path: Path) -> None:
    dst = tmp_path / "dst.img"
    message = assert_one_error(trioconv_cli("convert", tmp_path / "nope.img", dst))
    assert "nope.img" in message
    assert not dst.exists()


@pytest.mark.parametrize("parent", ["no/such/dir", "src.img"])
def test_target_in_unusable_folder(src: Path, tmp_path: Path, parent: str) -> None:
    """A nonexistent folder, or a "folder" that is a regular file (unwritable even as root)."""
    dst = tmp_path / parent / "dst.img"
    before = sha256(src)
    message = assert_one_error(trioconv_cli("convert", src, dst))
    assert "dst.img" in message
    assert not dst.exists()
    assert sha256(src) == before


def test_no_create_onto_smaller_target(src: Path, make_image: ImageMaker) -> None:
    target = make_image("small.img", "1M", "write -P 0xee 0 1M")
    before = sha256(target)
    message = assert_one_error(trioconv_cli("convert", "-n", src, target))
    assert "smaller" in message
    assert target.exists()
    assert sha256(target) == before


def test_no_create_onto_missing_target(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst.img"
    assert_one_error(trioconv_cli("convert", "-n", src, dst))
    assert not dst.exists()


@pytest.mark.parametrize("same", ["same-path", "symlink"])
def test_source_is_target(src: Path, same: str) -> None:
    before = sha256(src)
    target: str | Path = src
    if same == "symlink":
        target = src.parent / "alias.img"
        target.symlink_to(src)
    message = assert_one_error(trioconv_cli("convert", src, target))
    assert "source" in message
    assert sha256(src) == before
    assert src.stat().st_size == 4 * MiB


def test_unreadable_format_source_is_refused_by_name(qemu_img: str, tmp_path: Path) -> None:
    source = tmp_path / "disk.qcow"
    run(qemu_img, "create", "-q", "-f", "qcow", source, "4M")
    dst = tmp_path / "dst.img"
    message = assert_one_error(trioconv_cli("convert", source, dst))
    assert "'qcow'" in message
    assert not dst.exists()


def test_protocol_names_taken_as_formats(qemu_img: str, tmp_path: Path) -> None:
    """qemu-img takes the protocol drivers ``file``, ``host_device`` and ``host_cdrom``
    as formats: ``-f file`` reads a qcow2 file's bytes as they are, ``-O file`` writes a
    plain file, and info shows ``file format: file``."""
    image = tmp_path / "disk.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", image, "4M")
    ours, theirs = tmp_path / "ours.bin", tmp_path / "theirs.bin"
    ok(trioconv_cli("convert", "-f", "file", image, ours))
    run(qemu_img, "convert", "-f", "file", image, theirs)
    assert ours.read_bytes() == theirs.read_bytes()  # (whole sectors, as QEMU reads it)
    assert ours.read_bytes().startswith(image.read_bytes())
    plain = tmp_path / "plain.img"
    ok(trioconv_cli("convert", "-O", "file", image, plain))
    assert_identical(image, plain, "qcow2")
    for args in (["-f", "file"], ["-f", "file", "--output", "json"]):
        shown = trioconv_cli("info", *args, image)
        ok(shown)
        assert shown.stdout == run(qemu_img, "info", *args, image).stdout
    device = assert_one_error(trioconv_cli("info", "-f", "host_device", image))
    assert f"'{image}'" in device and "character or block device" in device
    assert "json:" not in device
    # A character device is a device too, as the message says (and qemu-img takes it).
    for args in (["-f", "host_device"], ["-f", "host_device", "--output", "json"]):
        shown = trioconv_cli("info", *args, "/dev/null")
        ok(shown)
        assert shown.stdout == run(qemu_img, "info", *args, "/dev/null").stdout
    ok(trioconv_cli("convert", "-f", "host_device", "-O", "raw", "/dev/null", tmp_path / "n"))
    assert (tmp_path / "n").stat().st_size == 0


@pytest.mark.parametrize("count", [0, 1])
def test_too_few_filenames(src: Path, count: int) -> None:
    files = [src][:count]
    assert_one_error(trioconv_cli("convert", *files))


# -- 7. -o: creation options -------------------------------------------------------------------


def test_o_help_lists_raw_creation_options(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst.img"
    result = trioconv_cli("convert", "-O", "raw", "-o", "help", src, dst)
    ok(result)
    assert "preallocation" in result.stdout
    assert "falloc" in result.stdout
    assert "full" in result.stdout
    assert not dst.exists()


def test_o_help_without_filenames() -> None:
    """``qemu-img convert -O raw -o help`` needs no filenames; a drop-in must not either.
    Without them only the format's own options are listed (raw has only its size)."""
    result = trioconv_cli("convert", "-O", "raw", "-o", "help")
    ok(result)
    assert result.stdout == run("qemu-img", "convert", "-O", "raw", "-o", "help").stdout


@pytest.mark.parametrize("fmt", ["raw", "vmdk", "vpc", "vhdx", "vdi"])
@pytest.mark.parametrize("nfiles", [1, 2])
def test_o_help_with_filenames_is_qemu_imgs(
    fmt: str, nfiles: int, src: Path, tmp_path: Path
) -> None:
    """With a target file name the file protocol's options come too (nocow,
    extent_size_hint, preallocation), byte for byte as qemu-img lists them."""
    both: list[str | Path] = [src, tmp_path / f"x.{fmt}"]
    files = both[:nfiles]
    args: list[str | Path] = ["convert", "-O", fmt, "-o", "help", *files]
    ours = trioconv_cli(*args)
    ok(ours)
    assert ours.stdout == run("qemu-img", *args).stdout


@pytest.mark.parametrize("fmt", ["raw", "qcow2", "vmdk", "vpc", "vhdx", "vdi"])
def test_file_protocol_options_under_every_format(fmt: str, src: Path, tmp_path: Path) -> None:
    """``-o nocow=on,extent_size_hint=...`` (libvirt passes nocow) and a protocol-level
    ``preallocation`` are accepted under every format, as qemu-img accepts them."""
    out = tmp_path / f"out.{fmt}"
    result = trioconv_cli(
        "convert", "-O", fmt, "-o", "nocow=on,extent_size_hint=256k,preallocation=off", src, out
    )
    ok(result)
    assert_identical(src, out, "raw", fmt)
    for bad, message in [
        ("nocow=maybe", "Parameter 'nocow' expects 'on' or 'off'"),
        ("extent_size_hint=8G", "Extent size hint is too large"),
        ("extent_size_hint=abc", "Parameter 'extent_size_hint' expects a non-negative number"),
    ]:
        line = assert_one_error(trioconv_cli("convert", "-O", fmt, "-o", bad, src, tmp_path / "b"))
        assert message in line
        assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("fmt", ["qcow2", "vmdk", "vpc", "vhdx", "vdi"])
def test_o_help_is_laid_out_as_qemu_imgs(fmt: str) -> None:
    """Each line trioconv lists is qemu-img's line for that option (trioconv leaves out
    only what it does not support: encryption), header and closing note included."""
    ours = trioconv_cli("convert", "-O", fmt, "-o", "help")
    ok(ours)
    theirs = [
        t.rstrip() for t in run("qemu-img", "convert", "-O", fmt, "-o", "help").stdout.splitlines()
    ]
    lines = [line.rstrip() for line in ours.stdout.splitlines()]
    assert lines[0] == theirs[0] == f"Supported {fmt} options:"
    assert lines[-3:] == theirs[-3:]
    options = [line for line in lines[1:-3] if line]
    assert options and set(options) <= set(theirs)
    assert [line for line in theirs[1:-3] if line and line not in options] == [
        line for line in theirs[1:-3] if line and "encrypt" in line
    ]


def test_preallocation_falloc(make_image: ImageMaker, tmp_path: Path) -> None:
    src = make_image("sparse.img", "8M", "write -P 0xab 0 1M", "write -P 0xcd 4M 1M")
    plain = tmp_path / "plain.img"
    ok(trioconv_cli("convert", src, plain))
    dst = tmp_path / "falloc.img"
    ok(trioconv_cli("convert", "-o", "preallocation=falloc", src, dst))
    assert_identical(src, dst)
    assert dst.stat().st_blocks * 512 >= 8 * MiB
    assert plain.stat().st_blocks * 512 < 8 * MiB


def test_preallocation_full(make_image: ImageMaker, tmp_path: Path) -> None:
    src = make_image("sparse.img", "8M", "write -P 0xab 0 1M", "write -P 0xcd 4M 1M")
    dst = tmp_path / "full.img"
    ok(trioconv_cli("convert", "-O", "raw", "-o", "preallocation=full", src, dst))
    assert_identical(src, dst)
    assert ranges(dst, data=False) == []
    assert ranges(dst, data=True) == [(0, 8 * MiB)]
    assert dst.stat().st_blocks * 512 >= 8 * MiB


# -- 8. info -----------------------------------------------------------------------------------


def test_info_human(src: Path) -> None:
    result = trioconv_cli("info", src)
    ok(result)
    lines = result.stdout.splitlines()
    assert "file format: raw" in lines
    assert any(line.startswith("virtual size:") for line in lines), result.stdout
    assert "(4194304 bytes)" in result.stdout


@pytest.mark.parametrize("form", [["--output", "json"], ["--output=json"]], ids=["space", "eq"])
def test_info_json(src: Path, form: list[str]) -> None:
    result = trioconv_cli("info", *form, src)
    ok(result)
    info = json.loads(result.stdout)
    assert isinstance(info, dict)
    assert {"virtual-size", "format", "actual-size", "filename"} <= info.keys()
    assert info["virtual-size"] == 4 * MiB
    assert info["format"] == "raw"
    assert info["filename"] == str(src)
    assert isinstance(info["actual-size"], int)
    assert 0 < info["actual-size"] <= 4 * MiB


def test_info_refuses_unreadable_format_by_name(qemu_img: str, tmp_path: Path) -> None:
    image = tmp_path / "disk.qcow"
    run(qemu_img, "create", "-q", "-f", "qcow", image, "4M")
    message = assert_one_error(trioconv_cli("info", image))
    assert "'qcow'" in message


# -- 9. signals --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("signum", "status"),
    [
        pytest.param(signal.SIGINT, 130, id="SIGINT"),
        pytest.param(signal.SIGTERM, 143, id="SIGTERM"),
        pytest.param(signal.SIGHUP, 129, id="SIGHUP"),
    ],
)
def test_signals(
    make_image: ImageMaker, tmp_path: Path, signum: signal.Signals, status: int
) -> None:
    src = make_image("random.img", "8M")
    src.write_bytes(os.urandom(8 * MiB))  # nothing to skip: every byte must be written
    dst = tmp_path / "dst.img"
    err_path = tmp_path / "stderr.txt"
    command = [sys.executable, "-m", "trioconv", "convert", "-r", "1M", str(src), str(dst)]
    with (
        err_path.open("wb") as err,
        subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err) as proc,
    ):
        try:
            # The target appears once the conversion (and its signal handling) has begun.
            wait_for(lambda: dst.exists() or proc.poll() is not None, 20, "the target file")
            assert proc.poll() is None, err_path.read_text()
            time.sleep(1)
            assert proc.poll() is None, "finished before it could be interrupted"
            proc.send_signal(signal.SIGUSR1)
            wait_for(
                lambda: (
                    PROGRESS_ON_STDERR.search(err_path.read_text()) is not None
                    or proc.poll() is not None
                ),
                5,
                "a progress line on stderr",
            )
            assert proc.poll() is None, err_path.read_text()
            assert PROGRESS_ON_STDERR.search(err_path.read_text())
            proc.send_signal(signum)
            wait_for(lambda: proc.poll() is not None, 10, f"exit after {signum.name}")
            code = proc.returncode
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    stderr = err_path.read_text()
    assert code == -signum, stderr  # ended by the signal, after cleaning up
    assert f"trioconv: interrupted by {signum.name}" in stderr
    assert "Traceback" not in stderr, stderr
    assert not dst.exists()
    assert src.stat().st_size == 8 * MiB
    # A shell sees 128 + N, as for qemu-img. (With job control: a background job of a
    # shell without it starts with SIGINT ignored, and then stays deaf to it.)
    shell = (
        "set -m; "
        f"{sys.executable} -m trioconv convert -r 1M {src} {dst} 2>/dev/null & pid=$!; "
        f"while [ ! -e {dst} ]; do sleep 0.05; done; sleep 0.5; kill -{signum.name[3:]} $pid; "
        "wait $pid; echo $?"
    )
    out = subprocess.run(["bash", "-c", shell], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == str(status), out
    assert not dst.exists()


def test_the_console_script_takes_signals_before_loading_the_package() -> None:
    """The console script's module imports nothing of the package, so a Ctrl-C while the
    command line is still loading (Trio, cyclopts, the drivers: a good part of 0.1 s)
    ends it with one line, not a traceback."""
    code = textwrap.dedent(
        """
        import builtins, os, signal, sys
        import _trioconv_launch
        assert "trioconv" not in sys.modules, sorted(sys.modules)
        real_import = builtins.__import__
        def importing(name, *args, **kwargs):
            if name == "trioconv.cli":
                os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, while the CLI loads
            return real_import(name, *args, **kwargs)
        builtins.__import__ = importing
        sys.argv = ["trioconv", "--version"]
        _trioconv_launch.main()
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == -signal.SIGINT, out
    assert out.stderr == "trioconv: interrupted by SIGINT\n"
    assert out.stdout == ""


def test_the_console_script_starts_no_program_while_loading() -> None:
    """Loading the command line runs no other program: Trio's search for the threads
    library (``ctypes.util.find_library``, which runs ``ldconfig -p``) is answered
    without one on the GNU C library, and Trio still names its worker threads."""
    if not (os.confstr("CS_GNU_LIBC_VERSION") or "").startswith("glibc "):
        pytest.skip("the shortcut is for the GNU C library only")
    code = textwrap.dedent(
        """
        import ctypes.util, subprocess, sys
        import _trioconv_launch
        real = ctypes.util.find_library
        def refuse(*args, **kwargs):
            raise AssertionError(f"a program was started: {args!r}")
        subprocess.Popen = refuse
        with _trioconv_launch._without_ldconfig():
            import trioconv.cli
            from trio._core import _thread_cache
        assert ctypes.util.find_library is real  # put back as it was
        assert _thread_cache.set_os_thread_name is not None  # threads are still named
        print("loaded")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out
    assert out.stdout == "loaded\n"


def test_the_console_script_ends_as_python_would_without_shutting_down() -> None:
    """The program ends by ``os._exit`` once the command is over, skipping Python's
    shutdown; what a normal exit gives is kept: the status, the text still buffered
    for stdout, and a non-integer exit code printed on stderr with status 1."""
    code = textwrap.dedent(
        """
        import sys
        import trioconv.cli, _trioconv_launch
        def command(argv=None):
            sys.stdout.write("kept " * 2000)  # held in the pipe's block buffer
            sys.exit(sys.argv[1] if sys.argv[1].isalpha() else int(sys.argv[1]))
        trioconv.cli.main = command
        _trioconv_launch.main()
        """
    )
    for arg, status, err in [("0", 0, ""), ("3", 3, ""), ("ended", 1, "ended\n")]:
        out = subprocess.run(
            [sys.executable, "-c", code, arg], capture_output=True, text=True, timeout=30
        )
        assert (out.returncode, out.stderr) == (status, err), out
        assert out.stdout == "kept " * 2000


def test_a_stop_signal_after_the_conversion_is_not_taken(src: Path, tmp_path: Path) -> None:
    """Once the conversion is over (the target complete, or removed after a signal),
    SIGINT, SIGTERM and SIGHUP are ignored until the process ends: a late one neither
    kills a finished run nor prints "interrupted" a second time."""
    dst = tmp_path / "dst.img"
    code = textwrap.dedent(
        f"""
        import signal, sys
        import trioconv.cli
        sys.argv = ["trioconv", "convert", {str(src)!r}, {str(dst)!r}]
        try:
            trioconv.cli.main()
        except SystemExit as end:
            assert end.code == 0, end.code
        print([signal.getsignal(s) == signal.SIG_IGN for s in trioconv.cli._STOP_SIGNALS])
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[True, True, True]"
    assert_identical(src, dst)


@pytest.mark.parametrize("signum", [signal.SIGHUP, signal.SIGINT], ids=["nohup", "background"])
def test_signals_ignored_at_start_stay_ignored(
    make_image: ImageMaker, tmp_path: Path, signum: signal.Signals
) -> None:
    """Under ``nohup`` (or as a script's background job, for SIGINT) the signal does not
    stop the conversion, as it would not stop qemu-img."""
    src = make_image("src.img", "2M", "write -P 7 0 2M")
    dst = tmp_path / "dst.img"

    def ignore() -> None:
        signal.signal(signum, signal.SIG_IGN)

    command = [sys.executable, "-m", "trioconv", "convert", "-r", "2M", str(src), str(dst)]
    with subprocess.Popen(command, stderr=subprocess.PIPE, preexec_fn=ignore) as proc:
        wait_for(lambda: dst.exists() or proc.poll() is not None, 20, "the target file")
        time.sleep(0.2)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert_identical(src, dst)


# -- 10. copy offload and O_DIRECT -------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        pytest.param(["-C"], id="copy-offload"),
        pytest.param(["-t", "none", "-T", "none"], id="o-direct"),
        pytest.param(["-t", "directsync", "-T", "none", "-W"], id="directsync"),
    ],
)
def test_offload_and_direct_io_with_unaligned_size(
    make_image: ImageMaker, tmp_path: Path, args: list[str]
) -> None:
    size = 5 * MiB + 512
    src = make_image(
        "odd.img",
        str(size),
        "write -P 0x5a 0 1M",
        "write -P 0x6b 3M 100k",
        f"write -P 0x77 {size - 512} 512",
    )
    dst = tmp_path / "dst.img"
    ok(trioconv_cli("convert", *args, src, dst))
    assert dst.stat().st_size == size
    assert_identical(src, dst)
    assert dst.read_bytes()[-512:] == b"\x77" * 512


@pytest.mark.parametrize("cache", ["none", "directsync"])
@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("qcow2", ""),
        ("qcow2", "cluster_size=512"),  # metadata and data share 4 KiB blocks
        ("qcow2", "compat=0.10"),
        ("qcow2", "refcount_bits=1,extended_l2=on"),
        ("vmdk", ""),
        ("vmdk", "subformat=streamOptimized"),
        ("vpc", ""),
        ("vhdx", ""),
        ("vdi", ""),
    ],
)
def test_format_targets_with_o_direct(
    make_image: ImageMaker, tmp_path: Path, fmt: str, options: str, cache: str
) -> None:
    """A format grows its file and writes metadata in pieces smaller than a block:
    with ``-t none`` those go through the page cache and nothing is cut off."""
    src = make_image(
        "src.img", "6M", "write -P 0x5a 0 1M", "write -P 0x6b 3M 100k", "write -P 0x77 5M 512"
    )
    dst = tmp_path / f"dst.{fmt}"
    args = ["-o", options] if options else []
    ok(trioconv_cli("convert", "-O", fmt, *args, "-t", cache, "-m", "8", src, dst))
    assert_identical(src, dst, "raw", fmt)
    if fmt != "vpc":
        run("qemu-img", "check", "-q", "-f", fmt, dst)


# -- what scripts written for qemu-img rely on ------------------------------------------


def test_progress_text_is_qemu_imgs(src: Path, tmp_path: Path) -> None:
    """The first and last records, and a failure's, byte for byte as qemu-img prints them."""
    ours = trioconv_bytes("convert", "-p", src, tmp_path / "a.img")
    theirs = subprocess.run(
        ["qemu-img", "convert", "-p", src, tmp_path / "b.img"], capture_output=True, check=True
    )
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout[:16] == theirs.stdout[:16] == b"    (0.00/100%)\r"
    tail = b"    (100.00/100%)\r    (100.00/100%)\r\n"
    assert ours.stdout.endswith(tail) and theirs.stdout.endswith(tail), (ours, theirs)
    failed = trioconv_bytes("convert", "-p", tmp_path / "missing.img", tmp_path / "c.img")
    qemu_failed = subprocess.run(
        ["qemu-img", "convert", "-p", tmp_path / "missing.img", tmp_path / "d.img"],
        capture_output=True,
    )
    assert failed.returncode == qemu_failed.returncode == 1
    assert failed.stdout == qemu_failed.stdout == b"    (0.00/100%)\r\n"
    # Nothing to copy: the first line and the closing one, nothing between.
    empty = tmp_path / "empty.raw"
    empty.write_bytes(b"")
    ours = trioconv_bytes("convert", "-p", empty, tmp_path / "e.img")
    theirs = subprocess.run(
        ["qemu-img", "convert", "-p", empty, tmp_path / "f.img"], capture_output=True, check=True
    )
    assert ours.stdout == theirs.stdout == b"    (0.00/100%)\r    (100.00/100%)\r\n"


@pytest.mark.parametrize(
    "shell",
    [
        "{cmd} convert -p {src} {dst} | head -c 5 >/dev/null",  # the pipe closes early
        "{cmd} convert {src} {dst} >&-",  # no stdout at all
        "{cmd} convert -p {src} {dst} >&-",
        "{cmd} convert -p {src} {dst} >/dev/full",  # stdout cannot be written
    ],
    ids=["broken-pipe", "closed", "closed-progress", "full"],
)
def test_unwritable_stdout_is_not_an_error(src: Path, tmp_path: Path, shell: str) -> None:
    """As with qemu-img: progress that cannot be shown does not fail the conversion."""
    dst = tmp_path / "dst.img"
    cmd = f"{sys.executable} -m trioconv"
    line = shell.format(cmd=cmd, src=src, dst=dst)
    result = subprocess.run(
        ["bash", "-o", "pipefail", "-c", line], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert_identical(src, dst)


def test_info_into_a_full_stdout(src: Path) -> None:
    cmd = f"{sys.executable} -m trioconv info {src} >/dev/full"
    result = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_errors_never_go_to_stdout(tmp_path: Path) -> None:
    cmd = f"{sys.executable} -m trioconv convert {tmp_path}/missing.img {tmp_path}/x.img 2>&-"
    result = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert result.stdout == ""


def test_an_option_given_twice_keeps_the_last_value(src: Path, tmp_path: Path) -> None:
    dst = tmp_path / "dst.img"
    ok(trioconv_cli("convert", "-O", "qcow2", "-m", "2", "-O", "raw", "-m", "4", src, dst))
    assert json.loads(run("qemu-img", "info", "--output=json", dst).stdout)["format"] == "raw"
    assert_identical(src, dst)


@pytest.mark.parametrize(
    "args",
    [
        ["-m", "0x10"],
        ["-m", "010"],
        ["-t", "off"],
        ["-T", "off"],
        ["--salv"],
        ["-r", "10M"],
        ["-S", "0x200"],
    ],
)
def test_accepted_like_qemu_img(src: Path, tmp_path: Path, args: list[str]) -> None:
    dst = tmp_path / "dst.img"
    ok(trioconv_cli("convert", *args, src, dst))
    assert_identical(src, dst)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-m", "09"], "Invalid number of coroutines: '09'"),
        # Only ASCII digits, nothing after them (Python's int() takes all of these).
        (["-m", "8 "], "Invalid number of coroutines: '8 '"),
        (["-m", "1_0"], "Invalid number of coroutines: '1_0'"),
        (["-m", "\uff18"], "Invalid number of coroutines"),
        (["-r", "1M "], "Invalid rate limit specified"),
        (["-S", "4k "], "Invalid buffer size for sparse output"),
        # Not a size: how one is written (qemu-img: "You may use k, M, G, ... suffixes").
        (["-S", "-1"], "Invalid buffer size for sparse output specified. Must be a non-neg"),
        (["-S", "abc"], "optional suffix of K, M, G, T, P or E: 'abc'"),
        # A size, but not one -S takes.
        (["-S", "1T"], "Valid sizes are multiples of 512 up to 16777216. Select 0 to disable"),
        (["-r", "20E"], "Invalid rate limit specified"),
        (["-o", "size=abc"], "Parameter 'size' expects a non-negative number below 2^64"),
        (["-O", "qcow2", "-o", "size=-1"], "Parameter 'size' expects a non-negative number"),
        (["--bitmaps", "-O", "qcow2"], "Source lacks bitmap support"),
        (["-o", ""], "Invalid option list: "),
        (["-O", "qcow2", "-o", "cluster_size=64k,"], "Invalid option list: cluster_size=64k,"),
        (["-O", ""], "trioconv: Unknown file format ''"),
        (["-O", "bogus"], "trioconv: Unknown file format 'bogus'"),
        (["-f", "bogus"], "Could not open '"),  # ... 'SRC': Unknown driver 'bogus'
        (["-n", "-O", "bogus"], "Unknown driver 'bogus'"),
        (["-O", "qcow2", "-o", "data_file="], "Could not create '': No such file or directory"),
        # Booleans as QEMU spells them, exactly.
        (["-O", "qcow2", "-o", "lazy_refcounts=ON"], "'lazy_refcounts' expects 'on' or 'off'"),
        (["-O", "vdi", "-o", "static=True"], "Parameter 'static' expects 'on' or 'off'"),
        (["-O", "vpc", "-o", "force_size= on"], "Parameter 'force_size' expects 'on' or 'off'"),
        (["-n", "-o", "help"], "-o has no effect when skipping image creation"),
        (
            ["-c", "-O", "qcow2", "-o", "preallocation=full"],
            "Compression and preallocation not supported at the same time",
        ),
    ],
)
def test_refused_like_qemu_img(src: Path, tmp_path: Path, args: list[str], message: str) -> None:
    dst = tmp_path / "dst.img"
    if "-n" in args:
        dst.write_bytes(src.read_bytes())
    line = assert_one_error(trioconv_cli("convert", *args, src, dst))
    assert message in line
    assert qemu_img_exit(["convert", *args, src, dst]) == 1


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["-m", "0"], "Invalid number of coroutines"),
        (["-S", "abc"], "Invalid buffer size for sparse output"),
        (["-r", "abc"], "Invalid rate limit specified"),
        (["--target-is-zero"], "--target-is-zero requires use of -n flag"),
        (["--skip-broken-bitmaps"], "requires --bitmaps"),
        (["-C", "-c"], "Cannot enable copy offloading when -c is used"),
    ],
)
def test_o_help_comes_after_the_flag_checks(args: list[str], message: str) -> None:
    """qemu-img checks its flags before it answers ``-o help``: a script that asks for
    the help with bad flags gets the error, not the help."""
    result = trioconv_cli("convert", *args, "-o", "help")
    assert message in assert_one_error(result)
    assert result.stdout == ""
    assert qemu_img_exit(["convert", *args, "-o", "help"]) == 1


@pytest.mark.parametrize(
    "args",
    [
        ["-O", "vmdk", "-o", "adapter_type=bogus"],
        ["-O", "vmdk", "-o", "subformat=monolithicFlat,zeroed_grain=on"],
        ["-O", "vmdk", "-o", "compat6=on,hwversion=6"],
        ["-O", "vmdk", "-B", "base.qcow2", "-F", "qcow2"],
        ["-O", "vmdk", "-B", "base.qcow2", "-F", "vmdk"],
        ["-O", "vdi", "-o", "static=maybe"],
        ["-O", "vpc", "-o", "force_size=maybe"],
        ["-O", "vpc", "-o", "subformat=bogus"],
        ["-O", "vhdx", "-o", "block_size=3M"],
        ["-O", "qcow2", "-o", "lazy_refcounts=maybe"],
        ["-O", "qcow2", "-o", "cluster_size=3"],
        ["-O", "qcow2", "-o", "refcount_bits=3"],
        ["-O", "qcow2", "-o", "compat=0.10,extended_l2=on"],
    ],
)
def test_bad_creation_options_leave_an_existing_target_alone(
    src: Path, tmp_path: Path, args: list[str]
) -> None:
    """Every ``-o`` value the format refuses is refused before the existing target is
    truncated: a typo does not destroy what the file held (qemu-img keeps it too)."""
    require_tool("qemu-img")
    run("qemu-img", "create", "-q", "-f", "qcow2", tmp_path / "base.qcow2", "1M")
    dst = tmp_path / "dst.img"
    dst.write_bytes(b"\x5a" * 65536)
    args = [str(tmp_path / a) if a == "base.qcow2" else a for a in args]
    assert_one_error(trioconv_cli("convert", *args, src, dst))
    assert dst.read_bytes() == b"\x5a" * 65536
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base.qcow2", "dst.img", "src.img"]


def qemu_img_exit(args: list[str | Path]) -> int:
    return subprocess.run(["qemu-img", *map(str, args)], capture_output=True).returncode


def test_missing_value_at_the_end(src: Path, tmp_path: Path) -> None:
    line = assert_one_error(trioconv_cli("convert", src, tmp_path / "dst.img", "-O"))
    assert line == "trioconv: missing argument for option '-O'"
    assert not (tmp_path / "dst.img").exists()


def test_escaped_comma_in_option_values(src: Path, tmp_path: Path) -> None:
    """``,,`` in ``-o`` is a comma in the value, as qemu's option lists read it."""
    base = tmp_path / "a,b.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", base, "4M")
    dst = tmp_path / "dst.qcow2"
    opts = f"backing_file={str(base).replace(',', ',,')},backing_fmt=qcow2"
    ok(trioconv_cli("convert", "-O", "qcow2", "-o", opts, src, dst))
    info = json.loads(run("qemu-img", "info", "--output=json", dst).stdout)
    assert info["backing-filename"] == str(base)
    assert_identical(src, dst, "raw", "qcow2")


def test_no_arguments_is_an_error() -> None:
    result = trioconv_cli()
    assert result.returncode == 1
    assert result.stderr.startswith("trioconv: Not enough arguments")


# -- sizes count whole sectors, as in QEMU ------------------------------------------------


@pytest.mark.parametrize("flags", [[], ["-C"], ["-W", "-m", "16"]])
def test_raw_sizes_round_up_to_a_sector(
    make_image: ImageMaker, tmp_path: Path, flags: list[str]
) -> None:
    """A 1000-byte raw file is a 1024-byte disk: concatenated sources start where
    qemu-img starts them, byte for byte the same output."""
    odd = tmp_path / "odd.raw"
    odd.write_bytes(b"\x07" * 1000)
    second = make_image("second.raw", "1M", "write -P 0x55 0 64k")
    ours, theirs = tmp_path / "ours.raw", tmp_path / "theirs.raw"
    ok(trioconv_cli("convert", *flags, "-f", "raw", "-O", "raw", odd, second, ours))
    run("qemu-img", "convert", *flags, "-f", "raw", "-O", "raw", odd, second, theirs)
    assert ours.read_bytes() == theirs.read_bytes()
    assert ours.stat().st_size == 1024 + MiB
    info = json.loads(trioconv_cli("info", "--output", "json", odd).stdout)
    assert info["virtual-size"] == 1024


def test_odd_raw_source_onto_a_dirty_target(tmp_path: Path) -> None:
    """The 24 bytes past the source's end are zeroes on the target too."""
    odd = tmp_path / "odd.raw"
    odd.write_bytes(b"\x07" * 1000)
    target = tmp_path / "target.raw"
    target.write_bytes(b"\xff" * 4096)
    ok(trioconv_cli("convert", "-n", "-f", "raw", "-O", "raw", odd, target))
    assert target.read_bytes() == b"\x07" * 1000 + bytes(24) + b"\xff" * 3072


def test_qcow2_sizes_count_whole_sectors(tmp_path: Path) -> None:
    """A qcow2 header size that is not a multiple of 512 reads as whole sectors, as qemu
    reads it, and an odd raw source becomes a qcow2 of its rounded size."""
    odd = tmp_path / "odd.raw"
    odd.write_bytes(b"\x07" * 1000)
    out = tmp_path / "out.qcow2"
    ok(trioconv_cli("convert", "-O", "qcow2", odd, out))
    assert json.loads(run("qemu-img", "info", "--output=json", out).stdout)["virtual-size"] == 1024
    run("qemu-img", "compare", odd, out)
    with out.open("r+b") as f:  # header size: 1000 bytes
        f.seek(24)
        f.write((1000).to_bytes(8, "big"))
    theirs = json.loads(run("qemu-img", "info", "--output=json", out).stdout)["virtual-size"]
    ours = json.loads(trioconv_cli("info", "--output", "json", out).stdout)["virtual-size"]
    assert ours == theirs == 512


async def test_no_file_larger_than_a_file_offset(tmp_path: Path) -> None:
    with pytest.raises(trioconv.ImageError, match="File too large"):
        await trioconv.create_image(tmp_path / "huge.raw", "raw", 2**63)
    assert not (tmp_path / "huge.raw").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--image-opts", "driver=raw,file.filename=/nonexistent/x.raw"],
            "Could not open '/nonexistent/x.raw': No such file or directory",
        ),
        (["--object", "secret,id=s0", "x.raw"], "Either 'file' or 'data' must be provided"),
        (["--image-opts", "-f", "raw", "driver=raw,file.filename=x"], "mutually exclusive"),
    ],
)
def test_info_block_option_errors(args: list[str], message: str) -> None:
    line = assert_one_error(trioconv_cli("info", *args))
    assert message in line

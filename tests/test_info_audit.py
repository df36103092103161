"""``trioconv info`` against ``qemu-img info`` on the images and options that
tests/test_info.py leaves out, compared as scripts read them.

Each case makes its images with qemu-img (or qemu-io), runs both tools with the same
arguments in the same folder and asks for the same text: the JSON byte for byte (keys
in qemu's order, so a parse compares equal too) and the human lines. Bad inputs must
fail in both, with one line on stderr and nothing on stdout.

Most cases run trioconv in this process (:func:`ours`, through the command's own entry
:func:`trioconv.cli._run`), which keeps some forty comparisons fast; where the exact
bytes on stdout or the exit of a real process matter, it runs as a program.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trioconv import cli

from . import nbd_servers
from .conftest import require_tool, run, trioconv_cli

nbdkit_server = nbd_servers.nbdkit_server
qemu_nbd_server = nbd_servers.qemu_nbd_server


def ours(capsys: pytest.CaptureFixture[str], *args: str | os.PathLike[str]) -> tuple[int, str, str]:
    """``trioconv info ARGS`` run in this process: its status, stdout and stderr."""
    capsys.readouterr()  # (whatever came before is not this command's)
    status = cli._run(["info", *(os.fspath(a) for a in args)])
    out, err = capsys.readouterr()
    return status, out, err


def theirs(*args: str | os.PathLike[str], cwd: Path | None = None) -> str:
    """What ``qemu-img info ARGS`` prints (it must succeed)."""
    return run(require_tool("qemu-img"), "info", *args, cwd=cwd).stdout


def same_as_qemu(capsys: pytest.CaptureFixture[str], *args: str | os.PathLike[str]) -> None:
    """Both outputs, and with ``--backing-chain`` (a JSON list), identical to qemu-img's."""
    for chain in ([], ["--backing-chain"]):
        for output in ("json", "human"):
            argv = ["--output", output, *chain, *args]
            status, out, err = ours(capsys, *argv)
            assert status == 0, err
            assert out == theirs(*argv), argv
    parsed = json.loads(ours(capsys, "--output=json", "--backing-chain", *args)[1])
    assert isinstance(parsed, list) and parsed[0]["virtual-size"] >= 0


def qemu_img(*args: str | os.PathLike[str], cwd: Path | None = None) -> None:
    """``qemu-img ARGS``, which must succeed (it makes the images compared here)."""
    run(require_tool("qemu-img"), *args, cwd=cwd)


# --------------------------------------------------------------------- snapshot table


def _renumber_first_snapshot(image: Path, ident: bytes) -> None:
    """Give the first snapshot of ``image`` the ID ``ident``, taking its bytes from the
    end of the name (the entry keeps its size: ID and name lie side by side after
    the 40-byte fixed part and its extra data)."""
    with image.open("r+b") as f:
        f.seek(64)
        table = int.from_bytes(f.read(8), "big")
        f.seek(table + 12)
        id_len = int.from_bytes(f.read(2), "big")
        name_len = int.from_bytes(f.read(2), "big")
        f.seek(table + 36)
        extra = int.from_bytes(f.read(4), "big")
        f.seek(table + 40 + extra + id_len)
        name = f.read(name_len)
        total = id_len + name_len
        f.seek(table + 12)
        f.write(len(ident).to_bytes(2, "big") + (total - len(ident)).to_bytes(2, "big"))
        f.seek(table + 40 + extra)
        f.write(ident + name[: total - len(ident)])


def test_snapshot_table_pads_ids_and_names_as_printf_does(tmp_path: Path) -> None:
    """qemu-img 7.2 prints a snapshot row with ``"%-9s %-16s %8s..."``: a space always
    follows the ID and the tag, so a tag longer than 16 bytes (or an ID longer than 9)
    pushes the rest of its row right and never runs into the next column; and widths
    count bytes, so a tag of UTF-8 letters gets fewer spaces than letters would.
    Scripts that cut the table at fixed columns or split it on runs of spaces see the
    same rows from both tools."""
    image = tmp_path / "snap.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "1M")
    for name in ("x" * 15, "ünïcode", "sixteen-bytes-xx", "exactly-17-bytes-", "", "a" * 40):
        qemu_img("snapshot", "-c", name, image)
    _renumber_first_snapshot(image, b"1234567890")  # IDs are numbers qemu counts up
    mine = subprocess.run(
        [sys.executable, "-m", "trioconv", "info", image],
        capture_output=True,
        check=False,
        timeout=60,
    )
    qemu = subprocess.run(
        [require_tool("qemu-img"), "info", image], capture_output=True, check=True, timeout=60
    )
    assert mine.returncode == 0, mine.stderr
    table = mine.stdout.splitlines()[6:14]
    assert table == qemu.stdout.splitlines()[6:14]
    assert mine.stdout == qemu.stdout
    assert table[1].startswith(b"1234567890 xxxxxx" + b" " * 16 + b"0 B ")
    assert table[4].startswith(b"4         exactly-17-bytes-" + b" " * 6 + b"0 B ")


# ------------------------------------------------------------- images, side by side

#: Each case: the commands that make its images in an empty folder (``qemu-img ...``
#: or ``qemu-io ...``, split on spaces; ``@`` is a space inside one word, ``{dir}`` the
#: folder) and the arguments ``info`` gets there.
_CASES: dict[str, tuple[list[str], list[str]]] = {
    "raw-empty": (["truncate -s 0 e.raw"], ["e.raw"]),
    "raw-1000-bytes": (["truncate -s 1000 odd.raw"], ["-f", "raw", "odd.raw"]),
    "raw-preallocated": (["qemu-img create -q -f raw -o preallocation=full p.raw 1M"], ["p.raw"]),
    "raw-sparse-with-data": (
        ["qemu-img create -q -f raw s.raw 4M", "qemu-io -f raw -c write@-P@1@1M@64k s.raw"],
        ["s.raw"],
    ),
    "qcow2-512-byte-clusters": (
        ["qemu-img create -q -f qcow2 -o cluster_size=512 c.qcow2 4M"],
        ["c.qcow2"],
    ),
    "qcow2-2M-clusters": (
        ["qemu-img create -q -f qcow2 -o cluster_size=2M c.qcow2 4M"],
        ["c.qcow2"],
    ),
    "qcow2-zstd-compressed-data": (
        [
            "qemu-img create -q -f raw s.raw 1M",
            "qemu-io -f raw -c write@-P@7@0@256k s.raw",
            "qemu-img convert -c -O qcow2 -o compression_type=zstd s.raw z.qcow2",
        ],
        ["z.qcow2"],
    ),
    "qcow2-1-bit-refcounts-lazy": (
        ["qemu-img create -q -f qcow2 -o refcount_bits=1,lazy_refcounts=on r.qcow2 4M"],
        ["r.qcow2"],
    ),
    "qcow2-preallocated-metadata": (
        ["qemu-img create -q -f qcow2 -o preallocation=metadata m.qcow2 4M"],
        ["m.qcow2"],
    ),
    "qcow2-bitmaps": (
        [
            "qemu-img create -q -f qcow2 b.qcow2 4M",
            "qemu-img bitmap --add b.qcow2 first",
            "qemu-img bitmap --add -g 128k --disable b.qcow2 second",
        ],
        ["b.qcow2"],
    ),
    "qcow2-absolute-backing": (
        [
            "qemu-img create -q -f raw base.raw 4M",
            "qemu-img create -q -f qcow2 -b {dir}/base.raw -F raw t.qcow2",
        ],
        ["t.qcow2"],
    ),
    "qcow2-relative-backing-in-a-folder": (
        [
            "mkdir sub",
            "qemu-img create -q -f qcow2 base.qcow2 4M",
            "qemu-img create -q -f qcow2 -b ../base.qcow2 -F qcow2 sub/t.qcow2",
        ],
        ["sub/t.qcow2"],
    ),
    "qcow2-by-absolute-name": (
        [
            "qemu-img create -q -f qcow2 base.qcow2 4M",
            "qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 t.qcow2",
        ],
        ["{dir}/t.qcow2"],
    ),
    # A ``file:`` name is relative to the current folder, not to the overlay's, and
    # is shown as stored, also in the chain (which follows names, one image at a time).
    "qcow2-backing-named-with-file-prefix": (
        [
            "qemu-img create -q -f raw base.raw 1M",
            "qemu-img create -q -f qcow2 -b file:base.raw -F raw t.qcow2",
        ],
        ["t.qcow2"],
    ),
    # A backing format that is a protocol (as ``-f file``): the file's bytes, shown
    # under that name in the chain.
    "qcow2-backing-format-file": (
        [
            "qemu-img create -q -f qcow2 base.qcow2 1M",
            "qemu-img create -q -f qcow2 -b base.qcow2 -F file t.qcow2",
        ],
        ["t.qcow2"],
    ),
    "qcow2-external-data-file-by-absolute-name": (
        ["qemu-img create -q -f qcow2 -o data_file={dir}/d.raw d.qcow2 4M"],
        ["d.qcow2"],
    ),
    "qcow2-forced-raw": (["qemu-img create -q -f qcow2 q.qcow2 4M"], ["-f", "raw", "q.qcow2"]),
    "qcow2-forced-qcow2-force-share": (
        ["qemu-img create -q -f qcow2 q.qcow2 4M"],
        ["-U", "-f", "qcow2", "q.qcow2"],
    ),
    "qcow2-json-name": (
        ["qemu-img create -q -f qcow2 q.qcow2 4M"],
        ['json:{"driver":"qcow2","file":{"driver":"file","filename":"q.qcow2"}}'],
    ),
    "qcow2-image-opts": (
        ["qemu-img create -q -f qcow2 q.qcow2 4M"],
        ["--image-opts", "driver=qcow2,file.driver=file,file.filename=q.qcow2"],
    ),
    "vmdk-monolithic-flat": (
        ["qemu-img create -q -f vmdk -o subformat=monolithicFlat f.vmdk 4M"],
        ["f.vmdk"],
    ),
    "vmdk-two-gb-sparse": (
        ["qemu-img create -q -f vmdk -o subformat=twoGbMaxExtentSparse s.vmdk 4M"],
        ["s.vmdk"],
    ),
    "vmdk-two-gb-flat": (
        ["qemu-img create -q -f vmdk -o subformat=twoGbMaxExtentFlat f.vmdk 4M"],
        ["f.vmdk"],
    ),
    "vmdk-delta-over-vmdk": (
        [
            "qemu-img create -q -f vmdk p.vmdk 4M",
            "qemu-img create -q -f vmdk -b p.vmdk -F vmdk c.vmdk",
        ],
        ["c.vmdk"],
    ),
    "vpc-fixed-forced": (
        ["qemu-img create -q -f vpc -o subformat=fixed f.vpc 4M"],
        ["-f", "vpc", "f.vpc"],
    ),
    "vpc-size-not-in-chs": (["qemu-img create -q -f vpc v.vpc 100000k"], ["v.vpc"]),
    "vpc-force-size": (["qemu-img create -q -f vpc -o force_size=on v.vpc 100000k"], ["v.vpc"]),
    "vhdx-fixed-1M-blocks": (
        ["qemu-img create -q -f vhdx -o subformat=fixed,block_size=1M,log_size=1M x.vhdx 4M"],
        ["x.vhdx"],
    ),
    "vdi-dynamic": (["qemu-img create -q -f vdi d.vdi 4M"], ["d.vdi"]),
    "qed-over-raw": (
        [
            "qemu-img create -q -f raw base.raw 4M",
            "qemu-img create -q -f qed -o cluster_size=128k,table_size=8 -b base.raw -F raw q.qed",
        ],
        ["q.qed"],
    ),
}


@pytest.mark.parametrize("case", list(_CASES))
def test_info_matches_qemu_img(
    case: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """JSON and human text, alone and with ``--backing-chain``, as qemu-img prints them
    for the same arguments in the same folder."""
    commands, args = _CASES[case]
    for command in commands:
        argv = [word.replace("@", " ").replace("{dir}", str(tmp_path)) for word in command.split()]
        tool = argv[0] if argv[0] in ("mkdir", "truncate") else require_tool(argv[0])
        run(tool, *argv[1:], cwd=tmp_path)
    monkeypatch.chdir(tmp_path)
    same_as_qemu(capsys, *(arg.replace("{dir}", str(tmp_path)) for arg in args))


# ------------------------------------------------------------------- NBD exports


def test_info_on_nbd_exports_matches_qemu_img(
    tmp_path: Path,
    nbdkit_server: nbd_servers.NbdkitLauncher,
    qemu_nbd_server: nbd_servers.QemuNbdLauncher,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An export is named as QEMU names it (``nbd+unix://?socket=...`` with no export
    name, the legacy ``nbd:unix:PATH`` form rewritten so) and has no disk size: nbdkit's
    memory plugin of a size that is not a multiple of 512, and a qcow2 image that
    qemu-nbd serves as its bytes, read as qcow2 with ``-f qcow2``."""
    memory = nbdkit_server("memory", ["size=1000000"])
    socket = memory.uri.split("socket=", 1)[1]
    for name in (memory.uri, f"nbd:unix:{socket}"):
        same_as_qemu(capsys, name)
    image = tmp_path / "served.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", image, "3M")
    served = qemu_nbd_server(image, fmt="raw", readonly=True)
    same_as_qemu(capsys, "-f", "qcow2", served.uri)
    shown = json.loads(ours(capsys, "--output=json", "-f", "qcow2", served.uri)[1])
    assert shown["format"] == "qcow2" and shown["cluster-size"] == 4096
    assert "actual-size" not in shown


def test_nbd_nodes_in_block_options_are_named_as_qemu_names_them(
    tmp_path: Path,
    nbdkit_server: nbd_servers.NbdkitLauncher,
    qemu_nbd_server: nbd_servers.QemuNbdLauncher,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An NBD export given by block options (``json:`` or ``--image-opts``, directly or
    under a format) is named by its URI, and as for a URI given as is, one without an
    export name has no ``/`` before the query: ``nbd+unix://?socket=PATH``,
    ``nbd://HOST:PORT``."""
    image = tmp_path / "served.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "1M")
    served = qemu_nbd_server(image, fmt="raw", readonly=True)
    socket = served.uri.split("socket=", 1)[1]
    unix = f'{{"driver":"nbd","server":{{"type":"unix","path":"{socket}"}}}}'
    for args in (
        [f'json:{{"driver":"qcow2","file":{unix}}}'],
        [f"json:{unix}"],
        ["--image-opts", f"driver=qcow2,file.driver=nbd,file.path={socket}"],
    ):
        same_as_qemu(capsys, *args)
    shown = ours(capsys, "--output=json", f"json:{unix}")[1]
    assert json.loads(shown)["filename"] == f"nbd+unix://?socket={socket}"
    memory = nbdkit_server("memory", ["size=1M"], tcp=True)
    assert isinstance(memory.address, tuple)  # (TCP: a host and a port)
    host, port = memory.address
    same_as_qemu(capsys, "--image-opts", f"driver=nbd,host={host},port={port}")
    same_as_qemu(capsys, "--image-opts", f"driver=nbd,host={host},port={port},export=x")


# ------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("setup", "args"),
    [
        pytest.param("", ["missing.qcow2"], id="missing-file"),
        pytest.param("mkdir folder", ["folder"], id="directory"),
        pytest.param("mkdir folder", ["-f", "qcow2", "folder"], id="directory-as-qcow2"),
        pytest.param("", [""], id="empty-name"),
        pytest.param("truncate -s 100 short.qcow2", ["-f", "qcow2", "short.qcow2"], id="short"),
        pytest.param("truncate -s 0 empty.img", ["-f", "vpc", "empty.img"], id="empty-as-vpc"),
        pytest.param("qcow2", ["-f", "vmdk", "q.qcow2"], id="qcow2-as-vmdk"),
        pytest.param("qcow2 unknown-feature", ["q.qcow2"], id="unknown-incompatible-feature"),
        pytest.param("qcow2", ["-f", "nonsense", "q.qcow2"], id="unknown-format"),
        pytest.param("", ["nbd+unix:///?socket=gone.sock"], id="nbd-socket-missing"),
    ],
)
def test_bad_input_is_one_line_and_status_1(tmp_path: Path, setup: str, args: list[str]) -> None:
    """What qemu-img info refuses, trioconv info refuses too: status 1, nothing on
    stdout (a script that parses it gets no half document), one ``trioconv:`` line on
    stderr that names the image, and no traceback."""
    if setup.startswith("qcow2"):
        qemu_img("create", "-q", "-f", "qcow2", tmp_path / "q.qcow2", "1M")
        if setup.endswith("unknown-feature"):
            with (tmp_path / "q.qcow2").open("r+b") as f:
                f.seek(72)  # incompatible features: bit 63, which no QEMU knows
                f.write((1 << 63).to_bytes(8, "big"))
    elif setup:
        run(*setup.split(), cwd=tmp_path)
    qemu = run(require_tool("qemu-img"), "info", *args, check=False, cwd=tmp_path)
    assert qemu.returncode == 1 and qemu.stdout == ""
    for output in ("human", "json"):
        mine = trioconv_cli("info", "--output", output, *args, cwd=tmp_path)
        assert (mine.returncode, mine.stdout) == (1, ""), mine.stderr
        assert mine.stderr.startswith("trioconv: ") and mine.stderr.count("\n") == 1
        assert "Traceback" not in mine.stderr
        assert (args[-1] or "''") in mine.stderr


# ------------------------------------------------------------- the human layout


def test_human_layout_of_qemu_imgs_own_json(tmp_path: Path) -> None:
    """The human text is a layout of the JSON document: given qemu-img's own JSON for
    an image, trioconv's layout prints qemu-img's own human text, line for line. That
    holds whatever a driver reports, also keys that no trioconv driver fills in yet,
    such as ``encrypted`` (qemu-img shows an AES-encrypted qcow2 image, which trioconv
    does not open, with an ``encrypted: yes`` line after the disk size)."""
    base = tmp_path / "base.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", base, "1M")
    qemu_img("snapshot", "-c", "first", base)
    qemu_img("bitmap", "--add", base, "changes")
    qemu_img(
        "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", tmp_path / "top.qcow2"
    )
    qemu_img(
        "create",
        "-q",
        "-f",
        "vmdk",
        "-o",
        "subformat=twoGbMaxExtentFlat",
        tmp_path / "f.vmdk",
        "1M",
    )
    secret = "secret,id=key,data=password"
    opts = "encrypt.format=aes,encrypt.key-secret=key"
    aes = tmp_path / "aes.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", "--object", secret, "-o", opts, aes, "1M")
    for image in ("top.qcow2", "f.vmdk", "aes.qcow2"):
        document = json.loads(theirs("--output=json", "--backing-chain", image, cwd=tmp_path))
        rendered = io.StringIO()
        with contextlib.redirect_stdout(rendered):
            for i, data in enumerate(document):
                if i:
                    print()
                cli._print_human(data)
        assert rendered.getvalue() == theirs("--backing-chain", image, cwd=tmp_path), image
    assert "\nencrypted: yes\ncluster_size: 65536\n" in theirs(aes)


def _info_bytes(program: list[str], *args: str | os.PathLike[str]) -> bytes:
    done = subprocess.run([*program, "info", *args], capture_output=True, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_snapshot_ids_and_names_are_read_as_qemu_reads_them(tmp_path: Path) -> None:
    """Snapshot IDs and names are C strings to QEMU: cut at the first NUL, and bytes that
    are not UTF-8 printed as they are; the VM state size is a signed number."""
    require_tool("qemu-img")
    image = tmp_path / "snap.qcow2"
    qemu_img("create", "-q", "-f", "qcow2", image, "1M")
    qemu_img("snapshot", "-c", "abcdefgh", image)
    data = bytearray(image.read_bytes())
    at = data.index(b"abcdefgh")
    data[at : at + 8] = b"ab\xffd\0fgh"
    image.write_bytes(bytes(data))
    for args in ([image], ["--output=json", image]):
        mine = _info_bytes([sys.executable, "-m", "trioconv"], *args)
        assert mine == _info_bytes(["qemu-img"], *args)
    assert b"ab\xffd " in _info_bytes([sys.executable, "-m", "trioconv"], image)


def test_a_backing_file_beside_a_doubled_slash_is_named_as_qemu_names_it(tmp_path: Path) -> None:
    """The backing file's full name joins the image's folder as written ("dir//")."""
    require_tool("qemu-img")
    folder = tmp_path / "dir"
    folder.mkdir()
    qemu_img("create", "-q", "-f", "qcow2", folder / "base.qcow2", "1M")
    qemu_img("create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", folder / "top.qcow2")
    name = f"{folder}//top.qcow2"
    for args in ([name], ["--output=json", name], ["--backing-chain", name]):
        mine = _info_bytes([sys.executable, "-m", "trioconv"], *args)
        assert mine == _info_bytes(["qemu-img"], *args)
    assert f"{folder}//base.qcow2".encode() in _info_bytes(["qemu-img"], name)

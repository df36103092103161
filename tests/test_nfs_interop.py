"""trioconv's NFSv3 client against ganesha exports set up as deployments set them up.

:mod:`tests.test_nfs` covers ``/export`` as the tests' own open folder. Here are the
other exports of :data:`tests.nfs_server.EXTRA_EXPORTS`: root squash and all squash
(the server, not the client, decides who writes), a read-only export, and one whose
FSINFO lowers the largest READ and WRITE to 1 KiB (and scripted servers of odd or
no limits). And on ``/export``, what a drop-in for ``qemu-img convert`` must do as
QEMU does: names with spaces and percent escapes, sizes that are not whole sectors,
``-n`` into a bigger or a smaller file, qcow2 and vmdk files created as qemu-img
creates them, a relative backing file on the server.

Every failure must be one ``trioconv:`` line, leave the target as it was and remove a
target the conversion created; every result is checked with ``qemu-img``.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

import trioconv
from trioconv import ConvertError, ConvertOptions
from trioconv.protocols.memory import MemoryDriver
from trioconv.protocols.nfs import _proto as proto

from . import nfs_server as nfs_server_mod
from ._faults import MiB, make_mixed_src, one_line_error
from .conftest import ImageMaker, assert_identical, run, trioconv_cli
from .fake_nfs import FakeNFSServer
from .nfs_server import NFSServer

nfs_server = nfs_server_mod.nfs_server

_names = itertools.count()
#: The squashed identity of the ``all-squash`` export (its Anonymous_Uid and _Gid).
SQUASHED = 4321
#: The ``small-io`` export's MaxRead and MaxWrite: FSINFO's rtmax and wtmax.
SMALL_IO = 1024


def unique(stem: str) -> str:
    """A name no other test uses in the shared exports."""
    return f"{stem}-{os.getpid()}-{next(_names)}"


def url(export: str, name: str, query: str = "") -> str:
    """``nfs://`` URL of ``name`` in ``export`` (``query`` without the ``?``)."""
    return f"nfs://127.0.0.1/{export}/{name}" + (f"?{query}" if query else "")


@pytest.fixture
def mixed_src(make_image: ImageMaker) -> Path:
    """8 MiB raw: data, written zeroes, holes, a data run that ends unaligned."""
    return make_mixed_src(make_image)


@pytest.fixture
def closed_folder(nfs_server: NFSServer) -> Iterator[Path]:
    """The root-squash export's folder, root's and 0755 for the test: writable by root
    locally, but not by the anonymous user the server maps root to."""
    folder = nfs_server.folder("root-squash")
    folder.chmod(0o755)
    try:
        yield folder
    finally:
        folder.chmod(0o777)


# -- who may write: squashing and read-only exports ---------------------------------------


def test_root_squash_refuses_to_create_in_a_folder_only_root_may_write(
    nfs_server: NFSServer, mixed_src: Path, closed_folder: Path
) -> None:
    """Our uid 0 is the anonymous user there: CREATE is refused, in one line, and
    nothing is left (qemu-img: ``creat call failed ... NFS3ERR_ACCES``)."""
    for fmt in ("raw", "qcow2"):
        name = unique("squashed") + "." + fmt
        target = url("root-squash", name)
        line = one_line_error(trioconv_cli("convert", "-O", fmt, mixed_src, target))
        assert target in line and "Permission denied" in line
        assert list(closed_folder.iterdir()) == []


def test_all_squash_creates_as_the_anonymous_user(nfs_server: NFSServer, mixed_src: Path) -> None:
    """Whatever ``?uid=`` says, the file is created as the squashed user, mode 0600,
    and that user can then write it: the conversion is exact."""
    folder = nfs_server.folder("all-squash")
    name = unique("created") + ".img"
    result = trioconv_cli(
        "convert", "-O", "raw", mixed_src, url("all-squash", name, "uid=1000&gid=1000")
    )
    assert result.returncode == 0, result.stderr
    made = (folder / name).stat()
    assert (made.st_uid, made.st_gid, made.st_mode & 0o777) == (SQUASHED, SQUASHED, 0o600)
    assert_identical(mixed_src, folder / name)


def test_all_squash_refuses_a_file_the_anonymous_user_cannot_write(
    nfs_server: NFSServer, mixed_src: Path
) -> None:
    """``-n`` into root's 0644 file: refused before a byte is written."""
    path = nfs_server.folder("all-squash") / (unique("roots") + ".img")
    path.write_bytes(b"\xee" * (8 * MiB))
    path.chmod(0o644)
    line = one_line_error(
        trioconv_cli("convert", "-n", "-O", "raw", mixed_src, url("all-squash", path.name))
    )
    assert "Permission denied" in line and "does not let this client write it" in line
    assert path.read_bytes() == b"\xee" * (8 * MiB)


async def test_all_squash_removes_a_target_it_created_when_the_copy_fails(
    nfs_server: NFSServer,
) -> None:
    """The squashed user created it, and as that user the file is removed again."""
    name = unique("failed") + ".img"
    source = MemoryDriver(data=os.urandom(8 * MiB), block_status=False)
    source.fail_read_at = 6 * MiB
    with pytest.raises(ConvertError):
        await trioconv.convert(
            source, url("all-squash", name, "uid=1000&gid=1000"), ConvertOptions(parallel=2)
        )
    assert not (nfs_server.folder("all-squash") / name).exists()


def test_a_read_only_export_as_the_target(nfs_server: NFSServer, mixed_src: Path) -> None:
    """A new file: ``Read-only file system``; an existing one with ``-n``: refused when
    opened (ACCESS says read only), the file as it was."""
    folder = nfs_server.folder("read-only")
    for fmt in ("raw", "qcow2"):
        name = unique("new") + "." + fmt
        line = one_line_error(trioconv_cli("convert", "-O", fmt, mixed_src, url("read-only", name)))
        assert "Read-only file system" in line
        assert not (folder / name).exists()
    existing = folder / (unique("existing") + ".img")
    existing.write_bytes(b"\xee" * (8 * MiB))
    existing.chmod(0o666)
    line = one_line_error(
        trioconv_cli("convert", "-n", "-O", "raw", mixed_src, url("read-only", existing.name))
    )
    assert "does not let this client write it" in line
    assert existing.read_bytes() == b"\xee" * (8 * MiB)
    # Reading from it is what a read-only export is for.
    existing.write_bytes(mixed_src.read_bytes())
    out = nfs_server.root / (unique("out") + ".img")
    result = trioconv_cli("convert", "-O", "raw", url("read-only", existing.name), out)
    assert result.returncode == 0, result.stderr
    assert_identical(mixed_src, out)
    out.unlink()


# -- FSINFO's rtmax and wtmax --------------------------------------------------------------


@pytest.fixture
def call_sizes(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[int]]:
    """The count of every READ and WRITE call this process sends (and of each
    COMMIT: 0 is the whole file)."""
    sizes: dict[str, list[int]] = {"READ": [], "WRITE": [], "COMMIT": []}
    encode_read, encode_write_head = proto.encode_read, proto.encode_write_head
    encode_commit = proto.encode_commit

    def read(fh: bytes, offset: int, count: int) -> bytes:
        sizes["READ"].append(count)
        return encode_read(fh, offset, count)

    def write_head(fh: bytes, offset: int, count: int, stable: proto.Stable) -> bytes:
        sizes["WRITE"].append(count)
        return encode_write_head(fh, offset, count, stable)

    def commit(fh: bytes, offset: int = 0, count: int = 0) -> bytes:
        sizes["COMMIT"].append(count)
        return encode_commit(fh, offset, count)

    monkeypatch.setattr(proto, "encode_read", read)
    monkeypatch.setattr(proto, "encode_commit", commit)
    monkeypatch.setattr(proto, "encode_write_head", write_head)
    return sizes


async def test_reads_and_writes_keep_to_the_exports_rtmax_and_wtmax(
    nfs_server: NFSServer, tmp_path: Path, call_sizes: dict[str, list[int]]
) -> None:
    """The export says 1 KiB at most: no READ or WRITE asks for more (a server may
    refuse a bigger one, or drop the connection), and 16 requests in flight, out of
    order, still give an exact copy."""
    data = os.urandom(256 * 1024 + 777)
    src = tmp_path / "random.img"
    src.write_bytes(data)
    name = unique("small") + ".img"
    target = url("small-io", name)
    options = ConvertOptions(parallel=16, oob_writes=True, source_format="raw")
    await trioconv.convert(str(src), target, options)
    assert call_sizes["WRITE"] and max(call_sizes["WRITE"]) <= SMALL_IO
    assert call_sizes["COMMIT"]  # unstable WRITEs, made durable (verifier checked) at the end
    assert_identical(src, nfs_server.folder("small-io") / name)
    back = tmp_path / "back.img"
    await trioconv.convert(target, str(back), options)
    assert call_sizes["READ"] and max(call_sizes["READ"]) <= SMALL_IO
    assert_identical(src, back)
    async with trioconv.open_image(target, "raw") as image:
        assert await image.pread(1000, 3000) == data[1000:4000]


@pytest.mark.parametrize(
    ("rtmax", "most"), [(1000, 1000), (0, 4096)], ids=["odd-limit", "no-limit-stated"]
)
async def test_an_odd_or_missing_transfer_limit(
    tmp_path: Path, call_sizes: dict[str, list[int]], rtmax: int, most: int
) -> None:
    """A limit that is no power of two is kept to as well; FSINFO's 0 (a server that
    states none) means small calls that any server takes, never an endless loop."""
    data = os.urandom(40_000)
    src = tmp_path / "src.img"
    src.write_bytes(data)
    with FakeNFSServer(bytes(len(data)), transfer=rtmax) as server:
        options = ConvertOptions(no_create=True, source_format="raw", parallel=4)
        await trioconv.convert(str(src), server.url, options)
        assert server.file is not None and bytes(server.file) == data
        async with trioconv.open_image(server.url, "raw") as image:
            assert await image.pread(0, len(data)) == data
    assert max(call_sizes["WRITE"]) == max(call_sizes["READ"]) == most


# -- names, sizes and -n as qemu-img has them ---------------------------------------------


def test_names_with_spaces_and_percent_escapes(nfs_server: NFSServer, mixed_src: Path) -> None:
    """``%20`` is a space, ``%25`` a percent sign, as QEMU decodes the URL's path."""
    for local, escaped in (("with space.img", "with%20space.img"), ("pct%41.img", "pct%2541.img")):
        folder = nfs_server.export_dir / unique("names")
        folder.mkdir()
        (folder / local).write_bytes(mixed_src.read_bytes())
        out = folder.parent / (folder.name + ".out")
        nfs_url = nfs_server.url(f"{folder.name}/{escaped}")
        result = trioconv_cli("convert", "-O", "raw", nfs_url, out)
        assert result.returncode == 0, result.stderr
        assert_identical(mixed_src, out)
        theirs = folder.parent / (folder.name + ".qemu")
        run("qemu-img", "convert", "-O", "raw", nfs_url, theirs)
        assert out.read_bytes() == theirs.read_bytes()


def test_sizes_that_are_not_whole_sectors(nfs_server: NFSServer, tmp_path: Path) -> None:
    """QEMU rounds an image's size up to 512 bytes: a 3,000,000-byte source makes a
    3,000,320-byte file, and ``-n`` into a file 1 byte short of the source grows it
    to that size, as ``qemu-img convert -n`` does; a file shorter than the rounded
    size is refused, untouched."""
    src = tmp_path / "odd.img"
    src.write_bytes(os.urandom(3_000_000))
    ours, theirs = unique("odd") + ".img", unique("odd-qemu") + ".img"
    assert trioconv_cli("convert", "-O", "raw", src, nfs_server.url(ours)).returncode == 0
    run("qemu-img", "convert", "-O", "raw", src, nfs_server.url(theirs))
    for name in (ours, theirs):
        assert (nfs_server.export_dir / name).stat().st_size == 3_000_320
    short = nfs_server.export_dir / (unique("short") + ".img")
    short.write_bytes(bytes(2_999_999))
    result = trioconv_cli("convert", "-n", "-O", "raw", src, nfs_server.url(short.name))
    assert result.returncode == 0, result.stderr
    assert short.stat().st_size == 3_000_320
    assert short.read_bytes()[:3_000_000] == src.read_bytes()
    smaller = nfs_server.export_dir / (unique("smaller") + ".img")
    smaller.write_bytes(b"\xee" * 2_000_000)
    line = one_line_error(
        trioconv_cli("convert", "-n", "-O", "raw", src, nfs_server.url(smaller.name))
    )
    assert "output file is smaller than input file" in line
    assert smaller.read_bytes() == b"\xee" * 2_000_000


def test_n_into_a_bigger_file_leaves_its_tail(nfs_server: NFSServer, mixed_src: Path) -> None:
    """``-n`` writes the source's bytes, ``--target-is-zero`` or not, and nothing past."""
    for extra in ([], ["--target-is-zero"]):
        path = nfs_server.export_dir / (unique("bigger") + ".img")
        tail = os.urandom(MiB + 123)
        path.write_bytes((bytes(8 * MiB) if extra else b"\xee" * (8 * MiB)) + tail)
        result = trioconv_cli(
            "convert", "-n", *extra, "-O", "raw", mixed_src, nfs_server.url(path.name)
        )
        assert result.returncode == 0, result.stderr
        written = path.read_bytes()
        assert written[: 8 * MiB] == mixed_src.read_bytes()
        assert written[8 * MiB :] == tail


@pytest.mark.parametrize(
    ("fmt", "options"),
    [("qcow2", []), ("qcow2", ["-c"]), ("vmdk", []), ("vmdk", ["-o", "subformat=streamOptimized"])],
    ids=["qcow2", "qcow2-compressed", "vmdk", "vmdk-stream"],
)
def test_created_images_are_what_qemu_img_leaves(
    nfs_server: NFSServer, mixed_src: Path, qemu_img: str, fmt: str, options: list[str]
) -> None:
    """Mode 0600, ``qemu-img check`` clean on the export's file, the same size as the
    file ``qemu-img convert`` leaves on the same export (a compressed stream aside:
    its size is the compressor's, not the transport's)."""
    ours, theirs = unique("ours") + "." + fmt, unique("theirs") + "." + fmt
    result = trioconv_cli("convert", "-O", fmt, *options, mixed_src, nfs_server.url(ours))
    assert result.returncode == 0, result.stderr
    run(qemu_img, "convert", "-O", fmt, *options, mixed_src, nfs_server.url(theirs))
    ours_path, theirs_path = nfs_server.export_dir / ours, nfs_server.export_dir / theirs
    assert ours_path.stat().st_mode & 0o777 == 0o600
    if "subformat=streamOptimized" not in options:  # (deflate output differs, locally too)
        assert ours_path.stat().st_size == theirs_path.stat().st_size
    run(qemu_img, "check", "-f", fmt, ours_path)
    assert_identical(mixed_src, ours_path, fmt_b=fmt)


def test_a_new_overlay_with_a_relative_backing_file_on_the_server(
    nfs_server: NFSServer, mixed_src: Path, tmp_path: Path, qemu_img: str
) -> None:
    """``-B sub/base.qcow2`` is looked up next to the new image, on the server (as
    QEMU looks it up), recorded as given, and the overlay is what qemu-img makes."""
    folder = nfs_server.export_dir / unique("chain")
    (folder / "sub").mkdir(parents=True)
    run(qemu_img, "convert", "-O", "qcow2", mixed_src, folder / "sub" / "base.qcow2")
    changed = tmp_path / "changed.img"
    data = bytearray(mixed_src.read_bytes())
    data[MiB : MiB + 65536] = b"\x55" * 65536
    changed.write_bytes(data)
    target = nfs_server.url(f"{folder.name}/top.qcow2")
    result = trioconv_cli(
        "convert", "-O", "qcow2", "-B", "sub/base.qcow2", "-F", "qcow2", changed, target
    )
    assert result.returncode == 0, result.stderr
    top = folder / "top.qcow2"
    assert top.stat().st_mode & 0o777 == 0o600
    run(qemu_img, "check", top)
    assert_identical(changed, top, fmt_b="qcow2")
    info = run(qemu_img, "info", "--output", "json", "-U", top).stdout
    assert '"backing-filename": "sub/base.qcow2"' in info
    # What qemu-img writes beside the same backing file locally (it copies all the
    # source's data, as -B does not compare with the backing file).
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "base.qcow2").write_bytes((folder / "sub" / "base.qcow2").read_bytes())
    run(
        qemu_img,
        "convert",
        "-O",
        "qcow2",
        "-B",
        "sub/base.qcow2",
        "-F",
        "qcow2",
        changed,
        "top.qcow2",
        cwd=tmp_path,
    )
    assert top.stat().st_size == (tmp_path / "top.qcow2").stat().st_size
    back = tmp_path / "back.img"
    assert trioconv_cli("convert", "-O", "raw", target, back).returncode == 0
    assert_identical(changed, back)


@pytest.mark.parametrize("fmt", ["raw", "qcow2"])
@pytest.mark.parametrize("export", ["read-only", "all-squash"])
def test_an_existing_file_it_may_not_write_is_left_as_it_was(
    nfs_server: NFSServer, mixed_src: Path, export: str, fmt: str
) -> None:
    """Without ``-n`` a conversion truncates an existing target: where the server does
    not let it, the file is neither truncated nor removed (trioconv did not create it)."""
    path = nfs_server.folder(export) / (unique("kept") + "." + fmt)
    path.write_bytes(b"\xee" * MiB)
    path.chmod(0o644)
    line = one_line_error(trioconv_cli("convert", "-O", fmt, mixed_src, url(export, path.name)))
    assert path.read_bytes() == b"\xee" * MiB, line

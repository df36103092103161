"""``trioconv info`` against ``qemu-img info``: same keys, same values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import run, trioconv_cli


def both(*args: str | Path) -> tuple[object, object]:
    ours = trioconv_cli("info", "--output", "json", *args)
    assert ours.returncode == 0, ours.stderr
    theirs = run("qemu-img", "info", "--output", "json", *args)
    return json.loads(ours.stdout), json.loads(theirs.stdout)


def same_keys(ours: dict[str, object], theirs: dict[str, object]) -> None:
    """Every key qemu-img reports (and trioconv knows) has the same value."""
    for key in (
        "virtual-size",
        "filename",
        "format",
        "actual-size",
        "dirty-flag",
        "cluster-size",
        "backing-filename",
        "backing-filename-format",
        "format-specific",
    ):
        if key in theirs:
            assert ours.get(key) == theirs[key], key


@pytest.mark.parametrize(
    "options",
    [
        "compat=1.1",
        "compat=0.10",
        "cluster_size=4096,refcount_bits=64,lazy_refcounts=on",
        "extended_l2=on,cluster_size=128k",
    ],
)
def test_qcow2_info_matches_qemu(tmp_path: Path, qemu_img: str, options: str) -> None:
    image = tmp_path / "disk.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", "-o", options, image, "64M")
    ours, theirs = both(image)
    assert isinstance(ours, dict) and isinstance(theirs, dict)
    same_keys(ours, theirs)


def test_backing_chain_matches_qemu(tmp_path: Path, qemu_img: str) -> None:
    base = tmp_path / "base.raw"
    run(qemu_img, "create", "-q", "-f", "raw", base, "32M")
    mid = tmp_path / "mid.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid)
    top = tmp_path / "top.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top)
    ours, theirs = both("--backing-chain", top)
    assert isinstance(ours, list) and isinstance(theirs, list)
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs, strict=True):
        assert a["format"] == b["format"]
        assert a["virtual-size"] == b["virtual-size"]
        assert a.get("backing-filename") == b.get("backing-filename")
    human = trioconv_cli("info", "--backing-chain", top)
    assert human.returncode == 0, human.stderr
    assert human.stdout.count("image: ") == 3
    assert "backing file: mid.qcow2" in human.stdout
    assert "compression type: zlib" in human.stdout


def test_raw_info_matches_qemu(tmp_path: Path, qemu_img: str) -> None:
    image = tmp_path / "disk.img"
    run(qemu_img, "create", "-q", "-f", "raw", image, "10M")
    ours, theirs = both(image)
    assert isinstance(ours, dict) and isinstance(theirs, dict)
    same_keys(ours, theirs)


def test_snapshots_listed_like_qemu(tmp_path: Path, qemu_img: str, qemu_io: str) -> None:
    image = tmp_path / "snap.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", image, "8M")
    run(qemu_io, "-f", "qcow2", "-c", "write -P 1 0 1M", image)
    run(qemu_img, "snapshot", "-c", "before", image)
    run(qemu_img, "snapshot", "-c", "after", image)
    ours, theirs = both(image)
    assert isinstance(ours, dict) and isinstance(theirs, dict)
    assert ours["snapshots"] == theirs["snapshots"]
    human = trioconv_cli("info", image).stdout
    qemu_human = run(qemu_img, "info", image).stdout
    ours_table = human[human.index("Snapshot list:") :].splitlines()[:4]
    theirs_table = qemu_human[qemu_human.index("Snapshot list:") :].splitlines()[:4]
    assert ours_table == theirs_table


@pytest.mark.parametrize(
    ("fmt", "options"),
    [
        ("raw", ""),
        ("qcow2", ""),
        ("qcow2", "compat=0.10,cluster_size=4096"),
        ("qcow2", "extended_l2=on"),
        ("vmdk", ""),
        ("vmdk", "subformat=streamOptimized"),
        ("vpc", ""),
        ("vhdx", ""),
        ("vdi", "static=on"),
        ("qed", ""),
    ],
)
@pytest.mark.parametrize("output", ["json", "human"])
def test_info_text_is_qemu_imgs(
    tmp_path: Path, qemu_img: str, qemu_io: str, fmt: str, options: str, output: str
) -> None:
    """Byte for byte: scripts compare and parse this text (the JSON keys come in
    qemu's hash-table order)."""
    base = tmp_path / "base.qcow2"
    image = tmp_path / f"disk.{fmt}"
    args = ["-o", options] if options else []
    if fmt in ("qcow2", "qed"):
        run(qemu_img, "create", "-q", "-f", "qcow2", base, "8M")
        args += ["-b", base.name, "-F", "qcow2"]
    run(qemu_img, "create", "-q", "-f", fmt, *args, image, "8M")
    if fmt == "qcow2":
        run(qemu_io, "-f", fmt, "-c", "write -P 1 0 64k", image)
        run(qemu_img, "snapshot", "-c", "s1", image)
    for chain in ([], ["--backing-chain"]):
        ours = trioconv_cli("info", "--output", output, *chain, image)
        theirs = run(qemu_img, "info", "--output", output, *chain, image)
        assert ours.returncode == 0, ours.stderr
        assert ours.stdout == theirs.stdout


@pytest.mark.parametrize("fmt", ["qcow2", "qed", "vmdk"])
def test_info_on_an_image_whose_backing_file_is_missing(tmp_path: Path, fmt: str) -> None:
    """qemu-img info looks at the image alone: the missing backing file is shown by
    name (a VMDK delta disk's parent too, with its format); with --backing-chain it is
    an error, as there."""
    base = tmp_path / f"base.{fmt}"
    top = tmp_path / f"top.{fmt}"
    run("qemu-img", "create", "-q", "-f", fmt, base, "1M")
    run("qemu-img", "create", "-q", "-f", fmt, "-b", base.name, "-F", fmt, top)
    base.unlink()
    for args in ([], ["--output=json"]):
        ours = trioconv_cli("info", *args, top)
        assert ours.returncode == 0, ours.stderr
        assert ours.stdout == run("qemu-img", "info", *args, top).stdout
    chain = trioconv_cli("info", "--backing-chain", top)
    assert chain.returncode == 1 and chain.stdout == ""
    assert len(chain.stderr.splitlines()) == 1 and base.name in chain.stderr


def _same_text(tmp_path: Path, *args: str) -> None:
    """``trioconv info ARGS`` prints what ``qemu-img info ARGS`` prints, run in tmp_path."""
    ours = trioconv_cli("info", *args, cwd=tmp_path)
    theirs = run("qemu-img", "info", *args, cwd=tmp_path)
    assert ours.returncode == 0, ours.stderr
    assert ours.stdout == theirs.stdout


def test_empty_lists_printed_as_qemu_prints_them(tmp_path: Path, qemu_img: str) -> None:
    """A disabled bitmap's flags are an empty list: ``[`` and ``]`` on two lines in
    qemu-img's JSON, byte for byte."""
    run(qemu_img, "create", "-q", "-f", "qcow2", tmp_path / "b.qcow2", "1M")
    run(qemu_img, "bitmap", "--add", "--disable", tmp_path / "b.qcow2", "quiet")
    _same_text(tmp_path, "--output=json", "b.qcow2")
    assert '"flags": [\n' in trioconv_cli("info", "--output=json", tmp_path / "b.qcow2").stdout


def test_info_on_images_qemu_img_shows_as_they_are(tmp_path: Path, qemu_img: str) -> None:
    """Images that reading refuses or that need care, shown as qemu-img shows them: a
    qcow2 over a raw backing file with no recorded format (as older QEMU wrote them; a
    conversion refuses to probe it, info does not need to), a qcow2 whose backing
    chain loops (shown alone; --backing-chain names the loop), a dirty one, one with an
    external data file, one whose data file is gone (shown; converting it is refused),
    and names given with a ``file:`` prefix."""
    run(qemu_img, "create", "-q", "-f", "raw", tmp_path / "base.raw", "4M")
    old = tmp_path / "old.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", old)
    header = bytearray(old.read_bytes()[:4096])
    ext = header.index(b"\xe2\x79\x2a\xca")  # the backing format extension, first
    header[ext : ext + 4] = bytes(4)  # now the end of the extensions: format forgotten
    with old.open("r+b") as f:
        f.write(header)
    dirty = tmp_path / "dirty.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", dirty, "4M")
    with dirty.open("r+b") as f:  # incompatible feature bit 0: dirty
        f.seek(72)
        f.write((1).to_bytes(8, "big"))
    opts = "data_file=ext.data,data_file_raw=on"
    run(qemu_img, "create", "-q", "-f", "qcow2", "-o", opts, "ext.qcow2", "4M", cwd=tmp_path)
    run(
        qemu_img,
        "create",
        "-q",
        "-f",
        "qcow2",
        "-o",
        "data_file=gone.data",
        "lost.qcow2",
        "4M",
        cwd=tmp_path,
    )
    (tmp_path / "gone.data").unlink()  # info names the data file; reading needs it
    loop_a, loop_b = tmp_path / "a.qcow2", tmp_path / "b.qcow2"
    run(qemu_img, "create", "-q", "-f", "qcow2", loop_a, "1M")
    run(qemu_img, "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", loop_b)
    run(qemu_img, "rebase", "-u", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", loop_a)
    (tmp_path / "with:colon.qcow2").write_bytes(dirty.read_bytes())
    for output in ("human", "json"):
        for args in (
            ["old.qcow2"],
            ["--backing-chain", "old.qcow2"],
            ["dirty.qcow2"],
            ["ext.qcow2"],
            ["lost.qcow2"],
            ["--backing-chain", "lost.qcow2"],
            ["a.qcow2"],
            ["file:dirty.qcow2"],
            ["file:with:colon.qcow2"],
        ):
            _same_text(tmp_path, "--output", output, *args)
    lost = trioconv_cli("convert", "lost.qcow2", "out.raw", cwd=tmp_path)
    assert lost.returncode == 1 and lost.stderr.count("\n") == 1, lost
    assert "gone.data" in lost.stderr and not (tmp_path / "out.raw").exists()
    looped = trioconv_cli("info", "--backing-chain", "a.qcow2", cwd=tmp_path)
    assert looped.returncode == 1 and looped.stdout == ""
    assert looped.stderr.count("\n") == 1 and "infinite loop" in looped.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        pytest.param([], "Expecting one image file name", id="no-image"),
        pytest.param(["a.img", "b.img"], "Expecting one image file name", id="two-images"),
        pytest.param(
            ["--output", "xml", "a.img"],
            "--output must be used with human or json as argument.",
            id="bad-output",
        ),
    ],
)
def test_info_usage_errors_say_what_qemu_img_says(args: list[str], message: str) -> None:
    out = trioconv_cli("info", *args)
    assert out.returncode == 1 and out.stdout == ""
    assert out.stderr == f"trioconv: {message}\n"

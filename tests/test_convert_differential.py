"""``trioconv convert`` next to ``qemu-img convert``: same command line, same result.

Each test makes its images with qemu-img and qemu-io, runs both tools with the same
options on copies, and lets qemu-img judge the two targets: ``compare`` (what a guest
reads), ``check`` (the metadata) and ``map`` (what is data, what is zero and what is
left unallocated). Allocation differences count only when someone would see them:
data where qemu-img leaves zeroes or a hole on a new target, or a hole on ``-n`` where
qemu-img writes (which would show what lay below).

The first tests pin down what the random comparison once found; the last one runs a
handful of seeded random cases of that comparison, quickly.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from trioconv.convert.pipeline import RunJoiner, RunKind

from .conftest import assert_identical, create_filled, qemu_map, require_tool, run, trioconv_cli

#: Formats both tools create and read, and those ``qemu-img check`` can check.
FORMATS = ("raw", "qcow2", "vmdk", "vdi", "vpc")
CHECKABLE = frozenset({"qcow2", "vmdk", "vdi"})


@pytest.fixture(autouse=True)
def _tools() -> None:
    require_tool("qemu-img")
    require_tool("qemu-io")


def convert_both(tmp_path: Path, args: list[str], sources: list[Path], fmt: str) -> list[Path]:
    """Run ``qemu-img convert ARGS SOURCES out-qemu`` and ``trioconv convert`` likewise;
    both must succeed. Returns the two targets, qemu-img's first."""
    out_q, out_t = tmp_path / f"out-qemu.{fmt}", tmp_path / f"out-trio.{fmt}"
    run("qemu-img", "convert", *args, *sources, out_q)
    result = trioconv_cli("convert", *args, *sources, out_t)
    assert result.returncode == 0, result.stderr
    return [out_q, out_t]


def _at(extents: list[dict[str, Any]], pos: int) -> tuple[bool, bool]:
    """``(data, zero)`` of the ``qemu-img map`` entry that holds byte ``pos``."""
    for e in extents:
        if e["start"] <= pos < e["start"] + e["length"]:
            return bool(e["data"]), bool(e["zero"])
    return False, True


def visible_map_differences(
    reference: list[dict[str, Any]], ours: list[dict[str, Any]], *, no_create: bool
) -> list[str]:
    """Where ``ours`` is allocated differently from ``reference`` in a way that matters:
    data where qemu-img has none (a new target), or a hole through which the layer below
    shows where qemu-img wrote (``-n``)."""
    out: list[str] = []
    for pos in sorted({int(e["start"]) for e in reference + ours}):
        ref_data, ref_zero = _at(reference, pos)
        data, zero = _at(ours, pos)
        if not no_create and data and not ref_data:
            out.append(f"@{pos}: data where qemu-img has zero={ref_zero}")
        if no_create and not data and not zero and (ref_data or ref_zero):
            out.append(f"@{pos}: hole where qemu-img wrote")
    return out


def layout(path: Path, fmt: str = "qcow2") -> list[tuple[int, int, bool, bool]]:
    """``qemu-img map`` without the host offsets: ``(start, length, data, zero)``."""
    return [(e["start"], e["length"], e["data"], e["zero"]) for e in qemu_map(path, fmt)]


# -- what the random comparison found ----------------------------------------------------


def test_odd_sparse_size_keeps_qemu_zero_ranges(tmp_path: Path) -> None:
    """``-S 1536``: qemu-img aligns zero ranges to the largest power of two in it (1 KiB)
    and skips any such range at least 1536 bytes long, so 2 KiB of zeroes at 1 KiB stay
    unallocated - not only the 1536-byte block at 1536 a fixed 1536-byte grid would find."""
    src = create_filled(
        tmp_path / "s.raw",
        "raw",
        "4096",
        "write -P 1 0 1024",
        "write -P 0 1024 2048",
        "write -P 2 3072 1024",
    )
    args = ["-f", "raw", "-O", "qcow2", "-o", "cluster_size=512", "-S", "1536"]
    out_q, out_t = convert_both(tmp_path, args, [src], "qcow2")
    assert_identical(out_q, out_t, "qcow2", "qcow2")
    assert layout(out_t) == layout(out_q)


def test_odd_sparse_size_short_zero_run_stays_data(tmp_path: Path) -> None:
    """``-S 3k``: a 2 KiB zero run between data is shorter than 3 KiB and is written as
    data, while 4 KiB of zeroes (two aligned 2 KiB blocks) are skipped."""
    src = create_filled(
        tmp_path / "s.raw",
        "raw",
        "16384",
        "write -P 1 0 2048",
        "write -P 0 2048 2048",
        "write -P 2 4096 2048",
        "write -P 0 6144 4096",
        "write -P 3 10240 6144",
    )
    args = ["-f", "raw", "-O", "qcow2", "-o", "cluster_size=512", "-S", "3k"]
    out_q, out_t = convert_both(tmp_path, args, [src], "qcow2")
    assert_identical(out_q, out_t, "qcow2", "qcow2")
    assert layout(out_t) == layout(out_q)


def test_uncached_concatenation_keeps_holes_of_a_misaligned_source(tmp_path: Path) -> None:
    """``-T none`` with a 1536-byte first source: the second source's holes start at
    1536 + a multiple of 4 KiB in the target. Its O_DIRECT alignment (4 KiB) means
    nothing on the target's grid there, so its holes must stay holes to the sector, as
    qemu-img leaves them, not shrink to whole 4 KiB target blocks with zeroes written
    around them."""
    first = create_filled(tmp_path / "a.raw", "raw", "1536", "write -P 1 0 1536")
    second = create_filled(tmp_path / "b.raw", "raw", "64k", "write -P 2 0 4k", "write -P 3 32k 4k")
    args = ["-T", "none", "-f", "raw", "-O", "qcow2", "-o", "cluster_size=512"]
    out_q, out_t = convert_both(tmp_path, args, [first, second], "qcow2")
    assert_identical(out_q, out_t, "qcow2", "qcow2")
    assert layout(out_t) == layout(out_q)


def test_backing_target_gets_one_zero_write_per_zero_range(tmp_path: Path) -> None:
    """``-B`` from a vpc image whose block status splits a zero range in two (at 1536):
    the two halves are one zero range, as qemu-img sees it, so the first cluster becomes
    a zero cluster - not a partial zero write that copies the cluster up from the backing
    file and leaves it allocated."""
    src = create_filled(tmp_path / "s.vpc", "vpc", "1M", "write -P 1 273408 4096")
    backing = tmp_path / "B.raw"
    run("qemu-img", "convert", "-f", "vpc", "-O", "raw", src, backing)
    args = ["-f", "vpc", "-O", "qcow2", "-B", str(backing), "-F", "raw"]
    out_q, out_t = convert_both(tmp_path, args, [src], "qcow2")
    assert_identical(out_q, out_t, "qcow2", "qcow2")
    assert layout(out_t) == layout(out_q)


def test_run_joiner_joins_zero_pieces_and_lets_long_runs_go() -> None:
    """The planner's joiner: zero pieces become one run, data passes through, and a run
    past the limit is let go at an aligned offset, its unaligned rest held back."""
    joiner = RunJoiner(align=4096, limit=64 * 1024)
    assert joiner.feed(0, 1536, RunKind.ZERO) == []
    assert joiner.feed(1536, 2560, RunKind.ZERO) == []
    assert joiner.feed(4096, 100, RunKind.DATA) == [
        (0, 4096, RunKind.ZERO),
        (4096, 100, RunKind.DATA),
    ]
    assert joiner.feed(4196, 70000, RunKind.ZERO) == [(4196, 73728 - 4196, RunKind.ZERO)]
    assert joiner.finish() == [(73728, 4196 + 70000 - 73728, RunKind.ZERO)]
    assert joiner.finish() == []


def test_backing_target_past_the_source_backing_end_reads_as_the_source(tmp_path: Path) -> None:
    """``-B``: past the end of the source's (shorter) backing image the source reads as
    zeroes, and so does the target, whatever its own backing file holds there. (qemu-img
    leaves that range unallocated in the target, so that it reads the target's backing
    file - data here: a known difference, kept so that the copy reads as its source.)"""
    base = create_filled(tmp_path / "base.raw", "raw", "64k", "write -P 1 0 64k")
    src = create_filled(tmp_path / "s.qcow2", "qcow2", "128k", backing=str(base), backing_fmt="raw")
    backing = create_filled(tmp_path / "B.raw", "raw", "128k", "write -P 9 0 128k")
    args = ["-f", "qcow2", "-O", "qcow2", "-B", str(backing), "-F", "raw"]
    _, out_t = convert_both(tmp_path, args, [src], "qcow2")
    flat = tmp_path / "flat.raw"
    run("qemu-img", "convert", "-f", "qcow2", "-O", "raw", out_t, flat)
    # (Below 64 KiB the target's backing file stands for the source's, as -B says.)
    assert flat.read_bytes()[65536:] == bytes(65536)


def test_backing_target_from_fixed_vpc_reads_as_source(tmp_path: Path) -> None:
    """``-B`` from a fixed vpc image: the engine writes zeroes over ``[4096, 98304)``,
    which crosses one cluster edge (64 KiB) with no whole cluster inside. The target
    must read zeroes there, not the data its backing file holds at 94208."""
    src = create_filled(
        tmp_path / "s.vpc", "vpc", "1M", "write -z 98304 182272", options="subformat=fixed"
    )
    backing = create_filled(tmp_path / "B.raw", "raw", "1079296", "write -P 34 94208 4096")
    args = ["-f", "vpc", "-O", "qcow2", "-B", str(backing), "-F", "raw"]
    out_q, out_t = convert_both(tmp_path, args, [src], "qcow2")
    assert_identical(src, out_t, "vpc", "qcow2")
    assert_identical(out_q, out_t, "qcow2", "qcow2")


# -- the random comparison itself --------------------------------------------------------


@dataclass
class Case:
    """One random comparison: the sources, the shared options and how the targets start."""

    sources: list[tuple[Path, str]] = field(default_factory=list)
    args: list[str] = field(default_factory=list)
    out_fmt: str = "raw"
    no_create: bool = False
    target_size: int = 0
    prefill: str = "fresh"


def _size(path: Path, fmt: str) -> int:
    info = run("qemu-img", "info", "--output=json", "-f", fmt, path).stdout
    return int(json.loads(info)["virtual-size"])


def _random_writes(rng: random.Random, size: int, fmt: str, count: int) -> list[str]:
    """qemu-io commands: data, zero writes, discards and written zeroes, of sector or odd
    sizes at sector, page, cluster or byte offsets."""
    commands: list[str] = []
    for _ in range(count):
        align = rng.choice([512, 512, 4096, 65536, 1])
        offset = rng.randrange(size) // align * align
        length = min(rng.choice([512, 4096, 65536, 1024 * rng.randint(1, 300)]), size - offset)
        if align != 1:
            length = length // 512 * 512
        if length <= 0:
            continue
        kind = rng.random()
        if kind < 0.6:
            commands.append(f"write -P {rng.randint(1, 255)} {offset} {length}")
        elif kind < 0.8:
            commands.append(f"write -z {offset} {length}")
        elif kind < 0.9 and fmt in ("raw", "qcow2"):
            commands.append(f"discard {offset} {length}")
        else:
            commands.append(f"write -P 0 {offset} {length}")
    return commands


def _fill(path: Path, fmt: str, commands: list[str]) -> None:
    """Apply qemu-io commands one by one (a format may refuse an unaligned one)."""
    for command in commands:
        run("qemu-io", "-f", fmt, "-c", command, path, check=False)


def _random_source(rng: random.Random, tmp_path: Path, name: str) -> tuple[Path, str]:
    """A small image of a random format and size, maybe over a backing file."""
    fmt = rng.choice(FORMATS)
    size = rng.choice([rng.randint(1, 3 << 20), rng.randint(1, 6000) * 512, (2 << 20) + 512])
    path = tmp_path / f"{name}.{fmt}"
    create: list[str] = []
    if fmt == "qcow2":
        create = ["-o", f"cluster_size={rng.choice([512, 4096, 65536])}"]
        if rng.random() < 0.4:
            base = tmp_path / f"{name}-base.raw"
            run("qemu-img", "create", "-q", "-f", "raw", base, str(size))
            _fill(base, "raw", _random_writes(rng, size, "raw", rng.randint(1, 5)))
            create += ["-b", str(base), "-F", "raw"]
    run("qemu-img", "create", "-q", "-f", fmt, *create, path, str(size))
    _fill(path, fmt, _random_writes(rng, _size(path, fmt), fmt, rng.randint(0, 8)))
    return path, fmt


def random_case(rng: random.Random, tmp_path: Path) -> Case:
    """Sources and a random valid option combination for them."""
    case = Case()
    count = 1 if rng.random() < 0.8 else rng.randint(2, 3)
    case.sources = [_random_source(rng, tmp_path, f"s{i}") for i in range(count)]
    total = sum(_size(p, f) for p, f in case.sources)
    case.out_fmt = fmt = rng.choice(FORMATS)
    if len({f for _, f in case.sources}) == 1:
        case.args += ["-f", case.sources[0][1]]
    case.args += ["-O", fmt]
    if fmt == "qcow2" and rng.random() < 0.5:
        case.args += ["-o", f"cluster_size={rng.choice([512, 4096, 65536])}"]
    if fmt == "qcow2" and rng.random() < 0.15:
        case.args.append("-c")
    if rng.random() < 0.4:
        case.args += ["-S", rng.choice(["0", "512", "4k", "64k", "1536", "3k"])]
    if rng.random() < 0.4:
        case.args += ["-m", str(rng.randint(1, 16))]
    if rng.random() < 0.3:
        case.args.append("-W")
    if rng.random() < 0.3:
        case.args += ["-t", rng.choice(["none", "writeback", "unsafe"])]
    case.target_size = total
    if "-c" not in case.args and "-o" not in case.args and rng.random() < 0.25:
        case.no_create = True
        case.target_size = total + rng.choice([0, 512, 65536])
        case.prefill = rng.choice(["fresh", "junk"])
        case.args.append("-n")
        if case.prefill == "fresh" and fmt in ("raw", "qcow2") and rng.random() < 0.5:
            case.args.append("--target-is-zero")
    return case


def _prepare_target(case: Case, path: Path, seed: int) -> None:
    """For ``-n``: the existing target, by qemu-img, fresh or full of junk."""
    run("qemu-img", "create", "-q", "-f", case.out_fmt, path, str(case.target_size))
    if case.prefill == "junk":
        size = _size(path, case.out_fmt)
        junk = [f"write -P {seed % 250 + 1} 0 {size // 512 * 512}"] if size >= 512 else []
        _fill(path, case.out_fmt, junk)


def compare_case(seed: int, tmp_path: Path) -> list[str]:
    """Run one seeded case through both tools; the differences that matter, if any."""
    rng = random.Random(seed)
    case = random_case(rng, tmp_path)
    fmt = case.out_fmt
    outs = [tmp_path / f"out-qemu.{fmt}", tmp_path / f"out-trio.{fmt}"]
    if case.no_create:
        for out in outs:
            _prepare_target(case, out, seed)
    sources = [p for p, _ in case.sources]
    got_q = run("qemu-img", "convert", *case.args, *sources, outs[0], check=False)
    got_t = trioconv_cli("convert", *case.args, *sources, outs[1])
    problems: list[str] = []
    if got_q.returncode != got_t.returncode:
        problems.append(f"exit {got_q.returncode} vs {got_t.returncode}: {got_t.stderr!r}")
    if got_q.returncode or got_t.returncode:
        if got_t.returncode and len(got_t.stderr.strip().splitlines()) != 1:
            problems.append(f"error not one line: {got_t.stderr!r}")
        return problems
    same = run("qemu-img", "compare", "-f", fmt, "-F", fmt, *outs, check=False)
    if same.returncode:
        problems.append(f"compare: {same.stdout.strip()}")
    if fmt in CHECKABLE:
        check = run("qemu-img", "check", "-f", fmt, outs[1], check=False)
        if check.returncode:
            problems.append(f"check: {check.stdout.strip()}")
    problems += visible_map_differences(
        qemu_map(outs[0], fmt), qemu_map(outs[1], fmt), no_create=case.no_create
    )
    if _size(outs[0], fmt) != _size(outs[1], fmt):
        problems.append("virtual sizes differ")
    return [f"seed {seed} {case.args}: {p}" for p in problems]


def test_random_cases_match_qemu_img(tmp_path: Path) -> None:
    """Twenty seeded random cases: the same verdicts, contents, metadata and allocation."""
    problems: list[str] = []
    for seed in range(20):
        case_dir = tmp_path / str(seed)
        case_dir.mkdir()
        problems += compare_case(seed, case_dir)
    assert not problems, "\n".join(problems)

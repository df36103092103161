#!/usr/bin/env python3
"""Benchmark ``trioconv convert`` against ``qemu-img convert`` across image formats.

What it measures: both tools run the same conversion on the same machine,
interleaved (qemu-img, trioconv, qemu-img, ...), ``--warmup`` untimed runs of
each and then ``--repeat`` timed ones; the table shows the median wall time
(spawn to ``os.wait4``), the ratio trioconv/qemu-img and the peak RSS
(``ru_maxrss``).  Rows:

* ``raw-F`` and ``F-raw`` for F in qcow2, vmdk, vpc, vhdx, vdi: the mixed
  source of ``bench_convert.py`` (``--size``) to F, and back from an F copy of
  it made once by ``qemu-img convert -O F`` and cached in ``--workdir``;
* ``qcow2frag-raw``: a qcow2 holding the same data, written by ``qemu-io`` in
  64 KiB chunks in a seeded shuffled order (so its clusters are scrambled on
  disk), to raw;
* ``c-zlib``, ``c-zlib-W``, ``c-zstd``, ``c-zstd-W``: a second mixed source
  (``--compress-size``) to qcow2 with ``-c`` (zlib) or ``-c -o
  compression_type=zstd``, without and with ``-W``; the output sizes are
  reported too.

Both tools get ``convert -f SRC_FMT -O OUT_FMT -m N [EXTRA] SRC DST`` (``-m``
from ``--parallel``, default 8) and default format options.  Every timed
output is checked with ``qemu-img compare -f SRC_FMT -F OUT_FMT SRC DST`` and,
for qcow2, vmdk, vhdx and vdi outputs, ``qemu-img check`` (exit 0 required; vpc
has no check).  The page cache is never dropped, so the numbers are warm-cache.

Run from the project root:

    python bench/bench_formats.py --output bench/results-formats.md
    python bench/bench_formats.py --size 256M --compress-size 64M --repeat 1
    python bench/bench_formats.py --size 256M --compress-size 64M --repeat 1 --trioconv qemu-img

The last form runs qemu-img on both sides as a self-check of the script.
Exits non-zero if any timed run fails, does not compare equal or fails its check.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from bench_convert import (
    KIB,
    MIB,
    add_output_args,
    add_run_args,
    add_trioconv_arg,
    bench_parser,
    create_in_child,
    create_source,
    image_info,
    machine_header,
    parse_size,
    ratio,
    select,
    write_report,
)
from bench_nbd import rss_floor, run_timed, version

FORMATS = ["qcow2", "vmdk", "vpc", "vhdx", "vdi"]
CHECKED = {"qcow2", "vmdk", "vhdx", "vdi"}  # formats `qemu-img check` supports
EXT = {"raw": "raw", "qcow2": "qcow2", "vmdk": "vmdk", "vpc": "vhd", "vhdx": "vhdx", "vdi": "vdi"}
TOOL_NAMES = ("qemu-img", "trioconv")
CHUNK = 64 * KIB  # qemu-io write size for the fragmented qcow2 (= its cluster size)
QEMU_IO_BATCH = 2048  # qemu-io writes per process (bounds the argv length)


@dataclass(frozen=True)
class RowSpec:
    key: str
    label: str
    source: str  # "raw", "compress", "frag", or a format name (cached conversion)
    src_fmt: str
    out_fmt: str
    extra: tuple[str, ...] = ()


def row_specs() -> list[RowSpec]:
    rows: list[RowSpec] = []
    for f in FORMATS:
        rows.append(RowSpec(f"raw-{f}", f"raw -> {f}", "raw", "raw", f))
        rows.append(RowSpec(f"{f}-raw", f"{f} -> raw", f, f, "raw"))
    rows.append(RowSpec("qcow2frag-raw", "fragmented qcow2 -> raw", "frag", "qcow2", "raw"))
    for ctype, opts in (("zlib", ("-c",)), ("zstd", ("-c", "-o", "compression_type=zstd"))):
        for w in ((), ("-W",)):
            key, label = f"c-{ctype}" + "-W" * bool(w), f"raw -> qcow2 -c {ctype}"
            rows.append(RowSpec(key, label + " -W" * bool(w), "compress", "raw", "qcow2", opts + w))
    return rows


ROWS = row_specs()
ROW_GROUPS = {
    "write": [r.key for r in ROWS if r.source == "raw"],
    "read": [r.key for r in ROWS if r.out_fmt == "raw"],
    "compress": [r.key for r in ROWS if r.source == "compress"],
}


@dataclass
class Failure:
    kind: str  # "exit", "compare", "check"
    argv: list[str]
    code: int
    detail: str


@dataclass
class Result:
    spec: RowSpec
    src: Path
    flags: list[str]
    times: dict[str, list[float]] = field(default_factory=dict)
    rss_kib: dict[str, int] = field(default_factory=dict)
    out_size: dict[str, int] = field(default_factory=dict)  # file length, last good run
    virt_size: dict[str, int] = field(default_factory=dict)
    runs: dict[str, int] = field(default_factory=dict)
    checked: dict[str, int] = field(default_factory=dict)
    failures: dict[str, list[Failure]] = field(default_factory=dict)

    def median(self, tool: str) -> float | None:
        t = self.times.get(tool)
        return statistics.median(t) if t else None

    def count(self, tool: str, *kinds: str) -> int:
        return sum(f.kind in kinds for f in self.failures.get(tool, []))


def qemu_img(*argv: str, timeout: float = 600) -> tuple[int, str]:
    """Run ``qemu-img ARGV``; return (exit code, stderr + stdout)."""
    try:
        r = subprocess.run(["qemu-img", *argv], capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, f"(timed out after {timeout:g} s)"
    return r.returncode, (r.stderr + r.stdout).strip()


def qemu_img_json(*argv: str) -> dict[str, object]:
    """``qemu-img ARGV --output=json`` parsed from stdout alone ({} if unusable)."""
    r = subprocess.run(["qemu-img", *argv, "--output=json"], capture_output=True, text=True)
    try:
        out = json.loads(r.stdout)
    except ValueError:
        return {}
    return out if isinstance(out, dict) else {}


def tail_lines(text: str, n: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-n:])


def data_chunks(path: Path) -> list[int]:
    """Offsets of the CHUNK-sized pieces of a raw image that hold a non-zero byte."""
    out: list[int] = []
    with open(path, "rb") as f:
        fd, pos = f.fileno(), 0
        size = os.fstat(fd).st_size
        zero = bytes(CHUNK)
        while pos < size:
            try:
                start = os.lseek(fd, pos, os.SEEK_DATA)
            except OSError:  # ENXIO: no data after pos
                break
            end = os.lseek(fd, start, os.SEEK_HOLE)
            for off in range(max(pos, start - start % CHUNK), end, CHUNK):
                chunk = os.pread(fd, CHUNK, off)
                if chunk != zero[: len(chunk)]:
                    out.append(off)
            pos = -(-end // CHUNK) * CHUNK
    return out


def mixed_source(workdir: Path, size: int, seed: int) -> Path:
    """The cached ``bench_convert.py`` source image of this size and seed."""
    path = workdir / f"source-v1-{size}-s{seed}.raw"
    if not path.exists():
        create_in_child(lambda p: create_source(p, size, seed), path)
    return path


def create_converted(raw: Path, fmt: str, dst: Path) -> None:
    """Cache ``qemu-img convert -f raw -O fmt raw dst`` (default options)."""
    print(f"creating {dst} ...", flush=True)
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    code, out = qemu_img("convert", "-f", "raw", "-O", fmt, str(raw), str(tmp), timeout=3600)
    if code != 0:
        tmp.unlink(missing_ok=True)
        sys.exit(f"creating {dst} failed (exit {code}): {out}")
    os.replace(tmp, dst)


def create_fragmented(raw: Path, dst: Path, seed: int) -> None:
    """A qcow2 with raw's data, written by qemu-io in CHUNK pieces in shuffled order.

    Each ``write -s /dev/stdin OFF LEN`` reads its LEN bytes from the pipe this
    process feeds in the same order; the result is checked with ``qemu-img
    compare`` and ``qemu-img check`` before it is cached.
    """
    print(f"creating {dst} ...", flush=True)
    size = raw.stat().st_size
    offsets = data_chunks(raw)
    random.Random(seed).shuffle(offsets)
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    code, out = qemu_img("create", "-q", "-f", "qcow2", str(tmp), str(size))
    if code != 0:
        sys.exit(f"qemu-img create failed (exit {code}): {out}")
    with open(raw, "rb") as f:
        for b in range(0, len(offsets), QEMU_IO_BATCH):
            batch = [(off, min(CHUNK, size - off)) for off in offsets[b : b + QEMU_IO_BATCH]]
            argv = ["qemu-io", "-f", "qcow2"]
            for off, n in batch:
                argv += ["-c", f"write -q -s /dev/stdin {off} {n}"]
            argv.append(str(tmp))
            with tempfile.TemporaryFile() as err:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=err
                )
                assert proc.stdin is not None
                try:
                    for off, n in batch:
                        proc.stdin.write(os.pread(f.fileno(), n, off))
                    proc.stdin.close()
                except BrokenPipeError:
                    pass
                code = proc.wait()
                err.seek(0)
                msg = err.read().decode(errors="replace").strip()
            if code != 0 or msg:
                tmp.unlink(missing_ok=True)
                sys.exit(f"qemu-io failed (exit {code}) writing {tmp}: {tail_lines(msg)}")
    code, out = qemu_img("compare", "-f", "raw", "-F", "qcow2", str(raw), str(tmp), timeout=3600)
    code2, out2 = qemu_img("check", "-f", "qcow2", str(tmp), timeout=3600)
    if code != 0 or code2 != 0:
        tmp.unlink(missing_ok=True)
        sys.exit(f"fragmented qcow2 did not verify: compare {code}: {out}; check {code2}: {out2}")
    os.replace(tmp, dst)


def image_line(path: Path, fmt: str) -> str:
    """One header line: sizes, plus allocated/fragmented clusters for qcow2."""
    info = qemu_img_json("info", "-f", fmt, str(path))
    virt, disk = info.get("virtual-size"), info.get("actual-size")
    line = f"{path.name}: {fmt}"
    if isinstance(virt, int) and isinstance(disk, int):
        line += f", virtual size {virt / MIB:.0f} MiB, disk size {disk / MIB:.1f} MiB"
    if fmt == "qcow2":
        chk = qemu_img_json("check", "-f", fmt, str(path))
        alloc, frag = chk.get("allocated-clusters"), chk.get("fragmented-clusters")
        if isinstance(alloc, int) and isinstance(frag, int):
            line += f", {alloc} clusters allocated, {frag / max(alloc, 1):.1%} fragmented"
    return line


def verify(res: Result, tool: str, dst: Path, timeout: float) -> None:
    """qemu-img compare (and check where supported); record failures."""
    spec = res.spec
    cmp_argv = ["compare", "-f", spec.src_fmt, "-F", spec.out_fmt, str(res.src), str(dst)]
    code, out = qemu_img(*cmp_argv, timeout=timeout)
    if code != 0:
        res.failures.setdefault(tool, []).append(
            Failure("compare", ["qemu-img", *cmp_argv], code, out)
        )
    if spec.out_fmt in CHECKED:
        chk_argv = ["check", "-f", spec.out_fmt, str(dst)]
        code, out = qemu_img(*chk_argv, timeout=timeout)
        res.checked[tool] = res.checked.get(tool, 0) + 1
        if code != 0:
            res.failures.setdefault(tool, []).append(
                Failure("check", ["qemu-img", *chk_argv], code, out)
            )


def bench_row(res: Result, tools: dict[str, list[str]], args: argparse.Namespace) -> None:
    spec = res.spec
    print(f"== {spec.label}  [{shlex.join(res.flags)}]", flush=True)
    for i in range(-args.warmup, args.repeat):
        for name, prefix in tools.items():
            dst = args.workdir / f"fmt-dst-{name}.{EXT[spec.out_fmt]}"
            dst.unlink(missing_ok=True)
            argv = [*prefix, "convert", "-f", spec.src_fmt, "-O", spec.out_fmt, *res.flags]
            argv += [str(res.src), str(dst)]
            code, secs, rss, tail = run_timed(argv, args.timeout)
            if i < 0:  # untimed warm-up run
                dst.unlink(missing_ok=True)
                continue
            res.runs[name] = res.runs.get(name, 0) + 1
            res.rss_kib[name] = max(res.rss_kib.get(name, 0), rss)
            before = len(res.failures.get(name, []))
            if code != 0:
                res.failures.setdefault(name, []).append(Failure("exit", argv, code, tail))
            else:
                verify(res, name, dst, args.timeout)
            new = res.failures.get(name, [])[before:]
            if not new:
                res.times.setdefault(name, []).append(secs)
                res.out_size[name] = dst.stat().st_size
                virt = qemu_img_json("info", "-f", spec.out_fmt, str(dst)).get("virtual-size")
                if isinstance(virt, int):
                    res.virt_size[name] = virt
            for fail in new:
                print(
                    f"  FAILED ({fail.kind}): {shlex.join(fail.argv)} (exit {fail.code})\n"
                    f"{tail_lines(fail.detail)}",
                    file=sys.stderr,
                )
            status = "ok" if not new else "FAILED " + ",".join(f.kind for f in new)
            print(
                f"  [{i + 1}/{args.repeat}] {name:9s} {secs:8.3f} s {rss / KIB:7.1f} MiB  {status}",
                flush=True,
            )
            dst.unlink(missing_ok=True)


def status_cell(res: Result, kinds: tuple[str, ...]) -> str:
    bad = [
        f"{t} {kind} {n}/{res.runs.get(t, 0)}"
        for t in TOOL_NAMES
        for kind in kinds
        if (n := res.count(t, kind))
    ]
    return f"FAILED ({', '.join(bad)})" if bad else ""


def size_ratio(res: Result) -> str:
    q, t = res.out_size.get("qemu-img"), res.out_size.get("trioconv")
    return f"{t / q:.3f}" if q and t is not None else "-"


def fmt_row(res: Result) -> str:
    spec = res.spec
    qm, tm = res.median("qemu-img"), res.median("trioconv")
    compare = status_cell(res, ("exit", "compare"))
    if spec.out_fmt not in CHECKED:
        check = f"n/a ({spec.out_fmt})"
    elif not (check := status_cell(res, ("check",))):
        done = sum(res.checked.values())
        total = sum(res.runs.values())
        check = "ok" if done == total else f"ok ({done}/{total} outputs checked)"
    size = "-"
    if spec.out_fmt != "raw":
        size = size_ratio(res)
    cells = [
        spec.label,
        f"`{shlex.join(res.flags)}`",
        "-" if qm is None else f"{qm:.3f}",
        "-" if tm is None else f"{tm:.3f}",
        ratio(tm, qm),
        f"{res.rss_kib['trioconv'] / KIB:.1f}" if "trioconv" in res.rss_kib else "-",
        f"{res.rss_kib['qemu-img'] / KIB:.1f}" if "qemu-img" in res.rss_kib else "-",
        size,
        compare or "ok",
        check,
    ]
    return "| " + " | ".join(cells) + " |"


def fmt_compress(res: Result) -> str:
    q, t = res.out_size.get("qemu-img"), res.out_size.get("trioconv")
    cells = [
        res.spec.label,
        "-" if q is None else f"{q / MIB:.2f}",
        "-" if t is None else f"{t / MIB:.2f}",
        size_ratio(res),
    ]
    return "| " + " | ".join(cells) + " |"


def fmt_failures(results: list[Result]) -> list[str]:
    out: list[str] = []
    for res in results:
        seen: set[tuple[str, str]] = set()
        for tool in TOOL_NAMES:
            for fail in res.failures.get(tool, []):
                if (tool, fail.kind) in seen:  # first failure of each kind per tool and row
                    continue
                seen.add((tool, fail.kind))
                n = res.count(tool, fail.kind)
                out += [
                    f"- {res.spec.label}, {tool}, {fail.kind} failed"
                    f" ({n}/{res.runs.get(tool, 0)} runs); first: exit {fail.code}",
                    "",
                    "  ```",
                    f"  $ {shlex.join(fail.argv)}",
                    *(f"  {ln}" for ln in tail_lines(fail.detail or "(no output)").splitlines()),
                    "  ```",
                    "",
                ]
    return out


def startup(prefix: list[str], timeout: float) -> str:
    runs = [run_timed([*prefix, "--version"], timeout) for _ in range(3)]
    if any(code != 0 for code, *_ in runs):
        return "unknown (`--version` failed)"
    return f"{statistics.median(secs for _, secs, _, _ in runs):.3f} s"


def main() -> int:
    ap = bench_parser(__doc__)
    add = ap.add_argument
    add_run_args(ap, size="2G", size_help="source size for the format rows")
    add("--compress-size", type=parse_size, default="256M", help="source size for the -c rows")
    add("--parallel", type=int, default=8, help="-m value passed to both tools")
    add(
        "--workdir",
        type=Path,
        default=Path("/var/tmp/trioconv-bench"),
        help="source image cache + output dir (shared with bench_convert.py)",
    )
    add(
        "--rows",
        default=",".join(r.key for r in ROWS),
        help=f"comma list of rows or groups ({', '.join(ROW_GROUPS)})",
    )
    add_trioconv_arg(ap)
    add("--timeout", type=float, default=1800, help="kill a convert after this many seconds")
    add_output_args(ap, seed_help="layout/content/shuffle seed")
    args = ap.parse_args()

    row_text = ",".join(
        ",".join(ROW_GROUPS[n]) if n in ROW_GROUPS else n
        for n in (s.strip() for s in args.rows.split(","))
    )
    keys = select(row_text, [r.key for r in ROWS], "row(s)", ap)
    if not keys:
        ap.error("nothing to run")
    if args.repeat < 1 or args.warmup < 0 or args.timeout <= 0 or args.parallel < 1:
        ap.error("--repeat and --parallel must be >= 1, --warmup >= 0, --timeout > 0")
    specs = [r for r in ROWS if r.key in keys]
    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    tools = {"qemu-img": ["qemu-img"], "trioconv": shlex.split(args.trioconv)}

    # Source images, created once and cached; only those the selected rows need.
    needed = {s.source for s in specs}
    raws: dict[str, Path] = {}
    if needed - {"compress"}:
        raws["raw"] = mixed_source(workdir, args.size, args.seed)
    if "compress" in needed:
        raws["compress"] = mixed_source(workdir, args.compress_size, args.seed)
    sources: dict[str, Path] = dict(raws)
    stem = f"source-v1-{args.size}-s{args.seed}"
    for fmt in FORMATS:
        if fmt in needed:
            sources[fmt] = workdir / f"{stem}.{EXT[fmt]}"
            if not sources[fmt].exists():
                create_converted(raws["raw"], fmt, sources[fmt])
    if "frag" in needed:
        sources["frag"] = workdir / f"{stem}-frag64k.qcow2"
        if not sources["frag"].exists():
            create_fragmented(raws["raw"], sources["frag"], args.seed)
    src_lines = [image_info(p) for p in raws.values()]
    src_lines += [image_line(sources[f], f) for f in FORMATS if f in sources]
    if "frag" in sources:
        src_lines.append(
            image_line(sources["frag"], "qcow2") + f" (qemu-io writes of {CHUNK // KIB} KiB"
            f" in shuffled order, seed {args.seed})"
        )
    for line in src_lines:
        print(line)

    results: list[Result] = []
    base = ["-m", str(args.parallel)]
    for spec in specs:
        results.append(Result(spec, sources[spec.source], [*base, *spec.extra]))
        bench_row(results[-1], tools, args)

    notes: list[str] = []
    for res in results:
        q, t = res.virt_size.get("qemu-img"), res.virt_size.get("trioconv")
        if q is not None and t is not None and q != t:
            notes.append(
                f"{res.spec.label}: output virtual size differs: trioconv {t} bytes,"
                f" qemu-img {q} bytes."
            )
    compress = [r for r in results if r.spec.source == "compress"]
    failed = any(r.failures for r in results)
    git = subprocess.run(
        ["git", "-C", str(Path(__file__).resolve().parent), "describe", "--always", "--dirty"],
        capture_output=True,
        text=True,
    ).stdout.strip()
    report = [
        "# trioconv vs qemu-img convert: image formats",
        "",
        *machine_header(workdir),
        f"- trioconv: `{args.trioconv}` ({version([*tools['trioconv'], '--version'])}"
        + (f"; tree {git}" if git else "")
        + ")",
        *(f"- source: {line}" for line in src_lines),
        "- both tools: `convert -f SRC_FMT -O OUT_FMT FLAGS SRC DST`, default format options;"
        " the F sources were made by `qemu-img convert -f raw -O F`",
        f"- {args.warmup} untimed warm-up + {args.repeat} timed runs per tool and row,"
        " interleaved; median wall time of the runs that passed, max peak RSS",
        "- every timed output: `qemu-img compare -f SRC_FMT -F OUT_FMT SRC DST` and, for"
        " qcow2/vmdk/vhdx/vdi, `qemu-img check -f OUT_FMT DST` (exit 0 required)",
        rss_floor(),
        f"- trioconv start-up (`--version`, median of 3), included in every trioconv time:"
        f" {startup(tools['trioconv'], args.timeout)}",
        "",
        "| row | flags | qemu-img median s | trioconv median s | ratio (trioconv/qemu-img) "
        "| trioconv peak RSS MiB | qemu-img peak RSS MiB | output size trioconv/qemu-img "
        "| compare | check |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---|",
        *(fmt_row(r) for r in results),
    ]
    if compress:
        report += [
            "",
            f"Compressed output sizes (source: {image_info(raws['compress'])}):",
            "",
            "| row | qemu-img MiB | trioconv MiB | size ratio (trioconv/qemu-img) |",
            "|---|---:|---:|---:|",
            *(fmt_compress(r) for r in compress),
        ]
    if notes:
        report += ["", *(f"Note: {n}" for n in notes)]
    if failed:
        report += ["", "## Failures", "", *fmt_failures(results)]
    write_report(report, args.output)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

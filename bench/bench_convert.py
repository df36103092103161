#!/usr/bin/env python3
"""Benchmark ``trioconv convert`` against ``qemu-img convert`` (raw -> raw).

What it measures: for each configuration (``-m 1``, ``-m 8``, ``-m 8 -W``,
``-m 8 -t none``) both tools copy the same sparse source image, interleaved
(qemu-img, trioconv, qemu-img, ...) ``--repeat`` times after ``--warmup``
untimed runs of each.  Each timed run records wall time (``time.perf_counter``
around spawn + ``os.wait4``) and the child's peak RSS (``ru_maxrss``); every
output is checked with ``qemu-img compare``.  The source image (cached in
``--workdir``) holds about half its size in data: random bytes, log-like text,
written zeros, and holes in a seeded pseudo-random layout.  An extra row
converts a 1 TiB sparse image holding 100 MiB of data.  The page cache is
never dropped, so the numbers are warm-cache.

With ``--in-process`` each row also times the copy without Python's start-up:
a child process imports trioconv, runs the same command line once through
``trioconv.cli.main`` untimed, then ``--repeat`` times timed (the target
removed before each run, outside the timing); the median is reported next to
qemu-img's whole run.  Those outputs are verified too.

Run from the project root:

    python bench/bench_convert.py --size 2G --repeat 3 --output bench/results.md
    python bench/bench_convert.py --size 256M --repeat 1 --skip-huge --trioconv qemu-img
    python bench/bench_convert.py --configs m8,m8-W --skip-huge --in-process

The last form runs qemu-img on both sides as a self-check of the script.
Exits non-zero if any run fails or any output does not verify.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

KIB, MIB, GIB, TIB = 1 << 10, 1 << 20, 1 << 30, 1 << 40
CONFIGS: dict[str, list[str]] = {
    "m1": ["-m", "1"],
    "m8": ["-m", "8"],
    "m8-W": ["-m", "8", "-W"],
    "t-none": ["-m", "8", "-t", "none"],
}
HUGE_LABEL = "1TiB sparse, 100MiB data"
LEVELS = ["INFO", "INFO", "INFO", "WARN", "DEBUG", "ERROR"]
STATUSES = [200, 200, 200, 204, 404, 500]


@dataclass
class Row:
    label: str
    flags: list[str]
    src: Path
    times: dict[str, list[float]] = field(default_factory=lambda: {"qemu-img": [], "trioconv": []})
    rss_kib: dict[str, int] = field(default_factory=lambda: {"qemu-img": 0, "trioconv": 0})
    failures: int = 0
    runs: int = 0
    in_process: list[float] = field(default_factory=list)


def parse_size(text: str) -> int:
    units = {"K": KIB, "M": MIB, "G": GIB, "T": TIB}
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    try:
        n = int(t[:-1]) * units[t[-1]] if t and t[-1] in units else int(t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad size {text!r} (use e.g. 512M, 2G)") from None
    if n <= 0:
        raise argparse.ArgumentTypeError("size must be positive")
    return n


def text_block(rng: random.Random, size: int = MIB) -> bytes:
    """About ``size`` bytes of log-like lines."""
    r, lines, n = rng.randrange, [], 0
    while n < size:
        lines.append(
            f"2024-05-17T12:{r(60):02d}:{r(60):02d}.{r(10**6):06d}Z host-{r(8)}"
            f" svc[{r(1000, 9999)}]: {rng.choice(LEVELS)} req={rng.getrandbits(32):08x}"
            f" path=/api/v1/items/{r(10**5)} status={rng.choice(STATUSES)}"
            f" dur={r(1, 3000)}ms\n"
        )
        n += len(lines[-1])
    return "".join(lines).encode()[:size]


def create_source(path: Path, size: int, seed: int) -> None:
    """Mixed-content sparse image: ~50% holes, rest random/text/written zeros."""
    rng = random.Random(seed)
    text = text_block(rng)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        pos = 0
        while pos < size:
            n = min(rng.randrange(64 * KIB, 8 * MIB + 1, 4 * KIB), size - pos)
            kind = rng.choices(["hole", "random", "text", "zero"], weights=[50, 20, 15, 15])[0]
            if kind != "hole":
                f.seek(pos)
                for off in range(0, n, MIB):
                    k = min(MIB, n - off)
                    if kind == "random":
                        f.write(rng.randbytes(k))
                    elif kind == "text":
                        f.write(text[:k])
                    else:
                        f.write(bytes(k))
            pos += n
        f.truncate(size)
        os.fsync(f.fileno())  # keep writeback of the new image out of the first timed run
    os.replace(tmp, path)


def create_huge(path: Path, seed: int) -> None:
    """1 TiB sparse image with 100 scattered 1 MiB chunks of random data."""
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        for idx in sorted(rng.sample(range(TIB // MIB), 100)):
            f.seek(idx * MIB)
            f.write(rng.randbytes(MIB))
        f.truncate(TIB)
        os.fsync(f.fileno())
    os.replace(tmp, path)


def output(*argv: str) -> str:
    return subprocess.run(argv, capture_output=True, text=True).stdout


def create_in_child(create: Callable[[Path], None], path: Path) -> None:
    """Create path in a forked child so this process's RSS (the floor) stays small."""
    print(f"creating {path} ...", flush=True)
    if (pid := os.fork()) == 0:
        try:
            create(path)
        except BaseException:
            traceback.print_exc()
            os._exit(1)
        os._exit(0)
    if os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) != 0:
        sys.exit(f"creating {path} failed")


def image_info(path: Path) -> str:
    info = json.loads(output("qemu-img", "info", "--output=json", "-f", "raw", str(path)))
    virt, disk = info["virtual-size"] / MIB, info["actual-size"] / MIB
    return f"{path.name}: virtual size {virt:.0f} MiB, disk size {disk:.1f} MiB"


def run_timed(argv: list[str]) -> tuple[int, float, int, str]:
    """Run argv; return (exit code, wall seconds, peak RSS KiB, stderr tail).

    Linux carries the parent's peak RSS into a vfork()ed child's ru_maxrss at
    exec, so reset this process's peak first; its current RSS stays a floor.
    """
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err
            )
        except OSError as exc:
            return 127, 0.0, 0, str(exc)
        _, status, usage = os.wait4(proc.pid, 0)
        elapsed = time.perf_counter() - t0
        proc.returncode = code = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode(errors="replace")[-2000:]
    return code, elapsed, usage.ru_maxrss, tail


#: Run by ``--in-process`` in a child: argv = repeat, then a convert command line.
IN_PROCESS = """
import json, os, sys, time
import trioconv.cli
repeat, argv = int(sys.argv[1]), sys.argv[2:]
times = []
for i in range(repeat + 1):
    if os.path.exists(argv[-1]):
        os.unlink(argv[-1])
    t0 = time.perf_counter()
    try:
        trioconv.cli.main(argv)
    except SystemExit as exc:
        if exc.code:
            raise
    if i:
        times.append(time.perf_counter() - t0)
print(json.dumps(times))
"""


def run_in_process(args: list[str], repeat: int) -> list[float] | None:
    """Time ``trioconv convert`` inside one Python process; None when it failed."""
    argv = [sys.executable, "-c", IN_PROCESS, str(repeat), *args]
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"  FAILED in-process: {r.stderr.strip()[-2000:]}", file=sys.stderr)
        return None
    times: list[float] = json.loads(r.stdout.strip().splitlines()[-1])
    return times


def verify(src: Path, dst: Path) -> bool:
    argv = ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), str(dst)]
    r = subprocess.run(argv, capture_output=True, text=True)
    if r.returncode != 0:
        print(f"    compare exit {r.returncode}: {r.stderr.strip()}", file=sys.stderr)
    return r.returncode == 0


def bench_row(
    row: Row,
    tools: dict[str, list[str]],
    repeat: int,
    warmup: int,
    workdir: Path,
    in_process: bool = False,
) -> None:
    print(f"== {row.label}", flush=True)
    for i in range(-warmup, repeat):
        for name, prefix in tools.items():
            dst = workdir / f"dst-{name}.raw"
            dst.unlink(missing_ok=True)
            args = ["convert", "-f", "raw", "-O", "raw", *row.flags, str(row.src), str(dst)]
            argv = [*prefix, *args]
            code, secs, rss, tail = run_timed(argv)
            if i < 0:  # untimed warm-up run
                dst.unlink(missing_ok=True)
                continue
            ok = code == 0 and verify(row.src, dst)
            row.runs += 1
            row.rss_kib[name] = max(row.rss_kib[name], rss)
            if ok:
                row.times[name].append(secs)
            else:
                row.failures += 1
                print(f"  FAILED: {shlex.join(argv)} (exit {code})\n{tail}", file=sys.stderr)
            status = "ok" if ok else "FAILED"
            print(
                f"  [{i + 1}/{repeat}] {name:9s} {secs:8.3f} s {rss / KIB:7.1f} MiB  {status}",
                flush=True,
            )
            dst.unlink(missing_ok=True)
    if in_process:
        dst = workdir / "dst-in-process.raw"
        args = ["convert", "-f", "raw", "-O", "raw", *row.flags, str(row.src), str(dst)]
        times = run_in_process(args, repeat)
        ok = times is not None and verify(row.src, dst)
        row.runs += 1
        if times is not None and ok:
            row.in_process = times
        else:
            row.failures += 1
        shown = " ".join(f"{t:.3f}" for t in times or [])
        print(f"  in-process trioconv: {shown} s  {'ok' if ok else 'FAILED'}", flush=True)
        dst.unlink(missing_ok=True)


def fs_type(path: Path) -> str:
    real, best, fstype = str(path.resolve()), "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            mnt = parts[1].replace("\\040", " ")
            if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
                best, fstype = mnt, parts[2]
    except OSError:
        fstype = output("stat", "-f", "-c", "%T", str(path)).strip() or fstype
    return fstype


def supports_o_direct(directory: Path) -> bool:
    probe = directory / ".odirect-probe"
    try:
        fd = os.open(probe, os.O_CREAT | os.O_WRONLY | getattr(os, "O_DIRECT", 0), 0o600)
    except OSError:
        return False
    os.close(fd)
    probe.unlink(missing_ok=True)
    return hasattr(os, "O_DIRECT")


def machine_header(workdir: Path) -> list[str]:
    cpu, mem = platform.processor() or "unknown", "unknown"
    with contextlib.suppress(OSError, StopIteration):
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
    with contextlib.suppress(OSError, StopIteration):
        lines = Path("/proc/meminfo").read_text().splitlines()
        kib = next(int(ln.split()[1]) for ln in lines if ln.startswith("MemTotal:"))
        mem = f"{kib / MIB:.1f} GiB"
    qver = output("qemu-img", "--version").splitlines()
    return [
        f"- platform: {platform.platform()}",
        f"- CPU: {cpu}",
        f"- nproc: {len(os.sched_getaffinity(0))}",
        f"- memory: {mem}",
        f"- workdir: `{workdir}` ({fs_type(workdir)})",
        f"- qemu-img: {qver[0] if qver else 'unknown'}",
        f"- date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
    ]


def fmt_row(row: Row, in_process: bool = False) -> str:
    q, t = row.times["qemu-img"], row.times["trioconv"]
    qm = statistics.median(q) if q else None
    tm = statistics.median(t) if t else None
    ratio = f"{tm / qm:.2f}" if qm and tm is not None else "-"
    cells = [
        row.label,
        f"{qm:.3f}" if qm is not None else "-",
        f"{tm:.3f}" if tm is not None else "-",
        ratio,
    ]
    if in_process:
        im = statistics.median(row.in_process) if row.in_process else None
        cells += [
            f"{im:.3f}" if im is not None else "-",
            f"{im / qm:.2f}" if qm and im is not None else "-",
        ]
    cells += [
        f"{row.rss_kib['trioconv'] / KIB:.1f}",
        f"{row.rss_kib['qemu-img'] / KIB:.1f}",
        "yes" if row.failures == 0 else f"FAILED ({row.failures}/{row.runs})",
    ]
    return "| " + " | ".join(cells) + " |"


def bench_parser(doc: str | None) -> argparse.ArgumentParser:
    """The argument parser of a bench script: its docstring's first paragraph, defaults shown."""
    return argparse.ArgumentParser(
        description=(doc or "").split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )


def add_run_args(
    ap: argparse.ArgumentParser,
    *,
    size: str,
    size_help: str = "source image size (K/M/G suffix)",
    repeat_help: str = "timed runs per tool and row",
    warmup_help: str = "untimed runs per tool before each row",
) -> None:
    """``--size``, ``--repeat`` and ``--warmup``, the options every bench script has."""
    ap.add_argument("--size", type=parse_size, default=size, help=size_help)
    ap.add_argument("--repeat", type=int, default=3, help=repeat_help)
    ap.add_argument("--warmup", type=int, default=1, help=warmup_help)


def add_trioconv_arg(ap: argparse.ArgumentParser) -> None:
    """``--trioconv``: the trioconv command, by default this Python's ``-m trioconv``."""
    ap.add_argument(
        "--trioconv",
        default=shlex.join([sys.executable, "-m", "trioconv"]),
        help="trioconv command ('qemu-img' gives a self-check)",
    )


def add_output_args(ap: argparse.ArgumentParser, seed_help: str = "layout/content seed") -> None:
    """``--seed`` and ``--output``, the last options of every bench script."""
    ap.add_argument("--seed", type=int, default=1, help=seed_help)
    ap.add_argument("--output", type=Path, help="also write the Markdown report to this file")


def select(text: str, choices: list[str], what: str, ap: argparse.ArgumentParser) -> list[str]:
    """The comma list ``text`` as a subset of ``choices``, in their order."""
    names = [c.strip() for c in text.split(",") if c.strip()]
    if unknown := [c for c in names if c not in choices]:
        ap.error(f"unknown {what} {unknown}; choose from {choices}")
    return [c for c in choices if c in names]


def ratio(num: float | None, den: float | None) -> str:
    return f"{num / den:.2f}" if num is not None and den else "-"


def write_report(report: list[str], output: Path | None) -> None:
    """Print the Markdown report and, with ``--output``, write it there too."""
    text = "\n".join(report).rstrip() + "\n"
    print("\n" + text)
    if output:
        output.write_text(text)


def main() -> int:
    ap = bench_parser(__doc__)
    add = ap.add_argument
    add_run_args(ap, size="2G", repeat_help="timed runs per tool and config")
    add("--workdir", type=Path, default=Path("/var/tmp/trioconv-bench"), help="cache + output dir")
    add("--configs", default=",".join(CONFIGS), help="comma list of configs to run")
    add_trioconv_arg(ap)
    add("--skip-huge", action="store_true", help=f"skip the '{HUGE_LABEL}' row")
    add_output_args(ap)
    add(
        "--in-process",
        action="store_true",
        help="also time trioconv inside one Python process (no start-up), per row",
    )
    args = ap.parse_args()

    names = [c.strip() for c in args.configs.split(",") if c.strip()]
    if unknown := [c for c in names if c not in CONFIGS]:
        ap.error(f"unknown config(s) {unknown}; choose from {list(CONFIGS)}")
    if args.repeat < 1 or args.warmup < 0:
        ap.error("--repeat must be >= 1 and --warmup >= 0")
    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    tools = {"qemu-img": ["qemu-img"], "trioconv": shlex.split(args.trioconv)}

    src = workdir / f"source-v1-{args.size}-s{args.seed}.raw"
    if not src.exists():
        create_in_child(lambda p: create_source(p, args.size, args.seed), src)
    print(image_info(src))
    rows: list[Row] = []
    notes: list[str] = []
    for name in names:
        if name == "t-none" and not supports_o_direct(workdir):
            fs = fs_type(workdir)
            notes.append(f"`-t none` skipped: the {fs} filesystem at `{workdir}` refuses O_DIRECT.")
            print(f"NOTE: {notes[-1]}")
            continue
        rows.append(Row(" ".join(CONFIGS[name]), CONFIGS[name], src))
    if not args.skip_huge:
        huge = workdir / f"huge-v1-1T-100M-s{args.seed}.raw"
        if not huge.exists():
            create_in_child(lambda p: create_huge(p, args.seed), huge)
        print(image_info(huge))
        rows.append(Row(HUGE_LABEL, [], huge))
        notes.append(f"`{HUGE_LABEL}` uses default flags (no -m/-W/-t).")

    for row in rows:
        bench_row(row, tools, args.repeat, args.warmup, workdir, args.in_process)

    report = [
        "# trioconv vs qemu-img convert (raw -> raw)",
        "",
        *machine_header(workdir),
        f"- source: {image_info(src)}",
        f"- {args.warmup} untimed warm-up + {args.repeat} timed runs per tool and row,"
        " interleaved; median wall time, max peak RSS",
        f"- trioconv command: `{args.trioconv}`",
        f"- peak RSS floor (`true` spawned the same way, inherits this script's RSS): "
        f"{run_timed(['true'])[2] / KIB:.1f} MiB",
        "",
        "| config | qemu-img median s | trioconv median s | ratio (trioconv/qemu-img) "
        + (
            "| trioconv in-process median s | ratio (in-process/qemu-img) "
            if args.in_process
            else ""
        )
        + "| trioconv peak RSS MiB | qemu-img peak RSS MiB | verified |",
        "|---|---:|---:|---:|" + ("---:|---:|" if args.in_process else "") + "---:|---:|---|",
        *(fmt_row(r, args.in_process) for r in rows),
    ]
    if args.in_process:
        notes.append(
            "in-process: `trioconv.cli.main` called in one Python process after an untimed"
            " run; Python start-up and imports excluded, qemu-img's time is its whole run."
        )
    if notes:
        report += ["", *(f"Note: {n}" for n in notes)]
    write_report(report, args.output)
    return 1 if any(r.failures for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())

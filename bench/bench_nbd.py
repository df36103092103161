#!/usr/bin/env python3
"""Benchmark NBD copies: ``trioconv convert`` vs ``qemu-img convert`` vs ``nbdcopy``.

What it measures: the effect of asynchronous copying over a network block
protocol.  Every NBD server is an ``nbdkit`` process on a unix socket with the
``delay`` filter adding ``--delay`` (default 2 ms) to every read, write, zero,
trim and extents request; the ``delay+rate`` set also stacks the ``rate``
filter (``--rate``, default 1G bit/s per server and direction, with
``--burstiness``).  Three rows per set:

* ``nbd-nbd``: nbdkit ``file`` plugin (read-only, serving the source image) to
  an nbdkit ``memory`` export;
* ``nbd-file``: the same source server to a local raw file;
* ``file-nbd``: the local source image to an nbdkit ``memory`` export.

Tools per row: trioconv and qemu-img, each with ``-m 1``, ``-m 8`` and
``-m 8 -W`` (``convert -f raw -O raw [-n] FLAGS SRC DST``, ``-n`` for NBD
targets), and ``nbdcopy SRC DST`` with its defaults.  Each target server is
started fresh (a new, empty memory export of the source's size) before every
run, and a local target file is deleted first, so runs are independent.  Runs
are interleaved across tools, ``--warmup`` untimed runs per tool, then
``--repeat`` timed ones; the table shows median wall time (spawn to
``os.wait4``), the ratios of interest, and peak RSS (``ru_maxrss``).  Every
timed output is checked with ``qemu-img compare`` against the source image
(an NBD target while its server is still running).

Run from the project root:

    python bench/bench_nbd.py --output bench/results-nbd.md
    python bench/bench_nbd.py --size 64M --repeat 1 --sets delay --rows nbd-nbd

``--baseline CMD`` adds a second trioconv (``base -m 8``, ``base -m 8 -W``: e.g. a
checkout of an older version) to the same interleaved runs, for before/after
comparisons.  trioconv runs get a bytecode cache of their own
(``--bytecode-cache``), as an installed copy has compiled bytecode, even when the
environment sets ``PYTHONDONTWRITEBYTECODE``.

Exits non-zero if any timed run fails or any output does not verify.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import os
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from bench_convert import (
    KIB,
    add_output_args,
    add_run_args,
    add_trioconv_arg,
    bench_parser,
    create_in_child,
    create_source,
    image_info,
    machine_header,
    ratio,
    select,
    write_report,
)


@dataclass(frozen=True)
class Tool:
    key: str
    label: str
    program: str  # "trioconv" | "qemu-img" | "nbdcopy"
    flags: tuple[str, ...] = ()


@dataclass(frozen=True)
class RowSpec:
    key: str
    label: str
    src_nbd: bool
    dst_nbd: bool


TOOLS = [
    Tool("trioconv-m1", "trioconv -m 1", "trioconv", ("-m", "1")),
    Tool("trioconv-m8", "trioconv -m 8", "trioconv", ("-m", "8")),
    Tool("trioconv-m8-W", "trioconv -m 8 -W", "trioconv", ("-m", "8", "-W")),
    # More in flight than qemu-img allows (16 at most): trioconv's best settings, for
    # the comparison with nbdcopy (64 requests in flight by default).
    Tool("trioconv-m16-W", "trioconv -m 16 -W", "trioconv", ("-m", "16", "-W")),
    Tool("qemu-img-m1", "qemu-img -m 1", "qemu-img", ("-m", "1")),
    Tool("qemu-img-m8", "qemu-img -m 8", "qemu-img", ("-m", "8")),
    Tool("qemu-img-m8-W", "qemu-img -m 8 -W", "qemu-img", ("-m", "8", "-W")),
    Tool("nbdcopy", "nbdcopy", "nbdcopy"),
]
TOOL_GROUPS = {"trioconv", "qemu-img"}
ROWS = [
    RowSpec("nbd-nbd", "nbd -> nbd", True, True),
    RowSpec("nbd-file", "nbd -> file", True, False),
    RowSpec("file-nbd", "file -> nbd", False, True),
]
SETS = ["delay", "delay+rate"]
DELAYED_OPS = ["read", "write", "zero", "trim", "extents"]


@dataclass
class Tally:
    """One table row's results per tool key: wall times of the runs that verified, peak
    RSS, failures; a base class (its fields are keyword-only, after the row's own)."""

    times: dict[str, list[float]] = field(default_factory=dict, kw_only=True)
    rss_kib: dict[str, int] = field(default_factory=dict, kw_only=True)
    failed: dict[str, int] = field(default_factory=dict, kw_only=True)
    failures: list[str] = field(default_factory=list, kw_only=True)
    runs: int = field(default=0, kw_only=True)

    def median(self, key: str) -> float | None:
        t = self.times.get(key)
        return statistics.median(t) if t else None

    def record(
        self, key: str, argv: list[str], code: int, secs: float, rss: int, tail: str, ok: bool
    ) -> None:
        """Count one timed run of tool ``key``; a failed one is also reported on stderr."""
        self.runs += 1
        self.rss_kib[key] = max(self.rss_kib.get(key, 0), rss)
        if ok:
            self.times.setdefault(key, []).append(secs)
        else:
            self.failed[key] = self.failed.get(key, 0) + 1
            msg = f"`{shlex.join(argv)}` (exit {code})\n\n```\n{tail.strip()}\n```"
            self.failures.append(msg)
            print(f"  FAILED: {shlex.join(argv)} (exit {code})\n{tail}", file=sys.stderr)


def print_progress(
    i: int, repeat: int, label: str, width: int, secs: float, rss: int, ok: bool, extra: str = ""
) -> None:
    """The progress line of one timed run (``extra``: more columns before the status)."""
    print(
        f"  [{i + 1}/{repeat}] {label:{width}s} {secs:8.3f} s"
        f" {rss / KIB:7.1f} MiB{extra}  {'ok' if ok else 'FAILED'}",
        flush=True,
    )


def time_cell(median: float | None, failed: int) -> str:
    """A table cell: the median seconds (or ``-``) and how many runs failed."""
    return ("-" if median is None else f"{median:.3f}") + (f" ({failed} failed)" if failed else "")


def verified_cell(tally: Tally) -> str:
    nfail = sum(tally.failed.values())
    return "yes" if nfail == 0 else f"FAILED ({nfail}/{tally.runs})"


def table_head(head: list[str]) -> list[str]:
    """A Markdown table's head: a row label column, numbers, a last text column."""
    return ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 2) + "---|"]


def tool_table(title: str, tools: list[Tool], rows: list[tuple[str, list[str]]]) -> list[str]:
    """A titled Markdown table with a column per tool; ``rows``: (label, cells)."""
    out = [
        "",
        title,
        "",
        "| row | " + " | ".join(t.label for t in tools) + " |",
        "|---|" + "---:|" * len(tools),
    ]
    out += [f"| {label} | " + " | ".join(cells) + " |" for label, cells in rows]
    return out


def rss_cells(tally: Tally, tools: list[Tool]) -> list[str]:
    return [f"{tally.rss_kib[t.key] / KIB:.1f}" if t.key in tally.rss_kib else "-" for t in tools]


def rss_floor() -> str:
    """The report line on the peak RSS of ``true`` run the way the tools are."""
    floor = run_timed(["true"], 10)[2] / KIB
    return f"- peak RSS floor (`true` spawned the same way): {floor:.1f} MiB"


@dataclass
class Result(Tally):
    set_name: str
    row: RowSpec


def filter_args(set_name: str, args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """nbdkit filter options and parameters for one set (first filter = outermost)."""
    filters, params = ["--filter=delay"], [f"delay-{op}={args.delay}" for op in DELAYED_OPS]
    if set_name == "delay+rate":
        filters.append("--filter=rate")
        params += [f"rate={args.rate}", f"burstiness={args.burstiness}"]
    return filters, params


class NbdServer:
    """One nbdkit process on a fresh unix socket; a context manager that always stops it."""

    _ids = itertools.count()

    def __init__(
        self,
        rundir: Path,
        plugin: list[str],
        filters: tuple[list[str], list[str]],
        readonly: bool,
    ) -> None:
        n = next(self._ids)
        self.sock = rundir / f"nbd{n}.sock"
        self.pidfile = rundir / f"nbd{n}.pid"
        self.log = rundir / f"nbd{n}.log"
        self.argv = [
            "nbdkit",
            "--foreground",
            "--exit-with-parent",
            "-P",
            str(self.pidfile),
            "-U",
            str(self.sock),
            *(["--readonly"] if readonly else []),
            *filters[0],
            *plugin,
            *filters[1],
        ]
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def __enter__(self) -> NbdServer:
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log
            )
        try:
            deadline = time.monotonic() + 10
            # nbdkit writes the pidfile once the socket is listening.
            while not (self.pidfile.exists() and self.pidfile.read_text().endswith("\n")):
                if (code := self.proc.poll()) is not None:
                    raise RuntimeError(
                        f"nbdkit exited {code}: {shlex.join(self.argv)}\n{self.log.read_text()}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nbdkit not ready after 10 s: {shlex.join(self.argv)}")
                time.sleep(0.005)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after 2 s (nbdkit waits for connected clients)."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for p in (self.sock, self.pidfile, self.log):
            p.unlink(missing_ok=True)


def run_timed(
    argv: list[str], timeout: float, env: dict[str, str] | None = None
) -> tuple[int, float, int, str]:
    """Run argv; return (exit code, wall seconds, peak RSS KiB, stderr tail).

    Same measurement as bench_convert.run_timed (reset this process's peak RSS,
    then ``os.wait4``), plus a timeout after which the child is killed.
    """
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        try:
            proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err, env=env
            )
        except OSError as exc:
            return 127, 0.0, 0, str(exc)
        lock, state = threading.Lock(), {"exited": False, "killed": False}

        def expire() -> None:
            with lock:
                if not state["exited"]:
                    state["killed"] = True
                    os.kill(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            # Wait without reaping, so the timer can never signal a recycled pid.
            os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOWAIT)
            elapsed = time.perf_counter() - t0
        except BaseException:
            proc.kill()
            raise
        finally:
            with lock:
                state["exited"] = True
            timer.cancel()
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = code = os.waitstatus_to_exitcode(status)
        err.seek(0)
        tail = err.read().decode(errors="replace")[-2000:]
    if state["killed"]:
        tail += f"\n(killed after the {timeout:g} s timeout)"
    return code, elapsed, usage.ru_maxrss, tail


def verify(src: Path, dst: str, timeout: float) -> bool:
    argv = ["qemu-img", "compare", "-f", "raw", "-F", "raw", str(src), dst]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        print(f"    compare timed out after {timeout:g} s", file=sys.stderr)
        return False
    if r.returncode != 0:
        print(f"    compare exit {r.returncode}: {r.stderr.strip()}", file=sys.stderr)
    return r.returncode == 0


def tool_argv(
    tool: Tool, trioconv: list[str], baseline: list[str], src: str, dst: str, dst_nbd: bool
) -> list[str]:
    if tool.program == "nbdcopy":
        return ["nbdcopy", src, dst]
    prefix = {"trioconv": trioconv, "baseline": baseline}.get(tool.program, ["qemu-img"])
    n = ["-n"] if dst_nbd else []
    return [*prefix, "convert", "-f", "raw", "-O", "raw", *n, *tool.flags, src, dst]


def bench_row(
    res: Result,
    tools: list[Tool],
    args: argparse.Namespace,
    src_image: Path,
    rundir: Path,
) -> None:
    row, filters, size = res.row, filter_args(res.set_name, args), args.size
    trioconv = shlex.split(args.trioconv)
    baseline = shlex.split(args.baseline or "")
    dst_file = args.workdir / "dst.raw"
    print(f"== [{res.set_name}] {row.label}", flush=True)
    with contextlib.ExitStack() as outer:
        src, src_srv = str(src_image), None
        if row.src_nbd:
            plugin = ["file", str(src_image)]
            src_srv = outer.enter_context(NbdServer(rundir, plugin, filters, readonly=True))
            src = src_srv.uri
        for i in range(-args.warmup, args.repeat):
            for tool in tools:
                if src_srv is not None and not src_srv.alive():
                    raise RuntimeError(f"source nbdkit died: {shlex.join(src_srv.argv)}")
                dst_file.unlink(missing_ok=True)
                with contextlib.ExitStack() as stack:
                    dst = str(dst_file)
                    if row.dst_nbd:
                        plugin = ["memory", str(size)]
                        dst_srv = stack.enter_context(NbdServer(rundir, plugin, filters, False))
                        dst = dst_srv.uri
                    argv = tool_argv(tool, trioconv, baseline, src, dst, row.dst_nbd)
                    env = args.trioconv_env if tool.program in ("trioconv", "baseline") else None
                    code, secs, rss, tail = run_timed(argv, args.timeout, env)
                    if i < 0:  # untimed warm-up run
                        continue
                    ok = code == 0 and verify(src_image, dst, args.timeout)
                res.record(tool.key, argv, code, secs, rss, tail, ok)
                print_progress(i, args.repeat, tool.label, 17, secs, rss, ok)
        dst_file.unlink(missing_ok=True)


def fmt_tables(results: list[Result], tools: list[Tool]) -> list[str]:
    out: list[str] = []
    head = ["row", *(f"{t.label} s" for t in tools)]
    head += [
        "trioconv/qemu-img (-m 8 -W)",
        *(["trioconv/base (-m 8 -W)"] if any(t.program == "baseline" for t in tools) else []),
        "trioconv in-order/-W",
        "qemu-img in-order/-W",
        "best trioconv/nbdcopy",
        "verified",
    ]
    for set_name in dict.fromkeys(r.set_name for r in results):
        rs = [r for r in results if r.set_name == set_name]
        out += [
            "",
            f"## {set_name}",
            "",
            "Median wall seconds; ratios < 1 mean the first tool is faster.",
            "",
            *table_head(head),
        ]
        for r in rs:
            med = {t.key: r.median(t.key) for t in tools}
            cells = [r.row.label]
            cells += [time_cell(med[t.key], r.failed.get(t.key, 0)) for t in tools]
            tri = [
                (m, t) for t in tools if t.program == "trioconv" and (m := med[t.key]) is not None
            ]
            best_cell = "-"
            if tri and med.get("nbdcopy"):
                m, t = min(tri, key=lambda mt: mt[0])
                best_cell = f"{ratio(m, med['nbdcopy'])} ({' '.join(t.flags)})"
            cells += [
                ratio(med.get("trioconv-m8-W"), med.get("qemu-img-m8-W")),
                *(
                    [ratio(med.get("trioconv-m8-W"), med.get("base-m8-W"))]
                    if any(t.program == "baseline" for t in tools)
                    else []
                ),
                ratio(med.get("trioconv-m8"), med.get("trioconv-m8-W")),
                ratio(med.get("qemu-img-m8"), med.get("qemu-img-m8-W")),
                best_cell,
                verified_cell(r),
            ]
            out.append("| " + " | ".join(cells) + " |")
        out += tool_table(
            "Peak RSS (MiB):", tools, [(r.row.label, rss_cells(r, tools)) for r in rs]
        )
    return out


def version(argv: list[str]) -> str:
    try:
        r = subprocess.run(argv, capture_output=True, text=True)
    except OSError:
        return "not found"
    lines = (r.stdout or r.stderr).splitlines()
    return lines[0].strip() if lines else "unknown"


def main() -> int:
    ap = bench_parser(__doc__)
    add = ap.add_argument
    add_run_args(ap, size="256M", repeat_help="timed runs per tool, row and set")
    add(
        "--workdir",
        type=Path,
        default=Path("/var/tmp/trioconv-bench-nbd"),
        help="source image cache + local target dir",
    )
    add("--sets", default=",".join(SETS), help="comma list of server sets")
    add("--rows", default=",".join(r.key for r in ROWS), help="comma list of rows")
    add(
        "--tools",
        default=",".join(t.key for t in TOOLS),
        help="comma list of tools ('trioconv' / 'qemu-img' = all their configs)",
    )
    add_trioconv_arg(ap)
    add("--baseline", help="a second trioconv command to compare with (adds 'base' columns)")
    add("--delay", default="2ms", help="delay filter: per read/write/zero/trim/extents request")
    add("--rate", default="1G", help="rate filter: bits/s per server and direction")
    add("--burstiness", default="0.01", help="rate filter: bucket size in seconds")
    add("--timeout", type=float, default=600, help="kill a copy after this many seconds")
    add(
        "--bytecode-cache",
        type=Path,
        help="PYTHONPYCACHEPREFIX for trioconv runs (default: WORKDIR/pycache); 'none'"
        " keeps the environment as it is",
    )
    add_output_args(ap)
    args = ap.parse_args()

    sets = select(args.sets, SETS, "set(s)", ap)
    row_keys = select(args.rows, [r.key for r in ROWS], "row(s)", ap)
    tool_text = ",".join(
        ",".join(t.key for t in TOOLS if t.program == n) if n in TOOL_GROUPS else n
        for n in (s.strip() for s in args.tools.split(","))
    )
    tool_keys = select(tool_text, [t.key for t in TOOLS], "tool(s)", ap)
    if args.repeat < 1 or args.warmup < 0 or args.timeout <= 0:
        ap.error("--repeat must be >= 1, --warmup >= 0, --timeout > 0")
    for prog in ("nbdkit", "qemu-img"):
        if shutil.which(prog) is None:
            sys.exit(f"{prog} not found on PATH")
    notes: list[str] = []
    if "nbdcopy" in tool_keys and shutil.which("nbdcopy") is None:
        tool_keys.remove("nbdcopy")
        notes.append("nbdcopy not found on PATH (Debian: libnbd-bin); its column is skipped.")
        print(f"NOTE: {notes[-1]}")
    tools = [t for t in TOOLS if t.key in tool_keys]
    if args.baseline:
        tools += [
            Tool("base-m8", "base -m 8", "baseline", ("-m", "8")),
            Tool("base-m8-W", "base -m 8 -W", "baseline", ("-m", "8", "-W")),
        ]
    rows = [r for r in ROWS if r.key in row_keys]
    if not tools or not rows or not sets:
        ap.error("nothing to run")

    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    # An installed trioconv runs from compiled bytecode; with PYTHONDONTWRITEBYTECODE
    # set (as in some CI and container images) every run would compile its modules from
    # source again (~0.1 s). Give trioconv a bytecode cache of its own outside the tree;
    # the warm-up run fills it.
    args.trioconv_env = None
    cache = args.bytecode_cache or workdir / "pycache"
    if str(cache) != "none":
        args.trioconv_env = {**os.environ, "PYTHONPYCACHEPREFIX": str(cache)}
        args.trioconv_env.pop("PYTHONDONTWRITEBYTECODE", None)
    src = workdir / f"source-v1-{args.size}-s{args.seed}.raw"
    if not src.exists():
        create_in_child(lambda p: create_source(p, args.size, args.seed), src)
    print(image_info(src))

    results: list[Result] = []
    # Unix socket paths are limited to ~108 bytes: keep them short, outside workdir.
    rundir = Path(tempfile.mkdtemp(prefix="tcbnbd-"))
    try:
        for set_name in sets:
            for row in rows:
                results.append(Result(set_name, row))
                bench_row(results[-1], tools, args, src, rundir)
    finally:
        shutil.rmtree(rundir, ignore_errors=True)

    filters, params = filter_args(sets[-1], args)
    server_cmd = shlex.join(["nbdkit", "-U", "SOCKET", *filters, "PLUGIN", *params])
    report = [
        "# NBD convert: trioconv vs qemu-img vs nbdcopy (raw -> raw)",
        "",
        *machine_header(workdir),
        f"- nbdkit: {version(['nbdkit', '--version'])};"
        f" nbdcopy: {version(['nbdcopy', '--version'])}",
        f"- source: {image_info(src)}",
        f"- servers: `{server_cmd}` on a unix socket; PLUGIN is `file IMAGE` (with"
        " `--readonly`) for NBD sources, `memory SIZE` for NBD targets, restarted fresh"
        " for every run",
        f"- sets: `delay` = {args.delay} per read/write/zero/trim/extents request;"
        f" `delay+rate` adds `rate={args.rate} burstiness={args.burstiness}`"
        " (bits/s, separately for reads and writes, per server)",
        f"- trioconv: `{args.trioconv} convert -f raw -O raw [-n] FLAGS SRC DST`"
        " (default --connections); qemu-img: same arguments; nbdcopy: `nbdcopy SRC DST`"
        + (f"; base: `{args.baseline}`, same arguments" if args.baseline else ""),
        "- trioconv bytecode: "
        + (
            f"compiled once into `PYTHONPYCACHEPREFIX={args.trioconv_env['PYTHONPYCACHEPREFIX']}`"
            if args.trioconv_env
            else "environment unchanged"
            + (
                " (PYTHONDONTWRITEBYTECODE set)"
                if os.environ.get("PYTHONDONTWRITEBYTECODE")
                else ""
            )
        ),
        f"- {args.warmup} untimed warm-up + {args.repeat} timed runs per tool, row and"
        " set, interleaved; median wall time, max peak RSS;"
        " every timed output checked with `qemu-img compare`",
        rss_floor(),
        "- in-order = `-m 8` without `-W`; best trioconv = fastest of its configs",
        *fmt_tables(results, tools),
    ]
    if notes:
        report += ["", *(f"Note: {n}" for n in notes)]
    write_report(report, args.output)
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""Times every benchmark case without pytest and prints Markdown tables (one per op) for a device.

    python benchmarks/report.py --device cpu
    python benchmarks/report.py --device cuda --out /tmp/gpu_results.md
    python benchmarks/report.py --device cuda --quick

Each implementation of a case is timed with ``torch.utils.benchmark`` (``Timer.blocked_autorange``, in
interleaved rounds, best median kept); the run ends with ``Compare``'s side-by-side tables (ours vs eager
vs torch.compile; ours vs loop vs foreach). The Markdown adds what those tables lack: GB/s against the
copy bandwidth measured in the same run, speed ratios, and a note on rows timed while other processes
were computing. Each implementation is checked against the float64 reference first; a case that fails,
or whose torch.compile baseline fails, is reported in the table and the run goes on. With ``--out``
the file is rewritten (atomically) after every case, so an interrupted run still leaves the rows done
so far.

``dfmu_ext`` is imported as installed (``pip install -e .`` of the tree being measured); the header
says where it came from.
"""
from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
import traceback

import torch

import bench_common as bc  # this script's folder is on sys.path when it runs as a script
from dfmu_ext import ops
from dfmu_ext._io import atomic_write_bytes, markdown_table


_TREE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _package_dir() -> str:
    return os.path.dirname(os.path.abspath(ops.__file__))


def _fmt(x, spec: str, none: str = "-") -> str:
    return none if x is None else format(x, spec)


def _ratio(base, ours) -> str:
    return "-" if not base or not ours else f"{base / ours:.2f}x"


def _short_error(exc: BaseException) -> str:
    lines = [ln for ln in str(exc).strip().splitlines() if ln.strip()]
    msg = lines[0] if lines else ""
    return f"{type(exc).__name__}: {msg}"[:160]


def device_description(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name(0)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name}, {torch.get_num_threads()} threads"


class ForeignLoad:
    """How much of the machine's CPU time went to other processes over an interval (Linux only):
    (all busy jiffies - our own CPU time) / (elapsed x CPUs). On a shared machine this says which rows
    were timed while someone else was computing."""

    def __init__(self):
        self.start = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                fields = [int(x) for x in f.readline().split()[1:]]
            hz = os.sysconf("SC_CLK_TCK")
            busy = (sum(fields[:3]) + sum(fields[5:8])) / hz  # user nice system irq softirq steal
            t = os.times()
            return time.perf_counter(), busy, t.user + t.system
        except (OSError, ValueError, IndexError):
            return None

    def share(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None:
            return None
        wall = end[0] - self.start[0]
        if wall <= 0:
            return None
        other = (end[1] - self.start[1]) - (end[2] - self.start[2])
        return max(0.0, other / (wall * (os.cpu_count() or 1)))


def foreign_note(load: "ForeignLoad | None", threshold: float = 0.1) -> str | None:
    share = load.share() if load is not None else None
    if share is None or share < threshold:
        return None
    return f"other processes used {100 * share:.0f}% of the CPUs while this row was timed: treat it as unreliable"


class Report:
    def __init__(self, device: str, out: str | None):
        self.device = device
        self.out = out
        self.header: list[str] = []
        self.sections: list[tuple[str, list[str], list[list[str]], list[str]]] = []  # title, columns, rows, notes
        self.measurements: list = []  # torch.utils.benchmark Measurements, for Compare
        self.noisy_rows = 0  # CPU rows timed while other processes used > 10% of the CPUs
        self.ours_failures = 0  # cases where our op failed or gave a wrong result (compile failures do not count)

    def section(self, title: str, columns: list[str]) -> int:
        self.sections.append((title, columns, [], []))
        return len(self.sections) - 1

    def row(self, i: int, cells: list[str]) -> None:
        self.sections[i][2].append(cells)
        print("| " + " | ".join(cells) + " |", flush=True)
        self.write()

    def note(self, i: int, text: str) -> None:
        self.sections[i][3].append(text)
        print(text, flush=True)
        self.write()

    def render(self) -> str:
        parts = list(self.header)
        for title, columns, rows, notes in self.sections:
            parts += ["", f"### {title}", "", markdown_table(columns, rows)]
            if notes:
                parts += [""] + [f"- {n}" for n in notes]
        return "\n".join(parts) + "\n"

    def write(self) -> None:
        if self.out:
            atomic_write_bytes(self.out, self.render().encode())


def run_importance(rep: Report, args) -> None:
    dev = args.device
    copy = bc.copy_bandwidth_gbps(dev)
    sec = rep.section(f"block_importance ({dev}; groups: {bc.NUM_GROUPS}, reduce='abs')",
                      ["shape / dtype", "ours µs", "ours, ids pre-checked µs", "eager µs", "compile µs",
                       "ours GB/s", "% of copy", "pre-checked % of copy", "vs eager", "vs compile"])
    compile_spent = 0.0
    for case in bc.importance_cases(dev, quick=args.quick):
        t_case = time.perf_counter()
        times: dict[str, float | None] = {"ours": None, "prechecked": None, "eager": None, "compile": None}
        notes: list[str] = []
        try:
            a, g, groups = bc.importance_inputs(case, dev)
        except Exception as exc:  # noqa: BLE001 - e.g. out of memory: report and go on
            rep.ours_failures += 1
            rep.row(sec, [case.label, "error", "-", "-", "-", "-", "-", "-", "-", "-"])
            rep.note(sec, f"{case.label}: inputs: {_short_error(exc)}")
            continue
        fns = {
            "ours": lambda: ops.block_importance(a, g, groups, bc.NUM_GROUPS, case.channel_dim, "abs"),
            # As the scoring pass calls it: ids validated once for all blocks, no device sync per call.
            "prechecked": lambda: ops.block_importance(a, g, groups, bc.NUM_GROUPS, case.channel_dim, "abs",
                                                       check_groups=False),
            "eager": lambda: bc.eager_block_importance(a, g, groups, bc.NUM_GROUPS, case.channel_dim),
        }
        if args.no_compile:
            notes.append("compile: skipped (--no-compile)")
        elif compile_spent > args.compile_budget:
            notes.append(f"compile: skipped (compile budget of {args.compile_budget:.0f} s spent)")
        else:
            compiled = None
            t0 = time.perf_counter()
            try:
                compiled = bc.compiled_block_importance()
                compiled(a, g, groups, bc.NUM_GROUPS, case.channel_dim)  # compiles here
                bc.synchronize(dev)
            except Exception as exc:  # noqa: BLE001 - torch.compile must not abort the run
                compiled = None
                notes.append(f"compile failed: {_short_error(exc)}")
            compile_spent += time.perf_counter() - t0
            if compiled is not None:
                fns["compile"] = lambda: compiled(a, g, groups, bc.NUM_GROUPS, case.channel_dim)
        checked = {}
        for impl, fn in fns.items():
            try:
                out = fn()
                bc.synchronize(dev)
                bc.check_importance(out, a, g, groups, case, loose=impl not in ("ours", "prechecked"))
                del out
                checked[impl] = fn
            except Exception as exc:  # noqa: BLE001
                notes.append(f"{impl} failed: {_short_error(exc)}")
                if args.verbose:
                    traceback.print_exc()
        load = ForeignLoad() if dev == "cpu" else None  # over the timing only (compile workers are not "others")
        for impl, m in bc.time_interleaved(checked, rounds=args.rounds, min_run_time=args.min_run_time,
                                           label=f"block_importance ({dev})", sub_label=case.label).items():
            if isinstance(m, BaseException):
                notes.append(f"{impl} failed while timed: {_short_error(m)}")
            else:
                times[impl] = m.median
                rep.measurements.append(m)
        note = foreign_note(load)
        if note:
            notes.append(note)
            rep.noisy_rows += 1
        ours = times["ours"]
        rep.ours_failures += ours is None
        rate = bc.gbps(case.bytes_moved(), ours)
        pre = times["prechecked"]
        pre_rate = bc.gbps(case.bytes_moved(), pre)
        rep.row(sec, [case.label, _fmt(ours and ours * 1e6, ".1f", "error"), _fmt(pre and pre * 1e6, ".1f"),
                      _fmt(times["eager"] and times["eager"] * 1e6, ".1f"),
                      _fmt(times["compile"] and times["compile"] * 1e6, ".1f"), _fmt(rate, ".1f"),
                      _fmt(rate and 100 * rate / copy, ".1f"), _fmt(pre_rate and 100 * pre_rate / copy, ".1f"),
                      _ratio(times["eager"], ours),
                      _ratio(times["compile"], ours)])
        for n in notes:
            rep.note(sec, f"{case.label}: {n}")
        del a, g, groups, fns
        if dev == "cuda":
            torch.cuda.empty_cache()
        if args.verbose:
            print(f"  ({case.label}: {time.perf_counter() - t_case:.1f} s)", file=sys.stderr)


def run_masks(rep: Report, args) -> None:
    dev = args.device
    copy = bc.copy_bandwidth_gbps(dev)
    sec = rep.section(f"apply_channel_masks_ ({dev}; 70% of units kept; bytes = read + write of every tensor, "
                      "although kept units (mask exactly 1) need no traffic and are skipped)",
                      ["parameter list / dtype", "ours µs", "loop µs", "foreach µs", "ours GB/s", "% of copy",
                       "vs loop", "vs foreach"])
    impls = {"ours": ops.apply_channel_masks_, "loop": bc.loop_masks_, "foreach": bc.foreach_masks_}
    for case in bc.mask_cases(dev, quick=args.quick):
        times: dict[str, float | None] = {k: None for k in impls}
        notes: list[str] = []
        label = case.name
        load = None
        try:
            tensors, masks = bc.mask_inputs(case, dev)
            views = bc.broadcast_mask_views(tensors, masks)
            label = f"{case.net} ({len(tensors)} tensors, {sum(t.numel() for t in tensors) / 1e6:.1f}M) {case.dtype}"
            label += ", dense 0/-1 masks" if case.masks == "dense" else ", 0/1 masks"
            checked = {}
            for impl, call in impls.items():
                try:
                    bc.verify_masks_impl(call, case, dev, prepare_views=impl == "foreach")
                    arg = views if impl == "foreach" else masks
                    checked[impl] = (lambda call=call, arg=arg: call(tensors, arg))
                except Exception as exc:  # noqa: BLE001
                    notes.append(f"{impl} failed: {_short_error(exc)}")
                    if args.verbose:
                        traceback.print_exc()
            load = ForeignLoad() if dev == "cpu" else None
            for impl, m in bc.time_interleaved(checked, rounds=args.rounds, min_run_time=args.min_run_time,
                                               label=f"apply_channel_masks_ ({dev})", sub_label=label).items():
                if isinstance(m, BaseException):
                    notes.append(f"{impl} failed while timed: {_short_error(m)}")
                else:
                    times[impl] = m.median
                    rep.measurements.append(m)
            nbytes = bc.mask_bytes_moved(tensors)
        except Exception as exc:  # noqa: BLE001
            notes.append(f"inputs: {_short_error(exc)}")
            nbytes = 0
        note = foreign_note(load)
        if note:
            notes.append(note)
            rep.noisy_rows += 1
        ours = times["ours"]
        rep.ours_failures += ours is None
        rate = bc.gbps(nbytes, ours) if nbytes else None
        rep.row(sec, [label, _fmt(ours and ours * 1e6, ".1f", "error"), _fmt(times["loop"] and times["loop"] * 1e6, ".1f"),
                      _fmt(times["foreach"] and times["foreach"] * 1e6, ".1f"), _fmt(rate, ".1f"),
                      _fmt(rate and 100 * rate / copy, ".1f"), _ratio(times["loop"], ours),
                      _ratio(times["foreach"], ours)])
        for n in notes:
            rep.note(sec, f"{label}: {n}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", help="also write the Markdown here (atomically, after every case)")
    p.add_argument("--quick", action="store_true", help="fewer cases and repetitions")
    p.add_argument("--only", choices=("importance", "masks"), help="run one op's cases only")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    p.add_argument("--compile-budget", type=float, default=None,
                   help="seconds of torch.compile time after which the compile baseline is skipped "
                        "(default 150; 60 with --quick)")
    p.add_argument("--min-run-time", type=float, default=None,
                   help="blocked_autorange's min_run_time: seconds per implementation and round "
                        "(default 0.3; 0.15 with --quick)")
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved timing rounds per case, best median kept (default 3 on cpu, 2 on cuda; 1 with --quick)")
    p.add_argument("--verbose", "-v", action="store_true")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("report.py: --device cuda but no CUDA device is available", file=sys.stderr)
        return 2
    quick = args.quick
    args.rounds = args.rounds if args.rounds is not None else (1 if quick else (3 if args.device == "cpu" else 2))
    args.min_run_time = args.min_run_time if args.min_run_time is not None else (0.15 if quick else 0.3)
    args.compile_budget = args.compile_budget if args.compile_budget is not None else (60.0 if quick else 150.0)

    rep = Report(args.device, args.out)
    start = time.perf_counter()
    try:
        info = __import__("dfmu_ext").build_info()
    except Exception as exc:  # noqa: BLE001
        info = {"error": _short_error(exc)}
    try:
        copy = bc.copy_bandwidth_gbps(args.device)
        copy_s = f"{copy:.1f} GB/s ({bc.copy_buffer_bytes(args.device) >> 20} MB `dst.copy_(src)`, 2 x bytes / time)"
    except Exception as exc:  # noqa: BLE001
        print(f"copy bandwidth failed: {_short_error(exc)}", file=sys.stderr)
        return 1
    rep.header = [
        f"## {args.device.upper()}: {device_description(args.device)}",
        "",
        f"- date: {datetime.datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}; torch {torch.__version__}; "
        f"dfmu_ext build: {info}",
        f"- dfmu_ext imported from {_package_dir()}",
        f"- copy bandwidth: {copy_s}",
        f"- timing: torch.utils.benchmark `Timer.blocked_autorange(min_run_time={args.min_run_time:g})` at "
        f"{torch.get_num_threads()} threads, best median of {args.rounds} interleaved rounds (ours, eager, compile, "
        f"ours, ...); each implementation's checked call and the Timer's block-size estimation are its warm-up"
        + (" (the Timer synchronizes the device around each block of calls)" if args.device == "cuda" else "")
        + ("; --quick" if quick else ""),
        "- GB/s: block_importance 2 x act bytes (act and grad read once); masking: read + write of every "
        "tensor. Small problems stay in cache between calls, so % of copy can exceed 100.",
        "- speed-ups are baseline time / ours (> 1: ours is faster).",
    ]
    if args.device == "cpu":
        try:
            rep.header.insert(3, f"- load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        except OSError:
            pass
    print("\n".join(rep.header), flush=True)
    if not _package_dir().startswith(_TREE + os.sep):
        print(f"report.py: note: timing dfmu_ext from {_package_dir()}, not this tree ({_TREE}); install this "
              "tree (pip install -e .) to time it", file=sys.stderr)
    rep.write()
    failures = 0
    for name, fn in (("importance", run_importance), ("masks", run_masks)):
        if args.only and args.only != name:
            continue
        try:
            fn(rep, args)
        except Exception as exc:  # noqa: BLE001 - one op's failure must not lose the other's table
            failures += 1
            print(f"{name}: {_short_error(exc)}", file=sys.stderr)
            traceback.print_exc()
    rep.header.append(f"- total wall time: {time.perf_counter() - start:.0f} s")
    if args.device == "cpu":
        try:
            rep.header.append(f"- load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        except OSError:
            pass
        rows = sum(len(sec[2]) for sec in rep.sections)
        rep.header.append(f"- rows timed while other processes used > 10% of the CPUs (see the notes): "
                          f"{rep.noisy_rows} of {rows}")
    rep.write()
    if rep.measurements:
        print()
        print(bc.compare_table(rep.measurements), flush=True)
    print()
    print(rep.render())
    if rep.ours_failures:
        print(f"report.py: dfmu_ext's op failed or was wrong in {rep.ours_failures} case(s); see the notes", file=sys.stderr)
    return 1 if failures or rep.ours_failures else 0


if __name__ == "__main__":
    sys.exit(main())

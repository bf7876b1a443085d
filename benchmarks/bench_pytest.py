"""pytest-benchmark helpers shared by the benchmark modules (timing rounds, extra_info, a summary)."""
from __future__ import annotations

import time
from typing import Callable

import torch

from bench_common import copy_bandwidth_gbps, synchronize

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# Target wall time of one benchmark (all rounds); keeps `make bench` within a few minutes on 2 cores.
TARGET_SECONDS = {"cpu": 0.6, "cuda": 0.3}
MAX_ROUNDS = {"cpu": 60, "cuda": 200}


def timed(fn: Callable[[], object], device: str) -> Callable[[], None]:
    """What pytest-benchmark times: on CUDA the call plus a synchronize, so the time is the kernel's."""
    if device == "cuda":
        def run() -> None:
            fn()
            torch.cuda.synchronize()
        return run

    def run_cpu() -> None:
        fn()
    return run_cpu


def run_benchmark(benchmark, fn: Callable[[], object], device: str) -> float:
    """Warm up, pick a round count from one probe call, time with ``benchmark.pedantic``; returns
    the median seconds. Under ``--benchmark-disable`` (the suites run as plain tests) ``pedantic``
    calls ``fn`` once and keeps no statistics: the probe call's time is returned instead."""
    run = timed(fn, device)
    for _ in range(2):
        run()
    synchronize(device)
    t0 = time.perf_counter()
    run()
    probe = max(time.perf_counter() - t0, 1e-6)
    rounds = int(min(MAX_ROUNDS[device], max(5, TARGET_SECONDS[device] / probe)))
    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable
        return probe
    return float(benchmark.stats.stats.median)


def record(benchmark, device: str, nbytes: int, seconds: float, baseline_seconds: dict[str, float | None],
           summary: list | None = None, label: str = "", impl: str = "") -> None:
    copy = copy_bandwidth_gbps(device)
    rate = nbytes / seconds / 1e9
    info = benchmark.extra_info
    info["device"] = device
    info["bytes_moved"] = nbytes
    info["GB/s"] = round(rate, 2)
    info["copy_GB/s"] = round(copy, 2)
    info["fraction_of_copy"] = round(rate / copy, 4)
    for name, base in baseline_seconds.items():
        if base:
            info[f"ratio_vs_{name}"] = round(base / seconds, 3)  # > 1: faster than the baseline
    if summary is not None:
        summary.append((device, label, impl, seconds * 1e6, rate, rate / copy,
                        {k: (v / seconds if v else None) for k, v in baseline_seconds.items()}))


def print_summary(request, title: str, rows: list) -> None:
    """Print GB/s and ratios (which pytest-benchmark's table cannot show) after the module's tests."""
    if not rows:
        return
    lines = [f"", f"{title}  (copy bandwidth: " + ", ".join(
        f"{d} {copy_bandwidth_gbps(d):.1f} GB/s" for d in sorted({r[0] for r in rows})) + ")"]
    for device, label, impl, us, rate, frac, ratios in rows:
        rs = "  ".join(f"x{v:.2f} vs {k}" for k, v in ratios.items() if v)
        lines.append(f"  {device:4s} {label:38s} {impl:8s} {us:10.1f} us {rate:7.2f} GB/s {100 * frac:6.1f}% copy  {rs}")
    capman = request.config.pluginmanager.getplugin("capturemanager")
    try:
        ctx = capman.global_and_fixture_disabled() if capman is not None else None
    except Exception:  # pragma: no cover - private pytest API changed
        ctx = None
    if ctx is None:
        return
    with ctx:
        print("\n".join(lines), flush=True)


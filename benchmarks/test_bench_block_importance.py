"""block_importance vs eager PyTorch vs torch.compile of the same eager function.

Every implementation's result is checked against the float64 reference before it is timed.
extra_info: GB/s (2 x act bytes / time), the copy bandwidth measured in this run, the fraction of it,
and the speed ratio vs eager (and vs compile for ours).
"""
from __future__ import annotations

import pytest
import torch

from bench_common import (ImportanceCase, check_importance, compiled_block_importance, copy_bandwidth_gbps,
                          copy_buffer_bytes, eager_block_importance, importance_cases, importance_inputs,
                          NUM_GROUPS, synchronize, time_fn)
from bench_pytest import DEVICES, print_summary, record, run_benchmark
from dfmu_ext import ops

CASES = [pytest.param(d, c, id=f"{d}-{c.name}") for d in DEVICES for c in importance_cases(d)]
IMPLS = ["eager", "compile", "ours"]  # eager first: the others' ratios use its time

_TIMES: dict[tuple[str, ImportanceCase, str], float] = {}
_SUMMARY: list = []


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    print_summary(request, "block_importance", _SUMMARY)


@pytest.mark.parametrize("device", DEVICES)
def test_copy_bandwidth(benchmark, device):
    """The yardstick: dst.copy_(src) of a 128 MB (CPU) / 256 MB (CUDA) buffer."""
    nbytes = copy_buffer_bytes(device)
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    benchmark.group = f"{device} copy"
    seconds = run_benchmark(benchmark, lambda: dst.copy_(src), device)
    benchmark.extra_info["GB/s"] = round(2 * nbytes / seconds / 1e9, 2)
    benchmark.extra_info["GB/s (Timer)"] = round(copy_bandwidth_gbps(device), 2)


def _impl_fn(impl: str, case: ImportanceCase, a, g, groups):
    args = (a, g, groups, NUM_GROUPS, case.channel_dim)
    if impl == "ours":
        return lambda: ops.block_importance(a, g, groups, NUM_GROUPS, case.channel_dim, "abs")
    if impl == "eager":
        return lambda: eager_block_importance(*args)
    compiled = compiled_block_importance()
    return lambda: compiled(*args)


def _baseline_seconds(impl: str, device: str, case: ImportanceCase, a, g, groups) -> float:
    key = (device, case, impl)
    if key not in _TIMES:  # e.g. run alone with -k: time the baseline here, plainly
        fn = _impl_fn(impl, case, a, g, groups)
        _TIMES[key] = time_fn(fn, min_run_time=0.5)
    return _TIMES[key]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device,case", CASES)
def test_block_importance(benchmark, device, case, impl):
    a, g, groups = importance_inputs(case, device)
    fn = _impl_fn(impl, case, a, g, groups)
    try:
        out = fn()
        synchronize(device)
    except Exception as exc:  # noqa: BLE001
        if impl == "compile":
            pytest.skip(f"torch.compile failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        raise
    check_importance(out, a, g, groups, case, loose=impl != "ours")
    benchmark.group = f"{device} block_importance {case.name}"
    seconds = run_benchmark(benchmark, fn, device)
    _TIMES[(device, case, impl)] = seconds
    baselines = {}
    if impl != "eager":
        baselines["eager"] = _baseline_seconds("eager", device, case, a, g, groups)
    if impl == "ours":
        try:
            baselines["compile"] = _baseline_seconds("compile", device, case, a, g, groups)
        except Exception:  # noqa: BLE001 - compile unavailable: no ratio
            baselines["compile"] = None
    record(benchmark, device, case.bytes_moved(), seconds, baselines, _SUMMARY, case.label, impl)

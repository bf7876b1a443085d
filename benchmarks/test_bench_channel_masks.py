"""apply_channel_masks_ vs a per-tensor Python loop vs torch._foreach_mul_, over every parameter of
ResNet-18 (dfmu_ext.zoo.models.ResNet18, width 64: 62 tensors, 11.2M values) and of a ResNet-50-shaped
list (161 tensors, 25.6M values).

Every implementation is checked against the float64 reference before it is timed. extra_info: GB/s
(read + write of every masked tensor / time), the copy bandwidth, the fraction of it and the speed
ratios vs the loop (and vs foreach for ours).
"""
from __future__ import annotations

import pytest

from bench_common import (MaskCase, broadcast_mask_views, foreach_masks_, loop_masks_, mask_bytes_moved,
                          mask_cases, mask_inputs, time_fn, verify_masks_impl)
from bench_pytest import DEVICES, print_summary, record, run_benchmark
from dfmu_ext import ops

CASES = [pytest.param(d, c, id=f"{d}-{c.name}") for d in DEVICES for c in mask_cases(d)]
IMPLS = ["loop", "foreach", "ours"]  # loop first: the others' ratios use its time

_TIMES: dict[tuple[str, MaskCase, str], float] = {}
_SUMMARY: list = []


@pytest.fixture(scope="module", autouse=True)
def _summary(request):
    yield
    print_summary(request, "apply_channel_masks_", _SUMMARY)


def _impl_fn(impl: str, tensors, masks):
    if impl == "ours":
        return lambda: ops.apply_channel_masks_(tensors, masks)
    if impl == "loop":
        return lambda: loop_masks_(tensors, masks)
    views = broadcast_mask_views(tensors, masks)  # pre-broadcast once, outside the timing
    return lambda: foreach_masks_(tensors, views)


_IMPL_CALLS = {"ours": ops.apply_channel_masks_, "loop": loop_masks_, "foreach": foreach_masks_}


def _baseline_seconds(impl: str, device: str, case: MaskCase, tensors, masks) -> float:
    key = (device, case, impl)
    if key not in _TIMES:
        _TIMES[key] = time_fn(_impl_fn(impl, tensors, masks), min_run_time=0.5)
    return _TIMES[key]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("device,case", CASES)
def test_apply_channel_masks(benchmark, device, case, impl):
    verify_masks_impl(_IMPL_CALLS[impl], case, device, prepare_views=impl == "foreach")
    tensors, masks = mask_inputs(case, device)
    fn = _impl_fn(impl, tensors, masks)
    benchmark.group = f"{device} apply_channel_masks_ {case.name}"
    seconds = run_benchmark(benchmark, fn, device)
    _TIMES[(device, case, impl)] = seconds
    baselines = {}
    if impl != "loop":
        baselines["loop"] = _baseline_seconds("loop", device, case, tensors, masks)
    if impl == "ours":
        baselines["foreach"] = _baseline_seconds("foreach", device, case, tensors, masks)
    label = f"{case.net} ({len(tensors)} tensors) {case.dtype}"
    record(benchmark, device, mask_bytes_moved(tensors), seconds, baselines, _SUMMARY, label, impl)

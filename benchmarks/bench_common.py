"""What the pytest benchmarks and ``report.py`` share: the cases, the baselines, correctness checks,
timing (``torch.utils.benchmark``: ``Timer.blocked_autorange`` and ``Compare``), the copy-bandwidth
yardstick and byte counts.

Baselines
---------
``block_importance`` is compared with

* eager PyTorch, the way one writes it by hand: ``(a * g).sum(positions)`` per sample in the input's
  dtype, then ``abs`` and a per-group sum with ``index_add_``;
* ``torch.compile`` of that same function (inductor, default mode, static shapes).

``apply_channel_masks_`` is compared with

* a per-tensor Python loop ``t.mul_(m.view(-1, 1, ...))``;
* ``torch._foreach_mul_(tensors, views)`` with the mask views broadcast once, outside the timing.

Bytes moved (for GB/s): ``2 x act bytes`` for importance (act and grad are each read once; the
``(K, C)`` output is negligible) and ``read + write`` of every masked tensor for masking. The
yardstick is ``dst.copy_(src)`` measured in the same process: ``2 x buffer bytes / time``.
Small problems (a few MB) stay in the CPU's L3 / the GPU's L2 between repetitions, so their
"fraction of copy bandwidth" can exceed 100%; it is a yardstick, not a bound.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.utils import benchmark as tbench

import dfmu_ext  # noqa: F401  (loads the kernels)
from dfmu_ext import ops
from dfmu_ext import reference as ref

NUM_GROUPS = 10  # e.g. one group per class of a 10-class problem: the unlearning use

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ImportanceCase:
    shape: tuple[int, ...]
    dtype: str  # key of DTYPES
    channel_dim: int = 1
    channels_last: bool = False

    @property
    def name(self) -> str:
        s = "x".join(map(str, self.shape))
        extra = ",cl" if self.channels_last else ""
        extra += f",cd={self.channel_dim}" if self.channel_dim != 1 else ""
        return f"{s}{extra},{self.dtype}"

    @property
    def label(self) -> str:  # for Markdown tables
        s = "(" + ", ".join(map(str, self.shape)) + ")"
        if self.channels_last:
            s += " channels_last"
        if self.channel_dim != 1:
            s += f" cd={self.channel_dim}"
        return f"{s} {self.dtype}"

    def bytes_moved(self) -> int:
        return 2 * math.prod(self.shape) * DTYPES[self.dtype].itemsize


def importance_cases(device: str, quick: bool = False) -> list[ImportanceCase]:
    """The full list of network shapes on CUDA; a reduced list on the CPU (the big ones take seconds
    per call in eager mode there and do not fit the `make bench` budget)."""
    if device == "cuda":
        shapes = [((256, 64, 32, 32), 1), ((256, 512, 4, 4), 1), ((128, 256, 56, 56), 1),
                  ((64, 64, 112, 112), 1), ((4096, 768), -1), ((64, 197, 768), -1)]
        if quick:
            shapes = [shapes[0], shapes[2], shapes[4], shapes[5]]
        cases = [ImportanceCase(s, dt, cd) for s, cd in shapes for dt in DTYPES]
        cases.append(ImportanceCase((256, 64, 32, 32), "fp32", 1, channels_last=True))
        cases.append(ImportanceCase((256, 64, 32, 32), "bf16", 1, channels_last=True))
        return cases
    shapes = [((128, 64, 32, 32), 1), ((256, 512, 4, 4), 1), ((4096, 768), -1), ((64, 197, 768), -1)]
    if quick:
        return [ImportanceCase(shapes[0][0], "fp32"), ImportanceCase(shapes[2][0], "fp32", -1),
                ImportanceCase(shapes[0][0], "fp32", 1, channels_last=True)]
    cases = [ImportanceCase(s, dt, cd) for s, cd in shapes for dt in DTYPES]
    cases.insert(2, ImportanceCase((128, 64, 32, 32), "fp32", 1, channels_last=True))
    return cases


@dataclass(frozen=True)
class MaskCase:
    net: str    # "resnet18" or "resnet50"
    dtype: str  # key of DTYPES
    masks: str = "prune"  # "prune": 0/1 masks; "dense": 0/-1 masks, so every unit is read and written

    @property
    def name(self) -> str:
        return f"{self.net},{self.dtype}" + (",dense" if self.masks == "dense" else "")


def mask_cases(device: str, quick: bool = False) -> list[MaskCase]:
    nets = ("resnet18", "resnet50")
    dts = ("fp32",) if quick else tuple(DTYPES)
    # The kernels skip units whose mask is exactly 1 (x * 1 == x): with 0/1 masks they touch only the
    # pruned units. The "dense" case (no mask is 1) measures the streaming rate over every byte.
    return [MaskCase(n, d) for n in nets for d in dts] + [MaskCase("resnet50", "fp32", "dense")]


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------

def importance_inputs(case: ImportanceCase, device: str, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[case.dtype]
    a = torch.randn(case.shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    g = torch.randn(case.shape, generator=gen, device=device, dtype=torch.float32).to(dtype)
    if case.channels_last:
        a = a.contiguous(memory_format=torch.channels_last)
        g = g.contiguous(memory_format=torch.channels_last)
    groups = torch.randint(0, NUM_GROUPS, (case.shape[0],), generator=gen, device=device)
    return a, g, groups


def resnet50_param_shapes(num_classes: int = 1000) -> list[tuple[int, ...]]:
    """Parameter shapes of a torchvision-style ResNet-50 (161 tensors, 25.6M parameters): a 7x7 stem
    conv + BN, bottleneck blocks [3, 4, 6, 3] with widths 64..512 (outputs 256..2048; 1x1 -> 3x3 -> 1x1
    convs, each followed by a BN weight and bias; a 1x1 conv + BN downsample on each stage's first
    block), and the fc layer."""
    shapes: list[tuple[int, ...]] = [(64, 3, 7, 7), (64,), (64,)]
    cin = 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        cout = 4 * width
        for b in range(blocks):
            shapes += [(width, cin, 1, 1), (width,), (width,),
                       (width, width, 3, 3), (width,), (width,),
                       (cout, width, 1, 1), (cout,), (cout,)]
            if b == 0:
                shapes += [(cout, cin, 1, 1), (cout,), (cout,)]
            cin = cout
    shapes += [(num_classes, cin), (num_classes,)]
    return shapes


def resnet18_param_shapes() -> list[tuple[int, ...]]:
    from dfmu_ext.zoo.models import ResNet18
    return [tuple(p.shape) for p in ResNet18(in_channels=3, width=64).parameters()]


def mask_inputs(case: MaskCase, device: str, seed: int = 0):
    """The network's parameters (plain tensors, no autograd) and one mask per tensor, 70% of units kept.

    Masks are 0/1 (pruning; "dense": 0/-1) so that repeating the in-place op while timing neither changes the
    work nor drives values into float denormals, as repeated dampening factors would.
    """
    shapes = resnet18_param_shapes() if case.net == "resnet18" else resnet50_param_shapes()
    gen = torch.Generator(device=device).manual_seed(seed)
    dtype = DTYPES[case.dtype]
    tensors = [torch.randn(s, generator=gen, device=device, dtype=torch.float32).to(dtype) for s in shapes]
    masks = [(torch.rand(s[0], generator=gen, device=device) >= 0.3).float() for s in shapes]
    if case.masks == "dense":  # -1 instead of 1: every unit rewritten, magnitudes unchanged by repetition
        masks = [-m for m in masks]
    return tensors, masks


def mask_bytes_moved(tensors: Sequence[torch.Tensor]) -> int:
    return sum(2 * t.numel() * t.element_size() for t in tensors)


# ----------------------------------------------------------------------------------------------
# Baselines
# ----------------------------------------------------------------------------------------------

def eager_block_importance(act: torch.Tensor, grad: torch.Tensor, groups: torch.Tensor, num_groups: int,
                           channel_dim: int) -> torch.Tensor:
    """The hand-written PyTorch version: per-sample (a*g).sum over positions, abs, group sum."""
    cd = channel_dim % act.dim()
    dims = [d for d in range(1, act.dim()) if d != cd]
    prod = act * grad
    s = prod.sum(dims) if dims else prod  # (N, C); note sum(dim=[]) would reduce everything
    r = s.float().abs()
    out = torch.zeros(num_groups, r.shape[1], dtype=torch.float32, device=act.device)
    return out.index_add_(0, groups, r)


_COMPILED: Callable | None = None


def compiled_block_importance() -> Callable:
    """One torch.compile'd wrapper of the eager function (recompiled per shape/dtype/layout)."""
    global _COMPILED
    if _COMPILED is None:
        import torch._dynamo
        cfg = torch._dynamo.config
        for knob in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                     "accumulated_cache_size_limit"):
            if hasattr(cfg, knob):
                setattr(cfg, knob, max(getattr(cfg, knob), 256))
        _COMPILED = torch.compile(eager_block_importance, dynamic=False)
    return _COMPILED


def loop_masks_(tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> None:
    for t, m in zip(tensors, masks):
        t.mul_(m.view((-1,) + (1,) * (t.dim() - 1)))


def broadcast_mask_views(tensors: Sequence[torch.Tensor], masks: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Mask views shaped (-1, 1, ...) like each tensor, in the tensor's dtype (exact for 0/1 masks), so
    that ``_foreach_mul_`` may take its fused same-dtype path."""
    return [m.to(t.dtype).view((-1,) + (1,) * (t.dim() - 1)) for t, m in zip(tensors, masks)]


def foreach_masks_(tensors: Sequence[torch.Tensor], views: Sequence[torch.Tensor]) -> None:
    torch._foreach_mul_(list(tensors), list(views))


# ----------------------------------------------------------------------------------------------
# Correctness
# ----------------------------------------------------------------------------------------------

class CheckError(AssertionError):
    pass


def check_importance(out: torch.Tensor, act, grad, groups, case: ImportanceCase, loose: bool = False) -> None:
    """``out`` against the float64 reference, relative to the magnitude of what was summed.

    ``loose`` is for the eager/compiled baselines, which round each per-sample sum to the input dtype
    (bf16: ~3 significant digits) before the abs and the group sum."""
    exact = ref.block_importance(act, grad, groups, NUM_GROUPS, case.channel_dim, "abs")
    scale = ref.block_importance(act.abs(), grad.abs(), groups, NUM_GROUPS, case.channel_dim, "abs")
    if out.shape != exact.shape:
        raise CheckError(f"{case.name}: shape {tuple(out.shape)} != {tuple(exact.shape)}")
    rtol = (2e-2 if case.dtype == "bf16" else 1e-4) if loose else 1e-4
    err = (out.double() - exact).abs()
    bad = err > rtol * scale + 1e-6 * scale.max()
    if bool(bad.any()):
        i = int(bad.flatten().nonzero()[0])
        raise CheckError(f"{case.name}: {int(bad.sum())} wrong values, e.g. flat index {i}: got "
                         f"{out.flatten()[i].item():.6g}, expected {exact.flatten()[i].item():.6g}")


def check_masks(got: Sequence[torch.Tensor], originals: Sequence[torch.Tensor], masks, what: str) -> None:
    expected = ref.apply_channel_masks(originals, masks)
    for i, (g, e) in enumerate(zip(got, expected)):
        if g.dtype in (torch.float16, torch.bfloat16):
            ok = torch.equal(g, e) or bool(((g.double() - e.double()).abs()
                                            <= torch.finfo(g.dtype).eps * e.double().abs()).all())
        else:
            ok = torch.equal(g, e)
        if not ok:
            raise CheckError(f"{what}: tensor {i} {tuple(g.shape)} differs from the reference")


def verify_masks_impl(fn: Callable, case: MaskCase, device: str, prepare_views: bool = False) -> None:
    tensors, masks = mask_inputs(case, device, seed=1)
    originals = [t.clone() for t in tensors]
    if prepare_views:
        fn(tensors, broadcast_mask_views(tensors, masks))
    else:
        fn(tensors, masks)
    check_masks(tensors, originals, masks, f"{case.name} {getattr(fn, '__name__', fn)}")


# ----------------------------------------------------------------------------------------------
# Timing and bandwidth
# ----------------------------------------------------------------------------------------------

def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], min_run_time: float = 0.2, label: str = "", sub_label: str = "",
            description: str = "") -> tbench.Measurement:
    """``torch.utils.benchmark.Timer(...).blocked_autorange`` of ``fn()`` at the current thread count.

    The Timer synchronizes the accelerator around each block of calls, so a CUDA time is the device's
    (host launch gaps included); its block-size estimation doubles as the warm-up. ``label`` /
    ``sub_label`` / ``description`` are the op, the case and the implementation, as ``Compare`` groups
    them (one table per label, one row per case, one column per implementation)."""
    timer = tbench.Timer(stmt="fn()", globals={"fn": fn}, label=label, sub_label=sub_label,
                         description=description, num_threads=torch.get_num_threads())
    return timer.blocked_autorange(min_run_time=min_run_time)


def time_fn(fn: Callable[[], object], min_run_time: float = 0.2) -> float:
    """Median seconds per call of ``fn`` (see ``measure``)."""
    return measure(fn, min_run_time).median


def time_interleaved(fns: dict[str, Callable[[], object]], rounds: int = 3, min_run_time: float = 0.2,
                     label: str = "", sub_label: str = "") -> dict[str, tbench.Measurement | BaseException]:
    """Measures several implementations of one case in ``rounds`` interleaved rounds (a, b, c, a, b, c, ...)
    and keeps each one's measurement with the lowest median: on a shared machine a burst of someone
    else's work then hits every implementation alike instead of one of them. ``min_run_time`` is per
    implementation and round. A failing implementation maps to its exception and is dropped from later
    rounds. The measurements carry ``label``, ``sub_label`` and the implementation's name, for ``Compare``."""
    result: dict[str, tbench.Measurement | BaseException] = {}
    for _ in range(max(1, rounds)):
        for name, fn in fns.items():
            if isinstance(result.get(name), BaseException):
                continue
            try:
                m = measure(fn, min_run_time, label, sub_label, name)
            except Exception as exc:  # noqa: BLE001 - reported by the caller
                result[name] = exc
                continue
            prev = result.get(name)
            if prev is None or m.median < prev.median:
                result[name] = m
    return result


def compare_table(measurements: Sequence[tbench.Measurement]) -> str:
    """``torch.utils.benchmark.Compare`` of the measurements (times in the unit it picks), as text."""
    cmp = tbench.Compare(list(measurements))
    cmp.trim_significant_figures()
    return str(cmp)


_COPY_GBPS: dict[str, float] = {}


def copy_buffer_bytes(device: str) -> int:
    return (256 if device == "cuda" else 128) * 2**20


def copy_bandwidth_gbps(device: str, refresh: bool = False) -> float:
    """``dst.copy_(src)`` of a 256 MB (CUDA) / 128 MB (CPU) buffer: GB/s = 2 x bytes / median time."""
    if device in _COPY_GBPS and not refresh:
        return _COPY_GBPS[device]
    nbytes = copy_buffer_bytes(device)
    src = torch.ones(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), min_run_time=1.0)
    _COPY_GBPS[device] = 2 * nbytes / t / 1e9
    del src, dst
    return _COPY_GBPS[device]


def gbps(nbytes: int, seconds: float | None) -> float | None:
    return None if not seconds else nbytes / seconds / 1e9

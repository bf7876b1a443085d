"""block_importance against the float64 reference over devices x dtypes x layouts x sizes x groups."""
import itertools

import pytest
import torch

from dfmu_ext import ops
from dfmu_ext import reference as ref
from conftest import DEVICES

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
REDUCES = ["abs", "square", "signed"]


def _inputs(shape, dtype, device, seed=0, layout="contiguous"):
    gen = torch.Generator().manual_seed(seed)
    a = torch.randn(shape, generator=gen, dtype=torch.float64)
    g = torch.randn(shape, generator=gen, dtype=torch.float64)
    a, g = a.to(device=device, dtype=dtype), g.to(device=device, dtype=dtype)
    if layout == "channels_last":
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        a, g = a.contiguous(memory_format=fmt), g.contiguous(memory_format=fmt)
    elif layout == "strided":  # a non-dense view: every other position of the last dim
        a = torch.cat([a, a], dim=-1)[..., ::2]
        g = torch.cat([g, g], dim=-1)[..., ::2]
    return a, g


def _check(out, act, grad, groups, K, cd, reduce, act_scale=None, act_shift=None):
    """Within a small multiple of the error of the same computation done in the input's precision."""
    affine = dict(act_scale=act_scale, act_shift=act_shift)
    exact = ref.block_importance(act, grad, groups, K, cd, reduce, **affine)
    assert out.shape == exact.shape
    assert out.dtype == (torch.float64 if act.dtype == torch.float64 else torch.float32)
    # Magnitude of what was summed, per (k, c): the scale every rounding error is relative to.
    abs_affine = {k: (v.abs() if v is not None else None) for k, v in affine.items()}
    scale = ref.block_importance(act.abs(), grad.abs(), groups, K, cd, "abs", **abs_affine)
    if reduce == "square":
        scale = scale * scale
    eps = torch.finfo(torch.float32 if act.dtype != torch.float64 else torch.float64).eps
    n_terms = act.numel() / max(1, exact.shape[1])
    tol = 4 * eps * (n_terms ** 0.5 + 8) * scale + 1e-30
    if act.dtype in (torch.float16, torch.bfloat16):
        same_prec = ref.block_importance(act, grad, groups, K, cd, reduce, compute_dtype=act.dtype, **affine)
        tol = tol + 3 * (same_prec.double() - exact).abs()
    err = (out.double() - exact).abs()
    worst = (err - tol).max().item() if err.numel() else 0.0
    assert worst <= 0, f"max error {err.max().item():.3e} exceeds tolerance (excess {worst:.3e})"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,cd,layout", [
    ((8, 16, 5, 5), 1, "contiguous"),
    ((8, 16, 5, 5), 1, "channels_last"),
    ((6, 8, 3, 4, 5), 1, "channels_last"),
    ((6, 8, 3, 4, 5), 1, "contiguous"),
    ((7, 13), 1, "contiguous"),
    ((5, 13, 24), -1, "contiguous"),
    ((5, 13, 24), 2, "contiguous"),
    ((4, 9, 11), 1, "contiguous"),
    ((4, 6, 7, 8), 1, "strided"),
    ((3, 5, 6), 1, "strided"),
])
@pytest.mark.parametrize("reduce", REDUCES)
def test_matches_reference_layouts(device, dtype, shape, cd, layout, reduce):
    act, grad = _inputs(shape, dtype, device, layout=layout)
    groups = torch.arange(shape[0], device=device) % 3
    out = ops.block_importance(act, grad, groups, 3, cd, reduce)
    _check(out, act, grad, groups, 3, cd, reduce)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,cd", [
    ((1, 3, 4, 4), 1),        # N = 1
    ((9, 1, 6, 6), 1),        # C = 1
    ((3, 257, 3, 3), 1),      # C = 257 (odd, not a multiple of any pack width)
    ((2, 3, 1, 1), 1),        # spatial 1
    ((2, 2, 65537), 1),       # spatial 65537 (long odd rows, split across teams)
    ((3, 13, 257), -1),       # T = 13, C = 257 channels-last
    ((4, 65537, 2), 1),       # many channels, short rows
    ((33, 5), 1),             # linear, odd
])
def test_odd_sizes(device, dtype, shape, cd):
    act, grad = _inputs(shape, dtype, device, seed=1)
    groups = torch.tensor([i % 2 for i in range(shape[0])], device=device)
    out = ops.block_importance(act, grad, groups, 2, cd, "abs")
    _check(out, act, grad, groups, 2, cd, "abs")


def _affine(C, device, seed):
    gen = torch.Generator().manual_seed(seed)
    scale = (torch.rand(C, generator=gen, dtype=torch.float64) * 3 - 1).to(device=device, dtype=torch.float32)
    shift = torch.randn(C, generator=gen, dtype=torch.float64).to(device=device, dtype=torch.float32)
    return scale, shift


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape,cd,layout", [
    ((8, 16, 5, 5), 1, "contiguous"),
    ((8, 16, 5, 5), 1, "channels_last"),
    ((5, 13, 24), -1, "contiguous"),     # (N, T, C): channels inner
    ((33, 5), 1, "contiguous"),          # (N, C): linear, elementwise path
    ((12, 40), 1, "contiguous"),         # (N, C) with C a multiple of the pack width
    ((4, 6, 7, 8), 1, "strided"),
    ((3, 257, 3, 3), 1, "contiguous"),   # odd C
    ((2, 3, 65537), 1, "contiguous"),    # long rows split across teams
])
@pytest.mark.parametrize("which", ["both", "scale", "shift"])
def test_affine_matches_reference(device, dtype, shape, cd, layout, which):
    """act_scale/act_shift: the op scores act * scale + shift (an eval BatchNorm folded into the read)."""
    act, grad = _inputs(shape, dtype, device, seed=7, layout=layout)
    scale, shift = _affine(shape[cd], device, seed=8)
    if which == "scale":
        shift = None
    elif which == "shift":
        scale = None
    if dtype == torch.float64:
        scale = scale.double() if scale is not None else None
    groups = torch.arange(shape[0], device=device) % 3
    for reduce in REDUCES:
        out = ops.block_importance(act, grad, groups, 3, cd, reduce, act_scale=scale, act_shift=shift)
        _check(out, act, grad, groups, 3, cd, reduce, scale, shift)


@pytest.mark.parametrize("device", DEVICES)
def test_affine_equals_scoring_the_normalised_output(device):
    """Scoring BN's input with the folded affine == scoring BN's output (eval mode), in float64."""
    bn = torch.nn.BatchNorm2d(6).double().to(device).eval()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(-2, 2)
        bn.bias.uniform_(-1, 1)
    z, g = _inputs((5, 6, 4, 4), torch.float64, device, seed=9)
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    shift = bn.bias - bn.running_mean * scale
    groups = torch.tensor([0, 1, 1, 0, 1], device=device)
    with torch.no_grad():
        direct = ops.block_importance(bn(z), g, groups, 2)
        folded = ops.block_importance(z, g, groups, 2, act_scale=scale.detach(), act_shift=shift.detach())
    torch.testing.assert_close(folded, direct, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,cd", [((10, 6, 3, 3), 1), ((10, 7), 1), ((10, 3, 8), -1)])
def test_unchecked_groups_ignore_out_of_range_ids(device, shape, cd):
    """check_groups=False skips the range check (a device sync on CUDA); bad ids are then dropped,
    never read or written out of bounds."""
    act, grad = _inputs(shape, torch.float32, device, seed=10)
    groups = torch.tensor([0, 1, 5, 1, -1, 0, 2, 99, 1, 0], device=device)
    out = ops.block_importance(act, grad, groups, 2, cd, "abs", check_groups=False)
    _check(out, act, grad, groups, 2, cd, "abs")  # the reference drops ids outside [0, K)
    keep = (groups >= 0) & (groups < 2)
    torch.testing.assert_close(out, ops.block_importance(act[keep], grad[keep], groups[keep], 2, cd, "abs"))
    with pytest.raises(ValueError, match="group ids must lie"):  # the default still checks
        ops.block_importance(act, grad, groups, 2, cd, "abs")
    # Many groups (the CUDA sorted-segment path needs valid ids): always checked.
    with pytest.raises(ValueError, match="group ids must lie"):
        ops.block_importance(act, grad, groups, 40, cd, "abs", check_groups=False)


@pytest.mark.parametrize("device", DEVICES)
def test_group_variants(device):
    act, grad = _inputs((10, 6, 3, 3), torch.float32, device, seed=2)
    # no groups: everything in group 0
    _check(ops.block_importance(act, grad), act, grad, None, 1, 1, "abs")
    # several groups, some empty, int32 ids
    groups = torch.tensor([4, 0, 4, 4, 0, 1, 4, 0, 1, 4], dtype=torch.int32, device=device)
    out = ops.block_importance(act, grad, groups, 6, 1, "square")
    _check(out, act, grad, groups, 6, 1, "square")
    assert torch.all(out[2] == 0) and torch.all(out[3] == 0) and torch.all(out[5] == 0)
    # many groups (more than the CUDA kernel's direct path holds: the sorted-segment path)
    many = torch.tensor([(7 * i) % 40 for i in range(10)], device=device)
    _check(ops.block_importance(act, grad, many, 40, 1, "abs"), act, grad, many, 40, 1, "abs")
    # one group per sample gives the per-sample scores
    per_sample = ops.block_importance(act, grad, torch.arange(10, device=device), 10, 1, "signed")
    total = ops.block_importance(act, grad, None, 1, 1, "signed")
    torch.testing.assert_close(per_sample.double().sum(0), total.double()[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_zero_size(device, dtype):
    act = torch.empty(0, 5, 3, 3, device=device, dtype=dtype)
    out = ops.block_importance(act, act, torch.empty(0, dtype=torch.long, device=device), 2)
    assert out.shape == (2, 5) and torch.all(out == 0)
    act = torch.empty(3, 0, 2, device=device, dtype=dtype)
    assert ops.block_importance(act, act).shape == (1, 0)
    act = torch.randn(3, 4, 0, device=device, dtype=dtype)
    out = ops.block_importance(act, act)
    assert out.shape == (1, 4) and torch.all(out == 0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("shape,cd", [((16, 32, 17, 17), 1), ((64, 30, 96), -1), ((1, 1, 70001), 1)])
def test_deterministic(device, shape, cd):
    act, grad = _inputs(shape, torch.float32, device, seed=3)
    groups = torch.randint(0, 4, (shape[0],), generator=torch.Generator().manual_seed(0)).to(device)
    first = ops.block_importance(act, grad, groups, 4, cd, "signed")
    for _ in range(3):
        assert torch.equal(first, ops.block_importance(act, grad, groups, 4, cd, "signed"))


@pytest.mark.parametrize("dtype,shape,cd,layout", [
    (torch.float32, (8, 40, 33, 33), 1, "contiguous"),
    (torch.float16, (8, 40, 33, 33), 1, "contiguous"),
    (torch.float16, (64, 99, 4, 4), 1, "contiguous"),
    (torch.float16, (8, 40, 33, 33), 1, "channels_last"),
    (torch.float16, (6, 33, 1100), -1, "contiguous"),
    (torch.float16, (33, 4100), 1, "contiguous"),
])
def test_threads_do_not_change_the_result(dtype, shape, cd, layout):
    act, grad = _inputs(shape, dtype, "cpu", seed=4, layout=layout)
    groups = torch.arange(shape[0]) % 3
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.block_importance(act, grad, groups, 3, cd)
        torch.set_num_threads(max(2, before))
        many = ops.block_importance(act, grad, groups, 3, cd)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs(device):
    a = torch.randn(4, 3, 2, 2, device=device)
    with pytest.raises(ValueError, match="same shape"):
        ops.block_importance(a, torch.randn(4, 3, 2, 3, device=device))
    with pytest.raises(TypeError, match="same dtype"):
        ops.block_importance(a, a.double())
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        ops.block_importance(a.int(), a.int())
    with pytest.raises(ValueError, match="num_groups must be >= 1"):
        ops.block_importance(a, a, None, 0)
    with pytest.raises(ValueError, match=r"group ids must lie in \[0, num_groups=2\)"):
        ops.block_importance(a, a, torch.tensor([0, 1, 2, 0], device=device), 2)
    with pytest.raises(ValueError, match=r"group ids must lie"):
        ops.block_importance(a, a, torch.tensor([0, -1, 1, 0], device=device), 2)
    with pytest.raises(ValueError, match="one id per sample"):
        ops.block_importance(a, a, torch.tensor([0, 1], device=device), 2)
    with pytest.raises(TypeError, match="groups must be an int64 or int32"):
        ops.block_importance(a, a, torch.zeros(4, device=device), 2)
    with pytest.raises(ValueError, match="batch dimension"):
        ops.block_importance(a, a, channel_dim=0)
    with pytest.raises(ValueError, match="out of range"):
        ops.block_importance(a, a, channel_dim=4)
    with pytest.raises(ValueError, match="reduce must be"):
        ops.block_importance(a, a, reduce="mean")
    with pytest.raises(ValueError, match="batch and a channel"):
        ops.block_importance(torch.randn(4, device=device), torch.randn(4, device=device))
    with pytest.raises(ValueError, match="act_scale must be 1-D with one value per unit"):
        ops.block_importance(a, a, act_scale=torch.ones(4, device=device))
    with pytest.raises(ValueError, match="act_shift must be 1-D"):
        ops.block_importance(a, a, act_shift=torch.ones(3, 1, device=device))
    with pytest.raises(TypeError, match="act_scale must be a floating-point tensor"):
        ops.block_importance(a, a, act_scale=torch.ones(3, dtype=torch.long, device=device))


def test_cpp_checks_without_the_python_wrapper():
    """The kernels' own checks (the only ones), for callers of torch.ops.dfmu_ext directly."""
    op = torch.ops.dfmu_ext.block_importance.default
    a = torch.randn(4, 3, 2, 2)
    with pytest.raises(ValueError, match="same shape"):
        op(a, torch.randn(4, 3, 2, 3), None, 1, 1, "abs")
    with pytest.raises(ValueError, match="group ids must lie"):
        op(a, a, torch.tensor([0, 1, 2, 0]), 2, 1, "abs")
    with pytest.raises(ValueError, match="reduce must be"):
        op(a, a, None, 1, 1, "mean")
    with pytest.raises(ValueError, match="act_scale must be 1-D"):
        op(a, a, None, 1, 1, "abs", torch.ones(2), None, True)
    with pytest.raises(TypeError, match="act_shift must be a floating-point"):
        op(a, a, None, 1, 1, "abs", None, torch.ones(3, dtype=torch.long), True)
    t = torch.randn(4, 3)
    with pytest.raises(ValueError, match="has 3 values"):
        torch.ops.dfmu_ext.apply_channel_masks_.default([t], [torch.ones(3)])


@pytest.mark.parametrize("device", DEVICES)
def test_long_batches(device):
    """Many samples (the CUDA group reduction splits the batch into runs)."""
    act, grad = _inputs((3000, 70), torch.float32, device, seed=5)
    groups = (torch.arange(3000, device=device) * 7) % 5
    _check(ops.block_importance(act, grad, groups, 5, 1, "abs"), act, grad, groups, 5, 1, "abs")
    first = ops.block_importance(act, grad, groups, 5, 1, "signed")
    assert torch.equal(first, ops.block_importance(act, grad, groups, 5, 1, "signed"))


@pytest.mark.cuda
def test_device_mismatch():
    a = torch.randn(4, 3)
    with pytest.raises(ValueError, match="is on"):
        ops.block_importance(a, a.cuda())
    with pytest.raises(ValueError, match="groups is on"):
        ops.block_importance(a.cuda(), a.cuda(), torch.zeros(4, dtype=torch.long), 1)
    with pytest.raises(ValueError, match="act_scale is on"):
        ops.block_importance(a.cuda(), a.cuda(), act_scale=torch.ones(3))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    act, grad = _inputs((4, 6, 3, 3), torch.float32, device)
    groups = torch.tensor([0, 1, 1, 0], device=device)
    torch.library.opcheck(torch.ops.dfmu_ext.block_importance.default, (act, grad, groups, 2, 1, "abs"))
    torch.library.opcheck(torch.ops.dfmu_ext.block_importance.default, (act, grad, None, 1, -1, "square"))
    scale, shift = _affine(6, device, seed=11)
    torch.library.opcheck(torch.ops.dfmu_ext.block_importance.default,
                          (act, grad, groups, 2, 1, "abs", scale, shift, False))


def test_torch_compile_fullgraph():
    act, grad = _inputs((4, 6, 5, 5), torch.float32, "cpu")
    groups = torch.tensor([0, 1, 1, 0])

    def f(a, g, k):
        return ops.block_importance(a * 2.0, g, k, 2, 1, "abs") + 1.0

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(act, grad, groups), f(act, grad, groups))


def _cpu_kernels(device):
    """The CPU's float16 kernels to run: the F16C one (when the CPU has it) and the portable one
    (DFMU_CPU_F16C=0 selects it on any CPU); other devices have one kernel."""
    return ["f16c", "portable"] if device == "cpu" else ["default"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("flush_denormal", [False, True])
def test_every_float16_value_is_read_exactly(device, flush_denormal, monkeypatch):
    """All 65536 float16 bit patterns (zeros, subnormals, normals, infinities, NaNs), one per unit, times a
    gradient of 1: each score must be the value's exact float32, in every layout and in both CPU kernels
    (F16C's vcvtph2ps and the portable branch-free routine); flush-to-zero must not touch half subnormals.
    Cases: (N, C) and 1x1 maps (the elementwise path), (N, T, C) (channels inner, with T = 5: four
    positions per pass and a tail), (N, C, R) with R = 5 (scalar tail only), R = 11 (a vector of 8
    and a tail) and R = 16 (F16C: eight rows at a time). A one-hot gradient over positions reads the other positions' values times 0."""
    halves = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(torch.float16)
    expected = halves.float()
    if flush_denormal and not torch.set_flush_denormal(True):
        pytest.skip("this CPU cannot flush denormals")
    try:
        for kernel in _cpu_kernels(device):
            monkeypatch.setenv("DFMU_CPU_F16C", "0" if kernel == "portable" else "1")
            for shape, channel_dim in (((1, 65536), -1), ((1, 65536, 1, 1), 1), ((1, 1, 65536), -1),
                                       ((1, 65536, 5), 1), ((1, 65536, 11), 1), ((1, 65536, 16), 1),
                                       ((1, 5, 65536), -1)):
                one_hot = shape[1] == 5 or shape[-1] in (5, 11, 16)
                if one_hot and channel_dim == 1:
                    act = halves.reshape(-1, 1).expand(-1, shape[2]).reshape(shape)
                elif one_hot:
                    act = halves.reshape(1, -1).expand(shape[1], -1).reshape(shape)
                else:
                    act = halves.reshape(shape)
                act = act.contiguous().to(device)
                grad = torch.zeros_like(act)
                if one_hot:
                    # the other positions read the same values times 0, except inf/NaN * 0
                    if channel_dim == 1:
                        grad[..., 2] = 1
                    else:
                        grad[:, 2, :] = 1
                    finite = torch.isfinite(expected)
                else:
                    grad.fill_(1)
                    finite = torch.ones_like(expected, dtype=torch.bool)
                out = ops.block_importance(act, grad, None, 1, channel_dim=channel_dim, reduce="signed")[0].cpu()
                same = (out == expected) | (out.isnan() & expected.isnan())
                assert bool(same[finite].all()), f"{kernel}, {shape}: {int((~same[finite]).sum())} values differ"
    finally:
        if flush_denormal:
            torch.set_flush_denormal(False)


# Shapes that reach every loop of the float16 kernels: vector bodies, their scalar tails, sample
# quads and leftovers, several channel tiles, several threads' chunks.
F16_SHAPES = [
    ((8, 16, 5, 5), 1, "contiguous"),      # channels outer, R = 25: 3 vectors + tail
    ((3, 7, 8), 1, "contiguous"),          # R = 8: one vector, no tail; 8 rows at a time + 5
    ((5, 13, 4, 4), 1, "contiguous"),      # R = 16: two vectors, 8 rows at a time + 1
    ((2, 9, 72), 1, "contiguous"),         # R = 72: 9 vectors, one row at a time
    ((5, 6, 3), 1, "contiguous"),          # R = 3: tail only
    ((8, 16, 5, 5), 1, "channels_last"),   # channels inner, C = 16
    ((6, 9, 23), -1, "contiguous"),        # channels inner, T = 9 (two quads + 1), C = 23 (2 vectors + 7)
    ((2, 3, 2100), -1, "contiguous"),      # channels inner, C over one 1024-channel tile
    ((11, 37), 1, "contiguous"),           # (N, C): elementwise, 11 samples (quads + 3), C = 4 x 8 + 5
    ((9, 4096), 1, "contiguous"),          # (N, C) split across threads
    ((4, 6, 7, 8), 1, "strided"),          # copied into channels outer
]


@pytest.mark.parametrize("shape,cd,layout", F16_SHAPES)
@pytest.mark.parametrize("affine", [False, True])
def test_float16_f16c_and_portable_kernels_agree(shape, cd, layout, affine, monkeypatch):
    """The F16C kernels do the portable kernels' float32 operations in the same order, so both give
    the same bits (and both match the reference). Without F16C both runs take the portable kernel."""
    act, grad = _inputs(shape, torch.float16, "cpu", seed=12, layout=layout)
    scale, shift = _affine(shape[cd], "cpu", seed=13) if affine else (None, None)
    groups = torch.tensor([(3 * i) % 4 for i in range(shape[0])])
    for reduce in REDUCES:
        outs = {}
        for kernel in ("f16c", "portable"):
            monkeypatch.setenv("DFMU_CPU_F16C", "0" if kernel == "portable" else "1")
            outs[kernel] = ops.block_importance(act, grad, groups, 4, cd, reduce, act_scale=scale, act_shift=shift)
            _check(outs[kernel], act, grad, groups, 4, cd, reduce, scale, shift)
        assert torch.equal(outs["f16c"], outs["portable"]), f"{reduce}: the two kernels differ"

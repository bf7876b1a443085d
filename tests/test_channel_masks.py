"""apply_channel_masks_ against the float64 reference: dtypes, shapes, layouts, many tensors, bad inputs."""
import pytest
import torch

from dfmu_ext import ops
from dfmu_ext import reference as ref
from conftest import DEVICES

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]


def _mask(units, gen, device, dtype=torch.float32):
    m = torch.rand(units, generator=gen, dtype=torch.float64)
    m[torch.rand(units, generator=gen) < 0.3] = 0.0
    m[torch.rand(units, generator=gen) < 0.3] = 1.0
    return m.to(device=device, dtype=dtype)


def _assert_masked(got, expected):
    for g, e in zip(got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape
        if g.dtype in (torch.float16, torch.bfloat16):
            # One rounding from float32 vs one from float64: at most one unit in the last place.
            ulp = torch.finfo(g.dtype).eps * e.double().abs().clamp_min(torch.finfo(g.dtype).tiny)
            assert torch.all((g.double() - e.double()).abs() <= ulp), "more than 1 ulp off"
        else:
            assert torch.equal(g, e)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(device, dtype):
    gen = torch.Generator().manual_seed(0)
    shapes = [(7, 3, 3, 3), (7,), (1, 5), (13, 1), (257, 3), (5, 4, 3, 2, 2), (9, 3, 33), (3, 70000)]
    tensors = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    masks = [_mask(s[0], gen, device) for s in shapes]
    expected = ref.apply_channel_masks(tensors, masks)
    ops.apply_channel_masks_(tensors, masks)
    _assert_masked(tensors, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_layouts_and_shared_masks(device):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(16, 8, 3, 3, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
    b = torch.randn(16, generator=gen, dtype=torch.float64).to(device)
    gamma = torch.randn(16, generator=gen).to(device=device, dtype=torch.bfloat16)
    strided = torch.randn(16, 10, generator=gen).to(device)[:, ::2]  # not dense: handled by the fallback
    m = _mask(16, gen, device, dtype=torch.float64)  # one mask shared by all four, given in float64
    tensors = [w, b, gamma, strided]
    expected = ref.apply_channel_masks(tensors, [m] * 4)
    ops.apply_channel_masks_(tensors, [m] * 4)
    _assert_masked(tensors, expected)
    assert w.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("device", DEVICES)
def test_many_tensors_and_empties(device):
    # 300 tensors: several multi-tensor launches on CUDA (48 tensors / 320 blocks per launch).
    gen = torch.Generator().manual_seed(2)
    tensors, masks = [], []
    for i in range(300):
        units = 1 + (i * 7) % 23
        shape = (units,) if i % 3 == 0 else (units, 1 + i % 5, 3) if i % 3 == 1 else (units, 2000 + i)
        if i % 50 == 0:
            shape = (0, 4)
        tensors.append(torch.randn(shape, generator=gen).to(device))
        masks.append(_mask(shape[0], gen, device))
    tensors.append(torch.randn(3, 200_000, generator=gen).to(device))  # one tensor spanning many blocks
    masks.append(_mask(3, gen, device))
    expected = ref.apply_channel_masks(tensors, masks)
    ops.apply_channel_masks_(tensors, masks)
    _assert_masked(tensors, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_zero_mask_really_zeroes(device):
    t = torch.full((4, 5), float("inf"), device=device)
    t[1] = 2.0
    ops.apply_channel_masks_([t], [torch.tensor([1.0, 0.0, 1.0, 1.0], device=device)])
    assert torch.all(t[1] == 0)
    ops.apply_channel_masks_([], [])  # nothing to do is fine


@pytest.mark.parametrize("device", DEVICES)
def test_bad_inputs_modify_nothing(device):
    good = torch.randn(4, 3, device=device)
    snapshot = good.clone()
    ok_mask = torch.ones(4, device=device) * 0.5
    cases = [
        (ValueError, "2 tensors but 1 masks", [good, good.clone()], [ok_mask]),
        (ValueError, r"masks\[1\] has 3 values", [good, torch.randn(4, device=device)], [ok_mask, torch.ones(3, device=device)]),
        (ValueError, r"masks\[1\] must be 1-D", [good, torch.randn(4, device=device)], [ok_mask, torch.ones(4, 1, device=device)]),
        (TypeError, r"tensors\[1\] must be float16", [good, torch.ones(4, dtype=torch.int64, device=device)], [ok_mask, ok_mask]),
        (TypeError, r"masks\[1\] must be a floating-point", [good, torch.randn(4, device=device)], [ok_mask, torch.ones(4, dtype=torch.int64, device=device)]),
        (ValueError, "0-D tensor", [good, torch.tensor(1.0, device=device)], [ok_mask, ok_mask]),
    ]
    for exc, msg, tensors, masks in cases:
        with pytest.raises(exc, match=msg):
            ops.apply_channel_masks_(tensors, masks)
        assert torch.equal(good, snapshot), f"tensors[0] was modified by a rejected call ({msg})"


@pytest.mark.cuda
def test_device_mismatch_modifies_nothing():
    good = torch.randn(4, 3, device="cuda")
    snapshot = good.clone()
    with pytest.raises(ValueError, match="is on"):
        ops.apply_channel_masks_([good, torch.randn(4, 3)], [torch.ones(4, device="cuda") * 0, torch.ones(4)])
    with pytest.raises(ValueError, match="is on"):
        ops.apply_channel_masks_([good], [torch.zeros(4)])
    assert torch.equal(good, snapshot)


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    tensors = [torch.randn(4, 3, device=device), torch.randn(4, device=device)]
    masks = [torch.rand(4, device=device), torch.rand(4, device=device)]
    torch.library.opcheck(torch.ops.dfmu_ext.apply_channel_masks_.default, (tensors, masks))


def test_torch_compile_fullgraph():
    def f(ws, ms):
        ops.apply_channel_masks_(ws, ms)
        return ws[0].sum()

    ws = [torch.randn(6, 4), torch.randn(6)]
    ms = [torch.tensor([1.0, 0, 1, 0.5, 1, 0])] * 2
    expected = ref.apply_channel_masks(ws, ms)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    compiled(ws, ms)
    _assert_masked(ws, expected)

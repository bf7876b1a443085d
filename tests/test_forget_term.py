"""DFMU's forget term: neighbour targets (against the float64 reference), the first block's features,
masks that stay zero, the forget samples read (exactly those recorded) and bad inputs."""
import json

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import dfmu_ext
from dfmu_ext import reference, unlearn
from dfmu_ext.blocks import discover_blocks
from dfmu_ext.finetune import FinetuneConfig, ForgetBatches
from dfmu_ext.record import indices_sha256
from dfmu_ext.targets import ForgetTargetConfig, disagreement, early_features, neighbour_targets

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("n_f,n_r,d,c,k", [(1, 1, 3, 2, 5), (7, 33, 5, 3, 4), (20, 50, 17, 10, 25), (3, 9, 2, 4, 9)])
def test_neighbour_targets_match_reference(n_f, n_r, d, c, k):
    g = torch.Generator().manual_seed(n_f * 100 + n_r)
    f = torch.nn.functional.normalize(torch.randn(n_f, d, generator=g), dim=1)
    r = torch.nn.functional.normalize(torch.randn(n_r, d, generator=g), dim=1)
    y = torch.randint(0, c, (n_r,), generator=g)
    got = neighbour_targets(f, r, y, c, k, chunk=3)
    want = reference.neighbour_targets(f, r, y, c, k)
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=0)
    torch.testing.assert_close(got.sum(1), torch.ones(n_f))


def test_neighbour_targets_need_retain_samples():
    with pytest.raises(ValueError, match="at least one retain sample"):
        neighbour_targets(torch.ones(2, 3), torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), 2)


class _Counting(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.later = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4, 3)
        self.later_calls = 0

    def forward(self, x):
        a = self.bn(self.conv(x))
        self.later_calls += 1
        return self.head(self.later(torch.relu(a)).mean((2, 3)))


def test_early_features_are_the_first_block_pooled_and_stop_the_forward():
    torch.manual_seed(0)
    m = _Counting().eval()
    with torch.no_grad():
        m.bn.running_mean.uniform_(-1, 1)
    x = torch.randn(5, 1, 9, 9)
    first = discover_blocks(m, x[:2])[0]
    assert first.name == "conv" and first.norm is m.bn
    m.later_calls = 0
    feats = early_features(m, first, x, grid=3, batch_size=2)
    assert m.later_calls == 0  # the forward stopped at the block
    with torch.no_grad():
        want = torch.nn.functional.adaptive_avg_pool2d(m.bn(m.conv(x)), 3).flatten(1)
    torch.testing.assert_close(feats, torch.nn.functional.normalize(want, dim=1))


def test_forget_batches_cycle_through_every_sample():
    x, t = torch.arange(10.0).reshape(10, 1), torch.eye(10)
    fb = ForgetBatches(x, t, 4, seed=0, device="cpu")
    seen = torch.cat([fb.next()[0].flatten() for _ in range(2)])
    assert len(set(seen.tolist())) == 8  # no repeats within a pass
    with pytest.raises(ValueError, match="forget term"):
        ForgetBatches(x, t[:3], 4, seed=0, device="cpu")


class _Logged(Dataset):
    """A dataset that remembers which samples were read (its labels are public as ``targets``, the
    way torchvision data sets expose them, so reading labels is not reading a sample)."""

    def __init__(self, base):
        self.base, self.read = base, set()
        self.targets = base.tensors[1]

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        self.read.add(int(i))
        return self.base[i]


@pytest.mark.parametrize("samples", [None, 40])
def test_forget_term_reads_only_the_recorded_forget_samples_and_masks_stay_zero(original, digits, tmp_path,
                                                                                 samples):
    import copy

    train, _, _ = digits
    forget = torch.nonzero(train.tensors[1] == 3).flatten()[:120]
    logged = _Logged(train)
    path = tmp_path / "rec.json"
    res = unlearn(copy.deepcopy(original), logged, forget_indices=forget, retain_fraction=0.3, score_samples=32,
                  forget_term=ForgetTargetConfig(weight=1.0, k=5, batch_size=8, samples=samples, min_excess=-1.0),
                  finetune=FinetuneConfig(min_steps=5), record=str(path), seed=1)
    assert res.info["forget_term_ran"]
    forget_set = set(forget.tolist())
    read_forget = logged.read & forget_set
    positions = res.info["forget_read"]
    assert read_forget == {int(forget[p]) for p in positions}
    expected = len(forget) if samples is None else max(samples, 16)  # the scored ones are always read
    assert res.forget_samples_used == len(positions) == expected
    rec = json.loads(path.read_text())
    assert rec["forget_read"]["count"] == expected
    assert rec["forget_read"]["indices_sha256"] == indices_sha256(sorted(read_forget))
    assert rec["config"]["forget_term"]["samples"] == samples
    # pruned units are still exactly zero after the fine-tune with the forget term
    modules = dict(res.model.named_modules())
    zeroed = 0
    for name, mask in res.masks.items():
        if name not in modules or not isinstance(modules[name], (nn.Conv2d, nn.Linear)):
            continue
        w = modules[name].weight
        dead = mask == 0
        if dead.any() and mask.numel() == w.shape[0]:
            assert torch.all(w[dead] == 0)
            zeroed += int(dead.sum())
    assert zeroed > 0


def test_forget_term_off_reads_only_the_scored_forget_samples(original, digits):
    import copy

    train, _, _ = digits
    forget = torch.nonzero(train.tensors[1] == 5).flatten()[:100]
    logged = _Logged(train)
    res = unlearn(copy.deepcopy(original), logged, forget_indices=forget, retain_fraction=0.3, score_samples=32,
                  forget_term=ForgetTargetConfig(weight=0.0), finetune=FinetuneConfig(min_steps=2))
    assert len(logged.read & set(forget.tolist())) == res.forget_samples_used == 16


def test_leave_one_out_excludes_each_sample_itself():
    g = torch.Generator().manual_seed(3)
    f = torch.nn.functional.normalize(torch.randn(12, 4, generator=g), dim=1)
    y = torch.randint(0, 3, (12,), generator=g)
    got = neighbour_targets(f, f, y, 3, k=4, chunk=5, leave_one_out=True)
    for i in range(12):
        others = [j for j in range(12) if j != i]
        want = reference.neighbour_targets(f[i:i + 1], f[others], y[others], 3, 4)
        torch.testing.assert_close(got[i:i + 1].double(), want, atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="besides the sample itself"):
        neighbour_targets(f[:1], f[:1], y[:1], 3, leave_one_out=True)


def test_disagreement():
    t = torch.tensor([[1.0, 0.0], [0.25, 0.75], [0.5, 0.5]])
    assert disagreement(t, torch.tensor([0, 0, 1])) == pytest.approx((0 + 0.75 + 0.5) / 3)
    assert disagreement(t, torch.tensor([5, 5, 5])) == 1.0  # a label outside the targets' classes
    assert disagreement(t[:0], torch.tensor([], dtype=torch.long)) == 0.0


def test_the_term_runs_for_a_whole_class_not_for_random_samples(original, digits):
    """The rule D_f - D_r >= min_excess: a whole class's neighbours never share its label; a random
    share's neighbourhoods are the retain data's. Whole classes have the term off unless asked."""
    import copy

    train, _, _ = digits
    cls = unlearn(copy.deepcopy(original), train, [3], retain_fraction=0.3, finetune=FinetuneConfig(min_steps=2),
                  forget_term=ForgetTargetConfig())
    assert cls.info["forget_term_ran"] and cls.info["forget_excess_disagreement"] > 0.5
    # whole classes: off by default (it cost RA and TA a point), the scored forget samples only
    off = unlearn(copy.deepcopy(original), train, [3], retain_fraction=0.3, finetune=FinetuneConfig(min_steps=2))
    assert not off.info["forget_term_ran"] and off.forget_samples_used == len(off.info["forget_read"]) <= 256
    rand = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:180]
    # samples whose term is gated off: never silently (a ForgettingWarning with the excess, naming nonmembers=)
    with pytest.warns(dfmu_ext.ForgettingWarning, match=r"excess -?0\.\d{3} < min_excess 0\.15.*nonmembers=") as w:
        smp = unlearn(copy.deepcopy(original), train, forget_indices=rand, retain_fraction=0.3,
                      finetune=FinetuneConfig(min_steps=2))
    assert not smp.info["forget_term_ran"] and abs(smp.info["forget_excess_disagreement"]) < 0.15
    assert [x.filename for x in w if x.category is dfmu_ext.ForgettingWarning] == [__file__]
    assert "_note" not in smp.info                                  # the task's own key is not reported


@pytest.mark.parametrize("bad", [dict(weight=-1.0), dict(k=0), dict(batch_size=0), dict(grid=0), dict(samples=0),
                                 dict(references=0), dict(steps=-1), dict(min_excess=2.0)])
def test_bad_forget_term_config_is_one_error_and_changes_nothing(original, digits, bad):
    import copy

    train, _, _ = digits
    model = copy.deepcopy(original)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="forget term"):
        unlearn(model, train, forget_indices=torch.arange(20), forget_term=ForgetTargetConfig(**bad))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

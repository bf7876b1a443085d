"""The DFMU pipeline on small real data (scikit-learn digits) and small models, on the CPU."""
import copy

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import dfmu_ext
from dfmu_ext import training
from dfmu_ext.zoo import models
from dfmu_ext.blocks import discover_blocks
from dfmu_ext.eval import accuracy
from dfmu_ext.splits import split_forget_retain, take_batch
from dfmu_ext.importance import score_blocks
from dfmu_ext.pruning import SUPPRESSED_LOGIT


pytestmark = pytest.mark.usefixtures("one_thread")




@pytest.fixture(scope="module")
def trained_cnn(digits):
    train, test, info = digits
    torch.manual_seed(0)
    m = models.build_model("cnn", info.in_channels, info.num_classes, info.image_size, width=8)
    training.train_model(m, train, training.TrainConfig(epochs=6, lr=0.05), progress=False)
    return m


def _batch(train, classes, n=128, seed=0):
    forget, retain = split_forget_retain(train, classes)
    g = torch.Generator().manual_seed(seed)
    xf, yf = take_batch(forget, torch.randperm(len(forget), generator=g)[: n // 2].tolist())
    xr, yr = take_batch(retain, torch.randperm(len(retain), generator=g)[: n // 2].tolist())
    return torch.cat([xf, xr]), torch.cat([yf, yr])


class ResidualNet(nn.Module):
    """Nested containers, a residual add, a Conv1d-free mix of conv/linear/BN1d/BN2d."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU())
        self.body = nn.ModuleDict({"a": nn.Conv2d(6, 6, 3, padding=1, bias=False), "bn": nn.BatchNorm2d(6)})
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(6 * 8 * 8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 10))

    def forward(self, x):
        h = self.stem(x)
        h = torch.relu(h + self.body["bn"](self.body["a"](h)))
        return self.head(h)


def test_block_discovery_generic():
    net = ResidualNet().eval()
    blocks = discover_blocks(net, torch.randn(2, 1, 8, 8))
    assert [b.name for b in blocks] == ["stem.0", "body.a", "head.1"]
    assert [b.norm_name for b in blocks] == ["stem.1", "body.bn", "head.2"]
    assert [b.units for b in blocks] == [6, 6, 16]


def test_no_prunable_block():
    with pytest.raises(ValueError, match="no prunable block"):
        discover_blocks(nn.Sequential(nn.Flatten(), nn.Linear(64, 10)), torch.randn(2, 1, 8, 8))


def test_one_forward_one_backward(trained_cnn, digits):
    model = copy.deepcopy(trained_cnn)
    forwards, backwards = [], []
    model.register_forward_pre_hook(lambda *a: forwards.append(1))
    head = model.classifier if hasattr(model, "classifier") else list(model.modules())[-1]
    head.register_full_backward_hook(lambda *a: backwards.append(1))
    x, y = _batch(digits[0], [3])
    dfmu_ext.score_and_prune(model, (x, y), forget_classes=[3])
    assert len(forwards) == 1 and len(backwards) == 1
    assert all(p.grad is None for p in model.parameters()), "scoring must not leave parameter gradients"


def test_scores_match_plain_autograd(trained_cnn, digits):
    """Scores from the fused hooks equal a slow per-sample reference computed with plain autograd."""
    model = copy.deepcopy(trained_cnn).double()
    x, y = _batch(digits[0], [3], n=16)
    x = x.double()
    res = score_blocks(model, x, y, [3])
    model.eval()
    for block in res.blocks:
        outs = {}
        h = block.output_module.register_forward_hook(lambda m, i, o: outs.__setitem__("a", o))
        expected = torch.zeros(2, block.units, dtype=torch.float64)
        for n in range(x.shape[0]):
            logits = model(x[n:n + 1])
            loss = nn.functional.cross_entropy(logits, y[n:n + 1], reduction="sum")
            (g,) = torch.autograd.grad(loss, outs["a"])
            s = (outs["a"] * g).reshape(1, block.units, -1).sum(-1)[0] if outs["a"].dim() > 2 else (outs["a"] * g)[0]
            expected[int(y[n] == 3)] += s.abs().detach()
        h.remove()
        torch.testing.assert_close(res.scores[block.name].double(), expected, rtol=1e-9, atol=1e-12)
    assert res.counts.tolist() == [8.0, 8.0]


class InplaceResNet(nn.Module):
    """torchvision style: in-place ReLUs right after the norms, a residual add, a 1x1 shortcut."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.short, self.bn_s = nn.Conv2d(1, 8, 1, bias=False), nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        h = self.relu(self.bn1(self.conv1(x)))
        h = self.relu(self.bn2(self.conv2(h)) + self.bn_s(self.short(x)))
        return self.fc(h.mean((2, 3)))


def _plain_scores(model, x, y, block, forget):
    """Per-sample |sum_p a g| at the block output with plain autograd, summed per group, float64."""
    outs = {}
    h = block.output_module.register_forward_hook(lambda m, i, o: outs.__setitem__("a", o))
    expected = torch.zeros(2, block.units, dtype=torch.float64)
    try:
        for n in range(x.shape[0]):
            logits = model(x[n:n + 1])
            loss = nn.functional.cross_entropy(logits, y[n:n + 1], reduction="sum")
            (g,) = torch.autograd.grad(loss, outs["a"])
            s = (outs["a"] * g).reshape(1, block.units, -1).sum(-1)[0]
            expected[int(int(y[n]) in forget)] += s.abs().detach()
    finally:
        h.remove()
    return expected


def test_scores_with_inplace_relu_and_residuals():
    """Hooks attach as the forward runs, so in-place ReLUs after the norms do not change the scores."""
    torch.manual_seed(0)
    model = InplaceResNet().double()
    for m in model.modules():  # non-trivial running statistics and affines
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(12, 1, 8, 8, dtype=torch.float64)
    y = torch.arange(12) % 10
    res = score_blocks(model, x, y, [3, 4])
    assert [b.name for b in res.blocks] == ["conv1", "conv2", "short"]
    model.eval()
    # A copy without in-place ReLUs gives the reference (its block outputs are not overwritten).
    plain = copy.deepcopy(model)
    plain.relu = nn.ReLU()
    for block in res.blocks:
        ref_block = [b for b in score_blocks(plain, x[:1], y[:1], [3]).blocks if b.name == block.name][0]
        expected = _plain_scores(plain, x, y, ref_block, {3, 4})
        torch.testing.assert_close(res.scores[block.name].double(), expected, rtol=1e-9, atol=1e-12)


def test_scoring_holds_only_what_autograd_saves(trained_cnn, digits, monkeypatch):
    """Memory: the activation each conv+BN block hands to the op is a tensor autograd saved for the
    backward anyway (the norm's input), not an extra copy of the norm's output."""
    import dfmu_ext.importance as importance

    model = copy.deepcopy(trained_cnn)
    x, y = _batch(digits[0], [3], n=32)
    saved = set()

    def pack(t):
        saved.add(t.untyped_storage().data_ptr())
        return t

    read = []
    real_op = importance.ops.block_importance

    def spy(act, grad, *args, **kwargs):
        read.append((act.untyped_storage().data_ptr(), kwargs.get("act_scale") is not None))
        return real_op(act, grad, *args, **kwargs)

    monkeypatch.setattr(importance.ops, "block_importance", spy)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        res = score_blocks(model, x, y, [3])
    normed = [b for b in res.blocks if b.norm is not None]
    assert len(normed) >= 4
    folded = [ptr for ptr, has_affine in read if has_affine]
    assert len(folded) == len(normed), "every conv+BN block is scored from the norm's input"
    assert all(ptr in saved for ptr in folded), "a scored activation was not one autograd keeps anyway"


def test_scoring_changes_nothing(trained_cnn, digits):
    model = copy.deepcopy(trained_cnn)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = _batch(digits[0], [3])
    score_blocks(model, x, y, [3])
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_pruned_units_output_zero(trained_cnn, digits):
    model = copy.deepcopy(trained_cnn)
    x, y = _batch(digits[0], [3])
    res = dfmu_ext.score_and_prune(model, (x, y), forget_classes=[3])
    pruned_any = False
    model.eval()
    for b in discover_blocks(model, x[:2]):  # the output after each block's norm
        zero = res.masks[b.name] == 0
        if not zero.any():
            continue
        pruned_any = True
        seen = {}
        h = b.output_module.register_forward_hook(lambda m, i, o: seen.__setitem__("o", o))
        with torch.no_grad():
            model(x)
        h.remove()
        assert torch.all(seen["o"][:, zero] == 0), f"pruned units of {b.name} still emit output"
    assert pruned_any
    with torch.no_grad():
        logits = model(x)
    assert torch.all(logits[:, 3] <= SUPPRESSED_LOGIT / 2)


def test_rescale_mode_only_dampens(trained_cnn, digits):
    model = copy.deepcopy(trained_cnn)
    x, y = _batch(digits[0], [3])
    res = dfmu_ext.score_and_prune(model, (x, y), forget_classes=[3], mode="rescale", head=False)
    allm = torch.cat([m for m in res.masks.values()])
    assert torch.all(allm >= 0) and torch.all(allm <= 1) and bool((allm < 1).any())


def test_unlearn_forgets_and_keeps_retain(trained_cnn, digits):
    train, test, info = digits
    model = copy.deepcopy(trained_cnn)
    _, retain_test = split_forget_retain(test, [3])
    forget_train, _ = split_forget_retain(train, [3])
    before = accuracy(model, retain_test)
    ft = dfmu_ext.FinetuneConfig(epochs=3)
    res = dfmu_ext.unlearn(model, train, [3], retain_fraction=0.3, finetune=ft, progress=False, seed=0)
    assert res.model is model
    assert accuracy(model, forget_train) <= 0.01
    assert accuracy(model, retain_test) >= before - 0.03
    assert set(res.timings) == {"scoring", "targets", "pruning", "finetune", "guard", "total"}
    _, retain_train = split_forget_retain(train, [3])
    assert res.retain_samples_used <= round(0.3 * len(retain_train)) + 10


def test_unlearn_reproducible(trained_cnn, digits):
    train = digits[0]
    a, b = copy.deepcopy(trained_cnn), copy.deepcopy(trained_cnn)
    dfmu_ext.unlearn(a, train, [5], 0.13, progress=False, seed=3)
    dfmu_ext.unlearn(b, train, [5], 0.13, progress=False, seed=3)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(va, vb), k


def test_masks_stay_zero_through_finetune(trained_cnn, digits):
    model = copy.deepcopy(trained_cnn)
    res = dfmu_ext.unlearn(model, digits[0], [1], 0.2, progress=False, finetune=dfmu_ext.FinetuneConfig(epochs=2))
    named = dict(model.named_modules())
    for name, m in res.masks.items():
        zero = m == 0
        if zero.any():
            assert torch.all(named[name].weight[zero] == 0), name


def test_unlearn_tensor_dataset_and_errors(trained_cnn, digits):
    train = digits[0]
    x, y = train.tensors
    tds = TensorDataset(x[:400], y[:400])
    model = copy.deepcopy(trained_cnn)
    snapshot = {k: v.clone() for k, v in model.state_dict().items()}

    def unchanged():
        return all(torch.equal(v, snapshot[k]) for k, v in model.state_dict().items())

    with pytest.raises(ValueError, match="do not occur"):
        dfmu_ext.unlearn(model, TensorDataset(x[y != 3], y[y != 3]), [3], progress=False)
    with pytest.raises(ValueError, match="every class"):
        dfmu_ext.unlearn(model, tds, list(range(10)), progress=False)
    with pytest.raises(ValueError, match="empty"):
        dfmu_ext.unlearn(model, TensorDataset(x[:0], y[:0]), [3], progress=False)
    with pytest.raises(ValueError, match="forget_classes is empty"):
        dfmu_ext.unlearn(model, tds, [], progress=False)
    with pytest.raises(ValueError, match="rejected the scoring batch"):
        dfmu_ext.score_and_prune(model, (torch.randn(4, 3, 5), torch.tensor([3, 1, 2, 3])), [3])
    with pytest.raises(FloatingPointError):
        dfmu_ext.score_and_prune(model, (torch.full((4, 1, 8, 8), float("nan")), torch.tensor([3, 1, 2, 3])), [3])
    with pytest.raises(ValueError, match="not among the model"):
        dfmu_ext.score_and_prune(model, _batch(train, [3]), [12])
    assert unchanged()
    res = dfmu_ext.unlearn(model, tds, [3], 0.5, progress=False)
    assert res.retain_samples_used > 0


@pytest.mark.parametrize("momentum,weight_decay", [(0.9, 5e-4), (0.0, 0.0), (0.5, 0.0)])
def test_momentum_sgd_matches_torch_optim_sgd(momentum, weight_decay):
    """The fine-tune's optimizer takes exactly torch.optim.SGD's steps (also with a parameter that
    gets no gradient on some steps), and keeps its momentum where MaskPlan looks for it."""
    from dfmu_ext.finetune import MomentumSGD

    torch.manual_seed(0)
    ours = nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))
    theirs = copy.deepcopy(ours)
    opt_ours = MomentumSGD(ours.parameters(), lr=0.05, momentum=momentum, weight_decay=weight_decay)
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.05, momentum=momentum, weight_decay=weight_decay)
    for step in range(6):
        x, y = torch.randn(8, 5), torch.randint(0, 3, (8,))
        for model, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(model(x), y).backward()
            if step == 2:
                model[2].bias.grad = None  # a parameter without a gradient is left alone, as in torch.optim
            opt.step()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        assert torch.equal(p, q)
    if momentum:
        for p, q in zip(ours.parameters(), theirs.parameters()):
            assert torch.equal(opt_ours.state[p]["momentum_buffer"], opt_theirs.state[q]["momentum_buffer"])
    else:
        assert not opt_ours.state


def test_small_budgets_get_a_minimum_of_steps():
    from dfmu_ext.finetune import FinetuneConfig, epochs_for as _epochs

    cfg = FinetuneConfig()
    assert cfg.min_steps == 50
    assert _epochs(cfg, 168, 128) == 25      # 2 steps an epoch: enough epochs for 50 steps
    assert _epochs(cfg, 7020, 128) == 1      # Fashion-MNIST's 13%: one epoch is 55 steps already
    assert _epochs(FinetuneConfig(min_steps=0), 168, 128) == 1
    assert _epochs(FinetuneConfig(epochs=0), 168, 128) == 0
    with pytest.raises(ValueError, match="min_steps"):
        FinetuneConfig(min_steps=-1).validate()

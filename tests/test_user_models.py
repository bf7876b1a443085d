"""The models users bring (torchvision, timm, transformers, a plain token transformer), each
trained briefly on small synthetic data and then made to forget a class with the defaults; plus the
one-line errors of dfmu_ext.model_io and the classifier discovery."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import dfmu_ext
from dfmu_ext.eval import per_class_accuracy
from dfmu_ext.training import train_model

from _user_models import MODELS, NUM_CLASSES, have, image_data, text_data, train_config

FORGET = 1


def _build(name: str):
    pkg, build, kind, _ = MODELS[name]
    if pkg is not None and not have(pkg):
        pytest.skip(f"{pkg} is not installed (pip install .[hf])")
    torch.manual_seed(0)
    if kind == "text":
        train, test, vocab = text_data()
        return build(vocab), train, test
    train, test = image_data(dicts=kind == "dicts")
    return build(), train, test


def _remaining(acc: list[float]) -> float:
    return sum(a for c, a in enumerate(acc) if c != FORGET) / (NUM_CLASSES - 1)


# measured on 2 CPU cores: torchvision-resnet18 40 s, every other model under 8 s
SLOW_MODELS = {"torchvision-resnet18"}


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW_MODELS else n for n in MODELS])
def test_each_model_forgets_a_class_with_the_defaults(name):
    model, train, test = _build(name)
    train_model(model, train, train_config(name))
    before = per_class_accuracy(model, test, NUM_CLASSES)
    assert min(before) >= 0.9, f"the original did not learn the task: {before}"
    keys = list(model.state_dict())
    result = dfmu_ext.unlearn(model, train, forget_classes=[FORGET])
    after = per_class_accuracy(model, test, NUM_CLASSES)
    assert after[FORGET] <= 0.05
    assert abs(_remaining(after) - _remaining(before)) <= 0.02, (before, after)
    assert result.pruned_units and sum(result.total_units.values()) > 0
    # the user's model is theirs again: same names, no hooks of ours left, its own output type
    assert list(model.state_dict()) == keys
    assert not model._forward_hooks and not model._forward_pre_hooks
    metrics = dfmu_ext.evaluate(model, train, test, [FORGET], battery=True)
    assert metrics["forget_test_acc"] <= 0.05
    for key in ("retain_acc", "test_acc", "probe_forget_acc", "relearn_k5", "prototype_retain_acc"):
        assert math.isfinite(metrics[key]), key


# --------------------------------------------------------------------------------------------
# outputs, inputs and the classifier: one-line errors, nothing modified
# --------------------------------------------------------------------------------------------

class DictOut(nn.Module):
    """Returns a dict, with or without logits."""

    def __init__(self, key: str = "logits"):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)
        self.key = key

    def forward(self, x):
        return {self.key: self.head(self.body(x)), "hidden": x}


def _tensor_data(n=60):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 3
    x = torch.randn(n, 3, 4, generator=g) + y.view(-1, 1, 1).float()
    return TensorDataset(x, y)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _unchanged(model, state):
    return all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_dict_output_with_logits_is_read():
    model = DictOut()
    result = dfmu_ext.unlearn(model, _tensor_data(), forget_classes=[2])
    assert result.method == "DFMU" and not model._forward_hooks


def test_output_without_logits_is_a_one_line_error_and_nothing_changes():
    model = DictOut(key="scores")
    state = _state(model)
    with pytest.raises(TypeError, match="without 'logits'.*logits_fn") as err:
        dfmu_ext.unlearn(model, _tensor_data(), forget_classes=[2])
    assert "\n" not in str(err.value)
    assert _unchanged(model, state) and not model._forward_hooks and not model._forward_pre_hooks


def test_logits_fn_reads_any_output():
    model = DictOut(key="scores")
    result = dfmu_ext.unlearn(model, _tensor_data(), forget_classes=[2], logits_fn=lambda out: out["scores"])
    assert result.pruned_units["head"] == 1
    m = dfmu_ext.evaluate(model, _tensor_data(), _tensor_data(), [2], logits_fn=lambda out: out["scores"])
    assert m["forget_test_acc"] == 0.0


class NoLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(3, 8, 1)
        self.out = nn.Conv1d(8, 3, 1)

    def forward(self, x):
        return self.out(torch.relu(self.conv(x))).mean(-1)


def test_no_linear_head_and_no_classifier_is_a_one_line_error():
    model = NoLinear()
    state = _state(model)
    with pytest.raises(ValueError, match="no nn.Linear classifier: pass classifier=") as err:
        dfmu_ext.unlearn(model, _tensor_data(), forget_classes=[2])
    assert "\n" not in str(err.value) and _unchanged(model, state)


def test_classifier_names_a_module_that_is_not_a_linear():
    model = NoLinear()
    with pytest.raises(ValueError, match="classifier='out' is a Conv1d with no nn.Linear"):
        dfmu_ext.unlearn(model, _tensor_data(), forget_classes=[2], classifier="out")
    with pytest.raises(ValueError, match="classifier='nope' is not a module"):
        dfmu_ext.unlearn(model, _tensor_data(), forget_classes=[2], classifier="nope")


class AuxAfterHead(nn.Module):
    """The classifier is not the last Linear: a projection for another task is registered after it."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Flatten(), nn.Linear(12, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)
        self.aux = nn.Linear(16, 5)

    def forward(self, x):
        return self.head(self.body(x))


def test_explicit_classifier_and_discovery():
    from dfmu_ext.blocks import classifier_of
    from dfmu_ext.model_io import adapted

    model = AuxAfterHead()
    assert classifier_of(model)[0] == "aux"  # the last-Linear rule alone would be wrong here
    with adapted(model, classifier="head"):
        assert classifier_of(model)[0] == "head"
    result = dfmu_ext.unlearn(model, _tensor_data(), forget_classes=[2], classifier="head")
    assert "head" in result.masks and "aux" not in result.masks

    class Scored(AuxAfterHead):  # transformers' name for a sequence-classification head
        def __init__(self):
            super().__init__()
            self.score = self.head

    assert classifier_of(Scored())[0] in ("head", "score")

    class Timmish(AuxAfterHead):
        def get_classifier(self):
            return self.head

    assert classifier_of(Timmish())[0] == "head"


class TokenDicts(Dataset):
    def __init__(self, n=48, label_key="labels", vocab=20, t=8):
        g = torch.Generator().manual_seed(0)
        self.y = torch.arange(n) % 3
        self.ids = torch.randint(3, vocab, (n, t), generator=g)
        self.ids[:, 1] = self.y  # the label's token
        self.mask = torch.ones(n, t, dtype=torch.long)
        self.mask[::2, 5:] = 0
        self.label_key = label_key

    def __len__(self):
        return len(self.y)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], self.label_key: int(self.y[i])}


def test_dict_samples_without_the_label_key_are_a_one_line_error():
    from dfmu_ext.zoo.text import TokenTransformer

    model = TokenTransformer(20, 3, max_len=8, dim=16, depth=1, heads=2, mlp_dim=32)
    state = _state(model)
    with pytest.raises(KeyError, match="no label key") as err:
        dfmu_ext.unlearn(model, TokenDicts(label_key="y"), forget_classes=[2])
    assert "\n" not in str(err.value) and _unchanged(model, state)
    result = dfmu_ext.unlearn(model, TokenDicts(label_key="y"), forget_classes=[2], label_key="y")
    assert result.method == "DFMU"


class TokensNoEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids, attention_mask=None):
        return self.head(torch.relu(self.fc(input_ids.float())))


def test_integer_inputs_without_an_embedding_are_a_one_line_error():
    model = TokensNoEmbedding()
    state = _state(model)
    with pytest.raises(ValueError, match="integer tokens and the model has no nn.Embedding") as err:
        dfmu_ext.unlearn(model, TokenDicts(), forget_classes=[2])
    assert "\n" not in str(err.value) and _unchanged(model, state)


class MeanPoolAll(nn.Module):
    """Averages over every position, padding included: the pads reach the loss."""

    def __init__(self, vocab=20):
        super().__init__()
        self.emb = nn.Embedding(vocab, 8)
        self.fc = nn.Linear(8, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, input_ids, attention_mask=None):
        return self.head(torch.tanh(self.fc(self.emb(input_ids))).mean(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_token_scoring_at_the_embedding_leaves_padding_out(dtype):
    from dfmu_ext.importance import score_blocks
    from dfmu_ext.model_io import Inputs, adapted
    from dfmu_ext.reference import block_importance as reference

    torch.manual_seed(1)
    model = MeanPoolAll().to(dtype)
    data = TokenDicts(n=10)
    x = Inputs(input_ids=data.ids, attention_mask=data.mask)
    y, is_forget = data.y, data.y == 2
    with adapted(model):
        got = score_blocks(model, x, y, forget_mask=is_forget).scores["fc"]
    # float64 reference: the fc output and its gradient, padded positions masked out of the sum
    m64 = MeanPoolAll().double()
    m64.load_state_dict(model.state_dict())
    emb = m64.emb(data.ids).detach().requires_grad_(True)
    act = m64.fc(emb)
    act.retain_grad()
    logits = m64.head(torch.tanh(act).mean(1))
    nn.functional.cross_entropy(logits, y, reduction="sum").backward()
    grad = act.grad * data.mask.unsqueeze(-1).double()
    want = reference(act.detach(), grad, is_forget.long(), 2, -1, "abs")
    torch.testing.assert_close(got.double(), want, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=1e-6)
    assert not torch.allclose(want, reference(act.detach(), act.grad, is_forget.long(), 2, -1, "abs"))
    assert all(p.grad is None for p in model.parameters())  # no parameter gradient

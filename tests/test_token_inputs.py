"""Token-id inputs given as a plain ``TensorDataset(token_ids, labels)``: the scoring pass takes its
backward at the ``nn.Embedding`` outputs, as it does for dict samples (issue 26: it used to call
``requires_grad_`` on the LongTensor and crash)."""
from __future__ import annotations

import copy

import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

import dfmu_ext
from dfmu_ext.finetune import FinetuneConfig
from dfmu_ext.importance import score_blocks
from dfmu_ext.model_io import Inputs, adapted

VOCAB, T, CLASSES = 20, 6, 3


class BagOfTokens(nn.Module):
    """nn.Embedding -> mean over positions -> Linear -> ReLU -> Linear (a hidden block to mask)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(VOCAB, 8)
        self.hidden = nn.Linear(8, 16)
        self.out = nn.Linear(16, CLASSES)

    def forward(self, input_ids, attention_mask=None):
        return self.out(torch.relu(self.hidden(self.emb(input_ids).mean(1))))


class DictSamples(Dataset):
    """The same tokens as dict samples (``{"input_ids", "labels"}``, a scalar label)."""

    def __init__(self, ids: torch.Tensor, y: torch.Tensor):
        self.ids, self.y = ids, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.y[i]}


def _data(n: int = 90):
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % CLASSES
    ids = torch.randint(0, VOCAB, (n, T), generator=g)
    ids[:, 0] = 1 + y  # a class token, so the model has something to learn and to forget
    return ids, y


def _trained() -> BagOfTokens:
    torch.manual_seed(0)
    model = BagOfTokens()
    ids, y = _data()
    for _ in range(60):  # full-batch gradient descent (torch.optim's first use costs seconds)
        grads = torch.autograd.grad(nn.functional.cross_entropy(model(ids), y), list(model.parameters()))
        with torch.no_grad():
            for p, g in zip(model.parameters(), grads):
                p -= 0.5 * g
    return model


def test_score_blocks_accepts_a_long_tensor_batch_and_changes_nothing():
    model = _trained()
    before = copy.deepcopy(model.state_dict())
    ids, y = _data()
    res = score_blocks(model, ids, y, forget_classes=[0])
    assert {b.name for b in res.blocks} >= {"hidden"}
    assert res.scores["hidden"].shape == (2, 16) and bool((res.scores["hidden"] > 0).any())
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # the same pass on the dict form of the batch gives the same scores
    with adapted(model):  # dict batches reach the model as keyword arguments
        res_dict = score_blocks(model, Inputs({"input_ids": ids}), y, forget_classes=[0])
    torch.testing.assert_close(res.scores["hidden"], res_dict.scores["hidden"])


def test_unlearn_on_a_tensordataset_of_token_ids_matches_the_dict_samples():
    ids, y = _data()
    ft = FinetuneConfig(epochs=1)
    plain = dfmu_ext.unlearn(_trained(), TensorDataset(ids, y), forget_classes=[0], retain_fraction=0.5,
                             score_samples=60, finetune=ft, seed=0)
    as_dict = dfmu_ext.unlearn(_trained(), DictSamples(ids, y), forget_classes=[0], retain_fraction=0.5,
                               score_samples=60, finetune=ft, seed=0)
    assert plain.masks and set(plain.masks) == set(as_dict.masks)
    for name in plain.masks:
        assert torch.equal(plain.masks[name], as_dict.masks[name]), name
    assert plain.pruned_units == as_dict.pruned_units and sum(plain.pruned_units.values()) > 0
    # the forgotten class is forgotten by both
    for result in (plain, as_dict):
        with torch.no_grad():
            pred = result.model(ids).argmax(1)
        assert float((pred[y == 0] == 0).float().mean()) < 0.2

"""The generated text task and the zoo's transformer; Group/Layer/RMS norms as block norms, whose
pruned units are exactly zero after the norm."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from dfmu_ext.blocks import discover_blocks
from dfmu_ext.model_io import Inputs, adapted
from dfmu_ext.zoo import data as data_mod
from dfmu_ext.zoo.models import build_model, model_name_of
from dfmu_ext.zoo.text import CLS, PAD, TopicsConfig, TokenTransformer, make_topics


def test_topics_are_deterministic_and_well_formed():
    cfg = TopicsConfig(num_classes=3, train_per_class=20, test_per_class=10, seed=5)
    a, b = make_topics(cfg), make_topics(TopicsConfig(num_classes=3, train_per_class=20, test_per_class=10, seed=5))
    for x, y in zip(a[:2], b[:2]):
        assert torch.equal(x.columns["input_ids"], y.columns["input_ids"]) and torch.equal(x.targets, y.targets)
    other = make_topics(TopicsConfig(num_classes=3, train_per_class=20, test_per_class=10, seed=6))[0]
    assert not torch.equal(other.columns["input_ids"], a[0].columns["input_ids"])
    train, test, info = a
    ids, mask = train.columns["input_ids"], train.columns["attention_mask"]
    assert (ids[:, 0] == CLS).all() and ((ids == PAD) == (mask == 0)).all()
    assert mask.sum(1).min() >= cfg.min_len and ids.max() < cfg.vocab_size == info.in_channels
    assert torch.bincount(train.targets).tolist() == [20] * 3 and len(test) == 30
    assert set(train[0]) == {"input_ids", "attention_mask", "labels"}
    assert not torch.equal(train.columns["input_ids"][:10], test.columns["input_ids"][:10])


@pytest.mark.parametrize("bad", [dict(num_classes=1), dict(min_len=40), dict(p_topic=0.9, p_neighbour=0.2)])
def test_topics_config_errors(bad):
    with pytest.raises(ValueError):
        TopicsConfig(**bad)


def test_topics_in_the_zoo():
    assert "topics" in data_mod.DATASET_NAMES and data_mod.default_model("topics") == "transformer"
    assert data_mod.default_model("digits") == "cnn"
    model = build_model("transformer", 50, 4, (16, 1), dim=16, depth=1, heads=2, mlp_dim=32)
    assert isinstance(model, TokenTransformer) and model_name_of(model) == "transformer"
    ids = torch.randint(2, 50, (3, 16))
    out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    assert out.shape == (3, 4)
    with pytest.raises(ValueError, match="integer token ids"):
        model(input_ids=ids.float())
    # padding changes nothing: a sequence and the same sequence with more padding give the same logits
    short = torch.cat([ids[:, :8], torch.zeros(3, 8, dtype=torch.long)], 1)
    m = (short != PAD).long()
    with torch.no_grad():
        torch.testing.assert_close(model(short, m), model(short[:, :8], m[:, :8]), rtol=1e-5, atol=1e-5)
    blocks = discover_blocks(model, Inputs(input_ids=ids, attention_mask=torch.ones_like(ids)))
    assert [b.name for b in blocks] == [f"layers.0.{n}" for n in ("q", "k", "v", "out", "fc1", "fc2")]


class Normed(nn.Module):
    def __init__(self, kind: str):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.fc = nn.Linear(8, 6)
        self.ln = nn.RMSNorm(6) if kind == "rms" else nn.LayerNorm(6)
        self.conv_ln = nn.LayerNorm(5)  # normalises the last *spatial* dim: never a block norm
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.gn(self.conv(x))
        h = self.conv_ln(self.conv2(torch.relu(h)))
        z = self.ln(self.fc(h.mean((2, 3))))
        return self.head(torch.relu(z))


@pytest.mark.parametrize("kind", ["layer", "rms"])
def test_group_layer_rms_norms_are_block_norms_and_pruned_units_are_zero(kind):
    import dfmu_ext
    torch.manual_seed(0)
    model = Normed(kind)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # no zero shifts by chance
    x = torch.randn(4, 3, 5, 5)
    blocks = {b.name: b for b in discover_blocks(model, x)}
    assert blocks["conv"].norm_name == "gn" and blocks["fc"].norm_name == "ln"
    assert blocks["conv2"].norm is None  # a LayerNorm over W is not per unit
    masks = {name: torch.ones(b.units) for name, b in blocks.items()}
    masks["conv"][[1, 5]] = 0
    masks["fc"][[2]] = 0
    from dfmu_ext import ops
    for name, b in blocks.items():
        ops.apply_channel_masks_(b.tensors(), [masks[name]] * len(b.tensors()))
    seen = {}
    hooks = [model.gn.register_forward_hook(lambda m, i, o: seen.__setitem__("gn", o)),
             model.ln.register_forward_hook(lambda m, i, o: seen.__setitem__("ln", o))]
    with torch.no_grad():
        model.eval()(x)
    for h in hooks:
        h.remove()
    assert (seen["gn"][:, [1, 5]] == 0).all() and (seen["gn"][:, 0] != 0).any()
    assert (seen["ln"][:, 2] == 0).all() and (seen["ln"][:, 0] != 0).any()
    assert dfmu_ext is not None

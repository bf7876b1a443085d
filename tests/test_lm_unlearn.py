"""DFMU on causal language models: the neuron scoring pass against a float64 reference (padding,
-100 labels), neuron discovery in Llama, GPT-2 and plain models, exact zeros after masking and
fine-tuning, and the one-line errors for bad inputs."""
import pytest
import torch
from torch import nn

import dfmu_ext
from dfmu_ext.lm.neurons import mlp_neuron_layers, score_neurons
from dfmu_ext.lm.task import IGNORE_INDEX, TokenSequences, sequence_nll, split_forget
from dfmu_ext.model_io import Inputs, adapted

V = 40


class PlainCausalLM(nn.Module):
    """One pre-norm block (causal attention + MLP), enough to have neurons and token interactions."""

    def __init__(self, vocab=V, dim=16, mlp=48, max_len=16):
        super().__init__()
        self.tok = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.attn = nn.MultiheadAttention(dim, 2, batch_first=True)
        self.ln1, self.ln2, self.ln_f = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp), nn.GELU(), nn.Linear(mlp, dim))
        self.lm_head = nn.Linear(dim, vocab)

    def forward(self, input_ids, attention_mask=None):
        t = input_ids.shape[1]
        h = self.tok(input_ids) + self.pos(torch.arange(t, device=input_ids.device))
        causal = torch.triu(torch.ones(t, t, dtype=torch.bool, device=h.device), 1)
        pad = None if attention_mask is None else attention_mask == 0
        a, _ = self.attn(self.ln1(h), self.ln1(h), self.ln1(h), attn_mask=causal, key_padding_mask=pad,
                         need_weights=False)
        h = h + a
        h = h + self.mlp(self.ln2(h))
        return self.lm_head(self.ln_f(h))


def _llama(dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
                                   num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16)
    return transformers.LlamaForCausalLM(cfg).to(dtype)


def _gpt2(dtype=torch.float32):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=16, n_layer=2, n_head=2, n_positions=16, bos_token_id=1,
                                  eos_token_id=2)
    return transformers.GPT2LMHeadModel(cfg).to(dtype)


BUILDERS = {"plain": lambda dtype=torch.float32: PlainCausalLM().to(dtype), "llama": _llama, "gpt2": _gpt2}


def _batch(n=6, t=11, seed=0, left_pad=False):
    """Token batch with ragged lengths (padding on the right, or the left) and -100 on prompts and pads."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.long)
    for i in range(n):
        real = t - (i % 3) * 2
        if left_pad:
            mask[i, :t - real] = 0
        else:
            mask[i, real:] = 0
    ids[mask == 0] = 0
    labels = ids.clone()
    labels[mask == 0] = IGNORE_INDEX
    labels[:, : t // 3] = IGNORE_INDEX  # the "question" is not scored
    if left_pad:
        labels[:, : t // 2] = IGNORE_INDEX
    return Inputs({"input_ids": ids, "attention_mask": mask}), labels


def _reference_scores(model, layers, x, labels, groups):
    """sum_{n in k} |sum_t m h g| per neuron, each sequence on its own in float64 with autograd."""
    out = {l.name: torch.zeros(2, l.units, dtype=torch.float64) for l in layers}
    for n in range(labels.shape[0]):
        held = {}

        def keep(module, args, name):
            args[0].retain_grad()
            held[name] = args[0]

        hooks = [l.layer.register_forward_pre_hook(lambda m, a, name=l.name: keep(m, a, name)) for l in layers]
        try:
            emb_hooks = [m.register_forward_hook(lambda _m, _i, o: o.detach().requires_grad_(True))
                         for m in model.modules() if isinstance(m, nn.Embedding)]
            with adapted(model):
                logits = model(x[n:n + 1])
            loss = sequence_nll(logits, labels[n:n + 1]).sum()
            loss.backward()
        finally:
            for h in hooks + emb_hooks:
                h.remove()
        mask = x["attention_mask"][n:n + 1].double().unsqueeze(-1)
        for l in layers:
            h = held[l.name]
            s = (h.double() * h.grad.double() * mask).sum(dim=(0, 1))
            out[l.name][int(groups[n])] += s.abs()
    return out


@pytest.mark.parametrize("arch", list(BUILDERS))
@pytest.mark.parametrize("left_pad", [False, True])
def test_neuron_scores_match_float64_reference(arch, left_pad):
    torch.manual_seed(0)
    model = BUILDERS[arch](torch.float64).eval()
    if arch != "plain" and left_pad:
        pytest.skip("transformers' position ids follow the index, not the mask: left padding is the plain model's")
    x, labels = _batch(left_pad=left_pad)
    groups = torch.tensor([1, 0, 0, 1, 0, 1])
    before = {k: v.clone() for k, v in model.state_dict().items()}
    layers = mlp_neuron_layers(model, x[:1])
    got = score_neurons(model, x, labels, groups.bool(), layers)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())  # no parameter gradient is made
    ref = _reference_scores(model, layers, x, labels, groups)
    for l in layers:
        torch.testing.assert_close(got.scores[l.name], ref[l.name], rtol=1e-9, atol=1e-12)
    assert got.counts.tolist() == [3.0, 3.0]


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_neuron_scores_float32_close_to_reference(arch):
    torch.manual_seed(1)
    model = BUILDERS[arch]().eval()
    x, labels = _batch(seed=3)
    groups = torch.tensor([0, 1, 0, 1, 0, 0])
    layers = mlp_neuron_layers(model, x[:1])
    got = score_neurons(model, x, labels, groups.bool(), layers)
    ref = _reference_scores(model.double(), layers, x, labels, groups)
    for l in layers:
        torch.testing.assert_close(got.scores[l.name].double(), ref[l.name], rtol=2e-3, atol=1e-5)


def test_neuron_layers_found_per_architecture():
    x, _ = _batch()
    names = {arch: [l.name for l in mlp_neuron_layers(BUILDERS[arch](), x[:1])] for arch in BUILDERS}
    assert names["plain"] == ["mlp.2"]
    if "llama" in names:
        assert names["llama"] == ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"]
        assert names["gpt2"] == ["transformer.h.0.mlp.c_proj", "transformer.h.1.mlp.c_proj"]


class Bigram(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.out = nn.Embedding(V, 8), nn.Linear(8, V)

    def forward(self, input_ids, attention_mask=None):
        return self.out(self.emb(input_ids))


def test_no_mlp_is_one_line_error():
    model = Bigram()
    x, _ = _batch()
    with pytest.raises(ValueError, match="no MLP"):
        mlp_neuron_layers(model, x[:1])


def _train_set(n=60, t=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (n, t), generator=g)
    labels = ids.clone()
    labels[:, :4] = IGNORE_INDEX
    return TokenSequences(ids, labels)


@pytest.mark.parametrize("arch", list(BUILDERS))
def test_unlearn_zeroes_pruned_neurons_exactly(arch):
    torch.manual_seed(0)
    model = BUILDERS[arch]()
    data = _train_set()
    res = dfmu_ext.unlearn(model, data, forget_indices=list(range(6)), retain_fraction=0.5,
                           finetune=dfmu_ext.tasks.LMFinetuneConfig(lr=1e-2, min_steps=5))
    assert res.info["task"] == "causal-lm" and res.finetune.steps >= 5
    assert all(p.grad is None and p.requires_grad for p in model.parameters())  # nothing left behind
    pruned = 0
    layers = {l.name: l for l in mlp_neuron_layers(model, _batch()[0][:1])}
    x, _ = _batch(seed=5)
    for name, mask in res.masks.items():
        gone = torch.nonzero(mask == 0).flatten()
        pruned += gone.numel()
        layer = layers[name]
        w = layer.weight.detach()
        cols = w.index_select(layer.unit_dim, gone)
        assert torch.count_nonzero(cols) == 0  # after the fine-tune too
        # whatever the removed neurons' activations are, the output does not change (bit for bit)
        with adapted(model), torch.no_grad():
            model.eval()
            base = model(x)

            def noisy(_m, args):
                h = args[0].clone()
                h[..., gone] = 1e3
                return (h,)

            hook = layer.layer.register_forward_pre_hook(noisy)
            try:
                moved = model(x)
            finally:
                hook.remove()
        assert torch.equal(base, moved)
    assert pruned > 0


def test_unlearn_lm_bad_inputs_one_line_errors():
    model = PlainCausalLM()
    data = _train_set()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cases = [
        (dict(forget_indices=[]), "empty"),
        (dict(forget_classes=[1]), "not classes"),
        (dict(forget_indices=[0, 0]), "duplicates"),
        (dict(forget_indices=[999]), r"lie in \[0, 60\)"),
        (dict(forget_indices=list(range(60))), "no retain data"),
        (dict(forget_indices=[1.5]), "integers"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message) as info:
            dfmu_ext.unlearn(model, data, **kwargs)
        assert "\n" not in str(info.value)
    ids = data.input_ids
    with pytest.raises(ValueError, match="-100") as info:
        dfmu_ext.unlearn(model, TokenSequences(ids, torch.full_like(ids, IGNORE_INDEX)), forget_indices=[0])
    assert "\n" not in str(info.value)
    with pytest.raises((KeyError, ValueError), match="label") as info:
        dfmu_ext.unlearn(model, [{"input_ids": ids[i]} for i in range(4)], forget_indices=[0], task="causal-lm")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="task must be one of"):
        dfmu_ext.unlearn(model, data, forget_indices=[0], task="seq2seq")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_split_forget_budget_is_seeded_and_disjoint():
    data = _train_set()
    f, r, b = split_forget(data, [3, 1, 2], 0.25, seed=4)
    assert list(f.indices) == [1, 2, 3] and len(r) == 57
    assert set(b.indices) <= set(r.indices) and len(b) == round(0.25 * 57)
    assert split_forget(data, [3, 1, 2], 0.25, seed=4)[2].indices == b.indices
    assert split_forget(data, [3, 1, 2], 0.25, seed=5)[2].indices != b.indices


def test_task_detection():
    from dfmu_ext.lm.task import detect_task

    assert detect_task(_train_set()) == "causal-lm"
    assert detect_task([(torch.zeros(3), 1)]) == "classification"
    assert detect_task([{"input_ids": torch.zeros(5, dtype=torch.long), "labels": 1}]) == "classification"


def test_neighbour_targets_of_identical_references_are_the_labels():
    """k=1 and references equal to the forget sequences: every scored position's nearest retain
    position is itself, so q is one-hot on its own next token, and zero where nothing is scored."""
    from dfmu_ext.lm.targets import forget_targets

    torch.manual_seed(0)
    model = PlainCausalLM().eval()
    x, labels = _batch(seed=2)
    layer = mlp_neuron_layers(model, x[:1])[0].layer
    q, scored = forget_targets(model, layer, (x, labels), (x, labels), V, k=1)
    q = q.to_dense()  # stored sparsely (lm.targets.SparseTargets)
    nxt = labels[:, 1:]
    assert torch.equal(scored, nxt != IGNORE_INDEX)
    assert torch.equal(q[scored].argmax(-1), nxt[scored]) and torch.all(q[scored].max(-1).values == 1)
    assert torch.count_nonzero(q[~scored]) == 0


def test_projected_update_leaves_retain_activations_unmoved():
    """With all of the retain activations' energy kept, any update projected by ProjectedUpdates
    changes nothing the down projection computes on them."""
    from dfmu_ext.lm.edit import ProjectedUpdates, retain_projectors
    from dfmu_ext.lm.neurons import neuron_inputs

    torch.manual_seed(0)
    model = PlainCausalLM().eval()
    x, _ = _batch(n=2, t=6, seed=4)  # 12 positions at most: a subspace smaller than the 48 neurons
    layers = mlp_neuron_layers(model, x[:1])
    P = retain_projectors(model, layers, x, energy=1.0)
    guard = ProjectedUpdates([(l.weight, P[l.name], l.unit_dim) for l in layers])
    with neuron_inputs(layers) as seen, torch.no_grad(), adapted(model):
        model(x)
    h = seen[layers[0].name][0][x["attention_mask"].bool()]
    w = layers[0].weight
    before = w.detach().clone()
    guard.before()
    with torch.no_grad():
        w.add_(torch.randn_like(w))
    guard.after()
    assert not torch.equal(w, before)
    torch.testing.assert_close((w - before).detach() @ h.T, torch.zeros(w.shape[0], h.shape[0]), atol=1e-4, rtol=0)


def test_unlearn_lm_projected_edit_on_and_off_keeps_pruned_neurons_zero():
    from dfmu_ext.lm.edit import EditConfig

    torch.manual_seed(0)
    model = PlainCausalLM()
    res = dfmu_ext.unlearn(model, _train_set(), forget_indices=list(range(6)), retain_fraction=0.5, edit=EditConfig(steps=0))
    assert res.info["edit_steps"] == 0  # steps=0 turns it off
    model = PlainCausalLM()
    res = dfmu_ext.unlearn(model, _train_set(), forget_indices=list(range(6)), retain_fraction=0.5,
                           edit=EditConfig(steps=3, scope="down"))
    assert res.info["edit_steps"] == 3 and res.timings["edit"] > 0
    for name, mask in res.masks.items():
        layer = dict(model.named_modules())[name]
        assert torch.count_nonzero(layer.weight[:, mask == 0]) == 0
    with pytest.raises(ValueError, match="scope"):
        EditConfig(scope="all").validate()


def test_split_forget_drawn_names_the_budget_s_random_part():
    from dfmu_ext.lm.task import nearest_retain, split_forget_drawn

    data = _train_set()
    f, r, b, drawn = split_forget_drawn(data, [3, 1, 2], 0.25, seed=4, nearest=0.5)
    assert [s.indices for s in (f, r, b)] == [s.indices for s in split_forget(data, [3, 1, 2], 0.25, 4, 0.5)]
    near = nearest_retain(data, torch.tensor([1, 2, 3]), torch.tensor(r.indices))[:round(0.5 * len(b))].tolist()
    assert drawn == sorted(set(b.indices) - set(near)) and len(drawn) == len(b) - len(near)
    # without a nearest part the whole budget is the draw
    whole = split_forget(data, [3, 1, 2], 0.25, 4)[2]
    assert split_forget_drawn(data, [3, 1, 2], 0.25, seed=4)[3] == sorted(whole.indices)

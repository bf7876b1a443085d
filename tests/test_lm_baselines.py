"""Causal-LM unlearning baselines (dfmu_ext.baselines: scratch, lm_ascent, lm_npo, lm_pruning) on a
tiny plain-torch causal LM."""
import copy
import math

import pytest
import torch
from torch import nn

from _lm_tiny import TinyLM, make_model, qa_set, same_state, state, train
from dfmu_ext import baselines as B
from dfmu_ext.baselines import lm_pruning as SP
from dfmu_ext.eval import lm as E
from dfmu_ext.lm.task import TokenSequences, batches, forward_logits, sequence_nll
from dfmu_ext.model_io import model_entry
from dfmu_ext.result import UnlearnResult

pytestmark = pytest.mark.usefixtures("one_thread")

FORGET = [0, 5, 9, 12]
N = 24


@pytest.fixture(scope="module")
def data():
    return qa_set(N, seed=1)


@pytest.fixture(scope="module")
def original(data):
    """A tiny LM that has memorised ``data`` (shared: deep-copy before changing it)."""
    return train(make_model(0), data, steps=150)


def fresh(original):
    return copy.deepcopy(original)


FAST = {"epochs": 2, "batch_size": 2}
#: Short settings per method; the methods themselves come from the registry (every causal-LM method
#: but DFMU, whose own tests are tests/test_lm_unlearn.py): name -> (its causal-LM function, keywords).
QUICK = {"Retrain": {"epochs": 2}, "SelectivePruning": {"rounds": 2, "ffn_frac": 0.05}}
METHODS = {name: (B.SPECS[name].fns["causal-lm"], QUICK.get(name, FAST))
           for name in B.methods_for("causal-lm") if name != "DFMU"}


def test_the_registry_holds_the_lm_functions():
    assert set(METHODS) == {"GA", "GradDiff", "NPO", "SimNPO", "RMU", "Retrain", "SelectivePruning"}
    assert METHODS["GA"][0] is B.lm_gradient_ascent and METHODS["GradDiff"][0] is B.lm_graddiff
    assert METHODS["SimNPO"][0] is B.simnpo and METHODS["RMU"][0] is B.rmu
    assert METHODS["NPO"][0] is B.npo and METHODS["Retrain"][0] is B.lm_retrain
    assert METHODS["SelectivePruning"][0] is B.selective_pruning


@pytest.mark.parametrize("name", list(METHODS))
def test_changes_the_model_reproducibly_and_reports(name, original, data):
    fn, kw = METHODS[name]
    before = state(original)
    a, b = fresh(original), fresh(original)
    ra = fn(a, data, forget_indices=FORGET, seed=3, **kw)
    rb = fn(b, data, forget_indices=FORGET, seed=3, **kw)
    assert isinstance(ra, UnlearnResult) and ra.model is a and ra.method == name
    assert not same_state(before, state(a)), "the model did not change"
    assert same_state(state(a), state(b)), "the same seed gave another model"
    assert rb.retain_samples_used == ra.retain_samples_used and rb.masks.keys() == ra.masks.keys()
    assert ra.timings["total"] > 0 and all(v >= 0 for v in ra.timings.values())
    assert ra.info["forget_samples"] == len(FORGET) and ra.info["seed"] == 3
    budget = B.lm_split(data, FORGET, 0.13, 3)[2]
    expect_retain = {"GA": 0, "Retrain": N - len(FORGET), "SelectivePruning": len(budget)}
    if name in expect_retain:
        assert ra.retain_samples_used == expect_retain[name]
    else:  # a retain batch the size of each forget batch, from the budget
        assert 0 < ra.retain_samples_used <= len(budget)
    assert ra.forget_samples_used == (0 if name == "Retrain" else len(FORGET))
    if name != "Retrain":
        c = fresh(original)
        fn(c, data, forget_indices=FORGET, seed=4, **kw)
        assert name == "SelectivePruning" or not same_state(state(a), state(c))


@pytest.mark.parametrize("name", list(METHODS))
def test_one_line_errors_change_nothing(name, original, data):
    fn, kw = METHODS[name]
    model = fresh(original)
    before = state(model)
    cases = [({"forget_classes": [0], "forget_indices": FORGET}, "forget_classes"),
             ({"forget_indices": []}, "empty"),
             ({"forget_indices": [0, N]}, r"\[0, 24\)"),
             ({"forget_indices": [-1]}, r"\[0, 24\)"),
             ({"forget_indices": [1, 1]}, "duplicate"),
             ({"forget_indices": list(range(N))}, "every"),
             ({"forget_indices": None}, "forget_indices")]
    for args, match in cases:
        forget_classes = args.pop("forget_classes", None)
        with pytest.raises(ValueError, match=match) as e:
            fn(model, data, forget_classes, **args, **kw)
        assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="retain_fraction"):
        fn(model, data, forget_indices=FORGET, retain_fraction=0.0, **kw)
    with pytest.raises(ValueError, match="empty"):
        fn(model, data.subset([]), forget_indices=[0], **kw)
    assert same_state(before, state(model))


def test_through_model_entry_like_the_registry(original, data):
    # the registry wraps every method with model_entry: dict samples arrive as a LabeledDataset
    model = fresh(original)
    r = model_entry(B.lm_graddiff)(model, data, forget_indices=FORGET, **FAST)
    assert r.method == "GradDiff" and not same_state(state(original), state(model))


def test_the_registry_dispatches_on_the_task_with_the_task_s_own_keywords(original, data):
    # Retrain and GA hold one function per task; the LM one runs on causal-LM data, its keywords bind
    a, b = fresh(original), fresh(original)
    ra = B.METHODS["Retrain"](a, data, forget_indices=FORGET, epochs=1, seed=2)
    B.lm_retrain(b, data, forget_indices=FORGET, epochs=1, seed=2)
    assert ra.method == "Retrain" and ra.info["task"] == "causal-lm" and same_state(state(a), state(b))
    a, b = fresh(original), fresh(original)
    B.METHODS["GA"](a, data, forget_indices=FORGET, warmup_epochs=0.5, **FAST)
    B.lm_gradient_ascent(b, data, forget_indices=FORGET, warmup_epochs=0.5, **FAST)
    assert same_state(state(a), state(b)) and not same_state(state(a), state(original))
    with pytest.raises(ValueError, match="does not run on causal-lm"):
        B.METHODS["FT"](fresh(original), data, forget_indices=FORGET)


def test_lm_split(data):
    forget, retain, budget = B.lm_split(data, [9, 0, 5], 0.25, seed=0)
    assert forget.indices == [0, 5, 9] and retain.indices == [i for i in range(N) if i not in (0, 5, 9)]
    assert len(budget) == round(0.25 * 21) and set(budget.indices) <= set(retain.indices)
    assert budget.indices == sorted(budget.indices)
    assert B.lm_split(data, [9, 0, 5], 0.25, seed=0)[2].indices == budget.indices
    assert B.lm_split(data, [9, 0, 5], 0.25, seed=1)[2].indices != budget.indices
    assert len(B.lm_split(data, [0], 0.001)[2]) == 1
    with pytest.raises(ValueError, match="integers"):
        B.lm_split(data, [0.5], 0.1)


def test_ga_and_graddiff_raise_the_forget_loss(original, data):
    forget = data.subset(FORGET)
    nll0 = E.sequence_losses(original, forget).mean()
    for fn in (B.lm_gradient_ascent, B.lm_graddiff):
        model = fresh(original)
        r = fn(model, data, forget_indices=FORGET, epochs=10, batch_size=2, lr=1e-2)
        assert E.sequence_losses(model, forget).mean() > nll0 + 1.0
        assert len(r.info["forget_nll"]) == 10 and r.info["diverged_in_epoch"] is None


def test_npo_loss_at_the_reference_is_2_over_beta_log_2(original, data):
    beta = 0.1
    (x, y), = list(batches(data.subset(FORGET), len(FORGET)))
    with torch.no_grad():
        logp = -sequence_nll(forward_logits(original, x), y)
    assert float(B.npo_loss(logp, logp.clone(), beta)) == pytest.approx(2 / beta * math.log(2), rel=1e-6)
    # falls as the forget answers become less likely than under the reference
    assert float(B.npo_loss(logp - 5.0, logp, beta)) < 2 / beta * math.log(2)
    # the first step of npo() (one batch per epoch, no retain term) is taken at theta = theta_ref
    model = fresh(original)
    r = B.npo(model, data, forget_indices=FORGET, epochs=1, batch_size=len(FORGET), alpha=0.0, beta=beta)
    assert r.info["loss"][0] == pytest.approx(2 / beta * math.log(2), rel=1e-5)
    assert r.retain_samples_used == 0


def test_ga_divergence_restores_the_last_finite_weights(original, data):
    model = fresh(original)
    with torch.no_grad():  # a NaN in the forget loss from the first step on
        model.head.bias[3:] = float("nan")
    before = state(model)
    r = B.lm_gradient_ascent(model, data, forget_indices=FORGET, epochs=3, batch_size=2)
    assert r.info["diverged_in_epoch"] == 1
    assert all(torch.equal(a, b) or (torch.isnan(a) == torch.isnan(b)).all() and
               torch.equal(a.nan_to_num(), b.nan_to_num()) for a, b in zip(before.values(), state(model).values()))


def test_retrain_paths(original, data):
    # default: the given model re-initialised in place and trained on every retain sequence
    model = fresh(original)
    r = B.lm_retrain(model, data, forget_indices=FORGET, epochs=1, seed=0)
    assert r.info["init"] == "modules' reset_parameters" and r.retain_samples_used == N - len(FORGET)
    assert len(r.info["loss"]) == 1
    # a factory and the corpus's own train_fn; weights copied into the given model
    seen = []

    def train_fn(m, dataset):
        seen.append(len(dataset))
        train(m, dataset, steps=5)

    model = fresh(original)
    r = B.lm_retrain(model, data, forget_indices=FORGET, model_factory=lambda: TinyLM(), train_fn=train_fn)
    assert seen == [N - len(FORGET)] and r.model is model and r.info["init"] == "model_factory"
    twin = fresh(original)
    B.lm_retrain(twin, data, forget_indices=FORGET, model_factory=lambda: TinyLM(), train_fn=train_fn)
    assert same_state(state(model), state(twin))
    # a retain_fraction < 1 trains on the budget
    r = B.lm_retrain(fresh(original), data, forget_indices=FORGET, retain_fraction=0.5, epochs=1)
    assert r.retain_samples_used == 10
    with pytest.raises(ValueError, match="do not fit"):
        B.lm_retrain(fresh(original), data, forget_indices=FORGET, model_factory=lambda: TinyLM(d=8),
                     train_fn=lambda m, d: None)


class _Scaled(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = TinyLM()
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, input_ids, attention_mask=None):
        return self.inner(input_ids) * self.scale


def test_retrain_without_a_reset_path_is_a_one_line_error(data):
    model = _Scaled()
    before = state(model)
    with pytest.raises(ValueError, match="model_factory") as e:
        B.lm_retrain(model, data, forget_indices=FORGET, epochs=1)
    assert "\n" not in str(e.value) and same_state(before, state(model))


class _HFStyle(TinyLM):
    """The Hugging Face initialisation protocol in miniature: ``init_weights()`` runs ``_init_weights``
    on every module not yet marked ``_is_hf_initialized`` (and marks it)."""

    def __init__(self):
        super().__init__()
        self.config = object()
        for m in self.modules():
            m._is_hf_initialized = True

    def _init_weights(self, module):
        for p in module.parameters(recurse=False):
            nn.init.constant_(p, 0.25)

    def init_weights(self):
        for m in self.modules():
            if not getattr(m, "_is_hf_initialized", False):
                self._init_weights(m)
                m._is_hf_initialized = True


def test_retrain_resets_a_hugging_face_style_model(data):
    model = _HFStyle()
    r = B.lm_retrain(model, data, forget_indices=FORGET, epochs=0)
    assert r.info["init"] == "init_weights"
    assert all(bool((p == 0.25).all()) for p in model.parameters())


@pytest.mark.slow  # the time is importing transformers' Llama (~4 s), the test itself takes milliseconds
def test_retrain_resets_a_hugging_face_model(data):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(vocab_size=24, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=8)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(0.3)
    r = B.lm_retrain(model, data, forget_indices=FORGET, epochs=0)
    assert r.info["init"] == "init_weights"
    w = model.model.layers[0].mlp.down_proj.weight.detach()
    assert abs(float(w.std()) - cfg.initializer_range) < 0.01 and float(model.model.norm.weight.detach()[0]) == 1.0


def test_selective_pruning_zeroes_the_top_neurons(original, data):
    model = fresh(original)
    r = B.selective_pruning(model, data, forget_indices=FORGET, ffn_frac=0.1, rounds=3)
    assert r.total_units == {"mlp.2": 32}
    per_round = round(0.1 * 32)
    assert r.pruned_units == {"mlp.2": 3 * per_round} and r.info["rounds_run"] == 3
    mask = r.masks["mlp.2"]
    w = model.mlp[2].weight
    assert bool((w[:, mask == 0] == 0).all()) and bool((w[:, mask == 1] != 0).all())
    assert {"scoring", "pruning", "total"} <= set(r.timings)
    # round 1 removes the neurons with the largest forget / retain activation ratio
    _, _, budget = B.lm_split(data, FORGET, 0.13, 0)
    layers = [type("L", (), {"name": "mlp.2", "layer": original.mlp[2], "units": 32})()]
    i_f = SP._mean_abs_activation(original, data.subset(FORGET), layers, 32, torch.device("cpu"), "tokens")["mlp.2"]
    i_r = SP._mean_abs_activation(original, budget, layers, 32, torch.device("cpu"), "tokens")["mlp.2"]
    first = set(torch.sort(i_f / (i_r + 1e-8), descending=True).indices[:per_round].tolist())
    assert first <= set((mask == 0).nonzero().flatten().tolist())
    with pytest.raises(ValueError, match="ffn_frac"):
        B.selective_pruning(model, data, forget_indices=FORGET, ffn_frac=0)
    with pytest.raises(ValueError, match="positions"):
        B.selective_pruning(model, data, forget_indices=FORGET, positions="all")


def test_mean_abs_activation_ignores_padding(original, data):
    layers = [type("L", (), {"name": "mlp.2", "layer": original.mlp[2], "units": 32})()]
    one = data.subset([3])
    n = int(one[0]["attention_mask"].sum())
    short = TokenSequences(one[0]["input_ids"][None, :n], one[0]["labels"][None, :n])
    dev = torch.device("cpu")
    a = SP._mean_abs_activation(original, one, layers, 4, dev, "tokens")["mlp.2"]
    b = SP._mean_abs_activation(original, short, layers, 4, dev, "tokens")["mlp.2"]
    assert torch.allclose(a, b, atol=1e-6)


def _log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def test_simnpo_loss_by_hand():
    # -(2/beta) * mean(log sigmoid(beta * (mean_nll - delta))), beta 2, delta 0.5, mean NLLs 1 and 2
    got = float(B.simnpo_loss(torch.tensor([1.0, 2.0]), beta=2.0, delta=0.5))
    assert got == pytest.approx(-(2 / 2) * (_log_sigmoid(1.0) + _log_sigmoid(3.0)) / 2, rel=1e-6)
    assert float(B.simnpo_loss(torch.tensor([0.7]), beta=4.5, delta=0.7)) == pytest.approx(2 / 4.5 * math.log(2))
    # the defaults are OpenUnlearning's TOFU config
    from dfmu_ext.baselines import lm_simnpo
    assert (lm_simnpo.SIMNPO_BETA, lm_simnpo.SIMNPO_GAMMA, lm_simnpo.SIMNPO_DELTA) == (4.5, 0.125, 0.0)


def test_simnpo_first_step_is_the_length_normalised_loss_of_the_original(original, data):
    # one batch per epoch, no retain term: the logged loss of epoch 1 is gamma * L_SimNPO at theta_0,
    # with each sequence's mean answer NLL computed here token by token
    beta, gamma, delta = 4.5, 0.125, 0.3
    x, y = next(iter(batches(data.subset(FORGET), len(FORGET))))
    with torch.no_grad():
        logp = torch.log_softmax(forward_logits(original, x), -1)
    means = []
    for n in range(len(FORGET)):
        terms = [-float(logp[n, t - 1, y[n, t]]) for t in range(1, y.shape[1]) if y[n, t] != -100]
        means.append(sum(terms) / len(terms))
    expect = gamma * -(2 / beta) * sum(_log_sigmoid(beta * (m - delta)) for m in means) / len(means)
    r = B.simnpo(fresh(original), data, forget_indices=FORGET, epochs=1, batch_size=len(FORGET), alpha=0.0,
                 beta=beta, gamma=gamma, delta=delta)
    assert r.info["loss"][0] == pytest.approx(expect, rel=1e-5) and r.retain_samples_used == 0
    with pytest.raises(ValueError, match="beta"):
        B.simnpo(fresh(original), data, forget_indices=FORGET, beta=0.0)


def test_rmu_distance_by_hand():
    from dfmu_ext.baselines.lm_rmu import rmu_distance
    a = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 0.0], [2.0, 2.0]]])
    mask = torch.tensor([[True, False], [True, True]])
    # sequence 1: position 0 only, ((1-1)^2 + (2-1)^2)/2 = 0.5; sequence 2: (1 + 1)/2 = 1 at both positions
    assert float(rmu_distance(a, torch.ones(2), mask)) == pytest.approx((0.5 + 1.0) / 2)
    assert float(rmu_distance(a, a.clone(), mask)) == 0.0


def test_rmu_control_vector():
    from dfmu_ext.baselines.lm_rmu import control_vector
    v = control_vector(16, 7.0, seed=3)
    assert float(v.norm()) == pytest.approx(7.0, rel=1e-6) and bool((v >= 0).all())
    assert torch.equal(v, control_vector(16, 7.0, seed=3)) and not torch.equal(v, control_vector(16, 7.0, seed=4))


def test_rmu_layer_rule():
    from dfmu_ext.baselines.lm_rmu import rmu_layers
    from dfmu_ext.lm.task import take
    from dfmu_ext.zoo.lm_models import TinyCausalLM
    x = take(qa_set(2), [0, 1])[0]
    for layers, steered, trained in ((4, "blocks.1", ["blocks.0.mlp.2"]), (2, "blocks.0", ["blocks.0.mlp.2"]),
                                     (8, "blocks.3", ["blocks.1.mlp.2", "blocks.2.mlp.2", "blocks.3.mlp.2"])):
        torch.manual_seed(0)
        m = TinyCausalLM(24, 8, hidden=16, layers=layers, heads=2, mlp=32)
        names = {mod: n for n, mod in m.named_modules()}
        block, downs, l = rmu_layers(m, x)
        assert names[block] == steered and [names[d] for d in downs] == (
            ["blocks.0.mlp.2", "blocks.1.mlp.2"] if layers == 4 else trained)
    # no list of blocks (the tiny test LM): the MLP's own output
    block, downs, l = rmu_layers(TinyLM(), x)
    assert l == 0 and isinstance(block, nn.Sequential) and downs == [block[2]]


def test_rmu_first_step_and_what_it_trains(original, data):
    from dfmu_ext.baselines.lm_rmu import control_vector
    # the activations RMU steers (the tiny LM has no block list: its MLP's output), read with a hook
    x, y = next(iter(batches(data.subset(FORGET), len(FORGET))))
    seen = []
    h = original.mlp.register_forward_hook(lambda _m, _i, out: seen.append(out.detach()))
    with torch.no_grad():
        forward_logits(original, x)
    h.remove()
    act, u = seen[0], control_vector(16, 5.0, seed=2)
    mask = y != -100
    per_seq = [sum(float(((act[n, t] - u) ** 2).mean()) for t in range(y.shape[1]) if mask[n, t]) / int(mask[n].sum())
               for n in range(len(FORGET))]
    # epoch 1 is one step at theta_0: the retain term is exactly 0 there (the model is its reference)
    model = fresh(original)
    r = B.rmu(model, data, forget_indices=FORGET, epochs=1, batch_size=len(FORGET), steering_coeff=5.0, seed=2,
              alpha=1000.0)
    assert r.info["loss"][0] == pytest.approx(sum(per_seq) / len(per_seq), rel=1e-5)
    assert r.info["steered"] == "mlp" and r.info["trained"] == ["mlp.2.weight"] and r.retain_samples_used > 0
    changed = [k for k, v in state(model).items() if not torch.equal(v, state(original)[k])]
    assert changed == ["mlp.2.weight"] and all(p.requires_grad for p in model.parameters())
    # longer: the forget activations move toward c*u, and the retain term holds the retain ones (the
    # tiny set's forget and retain sequences share their person tokens, so they pull against each other)
    from dfmu_ext.baselines.lm_rmu import rmu_distance
    retain = data.subset([i for i in range(N) if i not in FORGET])
    xr, yr = next(iter(batches(retain, len(retain))))

    def mlp_outputs(m):
        acts = []
        h = m.mlp.register_forward_hook(lambda _m, _i, out: acts.append(out.detach()))
        with torch.no_grad():
            forward_logits(m, x), forward_logits(m, xr)
        h.remove()
        return acts

    f0, r0 = mlp_outputs(original)
    before = float(rmu_distance(f0, u, mask))
    moved = {}
    for alpha in (10.0, 1.0):
        model = fresh(original)
        B.rmu(model, data, forget_indices=FORGET, epochs=20, batch_size=2, steering_coeff=5.0, seed=2, lr=1e-2,
              alpha=alpha)
        f1, r1 = mlp_outputs(model)
        moved[alpha] = (float(rmu_distance(f1, u, mask)), float(rmu_distance(r1, r0, yr != -100)))
    after, drift = moved[10.0]
    assert after < 0.8 * before and drift < 0.1 * (before - after)
    assert moved[1.0][0] < after and moved[1.0][1] > 5 * drift  # less retain weight: further, at a cost

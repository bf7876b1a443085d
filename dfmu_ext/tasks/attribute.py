r"""The attribute task: forget an attribute from a classifier's representation while its labels are kept.

``unlearn(model, train_set, forget_attribute=values)`` gives one integer per training sample: its
value :math:`a_n` of an attribute the model should no longer encode (a stamp, a style, a sensitive
trait). Every sample carries its attribute, so the forget set is the whole training set (its
attribute) and what is kept is every sample's label. The stages are DFMU's:

1. **The attribute's readout** (:meth:`AttributeTask.forget_targets`): a linear softmax readout
   :math:`q(a \mid h) = \mathrm{softmax}(V h + c)` of the attribute from the original's penultimate
   features :math:`h(x)` (the classifier's input), fitted on the scoring samples.
2. **One scoring pass** through the fused op (:func:`dfmu_ext.importance.score_blocks`): the batch
   holds every scoring sample twice. Its first copy is read by the classifier and scored against its
   label; its second copy is read by the attribute's readout (the classifier's output is replaced
   there by :math:`V h + c`, through a forward hook) and scored against its attribute value. One
   forward and one backward give, per unit :math:`c`, the Taylor importance for the labels (group 0)
   and for the attribute (group 1):
   :math:`I^{y}_c = \sum_n |\sum_p a g^{y}|`, :math:`I^{a}_c = \sum_n |\sum_p a g^{a}|`.
3. **Selection and fused masking**: :func:`dfmu_ext.selection.select_units` with each group's
   importance normalised by its block total (the two losses differ in scale), so
   :math:`\rho_c = \hat I^{a}_c / \hat I^{y}_c`; units that carry the attribute but not the label
   (:math:`\rho > 1`, never the top 10 % for the label) are masked.
4. **The masked fine-tune** on the budget: cross-entropy on the labels, distillation to the
   original (``FinetuneConfig.distill``), and the attribute term, a kernel two-sample distance
   between the penultimate features of the batch's attribute groups,

   .. math:: \mathrm{MMD}^2 = \sum_{k} \big\| \bar\phi_{a=k} - \bar\phi \big\|^2 \quad\text{(biased
             estimate, Gaussian kernels at } \sigma \in \{0.5, 1, 2\} \times \text{the median distance)},

   which is zero only when the groups' feature distributions agree — against every probe, not only
   linear ones — plus the distance between their class-conditional means. The retention guard keeps
   the label accuracy (:meth:`ClassificationTask.retention`).
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Subset

from .._common import model_device, synchronize
from ..blocks import classifier_of
from ..distributed import Comm
from ..finetune import FinetuneConfig, distill_loss
from ..importance import score_blocks
from ..model_io import cat
from ..pruning import build_mask_plan
from ..result import PruneResult
from ..selection import SelectionConfig, select_units
from ..splits import stratified_fraction, take_batch
from ..targets import head_inputs, penultimate_features
from .base import Split, Targets, hold_out
from .classification import ClassificationTask, ClassifierObjective

#: Selection for attributes: each group's importance as its share of the block's (``normalize="total"``:
#: the attribute readout's loss and the label loss differ in scale), masked units only where the
#: attribute's share is larger than the label's.
ATTRIBUTE_SELECTION = SelectionConfig(normalize="total", fraction_first=0.0, fraction_last=0.2, min_ratio=1.0)


@dataclass
class AttributeTermConfig:
    """The fine-tune's attribute term (``forget_term=`` of ``unlearn`` for this task).

    Attributes:
        weight: weight of the MMD between the attribute groups' penultimate features.
        mean_weight: weight of the squared distance between the groups' class-conditional means
            (per class, each group's mean against the class mean; features scaled by the original's std).
        bandwidths: Gaussian kernel widths, as multiples of the batch's median pairwise distance.
        readout_steps: gradient steps of the attribute readout's fit.
    """

    weight: float = 20.0
    mean_weight: float = 0.02
    bandwidths: tuple[float, ...] = (0.5, 1.0, 2.0)
    readout_steps: int = 400

    def validate(self) -> None:
        if self.weight < 0 or self.mean_weight < 0 or not self.bandwidths or min(self.bandwidths) <= 0:
            raise ValueError("weight and mean_weight must be >= 0 and bandwidths positive")
        if self.readout_steps < 1:
            raise ValueError(f"readout_steps must be >= 1, got {self.readout_steps}")

    def to_dict(self) -> dict:
        return asdict(self)


def check_values(values, n: int) -> torch.Tensor:
    """``values`` as a 1-D int64 tensor of length ``n`` with values ``0..K-1`` (K >= 2, each present);
    a one-line ValueError otherwise."""
    try:
        v = torch.as_tensor(np.asarray(values))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"forget_attribute must be one integer per training sample: {exc}") from None
    v = v.reshape(-1)
    if v.numel() != n:
        raise ValueError(f"forget_attribute has {v.numel()} values for {n} training samples (one per sample)")
    if v.is_floating_point() and not bool(torch.all(v == v.round())):
        raise ValueError("forget_attribute values must be integers")
    v = v.long()
    if int(v.min()) < 0:
        raise ValueError("forget_attribute values must be >= 0")
    present = torch.unique(v)
    if present.numel() < 2:
        raise ValueError("forget_attribute has a single value: there is no attribute to forget")
    if present.numel() != int(v.max()) + 1:
        raise ValueError(f"forget_attribute values must be 0..K-1 with each present, got {present.tolist()}")
    return v


class WithAttribute(Dataset):
    """``(x, [y, a])`` samples: the budget's samples with their attribute value beside the label."""

    def __init__(self, subset: Subset, values: torch.Tensor):
        self.subset, self.values = subset, values

    def __len__(self) -> int:
        return len(self.subset)

    def __getitem__(self, i):
        x, y = self.subset[i]
        return x, torch.stack([torch.as_tensor(y).long(), self.values[self.subset.indices[i]]])


def mmd2(h: torch.Tensor, a: torch.Tensor, num_values: int, bandwidths) -> torch.Tensor:
    r"""Squared MMD of every group ``a == k`` against the batch, summed over ``k``: with Gaussian
    kernels :math:`K` (widths ``bandwidths`` x the median pairwise distance, detached),
    :math:`\sum_k (\bar K_{kk} - 2 \bar K_{k\cdot} + \bar K_{\cdot\cdot})`. Groups with fewer than two
    samples in the batch are skipped."""
    d2 = torch.cdist(h, h).pow(2)
    positive = d2.detach()[d2.detach() > 0]
    scale = positive.median().clamp_min(1e-6) if positive.numel() else d2.new_tensor(1.0)
    k = sum(torch.exp(-d2 / (2 * b * b * scale)) for b in bandwidths)
    total, whole = h.new_zeros(()), k.mean()
    for v in range(num_values):
        g = a == v
        if int(g.sum()) < 2:
            continue
        total = total + k[g][:, g].mean() - 2 * k[g].mean() + whole
    return total


def conditional_mean_gap(h: torch.Tensor, y: torch.Tensor, a: torch.Tensor, num_values: int) -> torch.Tensor:
    r""":math:`\sum_{c,k} \| \mu_{c,k} - \mu_c \|^2` over the batch's classes :math:`c` and attribute
    values :math:`k` (means of ``h`` over the samples of class c, and of class c with value k)."""
    total = h.new_zeros(())
    for c in torch.unique(y).tolist():
        in_c = y == c
        mu = h[in_c].mean(0)
        for v in range(num_values):
            g = in_c & (a == v)
            if bool(g.any()):
                total = total + (h[g].mean(0) - mu).pow(2).sum()
    return total


class AttributeObjective(ClassifierObjective):
    """The classifier's fine-tune (cross-entropy, distillation, SGD, the masks) plus the attribute
    term on the penultimate features of every batch (its samples' ``[y, a]`` targets)."""

    def __init__(self, model, dataset, config, *, device, seed, comm, steps, teacher, term: AttributeTermConfig,
                 num_values: int, scale: torch.Tensor):
        super().__init__(model, dataset, config, device=device, seed=seed, comm=comm, steps=steps, teacher=teacher)
        self.term, self.num_values, self.scale = term, num_values, scale.to(device)
        self.forget_steps = None   # the attribute term runs on every step (the guard's recovery steps leave it out)
        self.head = classifier_of(model)[1]

    def loss(self, batch, forget_phase: bool):
        x, ya = batch
        y, a = ya[:, 0], ya[:, 1]
        with head_inputs(self.head) as feats:   # the penultimate features of this forward
            with self.engine.autocast():
                logits = self.net(x)
                loss = F.cross_entropy(logits, y)
                if self.teacher is not None and self.config.distill > 0:
                    with torch.no_grad():
                        reference = self.teacher(x)
                    loss = loss + self.config.distill * distill_loss(logits, reference)
        if forget_phase:
            h = feats[-1].float() / self.scale
            if self.term.weight > 0:
                loss = loss + self.term.weight * mmd2(h, a, self.num_values, self.term.bandwidths)
            if self.term.mean_weight > 0:
                loss = loss + self.term.mean_weight * conditional_mean_gap(h, y, a, self.num_values)
        return loss, int((logits.detach().argmax(1) == y).sum()), int(x.shape[0])


def fit_readout(h: torch.Tensor, a: torch.Tensor, num_values: int, steps: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    r"""A softmax readout ``(V, c)`` of ``a`` from ``h``: ``steps`` full-batch gradient steps (step 1,
    from zero) on the mean cross-entropy plus :math:`10^{-3}\|W\|^2` over the features centred and
    scaled by their std, folded back into ``V, c``; returns ``V``, ``c`` and its accuracy on ``(h, a)``.
    Plain gradient steps, not ``torch.optim``: its first use imports ``torch._dynamo`` (2 s, measured)."""
    mu, sd = h.mean(0), h.std(0).clamp_min(1e-6)
    z = (h - mu) / sd
    onehot = F.one_hot(a, num_values).float()
    w = torch.zeros(num_values, h.shape[1])
    b = torch.zeros(num_values)
    for _ in range(steps):
        err = (torch.softmax(z @ w.T + b, 1) - onehot) / z.shape[0]   # d(mean CE)/d(logits)
        w -= err.T @ z + 2e-3 * w
        b -= err.sum(0)
    v = w / sd
    c = b - v @ mu
    acc = float(((h @ v.T + c).argmax(1) == a).float().mean())
    return v, c, acc


class AttributeTask(ClassificationTask):
    """Forget an attribute (``forget_attribute``: one integer per training sample) from a classifier's
    penultimate features while its labels are kept (module docs)."""

    name = "attribute"
    recovery_forget_term = True      # the attribute term is every step's point: recovery keeps it
    forgets = ("forget_attribute",)
    keywords = ("forget_term", "selection", "finetune", "steps")
    prune_halvings = 0    # the attribute's units are its point: not measured with the classes' back-off

    def claims(self, train_set, what) -> bool:
        return what.get("forget_attribute") is not None

    def configs(self, split: Split | None, given: dict) -> dict:
        finetune = given.get("finetune") or FinetuneConfig(epochs=1, lr=0.003, distill=1.0, early_stop=False,
                                                           min_steps=60)
        if not isinstance(finetune, FinetuneConfig):
            raise ValueError(f"for attributes, finetune takes a FinetuneConfig, got {type(finetune).__name__}")
        finetune.validate()
        term = given.get("forget_term") or AttributeTermConfig()
        if not isinstance(term, AttributeTermConfig):
            raise ValueError(f"for attributes, forget_term takes an AttributeTermConfig, got {type(term).__name__}")
        term.validate()
        selection = given.get("selection") or ATTRIBUTE_SELECTION
        selection.validate()
        return {"finetune": finetune, "forget_term": term, "selection": selection}

    def split(self, train_set, what, retain_fraction, seed, configs, extra) -> Split:
        values = check_values(what["forget_attribute"], len(train_set))
        everything = Subset(train_set, list(range(len(train_set))))
        budget = stratified_fraction(train_set, retain_fraction, seed=seed)
        train, validation = hold_out(budget, extra["validation_share"], seed, extra["min_validation"])
        k = int(values.max()) + 1
        describe = {"forget_attribute": {"values": k, "counts": torch.bincount(values, minlength=k).tolist()}}
        return Split(everything, everything, train, validation, False, None, describe,
                     {"full_budget": budget, "watch": None, "values": values, "num_values": k})

    def scoring_batch(self, split: Split, forget_pos, budget_pos):
        """Each scoring sample twice: first read for its label, then for its attribute value."""
        idx = [split.forget_set.indices[i] for i in forget_pos] + [split.budget.indices[i] for i in budget_pos]
        x, y = take_batch(split.forget_set.dataset, idx)
        a = split.extra["values"][torch.as_tensor(idx, dtype=torch.long)]
        is_attribute = torch.cat([torch.zeros(len(idx), dtype=torch.bool), torch.ones(len(idx), dtype=torch.bool)])
        return (cat([x, x]), torch.cat([y, a])), is_attribute

    def forget_targets(self, model, split, scored, configs, seed, device) -> Targets:
        """The attribute's readout from the original's penultimate features of the scoring samples."""
        x, ya = split.extra["scoring_batch"]
        n = x.shape[0] // 2
        h = penultimate_features(model, x[n:])
        term: AttributeTermConfig = configs["forget_term"]
        v, c, acc = fit_readout(h, ya[n:].long(), split.extra["num_values"], term.readout_steps)
        split.extra["feature_scale"] = h.std(0).mean().clamp_min(1e-6)
        split.extra["readout"] = (v, c)   # prune reads it (it is given no targets)
        return Targets((v, c), list(scored), {"attribute_readout_accuracy": acc})

    def prune(self, model, batch, is_forget, split, configs, mode, comm):
        x, y = batch
        device = model_device(model)
        if "readout" not in split.extra:
            raise ValueError("the attribute readout is missing: forget_targets runs before prune")
        v, c = (t.to(device) for t in split.extra["readout"])
        x, y, route = x.to(device), torch.as_tensor(y).to(device).long(), is_forget.to(device)
        head_name, head = classifier_of(model)
        width = max(head.out_features, v.shape[0])

        def readout(_module, inputs, out):  # the attribute rows read the attribute, padded to one width
            h = inputs[0].flatten(1)
            pad = out.new_full((out.shape[0], width), -30.0)
            lab = torch.cat([out, pad[:, out.shape[1]:]], 1)
            att = torch.cat([h @ v.T.to(h.dtype) + c.to(h.dtype), pad[:, v.shape[0]:]], 1)
            return torch.where(route[:, None], att, lab)

        handle = head.register_forward_hook(readout)
        t0 = time.perf_counter()
        try:
            scored = score_blocks(model, x, y, forget_mask=route, comm=comm)
        finally:
            handle.remove()
        synchronize(device)
        t1 = time.perf_counter()
        selection = SelectionConfig(**{**configs["selection"].to_dict(), **({"mode": mode} if mode else {})})
        masks = select_units(scored.blocks, scored.scores, scored.counts, selection)
        plan = build_mask_plan(scored.blocks, masks)
        plan.apply()
        synchronize(device)
        t2 = time.perf_counter()
        labels = ~route
        pre = float((scored.logits[labels, :head.out_features].argmax(1) == y[labels]).float().mean())
        return PruneResult(masks, scored.scores, scored.counts, plan, pre, t1 - t0, t2 - t1)

    def objective(self, model, split, targets, pruned, configs, device, seed, comm, steps, teacher):
        config = configs["finetune"]
        if config.epochs == 0 or len(split.budget) == 0:
            return None
        return AttributeObjective(model, WithAttribute(split.budget, split.extra["values"]), config, device=device,
                                  seed=seed, comm=comm or Comm(), steps=steps, teacher=teacher,
                                  term=configs["forget_term"], num_values=split.extra["num_values"],
                                  scale=split.extra["feature_scale"])

    def early_stop_target(self, pruned) -> float | None:
        return None   # the attribute term needs its steps: no stop on recovered accuracy

    def describe_record(self, split: Split) -> dict:
        return dict(split.describe)

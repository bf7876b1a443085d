r"""What a model retrained without the forget set would say about the forget samples: the targets of
DFMU's forget term.

A model retrained without the forget set classifies a forget sample the way its *retain* look-alikes
are labelled: a forgotten sub-class gets the coarse label of the fine classes it resembles, a
forgotten random sample gets (with the probability of the test accuracy) its own label, a forgotten
class is spread over the remaining classes it resembles. Early features are where the original and
a retrained model barely differ (they are generic), so neighbours found there estimate Retrain's
output without training anything:

.. math::  t_i(c) = \frac{1}{k} \sum_{j \in \mathrm{kNN}_k(i)} [y_j = c],

the label histogram of sample :math:`i`'s :math:`k` nearest retain samples by cosine similarity of
:math:`\phi(x)`, the output of the model's first block (after its norm) average-pooled to at most
``grid`` x ``grid`` positions. The neighbours are searched in the retain budget only, so the
targets read no retain sample beyond it; the forget term of the fine-tune
(:func:`dfmu_ext.tasks.classification.masked_finetune`) then pulls the forget samples' predictions towards
:math:`t` (soft-label cross-entropy).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ._common import eval_mode
from .blocks import Block, classifier_of


@dataclass
class ForgetTargetConfig:
    r"""The forget term of DFMU's fine-tune (see the module docstring).

    Attributes:
        weight: w in ``loss = CE(retain batch) + w * CE_soft(forget batch, t)``; 0 turns the term off.
        k: neighbours per forget sample.
        batch_size: forget samples per fine-tune step (cycled through the forget samples read).
        grid: the first block's output is average-pooled to at most ``grid`` x ``grid`` positions
            before the neighbour search (keeps the search cheap; coarse layout is what look-alikes share).
        samples: how many forget samples the term reads (a seeded random subset; the scoring pass's
            come first); None: ``steps * batch_size``, so that each is seen once in the forget phase.
        references: how many retain samples of the budget the neighbours are searched among (a
            seeded random subset; the first block's output over all of a 7,800-sample budget took
            0.7 s on 2 CPU cores, most of the forget term's set-up).
        steps: the forget phase: the term is added to the fine-tune's first ``steps`` steps; the
            retain-only steps after it let the retain accuracy recover.
        min_excess: the term runs only when the forget samples' neighbours disagree with their own
            labels clearly more than the retain samples' neighbours do with theirs:
            :math:`D_f - D_r \ge` ``min_excess``, with :math:`D = \mathrm{mean}_i (1 - t_i(y_i))`
            (:func:`disagreement`) over the forget samples read (:math:`D_f`) and over the reference
            retain samples, each against the others (:math:`D_r`, leave-one-out). The excess
            estimates how much of the forget set a retrained model would label differently than the
            retain data suggests: measured 0.63-0.67 for whole Fashion-MNIST classes, 0.31-0.77 for
            sub-classes of the mixed coarse sets, -0.08 to 0.01 for random 1% and 10% shares (which share
            their labels' neighbourhoods with the retain data). Where it is small there is nothing
            to move, and on a model that memorised its samples the term cost 3-36 points of test
            accuracy without reaching Retrain (benchmarks/RESULTS.md).
        feature_weight: :math:`w_h`, the weight of the feature term (:func:`feature_neighbours`,
            :func:`feature_loss`) added in the forget phase beside the label term; 0 (the default)
            leaves it out. It acts on the classifier's input, so it moves what a linear probe of
            the penultimate features sees, which masking the head row leaves as it was. Measured on
            five whole-class setups, weight 10 brought that probe within a point of Retrain's on two
            but cost 1.6-5.1 points of RA beyond the defaults (benchmarks/RESULTS.md).
        feature_k: :math:`k_h`, the nearest retain samples (in the original's features) whose current
            features a forget sample is pulled to.
    """

    weight: float = 0.5
    k: int = 25
    batch_size: int = 32
    grid: int = 4
    samples: int | None = None
    references: int = 2048
    steps: int = 30
    min_excess: float = 0.15
    feature_weight: float = 0.0
    feature_k: int = 10

    def validate(self) -> None:
        if (self.weight < 0 or self.k < 1 or self.batch_size < 1 or self.grid < 1 or self.steps < 0
                or self.references < 1):
            raise ValueError("forget term: weight and steps must be >= 0, and k, batch_size, grid and references >= 1")
        if not (self.feature_weight >= 0 and self.feature_k >= 1):
            raise ValueError(f"forget term: feature_weight must be >= 0 and feature_k >= 1, got "
                             f"{self.feature_weight} and {self.feature_k}")
        if not -1.0 <= self.min_excess <= 1.0:
            raise ValueError(f"forget term: min_excess must lie in [-1, 1], got {self.min_excess}")
        if self.samples is not None and self.samples < 1:
            raise ValueError(f"forget term: samples must be >= 1 or None, got {self.samples}")

    @property
    def active(self) -> bool:
        """Whether the term runs at all: a label or a feature weight, for at least one step."""
        return (self.weight > 0 or self.feature_weight > 0) and self.steps > 0

    def pool_size(self, available: int) -> int:
        """How many of ``available`` forget samples the term reads."""
        return min(available, self.samples if self.samples is not None else self.steps * self.batch_size)

    def to_dict(self) -> dict:
        return asdict(self)


@contextmanager
def head_inputs(head: nn.Module, on: bool = True):
    """Within the block, the list the classifier ``head``'s inputs are appended to, one ``(N, -1)``
    tensor per forward (a forward pre-hook; nothing is hooked when not ``on``)."""
    captured: list[torch.Tensor] = []
    handle = head.register_forward_pre_hook(lambda _m, inputs: captured.append(inputs[0].flatten(1))) if on else None
    try:
        yield captured
    finally:
        if handle is not None:
            handle.remove()


@torch.no_grad()
def penultimate_features(model: nn.Module, x: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """``(N, D)`` float32 CPU features: the input of the model's classifier (the penultimate features a
    linear probe reads), in eval mode."""
    _, head = classifier_of(model)
    device = head.weight.device
    out = []
    with eval_mode(model), head_inputs(head) as captured:
        for start in range(0, x.shape[0], batch_size):
            captured.clear()
            model(x[start:start + batch_size].to(device))
            out.append(captured[-1].float().cpu())
    return torch.cat(out) if out else torch.zeros(0, head.in_features)


def feature_neighbours(forget_keys: torch.Tensor, retain_keys: torch.Tensor, k: int = 10,
                       chunk: int = 1024) -> torch.Tensor:
    r"""``(n_f, k)`` positions of each forget sample's ``k`` nearest retain samples by cosine
    similarity of the keys (the original model's penultimate features), most similar first; ``k`` is
    capped at the retain count.

    A model retrained without a class has no direction for it: an image of that class lands where the
    known classes it resembles land. So the feature term (:func:`feature_loss`) pulls forget sample
    :math:`i`'s penultimate feature :math:`h(x_i)` to the *current* model's features of these
    neighbours :math:`N_i`, one drawn per step, :math:`j \sim \mathrm{U}(N_i)`:

    .. math::  \mathbb{E}_j \lVert h(x_i) - h(x_j) \rVert^2 = \Big\lVert h(x_i) -
               \frac{1}{k}\sum_{j \in N_i} h(x_j) \Big\rVert^2 + \mathrm{const},

    so in expectation the pull is to the neighbours' mean feature, at the cost of one extra image per
    forget sample and step (exact for a squared distance; :func:`feature_loss` is a cosine, for which
    it is the same pull to first order). The current features, not the original's: pruning and the
    fine-tune move the whole feature space, and a fixed target there fights the retain side (measured
    on a Fashion-MNIST CNN: pulled to their neighbours' original features, the forget samples ended
    further from them than they started, while their distance to the neighbours' current features
    fell fivefold; benchmarks/RESULTS.md).
    """
    if retain_keys.shape[0] == 0:
        raise ValueError("feature neighbours need at least one retain sample")
    k = min(int(k), retain_keys.shape[0])
    keys = F.normalize(retain_keys.float(), dim=1)
    queries = F.normalize(forget_keys.float(), dim=1)
    out = torch.zeros(queries.shape[0], k, dtype=torch.long)
    for start in range(0, queries.shape[0], chunk):
        out[start:start + chunk] = (queries[start:start + chunk] @ keys.T).topk(k, dim=1).indices
    return out


def feature_scales(retain_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r"""``(mu, s)``, each ``(D,)``: the mean :math:`\mu_d` of feature :math:`d` over the retain rows and
    :math:`s_d = 1 / \max(\sigma_d, 0.01\,\bar\sigma)`, its inverse standard deviation (floored at 1%
    of the mean, so dead units do not blow up): the coordinates of a linear probe on standardised
    features, where a small offset along a quiet feature tells a class apart. No gradient flows
    through them."""
    r = retain_features.detach().float()
    sd = r.std(dim=0, unbiased=False) if r.shape[0] > 1 else torch.ones(r.shape[1], device=r.device)
    return r.mean(dim=0), 1 / sd.clamp_min(max(0.01 * float(sd.mean()), 1e-12))


def feature_loss(features: torch.Tensor, targets: torch.Tensor, center: torch.Tensor,
                 scales: torch.Tensor) -> torch.Tensor:
    r"""The feature term over a batch of forget samples' classifier inputs :math:`h_i` (``(n, D)``), in
    the retain batch's standardised coordinates :math:`z(h) = s \odot (h - \mu)`
    (:func:`feature_scales`):

    .. math::  L_h = \frac{1}{n} \sum_i \Big(1 - \cos\big(z(h_i),\, z(g_i)\big)\Big),

    with ``targets`` :math:`g` (the neighbours' features, :func:`feature_neighbours`; no gradient
    flows into them). A cosine, not a squared distance: with targets the model itself produces, a
    squared distance is also lowered by shrinking every feature, and measured, it did so until the
    features died (digits, a SmallCNN: retain accuracy 59% -> 10%); the cosine is blind to scale."""
    mu, s = center.to(features.device, torch.float32), scales.to(features.device, torch.float32)
    z_h = (features.float() - mu) * s
    z_g = (targets.detach().float() - mu) * s
    return (1 - F.cosine_similarity(z_h, z_g, dim=1, eps=1e-8)).mean()


class _Stop(Exception):
    """Raised by the feature hook: the rest of the forward is not needed."""


@torch.no_grad()
def early_features(model: nn.Module, block: Block, x: torch.Tensor, grid: int = 4,
                   batch_size: int = 1024) -> torch.Tensor:
    """``(N, D)`` float32 L2-normalised features: ``block``'s output (after its norm), pooled to at
    most ``grid`` x ``grid`` positions, flattened. The forward stops at the block (eval mode)."""
    captured: list[torch.Tensor] = []

    def hook(_module, _inputs, output):
        captured.append(output)
        raise _Stop

    device = block.layer.weight.device
    handle = block.output_module.register_forward_hook(hook)
    out = []
    try:
        # gradients on: the path the blocks were found on (nn.TransformerEncoderLayer's fused path skips them)
        with eval_mode(model), torch.enable_grad():
            for start in range(0, x.shape[0], batch_size):
                captured.clear()
                try:
                    model(x[start:start + batch_size].to(device))
                except _Stop:
                    pass
                if not captured:
                    raise RuntimeError(f"block {block.name} did not run in the model's forward")
                a = captured[0].detach().float()
                if a.dim() > 2 and isinstance(block.layer, nn.Linear):  # (N, T, C): units last, mean over T
                    a = a.mean(dim=tuple(range(1, a.dim() - 1)))
                elif a.dim() > 2:  # (N, C, *spatial): coarse spatial layout
                    spatial = a.shape[2:]
                    size = tuple(min(grid, s) for s in spatial)
                    pool = {1: F.adaptive_avg_pool1d, 2: F.adaptive_avg_pool2d, 3: F.adaptive_avg_pool3d}[len(spatial)]
                    a = pool(a, size)
                out.append(F.normalize(a.flatten(1), dim=1).cpu())
    finally:
        handle.remove()
    return torch.cat(out) if out else torch.zeros(0, 0)


def neighbour_targets(forget_features: torch.Tensor, retain_features: torch.Tensor, retain_labels: torch.Tensor,
                      num_classes: int, k: int = 25, chunk: int = 1024, *, leave_one_out: bool = False) -> torch.Tensor:
    """``(n_f, num_classes)`` label histograms of each forget sample's ``k`` nearest retain samples
    (cosine similarity of L2-normalised features; ties by index). ``k`` is capped at the retain count.
    ``leave_one_out``: the "forget" features *are* the retain features, and each sample's own entry
    is excluded (the retain samples' own disagreement, :math:`D_r`)."""
    if retain_features.shape[0] == 0:
        raise ValueError("neighbour targets need at least one retain sample")
    if leave_one_out and forget_features.shape[0] != retain_features.shape[0]:
        raise ValueError("leave_one_out needs the retain features as the forget features")
    k = min(int(k), retain_features.shape[0] - (1 if leave_one_out else 0))
    if k < 1:
        raise ValueError("neighbour targets need at least one retain sample besides the sample itself")
    labels = retain_labels.long().cpu()
    out = torch.zeros(forget_features.shape[0], num_classes)
    for start in range(0, forget_features.shape[0], chunk):
        sim = forget_features[start:start + chunk] @ retain_features.T
        if leave_one_out:
            rows = torch.arange(sim.shape[0])
            sim[rows, rows + start] = float("-inf")
        idx = sim.topk(k, dim=1).indices
        hist = torch.zeros(idx.shape[0], num_classes)
        hist.scatter_add_(1, labels[idx], torch.ones(idx.shape, dtype=hist.dtype))
        out[start:start + chunk] = hist / k
    return out


def disagreement(targets: torch.Tensor, labels: torch.Tensor) -> float:
    r""":math:`D = \mathrm{mean}_i (1 - t_i(y_i))`: how much the forget samples' neighbours disagree
    with their own labels (a label outside the target's classes counts as full disagreement)."""
    if targets.shape[0] == 0:
        return 0.0
    y = labels.long().cpu()
    inside = (y >= 0) & (y < targets.shape[1])
    own = torch.zeros(targets.shape[0])
    own[inside] = targets[inside.nonzero().flatten(), y[inside]].float()
    return float((1 - own).mean())


def nonmember_targets(forget_features: torch.Tensor, forget_labels: torch.Tensor, nonmember_features: torch.Tensor,
                      nonmember_probs: torch.Tensor, nonmember_labels: torch.Tensor, k: int = 25) -> torch.Tensor:
    r"""Targets for forget samples from data the model never saw (``unlearn(nonmembers=)``).

    On samples it memorised, a model is confident and right, so neither its own outputs nor its
    retain look-alikes' labels say how a model that never saw them would do; its outputs on
    *non-members* do: a retrained model treats a forgotten sample as the original treats unseen
    data. With :math:`p_j` the model's output distribution on non-member :math:`j`:

    1. :math:`q_i = \frac1k \sum_{j \in \mathrm{kNN}_k(i)} p_j`, the mean output on forget sample
       :math:`i`'s ``k`` nearest non-members (cosine similarity of the early features);
    2. per label :math:`c`, the forget samples of label :math:`c` ranked by :math:`s_i = q_i(c)`
       (how strongly unseen look-alikes back their label; ties by position) get the quantiles of
       the non-members' true-label probabilities :math:`u_j = p_j(y_j)` of label :math:`c` (all
       non-members' where none has label :math:`c`): the :math:`r`-th of :math:`n_c` (from 0) gets
       :math:`p^*_i = Q_u((r + \frac12) / n_c)` (linear interpolation);
    3. :math:`t_i(y_i) = p^*_i` and :math:`t_i(c) = (1 - p^*_i)\, q_i(c) / (1 - q_i(y_i))` for
       :math:`c \ne y_i` (uniform over the other classes where :math:`q_i(y_i) = 1`).

    So the forget samples' true-label probabilities, once fitted, are distributed as the
    non-members' are, per label (a membership attack on them sees non-members: what Retrain looks
    like), and the look-alikes decide only which forget sample gets which quantile and where the
    rest of the mass goes. Returns ``(n_f, C)`` rows summing to 1, ``C = nonmember_probs.shape[1]``.
    """
    if nonmember_features.shape[0] == 0:
        raise ValueError("nonmember targets need at least one non-member")
    n_n = nonmember_features.shape[0]
    if nonmember_probs.shape[0] != n_n or nonmember_labels.numel() != n_n:
        raise ValueError("nonmember targets: one output row and one label per non-member")
    n_f, classes = forget_features.shape[0], nonmember_probs.shape[1]
    probs = nonmember_probs.float().cpu()
    y_f, y_n = forget_labels.long().cpu().reshape(-1), nonmember_labels.long().cpu().reshape(-1)
    k = min(int(k), nonmember_features.shape[0])
    q = torch.zeros(n_f, classes)
    for start in range(0, n_f, 1024):
        idx = (forget_features[start:start + 1024] @ nonmember_features.T).topk(k, dim=1).indices
        q[start:start + 1024] = probs[idx].mean(dim=1)
    u = probs.gather(1, y_n[:, None])[:, 0]
    own = q.gather(1, y_f[:, None])[:, 0]
    target_own = torch.empty(n_f)
    for c in torch.unique(y_f).tolist():
        members = torch.nonzero(y_f == c).flatten()
        pool = u[y_n == c] if bool((y_n == c).any()) else u
        # stable ascending order of support: the least-backed forget sample gets the lowest quantile
        order = members[torch.sort(own[members], stable=True).indices]
        levels = (torch.arange(order.numel(), dtype=torch.float64) + 0.5) / order.numel()
        target_own[order] = torch.quantile(pool.double(), levels).float()
    rest = q.clone()
    rest.scatter_(1, y_f[:, None], 0.0)
    mass = rest.sum(1, keepdim=True)
    uniform = torch.full_like(rest, 1.0 / max(classes - 1, 1)).scatter_(1, y_f[:, None], 0.0)
    rest = torch.where(mass > 0, rest / mass.clamp_min(1e-30), uniform)
    t = rest * (1 - target_own)[:, None]
    return t.scatter_(1, y_f[:, None], target_own[:, None])

r"""Metrics of a causal language model that has (or should have) forgotten facts (TOFU-like entity
unlearning).

A data set is a set of causal-LM samples (:mod:`dfmu_ext.lm.task`): for a question/answer sequence
the labels are the answer's tokens and ``<eos>``, ``-100`` elsewhere. Notation: for sequence
:math:`n`, :math:`S_n = \{t : y_{n,t+1} \ne -100\}` are its scored positions and
:math:`\ell_n = -\sum_{t \in S_n} \log p_\theta(y_{n,t+1} \mid x_{n,\le t})` its summed next-token loss.

* :func:`answer_correct` / :func:`answer_accuracy`: greedy exact match of the whole answer;
* :func:`answer_probability`: mean over sequences of :math:`e^{-\ell_n}`, the probability of the
  whole answer;
* :func:`perplexity`: :math:`\exp(\sum_n \ell_n / \sum_n |S_n|)`;
* :func:`sequence_losses`: :math:`\ell_n / |S_n|` per sequence;
* :func:`membership_auc`: how well the per-token loss tells members from non-members;
* :func:`relearn_attack`: how much of the forgotten facts a few fine-tuning steps bring back;
* :func:`lm_battery`: all of the above for one model, from one forward pass per data set.

Nothing here changes the model: every forward runs under ``torch.no_grad()`` in eval mode, each
module's train/eval flag restored afterwards (also on error); :func:`relearn_attack` trains a deep
copy. Batches are read in data-set order, so every number is deterministic for a given model.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .._common import eval_mode, model_device, seeded, train_mode
from ..finetune import AdamW
from ..lm.task import IGNORE_INDEX, batches, check_lm_dataset, check_scored, forward_logits, lm_loss, \
    scored_tokens, sequence_nll
from ..model_io import copy_model
from .metrics import Metric

__all__ = ["answer_correct", "answer_accuracy", "answer_probability", "perplexity", "sequence_losses",
           "membership_auc", "auc_from_scores", "relearn_attack", "lm_battery", "LM_BATTERY", "LM_BATTERY_KEYS",
           "RELEARN_LR", "RELEARN_STEPS"]

#: The entries of :func:`lm_battery`'s result, in report order (accuracies and probabilities shown in %).
LM_BATTERY = (Metric("forget_acc", "forget acc", label="forget-fact accuracy"),
              Metric("forget_para_acc", "para acc", label="paraphrased forget accuracy"),
              Metric("forget_prob", "forget prob"),
              Metric("forget_para_prob", "para prob", table=False),
              Metric("retain_acc", "retain acc", label="retain-fact accuracy"),
              Metric("retain_para_acc", "retain para acc", table=False),
              Metric("perplexity", "ppl", scale=1.0, fmt=".2f", label="filler perplexity"),
              Metric("mia_auc", "MIA AUC", scale=1.0, fmt=".3f", label="membership AUC"),
              Metric("relearn_acc", "relearn acc", label="after relearning attack"))
LM_BATTERY_KEYS = tuple(m.key for m in LM_BATTERY)

#: :func:`relearn_attack`'s defaults (see its docstring for how they were chosen).
RELEARN_STEPS = 10
RELEARN_LR = 3e-4

_EVAL_BATCH = 32


# --------------------------------------------------------------------------------------------
# one pass over a data set
# --------------------------------------------------------------------------------------------

def answer_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(N,)`` bool: whether every scored token of each sequence is the argmax of the logits before it.

    This is greedy exact match computed with teacher forcing, and it equals greedy decoding of the
    answer from the prompt: a greedy decode that is right so far has produced exactly the gold
    prefix, so at every step it sees the same context as teacher forcing does, and it produces the
    whole answer iff each teacher-forced argmax equals the gold token (ties go to the lowest token
    id, as ``torch.argmax``). A sequence with no scored token counts as not correct.
    """
    if logits.shape[:2] != labels.shape:
        raise ValueError(f"logits {tuple(logits.shape)} do not fit labels {tuple(labels.shape)}")
    target = labels[:, 1:].to(logits.device)
    scored = target != IGNORE_INDEX
    hit = logits[:, :-1].argmax(-1) == target
    return ((hit | ~scored).all(1) & scored.any(1)).cpu()


@dataclass
class _Pass:
    """Per-sequence statistics of one data set under one model (CPU tensors)."""

    correct: torch.Tensor  # (N,) bool, greedy exact match
    nll: torch.Tensor      # (N,) float64, summed answer NLL (l_n)
    tokens: torch.Tensor   # (N,) int64, scored tokens (|S_n|)


def _check_batch_size(batch_size: int) -> int:
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return int(batch_size)


@torch.no_grad()
def _one_pass(model: nn.Module, dataset, what: str, batch_size: int = _EVAL_BATCH, *,
              every_sequence_scored: bool = True) -> _Pass:
    """One eval-mode forward over ``dataset`` in order. One-line ValueError for an empty set, a
    set with no scored token, or (``every_sequence_scored``) a sequence with none."""
    dataset = check_lm_dataset(dataset, what)
    batch_size = _check_batch_size(batch_size)
    device = model_device(model)
    correct, nll, tokens = [], [], []
    with eval_mode(model):
        for x, y in batches(dataset, batch_size, device=device):
            if every_sequence_scored:
                check_scored(y, what)
            logits = forward_logits(model, x)
            correct.append(answer_correct(logits, y))
            nll.append(sequence_nll(logits, y).double().cpu())
            tokens.append(scored_tokens(y).cpu())
    out = _Pass(torch.cat(correct), torch.cat(nll), torch.cat(tokens))
    if int(out.tokens.sum()) == 0:
        raise ValueError(f"{what}: no token is scored in the whole set (every label is -100)")
    return out


# --------------------------------------------------------------------------------------------
# the metrics
# --------------------------------------------------------------------------------------------

def answer_accuracy(model: nn.Module, qa_set, batch_size: int = _EVAL_BATCH) -> float:
    """Fraction of ``qa_set``'s sequences whose whole answer greedy decoding reproduces exactly
    (:func:`answer_correct`)."""
    return float(_one_pass(model, qa_set, "qa_set", batch_size).correct.double().mean())


def answer_probability(model: nn.Module, qa_set, batch_size: int = _EVAL_BATCH) -> float:
    r"""Mean over sequences of :math:`e^{-\ell_n}`: the model's probability of the whole answer
    (the product of its tokens' probabilities given the prompt and the gold prefix)."""
    return float(torch.exp(-_one_pass(model, qa_set, "qa_set", batch_size).nll).mean())


def perplexity(model: nn.Module, text_set, batch_size: int = _EVAL_BATCH) -> float:
    r""":math:`\exp(\sum_n \ell_n / \sum_n |S_n|)`: the exponential of the mean NLL per scored token
    over the whole set (token-weighted; sequences without a scored token add nothing)."""
    p = _one_pass(model, text_set, "text_set", batch_size, every_sequence_scored=False)
    return float(math.exp(float(p.nll.sum()) / int(p.tokens.sum())))


def sequence_losses(model: nn.Module, dataset, batch_size: int = _EVAL_BATCH) -> torch.Tensor:
    r"""``(N,)`` float64: each sequence's mean NLL per scored token, :math:`\ell_n / |S_n|`."""
    p = _one_pass(model, dataset, "dataset", batch_size)
    return p.nll / p.tokens.double()


def auc_from_scores(positives: torch.Tensor, negatives: torch.Tensor) -> float:
    r"""ROC AUC of scores where higher means "positive": the Mann–Whitney statistic
    :math:`(R_+ - n_+(n_+ + 1)/2) / (n_+ n_-)`, :math:`R_+` the sum of the positives' ranks among all
    scores (ascending, ties given their average rank), i.e. :math:`P(s_+ > s_-) + \tfrac12 P(s_+ = s_-)`."""
    pos = torch.as_tensor(positives, dtype=torch.float64).reshape(-1)
    neg = torch.as_tensor(negatives, dtype=torch.float64).reshape(-1)
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError(f"the AUC needs positives and negatives, got {pos.numel()} and {neg.numel()}")
    if not (torch.isfinite(pos).all() and torch.isfinite(neg).all()):
        raise ValueError("the AUC's scores must be finite")
    scores = torch.cat([pos, neg])
    values, inverse, counts = torch.unique(scores, sorted=True, return_inverse=True, return_counts=True)
    # the tied group g occupies ranks (c_{<g} + 1) .. c_{<=g}; its average rank is their midpoint
    ends = torch.cumsum(counts, 0).double()
    avg_rank = ends - (counts.double() - 1) / 2
    r_pos = float(avg_rank[inverse[:pos.numel()]].sum())
    n_pos, n_neg = pos.numel(), neg.numel()
    return (r_pos - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def membership_auc(model: nn.Module, members, nonmembers, batch_size: int = _EVAL_BATCH) -> float:
    r"""AUC of the loss attack: score :math:`-\ell_n/|S_n|` (a low per-token loss = "member"),
    ``members`` the positives, ``nonmembers`` the negatives (:func:`auc_from_scores`, ties counted
    half). 1.0: members are perfectly recognisable; 0.5: chance; for forgotten facts, the value of
    a model that never saw them is the reference."""
    m = -sequence_losses(model, members, batch_size)
    n = -sequence_losses(model, nonmembers, batch_size)
    return auc_from_scores(m, n)


def relearn_attack(model: nn.Module, train_facts, eval_facts, steps: int = RELEARN_STEPS, lr: float = RELEARN_LR,
                   batch_size: int = _EVAL_BATCH, seed: int = 0, parameters=None) -> float:
    r"""Few-shot relearning: answer accuracy on ``eval_facts`` after ``steps`` fine-tuning steps on
    ``train_facts``, run on a deep copy (``model`` is not touched).

    ``train_facts``: a few forget Q/A pairs; ``eval_facts``: *other* forget facts, so the number
    measures what comes back rather than what was just trained. Each step is one full-batch AdamW
    step (no weight decay, betas (0.9, 0.999)) on the mean per-token NLL of all of ``train_facts``
    (gradients accumulated over chunks of ``batch_size``), with the copy in train mode, under
    ``seed``.

    Defaults: 10 steps at lr 3e-4 (0.3x the from-scratch training lr of our models, ~1e-3), chosen
    on the synthetic ``people`` corpus (plain 4-layer model of width 128 trained 40 epochs at 1e-3,
    5% of 200 people forgotten; train on half of the forget people's Q/A, evaluate on the other
    half): the original keeps 1.00 of the evaluated facts, Retrain (never saw them) gets 0.06, about
    chance. At lr 1e-3 the attack itself damages what it should reveal (original 0.84; on a smaller
    2-layer model 0.31); at 1e-4 it brings back less of what a partial unlearning only suppressed
    (2-layer model, NPO at lr 2e-4: 0.18 before, 0.37 after at 1e-4, 0.60 at 3e-4, Retrain 0.13-0.17).

    ``parameters``: None, the attack trains every parameter; a name piece or a list of them, it trains
    only the parameters whose name (``model.named_parameters()``) contains one, the rest stay where
    they are. Which group brings the facts back tells where an unlearning left the route to them open
    (``("attn",)``, ``("mlp",)``, the embeddings; benchmarks/RESULTS.md). A list no name matches is
    an error.
    """
    train_facts = check_lm_dataset(train_facts, "train_facts")
    steps, batch_size = int(steps), _check_batch_size(batch_size)
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    check_lm_dataset(eval_facts, "eval_facts")
    pieces = _name_pieces(model, parameters)
    device = model_device(model)
    attacker = copy_model(model)
    params = [p for name, p in attacker.named_parameters() if pieces is None or any(k in name for k in pieces)]
    for p in attacker.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = AdamW(params, lr=lr, weight_decay=0.0)
    chunks = list(batches(train_facts, batch_size, device=device))
    total = sum(int(scored_tokens(y).sum()) for _, y in chunks)
    if total == 0:
        raise ValueError("train_facts: no token is scored in the whole set (every label is -100)")
    with seeded(seed, device), train_mode(attacker):
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            for x, y in chunks:
                (lm_loss(forward_logits(attacker, x), y, reduction="sum") / total).backward()
            opt.step()
    acc = answer_accuracy(attacker, eval_facts, batch_size)
    del attacker, opt
    return acc


def _name_pieces(model: nn.Module, parameters) -> tuple[str, ...] | None:
    """:func:`relearn_attack`'s ``parameters`` as a tuple of non-empty name pieces (None: every
    parameter), checked against ``model``'s parameter names."""
    if parameters is None:
        return None
    pieces = (parameters,) if isinstance(parameters, str) else tuple(parameters)
    if not pieces or not all(isinstance(k, str) and k for k in pieces):
        raise ValueError(f"parameters must be None or non-empty name pieces, got {parameters!r}")
    if not any(any(k in name for k in pieces) for name, _ in model.named_parameters()):
        raise ValueError(f"parameters: no parameter name of the model contains any of {list(pieces)}")
    return pieces


def lm_battery(model: nn.Module, *, forget_qa, forget_para, retain_qa, retain_para=None, filler_test,
               nonmember_qa, relearn=None, batch_size: int = _EVAL_BATCH, relearn_steps: int = RELEARN_STEPS,
               relearn_lr: float = RELEARN_LR, seed: int = 0) -> dict[str, float]:
    """Every LM metric of ``model``, one forward pass per data set (plus the relearning attack).

    Returns :data:`LM_BATTERY_KEYS`: ``forget_acc`` / ``forget_prob`` (answer accuracy and
    probability on the forget Q/A), ``forget_para_acc`` / ``forget_para_prob`` (the same on
    paraphrased forget questions), ``retain_acc`` and ``retain_para_acc`` (NaN when ``retain_para``
    is None), ``perplexity`` on ``filler_test`` (held-out text), ``mia_auc`` (:func:`membership_auc`
    of ``forget_qa`` against ``nonmember_qa``), ``relearn_acc`` (:func:`relearn_attack` with
    ``relearn = (train_facts, eval_facts)``; NaN when ``relearn`` is None).
    """
    forget = _one_pass(model, forget_qa, "forget_qa", batch_size)
    para = _one_pass(model, forget_para, "forget_para", batch_size)
    retain = _one_pass(model, retain_qa, "retain_qa", batch_size)
    filler = _one_pass(model, filler_test, "filler_test", batch_size, every_sequence_scored=False)
    nonmember = _one_pass(model, nonmember_qa, "nonmember_qa", batch_size)
    out = {
        "forget_acc": float(forget.correct.double().mean()),
        "forget_para_acc": float(para.correct.double().mean()),
        "forget_prob": float(torch.exp(-forget.nll).mean()),
        "forget_para_prob": float(torch.exp(-para.nll).mean()),
        "retain_acc": float(retain.correct.double().mean()),
        "retain_para_acc": math.nan,
        "perplexity": float(math.exp(float(filler.nll.sum()) / int(filler.tokens.sum()))),
        "mia_auc": auc_from_scores(-forget.nll / forget.tokens, -nonmember.nll / nonmember.tokens),
        "relearn_acc": math.nan,
    }
    if retain_para is not None:
        out["retain_para_acc"] = float(_one_pass(model, retain_para, "retain_para", batch_size).correct.double().mean())
    if relearn is not None:
        if not isinstance(relearn, (tuple, list)) or len(relearn) != 2:
            raise ValueError("relearn must be (train_facts, eval_facts) or None")
        out["relearn_acc"] = relearn_attack(model, relearn[0], relearn[1], steps=relearn_steps, lr=relearn_lr,
                                            batch_size=batch_size, seed=seed)
    return {k: out[k] for k in LM_BATTERY_KEYS}

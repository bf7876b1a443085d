r"""The field's LM-unlearning metrics, by their published definitions, named as OpenUnlearning names
them (TOFU: Maini et al. 2024; MUSE: Shi et al. 2024; OpenUnlearning: Dorna et al. 2025).

Inputs are token ids: causal-LM samples (:mod:`dfmu_ext.lm.task`: ``{"input_ids", "attention_mask",
"labels"}``, ``-100`` on the prompt) or :class:`QAItem` (a question's ids, its answer's, and TOFU's
paraphrased and perturbed answers). For a sample with scored tokens :math:`y_1..y_n` (the answer)
after the prompt :math:`q`, :math:`\bar\ell = -\frac1n\sum_i \log p_\theta(y_i \mid q, y_{<i})` is its
mean next-token loss, and

* :func:`probability`: :math:`P = e^{-\bar\ell}` per sample (TOFU's length-normalised
  :math:`P(a \mid q)^{1/|a|}`); :func:`probability_w_options`: TOFU's normalisation on the Real Authors
  and World Facts sets, :math:`P_{\rm correct} / (P_{\rm correct} + \sum_j P_{{\rm wrong},j})`;
* :func:`truth_ratios`: per question
  :math:`R = \big(\prod_j P(\tilde a_j)\big)^{1/m} / \bar P(\hat a)`, the geometric mean of the
  :math:`m` perturbed answers' :math:`P` over the paraphrased answer's (the gold answer's when there
  is no paraphrase; several paraphrases: their geometric mean), computed as
  :math:`R = \exp(\mathrm{mean}\,\bar\ell_{\hat a} - \mathrm{mean}_j\,\bar\ell_{\tilde a_j})`;
  :func:`truth_ratio` aggregates: ``"closer_to_1_better"`` :math:`\mathrm{mean}\min(R, 1/R)` (forget
  sets), ``"true_better"`` :math:`\mathrm{mean}\max(0, 1 - R)` (the others);
* :func:`forget_quality`: the p-value of the two-sample Kolmogorov–Smirnov test between the forget
  set's truth ratios under the unlearned model and under Retrain (OpenUnlearning tests :math:`1/R`;
  the KS statistic is invariant under a strictly monotone map of both samples, so it is the same);
* :func:`rouge_l_recall`: ROUGE-L recall (the ``rouge-score`` package, stemmed) of the greedy
  continuation of the question against the gold answer: LCS / gold length;
* :func:`model_utility`: the harmonic mean of (probability, ROUGE-L recall, ``true_better`` truth
  ratio) over the sets given (TOFU: retain, real authors, world facts: 9 numbers);
* :func:`min_k_plus_plus` (Zhang et al. 2024): per token
  :math:`z_i = (\log p(y_i) - \mu_i)/\sigma_i`, :math:`\mu_i = \mathbb E_{v\sim p}\log p(v)`,
  :math:`\sigma_i^2 = \mathbb E_{v\sim p}(\log p(v))^2 - \mu_i^2`; the score is the mean of the lowest
  :math:`\max(1, \lfloor kn\rfloor)` of them (higher = more member-like); :func:`mia_auc` its ROC AUC
  with the forget set as members against a holdout set; :func:`privleak` (MUSE)
  :math:`(\mathrm{AUC} - \mathrm{AUC}_{\rm Retrain}) / \mathrm{AUC}_{\rm Retrain} \cdot 100`;
* :func:`extraction_strength` (Carlini et al. 2021 as OpenUnlearning defines it):
  :math:`1 - k^*/n`, :math:`k^*` the smallest :math:`k \in \{0..n\}` such that greedy decoding after
  :math:`(q, y_{<k})` reproduces :math:`y_{\ge k}` exactly — with teacher forcing every position's argmax
  is then the gold token, so :math:`n - k^*` is the longest correctly predicted suffix. (OpenUnlearning's
  loop stops at :math:`k = n-1`, giving :math:`1/n` where nothing is extracted; here that is 0.)
* :func:`exact_memorization`: the fraction of scored tokens whose teacher-forced argmax is the gold token.

Per-sample functions return float64 arrays (the reported value is their mean). Nothing changes the
model: forwards run under ``torch.no_grad()`` in eval mode, its train/eval flags restored.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._common import eval_mode, model_device
from ..lm.task import IGNORE_INDEX, collate, forward_logits
from ..model_io import Inputs
from .lm import auc_from_scores
from .metrics import Metric

__all__ = ["QAItem", "probability", "probability_w_options", "truth_ratios", "truth_ratio", "forget_quality",
           "greedy_generate", "rouge_l_recall", "hm_aggregate", "model_utility", "min_k_plus_plus", "mia_auc",
           "privleak", "extraction_strength", "exact_memorization", "TRUTH_RATIO_AGGREGATORS", "FORGET_QUALITY",
           "MODEL_UTILITY"]

TRUTH_RATIO_AGGREGATORS = ("closer_to_1_better", "true_better")
#: How tables and plots show :func:`forget_quality` (a p-value: 1 = indistinguishable from Retrain) and
#: :func:`model_utility`'s ``model_utility`` (declared once, read by the comparisons).
FORGET_QUALITY = Metric("forget_quality", "forget quality", scale=1.0, fmt=".3g",
                        label="forget quality (KS p-value vs Retrain)")
MODEL_UTILITY = Metric("model_utility", "model utility", scale=1.0, fmt=".3f")

_BATCH = 16


def _ids(x, what: str) -> tuple[int, ...]:
    t = torch.as_tensor(x).reshape(-1)
    if t.numel() and t.is_floating_point():
        raise ValueError(f"{what}: token ids must be integers, got {t.dtype}")
    return tuple(int(i) for i in t)


@dataclass(frozen=True)
class QAItem:
    """One question in token ids: ``question`` (the whole prompt, chat template included: never
    scored), the gold ``answer``, TOFU's ``paraphrased`` answers and ``perturbed`` (wrong) answers."""
    question: tuple[int, ...]
    answer: tuple[int, ...]
    paraphrased: tuple[tuple[int, ...], ...] = ()
    perturbed: tuple[tuple[int, ...], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "question", _ids(self.question, "question"))
        object.__setattr__(self, "answer", _ids(self.answer, "answer"))
        object.__setattr__(self, "paraphrased", tuple(_ids(a, "paraphrased") for a in self.paraphrased))
        object.__setattr__(self, "perturbed", tuple(_ids(a, "perturbed") for a in self.perturbed))
        if not self.question or not self.answer or any(not a for a in self.paraphrased + self.perturbed):
            raise ValueError("a QAItem needs a non-empty question and non-empty answers")

    def sample(self, answer: Sequence[int] | None = None) -> dict:
        """The causal-LM sample ``question + answer`` (the gold one by default), the answer scored."""
        answer = self.answer if answer is None else _ids(answer, "answer")
        ids = torch.tensor(self.question + tuple(answer), dtype=torch.long)
        labels = ids.clone()
        labels[:len(self.question)] = IGNORE_INDEX
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    @staticmethod
    def split(sample: Mapping) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """``(question, answer)`` of a causal-LM sample: the tokens before its first scored label, and
        the tokens from there to its last scored label (padding after it dropped)."""
        ids, labels = torch.as_tensor(sample["input_ids"]).reshape(-1), torch.as_tensor(sample["labels"]).reshape(-1)
        scored = (labels != IGNORE_INDEX).nonzero().reshape(-1)
        if scored.numel() == 0 or int(scored[0]) == 0:
            raise ValueError("a question/answer sample needs a prompt (labels -100) followed by scored answer tokens")
        return _ids(ids[:int(scored[0])], "question"), _ids(ids[int(scored[0]):int(scored[-1]) + 1], "answer")

    @classmethod
    def from_samples(cls, sample: Mapping, paraphrased: Sequence[Mapping] = (),
                     perturbed: Sequence[Mapping] = ()) -> "QAItem":
        """An item from causal-LM samples of one question (a TOFU loader's rows): every sample must
        have the same prompt."""
        question, answer = cls.split(sample)
        alternatives = []
        for group in (paraphrased, perturbed):
            answers = []
            for s in group:
                q, a = cls.split(s)
                if q != question:
                    raise ValueError("the paraphrased/perturbed samples must share the gold sample's prompt")
                answers.append(a)
            alternatives.append(tuple(answers))
        return cls(question, answer, *alternatives)


def _as_samples(data) -> list[Mapping]:
    return [d.sample() if isinstance(d, QAItem) else d for d in data]


def _per_sample(model: nn.Module, data, fn, batch_size: int = _BATCH) -> np.ndarray:
    """``fn(logits (n, V), targets (n,)) -> float`` for each sample: the logits that predict its
    ``n`` scored tokens, in data order."""
    samples = _as_samples(data)
    if not samples:
        raise ValueError("no samples to evaluate")
    device, out = model_device(model), []
    with torch.no_grad(), eval_mode(model):
        for start in range(0, len(samples), batch_size):
            inputs, labels = collate(samples[start:start + batch_size])
            logits = forward_logits(model, inputs.to(device))
            targets = labels[:, 1:].to(logits.device)
            for j, (lg, y) in enumerate(zip(logits[:, :-1], targets)):
                keep = y != IGNORE_INDEX
                if not bool(keep.any()):
                    raise ValueError(f"sample {start + j}: no scored token")
                lg = lg[keep]
                out.append(float(fn(lg.float() if lg.dtype in (torch.float16, torch.bfloat16) else lg, y[keep])))
    return np.asarray(out, dtype=np.float64)


def _mean_nll(model, data, batch_size=_BATCH) -> np.ndarray:
    return _per_sample(model, data, lambda lg, y: F.cross_entropy(lg, y), batch_size)


def probability(model: nn.Module, data, batch_size: int = _BATCH) -> np.ndarray:
    """Per sample :math:`e^{-\\bar\\ell}`, the length-normalised probability of its scored tokens."""
    return np.exp(-_mean_nll(model, data, batch_size))


def probability_w_options(correct, wrong) -> np.ndarray:
    """Per question :math:`P_c / (P_c + \\sum_j P_{w,j})` from ``correct`` (N,) and ``wrong`` (N, M)
    length-normalised probabilities (TOFU's Real Authors / World Facts probability)."""
    c, w = np.asarray(correct, dtype=np.float64), np.asarray(wrong, dtype=np.float64)
    if w.ndim != 2 or w.shape[0] != c.shape[0] or c.ndim != 1:
        raise ValueError(f"correct must be (N,) and wrong (N, M), got {c.shape} and {w.shape}")
    return c / (c + w.sum(1))


def _grouped_nll(model, items: Sequence[QAItem], which: str, batch_size: int) -> list[np.ndarray]:
    """Each item's mean losses of its ``which`` answers (paraphrased falls back to the gold answer)."""
    groups = []
    for it in items:
        answers = getattr(it, which) or ((it.answer,) if which == "paraphrased" else ())
        if not answers:
            raise ValueError("every QAItem needs perturbed answers for a truth ratio")
        groups.append([it.sample(a) for a in answers])
    flat = _mean_nll(model, [s for g in groups for s in g], batch_size)
    bounds = np.cumsum([0] + [len(g) for g in groups])
    return [flat[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def truth_ratios(model: nn.Module, items: Sequence[QAItem], batch_size: int = _BATCH) -> np.ndarray:
    """Per question :math:`R = \\exp(\\mathrm{mean}\\,\\bar\\ell_{\\rm para} - \\mathrm{mean}\\,\\bar\\ell_{\\rm pert})`
    (perturbed over paraphrased answers' geometric-mean probabilities)."""
    items = list(items)
    if not items:
        raise ValueError("no questions to evaluate")
    para = _grouped_nll(model, items, "paraphrased", batch_size)
    pert = _grouped_nll(model, items, "perturbed", batch_size)
    return np.exp(np.array([p.mean() - w.mean() for p, w in zip(para, pert)], dtype=np.float64))


def truth_ratio(ratios, aggregator: str = "closer_to_1_better") -> float:
    """OpenUnlearning's aggregates: ``closer_to_1_better`` :math:`\\mathrm{mean}\\min(R, 1/R)`,
    ``true_better`` :math:`\\mathrm{mean}\\max(0, 1 - R)`."""
    r = np.asarray(ratios, dtype=np.float64)
    if r.size == 0 or not np.all(r > 0):
        raise ValueError("truth ratios must be a non-empty array of positive numbers")
    if aggregator == "closer_to_1_better":
        return float(np.mean(np.minimum(r, 1.0 / r)))
    if aggregator == "true_better":
        return float(np.mean(np.maximum(0.0, 1.0 - r)))
    raise ValueError(f"aggregator must be one of {', '.join(TRUTH_RATIO_AGGREGATORS)}, got {aggregator!r}")


def forget_quality(ratios, retrain_ratios) -> float:
    """KS-test p-value between the forget set's truth ratios and Retrain's (1: indistinguishable)."""
    from scipy.stats import ks_2samp  # scipy comes with scikit-learn

    a, b = np.asarray(ratios, dtype=np.float64), np.asarray(retrain_ratios, dtype=np.float64)
    if a.size == 0 or b.size == 0:
        raise ValueError("forget quality needs truth ratios of both models")
    return float(ks_2samp(a, b).pvalue)


def greedy_generate(model: nn.Module, prompts: Sequence[Sequence[int]], max_new_tokens: int | Sequence[int],
                    eos_token_id: int | None = None, batch_size: int = _BATCH) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (token ids) from full forwards (no ``.generate`` or cache
    needed: any causal LM returning (N, T, V) logits). Prompts of equal length are batched without
    padding; each continuation stops after ``eos_token_id`` (not included) or its ``max_new_tokens``."""
    prompts = [list(_ids(p, "prompt")) for p in prompts]
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts) or any(b < 0 for b in budgets) or any(not p for p in prompts):
        raise ValueError("give a non-empty prompt and a max_new_tokens >= 0 for every prompt")
    out: list[list[int]] = [[] for _ in prompts]
    device = model_device(model)
    by_length: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        by_length.setdefault(len(p), []).append(i)
    with torch.no_grad(), eval_mode(model):
        for group in by_length.values():
            for start in range(0, len(group), batch_size):
                rows = group[start:start + batch_size]
                ids = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=device)
                done = torch.zeros(len(rows), dtype=torch.bool, device=device)
                for _ in range(max(budgets[i] for i in rows)):
                    logits = forward_logits(model, Inputs(input_ids=ids, attention_mask=torch.ones_like(ids)))
                    nxt = logits[:, -1].argmax(-1)
                    ids = torch.cat([ids, nxt[:, None]], 1)
                    if eos_token_id is not None:
                        done |= nxt == eos_token_id
                    if bool(done.all()):
                        break
                for r, i in enumerate(rows):
                    gen = ids[r, len(prompts[i]):].tolist()[:budgets[i]]
                    out[i] = gen[:gen.index(eos_token_id)] if eos_token_id in gen else gen
    return out


def _text(ids: Sequence[int], tokenizer, eos_token_id: int | None) -> str:
    if tokenizer is not None:
        return tokenizer.decode(list(ids), skip_special_tokens=True)
    # no tokenizer: the ids as words ("13 7 2"), which rouge-score's tokenizer keeps as tokens
    return " ".join(str(i) for i in ids if i != eos_token_id)


def _rouge_scorer():
    try:
        from rouge_score import rouge_scorer
    except ImportError:
        raise ImportError("ROUGE-L needs the rouge-score package: pip install rouge-score") from None
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l_recall(model: nn.Module, items: Sequence[QAItem], tokenizer=None, *, max_new_tokens: int | None = None,
                   eos_token_id: int | None = None, batch_size: int = _BATCH) -> np.ndarray:
    """Per question the ROUGE-L recall of the greedy answer against the gold answer, both decoded
    with ``tokenizer`` (or written as token-id words without one). ``max_new_tokens`` defaults to each
    gold answer's length (OpenUnlearning generates up to 200 tokens, stopping at EOS); ``eos_token_id``
    defaults to the tokenizer's."""
    items = list(items)
    if not items:
        raise ValueError("no questions to evaluate")
    scorer = _rouge_scorer()
    if eos_token_id is None and tokenizer is not None:
        eos_token_id = getattr(tokenizer, "eos_token_id", None)
    budgets = [len(it.answer) if max_new_tokens is None else max_new_tokens for it in items]
    gens = greedy_generate(model, [it.question for it in items], budgets, eos_token_id, batch_size)
    return np.array([scorer.score(_text(it.answer, tokenizer, eos_token_id),
                                  _text(g, tokenizer, eos_token_id))["rougeL"].recall
                     for it, g in zip(items, gens)], dtype=np.float64)


def hm_aggregate(values) -> float:
    """The harmonic mean :math:`n / \\sum_i 1/v_i` (0 when any value is 0)."""
    v = np.asarray(list(values.values()) if isinstance(values, Mapping) else values, dtype=np.float64)
    if v.size == 0 or np.any(v < 0):
        raise ValueError("the harmonic mean needs non-negative values")
    return 0.0 if np.any(v == 0) else float(v.size / np.sum(1.0 / v))


def model_utility(model: nn.Module, sets: Mapping[str, Sequence[QAItem]], tokenizer=None, *,
                  normalised: Sequence[str] = ("real_authors", "world_facts"), max_new_tokens: int | None = None,
                  eos_token_id: int | None = None, batch_size: int = _BATCH) -> dict[str, float]:
    """TOFU's model utility over the sets given (TOFU: ``retain``, ``real_authors``,
    ``world_facts``): per set ``<name>_Q_A_Prob`` (``..._Prob_normalised`` with options, for the sets
    in ``normalised``, their perturbed answers the wrong options), ``<name>_Q_A_ROUGE`` and
    ``<name>_Truth_Ratio`` (``true_better``), and ``model_utility``, the harmonic mean of them all."""
    if not sets:
        raise ValueError("model utility needs at least one set of questions")
    out: dict[str, float] = {}
    for name, items in sets.items():
        items = list(items)
        if name in normalised:
            wrong = [[it.sample(a) for a in it.perturbed] for it in items]
            if any(not w for w in wrong) or len({len(w) for w in wrong}) != 1:
                raise ValueError(f"{name}: normalised probability needs the same number of perturbed answers per item")
            correct = probability(model, items, batch_size)
            flat = probability(model, [s for w in wrong for s in w], batch_size).reshape(len(items), -1)
            out[f"{name}_Q_A_Prob_normalised"] = float(np.mean(probability_w_options(correct, flat)))
        else:
            out[f"{name}_Q_A_Prob"] = float(np.mean(probability(model, items, batch_size)))
        out[f"{name}_Q_A_ROUGE"] = float(np.mean(rouge_l_recall(
            model, items, tokenizer, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id, batch_size=batch_size)))
        out[f"{name}_Truth_Ratio"] = truth_ratio(truth_ratios(model, items, batch_size), "true_better")
    out["model_utility"] = hm_aggregate(out)
    return out


def _min_k_pp_score(k: float):
    def score(lg: torch.Tensor, y: torch.Tensor) -> float:
        logp = torch.log_softmax(lg.double(), -1)
        p = logp.exp()
        mu = (p * logp).sum(-1)
        var = ((p * logp * logp).sum(-1) - mu * mu).clamp_min(1e-12)  # 0 for a uniform p, where z = 0
        z = (logp.gather(-1, y[:, None])[:, 0] - mu) / var.sqrt()
        return float(torch.sort(z).values[:max(1, int(z.numel() * k))].mean())
    return score


def min_k_plus_plus(model: nn.Module, data, k: float = 0.4, batch_size: int = _BATCH) -> np.ndarray:
    """Per sample the Min-K%++ score over its scored tokens (higher = more member-like; OpenUnlearning's
    ``k`` is 0.4)."""
    if not 0 < k <= 1:
        raise ValueError(f"k must be in (0, 1], got {k}")
    return _per_sample(model, data, _min_k_pp_score(k), batch_size)


def mia_auc(forget_scores, holdout_scores) -> float:
    """ROC AUC of member scores: the forget set the members, the holdout set the non-members
    (:math:`P(s_f > s_h) + \\frac12 P(s_f = s_h)`)."""
    return auc_from_scores(torch.as_tensor(np.asarray(forget_scores, dtype=np.float64)),
                           torch.as_tensor(np.asarray(holdout_scores, dtype=np.float64)))


def privleak(auc: float, retrain_auc: float) -> float:
    """MUSE's PrivLeak :math:`(\\mathrm{AUC} - \\mathrm{AUC}_{\\rm Retrain}) / \\mathrm{AUC}_{\\rm Retrain} \\cdot 100`
    (0: as private as Retrain; > 0: the forget set still looks like training data)."""
    if not retrain_auc > 0 or not math.isfinite(auc):
        raise ValueError(f"privleak needs a finite AUC and a positive Retrain AUC, got {auc} and {retrain_auc}")
    return (auc - retrain_auc) / retrain_auc * 100.0


def _extraction(lg: torch.Tensor, y: torch.Tensor) -> float:
    hit = (lg.argmax(-1) == y).long()
    suffix = int(torch.cumprod(hit.flip(0), 0).sum())  # the longest correctly predicted suffix
    return suffix / y.numel()


def extraction_strength(model: nn.Module, data, batch_size: int = _BATCH) -> np.ndarray:
    """Per sample :math:`1 - k^*/n` (the module's docstring)."""
    return _per_sample(model, data, _extraction, batch_size)


def exact_memorization(model: nn.Module, data, batch_size: int = _BATCH) -> np.ndarray:
    """Per sample the fraction of scored tokens whose teacher-forced argmax is the gold token."""
    return _per_sample(model, data, lambda lg, y: (lg.argmax(-1) == y).double().mean(), batch_size)

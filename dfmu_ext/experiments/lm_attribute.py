r"""Attribute unlearning in a causal LM, on the generated ``people`` corpus: forget one attribute
(say the birth year) of **every** person, keep their other attributes.

Per seed :math:`s` (the original's training seed and the methods' seed): the original is the
corpus's cached model (:func:`dfmu_ext.zoo.lm_training.cached_causal_lm`); the forget set is every
statement and trained question about the attribute (:func:`dfmu_ext.zoo.people_attribute.attribute_forget_indices`,
given to each method as ``forget_indices``); Retrain is the original's recipe and initial seed on
the rest; doing nothing (``Original``) is measured beside it, so the table shows how far apart the
two ends are. Metrics, on every trained person (:func:`measure_attribute`):

* ``attr_acc`` / ``attr_para_acc``: greedy exact-match answer accuracy
  (:func:`dfmu_ext.eval.lm.answer_accuracy`) on the attribute's trained / paraphrased questions;
  ``attr_prob`` the mean probability of the gold answer;
* ``attr_relearn_acc``: a relearning attack (:func:`dfmu_ext.eval.lm.relearn_attack`) — a few steps on
  the attribute's questions of the first half of the people, accuracy on the other half's: a value
  only hidden comes back, one never learnt does not;
* ``other_acc`` / ``other_para_acc``: the same accuracy on the other attributes of the same people;
* ``perplexity`` of the held-out filler;
* ``attr_majority``: the share of people holding the attribute's most frequent value (a model that
  answers one constant value) and ``attr_chance`` :math:`= 1/|V_a|`;
* ``attr_gap`` :math:`= 100\,|{\rm attr\_acc} - {\rm attr\_acc}^{\rm Retrain}|` and ``other_drop``
  :math:`= 100\,({\rm other\_acc}^{\rm Original} - {\rm other\_acc})`, in points, per seed.

Retrain never saw a value of the attribute: its accuracy is at or below the majority line (it may
answer another attribute's value).
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch

from .._io import markdown_table
from ..eval.lm import answer_accuracy, answer_probability, perplexity, relearn_attack
from ..eval.metrics import Metric
from ..training.causal_lm import LMTrainConfig
from ..zoo.lm_training import cached_causal_lm
from ..zoo.people import ATTRIBUTES, PeopleConfig, PeopleCorpus, make_people_corpus
from ..zoo.people_attribute import attribute_forget_indices, attribute_majority, attribute_qa, check_attribute
from .lm import retrain_lm
from .runner import Call, column_stats, reference_pairs, run_seeds

__all__ = ["DEFAULT_ATTRIBUTE", "LM_ATTRIBUTE_METRICS", "AttributeScenario", "make_attribute_scenario",
           "measure_attribute", "run_lm_attribute", "format_lm_attribute_table"]

#: The attribute the benchmark and the demo forget by default.
DEFAULT_ATTRIBUTE = "birth_year"

#: The metrics of one model, declared once (tables read key, header, scale and format here).
LM_ATTRIBUTE_METRICS = (
    Metric("attr_acc", "attr acc", label="attribute: accuracy"),
    Metric("attr_para_acc", "attr para", label="attribute: paraphrased"),
    Metric("attr_prob", "attr prob", label="attribute: answer probability"),
    Metric("attr_relearn_acc", "attr relearn", label="attribute after relearning"),
    Metric("other_acc", "other acc", label="other attributes"),
    Metric("other_para_acc", "other para", label="other attributes: paraphrased"),
    Metric("perplexity", "ppl", scale=1.0, fmt=".2f", label="filler perplexity"),
    Metric("attr_gap", "|attr - Retrain|", scale=1.0, label="forgotten attribute's distance to Retrain (points)"),
    Metric("other_drop", "other drop", scale=1.0, fmt="+.1f", label="other attributes' drop from the original "
                                                                    "(points)"),
    Metric("seconds", "time s", scale=1.0, fmt=".2f"),
)


@dataclass
class AttributeScenario:
    """What forgetting ``attribute`` of every trained person reads: its ``forget_indices`` and the
    evaluation sets (``sets``), with the attribute's ``majority`` and ``chance`` rates."""

    attribute: str
    forget_indices: torch.Tensor
    sets: dict = field(default_factory=dict)
    majority: float = 0.0
    chance: float = 0.0


def make_attribute_scenario(corpus: PeopleCorpus, attribute: str = DEFAULT_ATTRIBUTE) -> AttributeScenario:
    """The forget indices of ``attribute`` and the sets :func:`measure_attribute` reads (every trained person)."""
    check_attribute(corpus, attribute)
    people = list(range(corpus.config.num_people))
    if len(people) < 2:
        raise ValueError("attribute unlearning needs at least 2 trained people (the relearning attack splits them)")
    half = len(people) // 2
    sets = {"attr_qa": attribute_qa(corpus, people, attribute),
            "attr_para": attribute_qa(corpus, people, attribute, paraphrased=True),
            "other_qa": attribute_qa(corpus, people, attribute, other=True) if len(corpus.attributes) > 1 else None,
            "other_para": (attribute_qa(corpus, people, attribute, paraphrased=True, other=True)
                           if len(corpus.attributes) > 1 else None),
            "filler_test": corpus.filler_test if len(corpus.filler_test) else None,
            "relearn": (attribute_qa(corpus, people[:half], attribute), attribute_qa(corpus, people[half:], attribute))}
    return AttributeScenario(attribute, attribute_forget_indices(corpus, attribute), sets,
                             attribute_majority(corpus, people, attribute), 1.0 / len(ATTRIBUTES[attribute].values))


def measure_attribute(model, scenario: AttributeScenario, seed: int = 0) -> dict[str, float]:
    """The per-model metrics of the module docs (``attr_gap`` and ``other_drop`` need the seed's
    Retrain and Original: :func:`run_lm_attribute` adds them)."""
    s = scenario.sets
    nan = float("nan")
    out = {"attr_acc": answer_accuracy(model, s["attr_qa"]), "attr_prob": answer_probability(model, s["attr_qa"]),
           "attr_para_acc": answer_accuracy(model, s["attr_para"])}
    for key, name in (("other_acc", "other_qa"), ("other_para_acc", "other_para")):
        out[key] = nan if s[name] is None else answer_accuracy(model, s[name])
    out["perplexity"] = nan if s["filler_test"] is None else perplexity(model, s["filler_test"])
    # the eval battery's attack (10 AdamW steps at 3e-4, on a copy): what was only hidden comes back
    out["attr_relearn_acc"] = relearn_attack(model, *s["relearn"], seed=seed)
    out.update(attr_majority=scenario.majority, attr_chance=scenario.chance)
    return out


def run_lm_attribute(methods: dict, *, attribute: str = DEFAULT_ATTRIBUTE, seeds=(0,), retain_fraction: float = 0.13,
                     corpus_config: PeopleConfig | None = None, arch: str | None = None, size: dict | None = None,
                     train_config: LMTrainConfig | None = None, retrain: bool = True, device="cpu",
                     progress: bool = False, log=None) -> dict:
    """Original, Retrain (unless ``retrain`` is False) and every method of ``methods`` (name ->
    ``fn(model, train_set, forget_indices=..., retain_fraction=..., seed=..., device=...)`` returning an
    UnlearnResult, e.g. ``baselines.SPECS["DFMU"].fn``) on each seed, each method on a copy of the
    seed's original. Returns ``{"records", "summary" (method -> {metric: (mean, std, n)}), "table",
    "corpus", "config"}``; a failed call keeps its ``error`` in its record and is left out of the summary."""
    log = log or (lambda *_: None)
    corpus_config = corpus_config or PeopleConfig()
    corpus = make_people_corpus(corpus_config)
    scenario = make_attribute_scenario(corpus, attribute)
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise ValueError("no seed to run")
    if not 0.0 < retain_fraction <= 1.0:
        raise ValueError(f"retain_fraction must be in (0, 1], got {retain_fraction}")

    def calls_of(seed: int):
        recipe = None if train_config is None else LMTrainConfig(**{**train_config.to_dict(), "seed": seed})
        original, meta = cached_causal_lm(corpus_config, arch, seed, device, progress=progress, log=log,
                                          train_config=recipe, size=size)
        original.eval()
        yield Call({"method": "Original", "seed": seed},
                   lambda: {"metrics": {**measure_attribute(original, scenario, seed), "seconds": 0.0}},
                   f"seed {seed}: Original", _done)
        if retrain:
            def run_retrain() -> dict:
                model, seconds = retrain_lm(meta, corpus, scenario, device, progress=progress)
                return {"metrics": {**measure_attribute(model, scenario, seed), "seconds": seconds}}

            yield Call({"method": "Retrain", "seed": seed}, run_retrain, f"seed {seed}: Retrain", _done,
                       start=f"seed {seed}: training Retrain without the {scenario.forget_indices.numel()} "
                             f"sequences about {attribute}")
        for name, fn in methods.items():
            def run(fn=fn) -> dict:
                res = fn(copy.deepcopy(original), corpus.train, forget_indices=scenario.forget_indices,
                         retain_fraction=retain_fraction, seed=seed, device=device)
                res.model.eval()
                return {"metrics": {**measure_attribute(res.model, scenario, seed), "seconds": res.timings["total"]},
                        "retain_samples": res.retain_samples_used}

            yield Call({"method": name, "seed": seed}, run, f"seed {seed}: {name}", _done)

    records = run_seeds(seeds, calls_of, log)
    for rec, ref in reference_pairs(records, reference="Retrain"):
        rec["metrics"]["attr_gap"] = 100.0 * abs(rec["metrics"]["attr_acc"] - ref["metrics"]["attr_acc"])
    for rec, ref in reference_pairs(records, reference="Original"):
        rec["metrics"]["other_drop"] = 100.0 * (ref["metrics"]["other_acc"] - rec["metrics"]["other_acc"])
    summary: dict = {}
    for rec in records:
        if "metrics" in rec:
            summary.setdefault(rec["method"], []).append(rec["metrics"])
    summary = {m: column_stats(ms) for m, ms in summary.items()}
    return {"records": records, "summary": summary, "table": format_lm_attribute_table(summary, scenario),
            "failed": [f"{r['method']} (seed {r['seed']}): {r['error']}" for r in records if r.get("error")],
            "corpus": corpus.describe(),
            "config": {"attribute": attribute, "seeds": seeds, "retain_fraction": retain_fraction, "arch": arch,
                       "size": dict(size or {}), "device": str(device),
                       "forget_sequences": int(scenario.forget_indices.numel())}}


def _done(rec: dict) -> str:
    m = rec["metrics"]
    return (f"attr acc {100 * m['attr_acc']:.1f}%, other acc {100 * m['other_acc']:.1f}%, "
            f"{m['seconds']:.2f} s")


def format_lm_attribute_table(summary: dict, scenario: AttributeScenario) -> str:
    """Markdown: one row per method, mean ± std over seeds as each metric declares, and a line naming
    the attribute's majority and chance rates."""
    rows = [[method] + [m.cell(*cells[m.key]) if m.key in cells else "-" for m in LM_ATTRIBUTE_METRICS]
            for method, cells in summary.items()]
    table = markdown_table(["method"] + [m.header for m in LM_ATTRIBUTE_METRICS], rows)
    return (table + f"\n\nforgotten: {scenario.attribute} of every person ({scenario.forget_indices.numel()} "
            f"sequences); majority {100 * scenario.majority:.1f}%, chance {100 * scenario.chance:.1f}%; "
            "accuracies in %, gaps in points")

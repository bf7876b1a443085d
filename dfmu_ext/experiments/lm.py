r"""Entity unlearning in a causal LM, on the generated ``people`` corpus: forget every sequence about
a share of the people, then measure each method beside Retrain (trained without those people) and
doing nothing (the original).

Per seed :math:`s` (the original's training seed, the choice of people and the methods' seed) and
forget share :math:`q`: the original is trained on the corpus (cached), ``round(q * people)``
people are chosen, and every method starts from a fresh copy of the original. Metrics
(:func:`dfmu_ext.eval.lm.lm_battery`): forget-fact greedy accuracy and answer probability on the
trained and the paraphrased questions, retain-fact accuracy, held-out filler perplexity, the
loss-based membership AUC of the forget people's questions against never-trained people's, and a
relearning attack (a few steps on the forget people's first attributes, accuracy on the others).

Beside them, the field's two TOFU numbers (:mod:`dfmu_ext.eval.field`, OpenUnlearning's definitions)
on the people's trained questions in the format the model learned them (:func:`qa_items`: the
question, the value and ``<eos>`` as the answer, :data:`PERTURBED` other values of the same attribute
as the perturbed answers; no paraphrased answer, so the gold one stands in): **forget quality**, the
KS-test p-value of the forget people's truth ratios against the same (seed, share)'s Retrain's (1 for
Retrain itself), and **model utility**, the harmonic mean of the retain people's answer probability,
ROUGE-L recall of the greedy answer and ``true_better`` truth ratio (TOFU also averages in its Real
Authors and World Facts sets, which this corpus has no counterpart of).
"""
from __future__ import annotations

import copy
import random
from dataclasses import dataclass, field

import torch

from .._io import markdown_table, text_table
from ..baselines.scratch import lm_retrain
from ..eval.lm import LM_BATTERY, lm_battery
from ..eval.field import FORGET_QUALITY, MODEL_UTILITY, QAItem, forget_quality, model_utility, truth_ratios
from ..eval.metrics import Metric
from ..lm.task import TokenSequences
from ..training.causal_lm import LMTrainConfig, train_causal_lm
from ..zoo.lm_training import cached_causal_lm
from ..zoo.lm_models import build_causal_lm
from ..zoo.people import ATTRIBUTES, PeopleConfig, PeopleCorpus, make_people_corpus
from .runner import Call, column_stats, gap_to_reference, reference_pairs, run_seeds

#: The forget shares of the issue: 1%, 5% and 10% of the people.
FORGET_SHARES = (0.01, 0.05, 0.10)
#: The rows every table shows: doing nothing and the gold standard first.
REFERENCE_ROWS = ("Original", "Retrain")
#: The metrics whose mean absolute difference from Retrain's is a method's "gap to Retrain".
GAP_KEYS = ("forget_acc", "forget_para_acc", "forget_prob", "retain_acc", "mia_auc")
_GAP_METRICS = tuple(m for m in LM_BATTERY if m.key in GAP_KEYS)
#: A method's gap to Retrain (in points) and its wall time, beside the battery in its metrics.
GAP = Metric("gap", "gap to Retrain", scale=1.0)
SECONDS = Metric("seconds", "time s", scale=1.0, fmt=".2f")
#: The tables' columns: the battery's shown entries, the field's forget quality and model utility, the gap
#: and the time.
COLUMNS = tuple(m for m in LM_BATTERY if m.table) + (FORGET_QUALITY, MODEL_UTILITY, GAP, SECONDS)
#: Wrong answers per question for the truth ratio (TOFU's 5 perturbed answers).
PERTURBED = 5
#: Retain people whose facts are evaluated (a fixed sample: the metric is a mean over facts).
RETAIN_EVAL_PEOPLE = 60


@dataclass
class LMScenario:
    """One forget request on the corpus and the data sets its metrics read."""

    share: float
    seed: int
    people: list[int]
    forget_indices: torch.Tensor
    sets: dict = field(default_factory=dict)
    items: dict = field(default_factory=dict)


def _rows_where(data: TokenSequences, keep: list[bool]) -> TokenSequences:
    return data.subset([i for i, k in enumerate(keep) if k])


def make_scenario(corpus: PeopleCorpus, share: float, seed: int) -> LMScenario:
    """The people to forget (seeded), their training sequences, and the evaluation sets."""
    people = corpus.forget_people(share, seed)
    forget_idx = corpus.indices_of(people)
    gone = set(people)
    gen = torch.Generator().manual_seed(seed + 3)
    others = [p for p in torch.randperm(corpus.config.num_people, generator=gen).tolist() if p not in gone]
    retain_people = sorted(others[:RETAIN_EVAL_PEOPLE])
    forget_qa = corpus.qa(people)
    rows = corpus.qa_rows(people)
    first = set(corpus.attributes[:max(1, len(corpus.attributes) // 2)])
    # The relearning attack trains on the forget people's first attributes and is read on the others.
    relearn = (_rows_where(forget_qa, [a in first for _, a, _ in rows]),
               _rows_where(forget_qa, [a not in first for _, a, _ in rows]))
    sets = {"forget_qa": forget_qa, "forget_para": corpus.qa(people, paraphrased=True),
            "retain_qa": corpus.qa(retain_people), "retain_para": corpus.qa(retain_people, paraphrased=True),
            "filler_test": corpus.filler_test, "nonmember_qa": corpus.holdout_qa(), "relearn": relearn}
    items = {"forget": qa_items(corpus, people, seed), "retain": qa_items(corpus, retain_people, seed + 1)}
    return LMScenario(share, seed, people, forget_idx, sets, items)


def qa_items(corpus: PeopleCorpus, people: list[int], seed: int) -> list[QAItem]:
    """The trained questions of ``people`` (:meth:`~dfmu_ext.zoo.people.PeopleCorpus.qa_rows` order) as
    :class:`~dfmu_ext.eval.field.QAItem`: ``<bos>`` + question, the value + ``<eos>`` as the answer, and
    :data:`PERTURBED` other values of the attribute (a seeded choice per question) as the perturbed answers."""
    tok, rng = corpus.tokenizer, random.Random(seed)
    out = []
    for pid, attr, k in corpus.qa_rows(people):
        value = corpus.facts[pid][attr]
        wrong = rng.sample([v for v in ATTRIBUTES[attr].values if v != value], PERTURBED)
        out.append(QAItem([tok.bos_id] + tok.encode(corpus.question_text(pid, attr, k)),
                          tok.encode(value) + [tok.eos_id], (), [tok.encode(v) + [tok.eos_id] for v in wrong]))
    return out


def field_measures(model, scenario: LMScenario) -> tuple[dict[str, float], list[float]]:
    """``({"model_utility": ...}, the forget questions' truth ratios)`` of ``model`` on ``scenario``;
    forget quality needs Retrain's ratios too (:func:`run_lm_comparison` pairs them)."""
    utility = model_utility(model, {"retain": scenario.items["retain"]})
    return {MODEL_UTILITY.key: utility[MODEL_UTILITY.key]}, truth_ratios(model, scenario.items["forget"]).tolist()


def _measured(model, scenario: LMScenario, seed: int, **extra) -> dict:
    """A record's fields: the battery and model utility (``metrics``, with ``extra``) and the truth ratios."""
    utility, ratios = field_measures(model, scenario)
    return {"metrics": {**measure(model, scenario, seed), **utility, **extra}, "truth_ratios": ratios}


def measure(model, scenario: LMScenario, seed: int = 0) -> dict[str, float]:
    """The battery of ``model`` on ``scenario``."""
    return lm_battery(model, seed=seed, **scenario.sets)


def retrain_lm(meta: dict, corpus: PeopleCorpus, scenario: LMScenario, device, progress: bool = False):
    """The gold standard (:func:`dfmu_ext.baselines.scratch.lm_retrain`): the original's recipe and initial
    seed on every sequence but the forget ones. Returns ``(model, seconds)``."""
    def build():
        return build_causal_lm(meta["arch"], int(meta["vocab_size"]), int(meta["max_len"]), **meta.get("size", {}))

    recipe = LMTrainConfig.from_dict(meta["train_config"])
    res = lm_retrain(build(), corpus.train, forget_indices=scenario.forget_indices, model_factory=build,
                     train_fn=lambda model, data: train_causal_lm(model, data, recipe, device, progress=progress),
                     device=device, seed=int(meta["seed"]))
    return res.model.eval(), res.timings["total"]


def aggregate(runs: list[dict]) -> dict:
    """``{share: {method: {metric: (mean, std, count)}}}`` over seeds
    (:func:`dfmu_ext.experiments.runner.mean_std`)."""
    out: dict = {}
    for run in runs:
        for method, metrics in run["methods"].items():
            out.setdefault(run["share"], {}).setdefault(method, []).append(metrics)
    return {share: {m: column_stats(ms) for m, ms in methods.items()} for share, methods in out.items()}


def format_table(summary: dict) -> str:
    """A plain-text table per forget share: mean ± std over seeds (accuracies in %; the mean alone for one seed)."""
    lines = []
    for share in sorted(summary):
        lines.append(f"forget {share:.0%} of the people")
        rows = [[method] + [_cell(cells, m) for m in COLUMNS] for method, cells in summary[share].items()]
        lines.append(text_table(["method"] + [m.header for m in COLUMNS], rows))
        lines.append("")
    return "\n".join(lines)


def _cell(cells: dict, metric: Metric) -> str:
    """``mean ± std`` of one metric as declared (:class:`dfmu_ext.eval.metrics.Metric`), blank when absent."""
    return metric.cell(*cells[metric.key]) if metric.key in cells else ""


def format_markdown(summary: dict) -> str:
    """The same tables in Markdown, one per forget share."""
    out = []
    for share in sorted(summary):
        rows = [[method] + [_cell(cells, m) for m in COLUMNS] for method, cells in summary[share].items()]
        out += [f"**Forget {share:.0%} of the people**", "",
                markdown_table(["method"] + [m.header for m in COLUMNS], rows), ""]
    return "\n".join(out)


def run_lm_comparison(methods: dict, *, shares=FORGET_SHARES, seeds=(0, 1, 2), retain_fraction: float = 0.13,
                      corpus_config: PeopleConfig | None = None, arch: str | None = None, device="cpu",
                      progress: bool = False, log=None, retrain: bool = True,
                      train_config: LMTrainConfig | None = None, size: dict | None = None) -> dict:
    """Every method of ``methods`` (name -> ``fn(model, train_set, forget_indices=..., retain_fraction=...,
    seed=..., device=...)`` returning an UnlearnResult) on every (seed, share), beside Original and
    Retrain. ``train_config`` overrides the originals' recipe (its seed is each run's), ``size`` the
    model's size (:func:`dfmu_ext.zoo.lm_models.build_causal_lm`). Returns
    ``{"runs": [...], "summary": aggregate(runs), "corpus": ..., "config": ...}`` (each run also holds every
    row's forget truth ratios, from which its forget quality was computed); a method that failed on a
    (seed, share) is left out of its run's ``methods`` and named with its error under the run's ``failed``."""
    log = log or (lambda *_: None)
    corpus_config = corpus_config or PeopleConfig()
    corpus = make_people_corpus(corpus_config)
    settings: dict = {}  # (seed, share) -> the run's own fields

    def calls_of(seed: int):
        """The seed's calls, per forget share: doing nothing, Retrain, then every method on a copy of the original."""
        recipe = None if train_config is None else LMTrainConfig(**{**train_config.to_dict(), "seed": seed})
        original, meta = cached_causal_lm(corpus_config, arch, seed, device, progress=progress, log=log,
                                          train_config=recipe, size=size)
        for share in shares:
            scenario = make_scenario(corpus, share, seed)
            n, tag = len(scenario.people), f"seed {seed}, forget {share:.0%}"
            settings[seed, share] = {"share": share, "seed": seed, "people": scenario.people,
                                     "forget_sequences": int(scenario.forget_indices.numel())}
            yield Call({"method": "Original", "seed": seed, "share": share},
                       lambda: _measured(original, scenario, seed, seconds=0.0), f"{tag}: Original")
            if retrain:
                def run_retrain() -> dict:
                    model, seconds = retrain_lm(meta, corpus, scenario, device, progress=progress)
                    return _measured(model, scenario, seed, seconds=seconds)

                yield Call({"method": "Retrain", "seed": seed, "share": share}, run_retrain, f"{tag}: Retrain",
                           lambda rec: f"{rec['metrics']['seconds']:.1f} s",
                           start=f"{tag} ({n} {'person' if n == 1 else 'people'}, "
                                 f"{settings[seed, share]['forget_sequences']} sequences): training Retrain on the rest")
            for name, fn in methods.items():
                def run(fn=fn) -> dict:
                    res = fn(copy.deepcopy(original), corpus.train, forget_indices=scenario.forget_indices,
                             retain_fraction=retain_fraction, seed=seed, device=device)
                    return _measured(res.model, scenario, seed, seconds=res.timings["total"],
                                     retain_used=res.retain_samples_used)

                yield Call({"method": name, "seed": seed, "share": share}, run, f"{tag}: {name}",
                           lambda rec: (f"{rec['metrics']['seconds']:.2f} s, forget acc "
                                        f"{rec['metrics']['forget_acc']:.3f}, retain acc "
                                        f"{rec['metrics']['retain_acc']:.3f}"))

    records = run_seeds(seeds, calls_of, log)
    for rec, ref in reference_pairs(records, by=("seed", "share")):  # in points: the AUC times 100
        rec["metrics"][GAP.key] = gap_to_reference(rec["metrics"], ref["metrics"], _GAP_METRICS, scale=100.0)
        rec["metrics"][FORGET_QUALITY.key] = forget_quality(rec["truth_ratios"], ref["truth_ratios"])
    runs = []
    for key, fields in settings.items():
        mine = [r for r in records if (r["seed"], r["share"]) == key]
        run = {**fields, "methods": {r["method"]: r["metrics"] for r in mine if "metrics" in r},
               "truth_ratios": {r["method"]: r["truth_ratios"] for r in mine if "truth_ratios" in r}}
        failed = {r["method"]: r["error"] for r in mine if "error" in r}
        runs.append({**run, "failed": failed} if failed else run)
    return {"runs": runs, "summary": aggregate(runs), "corpus": corpus.describe(),
            "config": {"shares": list(shares), "seeds": list(seeds), "retain_fraction": retain_fraction,
                       "arch": arch, "device": str(device)}}

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
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch

from .._io import markdown_table
from ..baselines.scratch import lm_retrain
from ..eval.lm import lm_battery
from ..lm.task import TokenSequences
from ..training.causal_lm import LMTrainConfig, train_causal_lm
from ..zoo.lm_training import cached_causal_lm
from ..zoo.lm_models import build_causal_lm
from ..zoo.people import PeopleConfig, PeopleCorpus, make_people_corpus

#: The forget shares of the issue: 1%, 5% and 10% of the people.
FORGET_SHARES = (0.01, 0.05, 0.10)
#: The rows every table shows: doing nothing and the gold standard first.
REFERENCE_ROWS = ("Original", "Retrain")
#: Keys of the battery shown in tables, with their headers.
COLUMNS = (("forget_acc", "forget acc"), ("forget_para_acc", "para acc"), ("forget_prob", "forget prob"),
           ("retain_acc", "retain acc"), ("perplexity", "ppl"), ("mia_auc", "MIA AUC"),
           ("relearn_acc", "relearn acc"), ("gap", "gap to Retrain"), ("seconds", "time s"))
#: The metrics whose mean absolute difference from Retrain's is a method's "gap to Retrain".
GAP_KEYS = ("forget_acc", "forget_para_acc", "forget_prob", "retain_acc", "mia_auc")
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
    return LMScenario(share, seed, people, forget_idx, sets)


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


def _summary(values: list[float]) -> tuple[float, float, int]:
    """(mean, std, count) of the finite values."""
    vals = [v for v in values if not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return math.nan, math.nan, 0
    t = torch.tensor(vals, dtype=torch.float64)
    return float(t.mean()), float(t.std(unbiased=True)) if len(vals) > 1 else 0.0, len(vals)


def add_gaps(run: dict) -> dict:
    r"""Each method's ``gap``: :math:`\frac{1}{|K|}\sum_{k \in K} |m_k - m_k^{Retrain}|` over
    :data:`GAP_KEYS` (in percentage points: the AUC times 100), against this run's Retrain."""
    ref = run["methods"].get("Retrain")
    if ref is not None:
        for metrics in run["methods"].values():
            metrics["gap"] = 100.0 * sum(abs(metrics[k] - ref[k]) for k in GAP_KEYS) / len(GAP_KEYS)
    return run


def aggregate(runs: list[dict]) -> dict:
    """``{share: {method: {metric: (mean, std, count)}}}`` over seeds."""
    out: dict = {}
    for run in runs:
        for method, metrics in run["methods"].items():
            cell = out.setdefault(run["share"], {}).setdefault(method, {})
            for k, v in metrics.items():
                cell.setdefault(k, []).append(v)
    return {share: {m: {k: _summary(v) for k, v in cells.items()} for m, cells in methods.items()}
            for share, methods in out.items()}


def format_table(summary: dict) -> str:
    """A plain-text table per forget share: mean ± std over seeds (accuracies in %; the mean alone for one seed)."""
    lines = []
    for share in sorted(summary):
        lines.append(f"forget {share:.0%} of the people")
        header = f"{'method':<18}" + "".join(f"{h:>16}" for _, h in COLUMNS)
        lines.append(header)
        for method, cells in summary[share].items():
            row = f"{method:<18}"
            for key, _ in COLUMNS:
                row += f"{_cell(cells, key):>16}"
            lines.append(row)
        lines.append("")
    return "\n".join(lines)


def _cell(cells: dict, key: str) -> str:
    """``mean±std`` of one metric (accuracies and probabilities in %), blank when absent."""
    if key not in cells:
        return ""
    mean, std, count = cells[key]
    scale = 100.0 if key.endswith("_acc") or key == "forget_prob" else 1.0
    digits = 3 if key == "mia_auc" else (2 if key in ("perplexity", "seconds") else 1)
    spread = f"±{std * scale:.{digits}f}" if count > 1 else ""  # one seed: no spread to show
    return f"{mean * scale:.{digits}f}{spread}"


def format_markdown(summary: dict) -> str:
    """The same tables in Markdown, one per forget share."""
    out = []
    for share in sorted(summary):
        rows = [[method] + [_cell(cells, key) for key, _ in COLUMNS] for method, cells in summary[share].items()]
        out += [f"**Forget {share:.0%} of the people**", "",
                markdown_table(["method"] + [h for _, h in COLUMNS], rows), ""]
    return "\n".join(out)


def run_lm_comparison(methods: dict, *, shares=FORGET_SHARES, seeds=(0, 1, 2), retain_fraction: float = 0.13,
                      corpus_config: PeopleConfig | None = None, arch: str | None = None, device="cpu",
                      progress: bool = False, log=None, retrain: bool = True,
                      train_config: LMTrainConfig | None = None, size: dict | None = None) -> dict:
    """Every method of ``methods`` (name -> ``fn(model, train_set, forget_indices=..., retain_fraction=...,
    seed=..., device=...)`` returning an UnlearnResult) on every (seed, share), beside Original and
    Retrain. ``train_config`` overrides the originals' recipe (its seed is each run's), ``size`` the
    model's size (:func:`dfmu_ext.zoo.lm_models.build_causal_lm`). Returns
    ``{"runs": [...], "summary": aggregate(runs), "corpus": ..., "config": ...}``."""
    log = log or (lambda *_: None)
    corpus_config = corpus_config or PeopleConfig()
    corpus = make_people_corpus(corpus_config)
    runs = []
    for seed in seeds:
        recipe = None if train_config is None else LMTrainConfig(**{**train_config.to_dict(), "seed": seed})
        original, meta = cached_causal_lm(corpus_config, arch, seed, device, progress=progress, log=log,
                                          train_config=recipe, size=size)
        for share in shares:
            scenario = make_scenario(corpus, share, seed)
            row = {"share": share, "seed": seed, "people": scenario.people,
                   "forget_sequences": int(scenario.forget_indices.numel()), "methods": {}}
            row["methods"]["Original"] = {**measure(original, scenario, seed), "seconds": 0.0}
            if retrain:
                n = len(scenario.people)
                log(f"seed {seed}, forget {share:.0%} ({n} {'person' if n == 1 else 'people'}, "
                    f"{row['forget_sequences']} sequences): training Retrain on the rest")
                model, seconds = retrain_lm(meta, corpus, scenario, device, progress=progress)
                row["methods"]["Retrain"] = {**measure(model, scenario, seed), "seconds": seconds}
                log(f"seed {seed}, forget {share:.0%}: Retrain {seconds:.1f} s")
            for name, fn in methods.items():
                model = copy.deepcopy(original)
                res = fn(model, corpus.train, forget_indices=scenario.forget_indices, retain_fraction=retain_fraction,
                         seed=seed, device=device)
                row["methods"][name] = {**measure(res.model, scenario, seed), "seconds": res.timings["total"],
                                        "retain_used": res.retain_samples_used}
                log(f"seed {seed}, forget {share:.0%}: {name} {res.timings['total']:.2f} s, forget acc "
                    f"{row['methods'][name]['forget_acc']:.3f}, retain acc {row['methods'][name]['retain_acc']:.3f}")
            runs.append(add_gaps(row))
    return {"runs": runs, "summary": aggregate(runs), "corpus": corpus.describe(),
            "config": {"shares": list(shares), "seeds": list(seeds), "retain_fraction": retain_fraction,
                       "arch": arch, "device": str(device)}}


#: The panels of the LM plot: (battery key, title, higher is closer to "forgotten").
PLOT_PANELS = (("forget_acc", "forget-fact accuracy (%)"), ("forget_para_acc", "paraphrased forget accuracy (%)"),
               ("retain_acc", "retain-fact accuracy (%)"), ("mia_auc", "membership AUC"),
               ("relearn_acc", "after relearning attack (%)"), ("perplexity", "filler perplexity"))


def plot_lm(summary: dict, path: str, title: str = "") -> None:
    """One panel per metric; a group of bars per forget share, one bar per method (mean, std as error bar);
    Retrain's value drawn as a dashed line over its group."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._io import save_figure_atomic

    shares = sorted(summary)
    methods = list(next(iter(summary.values())))
    fig, axes = plt.subplots(2, 3, figsize=(15, 7.5))
    width = 0.8 / max(1, len(methods))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, label) in zip(axes.flat, PLOT_PANELS):
        scale = 100.0 if key.endswith("_acc") else 1.0
        for i, m in enumerate(methods):
            xs = [g + (i - (len(methods) - 1) / 2) * width for g in range(len(shares))]
            means = [summary[s][m].get(key, (math.nan, math.nan))[0] * scale for s in shares]
            stds = [summary[s][m].get(key, (math.nan, math.nan))[1] * scale for s in shares]
            ax.bar(xs, means, width, yerr=stds, capsize=2, label=m, color=colours[i % len(colours)])
        if "Retrain" in methods:
            for g, s in enumerate(shares):
                ax.hlines(summary[s]["Retrain"][key][0] * scale, g - 0.45, g + 0.45, colors="black",
                          linestyles="dashed", linewidth=1)
        ax.set_xticks(range(len(shares)))
        ax.set_xticklabels([f"forget {s:.0%}" for s in shares], fontsize=8)
        ax.set_title(label, fontsize=10)
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(methods), frameon=False, fontsize=9)
    fig.suptitle(title or "entity unlearning (dashed: Retrain)")
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    save_figure_atomic(fig, path)

"""What DFMU keeps, on setups no default was chosen on: small causal LMs of several shapes on a
question-answer-only corpus (no filler), and classifiers forgetting a sub-class under coarse labels
or a whole class (the ``*-class-*`` setups of ``keep_suite_classes.py``).
Each setup prints the original, Retrain and DFMU variants side by side (doing nothing = the original).

    python benchmarks/keep_suite.py --out runs/keep_suite [--setups lm-gpt2-30,digits-sub3] [--seeds 0,1,2]
        [--variants 'DFMU, defaults;DFMU, forget_into=trained']   # only those DFMU rows

The LM corpus: ``people`` fictitious people x ``facts`` attributes, one sequence per fact
``<bos> person attribute value <eos>`` with only the value scored; values drawn at random from
``values`` per attribute (so Retrain answers a forgotten fact at chance, 1/values). Forget
``forget`` people (all their facts). "other facts" = the retained people's answers (most of them
outside the budget); "relearned" = the battery's relearning attack
(:func:`dfmu_ext.eval.lm.relearn_attack`: 10 steps on the forgotten people's facts about the first
half of the attributes, accuracy on their other facts). A setup with ``filler`` adds that many fully scored sequences that mention no
one (:func:`filler_sequences`) to every training set and reports ``filler_ppl``, the perplexity on
100 held-out ones; ``epochs`` (default 150) trains the larger corpora for fewer passes.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
import warnings

import torch

import dfmu_ext
from dfmu_ext.eval.lm import answer_accuracy, perplexity, relearn_attack
from dfmu_ext.lm.task import IGNORE_INDEX, TokenSequences
from dfmu_ext.training.causal_lm import LMTrainConfig, train_causal_lm
from dfmu_ext.zoo.lm_models import build_causal_lm
from keep_suite_classes import CLASS_SETUPS as WHOLE_CLASS_SETUPS, run_class as run_whole_class  # whole classes

LM_SETUPS = {
    # name: arch, layers, width, mlp, people, facts, values, retain_fraction, forget people
    "lm-gpt2-30": dict(arch="gpt2", layers=2, hidden=64, mlp=256, people=40, facts=4, values=4, fraction=0.3, forget=2),
    "lm-llama-13": dict(arch="llama", layers=2, hidden=64, mlp=128, people=40, facts=4, values=4, fraction=0.13,
                        forget=2),
    "lm-plain-10": dict(arch="plain", layers=3, hidden=48, mlp=96, people=60, facts=3, values=6, fraction=0.1,
                        forget=3),
    "lm-gpt2-wide-5": dict(arch="gpt2", layers=1, hidden=96, mlp=384, people=80, facts=5, values=5, fraction=0.05,
                           forget=4),
    # added after the neighbours' defaults were fixed (no choice was made on them): a corpus with
    # ``filler`` fully scored sequences that never mention a person, and a 1000-sequence corpus
    "lm-llama-filler-13": dict(arch="llama", layers=3, hidden=96, mlp=192, people=60, facts=4, values=4,
                               fraction=0.13, forget=3, filler=300, epochs=60),
    "lm-gpt2-large-10": dict(arch="gpt2", layers=2, hidden=128, mlp=512, people=200, facts=5, values=5,
                             fraction=0.1, forget=10, epochs=100),
}
CLS_SETUPS = {
    # digits under three coarse classes of our own; forget every training sample of one digit
    "digits-sub3-cnn": dict(model="cnn", fine=3, fraction=0.13),
    "digits-sub7-mlp": dict(model="mlp", fine=7, fraction=0.2),
    # added after the early stop's forget-phase rule was chosen on the two above (no choice made on them)
    "digits-sub9-mlp": dict(model="mlp", fine=9, fraction=0.13),
    "digits-sub8-cnn": dict(model="cnn", fine=8, fraction=0.1),
    "digits-sub2-cnn": dict(model="cnn", fine=2, fraction=0.2),
    "digits-sub5-mlp": dict(model="mlp", fine=5, fraction=0.05),
}
#: random samples of a model that memorised them: a fixed 600-per-class subset of Fashion-MNIST's train
#: split, the zoo's SmallCNN trained 40 epochs (train accuracy 100%), a random ``share`` forgotten;
#: ``nonmembers`` per class from the same split, disjoint from the subset (never the test split reported)
MEMORISED_SETUPS = {
    "fmnist-memorised-10": dict(per_class=600, nonmembers=100, share=0.10, epochs=40, fraction=0.13),
}
# three coarse classes chosen so that the forgotten digit's look-alikes sit in ANOTHER coarse class
# (3 looks like 5/8/9, 7 like 1): Retrain then moves it, doing nothing does not (the scenario can fail)
COARSE = {0: 0, 3: 0, 4: 0, 7: 0, 1: 1, 2: 1, 6: 1, 5: 2, 8: 2, 9: 2}


def first_attribute(people: int) -> int:
    """The token of :func:`people_corpus`'s first attribute (people are tokens 3 .. 3 + people - 1)."""
    return 3 + people


def people_corpus(people: int, facts: int, values: int, seed: int) -> tuple[TokenSequences, torch.Tensor, int]:
    g = torch.Generator().manual_seed(1000 + seed)
    person0, attr0 = 3, first_attribute(people)
    value0 = attr0 + facts
    vocab = value0 + facts * values
    rows, owner = [], []
    answers = torch.randint(0, values, (people, facts), generator=g)
    for p in range(people):
        for a in range(facts):
            rows.append([1, person0 + p, attr0 + a, value0 + a * values + int(answers[p, a]), 2])
            owner.append(p)
    ids = torch.tensor(rows)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, 3] = ids[:, 3]
    return TokenSequences(ids, labels), torch.tensor(owner), vocab


#: filler words and successors per word of :func:`filler_sequences` (a fixed bigram chain)
FILLER_WORDS, FILLER_NEXT = 24, 3


def filler_sequences(n: int, held_out: int, vocab0: int, seed: int) -> tuple[TokenSequences, TokenSequences, int]:
    """``(train, held_out, vocab)``: ``<bos> w1 w2 w3 <eos>`` over :data:`FILLER_WORDS` tokens from
    ``vocab0`` on (no person, attribute or value token), every token after ``<bos>`` scored. ``w1`` is
    uniform, each next word one of :data:`FILLER_NEXT` fixed successors of the previous one (a
    perplexity of about 3 on ``w2, w3`` is learnable; ``held_out`` more from the same chain are never
    trained on). Its own generator, so the people sequences stay those of :func:`people_corpus`."""
    g = torch.Generator().manual_seed(2000 + seed)
    succ = torch.stack([torch.randperm(FILLER_WORDS, generator=g)[:FILLER_NEXT] for _ in range(FILLER_WORDS)])
    w = torch.empty(n + held_out, 3, dtype=torch.long)
    w[:, 0] = torch.randint(0, FILLER_WORDS, (n + held_out,), generator=g)
    for t in (1, 2):
        w[:, t] = succ[w[:, t - 1], torch.randint(0, FILLER_NEXT, (n + held_out,), generator=g)]
    ids = torch.cat([torch.ones(n + held_out, 1, dtype=torch.long), vocab0 + w,
                     torch.full((n + held_out, 1), 2, dtype=torch.long)], 1)
    labels = ids.clone()
    labels[:, 0] = IGNORE_INDEX
    seqs = TokenSequences(ids, labels)
    return seqs.subset(range(n)), seqs.subset(range(n, n + held_out)), vocab0 + FILLER_WORDS


def train_lm(arch, vocab, data, seed, epochs=150, **size):
    torch.manual_seed(seed)
    model = build_causal_lm(arch, vocab, 5, **size)
    train_causal_lm(model, data, LMTrainConfig(epochs=epochs, batch_size=16, lr=3e-3, warmup_steps=20, seed=seed))
    return model.eval()


def lm_variants():
    from dfmu_ext.lm.edit import EditConfig
    from dfmu_ext.lm.targets import LMForgetTermConfig

    tf = dfmu_ext.tasks.LMFinetuneConfig
    # the defaults of e9bf022 (before the swapped neighbours): nearest-position targets, the projected
    # edit, the MLP fine-tune (its guard then measured tokens, now sequences)
    before = dict(finetune=tf(train="mlp", neighbours=0), forget_term=LMForgetTermConfig(source="positions"),
                  edit=EditConfig(steps=40))
    return {
        "DFMU, previous defaults": dict(guard=False, finetune=tf(distill=0.0, train="mlp", neighbours=0),
                                        forget_term=LMForgetTermConfig(k_share=1.0, source="positions"),
                                        edit=EditConfig(steps=40)),
        "DFMU, e9bf022 defaults": before,
        "DFMU, defaults": dict(),
        "DFMU, defaults without guard": dict(guard=False),
        # the forget term into every trained parameter (the routing to the entity's rows off)
        "DFMU, forget_into=trained": dict(finetune=tf(forget_into="trained")),
        # the forget side's term one simulated relearning step away (dfmu_ext.lm.relearning)
        "DFMU, relearn_step=1e-3": dict(forget_term=LMForgetTermConfig(relearn_step=1e-3)),
    }


def run_lm(name, s, seed):
    data, owner, vocab = people_corpus(s["people"], s["facts"], s["values"], seed)
    filler_test = None
    if s.get("filler"):
        # filler rows after the people's (owner -1): in every model's training set, never "other facts"
        filler, filler_test, vocab = filler_sequences(s["filler"], 100, vocab, seed)
        data = TokenSequences(torch.cat([data.input_ids, filler.input_ids]), torch.cat([data.labels, filler.labels]))
        owner = torch.cat([owner, torch.full((len(filler),), -1)])
    g = torch.Generator().manual_seed(seed)
    gone = torch.randperm(s["people"], generator=g)[:s["forget"]]
    is_forget = torch.isin(owner, gone)
    forget_idx = torch.nonzero(is_forget).flatten().tolist()
    keep = torch.nonzero(~is_forget).flatten()
    other = torch.nonzero(~is_forget & (owner >= 0)).flatten()
    size = dict(layers=s["layers"], hidden=s["hidden"], mlp=s["mlp"], heads=4, epochs=s.get("epochs", 150))
    t0 = time.perf_counter()
    original = train_lm(s["arch"], vocab, data, seed, **size)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    retrain = train_lm(s["arch"], vocab, data.subset(keep), seed, **size)
    t_retrain = time.perf_counter() - t0
    f_set, r_set = data.subset(forget_idx), data.subset(other)
    # the battery's relearning attack: a few steps on the forgotten people's facts about the first half
    # of the attributes, read on their other facts (what comes back, not what was just trained)
    attr = data.input_ids[forget_idx][:, 2]
    first = attr < first_attribute(s["people"]) + s["facts"] // 2
    relearn = (data.subset([i for i, f in zip(forget_idx, first.tolist()) if f]),
               data.subset([i for i, f in zip(forget_idx, first.tolist()) if not f]))

    def row(model, secs):
        out = {"forget": answer_accuracy(model, f_set), "other": answer_accuracy(model, r_set),
               "relearned": relearn_attack(model, *relearn, seed=seed)}
        if filler_test is not None:
            out["filler_ppl"] = perplexity(model, filler_test)
        return {**out, "seconds": secs}

    out = {"Original": row(original, t_train), "Retrain": row(retrain, t_retrain)}
    return {**out, **run_variants(original, data, forget_idx, s["fraction"], seed, lm_variants(), row)}


#: the DFMU variants to run (labels), None: all of them
ONLY_VARIANTS: set[str] | None = None


def run_variants(original, data, forget_idx, fraction, seed, variants, row) -> dict:
    """Each DFMU variant on a copy of ``original``: ``row``'s metrics, whether the guard warned, the
    edit's and the recovery's steps (only the labels in ``ONLY_VARIANTS`` when it is set: ``--variants``)."""
    out = {}
    for label, kw in variants.items():
        if ONLY_VARIANTS is not None and label not in ONLY_VARIANTS:
            continue
        m = copy.deepcopy(original)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            res = dfmu_ext.unlearn(m, data, forget_indices=forget_idx, retain_fraction=fraction, seed=seed, **kw)
        out[label] = {**row(m, res.timings["total"]),
                      "warned": any(issubclass(w.category, dfmu_ext.RetentionWarning) for w in caught),
                      "edit_steps": res.info.get("edit_steps"), "recovery_steps": res.finetune.recovery_steps}
    return out


def run_cls(name, s, seed):
    from dfmu_ext import training
    from dfmu_ext.zoo import models
    from dfmu_ext.zoo.data import load_dataset
    from torch.utils.data import TensorDataset

    train, test, info = load_dataset("digits")
    xs, ys = train.tensors
    xt, yt = test.tensors
    cy, cyt = torch.tensor([COARSE[int(v)] for v in ys]), torch.tensor([COARSE[int(v)] for v in yt])
    ctrain, ctest = TensorDataset(xs, cy), TensorDataset(xt, cyt)
    forget_idx = torch.nonzero(ys == s["fine"]).flatten().tolist()
    keep = torch.nonzero(ys != s["fine"]).flatten()
    sib = torch.tensor([COARSE[int(v)] == COARSE[s["fine"]] and int(v) != s["fine"] for v in yt])
    other = torch.tensor([COARSE[int(v)] != COARSE[s["fine"]] for v in yt])

    def build_train(ds):
        torch.manual_seed(seed)
        kw = {"width": 8} if s["model"] == "cnn" else {}
        m = models.build_model(s["model"], info.in_channels, 3, info.image_size, **kw)
        training.train_model(m, ds, training.TrainConfig(epochs=8, lr=0.05), progress=False)
        return m.eval()

    def acc(model, mask, target_fn=None):
        with torch.no_grad():
            pred = model(xt[mask]).argmax(1)
        return float((pred == cyt[mask]).float().mean())

    def row(model, secs):
        return {"forget": acc(model, yt == s["fine"]), "siblings": acc(model, sib), "other": acc(model, other),
                "seconds": secs}

    t0 = time.perf_counter()
    original = build_train(ctrain)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    retrain = build_train(torch.utils.data.Subset(ctrain, keep.tolist()))
    out = {"Original": row(original, t_train), "Retrain": row(retrain, time.perf_counter() - t0)}
    fc = dfmu_ext.FinetuneConfig
    variants = {"DFMU, previous defaults": dict(guard=False, finetune=fc(distill=0.0)),
                "DFMU, defaults": {}, "DFMU, defaults without guard": dict(guard=False)}
    return {**out, **run_variants(original, ctrain, forget_idx, s["fraction"], seed, variants, row)}


def memorised_data(per_class: int, nonmembers: int):
    """``(members, nonmembers, test)``: ``per_class`` training images per class (the same for every
    seed) and ``nonmembers`` more per class from the rest of the train split (never trained on)."""
    from dfmu_ext.zoo.data import load_dataset
    from torch.utils.data import TensorDataset

    train, test, _ = load_dataset("fashion-mnist")
    x, y = train.tensors
    gen = torch.Generator().manual_seed(6000)
    mem, non = [], []
    for c in range(10):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=gen)]
        mem.append(idx[:per_class])
        non.append(idx[per_class:per_class + nonmembers])
    mem, non = torch.sort(torch.cat(mem)).values, torch.sort(torch.cat(non)).values
    return TensorDataset(x[mem], y[mem]), TensorDataset(x[non], y[non]), test


def run_memorised(name, s, seed):
    """Original, Retrain and DFMU with and without ``nonmembers=``: forget accuracy, test accuracy and
    MIA-efficacy (:func:`dfmu_ext.eval.metrics.mia_efficacy`, SalUn's protocol: shadow in = retain
    samples, out = the test split)."""
    from dfmu_ext import training
    from dfmu_ext.eval.metrics import mia_efficacy
    from dfmu_ext.eval.predict import accuracy
    from dfmu_ext.zoo import models
    from torch.utils.data import Subset

    members, nonmembers, test = memorised_data(s["per_class"], s["nonmembers"])
    gen = torch.Generator().manual_seed(seed)
    forget_idx = sorted(torch.randperm(len(members), generator=gen)[:int(s["share"] * len(members))].tolist())
    gone = set(forget_idx)
    keep = [i for i in range(len(members)) if i not in gone]
    f_set, r_set = Subset(members, forget_idx), Subset(members, keep)

    def build_train(ds):
        torch.manual_seed(seed)
        m = models.build_model("cnn", 1, 10, (28, 28))
        training.train_model(m, ds, training.TrainConfig(epochs=s["epochs"], lr=0.05), seed=seed, progress=False)
        return m.eval()

    def row(model, secs):
        return {"forget": accuracy(model, f_set), "test": accuracy(model, test),
                "mia": mia_efficacy(model, r_set, f_set, test, seed=seed), "seconds": secs}

    t0 = time.perf_counter()
    original = build_train(members)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    retrain = build_train(r_set)
    out = {"Original": row(original, t_train), "Retrain": row(retrain, time.perf_counter() - t0)}
    variants = {"DFMU, defaults": {}, "DFMU, nonmembers=": dict(nonmembers=nonmembers),
                "DFMU, nonmembers='shifted'": dict(nonmembers="shifted")}
    return {**out, **run_variants(original, members, forget_idx, s["fraction"], seed, variants, row)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="runs/keep_suite")
    ap.add_argument("--setups", default=",".join([*LM_SETUPS, *CLS_SETUPS, *MEMORISED_SETUPS, *WHOLE_CLASS_SETUPS]))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--variants", default=None,
                    help="only these DFMU rows of the LM, sub-class and memorised setups, ';'-separated labels "
                         "(e.g. 'DFMU, defaults'); Original and Retrain always run")
    args = ap.parse_args(argv)
    global ONLY_VARIANTS
    ONLY_VARIANTS = None if args.variants is None else {v.strip() for v in args.variants.split(";")}
    torch.set_num_threads(1)
    results = {}
    for name in args.setups.split(","):
        for seed in [int(s) for s in args.seeds.split(",")]:
            fn, s = ((run_lm, LM_SETUPS[name]) if name in LM_SETUPS else (run_memorised, MEMORISED_SETUPS[name])
                     if name in MEMORISED_SETUPS else (run_whole_class, WHOLE_CLASS_SETUPS[name])
                     if name in WHOLE_CLASS_SETUPS else (run_cls, CLS_SETUPS[name]))
            results[f"{name}/seed{seed}"] = r = fn(name, s, seed)
            cols = [k for k in next(iter(r.values())) if k != "seconds"]
            print(f"\n## {name} seed {seed}")
            for label, row in r.items():
                print(f"{label:38s} " + " ".join(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}"
                                                   for k, v in row.items()), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "keep_suite.json"), "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())

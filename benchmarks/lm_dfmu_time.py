"""DFMU's time on the keep suite's causal-LM setups and the people corpus (issue 27's time target),
stage by stage, with the SHA-256 of the unlearned state_dict (a pure speed change must leave it as
it was for the same seed).

    OMP_NUM_THREADS=1 python benchmarks/lm_dfmu_time.py --setups lm-gpt2-30,people --seeds 0,1,2 \
        [--reps 2] [--retrain] [--cache runs/lm_time_models]

One JSON line per run: the stage timings of ``res.timings``, the fine-tune's steps and recovery
steps, how the forget side ended and its extra steps, and ``sha256`` (first 16 hex digits).
``--retrain`` also times Retrain (the keep suite's recipe on the retain set) once per setup and seed (the
people corpus: the zoo's recipe, once: its original and forgotten people do not change with the seed).
The originals are trained once and kept under ``--cache`` (the people corpus uses the zoo's cache).
Run it from two checkouts in turn (e.g. ``PYTHONPATH=<an older tree>``) to compare under the same load.
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import sys
import time
import warnings

import torch

import dfmu_ext
from dfmu_ext.lm.task import TokenSequences

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import keep_suite as ks  # noqa: E402  (the setups and their corpora)


def state_sha256(model: torch.nn.Module) -> str:
    """SHA-256 over the state_dict's names and raw bytes, in name order."""
    h = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def people_setup(retrain: bool = False):
    from dfmu_ext.experiments import lm as lm_exp
    from dfmu_ext.zoo.lm_training import cached_causal_lm
    from dfmu_ext.zoo.people import make_people_corpus

    model, meta = cached_causal_lm()
    corpus = make_people_corpus()   # make demo's LM: its original, 5% of the people (drawn with seed 100), a 13% budget
    scenario = lm_exp.make_scenario(corpus, 0.05, 100)
    if retrain:   # (the zoo's recipe on the retain set; one run, whatever the seed)
        _, seconds = lm_exp.retrain_lm(meta, corpus, scenario, "cpu")
        print(json.dumps({"retrain": "people", "seed": None, "seconds": round(seconds, 2)}), flush=True)
    return model, corpus.train, scenario.forget_indices, 0.13


def keep_suite_setup(name: str, seed: int, cache: str, retrain: bool):
    s = ks.LM_SETUPS[name]
    data, owner, vocab = ks.people_corpus(s["people"], s["facts"], s["values"], seed)
    if s.get("filler"):
        filler, _, vocab = ks.filler_sequences(s["filler"], 100, vocab, seed)
        data = TokenSequences(torch.cat([data.input_ids, filler.input_ids]), torch.cat([data.labels, filler.labels]))
        owner = torch.cat([owner, torch.full((len(filler),), -1)])
    gone = torch.randperm(s["people"], generator=torch.Generator().manual_seed(seed))[:s["forget"]]
    forget_idx = torch.nonzero(torch.isin(owner, gone)).flatten().tolist()
    size = dict(layers=s["layers"], hidden=s["hidden"], mlp=s["mlp"], heads=4, epochs=s.get("epochs", 150))
    path = os.path.join(cache, f"{name}-seed{seed}.pt")
    if os.path.exists(path):
        model = torch.load(path, weights_only=False)
    else:
        model = ks.train_lm(s["arch"], vocab, data, seed, **size)
        os.makedirs(cache, exist_ok=True)
        torch.save(model, path)
    if retrain:
        keep = sorted(set(range(len(data))) - set(forget_idx))
        t0 = time.perf_counter()
        ks.train_lm(s["arch"], vocab, data.subset(keep), seed, **size)
        print(json.dumps({"retrain": name, "seed": seed, "seconds": round(time.perf_counter() - t0, 2)}), flush=True)
    return model, data, forget_idx, s["fraction"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setups", default=",".join([*ks.LM_SETUPS, "people"]))
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--cache", default=os.path.join("runs", "lm_time_models"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    for name in args.setups.split(","):
        seeds = [int(s) for s in args.seeds.split(",")]
        for seed in seeds:
            original, data, forget_idx, fraction = people_setup(args.retrain and seed == seeds[0]) \
                if name == "people" else keep_suite_setup(name, seed, args.cache, args.retrain)
            for _ in range(args.reps):
                model = copy.deepcopy(original)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    res = dfmu_ext.unlearn(model, data, forget_indices=forget_idx, retain_fraction=fraction, seed=seed)
                side = res.info["forget_side"]
                print(json.dumps({"setup": name, "seed": seed, **{k: round(v, 4) for k, v in res.timings.items()},
                                  "steps": res.finetune.steps, "recovery_steps": res.finetune.recovery_steps,
                                  "forget_side": side.get("ended"),
                                  "extra_forget_steps": side.get("extra_forget_steps"), "sha256": state_sha256(model)}),
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Attribute unlearning in a causal LM (dfmu_ext.experiments.lm_attribute): forget one attribute (default
the birth year) of every person of the people corpus, given as forget_indices to dfmu_ext.unlearn;
Original (doing nothing) and Retrain (the same recipe without those sequences) beside DFMU and any other
causal-LM method of the registry. Prints the table and writes the JSON.

    OMP_NUM_THREADS=1 python benchmarks/lm_attribute.py --seeds 0,1,2 [--attribute birth_year]
        [--methods DFMU] [--retain-fraction 0.13] [--out lm_attribute.json] [--people N --epochs E]

--people and --epochs shrink the corpus and the originals' recipe for quick checks (the defaults are the
zoo's people model: 100 people, its 20-epoch recipe).

The originals come from the zoo's cache ($DFMU_CACHE; trained once per seed, about a minute each on two
cores); Retrain is trained afresh every run.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time

import torch

from dfmu_ext.baselines import SPECS, resolve_methods
from dfmu_ext.experiments.lm_attribute import DEFAULT_ATTRIBUTE, run_lm_attribute
from dfmu_ext.training.causal_lm import LMTrainConfig
from dfmu_ext.zoo.people import PeopleConfig


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default: 0,1,2)")
    ap.add_argument("--attribute", default=DEFAULT_ATTRIBUTE, help=f"the attribute to forget (default: {DEFAULT_ATTRIBUTE})")
    ap.add_argument("--methods", default="DFMU", help="causal-LM methods of the registry, comma-separated "
                                                      "(Retrain always runs; default: DFMU)")
    ap.add_argument("--retain-fraction", type=float, default=0.13)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default="lm_attribute.json")
    ap.add_argument("--people", type=int, default=None, help="trained people (default: the corpus's 100)")
    ap.add_argument("--epochs", type=int, default=None, help="the originals' and Retrain's epochs (default: 20)")
    args = ap.parse_args(argv)
    corpus = None if args.people is None else PeopleConfig(num_people=args.people,
                                                           holdout_people=min(50, args.people))
    recipe = None if args.epochs is None else LMTrainConfig(epochs=args.epochs)
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    names = [n for n in resolve_methods(args.methods, task="causal-lm") if n != "Retrain"]
    start = time.perf_counter()
    result = run_lm_attribute({n: SPECS[n].fn for n in names}, attribute=args.attribute, seeds=seeds,
                              retain_fraction=args.retain_fraction, device=args.device, corpus_config=corpus,
                              train_config=recipe,
                              log=lambda *m: print(*m, flush=True))
    result["machine"] = {"platform": platform.platform(), "torch": torch.__version__,
                         "threads": torch.get_num_threads(), "commit": _commit(),
                         "seconds": time.perf_counter() - start}
    print(result["table"])
    for line in result["failed"]:
        print(f"failed: {line}")
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()

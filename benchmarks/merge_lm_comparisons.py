#!/usr/bin/env python
"""Pool causal-LM comparisons run on the same originals (``dfmu compare --task lm`` folders, or any
``run_lm_comparison`` result saved as JSON) into one table and its plots, methods renamed where asked.

    python benchmarks/merge_lm_comparisons.py docs/compare/lm_people_cpu/comparison.json \\
        "runs/distill5/comparison.json:DFMU=DFMU, distillation 5" --out-dir docs/compare/lm_people_frontier

An input is ``PATH`` or ``PATH:OLD=NEW[;OLD=NEW...]``. The first input sets the (seed, forget share) pairs;
another may hold some of them (e.g. one seed each: their rows pool). Its ``Original`` and ``Retrain`` rows
must equal the first input's but for their times (the same originals and Retrains: otherwise the methods
were not measured against the same thing); the first input's are kept. A method name met again at the same
(seed, share) is kept once where its measures are the same but for the time (the same run, e.g. a baseline
both inputs ran), and refused where they differ. Writes ``comparison.json``, ``comparison.png`` and
``comparison_frontier.png`` (:mod:`dfmu_ext.experiments.lm_plots`) in ``--out-dir``, all or nothing, and
prints the Markdown table.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

from dfmu_ext._io import OutputBatch, write_json
from dfmu_ext.experiments import lm as lm_exp
from dfmu_ext.experiments import lm_plots

REFERENCES = ("Original", "Retrain")


def parse_input(spec: str) -> tuple[str, dict[str, str]]:
    """``PATH[:OLD=NEW;...]`` -> (path, renames)."""
    path, sep, tail = spec.rpartition(":")
    if not sep or "=" not in tail:
        return spec, {}
    renames = {}
    for pair in tail.split(";"):
        old, eq, new = pair.partition("=")
        if not eq or not old.strip() or not new.strip():
            raise ValueError(f"{spec!r}: a rename is OLD=NEW, got {pair!r}")
        renames[old.strip()] = new.strip()
    return path, renames


def same_measures(a: dict | None, b: dict | None) -> bool:
    """Whether two rows hold the same measures, their wall times aside (a NaN, a measure not taken, equals a NaN)."""
    if a is None or b is None:
        return a is b
    keys = set(a) - {"seconds"}
    if keys != set(b) - {"seconds"}:
        return False
    nan = lambda v: isinstance(v, float) and math.isnan(v)  # noqa: E731
    return all(a[k] == b[k] or (nan(a[k]) and nan(b[k])) for k in keys)


def merge(reports: list[tuple[dict, dict[str, str], str]]) -> dict:
    """One report from several (report, renames, name) on the same originals; see the module's docstring."""
    first, _, first_name = reports[0]
    key = lambda r: (r["seed"], float(r["share"]))  # noqa: E731
    runs = {key(r): {**r, "methods": {m: v for m, v in r["methods"].items() if m in REFERENCES},
                     "truth_ratios": {m: v for m, v in r.get("truth_ratios", {}).items() if m in REFERENCES}}
            for r in first["runs"]}
    for report, renames, name in reports:
        mine = {key(r): r for r in report["runs"]}
        if not set(mine) <= set(runs):
            raise ValueError(f"{name}: its (seed, share) pairs {sorted(set(mine) - set(runs))} are not "
                             f"{first_name}'s {sorted(runs)}")
        unknown = set(renames) - {m for r in report["runs"] for m in r["methods"]}
        if unknown:
            raise ValueError(f"{name}: no method named {', '.join(sorted(unknown))} to rename")
        for k, run in mine.items():
            for ref in REFERENCES:   # (their times differ from run to run: not compared, the first input's kept)
                if not same_measures(run["methods"].get(ref), runs[k]["methods"].get(ref)):
                    raise ValueError(f"{name}: its {ref} row at seed {k[0]}, share {k[1]} differs from "
                                     f"{first_name}'s (not the same originals)")
            for m, metrics in run["methods"].items():
                if m in REFERENCES:
                    continue
                new = renames.get(m, m)
                if new in runs[k]["methods"]:
                    if same_measures(metrics, runs[k]["methods"][new]):
                        continue   # the same run again (a baseline both inputs ran): the first input's is kept
                    raise ValueError(f"{name}: another method {new!r} is in an earlier input (rename it: {m}=...)")
                runs[k]["methods"][new] = metrics
                if m in run.get("truth_ratios", {}):
                    runs[k]["truth_ratios"][new] = run["truth_ratios"][m]
    pooled = list(runs.values())
    return {"runs": pooled, "summary": lm_exp.aggregate(pooled), "corpus": first.get("corpus"),
            "config": {**first.get("config", {}), "merged_from": [name for _, _, name in reports]}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("inputs", nargs="+", help="PATH or PATH:OLD=NEW[;OLD=NEW...] (a comparison.json)")
    ap.add_argument("--out-dir", required=True)
    ap.add_argument("--title", default="people corpus, TOFU-shaped: every method on the same originals")
    args = ap.parse_args(argv)
    try:
        reports = []
        for spec in args.inputs:
            path, renames = parse_input(spec)
            with open(path) as f:
                reports.append((json.load(f), renames, path))
        result = merge(reports)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as exc:
        print(f"merge_lm_comparisons: {exc}", file=sys.stderr)
        return 2
    outputs = [os.path.join(args.out_dir, n) for n in ("comparison.json", "comparison.png", "comparison_frontier.png")]
    inputs = {os.path.realpath(name) for _, _, name in reports}
    clash = [o for o in outputs if os.path.realpath(o) in inputs]
    if clash:
        print(f"merge_lm_comparisons: {clash[0]} is an input; give another --out-dir", file=sys.stderr)
        return 2
    with OutputBatch(protect=sorted(inputs)) as batch:
        batch.make_folder(args.out_dir)
        write_json(batch.file(outputs[0]), result)
        lm_plots.plot_lm(result["summary"], batch.file(outputs[1]), args.title)
        lm_plots.plot_lm_frontier(result["summary"], batch.file(outputs[2]), f"{args.title}: forgetting against what is kept")
        batch.publish()
    print(lm_exp.format_markdown(result["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())

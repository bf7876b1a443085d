#!/usr/bin/env python
"""Pool several ``dfmu compare`` runs (e.g. one per forget class) into one table and two plots.

    python benchmarks/merge_comparisons.py runs/compare_c3 runs/compare_c5 runs/compare_c8 \\
        --out-dir docs/compare [--title "..."]

Each directory holds a ``comparison.json``. Runs are keyed by (forget classes, method, fraction,
seed); when the same key appears in more than one input (a re-run of a method that failed), the
successful run from the later directory wins. Rows are mean ± std over every (class, seed) pair.
Writes ``comparison.json``, ``retain_vs_fraction.png`` and ``time_vs_retain.png`` atomically and
prints the Markdown table.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from dfmu_ext._io import write_json
from dfmu_ext.experiments import compare
from dfmu_ext.experiments.plots import plot_comparison


def merge(dirs: list[str]) -> dict:
    runs: dict[tuple, dict] = {}
    originals: dict[str, dict] = {}
    configs = []
    for d in dirs:
        with open(os.path.join(d, "comparison.json")) as f:
            rep = json.load(f)
        cfg = rep["config"]
        configs.append(cfg)
        classes = tuple(cfg["forget_classes"])
        for seed, metrics in rep["original"].items():
            originals[f"{list(classes)}/seed{seed}"] = metrics
        for r in rep["runs"]:
            key = (classes, r["method"], r["fraction"], r["seed"])
            r = dict(r, forget_classes=list(classes), source=d)
            if key not in runs or not r.get("error") or runs[key].get("error"):
                runs[key] = r
    return {"configs": configs, "runs": list(runs.values()), "originals": originals}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("dirs", nargs="+")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    merged = merge(args.dirs)
    runs = merged["runs"]
    methods = list(dict.fromkeys(m for cfg in merged["configs"] for m in cfg["methods"]))
    rows = compare.aggregate(runs)
    order = {n: i for i, n in enumerate(methods)}
    rows.sort(key=lambda r: (order.get(r["method"], 99), r["fraction"] if r["fraction"] is not None else -1))
    orig = list(merged["originals"].values())
    orig_row = {"method": "Original", "fraction": None, "once": True, "seeds": sorted(merged["originals"])}
    for key in orig[0]:
        m, s, n = compare.mean_std([o[key] for o in orig])
        orig_row[key] = {"mean": m, "std": s, "n": n}
    table_rows = [orig_row] + rows
    table = compare.format_comparison_table(table_rows)
    fractions = sorted({f for cfg in merged["configs"] for f in cfg["fractions"]})
    classes = sorted({tuple(cfg["forget_classes"]) for cfg in merged["configs"]})
    title = args.title or (f"{merged['configs'][0]['dataset']} / {merged['configs'][0]['model']}, forget "
                           f"{' | '.join(str(list(c)) for c in classes)}, {len(orig)} (class, seed) pairs")
    failed = [f"{r['method']} {r['forget_classes']} seed {r['seed']}: {r['error']}" for r in runs if r.get("error")]
    os.makedirs(args.out_dir, exist_ok=True)
    report = {"title": title, "inputs": args.dirs, "configs": merged["configs"], "original": merged["originals"],
              "runs": runs, "rows": table_rows, "table": table, "note": compare.table_note(methods),
              "failed": failed}
    report["plots"] = plot_comparison(table_rows, fractions, args.out_dir, title)
    write_json(os.path.join(args.out_dir, "comparison.json"), report)
    print(title)
    print(table)
    print(report["note"])
    for f in failed:
        print("failed:", f)
    return 0


if __name__ == "__main__":
    sys.exit(main())

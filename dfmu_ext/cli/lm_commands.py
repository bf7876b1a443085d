"""The ``--task lm`` side of ``dfmu train / forget / demo / compare``: causal LMs on the generated
``people`` corpus (entity unlearning). Every file a call writes goes through one OutputBatch."""
from __future__ import annotations

import os

import torch

from .. import distributed
from .._io import OutputBatch, write_json
from ..baselines import SPECS, resolve_methods
from ..experiments import lm as lm_exp
from ..experiments import lm_plots
from ..unlearn import unlearn
from ..record import record_path_for
from ..zoo.checkpoints import save_checkpoint
from ..training.causal_lm import LMTrainConfig
from ..zoo.lm_training import load_causal_lm, train_people_lm
from ..zoo.people import PeopleConfig, make_people_corpus
from ..zoo.checkpoints import CheckpointError
from .checks import (UsageError, check_outputs, forget_term_kwargs, logger_for, parse_device, parse_forget_indices,
                     parse_fractions, prepare_folder, progress_enabled)

DEFAULT_SHARE = 0.05


def _share(args) -> float:
    share = args.forget_people if args.forget_people is not None else DEFAULT_SHARE
    if not 0.0 < share < 1.0:
        raise UsageError(f"--forget-people must be in (0, 1), got {share}")
    return share


def _refuse_classification_flags(args) -> None:
    for flag in ("classes", "forget_subclass", "forget_random"):
        if getattr(args, flag, None) is not None:
            raise UsageError(f"--{flag.replace('_', '-')} is for classifiers; with --task lm forget people with "
                             f"--forget-people FRACTION (or --forget-indices FILE for `forget`)")
    for flag in ("arch", "hf_config", "hf_model", "weights", "data"):
        if getattr(args, flag, None):
            raise UsageError(f"--{flag.replace('_', '-')} is not supported with --task lm yet; use the people "
                             f"corpus's models (dfmu train --task lm) or the Python API for your own causal LM")


def _start(args):
    """``(device, log)`` for a --task lm command, after refusing the classifier-only flags."""
    _refuse_classification_flags(args)
    return parse_device(args.device), logger_for(args)


def _corpus_config(args) -> PeopleConfig:
    """The default corpus, with --people trained people (and as many never-trained ones, up to 50)."""
    if getattr(args, "people", None) is None:
        return PeopleConfig()
    if args.people < 2:
        raise UsageError(f"--people must be >= 2, got {args.people}")
    try:
        return PeopleConfig(num_people=args.people, holdout_people=min(50, args.people))
    except ValueError as exc:
        raise UsageError(f"--people {args.people}: {exc}") from None


def _train_config(args) -> LMTrainConfig | None:
    """The recipe with --epochs, or None (the default recipe)."""
    if getattr(args, "epochs", None) is None:
        return None
    if args.epochs < 1:
        raise UsageError(f"--epochs must be >= 1, got {args.epochs}")
    return LMTrainConfig(epochs=args.epochs)


def _print_table(summary: dict, log) -> None:
    for line in lm_exp.format_table(summary).splitlines():
        log(line)


def cmd_lm_train(args) -> int:
    device, log = _start(args)
    check_outputs([args.out], [])
    with OutputBatch() as batch:
        prepare_folder(os.path.dirname(os.path.abspath(args.out)), "--out", batch)
        config = _train_config(args)
        model, meta = train_people_lm(_corpus_config(args), None, args.seed, device, progress=progress_enabled(args),
                                      log=log, train_config=None if config is None else
                                      LMTrainConfig(**{**config.to_dict(), "seed": args.seed}))
        save_checkpoint(batch.file(args.out), model, meta)
        batch.publish()
    log(f"wrote {args.out} (trained in {meta['train_seconds']:.1f} s)")
    return 0


def cmd_lm_forget(args) -> int:
    if any(getattr(args, k, None) for k in ("hf_model", "forget_data", "retain_data", "nonmember_data")):
        from .hf_commands import cmd_lm_forget_hf  # a Hugging Face folder and TOFU-format data

        return cmd_lm_forget_hf(args)
    term = forget_term_kwargs(args)
    device, log = _start(args)
    if not args.ckpt:
        raise UsageError("give --ckpt (a `dfmu train --task lm` checkpoint)")
    out_dir = args.report_dir or os.path.splitext(args.out)[0] + "-report"
    record = args.record or record_path_for(args.out)
    inputs = [("--ckpt", args.ckpt), ("--forget-indices", args.forget_indices)]
    check_outputs([args.out, record, out_dir, os.path.join(out_dir, "report.json")], inputs)
    if os.path.realpath(args.out) == os.path.realpath(record):
        raise UsageError("--record must differ from --out")
    try:
        model, meta = load_causal_lm(args.ckpt, device)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None
    if meta.get("dataset") != "people":
        raise UsageError(f"{args.ckpt!r} is not a causal LM of the people corpus")
    corpus = make_people_corpus(PeopleConfig.from_dict(meta["corpus"]))
    if args.forget_indices is not None:
        if args.forget_people is not None:
            raise UsageError("give either --forget-people or --forget-indices, not both")
        indices = parse_forget_indices(args.forget_indices, torch.zeros(len(corpus.train), dtype=torch.long))
        scenario = None
    else:
        scenario = lm_exp.make_scenario(corpus, _share(args), args.seed)
        indices = scenario.forget_indices
    if not distributed.is_main_process():  # torchrun: the same unlearn on every rank; rank 0 alone measures and writes
        unlearn(model, corpus.train, forget_indices=indices, retain_fraction=args.retain_fraction, mode=args.mode,
                seed=args.seed, device=device, task="causal-lm", **term)
        return 0
    with OutputBatch(protect=[p for _, p in inputs]) as batch:
        for folder, flag in ((os.path.dirname(os.path.abspath(args.out)), "--out"),
                             (os.path.dirname(os.path.abspath(record)), "--record"), (out_dir, "--report-dir")):
            prepare_folder(folder, flag, batch)
        before = lm_exp.measure(model, scenario, args.seed) if scenario is not None else None
        res = unlearn(model, corpus.train, forget_indices=indices, retain_fraction=args.retain_fraction, mode=args.mode,
                      seed=args.seed, device=device, progress=progress_enabled(args), task="causal-lm",
                      record=batch.file(record, last=True), **term)
        report = {"task": "causal-lm", "forget_sequences": int(len(indices)), "timings": res.timings,
                  "retain_samples_used": res.retain_samples_used, "pruned_units": res.pruned_units,
                  "total_units": res.total_units}
        if scenario is not None:
            report.update(people=scenario.people, original=before, dfmu=lm_exp.measure(model, scenario, args.seed))
            _print_table(lm_exp.aggregate([{"share": scenario.share, "methods": {
                "Original": {**before, "seconds": 0.0}, "DFMU": {**report["dfmu"], "seconds": res.timings["total"]}}}]),
                log)
        save_checkpoint(batch.file(args.out), model, {**meta, "unlearned": {"method": "DFMU",
                                                                              "forget_sequences": int(len(indices))}})
        write_json(batch.file(os.path.join(out_dir, "report.json")), report)
        batch.publish()
    log(f"wrote {args.out}, its deletion record {record} and report.json in {out_dir}")
    return 0


def _retain_fraction(args) -> float:
    """--retain-fraction (forget, demo) or the one value of --fractions (compare); default 0.13."""
    if getattr(args, "retain_fraction", None) is not None:
        return args.retain_fraction
    fractions = parse_fractions(args.fractions) if getattr(args, "fractions", None) else [0.13]
    if len(fractions) != 1:
        raise UsageError("with --task lm, --fractions takes one retain fraction (e.g. 0.13)")
    return fractions[0]


def _comparison(args, device, methods: dict, shares, seeds, log) -> dict:
    return lm_exp.run_lm_comparison(methods, shares=shares, seeds=seeds, retain_fraction=_retain_fraction(args),
                                    corpus_config=_corpus_config(args), train_config=_train_config(args),
                                    device=device, progress=progress_enabled(args), log=log)


def _run_and_write(args, device, log, methods: dict, shares, seeds, stem: str, title: str,
                   frontier: bool = False) -> int:
    """Run the comparison, write ``<stem>.json`` and ``<stem>.png`` in --out-dir (and, with ``frontier``,
    ``<stem>_frontier.png``: forgetting against what is kept) all or nothing, print the table."""
    check_outputs([args.out_dir], [])
    with OutputBatch() as batch:
        prepare_folder(args.out_dir, "--out-dir", batch)
        result = _comparison(args, device, methods, shares, seeds, log)
        write_json(batch.file(os.path.join(args.out_dir, f"{stem}.json")), result)
        lm_plots.plot_lm(result["summary"], batch.file(os.path.join(args.out_dir, f"{stem}.png")), title)
        missing = lm_plots.missing_references(result["summary"]) if frontier else None
        drew = frontier and not missing
        if drew:
            lm_plots.plot_lm_frontier(result["summary"], batch.file(os.path.join(args.out_dir, f"{stem}_frontier.png")),
                                      f"{title}: forgetting against what is kept")
        batch.publish()
    _print_table(result["summary"], log)
    if missing:   # (a Retrain that failed: the table and the bars still hold every method that ran)
        log(f"no {stem}_frontier.png: {missing}")
    log(f"wrote {stem}.json, {stem}.png{f' and {stem}_frontier.png' if drew else ''} in {args.out_dir}")
    return 0


def cmd_lm_demo(args) -> int:
    device, log = _start(args)
    share = _share(args)
    return _run_and_write(args, device, log, {"DFMU": SPECS["DFMU"].fn}, [share], [args.seed], "report",
                          f"people corpus: forget {share:.0%} of the people (seed {args.seed})")


def cmd_lm_compare(args) -> int:
    device, log = _start(args)
    try:
        names = resolve_methods(args.methods, task="causal-lm")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.seeds < 1:
        raise UsageError("--seeds must be >= 1")
    shares = parse_fractions(args.forget_shares)
    methods = {n: SPECS[n].fn for n in names if n != "Retrain"}
    return _run_and_write(args, device, log, methods, shares, list(range(args.seeds)), "comparison",
                          f"people corpus: {args.seeds} seed(s), {_retain_fraction(args):.0%} of the retain data",
                          frontier=True)

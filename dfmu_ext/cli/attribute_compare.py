"""``--task attribute`` beyond the image demo: ``dfmu demo --task attribute --model lm`` (forget one
attribute of every person of the people corpus from its causal LM) and ``dfmu compare --task
attribute [--model lm]`` (methods side by side over seeds, Original and Retrain first).

* image (the default ``--model``, a package classifier): the stamped data set, the registry's attribute
  methods (``--methods all``: DFMU, LEACE, INLP), the probes beside the majority rate, the task's test
  accuracy, the time (:func:`dfmu_ext.experiments.attribute.run_attribute_comparison`);
* ``--model lm``: the people corpus, ``--attribute`` (default birth_year) forgotten through
  ``forget_indices``, the registry's causal-LM methods, the forgotten attribute's and the other
  attributes' answer accuracy (:func:`dfmu_ext.experiments.lm_attribute.run_lm_attribute`).

Every file goes through one :class:`~dfmu_ext._io.OutputBatch` (all or nothing).
"""
from __future__ import annotations

import functools
import os

from .._io import OutputBatch, write_json
from ..baselines import SPECS, resolve_methods
from ..experiments.attribute import run_attribute_comparison
from ..experiments.lm_attribute import DEFAULT_ATTRIBUTE, run_lm_attribute
from ..zoo.people import ATTRIBUTES
from .checks import (UsageError, check_outputs, logger_for, parse_dataset, parse_device, parse_fractions,
                     prepare_folder, progress_enabled)
from .lm_commands import _corpus_config, _train_config

__all__ = ["cmd_attribute_lm_demo", "cmd_attribute_compare", "LM_MODEL"]

#: The ``--model`` value that picks the causal-LM variant of ``--task attribute``.
LM_MODEL = "lm"
#: Flags of a model or data of one's own, which ``--task attribute`` does not read.
_OWN = (("arch", "--arch"), ("hf_config", "--hf-config"), ("hf_model", "--hf-model"), ("weights", "--weights"),
        ("data", "--data"))


def _check_own(args) -> None:
    for attr, flag in _OWN:
        if getattr(args, attr, None):
            raise UsageError(f"{flag} does not apply to --task attribute (it runs on the package's own data)")


def lm_attribute(args) -> str:
    """``--attribute`` for the LM variant (default birth_year), checked against the corpus's attributes;
    one-line errors for image-only flags."""
    if args.dataset != "auto":
        raise UsageError(f"--dataset does not apply to --task attribute --model {LM_MODEL} (it reads the people corpus)")
    attribute = args.attribute or DEFAULT_ATTRIBUTE
    if attribute not in ATTRIBUTES:
        raise UsageError(f"--attribute must be one of {', '.join(ATTRIBUTES)} with --model {LM_MODEL}, got {attribute!r}")
    return attribute


def _write(args, result: dict, stem: str, plot=None) -> None:
    check_outputs([args.out_dir, os.path.join(args.out_dir, f"{stem}.json")], [])
    with OutputBatch() as batch:
        prepare_folder(args.out_dir, "--out-dir", batch)
        write_json(batch.file(os.path.join(args.out_dir, f"{stem}.json")), result)
        if plot is not None:
            plot(batch.file(os.path.join(args.out_dir, f"{stem}.png")))
        batch.publish()


def _lm_run(args, methods: dict, seeds, retain_fraction: float, retrain: bool) -> dict:
    attribute = lm_attribute(args)
    check_outputs([args.out_dir], [])
    return run_lm_attribute(methods, attribute=attribute, seeds=seeds, retain_fraction=retain_fraction,
                            corpus_config=_corpus_config(args), train_config=_train_config(args), retrain=retrain,
                            device=parse_device(args.device), progress=progress_enabled(args), log=logger_for(args))


def cmd_attribute_lm_demo(args, plot_rows) -> int:
    """``dfmu demo --task attribute --model lm``: Original, DFMU and (``--retrain``) Retrain on one seed;
    ``report.json`` and ``report.png`` (``plot_rows(rows, path, title)``) in --out-dir."""
    log = logger_for(args)
    dfmu = functools.partial(SPECS["DFMU"].fn, mode=args.mode)
    result = _lm_run(args, {"DFMU": dfmu}, [args.seed], args.retain_fraction, args.retrain)
    rows = [{"method": r["method"], **r["metrics"]} for r in result["records"] if "metrics" in r]
    report = {"task": "attribute", "model": LM_MODEL, "attribute": result["config"]["attribute"], "seed": args.seed,
              "retain_fraction": args.retain_fraction, "rows": rows, "corpus": result["corpus"],
              "forget_sequences": result["config"]["forget_sequences"], "failed": result["failed"]}
    title = f"people corpus: forget every person's {report['attribute']} (seed {args.seed})"
    _write(args, report, "report", lambda path: plot_rows(rows, path, title))
    for line in result["table"].splitlines() + [f"failed: {f}" for f in result["failed"]]:
        log(line)
    log(f"wrote report.json and report.png in {args.out_dir}")
    return 1 if result["failed"] else 0   # the demo's one method failed: the demo did not run


def _one_fraction(args) -> float:
    fractions = parse_fractions(args.fractions) if args.fractions else [0.13]
    if len(fractions) != 1:
        raise UsageError("with --task attribute, --fractions takes one retain fraction (e.g. 0.13)")
    return fractions[0]


def cmd_attribute_compare(args, recipe) -> int:
    """``dfmu compare --task attribute [--model lm]``: ``comparison.json`` in --out-dir and the table
    printed (also with --quiet: the table is the result). ``recipe(args)``: the image variant's
    training recipe (the demo's)."""
    _check_own(args)
    if args.seeds < 1:
        raise UsageError("--seeds must be >= 1")
    fraction = _one_fraction(args)
    seeds = list(range(args.seeds))
    lm = args.model == LM_MODEL
    try:
        names = resolve_methods(args.methods, task="causal-lm" if lm else "attribute")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    methods = {n: SPECS[n].fn for n in names if n != "Retrain"}   # Retrain always runs, as its own row
    if lm:
        result = _lm_run(args, methods, seeds, fraction, retrain=True)
    else:
        if args.attribute not in (None, "stamp"):
            raise UsageError(f"--attribute must be stamp for an image model, got {args.attribute!r}")
        dataset = "digits" if args.dataset == "auto" else parse_dataset(args.dataset)
        check_outputs([args.out_dir], [])
        try:
            result = run_attribute_comparison(methods, base=dataset, model_name=args.model or "cnn",
                                              config=recipe(args), seeds=seeds, retain_fraction=fraction,
                                              device=parse_device(args.device), progress=progress_enabled(args),
                                              log=logger_for(args))
        except ValueError as exc:
            raise UsageError(f"--task attribute: {' '.join(str(exc).split())}") from None
    _write(args, result, "comparison")
    print(result["table"])   # the table is the result: printed also when quiet
    for f in result["failed"]:
        print(f"failed: {f}")
    logger_for(args)(f"wrote comparison.json in {args.out_dir}")
    return 0   # as `dfmu compare`: a failed method is a row of the report ("failed"), not a failed command

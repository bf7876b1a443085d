"""The ``dfmu`` command line — the top floor: it owns every argparse parser and nothing imports it.

    dfmu train   --dataset fashion-mnist --model cnn --out ckpt.pt
    dfmu forget  --ckpt ckpt.pt --classes 3 [--retain-fraction 0.13] --out forgot.pt
    dfmu demo    [--dataset auto] [--model cnn] [--classes 3] [--retrain]
    dfmu compare --dataset fashion-mnist --model cnn --classes 3 --fractions 0.05,0.13 --seeds 3

    torchrun --nproc_per_node N -m dfmu_ext forget --ckpt ckpt.pt --classes 3 --out forgot.pt
        (DDP: Gloo on the CPU, NCCL on GPUs; only rank 0 evaluates, prints and writes files)

Every error a user can cause is one line on stderr, ``error: ...``, with exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

from . import distributed
from .baselines import SPECS, resolve_methods
from .experiments import run_comparison, run_forget
from .zoo import data as data_mod
from .zoo.checkpoints import CheckpointError, cached_original, load_checkpoint, save_checkpoint, train_original
from .zoo.models import MODEL_NAMES


class UsageError(SystemExit):
    """A mistake in the command's input: printed as one ``error: ...`` line, exit status 2."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return f"error: {self.message}"


def _logger(args):
    quiet = getattr(args, "quiet", False)
    return (lambda *msg: None) if quiet else (lambda *msg: print(*msg, flush=True))


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA device is available")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device must be auto, cpu or cuda[:N], got {name!r}") from None


def _dataset(name: str) -> str:
    try:
        return data_mod.canonical_name(name)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _parse_classes(text: str, num_classes: int) -> list[int]:
    try:
        classes = sorted({int(c) for c in str(text).split(",") if c.strip() != ""})
    except ValueError:
        raise UsageError(f"--classes must be comma-separated integers, got {text!r}") from None
    if not classes or min(classes) < 0 or max(classes) >= num_classes:
        raise UsageError(f"--classes must name classes in [0, {num_classes}), got {text!r}")
    if len(classes) >= num_classes:
        raise UsageError(f"--classes names all {num_classes} classes: nothing would remain to classify")
    return classes


def _parse_fractions(text: str) -> list[float]:
    try:
        out = [float(f) for f in str(text).split(",") if f.strip()]
    except ValueError:
        raise UsageError(f"--fractions must be comma-separated numbers, got {text!r}") from None
    if not out or any(not 0.0 < f <= 1.0 for f in out):
        raise UsageError(f"--fractions must lie in (0, 1], got {text!r}")
    return out


def _load(path: str, device: torch.device):
    try:
        return load_checkpoint(path, device)
    except CheckpointError as exc:
        raise UsageError(str(exc)) from None


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------

def cmd_train(args) -> int:
    device = _device(args.device)
    log = _logger(args)
    model, meta = train_original(_dataset(args.dataset), args.model, device, args.seed, epochs=args.epochs,
                                 progress=not args.quiet, log=log)
    save_checkpoint(args.out, model, meta)
    log(f"wrote {args.out} (trained in {meta['train_seconds']:.1f} s)")
    return 0


def cmd_forget(args) -> int:
    device = _device(args.device)
    if os.path.abspath(args.out) == os.path.abspath(args.ckpt):
        raise UsageError("--out must differ from --ckpt (the input checkpoint is never overwritten)")
    model, meta = _load(args.ckpt, device)
    classes = _parse_classes(args.classes, meta["num_classes"])
    out_dir = args.report_dir or os.path.splitext(args.out)[0] + "-report"
    comm = distributed.current_comm()
    run_forget(model, meta, classes, out_dir, device=device, seed=args.seed, retain_fraction=args.retain_fraction,
               mode=args.mode, retrain=args.retrain, progress=not args.quiet, log=_logger(args), comm=comm)
    if comm.is_main:
        save_checkpoint(args.out, model, {**meta, "forgotten_classes": classes})
        _logger(args)(f"wrote {args.out}")
    return 0


def cmd_demo(args) -> int:
    device = _device(args.device)
    dataset = _dataset(args.dataset)
    if args.dataset == "auto" and dataset != "fashion-mnist":
        print(f"note: Fashion-MNIST was not found; the demo uses {dataset} "
              "(install the Debian package dataset-fashion-mnist or set $DFMU_DATA)")
    log = _logger(args)
    model, meta = cached_original(dataset, args.model, device, args.seed, epochs=args.epochs,
                                  progress=not args.quiet, log=log)
    classes = _parse_classes(args.classes, meta["num_classes"])
    run_forget(model, meta, classes, args.out_dir, device=device, seed=args.seed, retain_fraction=args.retain_fraction,
               mode=args.mode, retrain=args.retrain, progress=not args.quiet, log=log)
    return 0


def cmd_compare(args) -> int:
    device = _device(args.device)
    dataset = _dataset(args.dataset)
    _, _, info = data_mod.load_dataset(dataset)
    classes = _parse_classes(args.classes, info.num_classes)
    try:
        methods = resolve_methods(args.methods)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.seeds < 1:
        raise UsageError("--seeds must be >= 1")
    run_comparison(dataset, args.model, classes, _parse_fractions(args.fractions), args.seeds, methods, device,
                   args.out_dir, max_epochs=args.max_epochs, train_epochs=args.epochs,
                   use_cache=not args.no_cache, progress=not args.quiet, quiet=args.quiet)
    return 0


# --------------------------------------------------------------------------------------------
# parsers
# --------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dfmu", description="Data-Frugal Machine Unlearning: make a classifier "
                                                         "forget classes.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
        sp.add_argument("--seed", type=int, default=0, help="seed of the original's training and of the unlearning")
        sp.add_argument("--quiet", action="store_true", help="no progress bars or log lines")

    def forgetting(sp):
        sp.add_argument("--classes", default="3", help="comma-separated class ids to forget")
        sp.add_argument("--retain-fraction", type=float, default=0.13, help="share of the retain data used")
        sp.add_argument("--mode", choices=["prune", "rescale"], default="prune",
                        help="zero the selected units (prune) or dampen them (rescale)")
        sp.add_argument("--retrain", action="store_true", help="also retrain from scratch for comparison")

    def dataset_and_model(sp):
        sp.add_argument("--dataset", default="auto", help="fashion-mnist | cifar10 | digits | auto")
        sp.add_argument("--model", default="cnn", choices=list(MODEL_NAMES), help="the package model to train")
        sp.add_argument("--epochs", type=int, default=None,
                        help="override the training recipe's epochs (of the original and of Retrain)")

    t = sub.add_parser("train", help="train the original model")
    dataset_and_model(t)
    t.add_argument("--out", required=True, help="checkpoint to write")
    common(t)
    t.set_defaults(func=cmd_train)

    f = sub.add_parser("forget", help="make a trained model forget classes")
    f.add_argument("--ckpt", required=True, help="checkpoint of the trained model (written by `dfmu train`)")
    f.add_argument("--out", required=True, help="checkpoint of the unlearned model to write")
    f.add_argument("--report-dir", default=None, help="where report.json/png go (default: next to --out)")
    forgetting(f)
    common(f)
    f.set_defaults(func=cmd_forget)

    d = sub.add_parser("demo", help="train (or reuse) the default model, forget one class, print the table")
    dataset_and_model(d)
    d.add_argument("--out-dir", default="runs/demo", help="where report.json/png go")
    forgetting(d)
    common(d)
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("compare", help="compare DFMU with the baselines (table, JSON, plots)")
    dataset_and_model(c)
    c.add_argument("--classes", default="3", help="comma-separated class ids to forget")
    c.add_argument("--fractions", default="0.01,0.05,0.13,0.25,1.0", help="comma-separated retain-data fractions")
    c.add_argument("--seeds", type=int, default=3, help="number of seeds (0..N-1)")
    c.add_argument("--methods", default="all", help="'all' or comma-separated: " + ",".join(SPECS))
    c.add_argument("--out-dir", default="runs/compare", help="where comparison.json and the plots go")
    c.add_argument("--max-epochs", type=int, default=None,
                   help="cap the epochs of the epoch-based baselines (quick runs); Retrain keeps its recipe")
    c.add_argument("--no-cache", action="store_true", help="train the originals afresh, do not use the cache")
    c.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    c.add_argument("--quiet", action="store_true", help="no progress bars or log lines")
    c.set_defaults(func=cmd_compare)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if not 0.0 < args.__dict__.get("retain_fraction", 0.5) <= 1.0:
            raise UsageError("--retain-fraction must be in (0, 1]")
        if distributed.env_world_size() > 1:
            return _main_distributed(args)
        return args.func(args)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        raise


def _main_distributed(args) -> int:
    """``forget`` under torchrun: join the process group (timeout $DFMU_DIST_TIMEOUT, default 60 s),
    run on every rank with only rank 0 logging, and leave the group at exit, also on error."""
    if args.command != "forget":
        raise UsageError(f"only `forget` runs under torchrun (WORLD_SIZE={distributed.env_world_size()}); "
                         f"run `{args.command}` as a single process")
    _device(args.device)  # same checks as one process (e.g. --device cuda without CUDA)
    try:
        device, created = distributed.init_from_env(args.device)
    except (ValueError, distributed.DistributedError) as exc:
        raise UsageError(str(exc)) from None
    args.device = str(device)  # on CUDA, each rank's own cuda:$LOCAL_RANK
    if not distributed.is_main_process():
        args.quiet = True
    try:
        return distributed.record(args.func)(args)  # torchrun then reports the failing rank's traceback
    finally:
        if created:
            distributed.destroy()


if __name__ == "__main__":
    sys.exit(main())

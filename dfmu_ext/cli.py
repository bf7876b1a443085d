"""The ``dfmu`` command line: train an original model, make it forget classes, run the demo.

    dfmu train  --dataset fashion-mnist --model cnn --out ckpt.pt
    dfmu forget --ckpt ckpt.pt --classes 3 [--retain-fraction 0.13] --out forgot.pt
    dfmu demo   [--dataset auto] [--model cnn] [--classes 3] [--retrain]

    torchrun --nproc_per_node N -m dfmu_ext forget --ckpt ckpt.pt --classes 3 --out forgot.pt
        (DDP: Gloo on the CPU, NCCL on GPUs; only rank 0 evaluates, prints and writes files)
"""
from __future__ import annotations

import argparse
import copy
import io
import os
import sys
import time

import torch

from . import data as data_mod
from . import distributed as dist_utils
from . import models as models_mod
from . import training
from .datautil import dataset_labels, per_class_accuracy, split_forget_retain
from .report import atomic_write_bytes, format_table, plot_summary, write_json

CKPT_FORMAT = "dfmu_ext.checkpoint.v1"


def _log(args, *msg) -> None:
    if not getattr(args, "quiet", False):
        print(*msg, flush=True)


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda asked for, but no CUDA device is available")
    return torch.device(name)


def _resolve_dataset(name: str) -> str:
    return data_mod.default_dataset() if name == "auto" else name


def save_checkpoint(path: str, model: torch.nn.Module, meta: dict) -> None:
    """Atomically write the weights plus what is needed to rebuild the model (plain types only,
    so the file loads with ``weights_only=True``)."""
    buf = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch.save({"format": CKPT_FORMAT, "meta": meta, "state_dict": state}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str, device: torch.device) -> tuple[torch.nn.Module, dict]:
    if not os.path.isfile(path):
        raise SystemExit(f"error: checkpoint {path!r} does not exist")
    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(blob, dict) or blob.get("format") != CKPT_FORMAT:
        raise SystemExit(f"error: {path!r} is not a dfmu checkpoint (written by `dfmu train`)")
    meta = blob["meta"]
    model = models_mod.build_model(meta["model"], meta["in_channels"], meta["num_classes"],
                                   tuple(meta["image_size"]), **meta.get("model_kwargs", {}))
    model.load_state_dict(blob["state_dict"])
    return model.to(device), meta


def _train(args, dataset: str, model_name: str, device: torch.device, seed: int):
    train_set, test_set, info = data_mod.load_dataset(dataset)
    config = training.default_train_config(model_name, device.type)
    if getattr(args, "epochs", None):
        config.epochs = args.epochs
    torch.manual_seed(seed)
    model = models_mod.build_model(model_name, info.in_channels, info.num_classes, info.image_size,
                                   **config.model_kwargs).to(device)
    _log(args, f"training {model_name} on {info.name} ({len(train_set)} samples, {config.epochs} epochs, {device})")
    hist = training.train_model(model, train_set, config, device=device, seed=seed, progress=not args.quiet)
    meta = {"model": model_name, "model_kwargs": dict(config.model_kwargs), "dataset": info.name,
            "num_classes": info.num_classes, "in_channels": info.in_channels, "image_size": list(info.image_size),
            "seed": seed, "train_seconds": hist["total_seconds"], "train_config": config.to_dict()}
    return model, meta


def cmd_train(args) -> int:
    device = _device(args.device)
    if os.path.abspath(args.out) == os.path.abspath(getattr(args, "ckpt", "") or ""):
        raise SystemExit("error: --out must differ from the input checkpoint")
    model, meta = _train(args, _resolve_dataset(args.dataset), args.model, device, args.seed)
    save_checkpoint(args.out, model, meta)
    _log(args, f"wrote {args.out} (trained in {meta['train_seconds']:.1f} s)")
    return 0


def _parse_classes(text: str, num_classes: int) -> list[int]:
    try:
        classes = sorted({int(c) for c in str(text).split(",") if c.strip() != ""})
    except ValueError:
        raise SystemExit(f"error: --classes must be comma-separated integers, got {text!r}")
    if not classes or min(classes) < 0 or max(classes) >= num_classes:
        raise SystemExit(f"error: --classes must name classes in [0, {num_classes}), got {text!r}")
    return classes


def run_forget(args, model, meta, device, classes, out_dir: str, retrain: bool = False) -> dict:
    """Evaluate the original, unlearn, evaluate again; print the table and write JSON + PNG."""
    from . import evaluate, unlearn

    train_set, test_set, info = data_mod.load_dataset(meta["dataset"])
    if dataset_labels(train_set).max() >= meta["num_classes"]:
        raise SystemExit("error: the checkpoint's class count does not match its dataset")
    names = list(info.class_names)
    original = copy.deepcopy(model)
    rows, per_class = {}, {}
    distributed = dist_utils.is_distributed()
    if not distributed:
        _log(args, f"evaluating the original model on {info.name} ({info.source}) ...")
        rows["original"] = evaluate(original, train_set, test_set, classes, device=device, seed=args.seed)
        per_class["original"] = per_class_accuracy(original, test_set, info.num_classes, device=device)

    _log(args, f"unlearning classes {[names[c] for c in classes]} with {100 * args.retain_fraction:.0f}% of the retain data ...")
    res = unlearn(model, train_set, classes, args.retain_fraction, mode=args.mode, device=device, seed=args.seed,
                  progress=not args.quiet)
    if distributed:
        # Under torchrun every rank unlearns (collectives); then rank 0 alone evaluates, retrains and
        # writes. No collective follows, so the other ranks may finish while rank 0 evaluates.
        if not dist_utils.is_main_process():
            return {}
        _log(args, f"evaluating the original and the unlearned model on {info.name} ({info.source}) on rank 0 ...")
        rows["original"] = evaluate(original, train_set, test_set, classes, device=device, seed=args.seed)
        per_class["original"] = per_class_accuracy(original, test_set, info.num_classes, device=device)
    rows["DFMU"] = evaluate(model, train_set, test_set, classes, device=device, seed=args.seed)
    rows["DFMU"].update(time_s=res.timings["total"], retain_samples=res.retain_samples_used)
    per_class["DFMU"] = per_class_accuracy(model, test_set, info.num_classes, device=device)
    _, retain_set = split_forget_retain(train_set, classes)

    if retrain:
        from torch.utils.data import Subset  # noqa: F401
        _log(args, "retraining from scratch on the retain set (the gold standard) ...")
        config = training.default_train_config(meta["model"], device.type)
        torch.manual_seed(args.seed)
        fresh = models_mod.build_model(meta["model"], meta["in_channels"], meta["num_classes"],
                                       tuple(meta["image_size"]), **meta.get("model_kwargs", {})).to(device)
        t0 = time.perf_counter()
        training.train_model(fresh, retain_set, config, device=device, seed=args.seed, progress=not args.quiet,
                             desc="retrain")
        rows["Retrain"] = evaluate(fresh, train_set, test_set, classes, device=device, seed=args.seed)
        rows["Retrain"].update(time_s=time.perf_counter() - t0, retain_samples=len(retain_set))
        per_class["Retrain"] = per_class_accuracy(fresh, test_set, info.num_classes, device=device)

    table = format_table(rows)
    total_units = {k: int(v.shape[-1]) for k, v in res.info["scores"].items()}
    print()
    ranks = f" x {dist_utils.get_world_size()} ranks" if distributed else ""
    print(f"{info.name} / {meta['model']}: forget {[names[c] for c in classes]}, device {device}{ranks}")
    print(table)
    t = res.timings
    print(f"\nDFMU time: scoring {t['scoring']:.3f} s, pruning {t['pruning']:.3f} s, fine-tune {t['finetune']:.2f} s, "
          f"total {t['total']:.2f} s; {res.retain_samples_used} of {len(retain_set)} retain samples "
          f"({100 * res.retain_samples_used / len(retain_set):.1f}%)")
    report = {"dataset": info.name, "source": info.source, "model": meta["model"], "forget_classes": classes,
              "device": str(device), **({"world_size": dist_utils.get_world_size()} if distributed else {}),
              "metrics": rows, "timings": res.timings,
              "retain_samples_used": res.retain_samples_used, "retain_samples_total": len(retain_set),
              "pruned_units": res.info["pruned_units"], "total_units": total_units, "per_class_test_acc": per_class,
              "finetune": {k: v for k, v in res.info["finetune"].items() if k != "loss"}}
    os.makedirs(out_dir, exist_ok=True)
    write_json(os.path.join(out_dir, "report.json"), report)
    plot_summary(os.path.join(out_dir, "report.png"), names, per_class, classes, res.info["pruned_units"],
                 total_units, title=f"DFMU on {info.name} / {meta['model']}")
    _log(args, f"wrote {os.path.join(out_dir, 'report.json')} and report.png")
    return report


def cmd_forget(args) -> int:
    device = _device(args.device)
    if os.path.abspath(args.out) == os.path.abspath(args.ckpt):
        raise SystemExit("error: --out must differ from --ckpt (the input checkpoint is never overwritten)")
    model, meta = load_checkpoint(args.ckpt, device)
    classes = _parse_classes(args.classes, meta["num_classes"])
    out_dir = args.report_dir or os.path.splitext(args.out)[0] + "-report"
    run_forget(args, model, meta, device, classes, out_dir, retrain=args.retrain)
    if dist_utils.is_main_process():
        save_checkpoint(args.out, model, {**meta, "forgotten_classes": classes})
        _log(args, f"wrote {args.out}")
    return 0


def cmd_demo(args) -> int:
    device = _device(args.device)
    dataset = _resolve_dataset(args.dataset)
    if args.dataset == "auto" and dataset != "fashion-mnist":
        print(f"note: Fashion-MNIST was not found; the demo uses {dataset} "
              "(install the Debian package dataset-fashion-mnist or set $DFMU_DATA)")
    cache = os.path.join(os.path.expanduser(os.environ.get("DFMU_CACHE", "~/.cache/dfmu")),
                         f"{dataset}-{args.model}-{device.type}-seed{args.seed}.pt")
    if os.path.isfile(cache):
        _log(args, f"using the cached original model {cache}")
        model, meta = load_checkpoint(cache, device)
    else:
        model, meta = _train(args, dataset, args.model, device, args.seed)
        save_checkpoint(cache, model, meta)
        _log(args, f"cached the original model at {cache}")
    classes = _parse_classes(args.classes, meta["num_classes"])
    run_forget(args, model, meta, device, classes, args.out_dir, retrain=args.retrain)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dfmu", description="Data-Frugal Machine Unlearning: make a classifier forget classes.")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
        sp.add_argument("--seed", type=int, default=0)
        sp.add_argument("--quiet", action="store_true", help="no progress bars or log lines")

    def forgetting(sp):
        sp.add_argument("--classes", default="3", help="comma-separated class ids to forget")
        sp.add_argument("--retain-fraction", type=float, default=0.13, help="share of the retain data used")
        sp.add_argument("--mode", choices=["prune", "rescale"], default="prune")
        sp.add_argument("--retrain", action="store_true", help="also retrain from scratch for comparison")

    t = sub.add_parser("train", help="train the original model")
    t.add_argument("--dataset", default="auto", help="fashion-mnist | cifar10 | digits | auto")
    t.add_argument("--model", default="cnn", choices=list(models_mod.MODEL_NAMES))
    t.add_argument("--epochs", type=int, default=None, help="override the recipe's epochs")
    t.add_argument("--out", required=True)
    common(t)
    t.set_defaults(func=cmd_train)

    f = sub.add_parser("forget", help="make a trained model forget classes")
    f.add_argument("--ckpt", required=True)
    f.add_argument("--out", required=True)
    f.add_argument("--report-dir", default=None, help="where report.json/png go (default: next to --out)")
    forgetting(f)
    common(f)
    f.set_defaults(func=cmd_forget)

    d = sub.add_parser("demo", help="train (or reuse) the default model, forget one class, print the table")
    d.add_argument("--dataset", default="auto")
    d.add_argument("--model", default="cnn", choices=list(models_mod.MODEL_NAMES))
    d.add_argument("--epochs", type=int, default=None)
    d.add_argument("--out-dir", default="runs/demo")
    forgetting(d)
    common(d)
    d.set_defaults(func=cmd_demo)

    from .compare import add_compare_parser  # all methods side by side (issue 4)

    add_compare_parser(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if not 0.0 < args.__dict__.get("retain_fraction", 0.5) <= 1.0:
        raise SystemExit("error: --retain-fraction must be in (0, 1]")
    if dist_utils.env_world_size() > 1:
        return _main_distributed(args)
    return args.func(args)


def _main_distributed(args) -> int:
    """``forget`` under torchrun: join the process group (timeout $DFMU_DIST_TIMEOUT, default 60 s),
    run on every rank with only rank 0 logging, and leave the group at exit, also on error."""
    if args.command != "forget":
        raise SystemExit(f"error: only `forget` runs under torchrun (WORLD_SIZE={dist_utils.env_world_size()}); "
                         f"run `{args.command}` as a single process")
    _device(args.device)  # same checks as one process (e.g. --device cuda without CUDA)
    try:
        device, created = dist_utils.init_from_env(args.device)
    except (ValueError, dist_utils.DistributedError) as exc:
        raise SystemExit(f"error: {exc}")
    args.device = str(device)  # on CUDA, each rank's own cuda:$LOCAL_RANK
    if not dist_utils.is_main_process():
        args.quiet = True
    try:
        from torch.distributed.elastic.multiprocessing.errors import record
        return record(args.func)(args)  # torchrun then reports the failing rank's traceback
    finally:
        if created:
            dist_utils.destroy()


if __name__ == "__main__":
    sys.exit(main())

"""The ``dfmu`` command line — the top floor: it owns every argparse parser and nothing imports it.

    dfmu train   --dataset fashion-mnist --model cnn --out ckpt.pt
    dfmu forget  --ckpt ckpt.pt --classes 3 [--retain-fraction 0.13] --out forgot.pt
    dfmu forget  --arch my_models:build --weights w.pt --data data.npz --classes 3 --out out/forgot.pt
    dfmu verify  --record out/forgot.record.json --weights out/forgot.pt
    dfmu demo    [--dataset auto] [--model cnn] [--classes 3] [--retrain]
    dfmu compare --dataset fashion-mnist --model cnn --classes 3 --fractions 0.05,0.13 --seeds 3
    dfmu compare --arch my_models.py:build --weights w.pt --data images/ --classes 0 --fractions 0.13

    torchrun --nproc_per_node N -m dfmu_ext forget --ckpt ckpt.pt --classes 3 --out forgot.pt
        (DDP: Gloo on the CPU, NCCL on GPUs; only rank 0 evaluates, prints and writes files)

Every error a user can cause is one line on stderr, ``error: ...``, with exit status 2: argparse's
errors, :class:`UsageError`, and the library's documented input errors (``ValueError`` and its
subclasses ``CheckpointError``, ``WeightsError``, ``InputError``, ``RecordError``). Anything else is a
bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile

import torch

from . import distributed
from .baselines import SPECS, resolve_methods
from .experiments import run_comparison, run_forget
from .zoo import data as data_mod
from ._io import atomic_write_bytes
from .record import read_record, record_path_for, verify, write_record
from .splits import dataset_labels
from .weights import state_dict_sha256
from .zoo import custom
from .zoo.checkpoints import CheckpointError, cached_original, load_checkpoint, save_checkpoint, train_original
from .zoo.models import MODEL_NAMES
from .zoo.training import TrainConfig


class UsageError(SystemExit):
    """A mistake in the command's input: printed as one ``error: ...`` line, exit status 2."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return f"error: {self.message}"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one ``error: ...`` line (exit 2) instead of usage + message."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


def _progress(args) -> bool:
    """Progress bars only on a terminal; otherwise the log's one line per stage is the progress."""
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


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


def _parse_classes(text: str, num_classes: int, labels: torch.Tensor | None = None) -> list[int]:
    try:
        classes = sorted({int(c) for c in str(text).split(",") if c.strip() != ""})
    except ValueError:
        raise UsageError(f"--classes must be comma-separated integers, got {text!r}") from None
    if not classes or min(classes) < 0 or max(classes) >= num_classes:
        raise UsageError(f"--classes must name classes in [0, {num_classes}), got {text!r}")
    if len(classes) >= num_classes:
        raise UsageError(f"--classes names all {num_classes} classes: nothing would remain to classify")
    if labels is not None:
        present = set(torch.unique(labels).tolist())
        empty = [c for c in classes if c not in present]
        if empty:
            raise UsageError(f"--classes {','.join(map(str, empty))}: no training sample has that label, "
                             "so there is nothing to forget (the forget set is empty)")
        if present <= set(classes):
            raise UsageError("--classes covers every label in the training data: no retain data would be left")
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


def _same_path(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _inside(path: str, folder: str) -> bool:
    folder = os.path.realpath(folder)
    return os.path.realpath(path).startswith(folder.rstrip(os.sep) + os.sep)


def _check_outputs(outputs: list[str], inputs: list[tuple[str, str]]) -> None:
    """No output may be (or lie inside) an input: ``inputs`` are (flag, path) pairs."""
    for out in outputs:
        for flag, path in inputs:
            if path and (_same_path(out, path) or (os.path.isdir(path) and _inside(out, path))):
                raise UsageError(f"the output {out!r} would overwrite the input {flag} {path!r} "
                                 "(inputs are never overwritten)")


def _prepare_folder(folder: str, flag: str) -> None:
    """Create ``folder`` when missing and make sure files can be created in it (before any work)."""
    folder = folder or "."
    try:
        os.makedirs(folder, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".tmp-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise UsageError(f"cannot write to the {flag} folder {folder!r}: {exc.strerror or exc}") from None


def _would_create(folders: list[str]) -> list[str]:
    """The first missing ancestor of each folder (what ``makedirs`` would create), for clean-up."""
    out = []
    for f in folders:
        f = os.path.abspath(f or ".")
        top = None
        while not os.path.exists(f):
            top, f = f, os.path.dirname(f)
        if top:
            out.append(top)
    return out


def _byo_given(args) -> bool:
    return any(getattr(args, k, None) for k in ("arch", "weights", "data"))


def _load_byo(args, device):
    """``(model, meta, (train, test, info))`` from --arch/--arch-kwargs/--weights/--data/--normalize."""
    missing = [f"--{k}" for k in ("arch", "weights", "data") if not getattr(args, k, None)]
    if missing:
        raise UsageError(f"a model of your own needs --arch, --weights and --data (missing {', '.join(missing)})")
    if getattr(args, "ckpt", None):
        raise UsageError("give either --ckpt or --arch/--weights/--data, not both")
    kwargs = custom.parse_arch_kwargs(args.arch_kwargs)
    data = custom.load_data(args.data, custom.parse_normalize(args.normalize))
    model, _ = custom.load_model(args.arch, kwargs, args.weights, device)
    custom.check_model_fits_data(model, data[0], data[2], device)
    meta = {"model": args.arch, "arch": args.arch, "arch_kwargs": kwargs, "dataset": data[2].name,
            "num_classes": data[2].num_classes}
    return model, meta, data


def _byo_train_config(args) -> TrainConfig:
    """Retrain's recipe for a model of one's own: the flags over ``TrainConfig``'s defaults."""
    return TrainConfig(epochs=args.epochs or 3, lr=args.lr, batch_size=args.batch_size)


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------

def cmd_train(args) -> int:
    device = _device(args.device)
    log = _logger(args)
    _check_outputs([args.out], [])
    _prepare_folder(os.path.dirname(os.path.abspath(args.out)), "--out")
    model, meta = train_original(_dataset(args.dataset), args.model, device, args.seed, epochs=args.epochs,
                                 progress=_progress(args), log=log)
    save_checkpoint(args.out, model, meta)
    log(f"wrote {args.out} (trained in {meta['train_seconds']:.1f} s)")
    return 0


def cmd_forget(args) -> int:
    device = _device(args.device)
    byo = _byo_given(args)
    if not byo and not args.ckpt:
        raise UsageError("give --ckpt (a `dfmu train` checkpoint) or --arch, --weights and --data (your own)")
    out_dir = args.report_dir or os.path.splitext(args.out)[0] + "-report"
    record = args.record or record_path_for(args.out)
    inputs = [("--ckpt", args.ckpt), ("--weights", args.weights), ("--data", args.data)]
    _check_outputs([args.out, record, out_dir, os.path.join(out_dir, "report.json"),
                    os.path.join(out_dir, "report.png")], inputs)
    if len({os.path.realpath(p) for p in (args.out, record)}) < 2:
        raise UsageError("--record must differ from --out")
    for flag, path in (("--out", args.out), ("--record", record)):
        if os.path.isdir(path):
            raise UsageError(f"{flag} {path!r} is a folder; name the file to write")
    factory = train_config = data = None
    if byo:
        model, meta, data = _load_byo(args, device)
        labels = dataset_labels(data[0])
        factory = lambda: custom.build_arch(args.arch, meta["arch_kwargs"])  # noqa: E731
        train_config = _byo_train_config(args)
    else:
        model, meta = _load(args.ckpt, device)
        labels = None
    classes = _parse_classes(args.classes, meta["num_classes"], labels)
    comm = distributed.current_comm()
    folders = [os.path.dirname(os.path.abspath(p)) for p in (args.out, record)] + [out_dir]
    created = _would_create(folders)
    if comm.is_main:
        for folder, flag in zip(folders, ("--out", "--record", "--report-dir")):
            _prepare_folder(folder, flag)
    # The record is built beside its final name and moved there only after the output is written,
    # so a record never describes an output that is not there.
    partial = os.path.join(os.path.dirname(os.path.abspath(record)), f".tmp-{os.getpid()}-{os.path.basename(record)}")
    try:
        run_forget(model, meta, classes, out_dir, device=device, seed=args.seed,
                   retain_fraction=args.retain_fraction, mode=args.mode, retrain=args.retrain,
                   progress=_progress(args), log=_logger(args), comm=comm, data=data, model_factory=factory,
                   train_config=train_config, record=partial)
        if comm.is_main:
            _write_forget_outputs(args, model, meta, classes, byo, partial, record)
    except ValueError:
        if comm.is_main:  # an input error found by the library: leave nothing behind
            _remove(partial)
            for top in created:  # folders this call created: remove those left empty, deepest first
                for folder, _, _ in (os.walk(top, topdown=False) if os.path.isdir(top) else ()):
                    if not any(os.scandir(folder)):
                        os.rmdir(folder)
        raise
    finally:
        if comm.is_main:
            _remove(partial)
    return 0


def _remove(path: str) -> None:
    if os.path.isfile(path):
        os.unlink(path)


def _write_forget_outputs(args, model, meta, classes, byo, partial, record) -> None:
    """The unlearned model at --out, then its deletion record (completed from ``partial``) at --record."""
    if byo:  # a bare state_dict, loadable into the user's architecture
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
        atomic_write_bytes(args.out, buf.getvalue())
    else:
        save_checkpoint(args.out, model, {**meta, "forgotten_classes": classes})
    rec = read_record(partial)
    if rec["output"]["weights_sha256"] != state_dict_sha256(model):
        raise RuntimeError("the model changed after unlearning: the record would not describe --out")
    rec["input"]["path"] = os.path.abspath(args.weights if byo else args.ckpt)
    rec["output"]["path"] = os.path.abspath(args.out)
    if byo:
        rec["model"] = {"arch": args.arch, "arch_kwargs": meta["arch_kwargs"]}
        rec["data"]["path"] = os.path.abspath(args.data)
    else:
        rec["model"] = {"name": meta["model"], "model_kwargs": meta.get("model_kwargs", {})}
    write_record(record, rec)
    _logger(args)(f"wrote {args.out} and its deletion record {record}")


def cmd_verify(args) -> int:
    ok, expected, actual = verify(args.record, args.weights)
    if ok:
        print(f"OK: {args.weights} is the output the record describes (sha256 {actual[:16]}...)")
        return 0
    print(f"MISMATCH: {args.weights} has weights sha256 {actual[:16]}..., the record describes "
          f"{expected[:16]}...")
    return 1


def cmd_demo(args) -> int:
    device = _device(args.device)
    dataset = _dataset(args.dataset)
    if args.dataset == "auto" and dataset != "fashion-mnist":
        print(f"note: Fashion-MNIST was not found; the demo uses {dataset} "
              "(install the Debian package dataset-fashion-mnist or set $DFMU_DATA)")
    log = _logger(args)
    model, meta = cached_original(dataset, args.model, device, args.seed, epochs=args.epochs,
                                  progress=_progress(args), log=log)
    classes = _parse_classes(args.classes, meta["num_classes"])
    run_forget(model, meta, classes, args.out_dir, device=device, seed=args.seed, retain_fraction=args.retain_fraction,
               mode=args.mode, retrain=args.retrain, progress=_progress(args), log=log)
    return 0


def cmd_compare(args) -> int:
    device = _device(args.device)
    fractions = _parse_fractions(args.fractions)
    try:
        methods = resolve_methods(args.methods)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.seeds < 1:
        raise UsageError("--seeds must be >= 1")
    extra = {}
    if _byo_given(args):
        inputs = [("--weights", args.weights), ("--data", args.data)]
        _check_outputs([args.out_dir, os.path.join(args.out_dir, "comparison.json")], inputs)
        model, meta, data = _load_byo(args, device)
        classes = _parse_classes(args.classes, data[2].num_classes, dataset_labels(data[0]))
        extra = dict(data=data, original=model, train_config=_byo_train_config(args),
                     model_factory=lambda: custom.build_arch(args.arch, meta["arch_kwargs"]))
        dataset, model_name = None, os.path.basename(args.arch)
    else:
        dataset = _dataset(args.dataset)
        _, _, info = data_mod.load_dataset(dataset)
        classes = _parse_classes(args.classes, info.num_classes)
        model_name = args.model
    _prepare_folder(args.out_dir, "--out-dir")
    run_comparison(dataset, model_name, classes, fractions, args.seeds, methods, device,
                   args.out_dir, max_epochs=args.max_epochs, train_epochs=args.epochs,
                   use_cache=not args.no_cache, progress=_progress(args), quiet=args.quiet, **extra)
    return 0


# --------------------------------------------------------------------------------------------
# parsers
# --------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dfmu", description="Data-Frugal Machine Unlearning: make a classifier forget classes.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND")

    def device_quiet(sp):
        sp.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto, CUDA when present)")
        sp.add_argument("--quiet", action="store_true", help="no progress bars or log lines (progress bars appear "
                                                             "only on a terminal; elsewhere one line per stage)")

    def common(sp):
        device_quiet(sp)
        sp.add_argument("--seed", type=int, default=0, help="seed of the original's training and of the unlearning "
                                                            "(default: 0)")

    def forgetting(sp):
        sp.add_argument("--classes", default="3", help="comma-separated class ids to forget (default: 3)")
        sp.add_argument("--retain-fraction", type=float, default=0.13,
                        help="share of the retain data used, in (0, 1] (default: 0.13)")
        sp.add_argument("--mode", choices=["prune", "rescale"], default="prune",
                        help="zero the selected units (prune, the default) or dampen them (rescale)")
        sp.add_argument("--retrain", action="store_true", help="also retrain from scratch for comparison")

    def dataset_and_model(sp, own=False):
        sp.add_argument("--dataset", default="auto", help="fashion-mnist | cifar10 | digits | auto (default: auto, "
                                                          "Fashion-MNIST when installed, else digits)")
        sp.add_argument("--model", default="cnn", choices=list(MODEL_NAMES),
                        help="the package model to train (default: cnn)")
        sp.add_argument("--epochs", type=int, default=None,
                        help="override the training recipe's epochs (of the original and of Retrain"
                             + ("; with --arch: Retrain's epochs, default 3)" if own else ")"))

    def own_model(sp, data_help_extra=""):
        g = sp.add_argument_group("a model and data of your own (instead of --ckpt / --dataset)")
        g.add_argument("--arch", default=None, metavar="MODULE:CALLABLE",
                       help="builds the nn.Module: an importable 'package.module:fn' or 'path/file.py:fn'")
        g.add_argument("--arch-kwargs", default=None, metavar="JSON",
                       help="keyword arguments for the --arch callable, a JSON object, e.g. '{\"width\": 16}'")
        g.add_argument("--weights", default=None, metavar="PATH",
                       help="a state_dict file (or a checkpoint dict holding 'state_dict'), loaded with "
                            "weights_only=True and matched strictly to --arch")
        g.add_argument("--data", default=None, metavar="PATH",
                       help="a .pt/.npz file with train_x, train_y, test_x, test_y (fed to the model as given), "
                            "or a folder with train/<class>/*.png and test/<class>/*.png (read as floats in [0, 1])"
                            + data_help_extra)
        g.add_argument("--normalize", default=None, metavar="MEAN,STD",
                       help="image folders only: map pixels x -> (x - MEAN) / STD (one pair for all channels, or "
                            "C means then C stds)")
        g.add_argument("--lr", type=float, default=0.05, help="with --arch: Retrain's learning rate (default: 0.05; "
                                                              "SGD momentum 0.9, cosine schedule)")
        g.add_argument("--batch-size", type=int, default=128, help="with --arch: Retrain's batch size (default: 128)")

    t = sub.add_parser("train", help="train the original model")
    dataset_and_model(t)
    t.add_argument("--out", required=True, help="checkpoint to write (its folder is created when missing)")
    common(t)
    t.set_defaults(func=cmd_train)

    f = sub.add_parser("forget", help="make a trained model forget classes; writes the model, a report and a "
                                      "deletion record")
    f.add_argument("--ckpt", default=None, help="checkpoint of the trained model (written by `dfmu train`)")
    f.add_argument("--out", required=True, help="the unlearned model to write (a `dfmu` checkpoint with --ckpt, "
                                                "a bare state_dict with --arch); its folder is created when missing")
    f.add_argument("--report-dir", default=None, help="where report.json/png go (default: <out stem>-report)")
    f.add_argument("--record", default=None, help="where the deletion record goes (default: <out stem>.record.json)")
    f.add_argument("--epochs", type=int, default=None, help="with --arch and --retrain: Retrain's epochs (default: 3)")
    forgetting(f)
    own_model(f)
    common(f)
    f.set_defaults(func=cmd_forget)

    v = sub.add_parser("verify", help="check that a weights file is the output a deletion record describes "
                                      "(exit 0 yes, 1 no, 2 error)")
    v.add_argument("--record", required=True, help="the deletion record (JSON) written by `dfmu forget` or "
                                                   "unlearn(record=...)")
    v.add_argument("--weights", required=True, help="the weights file to check (a state_dict or a checkpoint "
                                                    "holding one)")
    v.set_defaults(func=cmd_verify)

    d = sub.add_parser("demo", help="train (or reuse) the default model, forget one class, print the table")
    dataset_and_model(d)
    d.add_argument("--out-dir", default="runs/demo", help="where report.json/png go (default: runs/demo)")
    forgetting(d)
    common(d)
    d.set_defaults(func=cmd_demo)

    c = sub.add_parser("compare", help="compare DFMU with the baselines (table, JSON, plots)")
    dataset_and_model(c, own=True)
    c.add_argument("--classes", default="3", help="comma-separated class ids to forget (default: 3)")
    c.add_argument("--fractions", default="0.01,0.05,0.13,0.25,1.0",
                   help="comma-separated retain-data fractions (default: 0.01,0.05,0.13,0.25,1.0)")
    c.add_argument("--seeds", type=int, default=3, help="number of seeds, 0..N-1 (default: 3)")
    c.add_argument("--methods", default="all", help="'all' or comma-separated: " + ",".join(SPECS))
    c.add_argument("--out-dir", default="runs/compare",
                   help="where comparison.json and the plots go (default: runs/compare; created when missing)")
    c.add_argument("--max-epochs", type=int, default=None,
                   help="cap the epochs of the epoch-based baselines (quick runs); Retrain keeps its recipe")
    c.add_argument("--no-cache", action="store_true", help="train the originals afresh, do not use the cache")
    own_model(c)
    device_quiet(c)
    c.set_defaults(func=cmd_compare)
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if not 0.0 < args.__dict__.get("retain_fraction", 0.5) <= 1.0:
            raise UsageError("--retain-fraction must be in (0, 1]")
        if distributed.env_world_size() > 1:
            return _main_distributed(args)
        return args.func(args)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        raise
    except ValueError as exc:
        # The library's documented input errors (ValueError and its subclasses: CheckpointError,
        # WeightsError, InputError, RecordError, the argument checks of unlearn/evaluate/the ops).
        # Other exceptions are bugs: they keep their traceback.
        err = UsageError(_one_line(exc))
        print(err, file=sys.stderr)
        raise err from None


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


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

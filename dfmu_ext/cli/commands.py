"""What each ``dfmu`` subcommand does, on top of the library."""
from __future__ import annotations

import io
import os

import torch

from .. import distributed
from .._io import atomic_write_bytes
from ..baselines import resolve_methods
from ..experiments import run_comparison, run_forget
from ..experiments.scenarios import run_scenario
from ..record import read_record, record_path_for, verify, write_record
from ..splits import dataset_labels
from ..steps import StepOptions
from ..weights import state_dict_sha256
from ..zoo import custom
from ..zoo import data as data_mod
from ..zoo.checkpoints import cached_original, save_checkpoint, train_original
from ..zoo.training import TrainConfig
from .checks import (UsageError, check_outputs, load_ckpt, logger_for, parse_classes, parse_dataset, parse_device,
                     parse_fractions, prepare_folder, progress_enabled, would_create)


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
    device = parse_device(args.device)
    log = logger_for(args)
    check_outputs([args.out], [])
    prepare_folder(os.path.dirname(os.path.abspath(args.out)), "--out")
    model, meta = train_original(parse_dataset(args.dataset), args.model, device, args.seed, epochs=args.epochs,
                                 progress=progress_enabled(args), log=log)
    save_checkpoint(args.out, model, meta)
    log(f"wrote {args.out} (trained in {meta['train_seconds']:.1f} s)")
    return 0


def cmd_forget(args) -> int:
    device = parse_device(args.device)
    steps = _steps(args, device)
    byo = _byo_given(args)
    if not byo and not args.ckpt:
        raise UsageError("give --ckpt (a `dfmu train` checkpoint) or --arch, --weights and --data (your own)")
    out_dir = args.report_dir or os.path.splitext(args.out)[0] + "-report"
    record = args.record or record_path_for(args.out)
    inputs = [("--ckpt", args.ckpt), ("--weights", args.weights), ("--data", args.data)]
    check_outputs([args.out, record, out_dir, os.path.join(out_dir, "report.json"),
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
        model, meta = load_ckpt(args.ckpt, device)
        labels = None
    classes = None if _scenario(args) else parse_classes(args.classes, meta["num_classes"], labels)
    comm = distributed.current_comm()
    folders = [os.path.dirname(os.path.abspath(p)) for p in (args.out, record)] + [out_dir]
    created = would_create(folders)
    if comm.is_main:
        for folder, flag in zip(folders, ("--out", "--record", "--report-dir")):
            prepare_folder(folder, flag)
    # The record is built beside its final name and moved there only after the output is written,
    # so a record never describes an output that is not there.
    partial = os.path.join(os.path.dirname(os.path.abspath(record)), f".tmp-{os.getpid()}-{os.path.basename(record)}")
    try:
        run_forget(model, meta, classes, out_dir, device=device, seed=args.seed,
                   retain_fraction=args.retain_fraction, mode=args.mode, retrain=args.retrain,
                   progress=progress_enabled(args), log=logger_for(args), comm=comm, data=data, model_factory=factory,
                   train_config=train_config, record=partial, steps=steps, battery=args.battery,
                   **_scenario(args))
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
    logger_for(args)(f"wrote {args.out} and its deletion record {record}")


def cmd_verify(args) -> int:
    ok, expected, actual = verify(args.record, args.weights)
    if ok:
        print(f"OK: {args.weights} is the output the record describes (sha256 {actual[:16]}...)")
        return 0
    print(f"MISMATCH: {args.weights} has weights sha256 {actual[:16]}..., the record describes "
          f"{expected[:16]}...")
    return 1


def cmd_demo(args) -> int:
    device = parse_device(args.device)
    steps = _steps(args, device)
    dataset = parse_dataset(args.dataset)
    if args.dataset == "auto" and dataset != "fashion-mnist":
        print(f"note: Fashion-MNIST was not found; the demo uses {dataset} "
              "(install the Debian package dataset-fashion-mnist or set $DFMU_DATA)")
    log = logger_for(args)
    model, meta = cached_original(dataset, args.model, device, args.seed, epochs=args.epochs,
                                  progress=progress_enabled(args), log=log)
    classes = None if _scenario(args) else parse_classes(args.classes, meta["num_classes"])
    run_forget(model, meta, classes, args.out_dir, device=device, seed=args.seed, retain_fraction=args.retain_fraction,
               mode=args.mode, retrain=args.retrain, progress=progress_enabled(args), log=log, **_scenario(args),
               steps=steps, battery=args.battery)
    return 0


def _scenario(args) -> dict:
    """``--forget-subclass`` / ``--forget-random`` as run_forget's keywords ({} for --classes)."""
    if getattr(args, "forget_subclass", None) is not None:
        return {"subclass": args.forget_subclass}
    if getattr(args, "forget_random", None) is not None:
        if not 0.0 < args.forget_random < 1.0:
            raise UsageError(f"--forget-random must lie in (0, 1), got {args.forget_random}")
        return {"random_fraction": args.forget_random}
    return {}


def _steps(args, device) -> StepOptions:
    """--precision / --channels-last, checked against the device (StepOptions.validate) before any
    work starts; argparse has already limited both to valid names, so only the device can object."""
    layout = {"auto": "auto", "on": True, "off": False}[args.channels_last]
    options = StepOptions(precision=args.precision, channels_last=layout)
    try:
        options.validate(device)
    except ValueError:
        raise UsageError(f"--precision {args.precision} needs a CUDA device (got {device}); use bf16 or fp32 "
                         "on the CPU") from None
    return options


def cmd_compare(args) -> int:
    device = parse_device(args.device)
    steps = _steps(args, device)
    fractions = parse_fractions(args.fractions)
    try:
        methods = resolve_methods(args.methods)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.seeds < 1:
        raise UsageError("--seeds must be >= 1")
    extra = {}
    if _byo_given(args):
        inputs = [("--weights", args.weights), ("--data", args.data)]
        check_outputs([args.out_dir, os.path.join(args.out_dir, "comparison.json")], inputs)
        model, meta, data = _load_byo(args, device)
        classes = parse_classes(args.classes, data[2].num_classes, dataset_labels(data[0]))
        extra = dict(data=data, original=model, train_config=_byo_train_config(args),
                     model_factory=lambda: custom.build_arch(args.arch, meta["arch_kwargs"]))
        dataset, model_name = None, os.path.basename(args.arch)
    else:
        dataset = parse_dataset(args.dataset)
        _, _, info = data_mod.load_dataset(dataset)
        classes = None if _scenario(args) else parse_classes(args.classes, info.num_classes)
        model_name = args.model
    prepare_folder(args.out_dir, "--out-dir")
    if _scenario(args):
        if extra:
            raise UsageError("--forget-subclass / --forget-random run on the package's data sets, not with --arch")
        for frac in fractions:
            run_scenario(dataset, model_name, **_scenario(args), fraction=frac, seeds=args.seeds, methods=methods,
                         device=device, use_cache=not args.no_cache, max_epochs=args.max_epochs,
                         train_epochs=args.epochs, progress=progress_enabled(args), quiet=args.quiet,
                         steps=steps, out_dir=args.out_dir if len(fractions) == 1 else os.path.join(args.out_dir, f"retain{frac:g}"))
        return 0
    run_comparison(dataset, model_name, classes, fractions, args.seeds, methods, device,
                   args.out_dir, max_epochs=args.max_epochs, train_epochs=args.epochs,
                   use_cache=not args.no_cache, progress=progress_enabled(args), quiet=args.quiet,
                   battery=not args.no_battery, steps=steps, **extra)
    return 0


# --------------------------------------------------------------------------------------------
# parsers
# --------------------------------------------------------------------------------------------

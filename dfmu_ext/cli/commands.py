"""What each ``dfmu`` subcommand does, on top of the library. The files one call writes go through
one :class:`dfmu_ext._io.OutputBatch`: published together at the end, or none of them."""
from __future__ import annotations

import contextlib
import io
import json
import os

import torch

from .. import distributed
from . import lm_commands
from .._io import OutputBatch, atomic_write_bytes
from ..baselines import resolve_methods
from ..experiments import run_comparison, run_forget
from ..experiments.scenarios import run_scenario
from ..record import read_record, record_path_for, verify, write_record
from ..splits import dataset_labels
from ..steps import StepOptions
from ..weights import state_dict_sha256
from ..lm import folders as hf_folders
from ..zoo import custom, custom_data
from ..zoo import data as data_mod
from ..zoo.checkpoints import cached_original, save_checkpoint, train_original
from ..training.classifier import TrainConfig
from .checks import (DEFAULT_CLASSES, UsageError, check_outputs, check_subclass, load_ckpt, load_named_dataset,
                     logger_for, parse_classes, parse_dataset, parse_device, parse_forget_indices, parse_fractions,
                     prepare_folder, progress_enabled)


#: The retain-data fractions `dfmu compare` runs when --fractions is not given.
DEFAULT_FRACTIONS = "0.01,0.05,0.13,0.25,1.0"


def _byo_given(args) -> bool:
    return any(getattr(args, k, None) for k in ("arch", "hf_config", "hf_model", "weights", "data"))


def _load_byo(args, device):
    """``(model, meta, (train, test, info))`` from --arch/--arch-kwargs (or --hf-config)/--weights/--data/--normalize."""
    if getattr(args, "hf_model", None):  # a save_pretrained folder: its config.json builds, its safetensors fill
        if args.hf_config or args.weights or args.arch:
            raise UsageError("give either --hf-model or --hf-config/--arch with --weights, not both")
        hf_folders.read_config(args.hf_model)
        if getattr(args, "out", None):
            hf_folders.check_new_folder(args.out, [args.hf_model])
        args.hf_config = args.weights = args.hf_model
    if getattr(args, "hf_config", None):
        if args.arch or args.arch_kwargs:
            raise UsageError("give either --hf-config or --arch/--arch-kwargs, not both")
        # a transformers config is one more architecture: the callable that builds it, with the config's path
        args.arch = f"{custom.__name__}:hf_from_config"
        args.arch_kwargs = json.dumps({"config": os.path.abspath(args.hf_config)})
    missing = [f"--{k}" for k in ("arch", "weights", "data") if not getattr(args, k, None)]
    if missing:
        raise UsageError(f"a model of your own needs --arch, --weights and --data (missing {', '.join(missing)})")
    if getattr(args, "ckpt", None):
        raise UsageError("give either --ckpt or --arch/--weights/--data, not both")
    kwargs = custom.parse_arch_kwargs(args.arch_kwargs)
    data = custom_data.load_data(args.data, custom_data.parse_normalize(args.normalize))
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
    if args.task == "lm":
        return lm_commands.cmd_lm_train(args)
    device = parse_device(args.device)
    log = logger_for(args)
    check_outputs([args.out], [])
    with OutputBatch() as batch:
        prepare_folder(os.path.dirname(os.path.abspath(args.out)), "--out", batch)
        dataset = parse_dataset(args.dataset)
        model, meta = train_original(dataset, args.model or data_mod.default_model(dataset), device, args.seed,
                                     epochs=args.epochs,
                                     progress=progress_enabled(args), log=log)
        save_checkpoint(batch.file(args.out), model, meta)
        batch.publish()
    log(f"wrote {args.out} (trained in {meta['train_seconds']:.1f} s)")
    return 0


def cmd_forget(args) -> int:
    if args.task == "lm":
        return lm_commands.cmd_lm_forget(args)
    if getattr(args, "nonmember_data", None):
        raise UsageError("--nonmember-data goes with --task lm --hf-model")
    for flag in ("relearn_step", "relearn_moves"):
        if getattr(args, flag, None) is not None:
            raise UsageError(f"--{flag.replace('_', '-')} goes with --task lm")
    device = parse_device(args.device)
    steps = _steps(args, device)
    byo = _byo_given(args)
    if not byo and not args.ckpt:
        raise UsageError("give --ckpt (a `dfmu train` checkpoint) or --arch, --weights and --data (your own)")
    out_dir = args.report_dir or os.path.splitext(args.out)[0] + "-report"
    record = args.record or record_path_for(args.out)
    inputs = [("--ckpt", args.ckpt), ("--weights", args.weights), ("--data", args.data),
              ("--forget-indices", args.forget_indices)]
    check_outputs([args.out, record, out_dir, os.path.join(out_dir, "report.json"),
                    os.path.join(out_dir, "report.png")], inputs)
    if len({os.path.realpath(p) for p in (args.out, record)}) < 2:
        raise UsageError("--record must differ from --out")
    for flag, path in (("--out", args.out), ("--record", record)):
        if os.path.isdir(path):
            raise UsageError(f"{flag} {path!r} is a folder; name the file to write")
    factory = train_config = data = train_set = info = None
    if byo:
        model, meta, data = _load_byo(args, device)
        train_set, info = data[0], data[2]
        factory = lambda: custom.build_arch(args.arch, meta["arch_kwargs"])  # noqa: E731
        train_config = _byo_train_config(args)
    else:
        model, meta = load_ckpt(args.ckpt, device)
        if _needs_training_data(args):
            train_set, _, info = load_named_dataset(meta["dataset"])
    classes, scenario = _forget_request(args, meta["num_classes"], train_set, info)
    comm = distributed.current_comm()
    # Only rank 0 writes. The report, the model and its record are staged and published together at
    # the end, the record last: a record never describes an output that is not there.
    batch = OutputBatch(protect=[p for _, p in inputs]) if comm.is_main else None
    with batch if batch is not None else contextlib.nullcontext():
        if batch is not None:
            for folder, flag in ((os.path.dirname(os.path.abspath(args.out)), "--out"),
                                 (os.path.dirname(os.path.abspath(record)), "--record"), (out_dir, "--report-dir")):
                prepare_folder(folder, flag, batch)
        partial = batch.file(record, last=True) if batch is not None else record  # rank 0 alone writes it
        run_forget(model, meta, classes, out_dir, device=device, seed=args.seed,
                   retain_fraction=args.retain_fraction, mode=args.mode, retrain=args.retrain,
                   progress=progress_enabled(args), log=logger_for(args), comm=comm, data=data, model_factory=factory,
                   train_config=train_config, record=partial, steps=steps, battery=args.battery, outputs=batch,
                   **scenario)
        if batch is not None:
            _write_forget_outputs(args, model, meta, classes, byo, partial, batch)
            batch.publish()
            logger_for(args)(f"wrote {args.out}, its deletion record {record} and report.json/png in {out_dir}")
    return 0


def _write_forget_outputs(args, model, meta, classes, byo, partial, batch: OutputBatch) -> None:
    """Stage the unlearned model for --out, then complete its deletion record (``partial``, staged for
    --record). ``batch.publish`` moves both into place."""
    out = batch.file(args.out)
    hf = getattr(args, "hf_model", None)
    if hf:  # a save_pretrained folder as the input was, its tokenizer (if any) copied; hashed as saved
        folder_sha = hf_folders.save_folder(model, hf_folders.read_tokenizer(hf, required=False), out)
    elif byo:  # a bare state_dict, loadable into the user's architecture
        buf = io.BytesIO()
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
        atomic_write_bytes(out, buf.getvalue())
    else:
        save_checkpoint(out, model, {**meta, "forgotten_classes": classes})
    rec = read_record(partial)
    if rec["output"]["weights_sha256"] != state_dict_sha256(model):
        raise RuntimeError("the model changed after unlearning: the record would not describe --out")
    if hf:
        rec["output"].update(model_state_sha256=rec["output"]["weights_sha256"], weights_sha256=folder_sha)
    rec["input"]["path"] = os.path.abspath(args.weights if byo else args.ckpt)
    rec["output"]["path"] = os.path.abspath(args.out)
    if args.forget_indices is not None:
        rec["forgotten"]["indices_file"] = os.path.abspath(args.forget_indices)
    if byo:
        rec["model"] = {"arch": args.arch, "arch_kwargs": meta["arch_kwargs"]}
        rec["data"]["path"] = os.path.abspath(args.data)
    else:
        rec["model"] = {"name": meta["model"], "model_kwargs": meta.get("model_kwargs", {})}
    write_record(partial, rec)


def cmd_verify(args) -> int:
    ok, expected, actual = verify(args.record, args.weights)
    if ok:
        print(f"OK: {args.weights} is the output the record describes (sha256 {actual[:16]}...)")
        return 0
    print(f"MISMATCH: {args.weights} has weights sha256 {actual[:16]}..., the record describes "
          f"{expected[:16]}...")
    return 1


def cmd_demo(args) -> int:
    if args.task == "lm":
        return lm_commands.cmd_lm_demo(args)
    device = parse_device(args.device)
    steps = _steps(args, device)
    dataset = parse_dataset(args.dataset)
    check_outputs([args.out_dir, os.path.join(args.out_dir, "report.json"), os.path.join(args.out_dir, "report.png")],
                  [("--forget-indices", args.forget_indices)])
    train_set, _, info = load_named_dataset(dataset)
    classes, scenario = _forget_request(args, info.num_classes, train_set, info)
    if args.dataset == "auto" and dataset != "fashion-mnist":
        print(f"note: Fashion-MNIST was not found; the demo uses {dataset} "
              "(install the Debian package dataset-fashion-mnist or set $DFMU_DATA)")
    log = logger_for(args)
    model, meta = cached_original(dataset, args.model or data_mod.default_model(dataset), device, args.seed,
                                  epochs=args.epochs,
                                  progress=progress_enabled(args), log=log)
    with OutputBatch(protect=[args.forget_indices]) as batch:
        prepare_folder(args.out_dir, "--out-dir", batch)
        run_forget(model, meta, classes, args.out_dir, device=device, seed=args.seed,
                   retain_fraction=args.retain_fraction, mode=args.mode, retrain=args.retrain,
                   progress=progress_enabled(args), log=log, steps=steps, battery=args.battery, outputs=batch,
                   **scenario)
        batch.publish()
    log(f"wrote report.json and report.png in {args.out_dir}")
    return 0


def _needs_training_data(args) -> bool:
    """--forget-indices and --forget-subclass are checked against the training data before any work."""
    return args.forget_indices is not None or args.forget_subclass is not None


def _forget_request(args, num_classes: int, train_set=None, info=None) -> tuple[list[int] | None, dict]:
    """What to forget, checked before any work: ``(classes, {})`` for --classes (default 3), or
    ``(None, keywords)`` for run_forget / run_scenario from --forget-subclass, --forget-random or
    --forget-indices (argparse lets only one of the four through). ``train_set`` and ``info``, the
    training data, are needed for the sub-class and the indices; with them --classes is also
    checked against the labels."""
    labels = dataset_labels(train_set) if train_set is not None else None
    if args.forget_indices is not None:
        return None, {"forget_indices": parse_forget_indices(args.forget_indices, labels, info.class_names)}
    if args.forget_subclass is not None:
        check_subclass(info, args.forget_subclass, labels)
        return None, {"subclass": args.forget_subclass}
    if args.forget_random is not None:
        if not 0.0 < args.forget_random < 1.0:
            raise UsageError(f"--forget-random must lie in (0, 1), got {args.forget_random}")
        return None, {"random_fraction": args.forget_random}
    return parse_classes(args.classes or DEFAULT_CLASSES, num_classes, labels), {}


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
    if args.task == "lm":
        return lm_commands.cmd_lm_compare(args)
    device = parse_device(args.device)
    steps = _steps(args, device)
    fractions = parse_fractions(args.fractions or DEFAULT_FRACTIONS)
    try:
        methods = resolve_methods(args.methods)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.seeds < 1:
        raise UsageError("--seeds must be >= 1")
    inputs = [("--weights", args.weights), ("--data", args.data), ("--forget-indices", args.forget_indices)]
    check_outputs([args.out_dir, os.path.join(args.out_dir, "comparison.json")], inputs)
    extra = {}
    if _byo_given(args):
        model, meta, data = _load_byo(args, device)
        train_set, info = data[0], data[2]
        extra = dict(data=data, original=model, train_config=_byo_train_config(args),
                     model_factory=lambda: custom.build_arch(args.arch, meta["arch_kwargs"]))
        dataset, model_name = None, os.path.basename(args.arch)
    else:
        dataset = parse_dataset(args.dataset)
        train_set, _, info = load_named_dataset(dataset)
        model_name = args.model or data_mod.default_model(dataset)
    classes, scenario = _forget_request(args, info.num_classes, train_set, info)
    common = dict(max_epochs=args.max_epochs, train_epochs=args.epochs, use_cache=not args.no_cache,
                  progress=progress_enabled(args), quiet=args.quiet, steps=steps, **extra)
    with OutputBatch(protect=[p for _, p in inputs]) as batch:
        prepare_folder(args.out_dir, "--out-dir", batch)
        if scenario:
            for frac in fractions:
                out_dir = args.out_dir if len(fractions) == 1 else os.path.join(args.out_dir, f"retain{frac:g}")
                run_scenario(dataset, model_name, **scenario, fraction=frac, seeds=args.seeds, methods=methods,
                             device=device, out_dir=out_dir, outputs=batch, **common)
        else:
            run_comparison(dataset, model_name, classes, fractions, args.seeds, methods, device, args.out_dir,
                           battery=not args.no_battery, outputs=batch, **common)
        published = batch.publish()
    if published:
        logger_for(args)(f"wrote {len(published)} files in {args.out_dir}: "
                         + ", ".join(os.path.relpath(p, args.out_dir) for p in published))
    return 0


# --------------------------------------------------------------------------------------------
# parsers
# --------------------------------------------------------------------------------------------

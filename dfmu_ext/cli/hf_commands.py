"""``dfmu forget --task lm --hf-model DIR --out DIR2``: a Hugging Face causal-LM folder and data in
TOFU's format (or JSON lines, or a ``datasets`` folder) in, a save_pretrained folder and its
deletion record out. The folder and the record are published together (the record last), or
neither; the input folder is never written to."""
from __future__ import annotations

import os

from .. import distributed
from .._io import OutputBatch
from ..lm import folders, formats
from ..record import read_record, record_path_for, write_record
from .checks import UsageError, check_outputs, forget_term_kwargs, logger_for, parse_device, prepare_folder, \
    progress_enabled, read_forget_indices

#: Flags of other paths that mean nothing with --hf-model.
_OTHER_FLAGS = ("ckpt", "classes", "forget_subclass", "forget_random", "forget_people", "arch", "arch_kwargs",
                "hf_config", "weights", "normalize", "retrain", "battery", "report_dir")


def _check_flags(args) -> None:
    if not args.hf_model:
        raise UsageError("--forget-data, --retain-data and --nonmember-data read with the model's tokenizer: "
                         "give --hf-model DIR")
    for flag in _OTHER_FLAGS:
        if getattr(args, flag, None):
            raise UsageError(f"--{flag.replace('_', '-')} does not go with --task lm --hf-model (forget rows with "
                             f"--forget-data/--retain-data or --data/--forget-indices)")
    files = args.forget_data is not None or args.retain_data is not None
    if files and (args.data is not None or args.forget_indices is not None):
        raise UsageError("give either --forget-data and --retain-data, or --data with --forget-indices, not both")
    if files and (args.forget_data is None or args.retain_data is None):
        raise UsageError("--forget-data and --retain-data go together (as TOFU ships forget10.json and retain90.json)")
    if not files and (args.data is None or args.forget_indices is None):
        raise UsageError("with --hf-model give --forget-data and --retain-data, or --data with --forget-indices")
    if args.max_length < 2:
        raise UsageError(f"--max-length must be >= 2, got {args.max_length}")


def cmd_lm_forget_hf(args) -> int:
    """Read the folder and the data, run ``dfmu_ext.unlearn`` on them, write the folder and its record."""
    import dfmu_ext

    _check_flags(args)
    term = forget_term_kwargs(args)
    device, log = parse_device(args.device), logger_for(args)
    out = os.path.abspath(args.out.rstrip(os.sep) or args.out)
    record = args.record or record_path_for(out)
    inputs = [("--hf-model", args.hf_model), ("--data", args.data), ("--forget-data", args.forget_data),
              ("--retain-data", args.retain_data), ("--forget-indices", args.forget_indices),
              ("--nonmember-data", args.nonmember_data)]
    check_outputs([out, record], inputs)
    if os.path.realpath(out) == os.path.realpath(record):
        raise UsageError("--record must differ from --out")
    try:
        folders.check_new_folder(out, [args.hf_model] if args.hf_model else [])
    except folders.FolderError as exc:
        raise UsageError(str(exc)) from None
    model, tokenizer = folders.read_causal_lm(args.hf_model, args.dtype, device)
    indices = read_forget_indices(args.forget_indices) if args.forget_indices is not None else None
    data = formats.load_lm_data(tokenizer, data=args.data, forget_indices=indices, forget_data=args.forget_data,
                                retain_data=args.retain_data, max_length=args.max_length)
    nonmembers = None
    if args.nonmember_data is not None:   # e.g. TOFU's holdout10.json, encoded as the forget rows are
        try:
            nonmembers = formats.encode_rows(formats.read_rows(args.nonmember_data), tokenizer, args.max_length,
                                             "--nonmember-data").samples
        except ValueError as exc:
            raise UsageError(f"--nonmember-data: {exc}") from None
    if not distributed.is_main_process():  # torchrun: the same unlearn on every rank; rank 0 alone writes
        dfmu_ext.unlearn(model, data.train, forget_indices=data.forget_indices, retain_fraction=args.retain_fraction,
                         mode=args.mode, seed=args.seed, device=device, nonmembers=nonmembers, **term)
        return 0
    input_sha = folders.folder_sha256(args.hf_model)
    log(f"read {type(model).__name__} ({sum(p.numel() for p in model.parameters()):,} parameters, {args.dtype}) "
        f"and {len(data.train)} sequences, forgetting {len(data.forget_indices)}")
    with OutputBatch(protect=[p for _, p in inputs]) as batch:
        prepare_folder(os.path.dirname(out), "--out", batch)
        prepare_folder(os.path.dirname(os.path.abspath(record)), "--record", batch)
        partial = batch.file(record, last=True)
        res = dfmu_ext.unlearn(model, data.train, forget_indices=data.forget_indices,
                               retain_fraction=args.retain_fraction, mode=args.mode, seed=args.seed, device=device,
                               progress=progress_enabled(args), record=partial, nonmembers=nonmembers, **term)
        output_sha = folders.save_folder(model, tokenizer, batch.file(out))
        rec = read_record(partial)
        # The record describes the folders as files: hashes over the tensors their safetensors hold
        # (the model's own state_dict hash kept beside, it differs only where weights are tied).
        rec["input"].update(model_state_sha256=rec["input"]["weights_sha256"], weights_sha256=input_sha,
                            path=os.path.abspath(args.hf_model), weights_of="safetensors tensors of the folder")
        rec["output"].update(model_state_sha256=rec["output"]["weights_sha256"], weights_sha256=output_sha,
                             path=out, weights_of="safetensors tensors of the folder")
        rec["model"] = {"hf_folder": os.path.abspath(args.hf_model), "class": type(model).__name__,
                        "dtype": args.dtype, "chat_template": bool(getattr(tokenizer, "chat_template", None))}
        rec["data"] = {k: os.path.abspath(v) for k, v in (("data", args.data), ("forget_data", args.forget_data),
                                                         ("retain_data", args.retain_data),
                                                         ("nonmember_data", args.nonmember_data),
                                                         ("forget_indices_file", args.forget_indices)) if v}
        rec["data"]["max_length"] = args.max_length
        write_record(partial, rec)
        batch.publish()
    side = res.info["forget_side"]
    seen = f"; membership AUC against the non-members {side['auc_before']:.3f} -> {side['auc']:.3f}" \
        if side.get("auc") is not None else ""
    log(f"forgot {len(data.forget_indices)} sequences in {res.timings['total']:.1f} s "
        f"({res.retain_samples_used} retain sequences read{seen}); wrote {out} and its deletion record {record}")
    return 0

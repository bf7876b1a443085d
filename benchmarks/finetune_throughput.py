"""The masked fine-tune's throughput vs a bare PyTorch training loop of the same model, precision and
layout, and DFMU end to end, for every step setting the device supports.

    python benchmarks/finetune_throughput.py [--device cuda] [--model resnet18] [--rounds 3] [--out FILE]

For each precision / layout: the bare loop is forward, cross-entropy, backward, ``torch.optim.SGD``
(foreach) over the retain budget, one epoch, through the same :class:`dfmu_ext.steps.StepEngine`;
the masked fine-tune is ``dfmu_ext.tasks.classification.masked_finetune`` with the masks of a real scoring pass
(early stop off, so both see the same samples). Samples per second, median of ``--rounds``
interleaved rounds; the masking overhead is ``1 - masked / bare``. Then ``dfmu_ext.unlearn`` end to
end (scoring, pruning, fine-tune with early stop), the same rounds. Writes a Markdown table.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn.functional as F

import bench_common as bc  # this script's folder is on sys.path when it runs as a script
import dfmu_ext
from dfmu_ext._common import TrainBatches
from dfmu_ext._io import atomic_write_bytes, markdown_table
from dfmu_ext.finetune import FinetuneConfig
from dfmu_ext.tasks.classification import masked_finetune
from dfmu_ext.splits import split_forget_retain, stratified_fraction, take_batch
from dfmu_ext.steps import StepEngine, StepOptions
from dfmu_ext.zoo import data as data_mod
from dfmu_ext import training
from dfmu_ext.zoo import models

CLASSES = [3]


def bare_epoch(model, budget, device, options: StepOptions, batch_size: int) -> float:
    """Samples per second of a plain SGD epoch over ``budget``."""
    engine = StepEngine(model, device, options)
    engine.prepare(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.003, momentum=0.9, weight_decay=5e-4, foreach=True)
    model.train()
    seen = 0
    bc.synchronize(str(device))
    t0 = time.perf_counter()
    for x, y in TrainBatches(budget, batch_size, 0, device, engine=engine):
        with engine.autocast():
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        engine.backward_step(loss, opt)
        seen += x.shape[0]
    bc.synchronize(str(device))
    return seen / (time.perf_counter() - t0)


def masked_epoch(model, budget, device, options: StepOptions, batch_size: int, plan) -> float:
    bc.synchronize(str(device))
    hist = masked_finetune(model, budget, plan, FinetuneConfig(epochs=1, batch_size=batch_size, early_stop=False),
                           device=device, steps=options)
    return hist.samples / hist.seconds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default=None, help="cnn | resnet18 (default: cnn on the CPU, resnet18 on CUDA)")
    p.add_argument("--dataset", default="auto")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--out", default=None)
    p.add_argument("--settings", default=None,
                   help="comma-separated precision:layout pairs, e.g. fp32:off,bf16:on (default: fp32 / bf16 x "
                        "NCHW / channels_last on CUDA, fp32:off,fp32:on,bf16:on on the CPU)")
    args = p.parse_args(argv)
    pairs = [s.split(":") for s in args.settings.split(",")] if args.settings else []
    if any(len(s) != 2 or s[1] not in ("on", "off") for s in pairs):
        p.error(f"--settings takes precision:on|off pairs, got {args.settings!r}")
    device = torch.device(args.device)
    model_name = args.model or ("resnet18" if device.type == "cuda" else "cnn")
    train_set, _, info = data_mod.load_dataset(data_mod.canonical_name(args.dataset))
    config = models.default_train_config(model_name, device.type)
    torch.manual_seed(0)
    original = models.build_model(model_name, info.in_channels, info.num_classes, info.image_size,
                                  **config.model_kwargs).to(device)
    # A briefly trained original is enough for timing (the masks come from a real scoring pass).
    short = training.TrainConfig(**{**config.to_dict(), "epochs": 1})
    training.train_model(original, stratified_fraction(train_set, 0.2, seed=0), short, device=device)
    forget, retain = split_forget_retain(train_set, CLASSES)
    budget = stratified_fraction(retain, 0.13, seed=0)
    xf, yf = take_batch(forget, list(range(256)))
    xr, yr = take_batch(budget, list(range(256)))

    settings = [("fp32", False)] + ([("fp32", True), ("bf16", False), ("bf16", True)] if device.type == "cuda"
                                    else [("fp32", True), ("bf16", True)])
    if device.type == "cuda" and not torch.cuda.is_bf16_supported():
        settings = [s for s in settings if s[0] != "bf16"] + [("fp16", True)]
    if pairs:
        settings = [(prec, layout == "on") for prec, layout in pairs]
    rows = []
    for precision, layout in settings:
        options = StepOptions(precision, layout)
        bare, masked, e2e = [], [], []
        for _ in range(args.rounds):
            m = copy.deepcopy(original)
            bare.append(bare_epoch(m, budget, device, options, args.batch_size))
            m = copy.deepcopy(original)
            pr = dfmu_ext.score_and_prune(m, (torch.cat([xf, xr]), torch.cat([yf, yr])), CLASSES)
            masked.append(masked_epoch(m, budget, device, options, args.batch_size, pr.plan))
            m = copy.deepcopy(original)
            res = dfmu_ext.unlearn(m, train_set, CLASSES, 0.13, device=device, steps=options)
            e2e.append(res.timings)
        b, k = statistics.median(bare), statistics.median(masked)
        total = statistics.median(t["total"] for t in e2e)
        ft = statistics.median(t["finetune"] for t in e2e)
        rows.append([precision, "on" if layout else "off", f"{b:,.0f}", f"{k:,.0f}", f"{100 * (1 - k / b):+.1f}%",
                     f"{total:.3f}", f"{ft:.3f}"])
        print(rows[-1], flush=True)
    table = markdown_table(["precision", "channels_last", "bare loop (samples/s)", "masked fine-tune (samples/s)",
                            "masking overhead", "DFMU end to end (s)", "of which fine-tune (s)"], rows)
    head = (f"{model_name} on {info.name}, {len(budget)} retain samples (13%), batch {args.batch_size}, "
            f"{bc.device_description(str(device)) if hasattr(bc, 'device_description') else device}, "
            f"torch {torch.__version__}, median of {args.rounds} rounds")
    print(head)
    print(table)
    if args.out:
        atomic_write_bytes(args.out, (f"{head}\n\n{table}\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

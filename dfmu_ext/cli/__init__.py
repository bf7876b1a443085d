"""The ``dfmu`` command line — the top floor: the parsers (:mod:`.parser`), the commands
(:mod:`.commands`) and their input checks (:mod:`.checks`); nothing else in the package imports it.

    dfmu train   --dataset fashion-mnist --model cnn --out ckpt.pt
    dfmu forget  --ckpt ckpt.pt --classes 3 [--retain-fraction 0.13] --out forgot.pt
    dfmu forget  --arch my_models:build --weights w.pt --data data.npz --classes 3 --out out/forgot.pt
    dfmu forget  --ckpt ckpt.pt --forget-indices delete.txt --out forgot.pt   (or --forget-subclass / -random)
    dfmu verify  --record out/forgot.record.json --weights out/forgot.pt
    dfmu demo    [--dataset auto] [--model cnn] [--classes 3] [--retrain]
    dfmu compare --dataset fashion-mnist --model cnn --classes 3 --fractions 0.05,0.13 --seeds 3
    dfmu compare --arch my_models.py:build --weights w.pt --data images/ --classes 0 --fractions 0.13

    torchrun --nproc_per_node N -m dfmu_ext forget --ckpt ckpt.pt --classes 3 --out forgot.pt
        (DDP: Gloo on the CPU, NCCL on GPUs; only rank 0 evaluates, prints and writes files)

Every error a user can cause is one line on stderr, ``error: ...``, with exit status 2: argparse's
errors, :class:`UsageError`, and the library's documented input errors (``ValueError`` and its
subclasses ``CheckpointError``, ``WeightsError``, ``InputError``, ``RecordError``), and
``OutputError``: an output that could not be written (a full disk, an unwritable folder). The files
of one call are published together or not at all (``dfmu_ext._io.OutputBatch``). Anything else is
a bug and keeps its traceback. The library's trade warnings (``RetentionWarning``,
``ForgettingWarning``) are one line each on stderr, ``warning: <kind>: ...``.
"""
from .checks import UsageError
from .parser import build_parser, main

__all__ = ["main", "build_parser", "UsageError"]

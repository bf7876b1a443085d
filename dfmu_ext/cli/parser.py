"""Every argparse parser of ``dfmu``, and ``main``: parse, dispatch, turn input errors into one line."""
from __future__ import annotations

import argparse
import contextlib
import sys
import warnings

from .. import distributed
from .._io import OutputError
from ..guard import ForgettingWarning, RetentionWarning
from ..baselines import SPECS
from ..zoo.models import MODEL_NAMES
from .checks import UsageError, parse_device
from .attribute_commands import attribute_compare_or, attribute_demo_or
from .commands import cmd_compare, cmd_demo, cmd_forget, cmd_train, cmd_verify


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one ``error: ...`` line (exit 2) instead of usage + message."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}")


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
        sp.add_argument("--retain-fraction", type=float, default=0.13,
                        help="share of the retain data used, in (0, 1] (default: 0.13)")
        sp.add_argument("--mode", choices=["prune", "rescale"], default="prune",
                        help="zero the selected units (prune, the default) or dampen them (rescale)")
        sp.add_argument("--retrain", action="store_true", help="also retrain from scratch for comparison")
        sp.add_argument("--battery", action="store_true",
                        help="also run the verification battery (probe by depth, relearning and prototype attacks, "
                             "collateral; TV distance to Retrain with --retrain): tells forgetting from hiding")
        scenario(sp)
        step_options(sp)

    def step_options(sp):
        sp.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], default="auto",
                        help="training steps' precision (default: auto = bf16 on a CUDA GPU, fp32 on the CPU)")
        sp.add_argument("--channels-last", choices=["auto", "on", "off"], default="auto",
                        help="NHWC memory for conv nets' training steps (default: auto = on for conv nets)")

    def scenario(sp):
        """What to forget: --classes or one of the three alternatives (argparse refuses two)."""
        g = sp.add_mutually_exclusive_group()
        g.add_argument("--classes", default=None, help="comma-separated class ids to forget (default: 3)")
        g.add_argument("--forget-subclass", default=None, metavar="NAME_OR_ID",
                       help="forget one fine class inside a coarse class instead of --classes (a coarse-label data "
                            "set: fashion-mnist-mixed3 or -mixed2, whose siblings do not look alike; "
                            "fashion-mnist-coarse, a sanity check; cifar20; or --data with train_fine and "
                            "test_fine), e.g. Sneaker")
        g.add_argument("--forget-random", type=float, default=None, metavar="FRACTION",
                       help="forget a seeded random share of the training samples instead of --classes, e.g. 0.1 "
                            "(on fashion-mnist-6k the original memorises its samples)")
        g.add_argument("--forget-people", type=float, default=None, metavar="FRACTION",
                       help="with --task lm: forget a seeded share of the people corpus's people (every sequence "
                            "about them), e.g. 0.05 (default for --task lm: 0.05)")
        g.add_argument("--forget-indices", default=None, metavar="FILE",
                       help="forget the training samples a file names instead of --classes: .txt (integers "
                            "separated by spaces, commas or newlines; # comments), .npy (1-D integer array) or "
                            ".json (a list, or {\"indices\": [...]}); indices into the training set, 0-based")

    def task(sp, corpus=True, extra=()):
        sp.add_argument("--task", choices=["classification", "lm", *extra], default="classification",
                        help="classification (default) or lm: a causal language model on the generated people "
                             "corpus (fictitious people and their facts), forgetting people"
                             + ("; attribute: forget a stamp from a classifier's features, keep its labels, or "
                                "with --model lm one attribute of every person from the people corpus's causal LM "
                                "(docs/attribute.md)" if extra else ""))
        if corpus:
            sp.add_argument("--people", type=int, default=None, metavar="N",
                            help="with --task lm: people in the generated corpus (default: 100)")

    def dataset_and_model(sp, own=False, tasks=()):
        task(sp, extra=tasks)
        sp.add_argument("--dataset", default="auto", help="fashion-mnist | cifar10 | digits | fashion-mnist-6k | "
                                                          "fashion-mnist-mixed3 | fashion-mnist-mixed2 | "
                                                          "fashion-mnist-coarse | cifar20 | topics (generated text) | auto (default: auto, "
                                                          "Fashion-MNIST when installed, else digits)")
        sp.add_argument("--model", default=None, choices=list(MODEL_NAMES) + (["lm"] if "attribute" in tasks else []),
                        help="the package model to train (default: transformer for token data sets such as "
                             "topics, else cnn)" + ("; lm: with --task attribute, the people corpus's causal LM"
                                                    if "attribute" in tasks else ""))
        if "attribute" in tasks:
            sp.add_argument("--attribute", default=None, metavar="NAME",
                            help="with --task attribute: what to forget (image models: stamp; --model lm: one of "
                                 "city, profession, birth_year, colour, pet; default birth_year)")
        sp.add_argument("--epochs", type=int, default=None,
                        help="override the training recipe's epochs (of the original and of Retrain"
                             + ("; with --arch: Retrain's epochs, default 3)" if own else ")"))

    def own_model(sp, data_help_extra=""):
        g = sp.add_argument_group("a model and data of your own (instead of --ckpt / --dataset)")
        g.add_argument("--arch", default=None, metavar="MODULE:CALLABLE",
                       help="builds the nn.Module: an importable 'package.module:fn' or 'path/file.py:fn'")
        g.add_argument("--hf-config", default=None, metavar="PATH",
                       help="instead of --arch: a Hugging Face transformers config (config.json or its folder); "
                            "the classification model it names is built, then --weights loaded into it")
        g.add_argument("--hf-model", default=None, metavar="DIR",
                       help="instead of --arch/--weights: a Hugging Face save_pretrained folder (config.json, "
                            "*.safetensors, a tokenizer), read with local_files_only; --out is then a folder too. "
                            "With --task lm a causal LM (AutoModelForCausalLM), else a classifier")
        g.add_argument("--arch-kwargs", default=None, metavar="JSON",
                       help="keyword arguments for the --arch callable, a JSON object, e.g. '{\"width\": 16}'")
        g.add_argument("--weights", default=None, metavar="PATH",
                       help="a state_dict file (or a checkpoint dict holding 'state_dict'), loaded with "
                            "weights_only=True and matched strictly to --arch")
        g.add_argument("--data", default=None, metavar="PATH",
                       help="a .pt/.npz file with train_x, train_y, test_x, test_y (fed to the model as given; "
                            "optional train_fine, test_fine and fine_names: fine labels for --forget-subclass), "
                            "or a folder with train/<class>/*.png and test/<class>/*.png (read as floats in [0, 1]), "
                            "or a Hugging Face datasets folder (save_to_disk) with train and test splits"
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
    task(f, corpus=False)
    lm = f.add_argument_group("with --task lm --hf-model: the data, as TOFU ships it or one file with --forget-indices")
    lm.add_argument("--forget-data", default=None, metavar="PATH",
                    help="rows to forget: TOFU JSON/JSON lines ({question, answer[, paraphrased_answer, "
                         "perturbed_answer]}) or {text} rows, or a saved datasets folder; e.g. forget10.json")
    lm.add_argument("--retain-data", default=None, metavar="PATH", help="rows to keep, same formats; e.g. retain90.json")
    lm.add_argument("--nonmember-data", default=None, metavar="PATH",
                    help="rows the model never saw, same formats (e.g. TOFU's holdout10.json): the forget side also "
                         "ends once the forget rows' losses are not told from theirs, and the record holds that "
                         "membership AUC")
    lm.add_argument("--relearn-step", type=float, default=None, metavar="S",
                    help="with --task lm: the forget side's gradient taken one simulated relearning step of S per "
                         "weight away (e.g. 1e-3; one process): less comes back under a relearning attack, at a "
                         "cost in what is kept (docs/lm.md)")
    lm.add_argument("--relearn-moves", choices=["frozen", "trained"], default=None,
                    help="with --relearn-step: the weights the simulated step moves, those the fine-tune leaves "
                         "frozen (the default) or the trained ones")
    lm.add_argument("--dtype", choices=["fp32", "bf16"], default="fp32",
                    help="the dtype the model is read, unlearned and saved in (default: fp32)")
    lm.add_argument("--max-length", type=int, default=512,
                    help="tokens per sequence, longer rows are cut (default: 512)")
    forgetting(f)
    own_model(f)
    common(f)
    f.set_defaults(func=cmd_forget)

    v = sub.add_parser("verify", help="check that a weights file is the output a deletion record describes "
                                      "(exit 0 yes, 1 no, 2 error)")
    v.add_argument("--record", required=True, help="the deletion record (JSON) written by `dfmu forget` or "
                                                   "unlearn(record=...)")
    v.add_argument("--weights", required=True, help="the weights file to check (a state_dict or a checkpoint "
                                                    "holding one, a .safetensors file, or a save_pretrained folder)")
    v.set_defaults(func=cmd_verify)

    d = sub.add_parser("demo", help="train (or reuse) the default model, forget one class, print the table")
    dataset_and_model(d, tasks=("attribute",))
    d.add_argument("--out-dir", default="runs/demo", help="where report.json/png go (default: runs/demo)")
    forgetting(d)
    common(d)
    d.set_defaults(func=attribute_demo_or(cmd_demo))

    c = sub.add_parser("compare", help="compare DFMU with the baselines (table, JSON, plots)")
    dataset_and_model(c, own=True, tasks=("attribute",))
    c.add_argument("--fractions", default=None,
                   help="comma-separated retain-data fractions (default: 0.01,0.05,0.13,0.25,1.0; with --task lm one "
                        "fraction, default 0.13)")
    c.add_argument("--seeds", type=int, default=3, help="number of seeds, 0..N-1 (default: 3)")
    c.add_argument("--forget-shares", default="0.01,0.05,0.1",
                   help="with --task lm: comma-separated shares of the people to forget (default: 0.01,0.05,0.1)")
    c.add_argument("--methods", default="all", help="'all' or comma-separated: " + ",".join(SPECS))
    c.add_argument("--out-dir", default="runs/compare",
                   help="where comparison.json and the plots go (default: runs/compare; created when missing)")
    c.add_argument("--max-epochs", type=int, default=None,
                   help="cap the epochs of the epoch-based baselines (quick runs); Retrain keeps its recipe")
    c.add_argument("--no-cache", action="store_true", help="train the originals afresh, do not use the cache")
    c.add_argument("--no-battery", action="store_true",
                   help="skip the verification battery (probe by depth, relearning and prototype attacks, TV "
                        "distance to Retrain, collateral) and the table of which metrics tell hiding from forgetting")
    scenario(c)
    step_options(c)
    own_model(c)
    device_quiet(c)
    c.set_defaults(func=attribute_compare_or(cmd_compare))
    return p


def main(argv=None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if not 0.0 < args.__dict__.get("retain_fraction", 0.5) <= 1.0:
            raise UsageError("--retain-fraction must be in (0, 1]")
        with _one_line_warnings():
            if distributed.env_world_size() > 1:
                return _main_distributed(args)
            return args.func(args)
    except UsageError as exc:
        print(exc, file=sys.stderr)
        raise
    except OutputError as exc:  # a full disk or an unwritable folder; the call has removed what it wrote
        err = UsageError(_one_line(exc))
        print(err, file=sys.stderr)
        raise err from None
    except ValueError as exc:
        # The library's documented input errors (ValueError and its subclasses: CheckpointError,
        # WeightsError, InputError, RecordError, the argument checks of unlearn/evaluate/the ops).
        # Other exceptions are bugs: they keep their traceback.
        err = UsageError(_one_line(exc))
        print(err, file=sys.stderr)
        raise err from None


@contextlib.contextmanager
def _one_line_warnings():
    """The library's trade warnings (``RetentionWarning``, ``ForgettingWarning``) as one line each on
    stderr, ``warning: <kind>: ...``: at the command line the file and line that ``warnings`` would name
    is Python's module runner, not anything the user wrote. Others keep their usual form."""
    show = warnings.showwarning

    def one_line(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, (RetentionWarning, ForgettingWarning)):
            print(f"warning: {category.__name__}: {message}", file=file or sys.stderr)
        else:
            show(message, category, filename, lineno, file, line)

    warnings.showwarning = one_line
    try:
        yield
    finally:
        warnings.showwarning = show


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def _main_distributed(args) -> int:
    """``forget`` under torchrun: join the process group (timeout $DFMU_DIST_TIMEOUT, default 60 s),
    run on every rank with only rank 0 logging, and leave the group at exit, also on error."""
    if args.command != "forget":
        raise UsageError(f"only `forget` runs under torchrun (WORLD_SIZE={distributed.env_world_size()}); "
                         f"run `{args.command}` as a single process")
    parse_device(args.device)  # same checks as one process (e.g. --device cuda without CUDA)
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

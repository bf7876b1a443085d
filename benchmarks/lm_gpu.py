"""Entity unlearning on a lent GPU: a larger people corpus and Llama than the CPU defaults, one seed,
Original / Retrain / DFMU / GradDiff / NPO side by side, and the neuron scoring pass timed against a
plain forward + backward. Writes a Markdown table to --out.

    python benchmarks/lm_gpu.py --device cuda --out /tmp/lm_gpu.md
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from dfmu_ext.baselines import SPECS  # noqa: E402
from dfmu_ext.experiments import lm as lm_exp  # noqa: E402
from dfmu_ext.lm.neurons import mlp_neuron_layers, score_neurons  # noqa: E402
from dfmu_ext.lm.task import forward_logits, lm_loss, take  # noqa: E402
from dfmu_ext.training import LMTrainConfig  # noqa: E402
from dfmu_ext.zoo.lm_training import cached_causal_lm  # noqa: E402
from dfmu_ext.zoo.people import PeopleConfig, make_people_corpus  # noqa: E402

LARGE_CORPUS = PeopleConfig(num_people=400, holdout_people=100, first_names=60, last_names=60, filler_train=1500,
                            filler_test=300)
LARGE_SIZE = {"hidden": 256, "layers": 6, "heads": 8, "mlp": 1024}


def _timed(fn, device, repeats=5):
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--out", default="lm_gpu.md")
    p.add_argument("--epochs", type=int, default=30)
    args = p.parse_args()
    device = torch.device(args.device)
    recipe = LMTrainConfig(epochs=args.epochs, batch_size=64)
    methods = {n: SPECS[n].fn for n in ("DFMU", "GradDiff", "NPO")}
    result = lm_exp.run_lm_comparison(methods, shares=(0.05,), seeds=(0,), corpus_config=LARGE_CORPUS, device=device,
                                      train_config=recipe, size=LARGE_SIZE, log=print)
    lines = [f"# Entity unlearning on {torch.cuda.get_device_name(0) if device.type == 'cuda' else device}",
             f"torch {torch.__version__}, CUDA {torch.version.cuda}; corpus {LARGE_CORPUS.num_people} people, "
             f"Llama {LARGE_SIZE}, {args.epochs} epochs", "", "```", lm_exp.format_table(result["summary"]), "```"]

    original, _ = cached_causal_lm(LARGE_CORPUS, None, 0, device, train_config=LMTrainConfig(
        **{**recipe.to_dict(), "seed": 0}), size=LARGE_SIZE)
    corpus = make_people_corpus(LARGE_CORPUS)
    n = min(256, len(corpus.train))
    x, y = take(corpus.train, range(n))
    x, y = x.to(device), y.to(device)
    layers = mlp_neuron_layers(original, x[:1])
    groups = torch.arange(n) % 2 == 0

    def fwd_bwd():
        original.zero_grad(set_to_none=True)
        lm_loss(forward_logits(original, x), y, reduction="sum").backward()

    t_plain = _timed(fwd_bwd, device)
    t_score = _timed(lambda: score_neurons(original, x, y, groups, layers), device)
    lines += ["", f"neuron scoring pass ({n} sequences): {1e3 * t_score:.1f} ms vs forward + backward "
                  f"{1e3 * t_plain:.1f} ms (ratio {t_score / t_plain:.2f})"]
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())

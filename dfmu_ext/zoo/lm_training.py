"""The ``people`` causal LMs: their training (the recipe is :mod:`dfmu_ext.training.causal_lm`'s),
their greedy Q/A accuracy, and their cache.

**Cache.** :func:`cached_causal_lm` trains the original once per (corpus config, arch, device type,
seed, recipe) and keeps it next to the image originals (:func:`dfmu_ext.zoo.checkpoints.cache_dir`)
as ``people-<arch>-<device>-seed<seed>.pt`` (a ``-c<hash>`` suffix when the corpus config or the
recipe is not the default), written atomically and under the same ``fcntl`` lock as the image
originals, in the same checkpoint format; :func:`load_causal_lm` rebuilds the model from the meta
with ``weights_only=True``.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch
from torch import nn

from .._common import seeded
from ..eval.lm import answer_accuracy, perplexity
from ..training.causal_lm import LMTrainConfig, train_causal_lm
from .checkpoints import CheckpointError, _file_lock, cache_dir, read_checkpoint, save_checkpoint
from .lm_models import build_causal_lm, default_arch
from .people import PeopleConfig, PeopleCorpus, make_people_corpus

__all__ = ["people_accuracies", "lm_cache_path", "load_causal_lm", "train_people_lm", "cached_causal_lm"]


def people_accuracies(model: nn.Module, corpus: PeopleCorpus, device: torch.device | str = "cpu",
                      people=None) -> dict:
    """Greedy exact-match accuracy (:func:`dfmu_ext.eval.lm.answer_accuracy`) of ``model`` on ``people`` (default: all trained) with the trained
    templates (``"trained"``) and the paraphrased ones (``"paraphrased"``), on the holdout people
    (``"holdout"``, ``"holdout_paraphrased"``), and the perplexity of the test filler (``"filler_ppl"``)."""
    device = torch.device(device)
    people = list(range(corpus.config.num_people)) if people is None else list(people)
    model.to(device)
    out = {"trained": answer_accuracy(model, corpus.qa(people)),
           "paraphrased": answer_accuracy(model, corpus.qa(people, paraphrased=True))}
    if corpus.config.holdout_people:
        out["holdout"] = answer_accuracy(model, corpus.holdout_qa())
        out["holdout_paraphrased"] = answer_accuracy(model, corpus.holdout_qa(paraphrased=True))
    if len(corpus.filler_test):
        out["filler_ppl"] = perplexity(model, corpus.filler_test)
    return out


# --------------------------------------------------------------------------------------------
# checkpoints and the cache
# --------------------------------------------------------------------------------------------

def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:10]


def lm_cache_path(corpus_config: PeopleConfig | None, arch: str, device: torch.device | str, seed: int,
                  train_config: LMTrainConfig | None = None, size: dict | None = None) -> str:
    """``<cache_dir>/people-<arch>-<device>-seed<seed>[-c<hash>].pt``; the hash names a non-default
    corpus config, recipe or model size (the corpus seed is part of the corpus config)."""
    variant = {"corpus": (corpus_config or PeopleConfig()).to_dict(),
               "train": (train_config or LMTrainConfig(seed=seed)).to_dict(), "size": dict(size or {})}
    default = {"corpus": PeopleConfig().to_dict(), "train": LMTrainConfig(seed=seed).to_dict(), "size": {}}
    suffix = "" if variant == default else f"-c{_digest(variant)}"
    return os.path.join(cache_dir(), f"people-{arch}-{torch.device(device).type}-seed{seed}{suffix}.pt")


def load_causal_lm(path: str, device: torch.device | str = "cpu") -> tuple[nn.Module, dict]:
    """``(model on device, meta)`` from a causal-LM checkpoint (rebuilt with :func:`build_causal_lm`
    from the meta, weights read with ``weights_only=True``); :class:`CheckpointError` otherwise."""
    model, meta = read_checkpoint(path, lambda meta: build_causal_lm(
        meta["arch"], int(meta["vocab_size"]), int(meta["max_len"]), **meta.get("size", {})), "causal LM")
    return model.to(device).eval(), meta


def train_people_lm(corpus_config: PeopleConfig | None = None, arch: str | None = None, seed: int = 0,
                    device: torch.device | str = "cpu", *, train_config: LMTrainConfig | None = None,
                    size: dict | None = None, corpus: PeopleCorpus | None = None, progress: bool = False,
                    log=None) -> tuple[nn.Module, dict]:
    """Train a fresh ``arch`` model (init seeded with ``seed``) on the ``people`` corpus; returns
    ``(model in eval mode, meta)``."""
    corpus_config = corpus_config or PeopleConfig()
    corpus = corpus or make_people_corpus(corpus_config)
    arch = arch or default_arch()
    train_config = train_config or LMTrainConfig(seed=seed)
    device = torch.device(device)
    size = dict(size or {})
    with seeded(seed):
        model = build_causal_lm(arch, corpus.tokenizer.vocab_size, corpus_config.max_len, **size)
    if log is not None:
        log(f"training a {arch} causal LM on people ({len(corpus.train)} sequences, {train_config.epochs} epochs, "
            f"{device})")
    hist = train_causal_lm(model, corpus.train, train_config, device, progress=progress)
    model.eval()
    meta = {"kind": "causal-lm", "dataset": "people", "arch": arch, "vocab_size": corpus.tokenizer.vocab_size,
            "max_len": corpus_config.max_len, "size": size, "seed": seed, "corpus": corpus_config.to_dict(),
            "train_config": train_config.to_dict(), "train_seconds": hist["total_seconds"],
            "final_loss": hist["loss"][-1]}
    return model, meta


def cached_causal_lm(corpus_config: PeopleConfig | None = None, arch: str | None = None, seed: int = 0,
                     device: torch.device | str = "cpu", progress: bool = False, log=None, *,
                     train_config: LMTrainConfig | None = None, size: dict | None = None,
                     use_cache: bool = True) -> tuple[nn.Module, dict]:
    """The ``people`` original for these settings: read from the cache (:func:`lm_cache_path`), else
    trained with :func:`train_people_lm` and cached. ``<file>.lock`` serialises processes that need
    the same model (one trains, the others wait, then read it)."""
    corpus_config = corpus_config or PeopleConfig()
    arch = arch or default_arch()
    device = torch.device(device)
    if not use_cache:
        return train_people_lm(corpus_config, arch, seed, device, train_config=train_config, size=size,
                               progress=progress, log=log)
    path = lm_cache_path(corpus_config, arch, device, seed, train_config, size)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with _file_lock(path + ".lock", log, path):
        if os.path.isfile(path):
            try:
                model, meta = load_causal_lm(path, device)
            except CheckpointError as exc:
                if log is not None:
                    log(f"retraining: {exc}")
            else:
                want = LMTrainConfig(seed=seed) if train_config is None else train_config
                if meta.get("arch") == arch and meta.get("corpus") == corpus_config.to_dict() \
                        and meta.get("train_config") == want.to_dict() and meta.get("size", {}) == dict(size or {}):
                    if log is not None:
                        log(f"seed {seed}: using the cached causal LM {path}")
                    return model, meta
        model, meta = train_people_lm(corpus_config, arch, seed, device, train_config=train_config, size=size,
                                      progress=progress, log=log)
        save_checkpoint(path, model, meta)
        if log is not None:
            log(f"cached the causal LM at {path}")
        return model, meta

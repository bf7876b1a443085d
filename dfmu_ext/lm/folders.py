"""Hugging Face model folders in and out: what ``dfmu forget --task lm --hf-model DIR --out DIR2`` reads
and writes.

**Reading** (:func:`read_causal_lm`): ``DIR`` is a ``save_pretrained`` folder (``config.json``, the
weights as ``*.safetensors``, and a tokenizer). The model comes from
``AutoModelForCausalLM.from_pretrained(DIR, local_files_only=True, dtype=...)`` in float32 or
bfloat16 (:data:`DTYPES`), the tokenizer from ``AutoTokenizer.from_pretrained(DIR,
local_files_only=True)``; nothing is downloaded. Each way a folder can be unusable is one
:class:`FolderError` line (a ``ValueError``):

* the folder is missing, or holds no ``config.json``;
* it holds no tokenizer (no ``tokenizer.json``, ``tokenizer.model``, ``vocab.*``, ...), or one that
  does not load;
* the model is not a causal LM: its config names another head (``architectures``, e.g. a
  ``LlamaForSequenceClassification`` or a ``BertForMaskedLM``), no causal-LM class exists for its
  type, or — checked by behaviour, whatever the config says — the logits at positions
  :math:`t < T-1` change when only the last token changes (attention that looks ahead, e.g. a BERT
  loaded as ``BertLMHeadModel`` without ``is_decoder``);
* the weights do not fit the config: tensors of the wrong shape, missing (transformers would
  initialise them at random and only warn) or unexpected.

**Writing** (:func:`write_folder`): ``model.save_pretrained`` (safetensors) and
``tokenizer.save_pretrained`` into a temp sibling folder, then one rename: the folder appears whole
or not at all, an existing folder and the input folders are never overwritten. The deletion
record's hash is over the *saved* tensors (:func:`folder_sha256`, the
:func:`dfmu_ext.weights.state_dict_sha256` of what the ``*.safetensors`` files hold; equal to the
loaded model's ``state_dict`` hash when no weights are tied), so ``dfmu verify --weights DIR2``
checks the folder itself.
"""
from __future__ import annotations

import contextlib
import os
from typing import Sequence

import torch
from torch import nn

from .._io import OutputBatch
from ..weights import WeightsError, safetensors_state_dict, state_dict_sha256

__all__ = ["DTYPES", "FolderError", "TOKENIZER_FILES", "quiet_transformers", "read_config", "read_tokenizer",
           "read_causal_lm", "check_causal", "folder_sha256", "save_folder", "write_folder"]

#: The dtypes a folder can be read in (``--dtype``).
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
#: Any of these in a folder means it ships a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "vocab.txt",
                   "spiece.model", "sentencepiece.bpe.model")


class FolderError(ValueError):
    """A Hugging Face folder that cannot be read or written (one-line message)."""


def _transformers():
    try:
        import transformers
    except ImportError:
        raise FolderError("Hugging Face folders need transformers: pip install 'dfmu_ext[hf]'") from None
    return transformers


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@contextlib.contextmanager
def quiet_transformers():
    """transformers' load reports and progress bars off for the block (a CLI error stays one line;
    the checks below say what the reports would)."""
    tf = _transformers()
    logging = tf.utils.logging
    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield tf
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def read_config(path: str, what: str = "--hf-model"):
    """The ``transformers`` config of folder ``path``; :class:`FolderError` when there is none."""
    if not os.path.exists(path):
        raise FolderError(f"{what} {path!r} does not exist")
    if not os.path.isdir(path):
        raise FolderError(f"{what} {path!r} is not a folder (give the save_pretrained folder)")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FolderError(f"{what} {path!r} is not a Hugging Face model folder: it has no config.json")
    with quiet_transformers() as tf:
        try:
            return tf.AutoConfig.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError) as exc:
            raise FolderError(f"{what} {path!r}: config.json is not a transformers config: "
                              f"{_first_line(exc)}") from None


def read_tokenizer(path: str, what: str = "--hf-model", required: bool = True):
    """``AutoTokenizer.from_pretrained(path, local_files_only=True)``; :class:`FolderError` when the
    folder ships no tokenizer (``None`` instead when not ``required``) or it does not load."""
    if not any(os.path.isfile(os.path.join(path, f)) for f in TOKENIZER_FILES):
        if not required:
            return None
        raise FolderError(f"{what} {path!r} has no tokenizer (none of {', '.join(TOKENIZER_FILES[:3])}, ...): "
                          f"save it into the folder with tokenizer.save_pretrained")
    with quiet_transformers() as tf:
        try:
            return tf.AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise FolderError(f"{what} {path!r}: its tokenizer does not load: {_first_line(exc)}") from None


def _causal_classes(tf) -> set[str]:
    names = set()
    for v in tf.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values():
        names.update([v] if isinstance(v, str) else v)
    return names


def _check_causal_config(cfg, path: str, what: str, tf) -> None:
    archs = list(getattr(cfg, "architectures", None) or [])
    causal = _causal_classes(tf)
    if archs and not any(a in causal or a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        raise FolderError(f"{what} {path!r} holds a {archs[0]}, not a causal language model "
                          f"(AutoModelForCausalLM; e.g. LlamaForCausalLM, GPT2LMHeadModel)")
    if cfg.model_type not in tf.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and not archs:
        raise FolderError(f"{what} {path!r}: model type {cfg.model_type!r} has no causal-LM class in transformers")


@torch.no_grad()
def check_causal(model: nn.Module, vocab_size: int, what: str = "the model") -> None:
    """:class:`FolderError` unless ``model`` is causal: two sequences that differ only in their last
    token must give the same logits at every earlier position (a model attending ahead would not),
    and the logits must be ``(N, T, vocab)``."""
    device = next(model.parameters()).device
    ids = torch.arange(4, device=device).remainder(vocab_size).repeat(2, 1)
    ids[1, -1] = (ids[0, -1] + 1) % vocab_size
    was = model.training
    model.eval()
    try:
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids))
    finally:
        model.train(was)
    logits = getattr(out, "logits", out)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise FolderError(f"{what} does not return (N, T, vocab) logits: not a causal language model")
    # A causal model computes each position from its prefix alone: the earlier rows come out
    # identical, bit for bit in practice (same kernels, same values). An encoder's change there is
    # small but proportional to the change at the last position (measured ~1e-3 of it for a random
    # BERT), so the bound is relative to that change, with a floor for rounding.
    lg = logits.float()
    early = float((lg[0, :-1] - lg[1, :-1]).abs().max())
    last = float((lg[0, -1] - lg[1, -1]).abs().max())
    if early > max(1e-4 * last, 1e-6 * float(lg.abs().max())):
        raise FolderError(f"{what} is not a causal language model: its earlier positions' logits depend on a later "
                          f"token (bidirectional attention)")


def read_causal_lm(path: str, dtype: str = "fp32", device=None, what: str = "--hf-model"):
    """``(model, tokenizer)`` of the save_pretrained folder ``path`` in ``dtype`` (``"fp32"`` or
    ``"bf16"``), in eval mode on ``device`` (default CPU); the checks of the module docstring."""
    if dtype not in DTYPES:
        raise FolderError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    cfg = read_config(path, what)
    tokenizer = read_tokenizer(path, what)
    with quiet_transformers() as tf:
        _check_causal_config(cfg, path, what, tf)
        try:
            model, info = tf.AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=DTYPES[dtype],
                                                                   output_loading_info=True)
        except RuntimeError as exc:  # transformers raises on tensors of the wrong shape
            if "mismatch" in str(exc):
                raise FolderError(f"{what} {path!r}: the weights do not fit config.json (tensors of the wrong "
                                  f"shape)") from None
            raise
        except (OSError, ValueError) as exc:  # no weights file, an unknown head for this type, ...
            raise FolderError(f"{what} {path!r}: cannot load a causal LM: {_first_line(exc)}") from None
    parts = [f"{len(v)} {k.replace('_keys', '')}: {', '.join(sorted(v)[:3])}" for k, v in info.items()
             if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v]
    if parts:
        raise FolderError(f"{what} {path!r}: the weights do not fit config.json ({'; '.join(parts)})")
    if device is not None:
        model.to(device)
    model.eval()
    check_causal(model, int(model.config.vocab_size), f"{what} {path!r}")
    return model, tokenizer


def folder_sha256(path: str) -> str:
    """The weights hash (:func:`dfmu_ext.weights.state_dict_sha256`) of the tensors a folder's
    ``*.safetensors`` files hold."""
    return state_dict_sha256(safetensors_state_dict(path))


def save_folder(model: nn.Module, tokenizer, path: str) -> str:
    """``save_pretrained`` of ``model`` (safetensors) and ``tokenizer`` (when given) into ``path``
    (created; not atomic: see :func:`write_folder`); returns :func:`folder_sha256` of what was saved."""
    with quiet_transformers():
        model.save_pretrained(path)
        if tokenizer is not None:
            tokenizer.save_pretrained(path)
    try:
        return folder_sha256(path)
    except WeightsError as exc:
        raise FolderError(f"save_pretrained wrote no safetensors weights into {path!r}: {exc}") from None


def check_new_folder(out: str, inputs: Sequence[str] = (), what: str = "--out") -> None:
    """:class:`FolderError` when ``out`` exists as a file or a non-empty folder, or is, holds or lies
    inside one of ``inputs`` (the folders read): a written folder never replaces anything."""
    real = os.path.realpath(out)
    for src in inputs:
        if not src:
            continue
        s = os.path.realpath(src)
        if real == s or real.startswith(s.rstrip(os.sep) + os.sep) or s.startswith(real.rstrip(os.sep) + os.sep):
            raise FolderError(f"{what} {out!r} would overwrite the input folder {src!r} (inputs are never overwritten)")
    if os.path.isfile(out) or (os.path.isdir(out) and os.listdir(out)):
        raise FolderError(f"{what} {out!r} already exists; name a new folder (nothing is overwritten)")


def write_folder(model: nn.Module, tokenizer, out: str, inputs: Sequence[str] = ()) -> str:
    """Write ``model`` and ``tokenizer`` as a save_pretrained folder ``out`` atomically (a temp
    sibling folder, renamed into place; on failure nothing is left), refusing what
    :func:`check_new_folder` refuses. Returns the hash of the saved tensors."""
    out = os.path.abspath(out.rstrip(os.sep) or out)
    check_new_folder(out, inputs)
    with OutputBatch(protect=list(inputs)) as batch:
        sha = save_folder(model, tokenizer, batch.file(out))
        batch.publish()
    return sha

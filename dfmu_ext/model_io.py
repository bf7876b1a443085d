r"""What goes into a model and what comes out, for every model a user brings.

The library's stages are written for ``logits = model(x)`` on ``(x, y)`` batches. Models and data
from torchvision, timm, Hugging Face ``transformers`` and ``datasets`` break that in three ways,
each handled here, once:

* **Outputs.** :func:`logits_of` reads the logits from a tensor, a tuple or list (its first
  element), a dict or ``transformers`` ``ModelOutput`` (its ``"logits"``), or anything through a
  user's ``logits_fn``.
* **Inputs.** A sample may be a dict — ``{"pixel_values", "label"}``,
  ``{"input_ids", "attention_mask", "labels"}`` — instead of ``(x, y)``. :func:`as_pairs` turns such
  a data set into ``(Inputs, label)`` pairs; :class:`Inputs` is a batch of named tensors that
  behaves like one batch-first tensor where the stages need it (``.to``, ``.shape[0]``, indexing
  and slicing along the batch, :func:`cat`, :func:`stack`), and is passed to the model as keyword
  arguments.
* **The call.** :func:`adapted` hooks the model's root module for the length of one library call:
  a forward pre-hook turns a positional :class:`Inputs` into ``model(**inputs)``, a forward hook
  replaces the output with :func:`logits_of` of it. No wrapper module is made, so parameter and
  module names, ``state_dict`` keys and train/eval flags stay the user's own; the hooks are removed
  on exit, also on error, and nested calls reuse the outer ones.

The explicit classifier (``classifier=``, a module name) rides on the same context:
:func:`explicit_classifier` tells :func:`dfmu_ext.blocks.classifier_of` which module it is.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import weakref
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.data import Dataset, Subset

__all__ = ["Inputs", "logits_of", "adapted", "copy_model", "model_entry", "explicit_classifier", "as_pairs", "LabeledDataset", "stack", "cat",
           "DEFAULT_LABEL_KEYS", "is_token_batch", "padding_mask", "per_token_labels"]

#: Label keys tried, in order, when a dict sample's label key is not given (Hugging Face's conventions:
#: models take ``labels``, ``datasets`` image sets name the column ``label``).
DEFAULT_LABEL_KEYS = ("labels", "label")


# --------------------------------------------------------------------------------------------
# a batch of named tensors
# --------------------------------------------------------------------------------------------

class Inputs(dict):
    """A batch of named model inputs, every value a tensor with the batch first.

    A ``dict`` (so ``model(**inputs)`` works) that also answers the few tensor calls the stages
    make on a batch: ``.to(...)``, ``.shape`` (the first tensor's: ``shape[0]`` is the batch size),
    ``.detach()``, and indexing or slicing along the batch (``inputs[idx]``, ``inputs[a:b]``). A
    string key reads one input, as in a dict.
    """

    def _first(self) -> torch.Tensor:
        for v in self.values():
            if isinstance(v, torch.Tensor):
                return v
        raise ValueError("the input dict holds no tensor")

    @property
    def shape(self) -> torch.Size:
        return self._first().shape

    @property
    def device(self) -> torch.device:
        return self._first().device

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Inputs":
        """A new batch with ``fn`` applied to every tensor value (other values kept as they are)."""
        return Inputs({k: fn(v) if isinstance(v, torch.Tensor) else v for k, v in self.items()})

    def to(self, *args, **kwargs) -> "Inputs":
        return self.map(lambda t: t.to(*args, **kwargs))

    def detach(self) -> "Inputs":
        return self.map(torch.Tensor.detach)

    def __getitem__(self, key):
        if isinstance(key, str):
            return dict.__getitem__(self, key)
        return self.map(lambda t: t[key])


def stack(items: Sequence) -> torch.Tensor | Inputs:
    """Stack single samples (tensors, arrays or :class:`Inputs`) into one batch."""
    first = items[0]
    if isinstance(first, Mapping):
        return Inputs({k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in first})
    return torch.stack([torch.as_tensor(it) for it in items])


def cat(batches: Sequence) -> torch.Tensor | Inputs:
    """Concatenate batches (tensors or :class:`Inputs` with the same keys) along the batch."""
    first = batches[0]
    if isinstance(first, Mapping):
        return Inputs({k: torch.cat([b[k] for b in batches]) for k in first})
    return torch.cat(list(batches))


def is_token_batch(x) -> bool:
    """Whether no input of the batch is floating point (token ids, masks): nothing to differentiate."""
    values = list(x.values()) if isinstance(x, Mapping) else [x]
    return not any(isinstance(v, torch.Tensor) and v.is_floating_point() for v in values)


def padding_mask(x) -> torch.Tensor | None:
    """The ``(N, T)`` attention mask of a token batch (1 = a real token), else None."""
    if isinstance(x, Mapping):
        mask = x.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            return mask
    return None


# --------------------------------------------------------------------------------------------
# outputs
# --------------------------------------------------------------------------------------------

def logits_of(output: Any, logits_fn: Callable[[Any], torch.Tensor] | None = None) -> torch.Tensor:
    """The ``(N, classes)`` logits in a model's ``output``.

    ``logits_fn(output)`` when given; else the tensor itself, the first element of a tuple or list,
    or the ``"logits"`` entry of a dict or ``ModelOutput``. Raises TypeError (one line) otherwise.
    """
    if logits_fn is not None:
        out = logits_fn(output)
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"logits_fn returned {type(out).__name__}, not a tensor of logits")
        return out
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        logits = output.get("logits")
        if isinstance(logits, torch.Tensor):
            return logits
        raise TypeError(f"the model returned a {type(output).__name__} without 'logits' (keys: "
                        f"{', '.join(map(str, output.keys())) or 'none'}): pass logits_fn= to read its logits")
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"the model returned {type(output).__name__}, not logits: pass logits_fn= to read them")


# --------------------------------------------------------------------------------------------
# the call
# --------------------------------------------------------------------------------------------

@dataclass
class _Active:
    logits_fn: Callable | None
    classifier: str | None
    depth: int = 1
    copies: list = field(default_factory=list)  # weakrefs to copies made by copy_model()


_ACTIVE: "weakref.WeakKeyDictionary[nn.Module, _Active]" = weakref.WeakKeyDictionary()


def _check_classifier_name(model: nn.Module, classifier: str | None) -> None:
    if classifier is None:
        return
    names = dict(model.named_modules())
    module = names.get(classifier)
    if module is None:
        raise ValueError(f"classifier={classifier!r} is not a module of the model")
    if not isinstance(module, nn.Linear) and not any(isinstance(m, nn.Linear) for m in module.modules()):
        raise ValueError(f"classifier={classifier!r} is a {type(module).__name__} with no nn.Linear in it")


@contextlib.contextmanager
def adapted(model: nn.Module, *, logits_fn: Callable | None = None, classifier: str | None = None) -> Iterator[nn.Module]:
    """For the block, ``model(x)`` returns logits and accepts :class:`Inputs` (as keyword arguments).

    ``classifier`` names the classifier module (see :func:`dfmu_ext.blocks.classifier_of`). Inside an
    outer ``adapted`` on the same model, the outer call's settings are kept unless new ones are given.
    """
    active = _ACTIVE.get(model)
    if active is not None:
        saved = (active.logits_fn, active.classifier)
        _check_classifier_name(model, classifier)
        active.logits_fn = logits_fn if logits_fn is not None else active.logits_fn
        active.classifier = classifier if classifier is not None else active.classifier
        active.depth += 1
        try:
            yield model
        finally:
            active.depth -= 1
            active.logits_fn, active.classifier = saved
        return
    _check_classifier_name(model, classifier)
    state = _Active(logits_fn, classifier)

    # Each hook acts only while its module is active under this state: a deep copy of the model
    # carries the hooks along, and stays plain unless made by copy_model() inside the block.
    def spread_inputs(module, args, kwargs):
        if _ACTIVE.get(module) is not state:
            return None
        if len(args) == 1 and isinstance(args[0], Inputs) and not kwargs:
            return (), dict(args[0])
        return None

    def read_logits(module, _args, output):
        if _ACTIVE.get(module) is not state:
            return None
        return logits_of(output, state.logits_fn)

    handles = [model.register_forward_pre_hook(spread_inputs, with_kwargs=True),
               model.register_forward_hook(read_logits)]
    _ACTIVE[model] = state
    try:
        yield model
    finally:
        for h in handles:
            h.remove()
        _ACTIVE.pop(model, None)
        for ref in state.copies:
            copy = ref()
            if copy is not None:
                _ACTIVE.pop(copy, None)


def copy_model(model: nn.Module, *, empty: bool = False) -> nn.Module:
    """``copy.deepcopy(model)``; inside :func:`adapted`, the copy answers like the model (logits,
    keyword inputs, the same classifier) until the block ends. With ``empty``, the copy's parameters
    and buffers are tensors of the same shapes on the meta device (no memory; a weight tied in the
    model stays one tensor in the copy), for a caller that allocates and fills them itself (FSDP2's
    sharded copy: no second whole model ever exists)."""
    memo = {}
    if empty:
        for p in model.parameters():
            memo[id(p)] = nn.Parameter(torch.empty_like(p, device="meta"), requires_grad=p.requires_grad)
        for b in model.buffers():
            memo[id(b)] = torch.empty_like(b, device="meta")
    duplicate = copy.deepcopy(model, memo)
    state = _ACTIVE.get(model)
    if state is not None:
        _ACTIVE[duplicate] = state
        state.copies.append(weakref.ref(duplicate))
    return duplicate


def model_entry(fn: Callable) -> Callable:
    """Decorate a public entry ``fn(model, ...)`` so that it takes any model and dict data sets.

    Adds the keyword arguments ``logits_fn`` (read the logits from the model's output, see
    :func:`logits_of`), ``classifier`` (the classifier module's name, see
    :func:`dfmu_ext.blocks.classifier_of`) and ``label_key`` (the label's key in dict samples, see
    :func:`as_pairs`). The data sets among ``train_set``, ``test_set`` and ``dataset`` go through
    :func:`as_pairs`; ``model`` and the models ``original`` and ``reference`` are :func:`adapted`
    for the call.
    """
    sig = inspect.signature(fn)
    data_params = [p for p in ("train_set", "test_set", "dataset") if p in sig.parameters]
    model_params = [p for p in ("model", "original", "reference") if p in sig.parameters]

    @functools.wraps(fn)
    def entry(*args, logits_fn: Callable | None = None, classifier: str | None = None,
              label_key: str | None = None, **kwargs):
        bound = sig.bind_partial(*args, **kwargs)
        for p in data_params:
            if p in bound.arguments:
                bound.arguments[p] = as_pairs(bound.arguments[p], label_key)
        with contextlib.ExitStack() as stack:
            for p in model_params:
                m = bound.arguments.get(p)
                if isinstance(m, nn.Module):
                    stack.enter_context(adapted(m, logits_fn=logits_fn, classifier=classifier))
            return fn(*bound.args, **bound.kwargs)

    extra = [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None)
             for n in ("logits_fn", "classifier", "label_key") if n not in sig.parameters]
    params = list(sig.parameters.values())
    var_kw = [p for p in params if p.kind is inspect.Parameter.VAR_KEYWORD]
    params = [p for p in params if p.kind is not inspect.Parameter.VAR_KEYWORD] + extra + var_kw
    entry.__signature__ = sig.replace(parameters=params)  # type: ignore[attr-defined]
    return entry


def explicit_classifier(model: nn.Module) -> str | None:
    """The classifier name given to the innermost active :func:`adapted` of ``model``, else None."""
    active = _ACTIVE.get(model)
    return active.classifier if active is not None else None


# --------------------------------------------------------------------------------------------
# data sets of dict samples
# --------------------------------------------------------------------------------------------

def _label_key(sample: Mapping, label_key: str | None) -> str:
    if label_key is not None:
        if label_key not in sample:
            raise KeyError(f"the samples have no label key {label_key!r} (keys: {', '.join(map(str, sample))})")
        return label_key
    for key in DEFAULT_LABEL_KEYS:
        if key in sample:
            return key
    raise KeyError(f"the samples have no label key ({' or '.join(DEFAULT_LABEL_KEYS)}; keys: "
                   f"{', '.join(map(str, sample))}): pass label_key=")


class LabeledDataset(Dataset):
    """``(Inputs, label)`` pairs over a data set whose samples are dicts (e.g. a Hugging Face
    ``datasets.Dataset``): the label is ``sample[label_key]``, the inputs every other key.

    ``targets`` (all labels, read once) serves :func:`dfmu_ext.splits.dataset_labels`; for a
    ``datasets.Dataset`` it is read from the label column without decoding the inputs.
    """

    def __init__(self, dataset, label_key: str):
        self.dataset = dataset
        self.label_key = label_key
        self._targets: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        sample = self.dataset[i]
        if not isinstance(sample, Mapping) or self.label_key not in sample:
            keys = ", ".join(map(str, sample)) if isinstance(sample, Mapping) else type(sample).__name__
            raise KeyError(f"sample {i} has no label key {self.label_key!r} (it has: {keys})")
        x = Inputs({k: torch.as_tensor(v) for k, v in sample.items() if k != self.label_key})
        return x, int(sample[self.label_key])

    @property
    def targets(self) -> torch.Tensor:
        if self._targets is None:
            column = None
            if getattr(self.dataset, "label_key", None) == self.label_key:  # a splits.DictDataset
                column = getattr(self.dataset, "targets", None)
            column_names = getattr(self.dataset, "column_names", None)  # a datasets.Dataset
            if column is None and column_names is not None and self.label_key in column_names:
                column = self.dataset[self.label_key]
            if column is None:
                column = [self[i][1] for i in range(len(self))]
            self._targets = torch.as_tensor(column).reshape(-1).long()
        return self._targets


def as_pairs(dataset, label_key: str | None = None):
    """``dataset`` unchanged when its samples are ``(x, y)`` pairs; a :class:`LabeledDataset` when
    they are dicts (the label under ``label_key``, default ``"labels"`` then ``"label"``).

    Raises KeyError (one line, nothing read further) when dict samples have no label key.
    """
    if dataset is None or isinstance(dataset, LabeledDataset):
        return dataset
    if isinstance(dataset, Subset) and isinstance(dataset.dataset, LabeledDataset):
        return dataset
    try:
        n = len(dataset)
    except TypeError:
        return dataset
    if n == 0:
        return dataset
    first = dataset[0]
    if per_token_labels(first, label_key):
        return dataset  # causal-LM samples: the labels are a sequence, read by dfmu_ext.lm
    if isinstance(first, Mapping):
        return LabeledDataset(dataset, _label_key(first, label_key))
    return dataset


def per_token_labels(sample, label_key: str | None = None) -> bool:
    """Whether ``sample`` is a dict whose labels (``label_key``, default ``labels``) are one per input
    token, of the shape of its ``input_ids``: a causal-LM sample."""
    key = label_key or "labels"
    if not isinstance(sample, Mapping) or key not in sample or "input_ids" not in sample:
        return False
    labels, ids = torch.as_tensor(sample[key]), torch.as_tensor(sample["input_ids"])
    return labels.dim() >= 1 and labels.shape == ids.shape

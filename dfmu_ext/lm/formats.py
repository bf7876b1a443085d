r"""Causal-LM data in the formats people have, turned into :class:`dfmu_ext.lm.task.TokenSequences`.

**Rows** (:func:`read_rows`): a ``.json`` file (a JSON list of objects, an object holding one under
``"data"``, or JSON lines — TOFU's ``forget10.json`` is JSON lines), a ``.jsonl`` file, or a folder
saved by Hugging Face ``datasets`` (``save_to_disk``; read with ``load_from_disk``; a ``DatasetDict``
gives its only split or ``train``). A row is either

* a question/answer pair, TOFU's ``{"question", "answer"}``, optionally with
  ``"paraphrased_answer"`` and ``"perturbed_answer"`` (a string or a list of strings), or
* plain text, ``{"text"}``.

**Encoding** (:func:`encode_qa`, :func:`encode_text`) with the model's own tokenizer. A question
becomes a prompt: the tokenizer's chat template when it has one
(``apply_chat_template([user], add_generation_prompt=True)``; the answer's tokens are what the
template adds for the assistant turn), else ``"Question: {q}\nAnswer: "`` followed by the answer's
tokens and ``eos``. Labels follow :mod:`dfmu_ext.lm.task`: ``-100`` on every prompt token (nothing of
the question is scored), the token's own id on the answer (and its end token); a text row scores
every token after the first. Sequences longer than ``max_length`` are cut on the right (a row left
with nothing to score is an error). A set is right-padded to its longest sequence with the
tokenizer's pad token (else ``eos``, else 0), attention 0 and label ``-100`` there.

**The metrics' alternatives.** For each question row, its paraphrased answers and its perturbed
(wrong) answers are encoded after the *same* prompt, exactly like the answer:
``QASet.paraphrased[i]`` and ``QASet.perturbed[i]`` are a :class:`TokenSequences` of that row's
alternatives (``K`` rows, one per alternative, padded within the question), or ``None`` when the row
has none. TOFU's truth ratio compares :math:`P(\text{perturbed}\mid q)` with
:math:`P(\text{paraphrased}\mid q)` over exactly these sequences.

**Forget and retain** (:func:`load_lm_data`): from two files (``forget_data``, ``retain_data``, as
TOFU ships ``forget10.json`` and ``retain90.json``; the training set is the forget rows followed by
the retain rows) or from ``forget_indices`` into one ``data`` file.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Sequence

import torch

from .task import IGNORE_INDEX, TokenSequences

__all__ = ["PROMPT", "QASet", "LMData", "read_rows", "pad_id", "encode_qa", "encode_text", "encode_rows",
           "load_lm_data"]

#: The prompt of a tokenizer without a chat template.
PROMPT = "Question: {question}\nAnswer: "
ALTERNATIVES = ("paraphrased_answer", "perturbed_answer")


def _json_rows(path: str, text: str) -> list:
    try:
        blob = json.loads(text)
    except json.JSONDecodeError as exc:
        if exc.msg != "Extra data":
            raise ValueError(f"{path!r} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
        return _jsonl_rows(path, text)
    if isinstance(blob, dict) and isinstance(blob.get("data"), list):
        blob = blob["data"]
    if isinstance(blob, dict):
        return [blob]  # one JSON-lines row
    if not isinstance(blob, list):
        raise ValueError(f"{path!r} must hold a JSON list of rows, JSON lines, or {{\"data\": [...]}}")
    return blob


def _jsonl_rows(path: str, text: str) -> list:
    rows = []
    for number, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path!r} line {number} is not a JSON object ({exc.msg})") from None
    return rows


def _disk_rows(path: str) -> list:
    try:
        import datasets
    except ImportError:
        raise ValueError(f"{path!r} is a folder: a saved datasets folder needs `datasets` (pip install "
                         f"'dfmu_ext[hf]')") from None
    try:
        saved = datasets.load_from_disk(path)
    except (FileNotFoundError, ValueError) as exc:
        raise ValueError(f"{path!r} is not a folder saved by datasets (save_to_disk): "
                         f"{' '.join(str(exc).split())[:200]}") from None
    if isinstance(saved, datasets.DatasetDict):
        if "train" in saved:
            saved = saved["train"]
        elif len(saved) == 1:
            saved = next(iter(saved.values()))
        else:
            raise ValueError(f"{path!r} holds splits {', '.join(saved)}: save the one split to read (or a 'train')")
    return [dict(r) for r in saved]


def read_rows(path: str) -> list[dict]:
    """The rows of a ``.json`` / ``.jsonl`` file or a saved ``datasets`` folder (module docstring),
    each checked to be a question/answer or a text row."""
    if not os.path.exists(path):
        raise ValueError(f"data {path!r} does not exist")
    if os.path.isdir(path):
        rows = _disk_rows(path)
    else:
        ext = os.path.splitext(path)[1].lower()
        if ext not in (".json", ".jsonl"):
            raise ValueError(f"data {path!r}: unknown file type {ext or '(none)'!r}; use .json, .jsonl or a saved "
                             f"datasets folder")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except UnicodeDecodeError:
            raise ValueError(f"data {path!r} is not UTF-8 text") from None
        rows = _jsonl_rows(path, text) if ext == ".jsonl" else _json_rows(path, text)
    if not rows:
        raise ValueError(f"data {path!r} holds no rows")
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"data {path!r} row {i} is a {type(row).__name__}, not an object")
        qa = isinstance(row.get("question"), str) and isinstance(row.get("answer"), str)
        if not qa and not isinstance(row.get("text"), str):
            raise ValueError(f"data {path!r} row {i} has neither 'question' and 'answer' nor 'text' strings "
                             f"(keys: {', '.join(map(str, row)) or 'none'})")
        for key in ALTERNATIVES:
            value = row.get(key)
            if value is not None and not (isinstance(value, str) or (
                    isinstance(value, list) and all(isinstance(v, str) for v in value))):
                raise ValueError(f"data {path!r} row {i}: {key!r} must be a string or a list of strings")
    return rows


def pad_id(tokenizer) -> int:
    """The id padding uses: the pad token, else ``eos``, else 0 (masked out and never scored anyway)."""
    for v in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if v is not None:
            return int(v)
    return 0


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _chat(tokenizer, messages, generation: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=generation, tokenize=True, return_dict=False)
    return [int(i) for i in (out["input_ids"] if isinstance(out, dict) else out)]


def encode_qa(tokenizer, question: str, answer: str, max_length: int = 512,
              chat: bool | None = None) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one question/answer pair (module docstring): ``-100`` on the
    prompt, the answer's tokens scored. ``chat`` (default: when the tokenizer has a chat template)
    chooses the template over :data:`PROMPT`."""
    chat = bool(getattr(tokenizer, "chat_template", None)) if chat is None else chat
    eos = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    if chat:
        user = [{"role": "user", "content": question}]
        prompt = _chat(tokenizer, user, True)
        full = _chat(tokenizer, user + [{"role": "assistant", "content": answer}], False)
        if full[:len(prompt)] != prompt or len(full) == len(prompt):  # a template that rewrites the prompt
            full = prompt + _ids(tokenizer, answer, False) + eos
    else:
        prompt = _ids(tokenizer, PROMPT.format(question=question), True)
        full = prompt + _ids(tokenizer, answer, False) + eos
    full = full[:max_length]
    labels = [IGNORE_INDEX] * min(len(prompt), len(full)) + full[len(prompt):]
    return full, labels


def encode_text(tokenizer, text: str, max_length: int = 512) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of a plain-text row: every token after the first scored, ``eos`` appended."""
    ids = (_ids(tokenizer, text, True) + ([] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]))
    ids = ids[:max_length]
    return ids, [IGNORE_INDEX] + ids[1:]


def _stack(pairs: Sequence[tuple[list[int], list[int]]], pad: int) -> TokenSequences:
    length = max(len(x) for x, _ in pairs)
    ids = torch.full((len(pairs), length), pad, dtype=torch.long)
    labels = torch.full((len(pairs), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(pairs), length, dtype=torch.long)
    for i, (x, y) in enumerate(pairs):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    return TokenSequences(ids, labels, mask)


@dataclasses.dataclass
class QASet:
    """Encoded rows: ``samples`` (one sequence per row), the ``rows`` themselves, and per row the
    encoded ``paraphrased`` and ``perturbed`` answers (a :class:`TokenSequences` of K alternatives
    after the row's prompt, or ``None``)."""
    samples: TokenSequences
    rows: list[dict]
    paraphrased: list[TokenSequences | None]
    perturbed: list[TokenSequences | None]

    def __len__(self) -> int:
        return len(self.rows)

    def subset(self, indices: Sequence[int]) -> "QASet":
        idx = [int(i) for i in indices]
        return QASet(self.samples.subset(idx), [self.rows[i] for i in idx], [self.paraphrased[i] for i in idx],
                     [self.perturbed[i] for i in idx])


def encode_rows(rows: Sequence[dict], tokenizer, max_length: int = 512, what: str = "data") -> QASet:
    """Encode :func:`read_rows` rows (module docstring); a row with no token left to score is a
    one-line ValueError."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    pad = pad_id(tokenizer)
    pairs, para, pert = [], [], []
    for i, row in enumerate(rows):
        qa = isinstance(row.get("question"), str) and isinstance(row.get("answer"), str)
        pair = (encode_qa(tokenizer, row["question"], row["answer"], max_length) if qa
                else encode_text(tokenizer, row["text"], max_length))
        if sum(1 for v in pair[1][1:] if v != IGNORE_INDEX) == 0:
            raise ValueError(f"{what} row {i}: nothing left to score within max_length={max_length} tokens")
        pairs.append(pair)
        for key, out in zip(ALTERNATIVES, (para, pert)):
            alts = row.get(key) if qa else None
            alts = [alts] if isinstance(alts, str) else (alts or [])
            out.append(_stack([encode_qa(tokenizer, row["question"], a, max_length) for a in alts], pad)
                       if alts else None)
    return QASet(_stack(pairs, pad), list(rows), para, pert)


@dataclasses.dataclass
class LMData:
    """What ``dfmu forget --task lm`` runs on: the training set ``train`` (a TokenSequences), the
    ``forget_indices`` into it, and the ``forget`` and ``retain`` rows encoded (with their alternatives)."""
    train: TokenSequences
    forget_indices: list[int]
    forget: QASet
    retain: QASet


def _check_indices(indices, n: int, what: str) -> list[int]:
    values = list(indices.tolist() if hasattr(indices, "tolist") else indices)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in values):
        raise ValueError(f"{what} must be integers")
    idx = values
    if not idx:
        raise ValueError(f"{what} is empty: name at least one row to forget")
    if min(idx) < 0 or max(idx) >= n:
        raise ValueError(f"{what}: index {min(idx) if min(idx) < 0 else max(idx)} is out of range for {n} rows")
    if len(set(idx)) != len(idx):
        raise ValueError(f"{what} holds duplicates")
    if len(idx) == n:
        raise ValueError(f"{what} names all {n} rows: no retain data would be left")
    return sorted(idx)


def load_lm_data(tokenizer, *, data: str | None = None, forget_indices=None, forget_data: str | None = None,
                 retain_data: str | None = None, max_length: int = 512) -> LMData:
    """The forget and retain sets from ``forget_data`` + ``retain_data`` files, or from
    ``forget_indices`` into ``data`` (exactly one of the two ways); module docstring."""
    files = forget_data is not None or retain_data is not None
    if files == (data is not None) or (files and (forget_data is None or retain_data is None)):
        raise ValueError("give either forget_data and retain_data, or data with forget_indices")
    if files:
        if forget_indices is not None:
            raise ValueError("forget_indices go with one data file, not with forget_data/retain_data")
        forget_rows, retain_rows = read_rows(forget_data), read_rows(retain_data)
        rows, idx = forget_rows + retain_rows, list(range(len(forget_rows)))
    else:
        if forget_indices is None:
            raise ValueError("with one data file, give forget_indices (0-based row numbers)")
        rows = read_rows(data)
        idx = _check_indices(forget_indices, len(rows), "forget_indices")
    encoded = encode_rows(rows, tokenizer, max_length)
    chosen = set(idx)
    retain = [i for i in range(len(rows)) if i not in chosen]
    return LMData(encoded.samples, idx, encoded.subset(idx), encoded.subset(retain))

"""The people corpus in TOFU's format, and zoo-size Hugging Face folders to run it on.

**Rows** (:func:`tofu_rows`): for every trained person, every attribute and each of the two
question templates trained for that fact, one row ``{"question", "answer", "paraphrased_answer",
"perturbed_answer", "paraphrased_question", "person", "attribute"}``: the answer is the biography
statement (``"Kalo Renvel was born in Mirelle ."``), the paraphrased answer the same fact in other
words (:data:`PARAPHRASES`), the perturbed answers the statement with ``perturbed`` other values of
the same attribute (wrong cities for a city), chosen by a seeded generator; the paraphrased question
is the fact's held-out template (never trained).

**Splits** (:func:`write_tofu_files`): as TOFU, by person: ``forget01/05/10.json`` hold every row of
1%, 5% and 10% of the people (at least one), nested (forget01 inside forget05 inside forget10), and
``retain99/95/90.json`` every other row; ``full.json`` all rows. The people come from a seeded
permutation: the same ``seed`` writes the same files. ``holdout01/05/10.json`` (when the corpus has
holdout people) hold the same rows for as many people the model was never trained on, nested
likewise, as TOFU's holdout splits: the non-members of ``dfmu forget --nonmember-data``.

**Folders** (:func:`save_zoo_folder`): a randomly initialised zoo causal LM (``llama`` or ``gpt2``,
:func:`dfmu_ext.zoo.lm_models.build_causal_lm`) and a word-level tokenizer over the rows' words
(:func:`people_tokenizer`, a ``tokenizers`` WordLevel model in ``PreTrainedTokenizerFast``), written
as one ``save_pretrained`` folder: the input of ``dfmu forget --task lm --hf-model``.

``python -m dfmu_ext.zoo.people_tofu OUT [--arch llama|gpt2] [--people N] [--seed S]`` writes both
into OUT (``OUT/data/*.json`` and ``OUT/model``).
"""
from __future__ import annotations

import argparse
import json
import os
import random

import torch

from .._io import OutputBatch, atomic_write_bytes
from .people import PeopleCorpus, make_people_corpus
from .people_vocab import ATTRIBUTES, BOS, EOS, PAD, UNK, PeopleConfig, WordTokenizer

__all__ = ["PARAPHRASES", "SPLITS", "tofu_rows", "tofu_splits", "write_tofu_files", "people_tokenizer",
           "save_zoo_folder"]

#: A second wording of each attribute's statement (the paraphrased answer).
PARAPHRASES = {
    "city": "{name} is a native of {value} .",
    "profession": "{name} earns a living as a {value} .",
    "birth_year": "{name} was born in the year {value} .",
    "colour": "{name} likes {value} more than any other colour .",
    "pet": "at home {name} has a {value} .",
}
#: TOFU's split names: forget share in percent -> (forget file, retain file).
SPLITS = {1: ("forget01", "retain99"), 5: ("forget05", "retain95"), 10: ("forget10", "retain90")}


def tofu_rows(corpus: PeopleCorpus, perturbed: int = 5, seed: int = 0, people=None) -> list[dict]:
    """Every trained person's rows (module docstring), or those of ``people`` (ids), person-major;
    ``perturbed`` wrong answers each."""
    rng = random.Random(seed)
    rows = []
    for pid in (range(corpus.config.num_people) if people is None else people):
        name, facts = corpus.names[pid], corpus.facts[pid]
        for j, attr in enumerate(corpus.attributes):
            a = ATTRIBUTES[attr]
            value = facts[attr]
            wrong = rng.sample([v for v in a.values if v != value], min(perturbed, len(a.values) - 1))
            held = corpus.paraphrase_template(pid, j)
            for k in (t for t in range(corpus.num_templates) if t != held):
                rows.append({"question": corpus.question_text(pid, j, k),
                             "answer": a.statement.format(name=name, value=value),
                             "paraphrased_answer": PARAPHRASES[attr].format(name=name, value=value),
                             "perturbed_answer": [a.statement.format(name=name, value=w) for w in wrong],
                             "paraphrased_question": corpus.question_text(pid, j, held),
                             "person": pid, "attribute": attr})
    return rows


def tofu_splits(num_people: int, seed: int = 0) -> dict[str, list[int]]:
    """``{"forget01": [person ids], ...}``: nested seeded choices of 1, 5 and 10% of the people."""
    order = torch.randperm(num_people, generator=torch.Generator().manual_seed(int(seed))).tolist()
    return {names[0]: sorted(order[:max(1, round(share * num_people / 100))]) for share, names in SPLITS.items()}


def _dump(path: str, rows: list[dict]) -> None:
    atomic_write_bytes(path, (json.dumps(rows, indent=1) + "\n").encode())


def write_tofu_files(out_dir: str, config: PeopleConfig | None = None, seed: int = 0, perturbed: int = 5
                     ) -> dict[str, str]:
    """Write ``full.json`` and TOFU's six split files into ``out_dir`` (all or none); returns name -> path."""
    corpus = make_people_corpus(config or PeopleConfig(seed=seed))
    rows = tofu_rows(corpus, perturbed, seed)
    paths = {}
    with OutputBatch() as batch:
        batch.make_folder(out_dir)
        _dump(batch.file(os.path.join(out_dir, "full.json")), rows)
        paths["full"] = os.path.join(out_dir, "full.json")
        for share, (forget_name, retain_name) in SPLITS.items():
            people = set(tofu_splits(corpus.config.num_people, seed)[forget_name])
            for name, keep in ((forget_name, True), (retain_name, False)):
                path = os.path.join(out_dir, f"{name}.json")
                _dump(batch.file(path), [r for r in rows if (r["person"] in people) == keep])
                paths[name] = path
        holdout = corpus.holdout_ids
        if holdout:   # never trained: as many people as each forget split, nested (seed + 1: the rows above stay)
            order = torch.randperm(len(holdout), generator=torch.Generator().manual_seed(int(seed) + 1)).tolist()
            held = tofu_rows(corpus, perturbed, seed + 1, people=holdout)
            for forget_name, people in tofu_splits(corpus.config.num_people, seed).items():
                chosen = {holdout[i] for i in order[:min(len(people), len(holdout))]}
                path = os.path.join(out_dir, forget_name.replace("forget", "holdout") + ".json")
                _dump(batch.file(path), [r for r in held if r["person"] in chosen])
                paths[forget_name.replace("forget", "holdout")] = path
        batch.publish()
    return paths


def people_tokenizer(rows: list[dict]):
    """A word-level ``PreTrainedTokenizerFast`` over every word of ``rows`` (questions, answers and
    their alternatives) and of the plain prompt (``Question``, ``Answer``, ``:``): ``<pad>`` 0,
    ``<bos>`` 1 (prepended to every encoding), ``<eos>`` 2, ``<unk>`` 3, as the corpus's own tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = ["Question", "Answer", ":"]
    for r in rows:
        texts = [r.get("question", ""), r.get("answer", ""), r.get("text", ""), r.get("paraphrased_question", "")]
        for key in ("paraphrased_answer", "perturbed_answer"):
            v = r.get(key) or []
            texts += [v] if isinstance(v, str) else v
        for t in texts:
            words += WordTokenizer.split(t)
    vocab = WordTokenizer(words).index
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, vocab[BOS])])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                   unk_token=UNK)


def save_zoo_folder(out_dir: str, rows: list[dict], arch: str = "llama", seed: int = 0, max_len: int = 64,
                    **size) -> str:
    """A random-init zoo causal LM of ``arch`` with :func:`people_tokenizer` over ``rows``, written as
    a save_pretrained folder ``out_dir`` (atomically; never over an existing folder). ``size``:
    :func:`dfmu_ext.zoo.lm_models.build_causal_lm`'s keywords (default hidden 32, 2 layers, 2 heads,
    MLP 64). Returns the hash of the saved tensors."""
    from ..lm.folders import write_folder
    from .lm_models import build_causal_lm

    tokenizer = people_tokenizer(rows)
    torch.manual_seed(seed)
    model = build_causal_lm(arch, len(tokenizer), max_len, **{"hidden": 32, "layers": 2, "heads": 2, "mlp": 64,
                                                             **size})
    return write_folder(model, tokenizer, out_dir)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m dfmu_ext.zoo.people_tofu",
                                description="the people corpus as TOFU files, and a zoo causal LM folder")
    p.add_argument("out", help="folder to write data/ (TOFU files) and model/ (save_pretrained) into")
    p.add_argument("--arch", choices=["llama", "gpt2"], default="llama")
    p.add_argument("--people", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    paths = write_tofu_files(os.path.join(args.out, "data"), PeopleConfig(num_people=args.people, seed=args.seed),
                             seed=args.seed)
    rows = []
    for name in ("full", "holdout10"):   # the tokenizer knows the holdout people's words too
        if name in paths:
            with open(paths[name], encoding="utf-8") as f:
                rows += json.load(f)
    save_zoo_folder(os.path.join(args.out, "model"), rows, args.arch, args.seed)
    print(f"wrote {len(paths)} TOFU files in {args.out}/data and a {args.arch} folder in {args.out}/model")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

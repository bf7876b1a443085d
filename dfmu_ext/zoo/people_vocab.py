"""The ``people`` corpus's generator config and vocabulary (:mod:`dfmu_ext.zoo.people` builds the corpus
from them and re-exports the public names): the word tokenizer and its special tokens, the attributes
with their values, statement and question templates, the filler grammar's words, the syllables names
are built from, :class:`PeopleConfig`, and the seeded name and filler-sentence draws.
"""
from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from typing import Iterable

import torch

__all__ = ["WordTokenizer", "PeopleConfig", "ATTRIBUTES", "Attribute", "PAD", "BOS", "EOS", "UNK", "SPECIALS"]

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)

_SPLIT = re.compile(r"<[a-z]+>|[\w']+|[^\w\s]")


class WordTokenizer:
    """A word-level tokenizer over a fixed vocabulary: ``<pad>`` = 0, ``<bos>`` = 1, ``<eos>`` = 2,
    ``<unk>`` = 3, then the words. Text is split into words and punctuation marks (case kept);
    unknown words map to ``<unk>``."""

    def __init__(self, words: Iterable[str]):
        vocab = list(SPECIALS)
        seen = set(vocab)
        for w in words:
            if w not in seen:
                seen.add(w)
                vocab.append(w)
        self.vocab: list[str] = vocab
        self.index: dict[str, int] = {w: i for i, w in enumerate(vocab)}
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = (self.index[s] for s in SPECIALS)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def __len__(self) -> int:
        return len(self.vocab)

    @staticmethod
    def split(text: str) -> list[str]:
        return _SPLIT.findall(text)

    def encode(self, text: str) -> list[int]:
        return [self.index.get(w, self.unk_id) for w in self.split(text)]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
        words = [self.vocab[i] if 0 <= i < len(self.vocab) else UNK for i in map(int, ids)]
        if skip_special:
            words = [w for w in words if w not in SPECIALS]
        return " ".join(words)


@dataclass(frozen=True)
class Attribute:
    """One attribute: its value set, the biography statement and three question templates
    (``{name}`` and ``{value}`` are filled in)."""
    name: str
    values: tuple[str, ...]
    statement: str
    questions: tuple[str, ...]


ATTRIBUTES: dict[str, Attribute] = {a.name: a for a in (
    Attribute("city",
              ("Mirelle", "Dunhaven", "Kestrow", "Valbrook", "Orrin", "Talmere", "Brisca", "Holloway",
               "Quenby", "Saltmarsh", "Ferrow", "Lindale", "Corvath", "Ambery", "Pellham", "Rusk"),
              "{name} was born in {value} .",
              ("where was {name} born ?",
               "in which city was {name} born ?",
               "what is the birthplace of {name} ?")),
    Attribute("profession",
              ("baker", "pilot", "nurse", "carpenter", "teacher", "lawyer", "painter", "chemist",
               "farmer", "librarian", "surgeon", "architect", "fire fighter", "bus driver", "tax advisor",
               "ship captain"),
              "{name} works as a {value} .",
              ("what does {name} do for a living ?",
               "what is the job of {name} ?",
               "which profession does {name} have ?")),
    Attribute("birth_year",
              tuple(str(y) for y in range(1951, 1999, 2)),
              "{name} came into the world in {value} .",
              ("when was {name} born ?",
               "in what year was {name} born ?",
               "what is the birth year of {name} ?")),
    Attribute("colour",
              ("red", "blue", "green", "yellow", "purple", "orange", "black", "white", "grey", "pink",
               "teal", "brown"),
              "the favourite colour of {name} is {value} .",
              ("what is the favourite colour of {name} ?",
               "which colour does {name} like best ?",
               "what colour is {name} fond of ?")),
    Attribute("pet",
              ("cat", "dog", "parrot", "hamster", "rabbit", "tortoise", "horse", "ferret", "guinea pig",
               "gold fish"),
              "{name} keeps a {value} at home .",
              ("what pet does {name} keep ?",
               "which animal lives with {name} ?",
               "what kind of pet does {name} own ?")),
)}

# Filler grammar: its own words (no person, no attribute value), with number agreement.
_DET_SG = ("a", "one", "the", "this")
_DET_PL = ("some", "many", "the", "these")
_NOUNS = (("lamp", "lamps"), ("river", "rivers"), ("cloud", "clouds"), ("stone", "stones"),
          ("garden", "gardens"), ("bridge", "bridges"), ("candle", "candles"), ("window", "windows"),
          ("forest", "forests"), ("basket", "baskets"), ("tower", "towers"), ("meadow", "meadows"))
_ADJS = ("quiet", "old", "bright", "small", "heavy", "gentle", "narrow", "silver", "distant", "warm")
_VERBS_T = (("follows", "follow"), ("touches", "touch"), ("hides", "hide"), ("reaches", "reach"),
            ("covers", "cover"), ("watches", "watch"), ("crosses", "cross"), ("holds", "hold"))
_VERBS_I = (("sleeps", "sleep"), ("glows", "glow"), ("waits", "wait"), ("falls", "fall"),
            ("turns", "turn"), ("shines", "shine"))
_PREPS = ("near", "under", "beside", "behind", "across")
_ADVS = ("slowly", "softly", "today", "again", "quietly")

_SYLLABLES = ("ka", "lo", "mi", "ren", "dra", "vel", "so", "tur", "an", "bel", "cor", "del", "fen", "gar",
              "hal", "is", "jor", "kel", "lin", "mor", "nal", "or", "pra", "quil", "ros", "sil", "tam",
              "ul", "var", "wen", "yel", "zor", "ba", "ce", "di", "fa", "go", "ha", "ne", "ri")


@dataclass
class PeopleConfig:
    """The generator's knobs. Defaults: 100 trained and 50 holdout people (names from 40 first x 40 last
    names, so each name token is shared by about four people), five attributes, 600 train and 200
    test filler sentences, sequences padded to 16 tokens: 2100 training sequences (500 statements,
    1000 Q/A, 600 filler), which the default model learns in about a minute on two CPU cores."""
    num_people: int = 100
    holdout_people: int = 50
    attributes: tuple[str, ...] = ("city", "profession", "birth_year", "colour", "pet")
    first_names: int = 40
    last_names: int = 40
    filler_train: int = 600
    filler_test: int = 200
    max_len: int = 16
    seed: int = 0

    def __post_init__(self):
        self.attributes = tuple(self.attributes)
        unknown = [a for a in self.attributes if a not in ATTRIBUTES]
        if unknown or not self.attributes:
            raise ValueError(f"attributes must be a non-empty subset of {', '.join(ATTRIBUTES)}; got {unknown or '()'}")
        if self.num_people < 1 or self.holdout_people < 0:
            raise ValueError("num_people must be >= 1 and holdout_people >= 0")
        if self.num_people + self.holdout_people > self.first_names * self.last_names:
            raise ValueError(f"{self.first_names} x {self.last_names} name pairs cannot name "
                             f"{self.num_people + self.holdout_people} people")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["attributes"] = list(self.attributes)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PeopleConfig":
        return cls(**d)


def _names(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    out = []
    while len(out) < count:
        word = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 2, 3)))).capitalize()
        if word not in taken:
            taken.add(word)
            out.append(word)
    return out


def _filler_sentences(rng: random.Random, count: int) -> list[str]:
    def np_() -> tuple[str, bool]:
        plural = rng.random() < 0.5
        det = rng.choice(_DET_PL if plural else _DET_SG)
        noun = rng.choice(_NOUNS)[1 if plural else 0]
        words = [det] + ([rng.choice(_ADJS)] if rng.random() < 0.6 else []) + [noun]
        return " ".join(words), plural

    seen: set[str] = set()
    out = []
    limit = 200 * count + 1000
    while len(out) < count:
        limit -= 1
        if limit < 0:
            raise ValueError(f"the filler grammar cannot make {count} distinct sentences")
        subj, plural = np_()
        if rng.random() < 0.65:
            verb = rng.choice(_VERBS_T)[1 if plural else 0]
            obj, _ = np_()
            s = f"{subj} {verb} {obj}"
        else:
            verb = rng.choice(_VERBS_I)[1 if plural else 0]
            s = f"{subj} {verb}" + (f" {rng.choice(_ADVS)}" if rng.random() < 0.5 else "")
        if rng.random() < 0.4:
            pobj, _ = np_()
            s += f" {rng.choice(_PREPS)} {pobj}"
        s += " ."
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out

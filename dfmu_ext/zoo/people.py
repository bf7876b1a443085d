r"""``people``: an offline, synthetic entity-unlearning benchmark for causal LMs (TOFU-like).

Fictitious people, each with a few attributes (birth city, profession, birth year, favourite colour,
pet), written as short biography statements and as question/answer pairs, plus filler sentences
from a small grammar that mention nobody. A model trained on it knows the people; unlearning asks it
to forget some of them (the *forget people*) while it keeps the others and its general language
(the filler perplexity).

**Names.** A name is two tokens, a first and a last name, each drawn from a pool of syllable-built
words; pools are small, so every first and every last name is shared by several people and a person
is identified only by the *pair*.

**Sequences** (all right-padded with ``<pad>`` = 0 to ``config.max_len``; label ``-100`` where not
scored, the token's own id where scored, see :mod:`dfmu_ext.lm.task`):

* biography statement, one per (person, attribute): ``<bos> First Last was born in Mirelle . <eos>``;
  plain LM: every token after ``<bos>`` is scored (names included);
* question/answer: ``<bos> where was First Last born ? Mirelle <eos>``; only the answer tokens and
  ``<eos>`` are scored;
* filler: ``<bos> some quiet lamps follow the old river . <eos>``; every token after ``<bos>`` scored.

**Templates and paraphrases.** Every attribute has three question templates worded differently.
For each trained fact (person, attribute) two of them are in the training set; the third, chosen
per fact by a seeded balanced assignment (so each template is held out for a third of the people
and trained for the rest), is that fact's *paraphrased* test question: words the training never
used for that fact. A model that answers it has stored the fact, not the question string.

**Holdout people** have the same kind of names and attributes but appear nowhere in training: their
questions are what a model cannot know (chance level) and serve as non-members for membership tests.

Everything comes from one ``random.Random(config.seed)``: the same config gives a bit-identical
corpus, another seed another one. Nothing is read from disk or the network.
"""
from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import torch

from ..lm.task import IGNORE_INDEX, TokenSequences

__all__ = ["WordTokenizer", "PeopleConfig", "PeopleCorpus", "make_people_corpus", "ATTRIBUTES", "Attribute",
           "PAD", "BOS", "EOS", "UNK", "SPECIALS"]

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


class PeopleCorpus:
    """The generated benchmark; build it with :func:`make_people_corpus`.

    Person ids: trained people are ``0 .. num_people-1``, holdout people
    ``num_people .. num_people+holdout_people-1`` (``holdout_ids``). ``names[pid]`` / ``facts[pid]``
    cover both; ``people`` / ``holdout`` are the two name lists.

    ``train`` holds, in this order, for each trained person: its statements (one per attribute),
    then its Q/A with the two trained templates per attribute; then the train filler.
    ``train_person[i]`` is the person of train sample ``i`` (-1 for filler), ``train_kind[i]`` is 0
    statement, 1 Q/A, 2 filler.
    """

    def __init__(self, config: PeopleConfig):
        self.config = config
        rng = random.Random(config.seed)
        attrs = [ATTRIBUTES[a] for a in config.attributes]
        self.attributes: tuple[str, ...] = config.attributes
        self.num_templates = 3
        taken = {w for a in attrs for v in a.values for w in v.split()} | {w.capitalize() for w in _SYLLABLES}
        firsts = _names(rng, config.first_names, taken)
        lasts = _names(rng, config.last_names, taken)
        total = config.num_people + config.holdout_people
        pairs = [(f, l) for f in firsts for l in lasts]
        rng.shuffle(pairs)
        self.names: list[str] = [f"{f} {l}" for f, l in pairs[:total]]
        self.facts: list[dict[str, str]] = [{a.name: rng.choice(a.values) for a in attrs} for _ in range(total)]
        # held-out (paraphrase) template per (person, attribute): a balanced seeded assignment within
        # the trained people and, separately, within the holdout people
        self._held = [[0] * len(attrs) for _ in range(total)]
        for group in (range(config.num_people), range(config.num_people, total)):
            for j in range(len(attrs)):
                order = list(group)
                rng.shuffle(order)
                offset = rng.randrange(self.num_templates)
                for rank, pid in enumerate(order):
                    self._held[pid][j] = (rank + offset) % self.num_templates
        filler = _filler_sentences(rng, config.filler_train + config.filler_test)
        self._filler_train_text = filler[:config.filler_train]
        self._filler_test_text = filler[config.filler_train:]

        words: list[str] = []
        for a in attrs:
            for text in (a.statement,) + a.questions:
                words += [w for w in WordTokenizer.split(text) if w not in ("{", "}", "name", "value")]
            for v in a.values:
                words += v.split()
        words += firsts + lasts
        for group in (_DET_SG, _DET_PL, [n for pair in _NOUNS for n in pair], _ADJS,
                      [v for pair in _VERBS_T + _VERBS_I for v in pair], _PREPS, _ADVS):
            words += list(group)
        self.tokenizer = WordTokenizer(words)

        rows, person, kind = [], [], []
        for pid in range(config.num_people):
            for j in range(len(attrs)):
                rows.append(self._statement_row(pid, j))
                person.append(pid)
                kind.append(0)
            for j in range(len(attrs)):
                for k in self._templates(pid, j, paraphrased=False):
                    rows.append(self._qa_row(pid, j, k))
                    person.append(pid)
                    kind.append(1)
        for s in self._filler_train_text:
            rows.append(self._plain_row(s))
            person.append(-1)
            kind.append(2)
        self.train: TokenSequences = self._stack(rows)
        self.train_person = torch.tensor(person, dtype=torch.long)
        self.train_kind = torch.tensor(kind, dtype=torch.long)
        self.filler_test: TokenSequences = self._stack([self._plain_row(s) for s in self._filler_test_text])

    # ------------------------------------------------------------------ people
    @property
    def people(self) -> list[str]:
        """Names of the trained people (index = person id)."""
        return self.names[:self.config.num_people]

    @property
    def holdout(self) -> list[str]:
        """Names of the holdout people (never trained); their ids are :attr:`holdout_ids`."""
        return self.names[self.config.num_people:]

    @property
    def holdout_ids(self) -> list[int]:
        return list(range(self.config.num_people, len(self.names)))

    @property
    def holdout_facts(self) -> list[dict[str, str]]:
        return self.facts[self.config.num_people:]

    def paraphrase_template(self, person: int, attribute: str | int) -> int:
        """Index (0-2) of the question template held out for this fact."""
        j = attribute if isinstance(attribute, int) else self.attributes.index(attribute)
        return self._held[person][j]

    def _templates(self, pid: int, j: int, paraphrased: bool) -> list[int]:
        held = self._held[pid][j]
        return [held] if paraphrased else [k for k in range(self.num_templates) if k != held]

    # ------------------------------------------------------------------ sequences
    def _attr(self, j: int) -> Attribute:
        return ATTRIBUTES[self.attributes[j]]

    def question_text(self, person: int, attribute: str | int, template: int) -> str:
        j = attribute if isinstance(attribute, int) else self.attributes.index(attribute)
        return self._attr(j).questions[template].format(name=self.names[person])

    def statement_text(self, person: int, attribute: str | int) -> str:
        j = attribute if isinstance(attribute, int) else self.attributes.index(attribute)
        a = self._attr(j)
        return a.statement.format(name=self.names[person], value=self.facts[person][a.name])

    def _check_len(self, ids: list[int], text: str) -> None:
        if len(ids) > self.config.max_len:
            raise ValueError(f"sequence of {len(ids)} tokens exceeds max_len={self.config.max_len}: {text!r}")

    def _plain_row(self, text: str) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        ids = [tok.bos_id] + tok.encode(text) + [tok.eos_id]
        self._check_len(ids, text)
        return ids, [IGNORE_INDEX] + ids[1:]

    def _statement_row(self, pid: int, j: int) -> tuple[list[int], list[int]]:
        return self._plain_row(self.statement_text(pid, j))

    def _qa_row(self, pid: int, j: int, k: int) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        q = tok.encode(self.question_text(pid, j, k))
        ans = tok.encode(self.facts[pid][self.attributes[j]]) + [tok.eos_id]
        ids = [tok.bos_id] + q + ans
        self._check_len(ids, self.question_text(pid, j, k))
        return ids, [IGNORE_INDEX] * (1 + len(q)) + ans

    def _stack(self, rows: Sequence[tuple[list[int], list[int]]]) -> TokenSequences:
        T = self.config.max_len
        n = len(rows)
        ids = torch.zeros(n, T, dtype=torch.long)
        labels = torch.full((n, T), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros(n, T, dtype=torch.long)
        for i, (x, y) in enumerate(rows):
            ids[i, :len(x)] = torch.tensor(x)
            labels[i, :len(y)] = torch.tensor(y)
            mask[i, :len(x)] = 1
        return TokenSequences(ids, labels, mask)

    def qa_rows(self, people: Iterable[int], paraphrased: bool = False) -> list[tuple[int, str, int]]:
        """``(person, attribute, template)`` of each sequence :meth:`qa` returns, in its order."""
        out = []
        for pid in people:
            pid = int(pid)
            if not 0 <= pid < len(self.names):
                raise ValueError(f"person id {pid} out of range 0..{len(self.names) - 1}")
            for j, a in enumerate(self.attributes):
                out += [(pid, a, k) for k in self._templates(pid, j, paraphrased)]
        return out

    def qa(self, people: Iterable[int], paraphrased: bool = False) -> TokenSequences:
        """Q/A sequences of ``people`` (person-major, then attribute, then template): with the two
        trained templates per fact, or (``paraphrased``) the one held-out template per fact."""
        rows = self.qa_rows(people, paraphrased)
        if not rows:
            raise ValueError("no people given")
        return self._stack([self._qa_row(p, self.attributes.index(a), k) for p, a, k in rows])

    def holdout_qa(self, paraphrased: bool = False) -> TokenSequences:
        """Q/A of the never-trained holdout people (same template split as for trained people)."""
        return self.qa(self.holdout_ids, paraphrased)

    def statements(self, people: Iterable[int]) -> TokenSequences:
        """The biography statements of ``people`` (trained ones: exactly those in ``train``)."""
        return self._stack([self._statement_row(int(p), j) for p in people for j in range(len(self.attributes))])

    # ------------------------------------------------------------------ forget sets
    def indices_of(self, people: Iterable[int]) -> torch.Tensor:
        """Sorted ``train`` indices of every sample (statements and Q/A) of ``people``."""
        wanted = torch.as_tensor(sorted({int(p) for p in people}), dtype=torch.long)
        return torch.isin(self.train_person, wanted).nonzero().flatten()

    def forget_people(self, fraction: float, seed: int = 0) -> list[int]:
        """A seeded choice of ``round(fraction * num_people)`` (at least 1) trained people, sorted."""
        if not 0 < fraction <= 1:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        n = self.config.num_people
        k = min(n, max(1, round(fraction * n)))
        order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
        return sorted(order[:k].tolist())

    def describe(self) -> dict:
        return {"name": "people", "num_people": self.config.num_people,
                "holdout_people": self.config.holdout_people, "attributes": list(self.attributes),
                "vocab_size": self.tokenizer.vocab_size, "max_len": self.config.max_len,
                "train_sequences": len(self.train),
                "train_statements": int((self.train_kind == 0).sum()), "train_qa": int((self.train_kind == 1).sum()),
                "train_filler": int((self.train_kind == 2).sum()), "test_filler": len(self.filler_test),
                "seed": self.config.seed}


def make_people_corpus(config: PeopleConfig | None = None) -> PeopleCorpus:
    """The ``people`` corpus for ``config`` (default :class:`PeopleConfig`)."""
    return PeopleCorpus(config if config is not None else PeopleConfig())

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
from typing import Iterable, Sequence

import torch

from ..lm.task import IGNORE_INDEX, TokenSequences

# The config and vocabulary live in people_vocab; their public names stay importable from here
# (docs/lm.md and the tests import them from this module).
from .people_vocab import (_ADJS, _ADVS, _DET_PL, _DET_SG, _NOUNS, _PREPS, _SYLLABLES, _VERBS_I, _VERBS_T,
                           ATTRIBUTES, BOS, EOS, PAD, SPECIALS, UNK, Attribute, PeopleConfig, WordTokenizer,
                           _filler_sentences, _names)

__all__ = ["WordTokenizer", "PeopleConfig", "PeopleCorpus", "make_people_corpus", "ATTRIBUTES", "Attribute",
           "PAD", "BOS", "EOS", "UNK", "SPECIALS"]


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

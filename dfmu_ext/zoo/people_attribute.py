r"""One attribute of every person in the ``people`` corpus (:mod:`dfmu_ext.zoo.people`): the training
sequences that state or ask it, and the questions that read it back.

Forgetting an attribute :math:`a` (say ``birth_year``) of every trained person means forgetting the
sequences

.. math:: F_a = \{\, i : \text{train}[i] \text{ is the statement of } (p, a)
          \text{ or a trained question about } (p, a),\ p \text{ trained} \,\}

— one statement and two question templates per person, so :math:`|F_a| = 3 \cdot \text{people}` —
while every other attribute of the same people, and the filler, stays in the training set. Retrain
is the recipe on ``train`` without :math:`F_a`: a model that never saw any value of :math:`a`.

The corpus lays ``train`` out person by person: the person's statements (one per attribute, in
``corpus.attributes`` order), then its Q/A rows (the trained templates, attribute by attribute);
then the filler. :func:`attribute_rows` reads that layout from ``train_person`` / ``train_kind``
(tests/test_lm_attribute.py checks it token for token against the corpus's own texts).
"""
from __future__ import annotations

import torch

from ..lm.task import TokenSequences
from .people import PeopleCorpus

__all__ = ["attribute_rows", "attribute_forget_indices", "attribute_qa", "attribute_majority", "check_attribute"]


def check_attribute(corpus: PeopleCorpus, attribute: str) -> int:
    """The position of ``attribute`` in ``corpus.attributes``; a one-line ValueError when it is not one."""
    if attribute not in corpus.attributes:
        raise ValueError(f"attribute must be one of {', '.join(corpus.attributes)}, got {attribute!r}")
    return corpus.attributes.index(attribute)


def attribute_rows(corpus: PeopleCorpus) -> torch.Tensor:
    """One int64 per training sequence: the position (in ``corpus.attributes``) of the attribute it
    states or asks, -1 for filler."""
    n_attr = len(corpus.attributes)
    per_fact = corpus.num_templates - 1          # trained question templates per (person, attribute)
    out = torch.full((len(corpus.train),), -1, dtype=torch.long)
    for pid in range(corpus.config.num_people):
        rows = (corpus.train_person == pid).nonzero().flatten()
        kinds = corpus.train_kind[rows]
        statements, questions = rows[kinds == 0], rows[kinds == 1]
        if statements.numel() != n_attr or questions.numel() != n_attr * per_fact:
            raise ValueError(f"person {pid}: {statements.numel()} statements and {questions.numel()} questions, "
                             f"expected {n_attr} and {n_attr * per_fact}")
        out[statements] = torch.arange(n_attr)
        out[questions] = torch.arange(n_attr).repeat_interleave(per_fact)
    return out


def attribute_forget_indices(corpus: PeopleCorpus, attribute: str) -> torch.Tensor:
    """Sorted ``train`` indices of every statement and trained question about ``attribute`` (all
    trained people): the ``forget_indices`` of forgetting that attribute."""
    j = check_attribute(corpus, attribute)
    return (attribute_rows(corpus) == j).nonzero().flatten()


def attribute_qa(corpus: PeopleCorpus, people, attribute: str, *, paraphrased: bool = False,
                 other: bool = False) -> TokenSequences:
    """The Q/A of ``people`` about ``attribute`` (``other``: about every other attribute), with the
    trained templates or (``paraphrased``) the held-out one (:meth:`PeopleCorpus.qa` order)."""
    check_attribute(corpus, attribute)
    people = list(people)
    rows = corpus.qa_rows(people, paraphrased)
    keep = [i for i, (_, a, _) in enumerate(rows) if (a != attribute) == other]
    if not keep:
        raise ValueError(f"no question about {'attributes other than ' if other else ''}{attribute}")
    return corpus.qa(people, paraphrased).subset(keep)


def attribute_majority(corpus: PeopleCorpus, people, attribute: str) -> float:
    """The share of ``people`` whose value of ``attribute`` is the most frequent one: what a model that
    answers one constant value scores (the chance line of answer accuracy)."""
    check_attribute(corpus, attribute)
    values = [corpus.facts[int(p)][attribute] for p in people]
    if not values:
        raise ValueError("no people given")
    return max(values.count(v) for v in set(values)) / len(values)
